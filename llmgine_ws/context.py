"""What a handler gets besides its payload (:class:`HandlerContext`), and what it may return."""

from __future__ import annotations

import warnings
from typing import Any

import anyio

from .config import APIConfig
from .connection import Connection
from .lifecycle import Host, Lifecycle
from .messaging import MessagingAPI, ServerResponse
from .protocol import FrameEncoder
from .sessions import Session, SessionStore

NO_REPLY: Any = object()
"""Return this from a handler that answers (or will answer) by other means."""


class Services:
    """What every handler of one app can reach; shared by all of the app's handler contexts."""

    __slots__ = ("app", "config", "encoder", "host", "lifecycle", "messaging", "sessions")

    def __init__(self, config: APIConfig, messaging: MessagingAPI, sessions: SessionStore, encoder: FrameEncoder,
                 lifecycle: Lifecycle, host: Host | None = None) -> None:
        self.config = config
        self.host = Host() if host is None else host
        self.messaging = messaging
        self.sessions = sessions
        self.encoder = encoder
        self.lifecycle = lifecycle
        self.app: Any = None
        """The Starlette app made by ``create_app`` (set once it exists)."""


class HandlerContext:
    """Passed to every handler with the decoded payload: ``handler(data, ctx)``."""

    __slots__ = ("_services", "connection", "message_id", "message_type", "prepared", "request_bytes")

    def __init__(self, services: Services, connection: Connection, message_type: str, message_id: str,
                 request_bytes: int = 0) -> None:
        self._services = services
        self.connection = connection
        self.message_type = message_type
        self.message_id = message_id
        """The request's message_id (the reply repeats it)."""
        self.request_bytes = request_bytes
        """The estimated memory the decoded request holds (see ``max_inflight_bytes``)."""
        self.prepared: Any = None
        """What the message type's ``prepare`` hook returned when it was dispatched (core handlers only)."""

    @property
    def app_id(self) -> str:
        """The app (connection) that sent this message."""
        return self.connection.app_id

    @property
    def principal(self) -> Any:
        """Who authenticated the connection (``None`` without an authenticator)."""
        return self.connection.principal

    @property
    def messaging(self) -> MessagingAPI:
        """The server messaging API (reach any app, session, or everyone)."""
        return self._services.messaging

    @property
    def sessions(self) -> SessionStore:
        """All sessions; use :meth:`get_session` to look one up on behalf of this app."""
        return self._services.sessions

    @property
    def config(self) -> APIConfig:
        """The app's configuration."""
        return self._services.config

    @property
    def starlette_app(self) -> Any:
        """The Starlette app serving this connection (``starlette_app.state`` holds your own objects)."""
        return self._services.app

    @property
    def host_app(self) -> Any:
        """The app serving this connection as the user sees it: the FastAPI/Starlette app llmgine_ws is
        mounted in (with ``llmgine_ws.mount`` / ``llmgine_ws.lifespan``), else the llmgine_ws app itself."""
        return self._services.host.app

    @property
    def state(self) -> Any:
        """``host_app.state``: what the host app keeps for its request handlers (a db pool, clients)."""
        return self.host_app.state

    @property
    def app(self) -> Any:
        """Deprecated alias of :attr:`starlette_app` (``app`` read too much like ``app_id``)."""
        warnings.warn("HandlerContext.app is deprecated: use ctx.starlette_app", DeprecationWarning, stacklevel=2)
        return self._services.app

    @property
    def stopping(self) -> anyio.Event:
        """Set when the server starts shutting down: long-running handlers may watch it to wrap up."""
        return self._services.lifecycle.draining

    def get_session(self, session_id: str) -> Session:
        """The session if this app owns it; otherwise a ``SESSION_NOT_FOUND`` error for the client.

        Counts as an interaction with the session (resets its idle-expiry clock).
        """
        session = self._services.sessions.get_owned(session_id, self.app_id)
        session.touch()
        return session

    async def send(self, message_type: str, data: Any = None) -> None:
        """Send a server-initiated message to this connection."""
        await self.connection.send(self._services.encoder.event(message_type, {} if data is None else data))

    async def ask(self, message_type: str = "server_request", data: Any = None,
                  timeout: float | None = None) -> ServerResponse:
        """Send a server request to this connection and wait for its answer (see
        :meth:`MessagingAPI.send_to_app_and_wait`). Safe from inside a handler: the reader keeps
        reading while handlers run, so the answer gets through."""
        return await self._services.messaging.send_to_app_and_wait(self.app_id, message_type, data, timeout)
