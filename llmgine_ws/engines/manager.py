"""The engines of one app: which session has which engine, and their whole life — create (factory,
``start()``), commands, idle stops, delete and stop."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from ..connection import Connection
from ..errors import ErrorCode, ProtocolError
from ..lifecycle import Host
from ..messaging import MessagingAPI
from ..metrics import Metrics
from ..protocol import FrameEncoder
from ..sessions import Session
from ..usercode import contained
from .api import Engine, EngineFactory
from .coalescing import FlushScheduler
from .worker import CommandWorker, EngineHandle, QueuedCommand

logger = logging.getLogger("llmgine_ws.engines")


class EngineManager:
    """Every engine of one app, by session id (a session has at most one)."""

    def __init__(self, factories: Mapping[str, EngineFactory], *, encoder: FrameEncoder, messaging: MessagingAPI,
                 metrics: Metrics | None, start_timeout: float, stop_timeout: float,
                 max_inflight_requests: int, max_inflight_bytes: int = 0,
                 on_change: Callable[[], None] = lambda: None, host: Host | None = None,
                 coalescing: FlushScheduler | None = None) -> None:
        self._host = host
        self._factories = factories
        self._coalescing = coalescing
        self._encoder = encoder
        self._messaging = messaging
        self._metrics = metrics
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._max_inflight = max_inflight_requests
        self._max_inflight_bytes = max_inflight_bytes
        self._engines: dict[str, EngineHandle] = {}
        self._on_change = on_change

    def get(self, session_id: str) -> EngineHandle | None:
        """The session's engine (starting, running or stopped), if it has one."""
        return self._engines.get(session_id)

    def live(self, session_id: str) -> EngineHandle:
        """The session's engine if it takes commands; else ``ENGINE_NOT_FOUND`` for the client."""
        handle = self._engines.get(session_id)
        if handle is None or handle.stopped:
            details: dict[str, Any] = {"session_id": session_id}
            message = "this session has no engine"
            if handle is not None:
                message = f"this session's engine was stopped ({handle.stop_reason}); create a new one"
                details["engine_id"] = handle.engine_id
            raise ProtocolError(ErrorCode.ENGINE_NOT_FOUND, message, details)
        return handle

    def reserve(self, session: Session, engine_type: str) -> EngineHandle:
        """Take the session's engine slot for a new engine of ``engine_type`` (see :meth:`start`).

        Synchronous, so it runs when ``create_engine`` is dispatched: a second ``create_engine`` for the
        session gets ``ENGINE_EXISTS`` instead of running another factory, and an ``engine_command``
        pipelined right behind it finds the engine (starting) and waits for it instead of failing.
        """
        current = self._engines.get(session.session_id)
        if current is not None and not current.stopped:
            raise ProtocolError(ErrorCode.ENGINE_EXISTS, "this session already has an engine; delete it first",
                                {"session_id": session.session_id, "engine_id": current.engine_id})
        if engine_type not in self._factories:
            raise ProtocolError(ErrorCode.INVALID_ENGINE_TYPE, f"unknown engine type {engine_type!r}",
                                {"engine_type": engine_type, "registered_types": sorted(self._factories)})
        handle = self._engines[session.session_id] = EngineHandle(engine_type, session.session_id)
        self._on_change()
        return handle

    async def start(self, handle: EngineHandle, session: Session | None, connection: Connection,
                    config: dict[str, Any]) -> None:
        """Make and start the reserved engine; its worker then runs in ``connection``'s task group.

        Raises ``ENGINE_CREATION_FAILED`` with the step that failed (never the error itself: it may
        hold internals); every failure leaves through :meth:`_discard`.
        """
        step = "factory"
        if session is None or handle.stopped:
            await self._discard(handle, connection, "the session went away")
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "session not found", {"session_id": handle.session_id})
        failure: str | None = None
        timed_out = False
        try:
            with anyio.fail_after(self._start_timeout), contained(
                    logger, "engine %r failed to start for session %s", handle.engine_type, session.session_id,
                    extra={"app_id": connection.app_id}) as outcome:
                made = self._factories[handle.engine_type](session, dict(config))
                engine: Engine = await made if inspect.isawaitable(made) else made
                handle.engine = engine
                step = "start"
                await engine.start()
                handle.started = True
            if outcome.failed:
                failure = f"its {step} failed"
        except TimeoutError:
            timed_out = True
            failure = f"its {step} timed out after {self._start_timeout:g}s"
            logger.error("engine %r for session %s: %s", handle.engine_type, handle.session_id, failure,
                         extra={"app_id": connection.app_id})
        except BaseException:  # really cancelled (the client cancelled create_engine, or went away)
            await self._discard(handle, connection, "cancelled while starting")
            raise
        if failure is None and (connection.closing or handle.stopped):
            failure = "the session went away while it was starting"
        if failure is None:
            handle.status = "idle"
            if connection.spawn(self._worker(handle, connection).run):
                handle.worker_started = True
            else:
                failure = "the connection went away"
        if failure is not None:
            await self._discard(handle, connection, failure)
            raise ProtocolError(ErrorCode.ENGINE_CREATION_FAILED, f"engine {handle.engine_type!r} could not be "
                                f"created: {failure}", {"engine_type": handle.engine_type, "step": step,
                                                        "timed_out": timed_out})
        self._on_change()

    async def _discard(self, handle: EngineHandle, connection: Connection, reason: str) -> None:
        """The one way out of a failed create: answer the commands that queued up while it was
        starting, stop what was made (its ``stop()`` releases what ``start()`` opened), free the slot."""
        handle.status = "failed"
        handle.close_queue(reason)
        if not handle.worker_started and connection.spawn(self._worker(handle, connection).run):
            handle.worker_started = True
        with anyio.CancelScope(shield=True):
            await handle.stop(self._stop_timeout)
        if self._engines.get(handle.session_id) is handle:
            del self._engines[handle.session_id]
        self._on_change()

    def _worker(self, handle: EngineHandle, connection: Connection) -> CommandWorker:
        return CommandWorker(handle, connection, encoder=self._encoder, messaging=self._messaging,
                             metrics=self._metrics, host=self._host, coalescing=self._coalescing)

    def submit(self, connection: Connection, session_id: str, message_id: str, command: object,
               cost: int = 0) -> None:
        """Queue a command for the session's engine (in arrival order; it may still be starting).

        The command counts against the connection's requests in flight (``max_inflight_requests``) and
        the bytes they hold (``max_inflight_bytes``, with ``cost`` its estimated decoded size) until it
        is answered: that is what bounds the queue.
        """
        handle = self.live(session_id)
        scope = connection.begin_request(message_id, self._max_inflight, cost, self._max_inflight_bytes)
        handle.submit(QueuedCommand(message_id, command, scope))

    async def stop(self, session_id: str, reason: str, *, forget: bool = True) -> EngineHandle | None:
        """Stop the session's engine (idempotent; never raises); returns it if there was one.

        With ``forget=False`` the stopped engine stays attached, so commands learn why it stopped.
        """
        handle = self._engines.get(session_id)
        if handle is None:
            return None
        if forget:
            del self._engines[session_id]
        if not handle.stop_reason:
            handle.stop_reason = reason
        if handle.status != "stopped":
            await handle.stop(self._stop_timeout)
        self._on_change()
        return handle

    def running(self) -> int:
        """Engines that take commands (starting, idle or running)."""
        return sum(1 for handle in self._engines.values() if not handle.stopped)

    async def stop_idle(self, idle_timeout: float) -> list[EngineHandle]:
        """Stop the engines idle for longer than ``idle_timeout`` seconds; returns them."""
        now = time.monotonic()
        idle = [h for h in self._engines.values() if not h.stopped and h.idle_for(now) > idle_timeout]
        for handle in idle:
            await self.stop(handle.session_id, "idle", forget=False)
        return idle
