"""One live WebSocket connection: its identity, outbound queue and pending server requests.

Frames reach the socket only through the connection's bounded outbound stream, drained by a single
writer task (see :mod:`llmgine_ws.endpoint`), so no two tasks ever write to the socket at once.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from starlette.websockets import WebSocket

from .audit import AuditLog
from .errors import AppDisconnected, ErrorCode, ProtocolError
from .outbox import Outbox, OutboxClosed
from .protocol import utcnow
from .security import RateLimiter

logger = logging.getLogger("llmgine_ws.connection")

WS_NORMAL = 1000
WS_GOING_AWAY = 1001
WS_POLICY_VIOLATION = 1008
WS_MESSAGE_TOO_BIG = 1009
WS_INTERNAL_ERROR = 1011
WS_TRY_AGAIN_LATER = 1013


class CloseRequest:
    """Queued behind earlier frames when a close should flush them first."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


OutboundItem = str | CloseRequest


class PendingRequest:
    """A server request waiting for the client's ``server_response``."""

    __slots__ = ("_done", "_error", "_response", "app_id", "message_id", "sent_at")

    def __init__(self, app_id: str, message_id: str) -> None:
        self.app_id = app_id
        self.message_id = message_id
        self.sent_at = time.monotonic()
        self._done = anyio.Event()
        self._response: dict[str, Any] | None = None
        self._error: BaseException | None = None

    def resolve(self, data: dict[str, Any]) -> None:
        """Deliver the client's answer (first outcome wins)."""
        if not self._done.is_set():
            self._response = data
            self._done.set()

    def fail(self, error: BaseException) -> None:
        """Fail the waiter with ``error`` (first outcome wins)."""
        if not self._done.is_set():
            self._error = error
            self._done.set()

    async def wait(self) -> dict[str, Any]:
        """Wait for the outcome; raises what :meth:`fail` was given."""
        await self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._response is not None
        return self._response


