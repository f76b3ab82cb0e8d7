"""Sessions with their whole life: creation (limits, callbacks), destruction (engine stopped first),
expiry and idle engines, and releasing everything a connection owned."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import anyio

from .audit import AuditLog
from .connection import Connection
from .engines import EngineManager
from .errors import ErrorCode, ProtocolError
from .hub import Hub
from .protocol import FrameEncoder, NotificationData
from .sessions import Session, SessionStore
from .usercode import run_callbacks

logger = logging.getLogger("llmgine_ws.sessions")

SessionCallback = Callable[[Session], Awaitable[None]]


class SessionManager:
    """Creates and destroys the sessions of one app, in the order the protocol promises."""

    def __init__(self, store: SessionStore, engines: EngineManager, hub: Hub, *, encoder: FrameEncoder,
                 audit: AuditLog, max_per_connection: int, callback_timeout: float, max_per_ip: int = 0,
                 max_per_user: int = 0,
                 on_created: Sequence[SessionCallback] = (), on_destroyed: Sequence[SessionCallback] = ()) -> None:
        self.store = store
        self.engines = engines
        self._hub = hub
        self._encoder = encoder
        self._audit = audit
        self._max_per_connection = max_per_connection
        self._caps = {"ip": max_per_ip, "user": max_per_user}
        self._held: dict[tuple[str, str], int] = {}
        """Sessions held per (``ip`` | ``user``, address or user id)."""
        self._holders: dict[str, list[tuple[str, str]]] = {}
        self._callback_timeout = callback_timeout
        self._on_created = on_created
        self._on_destroyed = on_destroyed

    async def create(self, connection: Connection) -> Session:
        """Create a session owned by ``connection`` and run ``session_created`` callbacks."""
        limit = self._max_per_connection
        if len(connection.session_ids) >= limit:
            self._refuse(connection, "sessions_per_connection", f"a connection may hold at most {limit} sessions",
                         limit)
        keys = [(kind, value) for kind, value in (("ip", connection.client_ip), ("user", connection.user_id))
                if value is not None and self._caps[kind]]
        for kind, value in keys:
            cap = self._caps[kind]
            if self._held.get((kind, value), 0) >= cap:
                who = "one client address" if kind == "ip" else "one user"
                self._refuse(connection, f"sessions_per_{kind}", f"{who} may hold at most {cap} sessions", cap)
        session = self.store.create(connection.app_id, connection.principal)
        connection.session_ids.add(session.session_id)
        for key in keys:
            self._held[key] = self._held.get(key, 0) + 1
        self._holders[session.session_id] = keys
        await run_callbacks(self._on_created, session, timeout=self._callback_timeout, log=logger)
        return session

    async def destroy(self, session: Session, reason: str) -> None:
        """Stop the session's engine, delete the session, run ``session_destroyed`` callbacks.

        Idempotent: a session already destroyed (by another path) is left alone.
        """
        if self.store.remove(session.session_id) is None:
            return
        for key in self._holders.pop(session.session_id, ()):
            remaining = self._held[key] - 1
            if remaining:
                self._held[key] = remaining
            else:
                del self._held[key]
        connection = self._hub.get(session.app_id)
        if connection is not None:
            connection.session_ids.discard(session.session_id)
        # Gone from the store, the session is destroyed all the way even if the caller is cancelled
        # (e.g. a close_session whose client disconnects): each step below has its own deadline.
        with anyio.CancelScope(shield=True):
            await self.engines.stop(session.session_id, reason)
            await run_callbacks(self._on_destroyed, session, timeout=self._callback_timeout, log=logger)
        logger.info("session %s destroyed (%s)", session.session_id, reason,
                    extra={"app_id": session.app_id, "session_id": session.session_id})

    def _refuse(self, connection: Connection, limit: str, message: str, cap: int) -> None:
        self._audit("limit_hit", level=logging.WARNING, limit=limit, app_id=connection.app_id,
                    user_id=connection.user_id, client_ip=connection.client_ip)
        raise ProtocolError(ErrorCode.SESSION_LIMIT_REACHED, message, {f"max_{limit}": cap})

    async def release(self, connection: Connection) -> None:
        """Destroy every session ``connection`` owns: their engines stop concurrently, then the
        sessions are deleted one by one."""
        sessions = [s for s in (self.store.get(sid) for sid in list(connection.session_ids)) if s is not None]
        if not sessions:
            return  # most connections: no task group to make
        async with anyio.create_task_group() as tg:
            for session in sessions:
                tg.start_soon(self.engines.stop, session.session_id, "disconnected")
        for session in sessions:
            await self.destroy(session, reason="disconnected")

    async def reap(self, session_timeout: float, engine_idle_timeout: float) -> None:
        """One reaper pass: close expired sessions and stop idle engines (each client is told)."""
        for session in self.store.expired(session_timeout):
            self._notify(session, "session_expired", "the session expired after inactivity")
            await self.destroy(session, reason="expired")
        for handle in await self.engines.stop_idle(engine_idle_timeout):
            owner = self.store.get(handle.session_id)
            if owner is not None:
                self._notify(owner, "engine_stopped", "the engine was stopped after inactivity",
                             {"engine_id": handle.engine_id, "reason": "idle"})

    def _notify(self, session: Session, kind: str, message: str, extra: dict[str, object] | None = None) -> None:
        connection = self._hub.get(session.app_id)
        if connection is not None:
            data = NotificationData(notification_type=kind, message=message, additional_data=extra,
                                    session_id=session.session_id)
            connection.send_nowait(self._encoder.event("notification", data))
