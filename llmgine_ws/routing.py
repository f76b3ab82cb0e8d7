"""The routing seam: every delivery to an app, a session's app, or everyone goes through a MessageRouter.

:class:`LocalRouter` delivers to the connections of this process. A cluster router (NATS, Redis)
implements the same interface and falls back to the local one for apps connected here, so the
messaging API and everything built on it do not change when a deployment scales out.

Frames cross this seam already encoded (``str``): a message is encoded once, however many apps
receive it and whichever process they are connected to.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Collection
from datetime import datetime
from typing import Any, Literal, Protocol

import anyio
import anyio.abc
import msgspec

from .connection import Connection
from .errors import AppDisconnected, AppNotConnected, PendingRequestLimit
from .hub import Hub
from .pending import PendingRequest
from .protocol import answer_check
from .sessions import SessionStore

logger = logging.getLogger("llmgine_ws.routing")


class AppPresence(msgspec.Struct, frozen=True, kw_only=True):
    """Where one connected app is, as this node sees it (``/api/connections``)."""

    app_id: str
    node_id: str
    node_name: str
    connected_at: datetime
    sessions: list[str]
    local: bool
    """True when the app is connected to this node."""
    state: Literal["connected", "detached"] = "connected"
    """``detached``: its socket dropped and it waits for a ``resume`` (see docs/resume.md)."""


class NodePresence(msgspec.Struct, frozen=True, kw_only=True):
    """One node of the cluster, as this node sees it."""

    node_id: str
    node_name: str
    apps: int
    local: bool
    last_seen_seconds: float
    """Seconds since its last heartbeat (0 for this node)."""


def default_node_name() -> str:
    """``hostname:pid``: how a node is labelled in presence output."""
    return f"{socket.gethostname()}:{os.getpid()}"


def local_presence(hub: Hub, node_id: str, node_name: str) -> list[AppPresence]:
    """The apps connected to this process (closing ones left out), as seen by node ``node_id``."""
    return [
        AppPresence(app_id=c.app_id, node_id=node_id, node_name=node_name, connected_at=c.connected_at,
                    sessions=sorted(c.session_ids), local=True, state="detached" if c.detached else "connected")
        for c in hub if not c.closing
    ]


class MessageRouter(Protocol):
    """Where frames go. All methods are safe to call for apps that are not (or no longer) connected."""

    async def send_to_app(self, app_id: str, frame: str) -> None:
        """Deliver a frame to one app; raises ``AppNotConnected`` / ``AppDisconnected``."""

    async def broadcast(self, frame: str, exclude_apps: Collection[str]) -> int:
        """Deliver a frame to every connected app but the excluded; returns how many it reached."""

    async def send_to_user(self, user_id: str, frame: str) -> int:
        """Deliver a frame to every connection of an authenticated user; returns how many it reached."""

    async def request(self, app_id: str, message_id: str, frame: str, timeout: float) -> dict[str, Any]:
        """Send a server request and wait for the app's ``server_response`` data.

        Raises ``TimeoutError``, ``AppNotConnected``, or ``AppDisconnected`` as soon as the app
        disconnects while the request is pending.
        """

    def connected_apps(self) -> list[str]:
        """Every connected app_id."""

    def is_app_connected(self, app_id: str) -> bool:
        """Whether ``app_id`` is connected."""

    def app_sessions(self, app_id: str) -> list[str]:
        """Session ids owned by ``app_id`` (empty when unknown)."""

    def session_owner(self, session_id: str) -> str | None:
        """The app_id owning ``session_id``, or None."""

    async def join_group(self, app_id: str, group: str) -> None:
        """Add ``app_id`` to ``group`` (until it leaves or disconnects); raises ``AppNotConnected``."""

    async def leave_group(self, app_id: str, group: str) -> bool:
        """Remove ``app_id`` from ``group``; False if it was not a member (or is gone)."""

    async def send_to_group(self, group: str, frame: str, exclude_apps: Collection[str]) -> int:
        """Deliver a frame to every member of ``group`` but the excluded; returns how many it reached."""

    def presence(self) -> list[AppPresence]:
        """Every connected app with its node."""

    def nodes(self) -> list[NodePresence]:
        """Every node this node knows of (itself included)."""

    @property
    def node_id(self) -> str:
        """This node's id."""

    def health_problems(self) -> list[str]:
        """Why routing is impaired right now (empty when healthy); makes ``/health/ready`` fail."""

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the router's background work in the app's lifespan (returns when there is none)."""


class LocalRouter:
    """Delivers to the connections of this process (the default: one process, zero setup)."""

    def __init__(self, hub: Hub, sessions: SessionStore, *, max_pending_requests: int,
                 node_name: str | None = None) -> None:
        self._hub = hub
        self._sessions = sessions
        self._max_pending = max_pending_requests
        self._node_name = node_name or default_node_name()

    @property
    def node_id(self) -> str:
        """``local``: a router without a backplane is a cluster of one."""
        return "local"

    @property
    def hub(self) -> Hub:
        """The connections of this process."""
        return self._hub

    @property
    def max_pending_requests(self) -> int:
        """Server requests one app may have waiting for an answer."""
        return self._max_pending

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
        return self.deliver_many(self._hub, frame, exclude_apps)

    def deliver_many(self, connections: Collection[Connection], frame: str, exclude_apps: Collection[str] = ()) -> int:
        """Queue the frame on each connection (never waiting; see :meth:`broadcast`); returns the count."""
        reached = 0
        for connection in connections:
            if connection.app_id in exclude_apps or connection.closing:
                continue
            if connection.send_soon(frame):
                reached += 1
        return reached

    async def send_to_user(self, user_id: str, frame: str) -> int:
        """Queue the frame on every connection of ``user_id`` (like :meth:`broadcast`, never waiting)."""
        return self.deliver_many(self._hub.user_connections(user_id), frame)

    async def join_group(self, app_id: str, group: str) -> None:
        """See :meth:`MessageRouter.join_group`."""
        if not self._hub.join_group(app_id, group):
            raise AppNotConnected(app_id)

    async def leave_group(self, app_id: str, group: str) -> bool:
        """See :meth:`MessageRouter.leave_group`."""
        return self._hub.leave_group(app_id, group)

    async def send_to_group(self, group: str, frame: str, exclude_apps: Collection[str]) -> int:
        """Queue the frame on every member of ``group`` here (like :meth:`broadcast`, never waiting)."""
        return self.deliver_many(self._hub.group_connections(group), frame, exclude_apps)

    async def request(self, app_id: str, message_id: str, frame: str, timeout: float) -> dict[str, Any]:
        """See :meth:`MessageRouter.request`."""
        connection = self._connection(app_id)
        if len(connection.pending) >= self._max_pending:
            raise PendingRequestLimit(app_id, self._max_pending)
        pending = PendingRequest(app_id, message_id, answer_check(frame), frame=frame)
        connection.pending[message_id] = pending
        connection.changed()
        try:
            await connection.send(frame)
            return await pending.wait(timeout)
        finally:
            if connection.pending.get(message_id) is pending:
                del connection.pending[message_id]
                connection.changed()

    def connected_apps(self) -> list[str]:
        """See :meth:`MessageRouter.connected_apps`."""
        return [c.app_id for c in self._hub if not c.closing]

    def is_app_connected(self, app_id: str) -> bool:
        """See :meth:`MessageRouter.is_app_connected`."""
        connection = self._hub.get(app_id)
        return connection is not None and not connection.closing

    def app_sessions(self, app_id: str) -> list[str]:
        """See :meth:`MessageRouter.app_sessions`."""
        connection = self._hub.get(app_id)
        return sorted(connection.session_ids) if connection is not None else []

    def session_owner(self, session_id: str) -> str | None:
        """See :meth:`MessageRouter.session_owner`."""
        session = self._sessions.get(session_id)
        return session.app_id if session is not None else None

    def presence(self) -> list[AppPresence]:
        """See :meth:`MessageRouter.presence`."""
        return local_presence(self._hub, self.node_id, self._node_name)

    def nodes(self) -> list[NodePresence]:
        """See :meth:`MessageRouter.nodes`."""
        return [NodePresence(node_id=self.node_id, node_name=self._node_name, apps=len(self._hub), local=True,
                             last_seen_seconds=0.0)]

    def health_problems(self) -> list[str]:
        """See :meth:`MessageRouter.health_problems` (a local router is always healthy)."""
        return []

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Nothing runs in the background for a local router."""
        task_status.started()
