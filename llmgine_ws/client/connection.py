"""The client: :class:`Client` (requests, handlers, engine helpers) and :func:`connect`.

Concurrency model: :func:`connect` owns an anyio task group holding the transport's writer (the only
task writing the socket), a **reader** (the only task reading it: it answers ``server_ping`` at once
and queues every other message, in arrival order, on a queue of at most ``max_queue`` messages —
when it is full the reader stops reading and TCP pushes back on the server), one **delivery** task
that takes the queue in order (see :mod:`.delivery`: this is what keeps a response from overtaking
the messages before it), and one task per running server-request handler.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import anyio.abc

from .backoff import RateLimitBackoff
from .delivery import Delivery
from .engines import (
    Command,
    ConfirmationHandler,
    CreatedEngine,
    UserInputHandler,
    confirmation_handler,
    user_input_handler,
)
from .errors import ClientError, ConnectionClosed, RequestError, RequestTimeout
from .handlers import MessageHandler, ServerRequestHandler
from .handshake import Headers, open_transport
from .messages import Message, MessageCodec, new_message_id
from .transport import Transport

__all__ = ["Client", "connect"]

_log = logging.getLogger("llmgine_ws.client")

_SRH = TypeVar("_SRH", bound=ServerRequestHandler)
_MH = TypeVar("_MH", bound=MessageHandler)
_UIH = TypeVar("_UIH", bound=UserInputHandler)
_CH = TypeVar("_CH", bound=ConfirmationHandler)


class Client:
    """A connected llmgine_ws client. Obtain one with :func:`connect`; do not instantiate directly.

    Attributes:
        app_id: the ``app_id`` announced by the server's ``connected`` message (``""`` until it
            arrives).
        rate_limit_retries: how many times a request refused with ``RATE_LIMITED`` is sent again
            (after the server's ``retry_after``); 0 turns backing off off.
    """

    def __init__(
        self,
        transport: Transport,
        task_group: anyio.abc.TaskGroup,
        *,
        request_timeout: float,
        wait_connected: bool,
        auto_pong: bool,
        inbox_limit: int,
        max_queue: int,
        rate_limit_retries: int,
    ) -> None:
        self.app_id: str = ""
        self.rate_limit_retries = max(0, rate_limit_retries)
        self._transport = transport
        self._task_group = task_group
        self._request_timeout = request_timeout
        self._wait_connected = wait_connected
        self._auto_pong = auto_pong
        self._max_queue = max(1, max_queue)
        self._codec = MessageCodec()
        self._backoff = RateLimitBackoff()
        self._queue_in, self._queue_out = anyio.create_memory_object_stream[Message](self._max_queue)
        self._connected = anyio.Event()
        self._connected_or_closed = anyio.Event()
        self._delivery = Delivery(task_group, self._respond, inbox_limit=inbox_limit, on_refused=self._refused)

    def __repr__(self) -> str:
        state = f"closed code={self.close_code}" if self.closed else "open"
        return f"<Client app_id={self.app_id!r} {state}>"

    # ---------------------------------------------------------------- state

    @property
    def transport(self) -> Transport:
        """The WebSocket connection the client currently speaks over."""
        return self._transport

    @property
    def subprotocol(self) -> str | None:
        """The subprotocol the server accepted, or ``None``."""
        return self._transport.subprotocol

    @property
    def closed(self) -> bool:
        """``True`` once the connection is closed (close handshake done, lost, or aborted)."""
        return self._transport.closed

    @property
    def close_code(self) -> int | None:
        """The close code (1006 if the connection was lost without a close frame), or ``None``
        while the connection is open."""
        return self._transport.close_code

    @property
    def close_reason(self) -> str:
        """The close reason received from the server (or a description of the failure)."""
        return self._transport.close_reason

    # ---------------------------------------------------------------- requests

    async def request(
        self,
        type: str,
        data: Any = None,
        *,
        message_id: str | None = None,
        timeout: float | None = None,
    ) -> Message:
        """Send a request and wait for the message carrying the same ``message_id``.

        The response is returned once every message the server sent before it has been delivered
        (its handlers have run). A ``RATE_LIMITED`` refusal is retried, with the same ``message_id``,
        after the server's ``retry_after`` (at most ``rate_limit_retries`` times, within ``timeout``).

        Args:
            type: the message type (e.g. ``"ping"``).
            data: the payload, a dict or a msgspec Struct (``None`` sends ``{}``).
            message_id: the id to use; a fresh one is generated by default.
            timeout: seconds to wait for the response (sending included); ``None`` uses the
                ``request_timeout`` given to :func:`connect`, ``math.inf`` waits forever.

        Returns:
            The response message.

        Raises:
            RequestError: the server answered with an ``error`` envelope.
            RequestTimeout: no response in time (a late response then goes to :meth:`receive`).
            ConnectionClosed: the connection is closed or closes while waiting (raised at once).
            ValueError: ``message_id`` is already used by a pending request.
        """
        mid = message_id if message_id is not None else new_message_id()
        text = self._codec.encode(type, mid, data).decode()
        if self._delivery.in_use(mid):
            raise ValueError(f"message_id {mid!r} is already used by a pending request")
        self._raise_if_closed()
        refusals = 0
        refused: RequestError | None = None
        response: Message | None = None
        with anyio.move_on_after(self._request_timeout if timeout is None else timeout):
            while True:
                response = None
                await self._backoff.wait()
                self._raise_if_closed()
                waiter = self._delivery.expect(mid)
                try:
                    await self._transport.send_text(text)
                    await waiter.event.wait()
                finally:
                    self._delivery.forget(mid, waiter)
                response = waiter.response
                if response is None or response.type != "error":
                    break
                refused = RequestError.from_response(response)
                if refused.code != "RATE_LIMITED" or refusals >= self.rate_limit_retries:
                    raise refused
                refusals += 1  # the delivery task already told the back-off how long to wait
        if response is None:
            if self.closed or self._delivery.finished:
                raise self._transport.closed_error()
            if refused is not None:
                raise refused  # still backing off when the time ran out
            raise RequestTimeout(f"no response to {type!r} request {mid!r} in time")
        return response

    async def send(self, type: str, data: Any = None, *, message_id: str | None = None) -> str:
        """Send a message without waiting for any response.

        Returns once the frame has been written to the socket (after any rate-limit back-off).

        Args:
            type: the message type.
            data: the payload, a dict or a msgspec Struct (``None`` sends ``{}``).
            message_id: the id to use; a fresh one is generated by default.

        Returns:
            The message id.

        Raises:
            ConnectionClosed: the connection is closed.
        """
        mid = message_id if message_id is not None else new_message_id()
        text = self._codec.encode(type, mid, data).decode()
        self._raise_if_closed()
        await self._backoff.wait()
        await self._transport.send_text(text)
        return mid

    async def create_session(self) -> str:
        """Create a session on the server (``create_session`` request) and return its id.

        Raises:
            RequestError: the server refused.
            ClientError: the response carries no ``session_id``.
        """
        # app_id is the connection's own: seed-era servers require it; ours ignores it.
        response = await self.request("create_session", {"app_id": self.app_id})
        data = response.data
        session_id = data.get("session_id") if isinstance(data, dict) else None
        if not isinstance(session_id, str):
            raise ClientError(f"create_session response has no session_id: {data!r}")
        return session_id

    # ---------------------------------------------------------------- engines

    async def create_engine(self, session_id: str, engine_type: str, config: dict[str, Any] | None = None,
                            *, timeout: float | None = None) -> CreatedEngine:
        """Attach an engine of ``engine_type`` to a session (``create_engine``); ``config`` is handed
        to the server's engine factory as is.

        Raises:
            RequestError: e.g. ``INVALID_ENGINE_TYPE``, ``ENGINE_EXISTS``, ``ENGINE_CREATION_FAILED``.
        """
        response = await self.request("create_engine", {"session_id": session_id, "engine_type": engine_type,
                                                         "config": config or {}}, timeout=timeout)
        data = response.data if isinstance(response.data, dict) else {}
        return CreatedEngine(session_id=str(data.get("session_id", session_id)), engine_id=str(data.get("engine_id")),
                             engine_type=str(data.get("engine_type", engine_type)))

    async def delete_engine(self, session_id: str) -> None:
        """Stop and remove the session's engine (the session stays).

        Raises:
            RequestError: e.g. ``ENGINE_NOT_FOUND``.
        """
        await self.request("delete_engine", {"session_id": session_id})

    def command(self, session_id: str, command: Any = None, *, message_id: str | None = None) -> Command:
        """Send an ``engine_command`` to the session's engine and return the running :class:`Command`.

        The command is sent at once; iterate the returned object for its events, in order::

            async for event in client.command(session_id, {"text": "hi"}):
                print(event.event_type, event.payload)

        The iteration ends with the command: its ``engine_command_res`` is then ``command.result``
        (``status`` ``completed``, ``cancelled`` or ``failed``). A refusal (``ENGINE_NOT_FOUND``...)
        raises :class:`RequestError` from the iteration, a lost connection :class:`ConnectionClosed`.
        A command's events go to its iterator only (not to ``on_message`` handlers or
        :meth:`receive`). There is no timeout: a command may wait on the user.

        Raises:
            ConnectionClosed: the connection is closed.
            ValueError: ``message_id`` is already used by a pending request.
        """
        mid = message_id if message_id is not None else new_message_id()
        frame = self._codec.encode("engine_command", mid, {"session_id": session_id, "command": command}).decode()
        if self._delivery.in_use(mid):
            raise ValueError(f"message_id {mid!r} is already used by a pending request")
        self._raise_if_closed()
        run = Command(self, session_id, mid, frame, self._max_queue)
        self._delivery.track(run)
        if self._backoff.waiting:
            run.send_later()  # its first read sends it, once the back-off allows
            return run
        try:
            self._transport.send_text_soon(frame)
        except ConnectionClosed:
            self._delivery.untrack(mid)
            raise
        return run

    async def cancel(self, message_id: str) -> bool:
        """Cancel one of this client's running requests (e.g. a command) by its ``message_id``.

        Returns:
            ``True`` if it was still running (a command then ends ``cancelled``), ``False`` if it had
            already finished.
        """
        response = await self.request("cancel", {"target_message_id": message_id})
        return bool(response.data.get("cancelled")) if isinstance(response.data, dict) else False

    async def _resend_command(self, command: Command) -> None:
        """Send a command's frame again once the rate-limit back-off allows (used by :class:`Command`)."""
        await self._backoff.wait()
        self._raise_if_closed()
        self._delivery.track(command)
        await self._transport.send_text(command.frame)

    def _abandon_command(self, command: Command) -> None:
        """Forget a command nobody reads any more and ask the server to cancel it (used by :class:`Command`)."""
        mid = command.message_id
        if self._delivery.commands.get(mid) is not command:
            return
        self._delivery.drop(mid)
        cancel_id = new_message_id()
        self._delivery.drop(cancel_id)  # its cancel_res is not for anyone either
        with contextlib.suppress(ConnectionClosed):
            self._transport.send_text_soon(self._codec.encode("cancel", cancel_id, {"target_message_id": mid}).decode())

    # ---------------------------------------------------------------- receiving

    async def receive(self, timeout: float | None = None) -> Message:
        """Return the next message not consumed otherwise, in arrival order.

        These are the messages that are neither a response to a pending request, nor an event of a
        :meth:`command`, nor handled by a registered handler: server-initiated messages without
        handler, responses with unknown (or timed-out) ids, and raw frames (``type == "<raw>"``).
        The inbox is bounded (``inbox_limit``); past its limit the oldest messages are dropped with
        a logged warning. Do not wait on it from inside a message handler: the messages behind the
        handler are delivered only once it returns.

        Args:
            timeout: seconds to wait; ``None`` waits until a message arrives or the connection
                closes.

        Raises:
            ConnectionClosed: the connection is closed and the inbox is empty.
            RequestTimeout: nothing arrived in time.
        """
        return await self._delivery.inbox.receive(timeout)

    # ---------------------------------------------------------------- handlers

    def on_server_request(self, request_type: str) -> Callable[[_SRH], _SRH]:
        """Decorator registering the handler of server requests of ``request_type``.

        It answers ``server_request`` frames whose ``data.request_type`` is ``request_type``, and
        server-initiated frames whose own ``type`` is ``request_type`` (what
        ``send_to_app_and_wait(app_id, "ask_color", data)`` sends). The handler receives the request
        :class:`Message` and returns (directly or through an awaitable) a mapping of fields, or
        ``None``; the client answers with a ``server_response`` (same ``message_id``) whose data is
        ``{**fields, "response_type": request_type}``, or ``{"response_type": ..., "error":
        str(exc)}`` if the handler raised. Each request runs in its own task, so a slow handler
        never blocks delivery (it may itself call :meth:`request`); a request the server withdraws
        (``server_request_cancelled``) has its handler cancelled. Registering again replaces the
        previous handler.

        A ``server_request`` whose type has no handler is answered at once with
        ``{"response_type": <type>, "error": "no handler for request_type '<type>'"}``.
        """

        def register(handler: _SRH) -> _SRH:
            self._delivery.request_handlers[request_type] = handler
            return handler

        return register

    def on_user_input(self, handler: _UIH) -> _UIH:
        """Register (usable as a decorator) the answer to an engine's ``ctx.ask_user(...)``.

        The handler (sync or async) gets a :class:`UserInputRequest` (``prompt``, ``session_id``,
        ``command_id``, ``extra``) and returns the user's text; the client answers
        ``{"response_type": "user_input", "user_input": text}``.
        """
        self._delivery.request_handlers["user_input"] = user_input_handler(handler)
        return handler

    def on_confirmation(self, handler: _CH) -> _CH:
        """Register (usable as a decorator) the answer to an engine's ``ctx.confirm(...)``.

        The handler (sync or async) gets a :class:`ConfirmationRequest` (``message``, ``options``,
        ``session_id``, ``command_id``, ``extra``) and returns one of ``options``; the client answers
        ``{"response_type": "user_confirmation", "selection": option}``. Returning anything else is
        answered as an error (the engine's ``confirm`` raises).
        """
        self._delivery.request_handlers["user_confirmation"] = confirmation_handler(handler)
        return handler

    def on_notification(self, handler: _MH) -> _MH:
        """Register (usable as a decorator) a handler for ``notification`` messages.

        Same delivery rules as :meth:`on_message`. Notifications received while no handler is
        registered go to :meth:`receive`.
        """
        return self.on_message("notification")(handler)

    def on_message(self, type: str) -> Callable[[_MH], _MH]:
        """Decorator registering a handler for messages of ``type`` (e.g. ``"engine_event"``).

        Handlers (sync or async) run one at a time, in wire order across all types, from the
        client's delivery task; exceptions are logged and do not stop delivery. Several handlers
        may be registered for a type; they are called in registration order. A slow handler
        delays every message after it (responses included): hand long work to a task of your own.
        Responses to pending requests, the events of a :meth:`command`, server requests and (with
        auto-pong) ``server_ping`` are never passed to these handlers.
        """

        def register(handler: _MH) -> _MH:
            self._delivery.message_handlers.setdefault(type, []).append(handler)
            return handler

        return register

    # ---------------------------------------------------------------- closing

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection: send a close frame, wait (bounded by ``close_timeout``) for the
        server's close frame, then close the socket. Pending requests fail with
        :class:`ConnectionClosed`. Idempotent."""
        await self._transport.close(code, reason)

    async def abort(self) -> None:
        """Drop the TCP connection at once, without a close frame (simulates a client that
        vanishes). Pending requests fail with ``ConnectionClosed(1006)``."""
        await self._transport.abort()

    async def wait_closed(self, timeout: float | None = None) -> int | None:
        """Wait until the connection is closed and return the close code.

        Args:
            timeout: seconds to wait; ``None`` waits forever.

        Returns:
            The close code, or ``None`` if the connection was still open when ``timeout`` elapsed.
        """
        with anyio.move_on_after(timeout):
            await self._transport.wait_closed()
        return self._transport.close_code

    # ---------------------------------------------------------------- internals: tasks

    def _start(self) -> None:
        self._task_group.start_soon(self._transport.run_writer)
        self._task_group.start_soon(self._read)

    def _start_delivery(self) -> None:
        # Started just before connect() hands the client over: handlers registered at the top of the
        # `async with` block (before its first await) see every message, the first notification too.
        self._task_group.start_soon(self._deliver)

    async def _await_connected(self, deadline: float) -> None:
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            await self._connected_or_closed.wait()
        if self._connected.is_set():
            return
        self._raise_if_closed()
        raise RequestTimeout("timed out waiting for the server's 'connected' message")

    async def _read(self) -> None:
        """The only task reading the socket: answers pings, queues everything else in order."""
        try:
            # Shielded from the cancellation of connect()'s caller, so the closing handshake can still
            # complete; closing or aborting the transport always ends it.
            with anyio.CancelScope(shield=True):
                while True:
                    try:
                        message = self._codec.decode(await self._transport.receive())
                    except ConnectionClosed:
                        return
                    if self._take_now(message):
                        continue
                    try:
                        try:
                            self._queue_in.send_nowait(message)
                        except anyio.WouldBlock:  # the queue is full: stop reading until it is not
                            await self._queue_in.send(message)
                    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                        return
        except Exception:  # a bug here must not take the user's task group down
            _log.exception("llmgine_ws client reader failed")
            await self._transport.abort()
        finally:
            self._connected_or_closed.set()
            self._queue_in.close()

    def _take_now(self, message: Message) -> bool:
        """Handle what must not wait behind the delivery queue; ``True`` if nothing is left to deliver."""
        if message.type == "connected" and not self._connected.is_set():
            data = message.data
            app_id = data.get("app_id") if isinstance(data, dict) else None
            if isinstance(app_id, str):
                self.app_id = app_id
            self._connected.set()
            self._connected_or_closed.set()
            return self._wait_connected
        if message.type == "server_ping" and self._auto_pong:
            data = message.data
            timestamp = data.get("timestamp") if isinstance(data, dict) else None
            self._respond_soon("server_pong", message.message_id,
                               {"timestamp": timestamp, "server_timestamp": datetime.now(UTC).isoformat()})
            return True
        return self._delivery.deliver_now(message)

    async def _deliver(self) -> None:
        """The delivery task: every queued message, in order, to whoever consumes it."""
        async with self._queue_out:
            async for message in self._queue_out:
                if not self._delivery.settle(message):
                    await self._delivery.dispatch(message)
        self._finish()

    def _finish(self) -> None:
        self._delivery.finish(self._transport.closed_error)

    def _refused(self, retry_after: float) -> None:
        if self.rate_limit_retries > 0:
            self._backoff.refused(retry_after)

    # ---------------------------------------------------------------- internals: writing

    def _respond(self, message_id: str, data: dict[str, Any]) -> None:
        self._respond_soon("server_response", message_id, data)

    def _respond_soon(self, type: str, message_id: str, data: Any) -> None:
        """Queue a message from a non-async context, ignoring a closed connection."""
        with contextlib.suppress(ConnectionClosed):
            self._transport.send_text_soon(self._codec.encode(type, message_id, data).decode())

    def _raise_if_closed(self) -> None:
        if self._transport.closed or self._delivery.finished:
            raise self._transport.closed_error()


@asynccontextmanager
async def connect(
    url: str,
    *,
    headers: Headers | None = None,
    subprotocols: Sequence[str] = (),
    ssl_context: ssl.SSLContext | None = None,
    open_timeout: float = 10.0,
    request_timeout: float = 30.0,
    max_message_size: int = 16 * 1024 * 1024,
    wait_connected: bool = True,
    auto_pong: bool = True,
    close_timeout: float = 5.0,
    inbox_limit: int = 10_000,
    max_queue: int = 10_000,
    rate_limit_retries: int = 3,
) -> AsyncIterator[Client]:
    """Connect to an llmgine_ws server and yield a :class:`Client`.

    Leaving the context closes the connection (close frame 1000, waiting at most
    ``close_timeout`` for the server's close frame) and cancels the client's tasks (running
    handlers included).

    Args:
        url: a ``ws://`` or ``wss://`` URL, with path and query string (the server's endpoint is
            ``/api/ws``, under the mount path when mounted in another app).
        headers: extra HTTP headers for the opening handshake (e.g. ``Authorization``).
        subprotocols: subprotocols to offer; the accepted one is ``client.subprotocol``.
        ssl_context: TLS context for ``wss://`` (default: ``ssl.create_default_context()``).
        open_timeout: bound on TCP connect + TLS + handshake + waiting for ``connected``.
        request_timeout: default timeout of :meth:`Client.request`.
        max_message_size: largest incoming message (characters for text, bytes for binary);
            a larger one makes the client close the connection with code 1009.
        wait_connected: wait for the server's ``connected`` message and set ``client.app_id``
            before yielding (the message is then consumed; with ``False`` it also goes to
            :meth:`Client.receive`).
        auto_pong: answer ``server_ping`` messages with ``server_pong`` automatically
            (``False`` delivers them to :meth:`Client.receive`).
        close_timeout: bound on the closing handshake.
        inbox_limit: capacity of the :meth:`Client.receive` inbox (oldest dropped past it).
        max_queue: messages received but not yet delivered (beyond it the client stops reading the
            socket), and events a :class:`Command` may hold unread (beyond it the command is
            cancelled and its iteration raises).
        rate_limit_retries: times a request refused with ``RATE_LIMITED`` is sent again after the
            server's ``retry_after``; 0 turns backing off off.

    Raises:
        HandshakeRejected: the server answered the handshake with an HTTP error status.
        ConnectionClosed: the server closed the connection before ``connected``.
        RequestTimeout: the connection could not be opened within ``open_timeout``.
        ClientError: the handshake response was not a valid WebSocket upgrade.
        OSError: the TCP (or TLS) connection failed.
        ValueError: the URL is not a ``ws://``/``wss://`` URL.
    """
    deadline = anyio.current_time() + open_timeout
    with anyio.move_on_after(open_timeout) as open_scope:
        transport = await open_transport(url, headers=headers, subprotocols=subprotocols, ssl_context=ssl_context,
                                         max_message_size=max_message_size, close_timeout=close_timeout)
    if open_scope.cancelled_caught:
        raise RequestTimeout(f"timed out opening {url!r}")

    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        client = Client(transport, tg, request_timeout=request_timeout, wait_connected=wait_connected,
                        auto_pong=auto_pong, inbox_limit=inbox_limit, max_queue=max_queue,
                        rate_limit_retries=rate_limit_retries)
        client._start()
        try:
            if wait_connected:
                await client._await_connected(deadline)
            client._start_delivery()
            yield client
        except Exception as exc:
            # Re-raised below, outside the task group, so that callers see their own exception
            # rather than an ExceptionGroup.
            error = exc
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await client.close()
                await transport.abort()
            client._finish()  # when the delivery task was cancelled before it could
            tg.cancel_scope.cancel()
    if error is not None:
        raise error
