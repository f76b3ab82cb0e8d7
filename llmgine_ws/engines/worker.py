"""An engine attached to a session (:class:`EngineHandle`) and the worker that runs its commands,
one at a time, in arrival order."""

from __future__ import annotations

import logging
import math
import time
import uuid
from datetime import datetime
from typing import Literal

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..connection import Connection
from ..errors import AppDisconnected, ProtocolError, ServerRequestFailed, ServerRequestTimeout, ServerShuttingDown
from ..lifecycle import Host
from ..messaging import MessagingAPI
from ..metrics import Metrics
from ..protocol import EngineCommandResData, EngineEventData, EngineInfo, FrameEncoder, utcnow
from ..usercode import contained
from .api import Engine, EngineContext
from .coalescing import FlushScheduler

logger = logging.getLogger("llmgine_ws.engines")

EngineStatus = Literal["starting", "idle", "running", "stopped", "failed"]

EXPECTED_FAILURES: dict[type[Exception], str] = {
    ServerRequestTimeout: "the user did not answer in time",
    ServerShuttingDown: "the server is shutting down",
    ServerRequestFailed: "the client refused a request of the engine",
}
"""Outcomes of asking the user that end a command without being server errors: reported as such,
logged without a traceback."""


class QueuedCommand:
    """A command waiting for (or holding) its engine."""

    __slots__ = ("arrived", "command", "message_id", "scope")

    def __init__(self, message_id: str, command: object, scope: anyio.CancelScope) -> None:
        self.message_id = message_id
        self.command = command
        self.scope = scope
        self.arrived = time.monotonic()


class EngineHandle:
    """An engine attached to a session: its identity, status and command queue.

    The handle exists from the moment ``create_engine`` reserves the session's engine slot; its
    ``engine`` is set once the factory and ``start()`` succeeded. Commands that arrive meanwhile
    wait in the queue.
    """

    def __init__(self, engine_type: str, session_id: str) -> None:
        self.engine: Engine | None = None
        self.engine_id = str(uuid.uuid4())
        self.engine_type = engine_type
        self.session_id = session_id
        self.status: EngineStatus = "starting"
        self.last_activity_at: datetime = utcnow()
        self._last_activity = time.monotonic()
        self.stop_reason = ""
        self.stopped = False
        """Whether the engine takes no more commands (stopping or stopped)."""
        self.current: QueuedCommand | None = None
        self.queued = 0
        self.started = False
        """Whether the engine's ``start()`` returned (its commands can run)."""
        self.worker_started = False
        self.worker_done = anyio.Event()
        """Set when the command worker has exited."""
        self._commands_in: MemoryObjectSendStream[QueuedCommand]
        self.commands: MemoryObjectReceiveStream[QueuedCommand]
        # Unbounded here: every queued command counts against the connection's
        # ``max_inflight_requests``, which is what bounds the queue.
        self._commands_in, self.commands = anyio.create_memory_object_stream[QueuedCommand](math.inf)

    def info(self) -> EngineInfo:
        """The engine's part of ``status_res``."""
        return EngineInfo(engine_id=self.engine_id, engine_type=self.engine_type, status=self.status,
                          last_activity_at=self.last_activity_at)

    def touch(self) -> None:
        """Record activity (resets the idle clock)."""
        self.last_activity_at = utcnow()
        self._last_activity = time.monotonic()

    def idle_for(self, now: float) -> float:
        """Seconds with no command running or queued (0 while busy or starting)."""
        if self.current is not None or self.queued or not self.started:
            return 0.0
        return now - self._last_activity

    def submit(self, queued: QueuedCommand) -> None:
        """Queue a command in arrival order (the caller checked the engine is not stopped)."""
        self._commands_in.send_nowait(queued)
        self.queued += 1

    def close_queue(self, reason: str) -> None:
        """Accept no more commands; the worker answers what is still queued as cancelled."""
        if not self.stop_reason:
            self.stop_reason = reason
        self.stopped = True
        self._commands_in.close()
        if self.current is not None:
            self.current.scope.cancel()

    async def stop(self, timeout: float) -> None:
        """End the engine: cancel its commands, then run its ``stop()`` with a deadline.

        The running command gets ``timeout`` seconds to unwind, then ``stop()`` gets ``timeout``
        seconds; a failure or overrun is logged and cleanup goes on. Never raises.
        """
        self.close_queue("stopped")
        if self.status == "starting":
            return  # the create_engine starting it stops it as soon as its factory or start() returns
        with anyio.CancelScope(shield=True):
            if self.worker_started:
                with anyio.move_on_after(timeout) as waiting:
                    await self.worker_done.wait()
                if waiting.cancelled_caught:  # e.g. a command blocked in a thread: it cannot be cancelled
                    logger.error("engine %s (%s): its command did not stop within %.1fs; abandoned", self.engine_id,
                                 self.engine_type, timeout, extra={"session_id": self.session_id})
            if self.engine is not None:
                with anyio.move_on_after(timeout) as scope, contained(
                        logger, "engine %s (%s) failed to stop cleanly", self.engine_id, self.engine_type,
                        extra={"session_id": self.session_id}):
                    await self.engine.stop()
                if scope.cancelled_caught:
                    logger.error("engine %s (%s) did not stop within %.1fs; abandoned", self.engine_id,
                                 self.engine_type, timeout, extra={"session_id": self.session_id})
        self.status = "stopped"


