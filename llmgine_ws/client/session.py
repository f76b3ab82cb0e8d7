"""The client's connection across reconnects: :class:`Session` (reader, delivery task, resume, acks, heartbeat).

Concurrency model: :func:`~.connection.connect` owns an anyio task group holding the transport's
writer (the only task writing the socket), a **reader** (the only task reading it: it answers
``server_ping`` at once and queues every other message, in arrival order, on a queue of at most
``max_queue`` messages — when it is full the reader stops reading and TCP pushes back on the
server), one **delivery** task that takes the queue in order (see :mod:`.delivery`: this is what
keeps a response from overtaking the messages before it), and one task per running server-request
handler. The :class:`Session` starts and runs the reader, the delivery task, the acks and the
heartbeat; the :class:`~.connection.Client` it belongs to is the public face (requests, commands,
handlers).

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
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.abc

from .delivery import Delivery, Waiter
from .errors import ClientError, ConnectionClosed, HandshakeRejected, RequestTimeout, StateLost
from .messages import Message, MessageCodec, new_message_id
from .resume import (
    RECONNECT_CLOSE_CODES,
    Reconnect,
    ResumeOutcome,
    ResumeState,
    reconnect_after_rejection,
)
from .transport import Transport

__all__ = ["Session"]

_log = logging.getLogger("llmgine_ws.client")

_Control = Callable[[], Awaitable[None]]
"""Something the delivery task runs in its place in the queue (resume callbacks, failing what was lost)."""

_DEFAULT_WINDOW = 120.0
"""Reconnect for this long when the server announced no ``resume_window``."""
_MAX_DEFERRED = 1000
"""Frames (cancels) kept to send once reconnected."""


class _RetryLater(ClientError):
    """The server refused the ``resume`` for now (``RATE_LIMITED``): try again with the next attempt."""


class Session:
    """One client's connection to the server, across reconnects (internal: owned by a :class:`Client`).

    It holds the transport in use (replaced at each reconnect), runs the reader, the delivery task,
    the periodic acks and the heartbeat, reconnects and resumes after a drop, and sends the client's
    frames on whichever connection is current (or keeps them for after the reconnect).

    Attributes:
        transport: the WebSocket connection in use.
        link: which connection this is: 0 the first, +1 at each reconnect.
        link_up: the connection is up (``False`` while reconnecting and once ended).
        ready: set while the link is up (and for good once the client ended); replaced by a fresh
            event at each drop, so read it anew before waiting.
        ended: set once the client is over (the reader has stopped).
        app_id, resumed, last_resume: see :class:`Client`.
    """

    def __init__(
        self,
        transport: Transport,
        task_group: anyio.abc.TaskGroup,
        *,
        on_refused: Callable[[float], None],
        wait_connected: bool,
        auto_pong: bool,
        inbox_limit: int,
        max_queue: int,
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
        self.resumed: bool | None = None
        self.last_resume: ResumeOutcome | None = None
        self._opener = opener
        self._open_timeout = open_timeout
        self._resume = ResumeState(enabled=resume and opener is not None, ack_frames=ack_frames)
        self._policy = reconnect or Reconnect()
        self._ack_interval = ack_interval
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self.link = 0
        self.link_up = True
        self.ready = anyio.Event()
        self.ready.set()
        self._closing = False  # close() or abort() was called: a drop is not to be resumed
        self.ended = anyio.Event()
        self._reconnect_scope: anyio.CancelScope | None = None
        self._reader_paused = False
        self._deferred: list[str] = []
        self.resumed_handlers: list[Callable[[ResumeOutcome], Any]] = []
        self.lost_handlers: list[Callable[[StateLost], Any]] = []
        self.transport = transport
        self._task_group = task_group
        self._wait_connected = wait_connected
        self._auto_pong = auto_pong
        self.max_queue = max(1, max_queue)
        self.codec = MessageCodec()
        self._queue_in, self._queue_out = anyio.create_memory_object_stream[Message | _Control](self.max_queue)
        self._connected = anyio.Event()
        self._connected_or_closed = anyio.Event()
        self.delivery = Delivery(task_group, self._respond, inbox_limit=inbox_limit, on_refused=on_refused)

    # ---------------------------------------------------------------- state

    @property
    def closed(self) -> bool:
        """See :attr:`Client.closed`."""
        return self.ended.is_set() or (self.transport.closed and not self.will_reconnect(self.transport))

    @property
    def resumable(self) -> bool:
        """See :attr:`Client.resumable`."""
        return self._resume.resumable and not self._closing

    @property
    def last_seq(self) -> int:
        """See :attr:`Client.last_seq`."""
        return self._resume.last_seq

    def stop_reconnecting(self) -> None:
        """``close()`` or ``abort()`` was called: a drop is not to be resumed, a reconnection stops."""
        self._closing = True
        if self._reconnect_scope is not None:
            self._reconnect_scope.cancel()

    # ---------------------------------------------------------------- tasks

    def start(self) -> None:
        """Start the writer, the reader, the periodic acks and the heartbeat."""
        self._task_group.start_soon(self.transport.run_writer)
        self._task_group.start_soon(self._read)
        if self._resume.enabled and self._ack_interval > 0:
            self._task_group.start_soon(self._ack_periodically)
        if self._ping_interval:
            self._task_group.start_soon(self._heartbeat)

    def start_delivery(self) -> None:
        # Started just before connect() hands the client over: handlers registered at the top of the
        # `async with` block (before its first await) see every message, the first notification too.
        self._task_group.start_soon(self._deliver)

    async def await_connected(self, deadline: float) -> None:
        """Wait (until ``deadline``) for the server's ``connected`` message."""
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            await self._connected_or_closed.wait()
        if self._connected.is_set():
            return
        self.raise_if_closed()
        raise RequestTimeout("timed out waiting for the server's 'connected' message")

    async def _read(self) -> None:
        """The only task reading the socket: answers pings, queues everything else in order, and
        reconnects (resuming) when a resumable connection drops."""
        try:
            while True:
                # Shielded from the cancellation of connect()'s caller, so the closing handshake can
                # still complete; closing or aborting the transport always ends it.
                with anyio.CancelScope(shield=True):
                    if not await self._read_link(self.transport):
                        return
                if not self.will_reconnect(self.transport):
                    return
                held = await self._reconnect()
                if held is None:
                    return
                for message in held:
                    if not await self._handle(message):
                        return
        except Exception:  # a bug here must not take the user's task group down
            _log.exception("llmgine_ws client reader failed")
            await self.transport.abort()
        finally:
            self.link_up = False
            self.ended.set()
            self.ready.set()
            self._connected_or_closed.set()
            self._queue_in.close()

    async def _read_link(self, transport: Transport) -> bool:
        """Read one connection until it closes; ``False`` if the client must stop reading altogether."""
        while True:
            try:
                message = self.codec.decode(await transport.receive())
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
        return self.delivery.deliver_now(message)

    async def _deliver(self) -> None:
        """The delivery task: every queued message, in order, to whoever consumes it."""
        async with self._queue_out:
            async for item in self._queue_out:
                if not isinstance(item, Message):
                    await item()
                elif not self.delivery.settle(item):
                    await self.delivery.dispatch(item)
        self.finish()

    def finish(self) -> None:
        """Fail what still waits on delivery (the delivery task ended, or never ran)."""
        self.delivery.finish(self.transport.closed_error)

    # ---------------------------------------------------------------- reconnect and resume

    def will_reconnect(self, transport: Transport) -> bool:
        """Whether the end of ``transport`` is a drop to resume from."""
        return (self._resume.resumable and not self._closing and transport is self.transport
                and transport.close_code in RECONNECT_CLOSE_CODES)

    def send_failure_is_a_drop(self, transport: Transport) -> bool:
        """A send on ``transport`` failed: ``True`` when the frame will go out again after a resume
        (the client reconnects, or already has), ``False`` when the failure is the caller's to see."""
        if transport is not self.transport:
            return not self.closed
        return self.will_reconnect(transport)

    async def _reconnect(self) -> list[Message] | None:
        """Open connections (backoff, jitter) until one is resumed or is a new app; ``None`` when
        giving up. Returns the frames of the new connection to handle (a new app's first ones)."""
        dropped = self.transport
        self.link_up = False
        self.ready = anyio.Event()
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
            message = self.codec.decode(await transport.receive())
            if not sent:
                if message.type == "connected":
                    payload = self._resume.resume_request(message.data, resume_id)
                    transport.send_text_soon(self.codec.encode("resume", resume_id, payload).decode())
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
        self.transport = transport
        self.link += 1
        self.app_id = outcome.app_id
        self.last_resume = outcome
        self.resumed = outcome.resumed
        if outcome.resumed:
            _log.info("app %s resumed (%d frame(s) replayed)", outcome.app_id, outcome.replayed)
            self._resend(transport)
            await self._enqueue(self._callbacks(self.resumed_handlers, outcome, "on_resumed handler"))
        else:
            error = StateLost(outcome.reason or "unknown", outcome.previous_app_id, outcome.app_id)
            _log.warning("%s", error)
            await self._enqueue(self._lose_state(error))
        self.link_up = True
        self.ready.set()
        self._ack(periodic=False)

    def _resend(self, transport: Transport) -> None:
        """After a resume: every request and command still waiting goes out again (same message_id)."""
        frames: list[str] = []
        for waiter in list(self.delivery.pending.values()):
            if waiter.frame is not None and waiter.link != self.link:
                waiter.link = self.link
                frames.append(waiter.frame)
        for command in list(self.delivery.commands.values()):
            if command.link != self.link and not command.waiting_to_send:
                command.link = self.link
                frames.append(command.frame)
        frames.extend(self._deferred)
        self._deferred.clear()
        with contextlib.suppress(ConnectionClosed):
            for frame in frames:
                transport.send_text_soon(frame)

    def _lose_state(self, error: StateLost) -> _Control:
        """The app is gone: what waited on it fails with ``error`` (in wire order), then ``on_state_lost``."""
        self.delivery.server_requests.reset()
        self._deferred.clear()
        waiters = list(self.delivery.pending.items())
        commands = list(self.delivery.commands.items())
        for message_id, waiter in waiters:
            if self.delivery.is_direct(message_id):  # the delivery task may be waiting on it
                waiter.fail(error)

        async def run() -> None:
            for _, waiter in waiters:
                waiter.fail(error)
            for message_id, command in commands:
                if self.delivery.commands.get(message_id) is command:
                    self.delivery.untrack(message_id)
                command.fail(error)
            await self.delivery.run_callbacks(self.lost_handlers, error, "on_state_lost handler")

        return run

    def _callbacks(self, handlers: list[Callable[[Any], Any]], argument: Any, label: str) -> _Control:
        async def run() -> None:
            await self.delivery.run_callbacks(handlers, argument, label)

        return run

    def _ack(self, *, periodic: bool) -> None:
        if not self.link_up:
            return
        seq = self._resume.ack_due(periodic=periodic)
        if seq is None:
            return
        with contextlib.suppress(ConnectionClosed):
            self.transport.send_text_soon(self.codec.encode("ack", new_message_id(), {"seq": seq}).decode())
            self._resume.acked(seq)

    async def _ack_periodically(self) -> None:
        while not self.ended.is_set():
            await anyio.sleep(self._ack_interval)
            self._ack(periodic=True)

    async def _heartbeat(self) -> None:
        """Ping every ``ping_interval``; a connection silent for ``ping_timeout`` after a ping is lost."""
        assert self._ping_interval
        while not self.ended.is_set():
            await anyio.sleep(self._ping_interval)
            transport = self.transport
            if not self.link_up or transport.closed:
                continue
            sent = anyio.current_time()
            try:
                transport.ping()
            except ConnectionClosed:
                continue
            with anyio.move_on_after(self._ping_timeout):
                await transport.wait_activity(sent)
            if (transport.last_activity <= sent and not transport.closed and transport is self.transport
                    and not self._reader_paused):  # a paused reader reads nothing, pongs included
                _log.warning("no answer to a ping within %s s: the connection is lost", self._ping_timeout)
                await transport.lose(f"no answer to a ping within {self._ping_timeout} s")

    # ---------------------------------------------------------------- writing

    def _respond(self, message_id: str, data: dict[str, Any]) -> None:
        self._respond_soon("server_response", message_id, data)

    def _respond_soon(self, type: str, message_id: str, data: Any) -> None:
        """Queue a message from a non-async context, ignoring a closed connection (an answer lost
        with a dropped connection is sent again when the server asks again after the resume)."""
        if not self.link_up:
            return
        with contextlib.suppress(ConnectionClosed):
            self.transport.send_text_soon(self.codec.encode(type, message_id, data).decode())

    def send_or_defer(self, frame: str) -> None:
        """Send now, or once resumed if the connection is being resumed."""
        if self.link_up:
            with contextlib.suppress(ConnectionClosed):
                self.transport.send_text_soon(frame)
                return
        if not self.closed and len(self._deferred) < _MAX_DEFERRED:
            self._deferred.append(frame)

    async def send_request(self, waiter: Waiter, text: str) -> None:
        """Send a request's frame now, unless the connection is being resumed (then :meth:`_resend`
        sends it). A drop while sending is not an error when the connection will be resumed."""
        if not self.link_up:
            return
        transport = self.transport
        waiter.link = self.link
        try:
            await transport.send_text(text)
        except ConnectionClosed:
            if not self.send_failure_is_a_drop(transport):
                raise

    def raise_if_closed(self) -> None:
        """Raise the transport's :class:`ConnectionClosed` if the client is over."""
        if self.closed or self.delivery.finished:
            raise self.transport.closed_error()
