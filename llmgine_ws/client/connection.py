"""The client's public face: :class:`Client` (requests, commands, handlers, closing).

Obtain a client with :func:`~.connecting.connect`. The connection under the client — the reader,
the delivery task, reconnecting and resuming after a drop, acks and the heartbeat — is its
:class:`~.session.Session` (see :mod:`.session` for the concurrency model).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import anyio
import anyio.abc

from .backoff import RateLimitBackoff
from .engines import (
    Command,
    ConfirmationHandler,
    CreatedEngine,
    UserInputHandler,
    confirmation_handler,
    user_input_handler,
)
from .errors import ClientError, ConnectionClosed, RequestError, RequestTimeout, StateLost
from .handlers import MessageHandler, ServerRequestHandler
from .messages import Message, new_message_id
from .resume import Reconnect, ResumeOutcome
from .session import Session
from .transport import Transport

__all__ = ["Client"]

_SRH = TypeVar("_SRH", bound=ServerRequestHandler)
_MH = TypeVar("_MH", bound=MessageHandler)
_UIH = TypeVar("_UIH", bound=UserInputHandler)
_CH = TypeVar("_CH", bound=ConfirmationHandler)
_RH = TypeVar("_RH", bound=Callable[[ResumeOutcome], Any])
_LH = TypeVar("_LH", bound=Callable[[StateLost], Any])


class Client:
    """A connected llmgine_ws client. Obtain one with :func:`connect`; do not instantiate directly.

    The connection itself (reader, delivery task, reconnect and resume, acks, heartbeat) is the
    client's :class:`~.session.Session`; the client is its public face.

    Attributes:
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
        opener: Callable[[], Awaitable[Transport]] | None = None,
        open_timeout: float = 10.0,
        resume: bool = False,
        reconnect: Reconnect | None = None,
        ack_interval: float = 1.0,
        ack_frames: int = 64,
        ping_interval: float | None = None,
        ping_timeout: float = 20.0,
    ) -> None:
        self.rate_limit_retries = max(0, rate_limit_retries)
        self._request_timeout = request_timeout
        self._backoff = RateLimitBackoff()
        self._session = Session(transport, task_group, on_refused=self._refused, wait_connected=wait_connected,
                                auto_pong=auto_pong, inbox_limit=inbox_limit, max_queue=max_queue, opener=opener,
                                open_timeout=open_timeout, resume=resume, reconnect=reconnect,
                                ack_interval=ack_interval, ack_frames=ack_frames, ping_interval=ping_interval,
                                ping_timeout=ping_timeout)
        self._codec = self._session.codec
        self._delivery = self._session.delivery

    def __repr__(self) -> str:
        state = f"closed code={self.close_code}" if self.closed else self.state
        return f"<Client app_id={self.app_id!r} {state}>"

    # ---------------------------------------------------------------- state

    @property
    def app_id(self) -> str:
        """The ``app_id`` announced by the server's ``connected`` message (``""`` until it arrives)."""
        return self._session.app_id

    @property
    def resumed(self) -> bool | None:
        """How the last reconnect ended: ``None`` before any, ``True`` when the server resumed the
        app (nothing lost), ``False`` when it could not (see :class:`StateLost`)."""
        return self._session.resumed

    @property
    def last_resume(self) -> ResumeOutcome | None:
        """The :class:`ResumeOutcome` of the last reconnect, or ``None``."""
        return self._session.last_resume

    @property
    def transport(self) -> Transport:
        """The WebSocket connection the client currently speaks over."""
        return self._session.transport

    @property
    def subprotocol(self) -> str | None:
        """The subprotocol the server accepted, or ``None``."""
        return self._session.transport.subprotocol

    @property
    def closed(self) -> bool:
        """``True`` once the client is closed for good (close handshake done, lost and not to be
        resumed, or aborted). A connection being resumed is not closed."""
        return self._session.closed

    @property
    def close_code(self) -> int | None:
        """The close code (1006 if the connection was lost without a close frame), or ``None``
        while the client is not closed."""
        return self._session.transport.close_code if self.closed else None

    @property
    def state(self) -> Literal["open", "reconnecting", "closed"]:
        """``open``, ``reconnecting`` (the connection dropped and is being resumed) or ``closed``."""
        if self.closed:
            return "closed"
        return "open" if self._session.link_up and not self._session.transport.closed else "reconnecting"

    @property
    def resumable(self) -> bool:
        """Whether a drop now would be resumed: ``resume`` is on and the server announced a token."""
        return self._session.resumable

    @property
    def last_seq(self) -> int:
        """The highest ``seq`` received from the server (0 before any, or without resume)."""
        return self._session.last_seq

    @property
    def close_reason(self) -> str:
        """The close reason received from the server (or a description of the failure)."""
        return self._session.transport.close_reason

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
        self._session.raise_if_closed()
        refusals = 0
        refused: RequestError | None = None
        response: Message | None = None
        with anyio.move_on_after(self._request_timeout if timeout is None else timeout):
            while True:
                response = None
                await self._backoff.wait()
                self._session.raise_if_closed()
                waiter = self._delivery.expect(mid, text)
                try:
                    await self._session.send_request(waiter, text)
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
                raise self._session.transport.closed_error()
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
        self._session.raise_if_closed()
        await self._backoff.wait()
        while True:
            self._session.raise_if_closed()
            if self._session.link_up:
                break
            await self._session.ready.wait()
        await self._session.transport.send_text(text)
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
        self._session.raise_if_closed()
        run = Command(self, session_id, mid, frame, self._session.max_queue)
        self._delivery.track(run)
        if self._backoff.waiting:
            run.send_later()  # its first read sends it, once the back-off allows
            return run
        if not self._session.link_up:
            return run  # sent once reconnected
        transport = self._session.transport
        run.link = self._session.link
        try:
            transport.send_text_soon(frame)
        except ConnectionClosed:
            if not self._session.send_failure_is_a_drop(transport):
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
        self._session.raise_if_closed()
        self._delivery.track(command)
        if not self._session.link_up:
            return  # sent once reconnected
        transport = self._session.transport
        command.link = self._session.link
        try:
            await transport.send_text(command.frame)
        except ConnectionClosed:
            if not self._session.send_failure_is_a_drop(transport):
                raise

    def _abandon_command(self, command: Command) -> None:
        """Forget a command nobody reads any more and ask the server to cancel it (used by :class:`Command`)."""
        mid = command.message_id
        if self._delivery.commands.get(mid) is not command:
            return
        self._delivery.drop(mid)
        cancel_id = new_message_id()
        self._delivery.drop(cancel_id)  # its cancel_res is not for anyone either
        self._session.send_or_defer(self._codec.encode("cancel", cancel_id, {"target_message_id": mid}).decode())

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
        self._session.resumed_handlers.append(handler)
        return handler

    def on_state_lost(self, handler: _LH) -> _LH:
        """Register (usable as a decorator) a handler called when the server could not resume the app.

        It gets the :class:`StateLost` error (``reason``, ``previous_app_id``, ``app_id``) after
        every message of the lost app was delivered and every request waiting on it failed with that
        error; the client goes on as the new app (create sessions again here, for instance).
        """
        self._session.lost_handlers.append(handler)
        return handler

    # ---------------------------------------------------------------- closing

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the client: send a close frame, wait (bounded by ``close_timeout``) for the server's
        close frame, then close the socket. Code 1000 (the default) tells the server this is a
        goodbye: it ends the app at once, nothing is kept to resume. Pending requests fail with
        :class:`ConnectionClosed`. Stops a reconnection in progress. Idempotent."""
        self._session.stop_reconnecting()
        await self._session.transport.close(code, reason)

    async def abort(self) -> None:
        """Drop the TCP connection at once, without a close frame, and do not reconnect (simulates a
        client that vanishes: a resumable app stays detached on the server until its window ends).
        Pending requests fail with ``ConnectionClosed(1006)``. To simulate a *drop* the client
        resumes from, abort the transport instead: ``await client.transport.abort()``."""
        self._session.stop_reconnecting()
        await self._session.transport.abort()

    async def wait_closed(self, timeout: float | None = None) -> int | None:
        """Wait until the client is closed for good and return the close code.

        Args:
            timeout: seconds to wait; ``None`` waits forever.

        Returns:
            The close code, or ``None`` if the client was still open when ``timeout`` elapsed.
        """
        with anyio.move_on_after(timeout):
            await self._session.ended.wait()
        return self.close_code

    def _refused(self, retry_after: float) -> None:
        """A request was refused with ``RATE_LIMITED``: back off (told by the delivery task)."""
        if self.rate_limit_retries > 0:
            self._backoff.refused(retry_after)