class CommandWorker:
    """Runs an engine's commands one at a time, in arrival order, and answers each exactly once.

    Lives in the owning connection's task group, so a disconnect cancels it with everything else.
    """

    def __init__(self, handle: EngineHandle, connection: Connection, *, encoder: FrameEncoder,
                 messaging: MessagingAPI, metrics: Metrics | None, host: Host | None = None,
                 coalescing: FlushScheduler | None = None) -> None:
        self._host = host
        self._handle = handle
        self._coalescing = coalescing
        self._connection = connection
        self._encoder = encoder
        self._messaging = messaging
        self._metrics = metrics

    async def run(self) -> None:
        """Serve the queue until it is closed and drained (or the connection goes away)."""
        handle = self._handle
        try:
            async with handle.commands:
                async for queued in handle.commands:
                    reply, ctx = await self._run_command(queued)
                    try:
                        await ctx._finish()  # the command's pending tokens go out before its result
                    except AppDisconnected:
                        return
                    if not await self._answer(queued, reply):
                        return
        finally:
            handle.worker_done.set()

    async def _answer(self, queued: QueuedCommand, reply: EngineCommandResData) -> bool:
        try:
            frame = self._encoder.frame("engine_command_res", queued.message_id, reply)
        except Exception as exc:  # TypeError, msgspec.EncodeError, RecursionError (too deep)...
            logger.error("engine %s returned a result that is not JSON-serialisable: %s", self._handle.engine_id,
                         exc, extra={"app_id": self._connection.app_id, "message_id": queued.message_id})
            frame = self._encoder.frame("engine_command_res", queued.message_id, EngineCommandResData(
                session_id=self._handle.session_id, status="failed", result=None,
                error="the engine's result is not serialisable"))
        try:
            await self._connection.send(frame)
        except AppDisconnected:
            return False
        if self._metrics is not None:
            self._metrics.request_done("engine_command", time.monotonic() - queued.arrived)
        return True

    def _event(self, data: EngineEventData) -> str:
        return self._encoder.event("engine_event", data)

    async def _run_command(self, queued: QueuedCommand) -> tuple[EngineCommandResData, EngineContext]:
        """Run one command; returns its answer and its context (whose pending events go out first)."""
        handle, connection = self._handle, self._connection
        line = None
        if self._coalescing is not None:
            line = self._coalescing.line(connection, handle.session_id, queued.message_id, self._event)
        ctx = EngineContext(connection, handle.session_id, queued.message_id, encoder=self._encoder,
                            messaging=self._messaging, host=self._host, line=line)
        return await self._run_in(queued, ctx), ctx

    async def _run_in(self, queued: QueuedCommand, ctx: EngineContext) -> EngineCommandResData:
        handle, connection = self._handle, self._connection
        session_id = handle.session_id
        handle.queued -= 1
        handle.current = queued
        handle.status = "running"
        handle.touch()
        failure: str | None = None
        try:
            engine = handle.engine
            if engine is None or not handle.started:  # create_engine failed or was cancelled
                failure = f"the engine could not be started ({handle.stop_reason})"
                return EngineCommandResData(session_id=session_id, status="failed", result=None, error=failure)
            with queued.scope:
                if handle.stopped:
                    queued.scope.cancel()
                await anyio.lowlevel.checkpoint_if_cancelled()  # a command cancelled while queued never starts
                with contained(logger, "engine %s (%s) failed on command %s", handle.engine_id, handle.engine_type,
                               queued.message_id, extra={"app_id": connection.app_id,
                                                         "message_id": queued.message_id}) as outcome:
                    try:
                        result = await engine.handle_command(queued.command, ctx)
                    except ProtocolError as exc:  # the engine's own message for the client
                        failure = exc.message
                    except (ServerRequestTimeout, ServerShuttingDown, ServerRequestFailed) as exc:  # expected
                        failure = EXPECTED_FAILURES[type(exc)]
                        logger.info("engine %s (%s): command %s ended: %s", handle.engine_id, handle.engine_type,
                                    queued.message_id, failure,
                                    extra={"app_id": connection.app_id, "message_id": queued.message_id})
                    except AppDisconnected:
                        if not connection.closing:
                            raise  # another app went away and the engine did not handle it
                        failure = "the client disconnected"  # (undeliverable anyway)
                if outcome.failed:
                    failure = "the engine failed on this command"  # the class or text of the error may leak internals
                if failure is None:
                    return EngineCommandResData(session_id=session_id, status="completed", result=result)
            if failure is None:
                return EngineCommandResData(session_id=session_id, status="cancelled", result=None)
        finally:
            handle.current = None
            connection.end_request(queued.message_id, queued.scope)
            handle.touch()
            if not handle.stopped:
                handle.status = "idle"
        if not handle.stopped:
            handle.status = "failed"
        return EngineCommandResData(session_id=session_id, status="failed", result=None, error=failure)
