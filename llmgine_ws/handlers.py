"""The core protocol's handlers: where each built-in client message is answered.

Every handler has the custom-handler signature ``handler(data, ctx)``; :meth:`CoreHandlers.specs`
joins them with the core message registry (:mod:`llmgine_ws.protocol.registry`) exactly like custom
ones are registered. Plain ``def`` handlers run inline in the reader (they never block); ``async
def`` ones run in their own task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .connection import Connection
from .context import NO_REPLY, HandlerContext
from .engines import EngineHandle
from .errors import ErrorCode, ProtocolError
from .extensions import HandlerSpec, make_spec
from .protocol import (
    CORE_CLIENT_MESSAGES,
    AckData,
    CancelData,
    CancelResData,
    CloseSessionResData,
    CreateEngineData,
    CreateEngineResData,
    CreateSessionData,
    CreateSessionResData,
    DeleteEngineResData,
    EngineCommandData,
    PingData,
    PingResData,
    ResumeData,
    ServerResponseData,
    SessionRef,
    StatusResData,
)
from .session_manager import SessionManager


class CoreHandlers:
    """The handlers of the core messages of one app, bound to its sessions and engines."""

    def __init__(self, sessions: SessionManager, *,
                 resume: Callable[[ResumeData, HandlerContext], Any] | None = None,
                 ack: Callable[[Connection, int], None] | None = None) -> None:
        self._sessions = sessions
        self._engines = sessions.engines
        self._resume = resume
        self._ack = ack

    def specs(self) -> list[HandlerSpec]:
        """One spec per core client message, in registry order."""
        handlers: dict[str, Callable[..., Any]] = {
            "ping": self.ping,
            "create_session": self.create_session,
            "status": self.status,
            "close_session": self.close_session,
            "server_response": self.server_response,
            "server_pong": self.server_pong,
            "cancel": self.cancel,
            "create_engine": self.create_engine,
            "engine_command": self.engine_command,
            "delete_engine": self.delete_engine,
            "ack": self.ack,
            "resume": self.resume,
        }
        if handlers.keys() != CORE_CLIENT_MESSAGES.keys():
            mismatch = sorted(handlers.keys() ^ CORE_CLIENT_MESSAGES.keys())
            raise RuntimeError(f"core handlers do not match the registry: {mismatch}")
        prepare = {"create_engine": self.reserve_engine}
        return [make_spec(name, spec.data_type, handlers[name], spec.reply, prepare.get(name))
                for name, spec in CORE_CLIENT_MESSAGES.items()]

    # ------------------------------------------------------------------ connection & sessions

    def ping(self, data: PingData, ctx: HandlerContext) -> PingResData:
        """``ping`` → ``ping_res`` echoing the timestamp."""
        return PingResData(timestamp=data.timestamp)

    async def create_session(self, data: CreateSessionData, ctx: HandlerContext) -> CreateSessionResData:
        """``create_session`` → ``create_session_res``: a session of the calling connection.

        ``data.app_id`` is ignored (seed-era clients send their own name there): whatever it says, the
        session belongs to the connection that asked, and nothing reveals whether such an app exists.
        """
        session = await self._sessions.create(ctx.connection)
        return CreateSessionResData(session_id=session.session_id)

    def status(self, data: SessionRef, ctx: HandlerContext) -> StatusResData:
        """``status`` → ``status_res`` for a session this app owns."""
        session = ctx.get_session(data.session_id)
        handle = self._engines.get(session.session_id)
        return StatusResData(
            session_id=session.session_id,
            status="active",
            created_at=session.created_at,
            last_interaction_at=session.last_interaction_at,
            engine=handle.info() if handle is not None else None,
        )

    async def close_session(self, data: SessionRef, ctx: HandlerContext) -> CloseSessionResData:
        """``close_session`` → ``close_session_res``; stops the session's engine and deletes both."""
        session = ctx.sessions.get_owned(data.session_id, ctx.app_id)
        await self._sessions.destroy(session, reason="closed")
        return CloseSessionResData(session_id=session.session_id)

    def server_response(self, data: ServerResponseData, ctx: HandlerContext) -> Any:
        """``server_response``: resolves the pending server request with this message_id.

        Only requests sent to *this* connection can be resolved from it.
        """
        pending = ctx.connection.pending.get(ctx.message_id)
        if pending is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_REQUEST,
                "no server request with this message_id is waiting for an answer (it may have timed out)",
                {"message_id": ctx.message_id},
            )
        problem = pending.check(data) if pending.check is not None else None
        if problem is not None:  # refused; the question stays open for a fitting answer
            pending.refused = True
            raise ProtocolError(ErrorCode.VALIDATION_ERROR, problem, {"message_id": ctx.message_id})
        del ctx.connection.pending[ctx.message_id]
        pending.resolve(data)
        ctx.connection.changed()
        return NO_REPLY

    def server_pong(self, data: ServerResponseData, ctx: HandlerContext) -> Any:
        """``server_pong``: the client is alive; clears the unanswered-ping count."""
        if ctx.connection.unanswered_pings.pop(ctx.message_id, None) is None:
            raise ProtocolError(ErrorCode.UNKNOWN_REQUEST, "no server_ping with this message_id is outstanding",
                                {"message_id": ctx.message_id})
        ctx.connection.unanswered_pings.clear()
        ctx.connection.changed()
        return NO_REPLY

    def cancel(self, data: CancelData, ctx: HandlerContext) -> CancelResData:
        """``cancel`` → ``cancel_res``; cancels the target through its cancel scope.

        Looks only at this connection's requests, so a client can only cancel its own.
        """
        scope = ctx.connection.in_flight.get(data.target_message_id)
        if scope is None or scope.cancel_called:
            return CancelResData(target_message_id=data.target_message_id, cancelled=False)
        scope.cancel()
        return CancelResData(target_message_id=data.target_message_id, cancelled=True)

    # ------------------------------------------------------------------ resume

    def ack(self, data: AckData, ctx: HandlerContext) -> Any:
        """``ack``: the client has every frame up to ``data.seq``; no answer (see docs/resume.md)."""
        if self._ack is not None:
            self._ack(ctx.connection, data.seq)
        return NO_REPLY

    def resume(self, data: ResumeData, ctx: HandlerContext) -> Any:
        """``resume`` → ``resume_res``: take over a dropped app (see docs/resume.md)."""
        if self._resume is None:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE_TYPE, "resume is not available on this server",
                                {"type": "resume"})
        return self._resume(data, ctx)

    # ------------------------------------------------------------------ engines

    def reserve_engine(self, data: CreateEngineData, ctx: HandlerContext) -> EngineHandle:
        """``create_engine``, when dispatched: take the session's engine slot (see ``EngineManager.reserve``)."""
        return self._engines.reserve(ctx.get_session(data.session_id), data.engine_type)

    async def create_engine(self, data: CreateEngineData, ctx: HandlerContext) -> CreateEngineResData:
        """``create_engine`` → ``create_engine_res``: make and start the engine reserved when dispatched."""
        handle: EngineHandle = ctx.prepared
        # The session may have gone since: start() then fails (and answers the commands queued meanwhile).
        await self._engines.start(handle, ctx.sessions.get(data.session_id), ctx.connection, data.config)
        return CreateEngineResData(session_id=handle.session_id, engine_id=handle.engine_id,
                                   engine_type=handle.engine_type)

    def engine_command(self, data: EngineCommandData, ctx: HandlerContext) -> Any:
        """``engine_command``: queued (in arrival order) for the session's engine worker.

        The worker streams ``engine_event`` messages and then answers with ``engine_command_res``.
        Inline, so that arrival order is fixed before any task is scheduled.
        """
        ctx.get_session(data.session_id)
        self._engines.submit(ctx.connection, data.session_id, ctx.message_id, data.command, ctx.request_bytes)
        return NO_REPLY

    async def delete_engine(self, data: SessionRef, ctx: HandlerContext) -> DeleteEngineResData:
        """``delete_engine`` → ``delete_engine_res``: stops the engine; the session stays."""
        session = ctx.get_session(data.session_id)
        handle = self._engines.live(session.session_id)
        await self._engines.stop(session.session_id, "deleted")
        return DeleteEngineResData(session_id=session.session_id, engine_id=handle.engine_id)
