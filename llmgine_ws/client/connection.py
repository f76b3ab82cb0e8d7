"""The client: :class:`Client` (requests, handlers, engine helpers) and :func:`connect`.

Concurrency model: :func:`connect` owns an anyio task group holding the transport's writer (the only
task writing the socket), a **reader** (the only task reading it: it answers ``server_ping`` at once
and queues every other message, in arrival order, on a queue of at most ``max_queue`` messages —
when it is full the reader stops reading and TCP pushes back on the server), one **delivery** task
that takes the queue in order (see :mod:`.delivery`: this is what keeps a response from overtaking
the messages before it), and one task per running server-request handler.

**Resume** (on by default, see :mod:`.resume`): with a server that announces a ``resume_token``, the
client acks what it received (every ``ack_interval`` seconds or ``ack_frames`` frames) and, when the
connection drops, the reader reconnects (backoff and jitter), sends ``resume`` first and goes on
reading: the replay, the requests re-sent by the server and live traffic flow into the same queue,
so delivery neither knows nor cares. Requests and commands still waiting are sent again with their
``message_id``; frames seen already (``seq``) are dropped; server requests are answered once. A
heartbeat task pings the server every ``ping_interval`` seconds and drops a connection silent for
``ping_timeout`` (a half-open connection).
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import anyio
import anyio.abc

from .backoff import RateLimitBackoff
from .delivery import Delivery, Waiter
from .engines import (
    Command,
    ConfirmationHandler,
    CreatedEngine,
    UserInputHandler,
    confirmation_handler,
    user_input_handler,
)
from .errors import ClientError, ConnectionClosed, HandshakeRejected, RequestError, RequestTimeout, StateLost
from .handlers import MessageHandler, ServerRequestHandler
from .handshake import Headers, open_transport
from .messages import Message, MessageCodec, new_message_id
from .resume import (
    RECONNECT_CLOSE_CODES,
    Reconnect,
    ResumeOutcome,
    ResumeState,
    reconnect_after_rejection,
)
from .transport import Transport

__all__ = ["Client", "connect"]

_log = logging.getLogger("llmgine_ws.client")

_SRH = TypeVar("_SRH", bound=ServerRequestHandler)
_MH = TypeVar("_MH", bound=MessageHandler)
_UIH = TypeVar("_UIH", bound=UserInputHandler)
_CH = TypeVar("_CH", bound=ConfirmationHandler)
_RH = TypeVar("_RH", bound=Callable[[ResumeOutcome], Any])
_LH = TypeVar("_LH", bound=Callable[[StateLost], Any])

_Control = Callable[[], Awaitable[None]]
"""Something the delivery task runs in its place in the queue (resume callbacks, failing what was lost)."""

_DEFAULT_WINDOW = 120.0
"""Reconnect for this long when the server announced no ``resume_window``."""
_MAX_DEFERRED = 1000
"""Frames (cancels) kept to send once reconnected."""


class _RetryLater(ClientError):
    """The server refused the ``resume`` for now (``RATE_LIMITED``): try again with the next attempt."""


class Client:
    """A connected llmgine_ws client. Obtain one with :func:`connect`; do not instantiate directly.

    Attributes:
        app_id: the ``app_id`` announced by the server's ``connected`` message (``""`` until it
            arrives).
        rate_limit_retries: how many times a request refused with ``RATE_LIMITED`` is sent again
            (after the server's ``retry_after``); 0 turns backing off off.
        resumed: how the last reconnect ended: ``None`` before any, ``True`` when the server
            resumed the app (nothing lost), ``False`` when it could not (see :class:`StateLost`).
        last_resume: the :class:`ResumeOutcome` of the last reconnect, or ``None``.
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
        opener: Callable[[], Awaitable[Transport]] | None = None,
        open_timeout: float = 10.0,
        resume: bool = False,
        reconnect: Reconnect | None = None,
        ack_interval: float = 1.0,
        ack_frames: int = 64,
        ping_interval: float | None = None,
        ping_timeout: float = 20.0,
    ) -> None:
        self.app_id: str = ""
        self.rate_limit_retries = max(0, rate_limit_retries)
        self.resumed: bool | None = None
        self.last_resume: ResumeOutcome | None = None
        self._opener = opener
        self._open_timeout = open_timeout
        self._resume = ResumeState(enabled=resume and opener is not None, ack_frames=ack_frames)
        self._policy = reconnect or Reconnect()
        self._ack_interval = ack_interval
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._link = 0  # which connection this is: 0 the first, +1 at each reconnect
        self._link_up = True
        self._ready = anyio.Event()  # set while the link is up (and for good once the client ended)
        self._ready.set()
        self._closing = False  # close() or abort() was called: a drop is not to be resumed
        self._ended = anyio.Event()
        self._reconnect_scope: anyio.CancelScope | None = None
        self._reader_paused = False
        self._deferred: list[str] = []
        self._resumed_handlers: list[Callable[[ResumeOutcome], Any]] = []
        self._lost_handlers: list[Callable[[StateLost], Any]] = []
        self._transport = transport
        self._task_group = task_group
        self._request_timeout = request_timeout
        self._wait_connected = wait_connected
        self._auto_pong = auto_pong
        self._max_queue = max(1, max_queue)
        self._codec = MessageCodec()
        self._backoff = RateLimitBackoff()
        self._queue_in, self._queue_out = anyio.create_memory_object_stream[Message | _Control](self._max_queue)
        self._connected = anyio.Event()
        self._connected_or_closed = anyio.Event()
        self._delivery = Delivery(task_group, self._respond, inbox_limit=inbox_limit, on_refused=self._refused)

    def __repr__(self) -> str:
        state = f"closed code={self.close_code}" if self.closed else self.state
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
        """``True`` once the client is closed for good (close handshake done, lost and not to be
        resumed, or aborted). A connection being resumed is not closed."""
        return self._ended.is_set() or (self._transport.closed and not self._will_reconnect(self._transport))

    @property
    def close_code(self) -> int | None:
        """The close code (1006 if the connection was lost without a close frame), or ``None``
        while the client is not closed."""
        return self._transport.close_code if self.closed else None

    @property
    def state(self) -> Literal["open", "reconnecting", "closed"]:
        """``open``, ``reconnecting`` (the connection dropped and is being resumed) or ``closed``."""
        if self.closed:
            return "closed"
        return "open" if self._link_up and not self._transport.closed else "reconnecting"

    @property
    def resumable(self) -> bool:
        """Whether a drop now would be resumed: ``resume`` is on and the server announced a token."""
        return self._resume.resumable and not self._closing

    @property
    def last_seq(self) -> int:
        """The highest ``seq`` received from the server (0 before any, or without resume)."""
        return self._resume.last_seq

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
        If the connection drops and is resumed meanwhile, the request is sent again with the same
        ``message_id`` (the server runs it once); ``timeout`` covers the reconnection.

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
            StateLost: the connection dropped and the server could not resume the app.
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
                waiter = self._delivery.expect(mid, text)
                try:
                    await self._send_request(waiter, text)
                    await waiter.event.wait()
                finally:
                    self._delivery.forget(mid, waiter)
                if waiter.error is not None:
                    raise waiter.error
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

        Returns once the frame has been written to the socket (after any rate-limit back-off, and
        after the reconnection if the connection is being resumed). A message sent just before a
        drop may be lost: what must arrive is a :meth:`request`.

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
        while True:
            self._raise_if_closed()
            if self._link_up:
                break
            await self._ready.wait()
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
        if not self._link_up:
            return run  # sent once reconnected
        transport = self._transport
        run.link = self._link
        try:
            transport.send_text_soon(frame)
        except ConnectionClosed:
            if not self._send_failure_is_a_drop(transport):
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
        if not self._link_up:
            return  # sent once reconnected
        transport = self._transport
        command.link = self._link
        try:
            await transport.send_text(command.frame)
        except ConnectionClosed:
            if not self._send_failure_is_a_drop(transport):
                raise

    def _abandon_command(self, command: Command) -> None:
        """Forget a command nobody reads any more and ask the server to cancel it (used by :class:`Command`)."""
        mid = command.message_id
        if self._delivery.commands.get(mid) is not command:
            return
        self._delivery.drop(mid)
        cancel_id = new_message_id()
        self._delivery.drop(cancel_id)  # its cancel_res is not for anyone either
        self._send_or_defer(self._codec.encode("cancel", cancel_id, {"target_message_id": mid}).decode())

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

    def on_resumed(self, handler: _RH) -> _RH:
        """Register (usable as a decorator) a handler called when a dropped connection was resumed.

        It gets the :class:`ResumeOutcome` (``replayed`` frames, the app's ``sessions``) and runs in
        wire order, like a message handler: before the replayed messages are delivered.
        """
        self._resumed_handlers.append(handler)
        return handler

    def on_state_lost(self, handler: _LH) -> _LH:
        """Register (usable as a decorator) a handler called when the server could not resume the app.

        It gets the :class:`StateLost` error (``reason``, ``previous_app_id``, ``app_id``) after
        every message of the lost app was delivered and every request waiting on it failed with that
        error; the client goes on as the new app (create sessions again here, for instance).
        """
        self._lost_handlers.append(handler)
        return handler

    # ---------------------------------------------------------------- closing

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the client: send a close frame, wait (bounded by ``close_timeout``) for the server's
        close frame, then close the socket. Code 1000 (the default) tells the server this is a
        goodbye: it ends the app at once, nothing is kept to resume. Pending requests fail with
        :class:`ConnectionClosed`. Stops a reconnection in progress. Idempotent."""
        self._stop_reconnecting()
        await self._transport.close(code, reason)

    async def abort(self) -> None:
        """Drop the TCP connection at once, without a close frame, and do not reconnect (simulates a
        client that vanishes: a resumable app stays detached on the server until its window ends).
        Pending requests fail with ``ConnectionClosed(1006)``. To simulate a *drop* the client
        resumes from, abort the transport instead: ``await client.transport.abort()``."""
        self._stop_reconnecting()
        await self._transport.abort()

    async def wait_closed(self, timeout: float | None = None) -> int | None:
        """Wait until the client is closed for good and return the close code.

        Args:
            timeout: seconds to wait; ``None`` waits forever.

        Returns:
            The close code, or ``None`` if the client was still open when ``timeout`` elapsed.
        """
        with anyio.move_on_after(timeout):
            await self._ended.wait()
        return self.close_code

    def _stop_reconnecting(self) -> None:
        self._closing = True
        if self._reconnect_scope is not None:
            self._reconnect_scope.cancel()

    # ---------------------------------------------------------------- internals: tasks

    def _start(self) -> None:
        self._task_group.start_soon(self._transport.run_writer)
        self._task_group.start_soon(self._read)
        if self._resume.enabled and self._ack_interval > 0:
            self._task_group.start_soon(self._ack_periodically)
        if self._ping_interval:
            self._task_group.start_soon(self._heartbeat)

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
        """The only task reading the socket: answers pings, queues everything else in order, and
        reconnects (resuming) when a resumable connection drops."""
        try:
            while True:
                # Shielded from the cancellation of connect()'s caller, so the closing handshake can
                # still complete; closing or aborting the transport always ends it.
                with anyio.CancelScope(shield=True):
                    if not await self._read_link(self._transport):
                        return
                if not self._will_reconnect(self._transport):
                    return
                held = await self._reconnect()
                if held is None:
                    return
                for message in held:
                    if not await self._handle(message):
                        return
        except Exception:  # a bug here must not take the user's task group down
            _log.exception("llmgine_ws client reader failed")
            await self._transport.abort()
        finally:
            self._link_up = False
            self._ended.set()
            self._ready.set()
            self._connected_or_closed.set()
            self._queue_in.close()

    async def _read_link(self, transport: Transport) -> bool:
        """Read one connection until it closes; ``False`` if the client must stop reading altogether."""
        while True:
            try:
                message = self._codec.decode(await transport.receive())
            except ConnectionClosed:
                return True
            if not await self._handle(message):
                return False

    async def _handle(self, message: Message) -> bool:
        """One received message: dedupe, ack, take at once or queue; ``False`` once delivery has ended."""
        if not self._resume.accept(message.seq):
            return True  # seen already: a replay overlapping what had arrived
        taken = self._take_now(message)
        self._ack(periodic=False)
        return taken or await self._enqueue(message)

    async def _enqueue(self, item: Message | _Control) -> bool:
        try:
            try:
                self._queue_in.send_nowait(item)
            except anyio.WouldBlock:  # the queue is full: stop reading until it is not
                self._reader_paused = True
                try:
                    await self._queue_in.send(item)
                finally:
                    self._reader_paused = False
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        return True

    def _take_now(self, message: Message) -> bool:
        """Handle what must not wait behind the delivery queue; ``True`` if nothing is left to deliver."""
        if message.type == "connected" and not self._connected.is_set():
            data = message.data
            app_id = data.get("app_id") if isinstance(data, dict) else None
            if isinstance(app_id, str):
                self.app_id = app_id
            self._resume.connected(data)
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
            async for item in self._queue_out:
                if not isinstance(item, Message):
                    await item()
                elif not self._delivery.settle(item):
                    await self._delivery.dispatch(item)
        self._finish()

    def _finish(self) -> None:
        self._delivery.finish(self._transport.closed_error)

    def _refused(self, retry_after: float) -> None:
        if self.rate_limit_retries > 0:
            self._backoff.refused(retry_after)

    # ---------------------------------------------------------------- internals: resume

    def _will_reconnect(self, transport: Transport) -> bool:
        """Whether the end of ``transport`` is a drop to resume from."""
        return (self._resume.resumable and not self._closing and transport is self._transport
                and transport.close_code in RECONNECT_CLOSE_CODES)

    def _send_failure_is_a_drop(self, transport: Transport) -> bool:
        """A send on ``transport`` failed: ``True`` when the frame will go out again after a resume
        (the client reconnects, or already has), ``False`` when the failure is the caller's to see."""
        if transport is not self._transport:
            return not self.closed
        return self._will_reconnect(transport)

    async def _reconnect(self) -> list[Message] | None:
        """Open connections (backoff, jitter) until one is resumed or is a new app; ``None`` when
        giving up. Returns the frames of the new connection to handle (a new app's first ones)."""
        dropped = self._transport
        self._link_up = False
        self._ready = anyio.Event()
        window = self._resume.window or _DEFAULT_WINDOW
        _log.info("connection of app %s lost (%s, %s): reconnecting to resume it", self._resume.app_id,
                  dropped.close_code, dropped.close_reason)
        started = anyio.current_time()
        attempt = 0
        with anyio.CancelScope() as scope:
            self._reconnect_scope = scope
            if self._closing:
                scope.cancel()
            while True:
                attempt += 1
                delay = self._policy.delay(attempt, random.random())
                if self._policy.gives_up(attempt, anyio.current_time() - started + delay, window):
                    _log.warning("gave up reconnecting app %s after %d attempt(s)", self._resume.app_id, attempt - 1)
                    break
                await anyio.sleep(delay)
                transport: Transport | None = None
                try:
                    with anyio.fail_after(self._open_timeout):
                        assert self._opener is not None
                        transport = await self._opener()
                        self._task_group.start_soon(transport.run_writer)
                        outcome, held = await self._resume_on(transport)
                except HandshakeRejected as exc:
                    if not reconnect_after_rejection(exc.status_code):
                        _log.warning("reconnecting refused with HTTP %d: giving up", exc.status_code)
                        break
                    continue
                except (OSError, TimeoutError, ClientError) as exc:
                    _log.debug("reconnect attempt %d failed: %r", attempt, exc)
                    if transport is not None:
                        await transport.abort()
                    continue
                except BaseException:
                    if transport is not None:
                        with anyio.CancelScope(shield=True):
                            await transport.abort()
                    raise
                await self._adopt(transport, outcome)
                return held
        self._reconnect_scope = None
        return None

    async def _resume_on(self, transport: Transport) -> tuple[ResumeOutcome, list[Message]]:
        """On a new connection: wait for ``connected``, send ``resume``, return the answer."""
        resume_id = new_message_id()
        sent = False
        while True:
            message = self._codec.decode(await transport.receive())
            if not sent:
                if message.type == "connected":
                    payload = self._resume.resume_request(message.data, resume_id)
                    transport.send_text_soon(self._codec.encode("resume", resume_id, payload).decode())
                    sent = True
                continue
            if message.type == "error" and message.message_id == resume_id:
                data = message.data if isinstance(message.data, dict) else {}
                if data.get("code") == "RATE_LIMITED":
                    raise _RetryLater("resume refused with RATE_LIMITED")
            if self._resume.is_answer(message):
                return self._resume.finish(message)
            self._resume.hold(message)

    async def _adopt(self, transport: Transport, outcome: ResumeOutcome) -> None:
        """The new connection is ours: resend what waits (resumed) or fail what was lost (not)."""
        self._reconnect_scope = None
        self._transport = transport
        self._link += 1
        self.app_id = outcome.app_id
        self.last_resume = outcome
        self.resumed = outcome.resumed
        if outcome.resumed:
            _log.info("app %s resumed (%d frame(s) replayed)", outcome.app_id, outcome.replayed)
            self._resend(transport)
            await self._enqueue(self._callbacks(self._resumed_handlers, outcome, "on_resumed handler"))
        else:
            error = StateLost(outcome.reason or "unknown", outcome.previous_app_id, outcome.app_id)
            _log.warning("%s", error)
            await self._enqueue(self._lose_state(error))
        self._link_up = True
        self._ready.set()
        self._ack(periodic=False)

    def _resend(self, transport: Transport) -> None:
        """After a resume: every request and command still waiting goes out again (same message_id)."""
        frames: list[str] = []
        for waiter in list(self._delivery.pending.values()):
            if waiter.frame is not None and waiter.link != self._link:
                waiter.link = self._link
                frames.append(waiter.frame)
        for command in list(self._delivery.commands.values()):
            if command.link != self._link and not command.waiting_to_send:
                command.link = self._link
                frames.append(command.frame)
        frames.extend(self._deferred)
        self._deferred.clear()
        with contextlib.suppress(ConnectionClosed):
            for frame in frames:
                transport.send_text_soon(frame)

    def _lose_state(self, error: StateLost) -> _Control:
        """The app is gone: what waited on it fails with ``error`` (in wire order), then ``on_state_lost``."""
        self._delivery.server_requests.reset()
        self._deferred.clear()
        waiters = list(self._delivery.pending.items())
        commands = list(self._delivery.commands.items())
        for message_id, waiter in waiters:
            if self._delivery.is_direct(message_id):  # the delivery task may be waiting on it
                waiter.fail(error)

        async def run() -> None:
            for _, waiter in waiters:
                waiter.fail(error)
            for message_id, command in commands:
                if self._delivery.commands.get(message_id) is command:
                    self._delivery.untrack(message_id)
                command.fail(error)
            await self._delivery.run_callbacks(self._lost_handlers, error, "on_state_lost handler")

        return run

    def _callbacks(self, handlers: list[Callable[[Any], Any]], argument: Any, label: str) -> _Control:
        async def run() -> None:
            await self._delivery.run_callbacks(handlers, argument, label)

        return run

    def _ack(self, *, periodic: bool) -> None:
        if not self._link_up:
            return
        seq = self._resume.ack_due(periodic=periodic)
        if seq is None:
            return
        with contextlib.suppress(ConnectionClosed):
            self._transport.send_text_soon(self._codec.encode("ack", new_message_id(), {"seq": seq}).decode())
            self._resume.acked(seq)

    async def _ack_periodically(self) -> None:
        while not self._ended.is_set():
            await anyio.sleep(self._ack_interval)
            self._ack(periodic=True)

    async def _heartbeat(self) -> None:
        """Ping every ``ping_interval``; a connection silent for ``ping_timeout`` after a ping is lost."""
        assert self._ping_interval
        while not self._ended.is_set():
            await anyio.sleep(self._ping_interval)
            transport = self._transport
            if not self._link_up or transport.closed:
                continue
            sent = anyio.current_time()
            try:
                transport.ping()
            except ConnectionClosed:
                continue
            with anyio.move_on_after(self._ping_timeout):
                await transport.wait_activity(sent)
            if (transport.last_activity <= sent and not transport.closed and transport is self._transport
                    and not self._reader_paused):  # a paused reader reads nothing, pongs included
                _log.warning("no answer to a ping within %s s: the connection is lost", self._ping_timeout)
                await transport.lose(f"no answer to a ping within {self._ping_timeout} s")

    # ---------------------------------------------------------------- internals: writing

    def _respond(self, message_id: str, data: dict[str, Any]) -> None:
        self._respond_soon("server_response", message_id, data)

    def _respond_soon(self, type: str, message_id: str, data: Any) -> None:
        """Queue a message from a non-async context, ignoring a closed connection (an answer lost
        with a dropped connection is sent again when the server asks again after the resume)."""
        if not self._link_up:
            return
        with contextlib.suppress(ConnectionClosed):
            self._transport.send_text_soon(self._codec.encode(type, message_id, data).decode())

    def _send_or_defer(self, frame: str) -> None:
        """Send now, or once resumed if the connection is being resumed."""
        if self._link_up:
            with contextlib.suppress(ConnectionClosed):
                self._transport.send_text_soon(frame)
                return
        if not self.closed and len(self._deferred) < _MAX_DEFERRED:
            self._deferred.append(frame)

    async def _send_request(self, waiter: Waiter, text: str) -> None:
        """Send a request's frame now, unless the connection is being resumed (then :meth:`_resend`
        sends it). A drop while sending is not an error when the connection will be resumed."""
        if not self._link_up:
            return
        transport = self._transport
        waiter.link = self._link
        try:
            await transport.send_text(text)
        except ConnectionClosed:
            if not self._send_failure_is_a_drop(transport):
                raise

    def _raise_if_closed(self) -> None:
        if self.closed or self._delivery.finished:
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
    resume: bool = True,
    reconnect: Reconnect | None = None,
    ack_interval: float = 1.0,
    ack_frames: int = 64,
    ping_interval: float | None = 20.0,
    ping_timeout: float = 20.0,
) -> AsyncIterator[Client]:
    """Connect to an llmgine_ws server and yield a :class:`Client`.

    Leaving the context closes the connection (close frame 1000, waiting at most
    ``close_timeout`` for the server's close frame) and cancels the client's tasks (running
    handlers included). Code 1000 is a goodbye: the server ends the app at once.

    With ``resume`` (the default) and a server that keeps apps resumable (its ``connected`` has a
    ``resume_token``), a dropped connection is reopened and the app resumed: sessions, engines,
    running commands, pending requests and questions survive, and every message arrives once, in
    order. See ``docs/python-client.md``, "Lost connections and resume".

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
        resume: ack what arrives and resume the app after a drop (when the server offers it);
            ``False`` behaves like a client that never heard of resume (no acks, no reconnect: a
            drop ends the client and the server cleans the app up at once).
        reconnect: the backoff of reconnections (:class:`Reconnect`: delays, jitter, attempts, time).
        ack_interval: seconds between acks while something is unacked.
        ack_frames: frames received after which an ack is sent at once.
        ping_interval: seconds between WebSocket pings that check the connection is alive
            (``None`` or 0: no heartbeat).
        ping_timeout: a connection that sends nothing for this long after a ping is lost (1006),
            which a resumable client resumes from.

    Raises:
        HandshakeRejected: the server answered the handshake with an HTTP error status.
        ConnectionClosed: the server closed the connection before ``connected``.
        RequestTimeout: the connection could not be opened within ``open_timeout``.
        ClientError: the handshake response was not a valid WebSocket upgrade.
        OSError: the TCP (or TLS) connection failed.
        ValueError: the URL is not a ``ws://``/``wss://`` URL.
    """
    async def opener() -> Transport:
        return await open_transport(url, headers=headers, subprotocols=subprotocols, ssl_context=ssl_context,
                                    max_message_size=max_message_size, close_timeout=close_timeout)

    deadline = anyio.current_time() + open_timeout
    with anyio.move_on_after(open_timeout) as open_scope:
        transport = await opener()
    if open_scope.cancelled_caught:
        raise RequestTimeout(f"timed out opening {url!r}")

    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        client = Client(transport, tg, request_timeout=request_timeout, wait_connected=wait_connected,
                        auto_pong=auto_pong, inbox_limit=inbox_limit, max_queue=max_queue,
                        rate_limit_retries=rate_limit_retries, opener=opener, open_timeout=open_timeout,
                        resume=resume, reconnect=reconnect, ack_interval=ack_interval, ack_frames=ack_frames,
                        ping_interval=ping_interval, ping_timeout=ping_timeout)
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
                await client.transport.abort()
            client._finish()  # when the delivery task was cancelled before it could
            tg.cancel_scope.cancel()
    if error is not None:
        raise error
