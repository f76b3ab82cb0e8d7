"""The routing seam: every delivery to an app, a session's app, or everyone goes through a Router.

:class:`LocalRouter` delivers to the connections of this process. A cluster router (NATS, Redis)
implements the same interface and falls back to the local one for apps connected here, so the
messaging API and everything built on it do not change when a deployment scales out.

Frames cross this seam already encoded (``str``): a message is encoded once, however many apps
receive it and whichever process they are connected to.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any, Protocol

import anyio

from .connection import Connection, PendingRequest
from .errors import AppDisconnected, AppNotConnected, PendingRequestLimit
from .hub import Hub
from .sessions import SessionStore

logger = logging.getLogger("llmgine_ws.routing")


class Router(Protocol):
    """Where frames go. All methods are safe to call for apps that are not (or no longer) connected."""

    async def send_to_app(self, app_id: str, frame: str) -> None:
        """Deliver a frame to one app; raises ``AppNotConnected`` / ``AppDisconnected``."""
        ...

    async def broadcast(self, frame: str, exclude_apps: Collection[str]) -> int:
        """Deliver a frame to every connected app but the excluded; returns how many it reached."""
        ...

    async def send_to_user(self, user_id: str, frame: str) -> int:
        """Deliver a frame to every connection of an authenticated user; returns how many it reached."""
        ...

    async def request(self, app_id: str, message_id: str, frame: str, timeout: float) -> dict[str, Any]:
        """Send a server request and wait for the app's ``server_response`` data.

        Raises ``TimeoutError``, ``AppNotConnected``, or ``AppDisconnected`` as soon as the app
        disconnects while the request is pending.
        """
        ...

    def connected_apps(self) -> list[str]:
        """Every connected app_id."""
        ...

    def is_app_connected(self, app_id: str) -> bool:
        """Whether ``app_id`` is connected."""
        ...

    def app_sessions(self, app_id: str) -> list[str]:
        """Session ids owned by ``app_id`` (empty when unknown)."""
        ...

    def session_owner(self, session_id: str) -> str | None:
        """The app_id owning ``session_id``, or None."""
        ...


class LocalRouter:
    """Delivers to the connections of this process (the default: one process, zero setup)."""

    def __init__(self, hub: Hub, sessions: SessionStore, *, max_pending_requests: int) -> None:
        self._hub = hub
        self._sessions = sessions
        self._max_pending = max_pending_requests

    def _connection(self, app_id: str) -> Connection:
        connection = self._hub.get(app_id)
        if connection is None:
            raise AppNotConnected(app_id)
        if connection.closing:
            raise AppDisconnected(app_id)
        return connection

    async def send_to_app(self, app_id: str, frame: str) -> None:
        """Queue the frame on the app's connection (waiting up to its send grace for room)."""
        await self._connection(app_id).send(frame)

    async def broadcast(self, frame: str, exclude_apps: Collection[str]) -> int:
        """Queue the frame on every connection without ever waiting on a slow one.

        A connection whose queue is full gets the frame from a task in its own task group, which
        either delivers it in order or closes that connection (1013) after the send grace.
        """
        reached = 0
        for connection in self._hub:
            if connection.app_id in exclude_apps or connection.closing:
                continue
            if connection.send_nowait(frame) or connection.spawn(self._send_late, connection, frame):
                reached += 1
        return reached

    async def send_to_user(self, user_id: str, frame: str) -> int:
        """Queue the frame on every connection of ``user_id`` (like :meth:`broadcast`, never waiting)."""
        reached = 0
        for connection in self._hub.user_connections(user_id):
            if connection.closing:
                continue
            if connection.send_nowait(frame) or connection.spawn(self._send_late, connection, frame):
                reached += 1
        return reached

    @staticmethod
    async def _send_late(connection: Connection, frame: str) -> None:
        try:
            await connection.send(frame)
        except AppDisconnected:
            pass  # the connection was closed for being too slow; that is logged where it happens

    async def request(self, app_id: str, message_id: str, frame: str, timeout: float) -> dict[str, Any]:
        """See :meth:`Router.request`."""
        connection = self._connection(app_id)
        if len(connection.pending) >= self._max_pending:
            raise PendingRequestLimit(app_id, self._max_pending)
        pending = PendingRequest(app_id, message_id)
        connection.pending[message_id] = pending
        try:
            await connection.send(frame)
            with anyio.fail_after(timeout):
                return await pending.wait()
        finally:
            if connection.pending.get(message_id) is pending:
                del connection.pending[message_id]

    def connected_apps(self) -> list[str]:
        """See :meth:`Router.connected_apps`."""
        return [c.app_id for c in self._hub if not c.closing]

    def is_app_connected(self, app_id: str) -> bool:
        """See :meth:`Router.is_app_connected`."""
        connection = self._hub.get(app_id)
        return connection is not None and not connection.closing

    def app_sessions(self, app_id: str) -> list[str]:
        """See :meth:`Router.app_sessions`."""
        connection = self._hub.get(app_id)
        return sorted(connection.session_ids) if connection is not None else []

    def session_owner(self, session_id: str) -> str | None:
        """See :meth:`Router.session_owner`."""
        session = self._sessions.get(session_id)
        return session.app_id if session is not None else None
