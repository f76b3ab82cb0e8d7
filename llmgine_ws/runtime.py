"""The state of one app instance and its lifecycle: connections, sessions, engines, shutdown.

``create_app`` builds one :class:`Runtime` and hangs it off ``app.state.llmgine``; nothing lives at
module level, so two apps in one process share nothing.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal
from starlette.websockets import WebSocket

from .backplane import Backplane
from .backplane.cluster import build_router
from .config import APIConfig
from .connection import WS_GOING_AWAY, Connection
from .dispatch import Dispatcher
from .errors import AppDisconnected, ServerShuttingDown
from .extensions import Extensions
from .handlers import core_handlers
from .hub import Hub
from .messaging import MessagingAPI
from .protocol import ConnectedData, FrameEncoder, NotificationData, new_message_id
from .routing import Router
from .sessions import Session, SessionStore

logger = logging.getLogger("llmgine_ws.runtime")

SUBPROTOCOL = "llmgine.v1"
"""Selected when the client offers it. Browsers that offer subprotocols (e.g. to carry a token)
fail the handshake unless the server selects one of them."""


class Runtime:
    """Everything one app owns. Reach it with ``app.state.llmgine`` (or :func:`get_runtime`)."""

    def __init__(self, config: APIConfig, extensions: Extensions, backplane: Backplane | None = None) -> None:
        self.config = config
        self.extensions = extensions
        self.encoder = FrameEncoder()
        self.hub = Hub()
        self.sessions = SessionStore(config.max_sessions)
        self.router: Router = build_router(config, self.hub, self.sessions, backplane)
        self.messaging = MessagingAPI(self.router, self.encoder, default_timeout=config.server_request_timeout)
        self.dispatcher = Dispatcher(self, [*core_handlers(), *extensions.handlers.values()])
        extensions._bind(self.messaging)
        self.started = False
        """True while the lifespan runs (background tasks up, not shutting down)."""
        self.shutting_down = False
        self._reaper_alive = False
        self._warned_no_lifespan = False

    # ------------------------------------------------------------------ connections

    async def open_connection(self, websocket: WebSocket, principal: Any = None) -> Connection | None:
        """Accept and register a connection and greet it; None if the server refuses it."""
        if self.shutting_down:
            await websocket.close(code=WS_GOING_AWAY, reason="server shutting down")
            return None
        if not self.started and not self._warned_no_lifespan:
            self._warned_no_lifespan = True
            logger.warning("the app's lifespan is not running: session expiry, idle-engine stops and the blocking "
                           "messaging API are off (when mounting, pass the app's lifespan to the host app)")
        offered = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        connection = Connection(
            str(uuid.uuid4()),
            websocket,
            queue_size=self.config.outbound_queue_size,
            send_grace=self.config.send_grace,
            principal=principal,
        )
        self.hub.add(connection)
        connection.send_nowait(self.encoder.frame(
            "connected", new_message_id(), ConnectedData(app_id=connection.app_id), server_initiated=True))
        logger.info("app %s connected from %s", connection.app_id, connection.client_address,
                    extra={"app_id": connection.app_id})
        return connection

    async def on_connected(self, connection: Connection) -> None:
        """Run ``connect`` callbacks (in the connection's task group, so they may message the app)."""
        await self._run_callbacks(self.extensions.connection_callbacks["connect"], connection.app_id)

    def connection_lost(self, connection: Connection) -> None:
        """First, synchronous step of cleanup: nothing new may attach, and waiters fail right away."""
        connection.closing = True
        connection.fail_pending(AppDisconnected)

    async def close_connection(self, connection: Connection) -> None:
        """Clean up after a connection, in the seed's order. Never raises; always completes.

        Pending server requests fail → the app's sessions are found → their engines are stopped →
        the sessions are deleted → the connection is forgotten → ``disconnect`` callbacks run.
        """
        self.connection_lost(connection)
        sessions = [s for s in (self.sessions.get(sid) for sid in list(connection.session_ids)) if s is not None]
        async with anyio.create_task_group() as tg:
            for session in sessions:
                if session.engine is not None:
                    tg.start_soon(self.stop_engine, session, "disconnected")
        for session in sessions:
            await self.destroy_session(session, reason="disconnected")
        self.hub.remove(connection)
        await self._run_callbacks(self.extensions.connection_callbacks["disconnect"], connection.app_id)
        connection.closed.set()
        logger.info("app %s disconnected (code %s)", connection.app_id, connection.close_code,
                    extra={"app_id": connection.app_id})

    # ------------------------------------------------------------------ sessions & engines

    async def create_session(self, connection: Connection) -> Session:
        """Create a session owned by ``connection`` and run ``session_created`` callbacks."""
        session = self.sessions.create(connection.app_id)
        connection.session_ids.add(session.session_id)
        await self._run_callbacks(self.extensions.session_callbacks["session_created"], session)
        return session

    async def destroy_session(self, session: Session, reason: str) -> None:
        """Stop the session's engine, delete the session, run ``session_destroyed`` callbacks.

        Idempotent: a session already destroyed (by another path) is left alone.
        """
        if self.sessions.remove(session.session_id) is None:
            return
        connection = self.hub.get(session.app_id)
        if connection is not None:
            connection.session_ids.discard(session.session_id)
        if session.engine is not None:
            await self.stop_engine(session, reason)
        await self._run_callbacks(self.extensions.session_callbacks["session_destroyed"], session)
        logger.info("session %s destroyed (%s)", session.session_id, reason,
                    extra={"app_id": session.app_id, "session_id": session.session_id})

    async def stop_engine(self, session: Session, reason: str) -> None:
        """Stop the session's engine with the configured deadline (idempotent, never raises)."""
        handle = session.engine
        if handle is None or handle.status == "stopped":
            return
        if not handle.stop_reason:
            handle.stop_reason = reason
        await handle.stop_engine(self.config.engine_stop_timeout)

    # ------------------------------------------------------------------ lifespan

    @asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """The app's lifespan: background tasks up on entry; orderly shutdown on exit.

        When mounting the app inside another, give this to the host app (``lifespan=...``):
        Starlette does not run a mounted app's lifespan by itself.
        """
        if self.started:
            raise RuntimeError("this app's lifespan is already running")
        async with anyio.create_task_group() as tg:
            portal = await tg.start(_serve_portal)
            self.messaging._bind_portal(portal)
            await tg.start(self._reap_forever)
            await tg.start(self.router.run)
            self.started = True
            try:
                yield
            finally:
                self.messaging._bind_portal(None)
                with anyio.CancelScope(shield=True):
                    await self.shutdown()
                tg.cancel_scope.cancel()

    async def shutdown(self) -> None:
        """Refuse new connections, fail pending requests, close every connection (1001), bounded."""
        self.shutting_down = True
        self.started = False
        for connection in self.hub:
            connection.fail_pending(ServerShuttingDown)
            connection.close(WS_GOING_AWAY, "server shutting down", flush=True)
        with anyio.move_on_after(self.config.shutdown_timeout) as scope:
            await self.hub.wait_empty()
        if scope.cancelled_caught:
            logger.error("%d connection(s) still open after %.1fs of shutdown", len(self.hub),
                         self.config.shutdown_timeout)

    @property
    def background_tasks_alive(self) -> bool:
        """Whether the lifespan's background tasks (the session reaper) are running."""
        return self._reaper_alive

    def readiness(self) -> tuple[bool, list[str]]:
        """Whether to take traffic, and if not, why."""
        problems = []
        if self.shutting_down:
            problems.append("shutting down")
        elif not self.started:
            problems.append("not started (lifespan not running)")
        elif not self._reaper_alive:
            problems.append("session reaper is not running")
        problems.extend(self.router.health_problems())
        return not problems, problems

    async def _reap_forever(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._reaper_alive = True
        task_status.started()
        try:
            while True:
                await anyio.sleep(self.config.session_reap_interval)
                try:
                    await self.reap()
                except Exception:
                    logger.exception("session reaper pass failed; retrying next interval")
        finally:
            self._reaper_alive = False

    async def reap(self) -> None:
        """One reaper pass: close expired sessions and stop idle engines (each client is told)."""
        for session in self.sessions.expired(self.config.session_timeout):
            self._notify(session, "session_expired", "the session expired after inactivity")
            await self.destroy_session(session, reason="expired")
        now = time.monotonic()
        for session in list(self.sessions):
            handle = session.engine
            if handle is not None and not handle.stopped and handle.idle_for(now) > self.config.engine_idle_timeout:
                await self.stop_engine(session, reason="idle")
                self._notify(session, "engine_stopped", "the engine was stopped after inactivity",
                             {"engine_id": handle.engine_id, "reason": "idle"})

    def _notify(self, session: Session, kind: str, message: str, extra: dict[str, Any] | None = None) -> None:
        connection = self.hub.get(session.app_id)
        if connection is not None:
            data = NotificationData(notification_type=kind, message=message, additional_data=extra,
                                    session_id=session.session_id)
            connection.send_nowait(self.encoder.frame("notification", new_message_id(), data, server_initiated=True))

    async def _run_callbacks(self, callbacks: Sequence[Callable[..., Awaitable[None]]], *args: Any) -> None:
        for callback in callbacks:
            with anyio.move_on_after(self.config.callback_timeout) as scope:
                try:
                    await callback(*args)
                except Exception:
                    logger.exception("callback %r failed; cleanup continues", callback)
            if scope.cancelled_caught:
                logger.error("callback %r did not finish within %.1fs; abandoned", callback,
                             self.config.callback_timeout)


async def _serve_portal(*, task_status: anyio.abc.TaskStatus[BlockingPortal] = anyio.TASK_STATUS_IGNORED) -> None:
    """Host a blocking portal for worker threads until cancelled (pending calls are cancelled too)."""
    async with BlockingPortal() as portal:
        task_status.started(portal)
        try:
            await anyio.sleep_forever()
        finally:
            await portal.stop(cancel_remaining=True)


def get_runtime(app: Any) -> Runtime:
    """The :class:`Runtime` of an app made by :func:`llmgine_ws.create_app`."""
    runtime = getattr(app.state, "llmgine", None)
    if not isinstance(runtime, Runtime):
        raise LookupError("this app was not made by llmgine_ws.create_app")
    return runtime
