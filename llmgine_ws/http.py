"""HTTP endpoints: health probes and information about the server and its connections."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from .gate import refuse
from .protocol import utcnow
from .runtime import Runtime
from .schema import ProtocolSchema, build_asyncapi, server_message_types

STATIC_DIR = Path(__file__).resolve().parent / "static"
CLIENT_FILES = {
    "llmgine-ws.js": "text/javascript; charset=utf-8",
    "llmgine-ws.d.ts": "application/typescript; charset=utf-8",
}
"""What ``GET /api/client/{name}`` serves: the browser client and its TypeScript declarations."""


class JSONResponse(Response):
    """A JSON response encoded by msgspec (structs, datetimes and the like encode natively)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        """Encode the content."""
        return msgspec.json.encode(content)


class StatusRoutes:
    """``/health``, ``/health/live``, ``/health/ready``, ``/api/info``, ``/api/connections``, ``/api/schema``,
    ``/api/schema/asyncapi`` and the browser client under ``/api/client/``."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._schema: dict[str, Any] | None = None

    def routes(self) -> list[BaseRoute]:
        """The routes, to be added to the app."""
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/health/live", self.live, methods=["GET"]),
            Route("/health/ready", self.ready, methods=["GET"]),
            Route("/api/info", self.info, methods=["GET"]),
            Route("/api/connections", self.connections, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/api/schema", self.schema, methods=["GET"]),
            Route("/api/schema/asyncapi", self.asyncapi, methods=["GET"]),
            Route("/api/client/{name}", self.client_file, methods=["GET", "HEAD"]),
        ]

    async def health(self, request: Request) -> Response:
        """Basic health: the process answers."""
        config = self.runtime.config
        return JSONResponse({"status": "healthy", "title": config.title, "version": config.version,
                             "timestamp": utcnow()})

    async def live(self, request: Request) -> Response:
        """Liveness: the event loop is running (this answer proves it)."""
        return JSONResponse({"status": "alive", "timestamp": utcnow()})

    async def ready(self, request: Request) -> Response:
        """Readiness: 200 while serving, 503 before start-up finished and once shutdown began."""
        runtime = self.runtime
        ready, problems = runtime.readiness()
        counts = runtime.live_counts()
        body = {
            "status": "ready" if ready else "not_ready",
            "problems": problems,
            "checks": {
                "state": runtime.lifecycle.state.value,
                "started": runtime.lifecycle.running,
                "shutting_down": not runtime.lifecycle.accepting,
                "background_tasks": "running" if runtime.background_tasks_alive else "down",
            },
            "connections": counts["connections"],
            "sessions": counts["sessions"],
            "engines": counts["engines"],
            "pending_server_requests": counts["pending_server_requests"],
            "detached_apps": counts["detached_apps"],
            "timestamp": utcnow(),
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def info(self, request: Request) -> Response:
        """What this server is and can do: configuration, message types, engines, capabilities."""
        runtime = self.runtime
        config = runtime.config
        extensions = runtime.extensions
        custom_client = sorted(extensions.handlers)
        return JSONResponse({
            "title": config.title,
            "version": config.version,
            "websocket_path": config.ws_path,
            "config": {
                "max_sessions": config.max_sessions,
                "session_timeout": config.session_timeout,
                "server_request_timeout": config.server_request_timeout,
                "ping_interval": config.ping_interval,
                "missed_pongs": config.missed_pongs,
                "max_message_size": config.max_message_size,
                "max_inflight_requests": config.max_inflight_requests,
                "max_pending_requests": config.max_pending_requests,
                "outbound_queue_size": config.outbound_queue_size,
                "engine_idle_timeout": config.engine_idle_timeout,
                "custom_keys": sorted(config.custom),
            },
            "capabilities": {
                "server_requests": True,
                "notifications": True,
                "broadcasting": True,
                "server_ping": config.ping_interval > 0,
                "engines": True,
                "cancellation": True,
            },
            "message_types": {
                "client": sorted(runtime.dispatcher.specs),
                "server": sorted(server_message_types(runtime.dispatcher.specs.values(), extensions.server_messages)),
            },
            "custom_message_types": custom_client,
            "custom_server_message_types": sorted(extensions.server_messages),
            "engine_types": sorted(extensions.engine_factories),
        })

    async def connections(self, request: Request) -> Response:
        """Connected apps: ``app_ids``/``total``/``cluster`` are cluster-wide (each app with its node);
        ``connections`` details this node's own (sessions, pending server requests).

        It reveals app ids, so: with ``admin_token`` set it needs ``Authorization: Bearer <admin_token>``;
        without one it is open only while no authenticator is configured (development).
        """
        runtime = self.runtime
        refusal = self._admin_refusal(request)
        if refusal is not None:
            return refusal
        now = utcnow()
        connections = [
            {
                "app_id": c.app_id,
                "connected_at": c.connected_at,
                "connected_for_seconds": round((now - c.connected_at).total_seconds(), 3),
                "sessions": sorted(c.session_ids),
                "pending_server_requests": len(c.pending),
                "requests_in_flight": len(c.in_flight),
                "user_id": c.user_id,
                "auth_method": getattr(c.principal, "method", None),
                "client_ip": c.client_ip,
            }
            for c in runtime.hub
        ]
        router = runtime.message_router
        for connection in connections:
            connection["node_id"] = router.node_id
        presence = router.presence()
        return JSONResponse({
            "total": len(presence),
            "app_ids": [app.app_id for app in presence],
            "pending_server_requests": runtime.hub.pending_request_count(),
            "connections": connections,
            "node_id": router.node_id,
            "cluster": {"nodes": router.nodes(), "apps": presence},
        })

    async def metrics(self, request: Request) -> Response:
        """Prometheus metrics (text exposition format); behind the admin token when one is set."""
        metrics = self.runtime.metrics
        if metrics is None:
            return PlainTextResponse('metrics are off: install "llmgine-ws[metrics]" (and keep metrics=true)\n',
                                     status_code=404)
        if self.runtime.config.admin_token:
            refusal = self._admin_refusal(request)
            if refusal is not None:
                return refusal
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def _admin_refusal(self, request: Request) -> Response | None:
        admin_token = self.runtime.config.admin_token
        if admin_token:
            scheme, _, presented = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), admin_token.encode()):
                return None
            self.runtime.audit("admin_refused", level=logging.WARNING, path=request.url.path,
                  client_ip=request.client.host if request.client else None)
            return JSONResponse({"error": "UNAUTHORIZED", "message": "this endpoint needs the admin token"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if self.runtime.authenticator is not None:
            message = "set LLMGINE_API_ADMIN_TOKEN to use this endpoint on an authenticated server"
            return JSONResponse({"error": "FORBIDDEN", "message": message}, status_code=403)
        return None

    def _json_schema(self) -> dict[str, Any]:
        # Registration closed when the app was made, so the schema never changes: build it once.
        if self._schema is None:
            self._schema = ProtocolSchema.of_runtime(self.runtime).json_schema()
        return self._schema

    async def schema(self, request: Request) -> Response:
        """JSON Schema (2020-12) of every client and server message, custom ones included."""
        return JSONResponse(self._json_schema(), media_type="application/schema+json")

    async def asyncapi(self, request: Request) -> Response:
        """AsyncAPI 3.0 document of the WebSocket channel (``servers`` points at this host)."""
        scheme = "wss" if request.url.scheme in ("https", "wss") else "ws"
        base = str(request.base_url).rstrip("/").split("://", 1)[1]
        return JSONResponse(build_asyncapi(self._json_schema(), server_url=f"{scheme}://{base}"))

    async def client_file(self, request: Request) -> Response:
        """The browser client ``llmgine-ws.js`` (an ES module) and its ``llmgine-ws.d.ts``."""
        name = request.path_params["name"]
        media_type = CLIENT_FILES.get(name)
        if media_type is None:
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(STATIC_DIR / name, media_type=media_type, headers={"Cache-Control": "no-cache"})


def websocket_not_found(runtime: Runtime) -> BaseRoute:
    """The last route of an app: a WebSocket to any other path is refused with 404 and the right path
    (Starlette's default is a 403 with no body, which reads like an authentication failure)."""

    async def not_found(websocket: WebSocket) -> None:
        endpoint = websocket.scope.get("root_path", "").rstrip("/") + runtime.config.ws_path
        await refuse(websocket, 404, "NOT_FOUND", f"no WebSocket endpoint at {websocket.url.path}: "
                     f"llmgine_ws serves {endpoint}")

    return WebSocketRoute("/{path:path}", not_found)
