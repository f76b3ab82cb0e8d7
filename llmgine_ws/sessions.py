"""Sessions: what a connection creates to hold a conversation (and, optionally, its engine)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Protocol

from .errors import ErrorCode, ProtocolError
from .protocol import new_message_id, utcnow


class Session:
    """One session, owned by exactly one app (connection)."""

    __slots__ = ("_touched", "app_id", "created_at", "last_interaction_at", "principal", "session_id", "state")

    def __init__(self, session_id: str, app_id: str, principal: Any = None) -> None:
        self.session_id = session_id
        self.app_id = app_id
        self.principal = principal
        """Who authenticated the connection that created the session (an ``llmgine_ws.auth.Principal``;
        ``None`` without an authenticator). Engine factories get it with the session."""
        self.created_at: datetime = utcnow()
        self.last_interaction_at: datetime = self.created_at
        self._touched = time.monotonic()
        self.state: dict[str, Any] = {}
        """Free space for your handlers' per-session data."""

    def touch(self) -> None:
        """Record an interaction (resets the idle-expiry clock)."""
        self.last_interaction_at = utcnow()
        self._touched = time.monotonic()

    def idle_for(self, now: float | None = None) -> float:
        """Seconds since the last interaction."""
        return (time.monotonic() if now is None else now) - self._touched

    def __repr__(self) -> str:
        return f"Session({self.session_id!r}, app_id={self.app_id!r})"


class SessionListener(Protocol):
    """Told when a session is created or removed (e.g. a cluster router publishing presence)."""

    def session_added(self, session: Session) -> None:
        """``session`` was created."""

    def session_removed(self, session: Session) -> None:
        """``session`` was removed."""


class SessionStore:
    """All sessions of one app instance, with the global session limit.

    Ownership is enforced here: :meth:`get_owned` answers another app's session exactly like a
    missing one, so session ids cannot be probed.
    """

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self.listeners: list[SessionListener] = []
        """Told about every session created or removed."""

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def create(self, app_id: str, principal: Any = None) -> Session:
        """Create a session for ``app_id``; ``SESSION_LIMIT_REACHED`` past the limit."""
        if len(self._sessions) >= self.max_sessions:
            raise ProtocolError(
                ErrorCode.SESSION_LIMIT_REACHED,
                f"the server has reached its limit of {self.max_sessions} sessions",
                {"max_sessions": self.max_sessions},
            )
        session = Session(new_message_id(), app_id, principal)
        self._sessions[session.session_id] = session
        for listener in self.listeners:
            listener.session_added(session)
        return session

    def get(self, session_id: str) -> Session | None:
        """The session with this id, whoever owns it (server-side use only)."""
        return self._sessions.get(session_id)

    def get_owned(self, session_id: str, app_id: str) -> Session:
        """The session if ``app_id`` owns it, else ``SESSION_NOT_FOUND`` (also for other apps' ids)."""
        session = self._sessions.get(session_id)
        if session is None or session.app_id != app_id:
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "session not found", {"session_id": session_id})
        return session

    def remove(self, session_id: str) -> Session | None:
        """Forget a session; returns it, or None if it was already gone."""
        session = self._sessions.pop(session_id, None)
        if session is not None:
            for listener in self.listeners:
                listener.session_removed(session)
        return session

    def expired(self, timeout: float) -> list[Session]:
        """Sessions idle for longer than ``timeout`` seconds."""
        now = time.monotonic()
        return [s for s in self._sessions.values() if s.idle_for(now) > timeout]
