"""What a handler gets besides its payload: who asked, and the server's APIs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .protocol import new_message_id

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from .config import APIConfig
    from .connection import Connection
    from .messaging import MessagingAPI, ServerResponse
    from .runtime import Runtime
    from .sessions import Session, SessionStore


class HandlerContext:
    """Passed to every handler with the decoded payload: ``handler(data, ctx)``."""

    __slots__ = ("connection", "message_id", "message_type", "runtime")

    def __init__(self, runtime: Runtime, connection: Connection, message_type: str, message_id: str) -> None:
        self.runtime = runtime
        self.connection = connection
        self.message_type = message_type
        self.message_id = message_id
        """The request's message_id (the reply repeats it)."""

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
        return self.runtime.messaging

    @property
    def sessions(self) -> SessionStore:
        """All sessions; use :meth:`get_session` to look one up on behalf of this app."""
        return self.runtime.sessions

    @property
    def config(self) -> APIConfig:
        """The app's configuration."""
        return self.runtime.config

    @property
    def app(self) -> Starlette | None:
        """The Starlette app serving this connection (``app.state`` holds your own objects)."""
        app: Starlette | None = self.connection.websocket.scope.get("app")
        return app

    def get_session(self, session_id: str) -> Session:
        """The session if this app owns it; otherwise a ``SESSION_NOT_FOUND`` error for the client.

        Counts as an interaction with the session (resets its idle-expiry clock).
        """
        session = self.runtime.sessions.get_owned(session_id, self.app_id)
        session.touch()
        return session

    async def send(self, message_type: str, data: Any = None) -> None:
        """Send a server-initiated message to this connection."""
        frame = self.runtime.encoder.frame(message_type, new_message_id(), {} if data is None else data,
                                           server_initiated=True)
        await self.connection.send(frame)

    async def ask(self, message_type: str = "server_request", data: Any = None,
                  timeout: float | None = None) -> ServerResponse:
        """Send a server request to this connection and wait for its answer (see
        :meth:`MessagingAPI.send_to_app_and_wait`). Safe from inside a handler: the reader keeps
        reading while handlers run, so the answer gets through."""
        return await self.runtime.messaging.send_to_app_and_wait(self.app_id, message_type, data, timeout)
