"""``create_app``: wire a config and extensions into a Starlette app."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import BaseRoute, WebSocketRoute

from .auth import Authenticator
from .backplane import Backplane
from .backplane.cluster import ClusterRouter, build_router
from .config import APIConfig
from .endpoint import MessageEndpoint
from .extensions import Extensions
from .http import StatusRoutes
from .hub import Hub
from .messaging import MessagingAPI
from .runtime import Runtime, get_runtime
from .sessions import SessionStore


def create_app(
    config: APIConfig | None = None,
    extensions: Extensions | None = None,
    *,
    authenticator: Authenticator | None = None,
    backplane: Backplane | None = None,
) -> Starlette:
    """Build the ASGI app: the WebSocket endpoint, the HTTP endpoints, and your extra routes.

    ``config`` defaults to :meth:`APIConfig.from_env` (so a bad ``LLMGINE_API_*`` value fails here,
    at startup). The app's state lives on ``app.state.llmgine`` (a :class:`Runtime`); mount the app
    anywhere, but give its lifespan to the host app (``lifespan=app.router.lifespan_context``).

    ``authenticator`` decides who may connect (see :mod:`llmgine_ws.auth`); by default it is built
    from the config's API keys / token secret / JWT key, and without any the server is open.
    ``backplane`` connects the app to a cluster (overriding ``config.backplane``): e.g. a
    :class:`~llmgine_ws.backplane.memory.MemoryBackplane` on a broker shared with other apps.
    """
    config = APIConfig.from_env() if config is None else config
    hub = Hub()
    sessions = SessionStore(config.max_sessions)
    router = build_router(config, hub, sessions, backplane)
    runtime = Runtime(config, Extensions() if extensions is None else extensions, hub=hub, sessions=sessions,
                      message_router=router, authenticator=authenticator)
    if isinstance(router, ClusterRouter):
        router.bind_resume(runtime.resumer, runtime.dispatcher)  # resume across nodes (docs/resume.md)
    routes: list[BaseRoute] = [
        WebSocketRoute(config.ws_path, MessageEndpoint(runtime)),
        *StatusRoutes(runtime).routes(),
        *runtime.extensions.routes,
    ]
    app = Starlette(debug=config.debug, routes=routes, lifespan=runtime.lifespan)
    app.state.llmgine = runtime
    runtime.services.app = app
    return app


def get_messaging_api(app: Starlette) -> MessagingAPI:
    """The messaging API of an app made by :func:`create_app`."""
    return get_runtime(app).messaging
