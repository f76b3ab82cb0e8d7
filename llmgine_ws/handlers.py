"""The core protocol's handlers: where each built-in client message is answered.

Every handler has the custom-handler signature ``handler(data, ctx)`` and is registered in
:func:`core_handlers` exactly like a custom one. Plain ``def`` handlers run inline in the reader
(they never block); ``async def`` ones run in their own task.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import anyio.lowlevel
import msgspec

from .context import HandlerContext
from .engines import Engine, EngineCommandResData, EngineContext, EngineHandle, QueuedCommand, discard_engine
from .errors import AppDisconnected, ErrorCode, ProtocolError, being_cancelled
from .extensions import HandlerSpec, make_spec
from .protocol import (
    CloseSessionResData,
    CreateSessionData,
    CreateSessionResData,
    PingData,
    PingResData,
    ServerResponseData,
    SessionRef,
    StatusResData,
)

if TYPE_CHECKING:
    from .connection import Connection
    from .runtime import Runtime

logger = logging.getLogger("llmgine_ws.handlers")

NO_REPLY: Any = object()
"""Return this from a handler that answers (or will answer) by other means."""


# ------------------------------------------------------------------------ connection & sessions


def ping(data: PingData, ctx: HandlerContext) -> PingResData:
    """``ping`` → ``ping_res`` echoing the timestamp."""
    return PingResData(timestamp=data.timestamp)


async def create_session(data: CreateSessionData, ctx: HandlerContext) -> CreateSessionResData:
    """``create_session`` → ``create_session_res``: the session belongs to the calling connection.

    ``app_id`` is accepted and ignored (seed frontends send their own name for it): refusing a
    foreign one would tell the caller whether such an app exists, and obeying it would hand one
    app's sessions to another.
    """
    session = await ctx.runtime.create_session(ctx.connection)
    return CreateSessionResData(session_id=session.session_id)


def status(data: SessionRef, ctx: HandlerContext) -> StatusResData:
    """``status`` → ``status_res`` for a session this app owns."""
    session = ctx.get_session(data.session_id)
    return StatusResData(
        session_id=session.session_id,
        status=session.status,
        created_at=session.created_at,
        last_interaction_at=session.last_interaction_at,
        engine=session.engine.info() if session.engine is not None else None,
    )


async def close_session(data: SessionRef, ctx: HandlerContext) -> CloseSessionResData:
    """``close_session`` → ``close_session_res``; stops the session's engine and deletes both."""
    session = ctx.runtime.sessions.get_owned(data.session_id, ctx.app_id)
    await ctx.runtime.destroy_session(session, reason="closed")
    return CloseSessionResData(session_id=session.session_id)


def server_response(data: ServerResponseData, ctx: HandlerContext) -> Any:
    """``server_response``: resolves the pending server request with this message_id.

    Only requests sent to *this* connection can be resolved from it.
    """
    pending = ctx.connection.pending.pop(ctx.message_id, None)
    if pending is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_REQUEST,
            "no server request with this message_id is waiting for an answer (it may have timed out)",
            {"message_id": ctx.message_id},
        )
    pending.resolve(data)
    return NO_REPLY


def server_pong(data: ServerResponseData, ctx: HandlerContext) -> Any:
    """``server_pong``: the client is alive; clears the unanswered-ping count."""
    if ctx.connection.unanswered_pings.pop(ctx.message_id, None) is None:
        raise ProtocolError(ErrorCode.UNKNOWN_REQUEST, "no server_ping with this message_id is outstanding",
                            {"message_id": ctx.message_id})
    ctx.connection.unanswered_pings.clear()
    return NO_REPLY


# ------------------------------------------------------------------------ cancellation


class CancelData(msgspec.Struct, frozen=True):
    """``cancel``: the message_id of one of this connection's requests still being handled."""

    target_message_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class CancelResData(msgspec.Struct, frozen=True):
    """``cancel_res``: ``cancelled`` is false when the target had already finished (or never existed)."""

    target_message_id: str
    cancelled: bool


def cancel(data: CancelData, ctx: HandlerContext) -> CancelResData:
    """``cancel`` → ``cancel_res``; cancels the target through its cancel scope.

    Looks only at this connection's requests, so a client can only cancel its own.
    """
    scope = ctx.connection.in_flight.get(data.target_message_id)
    if scope is None or scope.cancel_called:
        return CancelResData(target_message_id=data.target_message_id, cancelled=False)
    scope.cancel()
    return CancelResData(target_message_id=data.target_message_id, cancelled=True)


# ------------------------------------------------------------------------ engines


class CreateEngineData(msgspec.Struct, frozen=True, kw_only=True):
    """``create_engine``."""

    session_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    engine_type: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    config: dict[str, Any] = msgspec.field(default_factory=dict)


