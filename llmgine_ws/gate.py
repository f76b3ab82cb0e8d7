"""The handshake gate: who may open a connection, checked before anything is accepted or registered."""

from __future__ import annotations

import logging
from typing import Literal

import anyio
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

from .audit import AuditLog
from .auth import AuthenticationFailed, Authenticator, Handshake, Principal
from .config import APIConfig
from .connection import Connection
from .hub import Hub
from .lifecycle import Lifecycle
from .protocol import ConnectedData, FrameEncoder, new_message_id
from .resumption import Resumer
from .security import (
    UNVERIFIED_FORWARDED,
    ConnectionCounter,
    RateLimiter,
    SharedBuckets,
    origin_allowed,
    parse_networks,
    resolve_client_ip,
)
from .watch import StateWatch

logger = logging.getLogger("llmgine_ws.gate")

SUBPROTOCOL = "llmgine.v1"
"""Selected when the client offers it. Browsers that offer subprotocols (e.g. to carry a token)
fail the handshake unless the server selects one of them."""


class HandshakeGate:
    """Runs the checks of a new WebSocket, in order — shutdown, ``Origin``, connection caps,
    authentication — then accepts, registers and greets it."""

    def __init__(self, config: APIConfig, *, authenticator: Authenticator | None, counter: ConnectionCounter,
                 audit: AuditLog, lifecycle: Lifecycle, hub: Hub, encoder: FrameEncoder, watch: StateWatch,
                 resumer: Resumer) -> None:
        self._config = config
        self.authenticator = authenticator
        self._counter = counter
        self._audit = audit
        self._lifecycle = lifecycle
        self._hub = hub
        self._encoder = encoder
        self._watch = watch
        self._resumer = resumer
        self._trusted_proxies = parse_networks(config.trusted_proxies)
        self._user_buckets = SharedBuckets(config.user_rate_limit, config.user_rate_burst)
        self._warned_no_lifespan = False
        self._warned_rewritten = False

    async def open(self, websocket: WebSocket) -> Connection | None:
        """The accepted, registered and greeted connection; None if it was refused.

        A refused handshake gets an HTTP status (403, 429 or 503) and leaves nothing registered.
        """
        scope = websocket.scope
        client_ip = resolve_client_ip(scope, self._trusted_proxies)
        if client_ip == UNVERIFIED_FORWARDED and not self._warned_rewritten:
            self._warned_rewritten = True
            logger.warning("the server rewrote client addresses from X-Forwarded-For (uvicorn's --proxy-headers, on "
                           "by default) but LLMGINE_API_TRUSTED_PROXIES is empty: those addresses are ignored and "
                           "such connections share one address's limits. Run uvicorn with --no-proxy-headers (the "
                           "llmgine-ws CLI does), or list your proxy in LLMGINE_API_TRUSTED_PROXIES")
        origin = websocket.headers.get("origin")
        if not self._lifecycle.accepting:
            await refuse(websocket, 503, "SHUTTING_DOWN", "the server is shutting down")
            return None
        if not origin_allowed(scope, self._config.allowed_origins, loopback_only=self.authenticator is None):
            self._audit("handshake_refused", level=logging.WARNING, reason="origin not allowed", origin=origin,
                        client_ip=client_ip)
            await refuse(websocket, 403, "FORBIDDEN", "origin not allowed")
            return None
        cap = self._counter.refusal(client_ip, 1 if self._resumer.detached_from(client_ip) else 0)
        if cap is not None:
            self._audit("limit_hit", level=logging.WARNING, limit="connections", reason=cap[1], client_ip=client_ip)
            await refuse(websocket, cap[0], "CONNECTION_LIMIT", cap[1])
            return None
        self._counter.add(client_ip)  # counted before any await: concurrent handshakes see it
        self._watch.notify()
        try:
            principal = await self._authenticate(websocket, client_ip, origin)
            if principal is False:
                await refuse(websocket, 403, "FORBIDDEN", "authentication failed")
                self._counter.remove(client_ip)
                self._watch.notify()
                return None
            offered = scope.get("subprotocols") or []
            await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        except BaseException:
            self._counter.remove(client_ip)
            self._watch.notify()
            raise
        if not self._lifecycle.running and not self._warned_no_lifespan:
            self._warned_no_lifespan = True
            logger.error("llmgine_ws's lifespan is not running (WebSocket at %s%s): session expiry, idle-engine stops, "
                         "draining on shutdown and the blocking messaging API are off. When mounting it, use "
                         "llmgine_ws.mount(host, path, app) or FastAPI(lifespan=llmgine_ws.lifespan(app, "
                         "your_lifespan))", scope.get("root_path", "").rstrip("/"), self._config.ws_path)
        config = self._config
        connection = Connection(new_message_id(), queue_size=config.outbound_queue_size,
                                queue_bytes=config.outbound_queue_bytes, send_grace=config.send_grace,
                                principal=principal, client_ip=client_ip, audit=self._audit,
                                on_change=self._watch.notify)
        if config.rate_limit > 0:
            connection.rate_limiter = RateLimiter(config.rate_limit, config.rate_burst, config.rate_limit_strikes)
        if config.user_rate_limit > 0 and connection.user_id is not None:
            connection.user_rate_limiter = self._user_buckets.acquire(connection.user_id)
        self._hub.add(connection)
        state, fields = self._resumer.prepare(connection)
        connection.send_nowait(self._encoder.event("connected", ConnectedData(app_id=connection.app_id, **fields)))
        connection.enable_sequencing(state)  # every frame after ``connected`` takes a seq
        logger.info("app %s connected from %s", connection.app_id, client_ip, extra={"app_id": connection.app_id})
        return connection

    def release(self, connection: Connection) -> None:
        """Give back the connection's slot under the connection caps."""
        self._counter.remove(connection.client_ip)
        if connection.user_rate_limiter is not None and connection.user_id is not None:
            self._user_buckets.release(connection.user_id)
        self._watch.notify()

    async def _authenticate(self, websocket: WebSocket, client_ip: str | None, origin: str | None
                            ) -> Principal | Literal[False] | None:
        """The principal; None when no authenticator is configured; False when refused."""
        if self.authenticator is None:
            return None
        handshake = Handshake(websocket.scope, client_ip=client_ip, allow_query_token=self._config.allow_query_token)
        reason = "refused"
        principal: Principal | None = None
        try:
            with anyio.fail_after(self._config.callback_timeout):
                principal = await self.authenticator(handshake)
        except AuthenticationFailed as exc:
            reason = exc.reason
        except TimeoutError:
            reason = "authenticator timed out"
        except Exception:
            logger.exception("the authenticator raised; refusing the handshake")
            reason = "authenticator error"
        if principal is None:
            self._audit("auth", level=logging.WARNING, outcome="refused", reason=reason, carrier=handshake.carrier,
                        client_ip=client_ip, origin=origin)
            return False
        self._audit("auth", outcome="accepted", user_id=principal.user_id, method=principal.method,
                    carrier=handshake.carrier, client_ip=client_ip, origin=origin)
        return principal


async def refuse(websocket: WebSocket, status: int, code: str, message: str) -> None:
    """Refuse a handshake: an HTTP response where the server supports it, else a close (1008)."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse({"error": code, "message": message}, status_code=status))
    else:
        await websocket.close(code=1008 if status == 403 else 1013, reason=message)
