"""One live WebSocket connection: its identity, outbound queue and pending server requests.

Frames reach the socket only through the connection's bounded outbound stream, drained by a single
writer task (see :mod:`llmgine_ws.endpoint`), so no two tasks ever write to the socket at once.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from datetime import datetime
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.abc import TaskGroup

from .audit import AuditLog
from .errors import AppDisconnected, ErrorCode, ProtocolError
from .lifecycle import LazyEvent
from .outbox import Outbox, OutboxClosed
from .pending import PendingRequest
from .protocol import FrameEncoder, ServerPingData, new_message_id, utcnow
from .replay import ResumeState
from .security import RateLimiter, TokenBucket

logger = logging.getLogger("llmgine_ws.connection")

WS_NORMAL = 1000
WS_GOING_AWAY = 1001
WS_POLICY_VIOLATION = 1008
WS_MESSAGE_TOO_BIG = 1009
WS_INTERNAL_ERROR = 1011
WS_TRY_AGAIN_LATER = 1013
WS_SERVICE_RESTART = 1012
"""Closes a resumable app's socket on a draining node of a cluster: resume on another node."""
WS_SUPERSEDED = 4000
"""Closes a socket whose app was resumed on a newer one (the half-open case)."""


class Unsequenced(str):
    """A frame that takes no ``seq`` (``resume_res``): queued like any other, never stamped."""

    __slots__ = ()


class CloseRequest:
    """Queued behind earlier frames when a close should flush them first."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class DetachRequest(CloseRequest):
    """Queued behind earlier frames when the socket should go after them but the app stay (drain)."""

    __slots__ = ()


OutboundItem = str | CloseRequest


class Proxy(Protocol):
    """What a socket does with its client's frames when it serves an app of another node."""

    async def forward(self, text: str) -> None:
        """Send one client frame to the app's node (waits while the backplane is busy)."""


class Cancellable(Protocol):
    """Something that can be cancelled (a cancel scope)."""

    def cancel(self) -> None:
        """Cancel it."""


class LinkTasks(Protocol):
    """What runs a socket's reader and writer: a task group, or the endpoint's leaner equivalent."""

    @property
    def cancel_scope(self) -> Cancellable:
        """Cancelling it stops the reader and the writer."""


class Link:
    """One socket serving an app: what the endpoint's reader and writer share.

    The app (:class:`Connection`) outlives its links when it is resumable: a drop detaches it, a
    ``resume`` on a new socket moves that socket's link over to it (:attr:`app` changes).
    """

    __slots__ = ("app", "close_code", "close_reason", "lost", "preamble", "released", "task_group")

    remote = False
    """True for a link whose socket is on another node of the cluster (no endpoint here cleans up)."""

    def __init__(self, app: Connection) -> None:
        self.app = app
        """The app this socket serves right now."""
        self.preamble: deque[str] | None = None
        """Frames the writer sends before the app's outbox (a resume's ``resume_res`` and replay);
        made by :meth:`add_preamble` (an idle socket keeps no empty deque)."""
        self.close_code: int | None = None
        self.close_reason = ""
        self.lost = False
        """The link failed (unanswered pings, a stalled or failed write): a drop, not a goodbye."""
        self.released = LazyEvent()
        """Set once the endpoint is done with the socket (its close frame sent)."""
        self.task_group: LinkTasks | None = None

    def close(self, code: int, reason: str, *, lost: bool = False) -> None:
        """Stop this socket's reader and writer (the endpoint then sends the close frame)."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self.lost = self.lost or lost
        if self.task_group is not None:
            self.task_group.cancel_scope.cancel()

    def add_preamble(self, frames: Iterable[str]) -> None:
        """Queue ``frames`` for the writer, before anything in the app's outbox."""
        if self.preamble is None:
            self.preamble = deque()
        self.preamble.extend(frames)