class Connection:
    """Everything the server knows about one connected app."""

    def __init__(
        self,
        app_id: str,
        websocket: WebSocket,
        *,
        queue_size: int,
        send_grace: float,
        principal: Any = None,
        client_ip: str | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.app_id = app_id
        self.websocket = websocket
        self.principal = principal
        """Who authenticated this connection (``None`` without an authenticator)."""
        self.client_ip = client_ip
        """The client's address (after trusted-proxy resolution)."""
        self._audit = audit or AuditLog()
        self.rate_limiter: RateLimiter | None = None
        self.rate_limit_noted = False
        self.connected_at: datetime = utcnow()
        self.last_activity: float = time.monotonic()
        self.session_ids: set[str] = set()
        self.pending: dict[str, PendingRequest] = {}
        """Server requests sent to this app and waiting for its ``server_response``, by message_id."""
        self.in_flight: dict[str, anyio.CancelScope] = {}
        """Client requests being handled right now, by message_id (their handlers' cancel scopes)."""
        self._idle: anyio.Event | None = None
        self.unanswered_pings: dict[str, float] = {}
        self.close_code: int | None = None
        self.close_reason = ""
        self.closing = False
        self.closed = anyio.Event()
        """Set once the connection has been cleaned up and forgotten by the hub."""
        self._send_grace = send_grace
        self.outbox: Outbox[OutboundItem] = Outbox(queue_size)
        self._backlog: deque[str] | None = None
        """Frames waiting for the writer (the only task that writes to the socket)."""
        self._task_group: TaskGroup | None = None

    @property
    def user_id(self) -> str | None:
        """The authenticated user's id, if the connection has a principal."""
        user_id = getattr(self.principal, "user_id", None)
        return user_id if isinstance(user_id, str) else None

    @property
    def client_address(self) -> str | None:
        """The peer's address as seen by the server (``host:port``)."""
        client = self.websocket.client
        return f"{client.host}:{client.port}" if client else None

    def attach(self, task_group: TaskGroup) -> None:
        """Bind the task group that runs this connection's writer, handlers and timers."""
        self._task_group = task_group

    def spawn(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> bool:
        """Run ``func(*args)`` in this connection's task group; False if the connection is gone.

        Whatever runs here is cancelled when the connection closes, so it can never outlive it.
        """
        if self._task_group is None or self.closing:
            return False
        self._task_group.start_soon(func, *args)
        return True

    def begin_request(self, message_id: str, limit: int) -> anyio.CancelScope:
        """Register a client request about to be handled; its cancel scope lets ``cancel`` stop it.

        Raises ``DUPLICATE_MESSAGE_ID`` if a request with this id is still running and
        ``TOO_MANY_REQUESTS`` past ``limit`` requests in flight.
        """
        if message_id in self.in_flight:
            raise ProtocolError(ErrorCode.DUPLICATE_MESSAGE_ID, "a request with this message_id is still running",
                                {"message_id": message_id})
        if len(self.in_flight) >= limit:
            raise ProtocolError(ErrorCode.TOO_MANY_REQUESTS, "too many requests in flight on this connection",
                                {"limit": limit})
        scope = self.in_flight[message_id] = anyio.CancelScope()
        return scope

    def end_request(self, message_id: str, scope: anyio.CancelScope) -> None:
        """Forget a finished request (and wake :meth:`wait_idle` when it was the last)."""
        if self.in_flight.get(message_id) is scope:
            del self.in_flight[message_id]
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
        return not self.closing and self._backlog is None and self.outbox.put_nowait(frame)

    async def send(self, frame: str) -> None:
        """Queue a frame, waiting up to ``send_grace`` for room.

        A client that stays too slow past the grace period is disconnected (1013) rather than
        allowed to lose frames silently. Raises :class:`AppDisconnected` if the frame cannot be queued.
        """
        if self.closing:
            # The connection's tasks are being cancelled: let a cancellation still on its way land
            # first, so the sender unwinds as cancelled rather than failed.
            await anyio.lowlevel.checkpoint()
            raise AppDisconnected(self.app_id)
        if self.outbox.put_nowait(frame):
            return
        with anyio.move_on_after(self._send_grace):
            try:
                await self.outbox.put(frame)
                return
            except OutboxClosed:
                raise AppDisconnected(self.app_id) from None
        self.force_close(WS_TRY_AGAIN_LATER, "outbound queue full", grace=self._send_grace)
        raise AppDisconnected(self.app_id)

    def send_soon(self, frame: str) -> bool:
        """Queue a frame from code that must not wait (the reader, a broadcast, a backplane inbox).

        Right away if there is room; else it joins this connection's backlog, drained in order by one
        task of the connection that waits like :meth:`send` (so a client too slow for the send grace
        is closed with 1013, never silently skipped). False when the connection is going away.
        """
        if self._backlog is not None:
            self._backlog.append(frame)
            return True
        if self.send_nowait(frame):
            return True
        if self.closing:
            return False
        backlog = self._backlog = deque([frame])
        if not self.spawn(self._drain_backlog, backlog):
            self._backlog = None
            return False
        return True

    async def _drain_backlog(self, backlog: deque[str]) -> None:
        try:
            while backlog:
                await self.send(backlog[0])
                backlog.popleft()
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
        if flush and not self.closing and self.outbox.put_nowait(CloseRequest(code, reason)):
            self.closing = True
            return
        self.closing = True
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()

    def force_close(self, code: int, reason: str, **details: Any) -> None:
        """Close the connection for a policy reason, right away, with an audit record."""
        self._audit("forced_close", level=logging.WARNING, code=code, reason=reason, app_id=self.app_id,
                    user_id=self.user_id, client_ip=self.client_ip, **details)
        self.close(code, reason)

    def fail_pending(self, error_factory: Callable[[str, str], Exception]) -> int:
        """Fail every pending server request (each waiter gets its own exception); returns the count."""
        pending = list(self.pending.values())
        self.pending.clear()
        for request in pending:
            request.fail(error_factory(self.app_id, request.message_id))
        return len(pending)

    def __repr__(self) -> str:
        return f"Connection({self.app_id!r})"
