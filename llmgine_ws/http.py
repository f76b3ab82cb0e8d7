"""HTTP endpoints: health probes and information about the server and its connections."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .protocol import CORE_SERVER_MESSAGES, utcnow
from .runtime import Runtime


class JSONResponse(Response):
    """A JSON response encoded by msgspec (structs, datetimes and the like encode natively)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        """Encode the content."""
        return msgspec.json.encode(content)


class StatusRoutes:
    """``/health``, ``/health/live``, ``/health/ready``, ``/api/info`` and ``/api/connections``."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def routes(self) -> list[BaseRoute]:
        """The routes, to be added to the app."""
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/health/live", self.live, methods=["GET"]),
            Route("/health/ready", self.ready, methods=["GET"]),
            Route("/api/info", self.info, methods=["GET"]),
            Route("/api/connections", self.connections, methods=["GET"]),
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
        body = {
            "status": "ready" if ready else "not_ready",
            "problems": problems,
            "checks": {
                "started": runtime.started,
                "shutting_down": runtime.shutting_down,
                "background_tasks": "running" if runtime.background_tasks_alive else "down",
            },
            "connections": len(runtime.hub),
            "sessions": len(runtime.sessions),
            "engines": runtime.sessions.engine_count(),
            "pending_server_requests": runtime.hub.pending_request_count(),
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
                "server": sorted({*CORE_SERVER_MESSAGES, "engine_event", "create_engine_res", "engine_command_res",
                                  "cancel_res", "delete_engine_res", *extensions.server_messages}),
            },
            "custom_message_types": custom_client,
            "custom_server_message_types": sorted(extensions.server_messages),
            "engine_types": sorted(extensions.engine_factories),
        })

    async def connections(self, request: Request) -> Response:
        """Connected apps: ``app_ids``/``total``/``cluster`` are cluster-wide (each app with its node);
        ``connections`` details this node's own (sessions, pending server requests)."""
        runtime = self.runtime
        now = utcnow()
        connections = [
            {
                "app_id": c.app_id,
                "connected_at": c.connected_at,
                "connected_for_seconds": round((now - c.connected_at).total_seconds(), 3),
                "sessions": sorted(c.session_ids),
                "pending_server_requests": len(c.pending),
                "requests_in_flight": len(c.in_flight),
            }
            for c in runtime.hub
        ]
        router = runtime.router
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
