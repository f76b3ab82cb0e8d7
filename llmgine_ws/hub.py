"""The connection hub: every connection of this process, by app_id."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import anyio

from .connection import Connection


class HubListener(Protocol):
    """Told when a connection joins or leaves the hub (e.g. a cluster router publishing presence)."""

    def app_added(self, connection: Connection) -> None:
        """``connection`` was registered."""

    def app_removed(self, connection: Connection) -> None:
        """``connection`` was forgotten (its cleanup is done)."""


class Hub:
    """Registry of the connections served by this process.

    It only tracks; delivery goes through a :class:`~llmgine_ws.routing.MessageRouter`.
    """

    def __init__(self) -> None:
        self._connections: dict[str, Connection] = {}
        self._by_user: dict[str, set[str]] = {}
        self._groups: dict[str, set[str]] = {}
        self._memberships: dict[str, set[str]] = {}
        self.listeners: list[HubListener] = []
        """Told about every connection added or removed, in that order."""
        self._emptied = anyio.Event()
        self._emptied.set()

    def __len__(self) -> int:
        return len(self._connections)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._connections.values()))

    def __contains__(self, app_id: object) -> bool:
        return app_id in self._connections

    def add(self, connection: Connection) -> None:
        """Register a freshly accepted connection (app_ids are fresh UUID4s, never reused)."""
        if connection.app_id in self._connections:
            raise RuntimeError(f"app_id {connection.app_id!r} is already registered")
        self._connections[connection.app_id] = connection
        user_id = connection.user_id
        if user_id is not None:
            self._by_user.setdefault(user_id, set()).add(connection.app_id)
        if self._emptied.is_set():
            self._emptied = anyio.Event()
        for listener in self.listeners:
            listener.app_added(connection)

    def remove(self, connection: Connection) -> None:
        """Forget a connection (no-op if it is not, or no longer, registered)."""
        if self._connections.get(connection.app_id) is connection:
            del self._connections[connection.app_id]
            user_id = connection.user_id
            if user_id is not None:
                apps = self._by_user.get(user_id, set())
                apps.discard(connection.app_id)
                if not apps:
                    self._by_user.pop(user_id, None)
            for group in self._memberships.pop(connection.app_id, ()):
                self._discard_member(group, connection.app_id)
            for listener in self.listeners:
                listener.app_removed(connection)
        if not self._connections:
            self._emptied.set()

    def get(self, app_id: str) -> Connection | None:
        """The connection of ``app_id``, if it is connected here."""
        return self._connections.get(app_id)

    def user_connections(self, user_id: str) -> list[Connection]:
        """Every connection here authenticated as ``user_id``."""
        return [self._connections[app_id] for app_id in self._by_user.get(user_id, ())]

    def join_group(self, app_id: str, group: str) -> bool:
        """Add a connected app to ``group``; False if ``app_id`` is not connected here."""
        connection = self._connections.get(app_id)
        if connection is None or connection.closing:
            return False
        self._groups.setdefault(group, set()).add(app_id)
        self._memberships.setdefault(app_id, set()).add(group)
        return True

    def leave_group(self, app_id: str, group: str) -> bool:
        """Remove an app from ``group``; False if it was not a member."""
        groups = self._memberships.get(app_id)
        if groups is None or group not in groups:
            return False
        groups.discard(group)
        if not groups:
            del self._memberships[app_id]
        self._discard_member(group, app_id)
        return True

    def _discard_member(self, group: str, app_id: str) -> None:
        members = self._groups.get(group)
        if members is not None:
            members.discard(app_id)
            if not members:
                del self._groups[group]

    def group_connections(self, group: str) -> list[Connection]:
        """The connections here that are members of ``group`` (membership ends with the connection)."""
        return [self._connections[app_id] for app_id in self._groups.get(group, ()) if app_id in self._connections]

    def app_ids(self) -> list[str]:
        """The app_ids connected here."""
        return list(self._connections)

    def pending_request_count(self) -> int:
        """Server requests waiting for an answer, across all connections."""
        return sum(len(c.pending) for c in self._connections.values())

    async def wait_empty(self) -> None:
        """Wait until no connection is registered."""
        await self._emptied.wait()