class CreateEngineResData(msgspec.Struct, frozen=True, kw_only=True):
    """``create_engine_res``."""

    session_id: str
    engine_id: str
    engine_type: str


class EngineCommandData(msgspec.Struct, frozen=True, kw_only=True):
    """``engine_command``: ``command`` is handed to the engine as decoded JSON."""

    session_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    command: Any = None


class DeleteEngineResData(msgspec.Struct, frozen=True, kw_only=True):
    """``delete_engine_res``."""

    session_id: str
    engine_id: str
    deleted: bool = True


async def create_engine(data: CreateEngineData, ctx: HandlerContext) -> CreateEngineResData:
    """``create_engine`` → ``create_engine_res``: one engine per session."""
    runtime = ctx.runtime
    session = ctx.get_session(data.session_id)
    if session.engine is not None and not session.engine.stopped:
        raise ProtocolError(ErrorCode.ENGINE_EXISTS, "this session already has an engine; delete it first",
                            {"session_id": session.session_id, "engine_id": session.engine.engine_id})
    factory = runtime.extensions.engine_factories.get(data.engine_type)
    if factory is None:
        raise ProtocolError(ErrorCode.INVALID_ENGINE_TYPE, f"unknown engine type {data.engine_type!r}",
                            {"engine_type": data.engine_type,
                             "registered_types": sorted(runtime.extensions.engine_factories)})
    failure: BaseException | None = None
    engine: Engine | None = None
    try:
        with anyio.fail_after(runtime.config.engine_start_timeout):
            made = factory(session, dict(data.config))
            engine = await made if inspect.isawaitable(made) else made
            await engine.start()
    except Exception as exc:
        failure = exc
    except anyio.get_cancelled_exc_class() as exc:
        if being_cancelled():
            if engine is not None:  # made, but its start() was cut short: it still gets its stop()
                await discard_engine(engine, data.engine_type, session.session_id, runtime.config.engine_stop_timeout)
            raise
        failure = exc  # a stray cancellation raised by the factory or start() itself
    if failure is not None or engine is None:
        if engine is not None:  # start() failed or timed out: stop() releases what it had opened
            await discard_engine(engine, data.engine_type, session.session_id, runtime.config.engine_stop_timeout)
        logger.error("engine %r failed to start for session %s", data.engine_type, session.session_id,
                     exc_info=failure, extra={"app_id": ctx.app_id, "message_id": ctx.message_id})
        reason = "timed out while starting" if isinstance(failure, TimeoutError) else "failed to start"
        raise ProtocolError(ErrorCode.ENGINE_CREATION_FAILED, f"engine {data.engine_type!r} {reason}",
                            {"engine_type": data.engine_type}) from None
    if ctx.connection.closing or runtime.sessions.get(session.session_id) is not session:
        # The session went away while the engine was starting: do not leak it.
        await discard_engine(engine, data.engine_type, session.session_id, runtime.config.engine_stop_timeout)
        raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "session not found", {"session_id": data.session_id})
    if session.engine is not None and not session.engine.stopped:
        # Another create_engine for this session won the race while we were starting.
        await discard_engine(engine, data.engine_type, session.session_id, runtime.config.engine_stop_timeout)
        raise ProtocolError(ErrorCode.ENGINE_EXISTS, "this session already has an engine; delete it first",
                            {"session_id": session.session_id, "engine_id": session.engine.engine_id})
    handle = EngineHandle(engine, data.engine_type, session.session_id)
    session.engine = handle
    handle.status = "idle"
    if not ctx.connection.spawn(run_engine_commands, ctx.runtime, ctx.connection, handle):
        handle.worker_done.set()
    return CreateEngineResData(session_id=session.session_id, engine_id=handle.engine_id,
                               engine_type=handle.engine_type)


def _live_engine(ctx: HandlerContext, session_id: str) -> EngineHandle:
    session = ctx.get_session(session_id)
    handle = session.engine
    if handle is None or handle.stopped:
        details: dict[str, Any] = {"session_id": session_id}
        message = "this session has no engine"
        if handle is not None:
            message = f"this session's engine was stopped ({handle.stop_reason}); create a new one"
            details["engine_id"] = handle.engine_id
        raise ProtocolError(ErrorCode.ENGINE_NOT_FOUND, message, details)
    return handle


def engine_command(data: EngineCommandData, ctx: HandlerContext) -> Any:
    """``engine_command``: queued (in arrival order) for the session's engine worker.

    The worker streams ``engine_event`` messages and then answers with ``engine_command_res``.
    Inline, so that arrival order is fixed before any task is scheduled.
    """
    handle = _live_engine(ctx, data.session_id)
    connection = ctx.connection
    scope = connection.begin_request(ctx.message_id, ctx.runtime.config.max_inflight_requests)
    handle.submit(QueuedCommand(ctx.message_id, data.command, scope))
    return NO_REPLY


