"""The connection hub: every connection of this process, by app_id."""

from __future__ import annotations

from collections.abc import Iterator

import anyio

from .connection import Connection


class Hub:
    """Registry of the connections served by this process.

    It only tracks; delivery goes through a :class:`~llmgine_ws.routing.Router`, and cleanup is
    orchestrated by the :class:`~llmgine_ws.runtime.Runtime`.
    """

    def __init__(self) -> None:
        self._connections: dict[str, Connection] = {}
        self._by_user: dict[str, set[str]] = {}
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
        if not self._connections:
            self._emptied.set()

    def get(self, app_id: str) -> Connection | None:
        """The connection of ``app_id``, if it is connected here."""
        return self._connections.get(app_id)

    def user_connections(self, user_id: str) -> list[Connection]:
        """Every connection here authenticated as ``user_id``."""
        return [self._connections[app_id] for app_id in self._by_user.get(user_id, ())]

    def app_ids(self) -> list[str]:
        """The app_ids connected here."""
        return list(self._connections)

    def pending_request_count(self) -> int:
        """Server requests waiting for an answer, across all connections."""
        return sum(len(c.pending) for c in self._connections.values())

    async def wait_empty(self) -> None:
        """Wait until no connection is registered."""
        await self._emptied.wait()
