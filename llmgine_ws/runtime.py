"""The state of one app instance and its lifecycle: connections, sessions, engines, shutdown.

``create_app`` builds one :class:`Runtime` and hangs it off ``app.state.llmgine``; nothing lives at
module level, so two apps in one process share nothing.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio
from anyio.from_thread import BlockingPortal
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

from .audit import AuditLog
from .auth import (
    APIKeyAuthenticator,
    AuthenticationFailed,
    Authenticator,
    Handshake,
    JWTAuthenticator,
    Principal,
    TokenAuthenticator,
    any_of,
)
from .backplane import Backplane
from .backplane.cluster import build_router
from .config import APIConfig
from .connection import WS_GOING_AWAY, Connection
from .dispatch import Dispatcher
from .errors import AppDisconnected, ErrorCode, ProtocolError, ServerShuttingDown, being_cancelled
from .extensions import Extensions
from .handlers import core_handlers
from .hub import Hub
from .messaging import MessagingAPI
from .metrics import Metrics, metrics_available
from .protocol import ConnectedData, FrameEncoder, NotificationData, new_message_id
from .routing import Router
from .security import (
    ConnectionCounter,
    RateLimiter,
    TokenBucket,
    origin_allowed,
    parse_networks,
    resolve_client_ip,
)
from .sessions import Session, SessionStore

logger = logging.getLogger("llmgine_ws.runtime")

SUBPROTOCOL = "llmgine.v1"
"""Selected when the client offers it. Browsers that offer subprotocols (e.g. to carry a token)
fail the handshake unless the server selects one of them."""


class Runtime:
    """Everything one app owns. Reach it with ``app.state.llmgine`` (or :func:`get_runtime`)."""

    def __init__(self, config: APIConfig, extensions: Extensions, authenticator: Authenticator | None = None,
                 backplane: Backplane | None = None) -> None:
        self.config = config
        self.extensions = extensions
        self.metrics: Metrics | None = Metrics(self) if config.metrics and metrics_available() else None
        """Prometheus metrics (None without the ``metrics`` extra, or with ``metrics=False``)."""
        self.audit = AuditLog(self.metrics)
        self.authenticator = authenticator if authenticator is not None else authenticator_from_config(config)
        """Decides who may connect (None: anyone, as in the seed — a warning is logged at startup)."""
        self.connection_counter = ConnectionCounter(config.max_connections, config.max_connections_per_ip)
        self._trusted_proxies = parse_networks(config.trusted_proxies)
        self.encoder = FrameEncoder(self.metrics)
        self.hub = Hub()
        self.sessions = SessionStore(config.max_sessions)
        self.router: Router = build_router(config, self.hub, self.sessions, backplane)
        self.messaging = MessagingAPI(
            self.router, self.encoder, default_timeout=config.server_request_timeout,
            broadcast_limit=TokenBucket(config.broadcast_rate_limit, config.broadcast_burst)
            if config.broadcast_rate_limit > 0 else None,
            user_of=self._user_of,
            audit=self.audit,
        )
        self.dispatcher = Dispatcher(self, [*core_handlers(), *extensions.handlers.values()])
        extensions._bind(self.messaging)
        self.started = False
        """True while the lifespan runs (background tasks up, not shutting down)."""
        self.shutting_down = False
        self._shutdown: anyio.Event | None = None
        self.stopping = anyio.Event()
        """Set when shutdown begins: long-running handlers may watch it to wrap up early."""
        self._reaper_alive = False
        self._warned_no_lifespan = False

    # ------------------------------------------------------------------ connections

    async def open_connection(self, websocket: WebSocket) -> Connection | None:
        """Run the handshake gate, then accept, register and greet; None if the connection is refused.

        Before anything is accepted: shutdown, ``Origin``, connection caps, then authentication. A
        refused handshake gets an HTTP status (403, 429 or 503) and leaves nothing registered.
        """
        scope = websocket.scope
        client_ip = resolve_client_ip(scope, self._trusted_proxies)
        origin = websocket.headers.get("origin")
        if self.shutting_down:
            await _refuse(websocket, 503, "SHUTTING_DOWN", "the server is shutting down")
            return None
        if not origin_allowed(scope, self.config.allowed_origins):
            self.audit("handshake_refused", level=logging.WARNING, reason="origin not allowed", origin=origin,
                  client_ip=client_ip)
            await _refuse(websocket, 403, "FORBIDDEN", "origin not allowed")
            return None
        cap = self.connection_counter.refusal(client_ip)
        if cap is not None:
            self.audit("limit_hit", level=logging.WARNING, limit="connections", reason=cap[1], client_ip=client_ip)
            await _refuse(websocket, cap[0], "CONNECTION_LIMIT", cap[1])
            return None
        self.connection_counter.add(client_ip)  # counted before any await: concurrent handshakes see it
        try:
            principal = await self._authenticate(websocket, client_ip, origin)
            if principal is False:
                await _refuse(websocket, 403, "FORBIDDEN", "authentication failed")
                self.connection_counter.remove(client_ip)
                return None
            offered = scope.get("subprotocols") or []
            await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        except BaseException:
            self.connection_counter.remove(client_ip)
            raise
        if not self.started and not self._warned_no_lifespan:
            self._warned_no_lifespan = True
            logger.warning("the app's lifespan is not running: session expiry, idle-engine stops and the blocking "
                           "messaging API are off (when mounting, pass the app's lifespan to the host app)")
        connection = Connection(
            str(uuid.uuid4()),
            websocket,
            queue_size=self.config.outbound_queue_size,
            send_grace=self.config.send_grace,
            principal=principal,
            client_ip=client_ip,
            audit=self.audit,
        )
        if self.config.rate_limit > 0:
            connection.rate_limiter = RateLimiter(self.config.rate_limit, self.config.rate_burst,
                                                  self.config.rate_limit_strikes)
        self.hub.add(connection)
        connection.send_nowait(self.encoder.frame(
            "connected", new_message_id(), ConnectedData(app_id=connection.app_id), server_initiated=True))
        logger.info("app %s connected from %s", connection.app_id, client_ip, extra={"app_id": connection.app_id})
        return connection

    async def _authenticate(self, websocket: WebSocket, client_ip: str | None, origin: str | None
                            ) -> Principal | Literal[False] | None:
        """The principal; None when no authenticator is configured; False when refused."""
        if self.authenticator is None:
            return None
        handshake = Handshake(websocket.scope, client_ip=client_ip, allow_query_token=self.config.allow_query_token)
        reason = "refused"
        principal: Principal | None = None
        try:
            with anyio.fail_after(self.config.callback_timeout):
                principal = await self.authenticator(handshake)
        except AuthenticationFailed as exc:
            reason = exc.reason
        except TimeoutError:
            reason = "authenticator timed out"
        except Exception:
            logger.exception("the authenticator raised; refusing the handshake")
            reason = "authenticator error"
        if principal is None:
            self.audit("auth", level=logging.WARNING, outcome="refused", reason=reason, carrier=handshake.carrier,
                  client_ip=client_ip, origin=origin)
            return False
        self.audit("auth", outcome="accepted", user_id=principal.user_id, method=principal.method,
              carrier=handshake.carrier, client_ip=client_ip, origin=origin)
        return principal

    def _user_of(self, app_id: str) -> str | None:
        connection = self.hub.get(app_id)
        return connection.user_id if connection is not None else None

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
        connection.outbox.close()  # producers still waiting for room learn the app is gone
        self.connection_counter.remove(connection.client_ip)
        await self._run_callbacks(self.extensions.connection_callbacks["disconnect"], connection.app_id)
        connection.closed.set()
        logger.info("app %s disconnected (code %s)", connection.app_id, connection.close_code,
                    extra={"app_id": connection.app_id})

    # ------------------------------------------------------------------ sessions & engines

    async def create_session(self, connection: Connection) -> Session:
        """Create a session owned by ``connection`` and run ``session_created`` callbacks."""
        limit = self.config.max_sessions_per_connection
        if len(connection.session_ids) >= limit:
            self.audit("limit_hit", level=logging.WARNING, limit="sessions_per_connection", app_id=connection.app_id,
                  user_id=connection.user_id)
            raise ProtocolError(ErrorCode.SESSION_LIMIT_REACHED, f"a connection may hold at most {limit} sessions",
                                {"max_sessions_per_connection": limit})
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
        # Gone from the store, the session is destroyed all the way even if the caller is cancelled
        # (e.g. a close_session whose client disconnects): each step below has its own deadline.
        with anyio.CancelScope(shield=True):
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
            await tg.start(self._shut_down_on_signal)
            if self.authenticator is None:
                logger.warning("no authenticator configured: any client that can reach %s may connect (set "
                               "LLMGINE_API_KEYS, LLMGINE_API_TOKEN_SECRET or LLMGINE_API_JWT_KEY)",
                               self.config.ws_path)
            self.started = True
            try:
                yield
            finally:
                self.messaging._bind_portal(None)
                with anyio.CancelScope(shield=True):
                    await self.shutdown()
                tg.cancel_scope.cancel()

    async def shutdown(self) -> None:
        """Shut down in order, within a bounded time (idempotent; concurrent callers wait for the first).

        1. Readiness turns 503 and new handshakes are refused; clients get a ``server_shutting_down``
           notification, and new requests get ``SHUTTING_DOWN`` (answers to server requests and
           ``cancel`` still go through).
        2. Running handlers and engine commands get ``drain_timeout`` seconds to finish.
        3. Pending server requests fail with ``ServerShuttingDown``; every connection is closed with
           1001 after its queued frames; cleanup stops engines (each within ``engine_stop_timeout``).
        4. Connections still open after ``shutdown_timeout`` are abandoned (logged).
        """
        if self._shutdown is not None:
            await self._shutdown.wait()
            return
        self._shutdown = anyio.Event()
        self.stopping.set()
        self.shutting_down = True
        self.started = False
        drain = self.config.drain_timeout
        logger.info("shutting down: draining %d connection(s) for up to %.1fs", len(self.hub), drain)
        for connection in self.hub:
            data = NotificationData(notification_type="server_shutting_down", message="the server is restarting",
                                    additional_data={"drain_seconds": drain})
            connection.send_nowait(self.encoder.frame("notification", new_message_id(), data, server_initiated=True))
        with anyio.move_on_after(drain) as draining:
            for connection in self.hub:
                await connection.wait_idle()
        if draining.cancelled_caught:
            busy = sum(len(c.in_flight) for c in self.hub)
            logger.warning("drain period over with %d request(s) still running; they are cancelled", busy)
        for connection in self.hub:
            connection.fail_pending(ServerShuttingDown)
            connection.close(WS_GOING_AWAY, "server shutting down", flush=True)
        with anyio.move_on_after(self.config.shutdown_timeout) as closing:
            await self.hub.wait_empty()
        if closing.cancelled_caught:
            logger.error("%d connection(s) still open after %.1fs of shutdown; abandoned", len(self.hub),
                         self.config.shutdown_timeout)
        self._shutdown.set()

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
                except anyio.get_cancelled_exc_class():
                    if being_cancelled():
                        raise
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


def authenticator_from_config(config: APIConfig) -> Authenticator | None:
    """The built-in authenticators the config asks for (any of them may accept), or None."""
    configured: list[Authenticator] = []
    if config.api_keys:
        configured.append(APIKeyAuthenticator(config.api_keys))
    if config.token_secret:
        configured.append(TokenAuthenticator(config.token_secret))
    if config.jwt_key:
        configured.append(JWTAuthenticator(config.jwt_key, algorithms=config.jwt_algorithms,
                                           audience=config.jwt_audience, issuer=config.jwt_issuer))
    if not configured:
        return None
    return configured[0] if len(configured) == 1 else any_of(*configured)


async def _refuse(websocket: WebSocket, status: int, code: str, message: str) -> None:
    """Refuse a handshake: an HTTP response where the server supports it, else a close (1008)."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse({"error": code, "message": message}, status_code=status))
    else:
        await websocket.close(code=1008 if status == 403 else 1013, reason=message)


def get_runtime(app: Any) -> Runtime:
    """The :class:`Runtime` of an app made by :func:`llmgine_ws.create_app`."""
    runtime = getattr(app.state, "llmgine", None)
    if not isinstance(runtime, Runtime):
        raise LookupError("this app was not made by llmgine_ws.create_app")
    return runtime