async def delete_engine(data: SessionRef, ctx: HandlerContext) -> DeleteEngineResData:
    """``delete_engine`` → ``delete_engine_res``: stops the engine; the session stays."""
    session = ctx.get_session(data.session_id)
    handle = _live_engine(ctx, data.session_id)
    await ctx.runtime.stop_engine(session, reason="deleted")
    session.engine = None
    return DeleteEngineResData(session_id=session.session_id, engine_id=handle.engine_id)


async def run_engine_commands(runtime: Runtime, connection: Connection, handle: EngineHandle) -> None:
    """The engine's worker: runs its commands one at a time, in arrival order.

    Lives in the connection's task group, so a disconnect cancels it with everything else.
    """
    try:
        await _serve_commands(runtime, connection, handle)
    finally:
        handle.worker_done.set()


async def _serve_commands(runtime: Runtime, connection: Connection, handle: EngineHandle) -> None:
    async with handle.commands:
        async for queued in handle.commands:
            reply = await _run_command(runtime, connection, handle, queued)
            try:
                frame = runtime.encoder.frame("engine_command_res", queued.message_id, reply)
            except Exception as exc:  # TypeError, msgspec.EncodeError, RecursionError (too deep)...
                logger.error("engine %s returned a result that is not JSON-serialisable: %s", handle.engine_id, exc,
                             extra={"app_id": connection.app_id, "message_id": queued.message_id})
                frame = runtime.encoder.frame("engine_command_res", queued.message_id, EngineCommandResData(
                    session_id=handle.session_id, status="failed", result=None,
                    error="the engine's result is not serialisable"))
            try:
                await connection.send(frame)
            except AppDisconnected:
                return
            if runtime.metrics is not None:
                runtime.metrics.request_done("engine_command", time.monotonic() - queued.arrived)


async def _run_command(
    runtime: Runtime, connection: Connection, handle: EngineHandle, queued: QueuedCommand
) -> EngineCommandResData:
    handle.queued -= 1
    handle.current = queued
    handle.status = "running"
    handle.touch()
    try:
        with queued.scope:
            if handle.stopped:
                queued.scope.cancel()
            await anyio.lowlevel.checkpoint_if_cancelled()  # a command cancelled while queued never starts
            ctx = EngineContext(runtime, connection, handle.session_id, queued.message_id)
            result = await handle.engine.handle_command(queued.command, ctx)
            return EngineCommandResData(session_id=handle.session_id, status="completed", result=result)
        return EngineCommandResData(session_id=handle.session_id, status="cancelled", result=None)
    except ProtocolError as exc:
        failure = exc.message
    except AppDisconnected as exc:
        if not connection.closing:
            _command_failed(handle, connection, queued)
        failure = f"{type(exc).__name__}: the engine failed on this command"  # (undeliverable when closing)
    except Exception as exc:
        _command_failed(handle, connection, queued)
        failure = f"{type(exc).__name__}: the engine failed on this command"
    except anyio.get_cancelled_exc_class() as exc:
        if being_cancelled():
            raise
        _command_failed(handle, connection, queued)  # a stray cancellation raised by the engine itself
        failure = f"{type(exc).__name__}: the engine failed on this command"
    finally:
        handle.current = None
        connection.end_request(queued.message_id, queued.scope)
        handle.touch()
        if not handle.stopped:
            handle.status = "idle"
    if not handle.stopped:
        handle.status = "failed"
    return EngineCommandResData(session_id=handle.session_id, status="failed", result=None, error=failure)


def _command_failed(handle: EngineHandle, connection: Connection, queued: QueuedCommand) -> None:
    logger.exception("engine %s (%s) failed on command %s", handle.engine_id, handle.engine_type,
                     queued.message_id, extra={"app_id": connection.app_id, "message_id": queued.message_id})


def core_handlers() -> list[HandlerSpec]:
    """The built-in message types, registered like custom ones."""
    return [
        make_spec("ping", PingData, ping, None),
        make_spec("create_session", CreateSessionData, create_session, None),
        make_spec("status", SessionRef, status, None),
        make_spec("close_session", SessionRef, close_session, None),
        make_spec("server_response", ServerResponseData, server_response, None),
        make_spec("server_pong", ServerResponseData, server_pong, None),
        make_spec("cancel", CancelData, cancel, None),
        make_spec("create_engine", CreateEngineData, create_engine, None),
        make_spec("engine_command", EngineCommandData, engine_command, None),
        make_spec("delete_engine", SessionRef, delete_engine, None),
    ]