class Connection:
    """Everything the server knows about one connected app."""

    # Slotted: with 35 attributes an instance's __dict__ no longer shares its keys with the others
    # (CPython shares up to 30), and each connection paid ~1.5 KB for its own (docs/performance.md).
    __slots__ = (
        "__weakref__",  # what tracks connections (tests/test_churn.py) holds weak references
        "_audit",
        "_backlog",
        "_backlog_bytes",
        "_idle",
        "_on_change",
        "_queue_bytes",
        "_queue_size",
        "_request_costs",
        "_send_grace",
        "_task_group",
        "_waiting_tasks",
        "app_id",
        "client_ip",
        "close_code",
        "close_reason",
        "closed",
        "closing",
        "connected_at",
        "detached",
        "flushing",
        "in_flight",
        "in_flight_bytes",
        "last_activity",
        "link",
        "on_link_lost",
        "on_overflow",
        "outbox",
        "pending",
        "principal",
        "proxy",
        "rate_limit_noted",
        "rate_limiter",
        "resume",
        "session_ids",
        "start_task_group",
        "unanswered_pings",
        "user_rate_limiter",
    )  # weak references: what tracks connections (tests/test_churn.py) needs them

    def __init__(
        self,
        app_id: str,
        *,
        queue_size: int,
        send_grace: float,
        queue_bytes: int = 4 * 1024 * 1024,
        principal: Any = None,
        client_ip: str | None = None,
        audit: AuditLog | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.app_id = app_id
        self.principal = principal
        """Who authenticated this connection (``None`` without an authenticator)."""
        self.client_ip = client_ip
        """The client's address (after trusted-proxy resolution)."""
        self._audit = audit or AuditLog()
        self._on_change = on_change
        self.rate_limiter: RateLimiter | None = None
        self.user_rate_limiter: TokenBucket | None = None
        """Shared by every connection of the same authenticated user (``user_rate_limit``)."""
        self.rate_limit_noted = False
        self.connected_at: datetime = utcnow()
        self.last_activity: float = time.monotonic()
        self.session_ids: set[str] = set()
        self.pending: dict[str, PendingRequest] = {}
        """Server requests sent to this app and waiting for its ``server_response``, by message_id."""
        self.in_flight: dict[str, anyio.CancelScope] = {}
        """Client requests being handled right now, by message_id (their handlers' cancel scopes)."""
        self.in_flight_bytes = 0
        """The estimated decoded size of the requests in :attr:`in_flight` (see ``max_inflight_bytes``)."""
        self._request_costs: dict[str, int] = {}
        self._idle: anyio.Event | None = None
        self.unanswered_pings: dict[str, float] = {}
        self.close_code: int | None = None
        self.close_reason = ""
        self.closing = False
        self.flushing = False
        """A close waits behind the frames already queued (see :meth:`close`)."""
        self.closed = LazyEvent()
        """Set once the connection has been cleaned up and forgotten by the hub."""
        self._send_grace = send_grace
        self.outbox: Outbox[OutboundItem] = Outbox(queue_size, queue_bytes)
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._backlog: deque[str] | None = None
        """Frames from code that must not wait, behind a full outbox (drained by one task in order)."""
        self._backlog_bytes = 0
        self._task_group: TaskGroup | None = None
        self._waiting_tasks: list[tuple[Callable[..., Coroutine[Any, Any, Any]], tuple[Any, ...]]] | None = None
        """Tasks spawned before the app's task group was up (they start in it, in order)."""
        self.start_task_group: Callable[[Connection], None] | None = None
        """Starts the app's task group on demand (the runtime sets it): most apps never run a task of
        their own (inline handlers, no engine), so the group is made when the first task needs it."""
        self.resume: ResumeState | None = None
        """Sequence numbers and the replay buffer (None: frames take no ``seq``, e.g. in unit tests)."""
        self.link: Link | None = None
        """The socket serving this app; None while detached (or outside an endpoint)."""
        self.detached = False
        """The app's socket dropped and it waits for a ``resume`` (frames go to the replay buffer)."""
        self.on_link_lost: Callable[[Connection, int, str], bool] | None = None
        """Detaches a resumable app whose link failed (True if it did); set by the resume coordinator."""
        self.on_overflow: Callable[[Connection], None] | None = None
        """Ends a detached app whose replay buffer overflowed; set by the resume coordinator."""
        self.proxy: Proxy | None = None
        """Set once this connection's socket serves an app of another node (a cluster resume): its
        client's frames go there, and that node's frames come back into :attr:`outbox` unstamped."""

    @property
    def user_id(self) -> str | None:
        """The authenticated user's id, if the connection has a principal."""
        user_id = getattr(self.principal, "user_id", None)
        return user_id if isinstance(user_id, str) else None

    def enable_sequencing(self, state: ResumeState) -> None:
        """Stamp every frame queued from now on with ``seq`` (after ``connected``, which takes none)."""
        self.resume = state
        self.outbox.set_commit(self._commit)

    def _new_outbox(self) -> Outbox[OutboundItem]:
        return Outbox(self._queue_size, self._queue_bytes, self._commit if self.resume is not None else None)

    def _commit(self, item: OutboundItem) -> OutboundItem:
        """The outbox's commit hook: a frame entering the queue takes its ``seq`` (kept for a replay)."""
        if type(item) is str:
            assert self.resume is not None
            return self.resume.stamp(item)
        return item

    def _buffer(self, frame: str) -> bool:
        """While detached: stamp the frame into the replay buffer; False (and the app ends) past its bounds."""
        resume = self.resume
        assert resume is not None
        if type(frame) is str:
            resume.stamp(frame)
        if resume.overflowed:
            if self.on_overflow is not None:
                self.on_overflow(self)
            else:
                self.close(WS_GOING_AWAY, "resume buffer overflow")
            return False
        return True

    def detach_link(self) -> Link | None:
        """Forget the socket: frames go to the replay buffer from now on; returns the old link.

        Frames queued but not yet written are in the replay buffer already (they were stamped when
        queued); producers waiting for room try again and land in the buffer.
        """
        link, self.link = self.link, None
        self.detached = True
        outbox, self.outbox = self.outbox, self._new_outbox()
        outbox.close()
        self.changed()
        return link

    def attach_link(self, link: Link) -> None:
        """Serve this app on ``link`` (a resume): frames go to a fresh outbox, written after the replay."""
        self.link = link
        self.detached = False
        self.unanswered_pings.clear()
        self.changed()

    def drop_link(self, code: int, reason: str, **details: Any) -> None:
        """The socket failed (stalled, pings unanswered, write error): a resumable app is detached;
        any other is closed as before (``force_close``)."""
        if self.closing:
            return
        link = self.link
        if link is not None and self.on_link_lost is not None and self.on_link_lost(self, code, reason):
            return
        self.force_close(code, reason, **details)

    def attach(self, task_group: TaskGroup) -> None:
        """Bind the task group that runs this connection's handlers and timers; tasks spawned while
        it was being started run in it now (and are cancelled at once when the app closed meanwhile)."""
        self._task_group = task_group
        waiting, self._waiting_tasks = self._waiting_tasks, None
        for func, args in waiting or ():
            task_group.start_soon(func, *args)
        if self.closing:
            task_group.cancel_scope.cancel()

    def spawn(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> bool:
        """Run ``func(*args)`` in this connection's task group; False if the connection is gone.

        Whatever runs here is cancelled when the connection closes, so it can never outlive it. The
        group is started by the first task that needs it (:attr:`start_task_group`).
        """
        if self.closing:
            return False
        task_group = self._task_group
        if task_group is not None:
            task_group.start_soon(func, *args)
            return True
        if self._waiting_tasks is not None:  # the group is starting
            self._waiting_tasks.append((func, args))
            return True
        if self.start_task_group is None:
            return False
        self._waiting_tasks = [(func, args)]
        try:
            self.start_task_group(self)
        except RuntimeError:  # nowhere to run it any more (the lifespan is over)
            self._waiting_tasks = None
            return False
        return True

    def begin_request(self, message_id: str, limit: int, cost: int = 0, byte_limit: int = 0) -> anyio.CancelScope:
        """Register a client request about to be handled; its cancel scope lets ``cancel`` stop it.

        ``cost`` is the request's estimated decoded size, held until :meth:`end_request`. Raises
        ``DUPLICATE_MESSAGE_ID`` if a request with this id is still running, ``TOO_MANY_REQUESTS``
        past ``limit`` requests in flight or past ``byte_limit`` bytes held (0: no byte limit; a
        request alone is always admitted).
        """
        if message_id in self.in_flight:
            raise ProtocolError(ErrorCode.DUPLICATE_MESSAGE_ID, "a request with this message_id is still running",
                                {"message_id": message_id})
        if len(self.in_flight) >= limit:
            raise ProtocolError(ErrorCode.TOO_MANY_REQUESTS, "too many requests in flight on this connection",
                                {"limit": limit})
        if byte_limit and self.in_flight and self.in_flight_bytes + cost > byte_limit:
            raise ProtocolError(ErrorCode.TOO_MANY_REQUESTS, "the requests in flight on this connection hold too "
                                "much data: wait for answers before sending more",
                                {"limit_bytes": byte_limit, "in_flight_bytes": self.in_flight_bytes,
                                 "request_bytes": cost})
        scope = self.in_flight[message_id] = anyio.CancelScope()
        if cost:
            self._request_costs[message_id] = cost
            self.in_flight_bytes += cost
        self.changed()
        return scope

    def end_request(self, message_id: str, scope: anyio.CancelScope) -> None:
        """Forget a finished request (and wake :meth:`wait_idle` when it was the last)."""
        if self.in_flight.get(message_id) is scope:
            del self.in_flight[message_id]
            self.in_flight_bytes -= self._request_costs.pop(message_id, 0)
            if self.resume is not None:
                self.resume.completed(message_id)
            self.changed()
        if not self.in_flight and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def wait_idle(self) -> None:
        """Wait until no client request is being handled on this connection."""
        while self.in_flight:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    def send_nowait(self, frame: str) -> bool:
        """Queue a frame without waiting; False if the queue is full or the connection is closing."""
        # Not past a backlog: what waits there was queued first.
        if self.detached and not self.closing and self._backlog is None:
            return self._buffer(frame)
        return not self.closing and self._backlog is None and self.outbox.put_nowait(frame, len(frame))

    async def send(self, frame: str) -> None:
        """Queue a frame, waiting up to ``send_grace`` for room.

        A client that stays too slow past the grace period is disconnected (1013) rather than
        allowed to lose frames silently. Raises :class:`AppDisconnected` if the frame cannot be queued.
        """
        size = len(frame)
        while True:
            if self.closing:
                # The connection's tasks are being cancelled: let a cancellation still on its way land
                # first, so the sender unwinds as cancelled rather than failed.
                await anyio.lowlevel.checkpoint()
                raise AppDisconnected(self.app_id)
            if self.detached:
                if self._buffer(frame):
                    return
                raise AppDisconnected(self.app_id)
            outbox = self.outbox
            if outbox.put_nowait(frame, size):
                return
            self.changed()  # a producer is about to wait for room
            with anyio.move_on_after(self._send_grace):
                try:
                    await outbox.put(frame, size)
                    return
                except OutboxClosed:
                    if self.closing or self.resume is None:
                        raise AppDisconnected(self.app_id) from None
                    continue  # the socket changed (detached or resumed): try again there
            self.drop_link(WS_TRY_AGAIN_LATER, "outbound queue full", grace=self._send_grace)

    def send_soon(self, frame: str) -> bool:
        """Queue a frame from code that must not wait (the reader, a broadcast, a backplane inbox).

        Right away if there is room; else it joins this connection's backlog, drained in order by one
        task of the connection that waits like :meth:`send` (so a client too slow for the send grace
        is closed with 1013, never silently skipped). The backlog is bounded like the outbox — in
        frames and in bytes — and a client that overflows it is stalled: closed with 1013 too.
        False when the connection is going away.
        """
        backlog = self._backlog
        if backlog is None:
            if self.send_nowait(frame):
                return True
            if self.closing:
                return False
            backlog = self._backlog = deque()
            self._backlog_bytes = 0
            if not self.spawn(self._drain_backlog, backlog):
                self._backlog = None
                return False
        size = len(frame)
        if backlog and not self.detached and (len(backlog) >= self._queue_size
                                              or self._backlog_bytes + size > self._queue_bytes):
            self.drop_link(WS_TRY_AGAIN_LATER, "outbound queue full", backlog=len(backlog),
                           backlog_bytes=self._backlog_bytes)
            if self.closing:
                return False
        backlog.append(frame)
        self._backlog_bytes += size
        return True

    async def _drain_backlog(self, backlog: deque[str]) -> None:
        try:
            while backlog:
                await self.send(backlog[0])
                self._backlog_bytes -= len(backlog.popleft())
        except AppDisconnected:
            pass  # closed for being too slow (audited in send) or already going away
        finally:
            if self._backlog is backlog:
                self._backlog = None

    def close(self, code: int = WS_NORMAL, reason: str = "", *, flush: bool = False) -> None:
        """Ask for this connection to be closed with ``code``.

        With ``flush`` the close happens after the frames already queued are written (when they fit);
        otherwise the connection's tasks are cancelled right away. Idempotent.
        """
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        if flush and not self.closing and not self.detached and self.outbox.put_nowait(CloseRequest(code, reason)):
            self.closing = self.flushing = True
            return
        self.closing = True
        self.changed()
        if self.link is not None:
            self.link.close(code, reason)
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()

    def awaits_answer(self, message_id: str) -> bool:
        """Whether a server request or ping with this message_id waits for this client's (first) answer."""
        pending = self.pending.get(message_id)
        return (pending is not None and not pending.refused) or message_id in self.unanswered_pings

    def changed(self) -> None:
        """Tell the app's state watch that this connection changed (requests, pending, closing)."""
        if self._on_change is not None:
            self._on_change()

    def force_close(self, code: int, reason: str, **details: Any) -> None:
        """Close the connection for a policy reason, right away, with an audit record.

        Only the first close counts: a connection already closing is not closed (or audited) again.
        """
        if self.closing:
            return
        self._audit("forced_close", level=logging.WARNING, code=code, reason=reason, app_id=self.app_id,
                    user_id=self.user_id, client_ip=self.client_ip, **details)
        self.close(code, reason)

    def lose(self) -> None:
        """The first, synchronous step of every close: nothing new may attach, and every server
        request waiting for this app's answer fails right away (``AppDisconnected``)."""
        self.closing = True
        self.fail_pending(AppDisconnected)
        self.changed()

    def fail_pending(self, error_factory: Callable[[str, str], Exception]) -> int:
        """Fail every pending server request (each waiter gets its own exception); returns the count."""
        pending = list(self.pending.values())
        self.pending.clear()
        for request in pending:
            request.fail(error_factory(self.app_id, request.message_id))
        return len(pending)

    def __repr__(self) -> str:
        return f"Connection({self.app_id!r})"


async def keep_alive(link: Link, interval: float, allowed_misses: int, encoder: FrameEncoder) -> None:
    """Ping the client of ``link`` every ``interval`` seconds; after ``allowed_misses`` unanswered pings
    in a row the link is dropped (a resumable app is detached, the socket likely half-open; any other
    is closed with 1011). Runs until the link stops serving its app (or is cancelled with it)."""
    while True:
        await anyio.sleep(interval)
        connection = link.app
        if connection.proxy is not None:
            continue  # the app's own node sequences its frames (and pings): nothing from here
        if link.remote and connection.link is not link:
            return  # a remote link that was superseded, detached or closed
        if len(connection.unanswered_pings) >= allowed_misses:
            connection.drop_link(WS_INTERNAL_ERROR, "server pings unanswered", missed=len(connection.unanswered_pings))
            return
        message_id = new_message_id()
        connection.unanswered_pings[message_id] = time.monotonic()
        try:
            await connection.send(encoder.frame("server_ping", message_id, ServerPingData(timestamp=utcnow()),
                                                server_initiated=True))
        except AppDisconnected:
            return
