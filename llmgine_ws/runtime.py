"""The runtime of one app: its parts wired together, and its life — lifespan, background tasks,
connection cleanup and an orderly, bounded shutdown.

``create_app`` builds one :class:`Runtime` and hangs it off ``app.state.llmgine``; nothing lives at
module level, so two apps in one process share nothing.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal

from .audit import AuditLog
from .auth import Authenticator, authenticator_from_config
from .config import APIConfig
from .connection import WS_GOING_AWAY, WS_SERVICE_RESTART, Connection, DetachRequest
from .context import Services
from .dispatch import Dispatcher
from .engines import EngineManager
from .engines.coalescing import FlushScheduler
from .errors import ServerShuttingDown
from .extensions import Extensions
from .gate import HandshakeGate
from .handlers import CoreHandlers
from .hub import Hub
from .keepalive import KeepAlive
from .lifecycle import Host, Lifecycle, State
from .logconfig import install_fallback_handler
from .messaging import MessagingAPI
from .metrics import Metrics, metrics_available
from .protocol import FrameEncoder, NotificationData
from .resumption import Resumer
from .routing import MessageRouter
from .security import ConnectionCounter, TokenBucket
from .session_manager import SessionManager
from .sessions import SessionStore
from .usercode import run_callbacks
from .watch import StateWatch

logger = logging.getLogger("llmgine_ws.runtime")

SETTLE_TIMEOUT = 1.0
"""On shutdown, how long requests that were just cancelled (or whose server requests failed) get to
queue their answers before connections are closed."""


class Runtime:
    """Everything one app owns. Reach it with ``app.state.llmgine`` (or :func:`get_runtime`)."""

    def __init__(self, config: APIConfig, extensions: Extensions, *, hub: Hub, sessions: SessionStore,
                 message_router: MessageRouter, authenticator: Authenticator | None = None) -> None:
        self.config = config
        self.extensions = extensions
        self.lifecycle = Lifecycle()
        self.host = Host()
        """The app serving this one and where it is mounted (see :meth:`set_host`)."""
        self.metrics: Metrics | None = Metrics(self) if config.metrics and metrics_available() else None
        """Prometheus metrics (None without the ``metrics`` extra, or with ``metrics=False``)."""
        self.audit = AuditLog(self.metrics.observe_audit if self.metrics is not None else None)
        self.encoder = FrameEncoder(self.metrics)
        self.hub = hub
        self.sessions = sessions
        self.message_router = message_router
        self.connection_counter = ConnectionCounter(config.max_connections, config.max_connections_per_ip)
        self.watch = StateWatch()
        """Wait for a condition over the app's state: ``await runtime.watch.wait_for(predicate, timeout)``."""
        hub.listeners.append(self.watch)
        sessions.listeners.append(self.watch)
        self.messaging = MessagingAPI(
            message_router, self.encoder, default_timeout=config.server_request_timeout,
            broadcast_limit=TokenBucket(config.broadcast_rate_limit, config.broadcast_burst)
            if config.broadcast_rate_limit > 0 else None,
            user_of=self._user_of,
            audit=self.audit,
        )
        self.coalescing: FlushScheduler | None = None
        """Flushes coalesced token events (None when ``engine_event_coalesce_ms`` is 0)."""
        if config.engine_event_coalesce_ms > 0:
            self.coalescing = FlushScheduler(config.engine_event_coalesce_ms / 1000,
                                             batch_chars=config.engine_event_coalesce_bytes,
                                             max_frames=config.outbound_queue_size,
                                             max_chars=config.outbound_queue_bytes)
        self.engines = EngineManager(
            extensions.engine_factories, encoder=self.encoder, messaging=self.messaging, metrics=self.metrics,
            start_timeout=config.engine_start_timeout, stop_timeout=config.engine_stop_timeout,
            max_inflight_requests=config.max_inflight_requests, max_inflight_bytes=config.max_inflight_bytes,
            on_change=self.watch.notify, host=self.host, coalescing=self.coalescing)
        self.resumer = Resumer(config, hub=hub, engines=self.engines, encoder=self.encoder, lifecycle=self.lifecycle,
                               audit=self.audit, metrics=self.metrics, callbacks=extensions.connection_callbacks)
        """Detaches, expires and resumes apps (see docs/resume.md)."""
        self.gate = HandshakeGate(
            config, authenticator=authenticator if authenticator is not None else authenticator_from_config(config),
            counter=self.connection_counter, audit=self.audit, lifecycle=self.lifecycle, hub=hub, encoder=self.encoder,
            watch=self.watch, resumer=self.resumer)
        self.session_manager = SessionManager(
            sessions, self.engines, hub, encoder=self.encoder, audit=self.audit,
            max_per_connection=config.max_sessions_per_connection, max_per_ip=config.max_sessions_per_ip,
            max_per_user=config.max_sessions_per_user, callback_timeout=config.callback_timeout,
            on_created=extensions.session_callbacks["session_created"],
            on_destroyed=extensions.session_callbacks["session_destroyed"])
        self.services = Services(config, self.messaging, sessions, self.encoder, self.lifecycle, self.host)
        core = CoreHandlers(self.session_manager, resume=self.resumer.resume, ack=self.resumer.ack)
        self.dispatcher = Dispatcher([*core.specs(), *extensions.handlers.values()],
                                     self.services, audit=self.audit, metrics=self.metrics)
        extensions._bind(self.messaging)
        self.keepalive: KeepAlive | None = (KeepAlive(config.ping_interval, config.missed_pongs, self.encoder)
                                            if config.ping_interval > 0 else None)
        """Pings every socket of the app from one task in the lifespan (None: ``ping_interval`` is 0)."""
        self._reaper_running = False
        self._apps: anyio.abc.TaskGroup | None = None
        """The lifespan's task group, parent of every app's task group (None outside the lifespan)."""

    def set_host(self, host: Any, mount_path: str | None = None) -> None:
        """Record the app this one is mounted in (``ctx.host_app``, ``ctx.state``) and the mount path
        (found in the host's routes when not given); ``llmgine_ws.mount`` / ``llmgine_ws.lifespan`` call it."""
        own = self.services.app
        if host is None or host is own:
            return
        self.host.app = host
        if mount_path is None:
            mount_path = _mount_path(host, own)
        if mount_path is not None:
            self.host.mount_path = mount_path.rstrip("/")

    @property
    def ws_url_path(self) -> str:
        """The WebSocket endpoint's path as clients see it: the mount path (when known) + ``ws_path``."""
        return self.host.mount_path + self.config.ws_path

    @property
    def authenticator(self) -> Authenticator | None:
        """Who decides which clients may connect (None: anyone, as in the seed; a warning is logged)."""
        return self.gate.authenticator

    @property
    def stopping(self) -> anyio.Event:
        """Set when shutdown begins: long-running handlers may watch it (``ctx.stopping``) to wrap up."""
        return self.lifecycle.draining

    def _user_of(self, app_id: str) -> str | None:
        connection = self.hub.get(app_id)
        return connection.user_id if connection is not None else None

    # ------------------------------------------------------------------ connections

    async def on_connected(self, connection: Connection) -> None:
        """Run ``connect`` callbacks (in the connection's task group, so they may message the app)."""
        await run_callbacks(self.extensions.connection_callbacks["connect"], connection.app_id,
                            timeout=self.config.callback_timeout, log=logger)

    @property
    def apps_task_group(self) -> anyio.abc.TaskGroup | None:
        """Where apps' task groups live while the lifespan runs (so an app can outlive its socket)."""
        return self._apps

    def adopt(self, connection: Connection) -> bool:
        """Let ``connection``'s app outlive its socket: its task group will live in the lifespan's, made
        when its first task needs it (:meth:`host_app`); False outside the lifespan."""
        if self._apps is None:
            return False
        connection.start_task_group = self._start_app_task_group
        self.resumer.hosted.add(connection.app_id)
        if self.extensions.connection_callbacks["connect"]:  # no task for nothing to run
            connection.spawn(self.on_connected, connection)
        return True

    def _start_app_task_group(self, connection: Connection) -> None:
        if self._apps is None:
            raise RuntimeError("the lifespan is over")
        self._apps.start_soon(self.host_app, connection)

    async def host_app(self, connection: Connection, *,
                       task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run one app's task group (its handlers, engine workers, timers) until it is closed, then
        clean up after it. Started by :meth:`adopt`'s first task in the lifespan's task group (so the
        app may outlive its socket: resume), or by the endpoint's call (no lifespan: it ends with its socket).

        An app closed while it has a socket is cleaned up by that socket's endpoint (after its close
        frame, as in the seed); a detached one (window passed, buffer overflow) by this task.
        """
        try:
            async with anyio.create_task_group() as tg:
                connection.attach(tg)
                task_status.started()
                try:
                    await anyio.sleep_forever()
                finally:
                    connection.lose()
                    with anyio.CancelScope(shield=True):
                        if connection.closed.is_set():
                            pass  # cleaned up already (the group started as the app was closing)
                        elif connection.link is not None and not connection.link.remote:
                            await connection.closed.wait()  # the socket's endpoint cleans up, as in the seed
                        else:
                            await self.close_connection(connection)
        except Exception:  # never into the lifespan's task group
            logger.exception("app %s: its task group failed", connection.app_id, extra={"app_id": connection.app_id})
            connection.closed.set()

    async def close_connection(self, connection: Connection) -> None:
        """Clean up after a connection, in the seed's order. Never raises; always completes.

        Pending server requests fail → the app's sessions are found → their engines are stopped →
        the sessions are deleted → the connection is forgotten → ``disconnect`` callbacks run.
        """
        await self.session_manager.release(connection)
        self.hub.remove(connection)
        connection.outbox.close()  # producers still waiting for room learn the app is gone
        self.resumer.released(connection)
        self.gate.release(connection)
        await run_callbacks(self.extensions.connection_callbacks["disconnect"], connection.app_id,
                            timeout=self.config.callback_timeout, log=logger)
        connection.closed.set()
        logger.info("app %s disconnected (code %s)", connection.app_id, connection.close_code,
                    extra={"app_id": connection.app_id})

    # ------------------------------------------------------------------ lifespan

    @asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """The app's lifespan: background tasks up on entry; orderly shutdown on exit.

        When mounting the app inside another, give this to the host app (``lifespan=...``):
        Starlette does not run a mounted app's lifespan by itself.
        """
        if self.lifecycle.state is not State.CREATED:
            raise RuntimeError("this app's lifespan is already running (or has run): run it once, either with "
                               "llmgine_ws.mount(...) / llmgine_ws.lifespan(...) or by hand, not both")
        self.set_host(app)  # the host app, when its lifespan runs this one
        install_fallback_handler(self.config.log_format, "debug" if self.config.debug else self.config.log_level)
        async with anyio.create_task_group() as tg:
            portal = await tg.start(_serve_portal)
            self.messaging._bind_portal(portal)
            await tg.start(self._reap_forever)
            await tg.start(self.message_router.run)
            await tg.start(self._shut_down_on_signal)
            if self.coalescing is not None:
                await tg.start(self.coalescing.run)
            if self.keepalive is not None:
                await tg.start(self.keepalive.run)
            logger.info("llmgine_ws WebSocket endpoint at %s", self.ws_url_path)
            self._apps = tg
            if self.authenticator is None:
                logger.warning("no authenticator configured: any client that can reach %s may connect (set "
                               "LLMGINE_API_KEYS, LLMGINE_API_TOKEN_SECRET or LLMGINE_API_JWT_KEY)",
                               self.ws_url_path)
            self.lifecycle.start()
            try:
                yield
            finally:
                self.messaging._bind_portal(None)
                with anyio.CancelScope(shield=True):
                    await self.shutdown()
                self._apps = None
                tg.cancel_scope.cancel()

    async def shutdown(self) -> None:
        """Shut down in order, within a bounded time (idempotent; concurrent callers wait for the first).

        1. Readiness turns 503 and new handshakes are refused; clients get a ``server_shutting_down``
           notification, and new requests get ``SHUTTING_DOWN`` (answers to server requests and
           ``cancel`` still go through).
        2. Running handlers and engine commands get ``drain_timeout`` seconds to finish.
        3. Pending server requests fail with ``ServerShuttingDown`` (each client is told to drop the
           question) and requests still running are cancelled; for up to ``SETTLE_TIMEOUT`` their
           answers (``engine_command_res``, ``CANCELLED``) get queued; then every connection is closed
           with 1001 after its queued frames; cleanup stops engines (each within ``engine_stop_timeout``).
        4. Connections still open after ``shutdown_timeout`` are cut off (closed without flushing).

        So it takes at most ``drain_timeout + SETTLE_TIMEOUT + shutdown_timeout`` seconds; under the CLI
        uvicorn's own shutdown adds at most 2 more (``llmgine_ws.transport.UVICORN_GRACEFUL_TIMEOUT``).
        """
        if not self.lifecycle.begin_draining():
            await self.lifecycle.wait_stopped()
            return
        drain = self.config.drain_timeout
        logger.info("shutting down: draining %d connection(s) for up to %.1fs", len(self.hub), drain)
        for connection in self.hub:
            movable = self.resumer.movable(connection)
            extra: dict[str, Any] = {"drain_seconds": drain, "resume": True} if movable else {"drain_seconds": drain}
            data = NotificationData(notification_type="server_shutting_down", message="the server is restarting",
                                    additional_data=extra)
            connection.send_nowait(self.encoder.event("notification", data))
            if movable:  # in a cluster: the socket goes (1012) after the notice, the app stays resumable elsewhere
                request = DetachRequest(WS_SERVICE_RESTART, "server restarting: resume on another node")
                if not connection.outbox.put_nowait(request):
                    connection.drop_link(request.code, request.reason)
        self.resumer.drain_remote()
        with anyio.move_on_after(drain) as draining:
            for connection in self.hub:
                await connection.wait_idle()
        if draining.cancelled_caught:
            busy = sum(len(c.in_flight) for c in self.hub)
            logger.warning("drain period over with %d request(s) still running; they are cancelled", busy)
        for connection in self.hub:
            connection.fail_pending(ServerShuttingDown)
            for scope in connection.in_flight.values():
                scope.cancel()
        with anyio.move_on_after(SETTLE_TIMEOUT):  # the answers of what was just failed or cancelled
            await self.watch.wait_for(lambda: not any(c.in_flight for c in self.hub), SETTLE_TIMEOUT * 2)
        for connection in self.hub:
            connection.close(WS_GOING_AWAY, "server shutting down", flush=True)
        with anyio.move_on_after(self.config.shutdown_timeout) as closing:
            await self.hub.wait_empty()
        if closing.cancelled_caught:
            logger.error("%d connection(s) still open after %.1fs of shutdown; cut off", len(self.hub),
                         self.config.shutdown_timeout)
            for connection in self.hub:
                connection.close(WS_GOING_AWAY, "server shutting down")
        self.lifecycle.stop()

    async def _shut_down_on_signal(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                                   ) -> None:
        """Run :meth:`shutdown` on SIGTERM/SIGINT *before* the server closes its sockets, then hand the
        signal to whoever handled it before us (uvicorn: it then stops with nothing left to cut off).

        uvicorn's own shutdown closes every WebSocket (1012) before the lifespan ends, which would
        leave nothing to drain. A second signal during the drain goes straight to the previous handler.
        """
        signals = (signal.SIGTERM, signal.SIGINT)
        if not self.config.handle_signals or threading.current_thread() is not threading.main_thread():
            task_status.started()
            return
        previous = {signum: signal.getsignal(signum) for signum in signals}
        try:
            with anyio.open_signal_receiver(*signals) as received:
                task_status.started()
                signum = await received.__anext__()
        finally:
            for restored, handler in previous.items():  # the receiver leaves SIG_DFL behind on asyncio
                signal.signal(restored, handler)
        logger.info("received %s", signal.Signals(signum).name)
        with anyio.CancelScope(shield=True):
            await self.shutdown()
        handler = previous[signum]
        if callable(handler):
            handler(signum, None)
        else:
            signal.raise_signal(signum)

    # ------------------------------------------------------------------ health

    def readiness(self) -> tuple[bool, list[str]]:
        """Whether to take traffic, and if not, why."""
        problems = []
        state = self.lifecycle.state
        if state is State.DRAINING or state is State.STOPPED:
            problems.append("shutting down")
        elif state is State.CREATED:
            problems.append("not started (lifespan not running)")
        elif not self._reaper_running:
            problems.append("session reaper is not running")
        problems.extend(self.message_router.health_problems())
        return not problems, problems

    def live_counts(self) -> Mapping[str, int]:
        """Live figures for ``/health/ready`` and the metrics."""
        return {
            "connections": len(self.hub),
            "sessions": len(self.sessions),
            "engines": self.engines.running(),
            "pending_server_requests": self.hub.pending_request_count(),
            "ready": int(self.readiness()[0]),
            "detached_apps": self.resumer.detached_count,
            "resume_buffer_bytes": self.resumer.budget.used,
            "resume_buffer_evictions": self.resumer.budget.evictions,
            **self.resumer.remote_counts(),
        }

    @property
    def background_tasks_alive(self) -> bool:
        """Whether the lifespan's background tasks (the session reaper) are running."""
        return self._reaper_running

    async def _reap_forever(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._reaper_running = True
        task_status.started()
        try:
            while True:
                await anyio.sleep(self.config.session_reap_interval)
                try:
                    await self.reap()
                except Exception:
                    logger.exception("session reaper pass failed; retrying next interval")
        finally:
            self._reaper_running = False

    async def reap(self) -> None:
        """One reaper pass: close expired sessions and stop idle engines (each client is told)."""
        await self.session_manager.reap(self.config.session_timeout, self.config.engine_idle_timeout)


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


def _mount_path(host: Any, target: Any, prefix: str = "", depth: int = 0) -> str | None:
    """The path ``target`` is mounted at inside ``host`` (nested mounts followed), or None."""
    if depth > 8:
        return None
    for route in getattr(host, "routes", None) or []:
        path = getattr(route, "path", None)
        app = getattr(route, "app", None)
        if path is None or app is None or not hasattr(route, "routes"):
            continue  # not a Mount
        if app is target:
            return prefix + str(path)
        found = _mount_path(app, target, prefix + path, depth + 1)
        if found is not None:
            return found
    return None
