"""``create_app``: wire a config and extensions into a Starlette app."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Mount, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from .auth import Authenticator
from .backplane import Backplane
from .backplane.cluster import ClusterRouter, build_router
from .config import APIConfig
from .endpoint import MessageEndpoint
from .extensions import Extensions
from .gate import refuse
from .http import StatusRoutes, websocket_not_found
from .hub import Hub
from .lifecycle import State
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
        router.bind_resume(runtime.resumer, runtime.dispatcher, ping_interval=config.ping_interval,
                           missed_pongs=config.missed_pongs, encoder=runtime.encoder)  # resume across nodes
    routes: list[BaseRoute] = [
        WebSocketRoute(config.ws_path, MessageEndpoint(runtime)),
        *StatusRoutes(runtime).routes(),
        *runtime.extensions.routes,
        websocket_not_found(runtime),
    ]
    app = Starlette(debug=config.debug, routes=routes, lifespan=runtime.lifespan)
    app.state.llmgine = runtime
    runtime.services.app = app
    runtime.host.app = app
    return app


def get_messaging_api(app: Starlette) -> MessagingAPI:
    """The messaging API of an app made by :func:`create_app`."""
    return get_runtime(app).messaging


HostLifespan = Callable[[Any], AbstractAsyncContextManager[Any]]
"""A Starlette/FastAPI lifespan: ``lifespan(app)`` → an async context manager (yielding state or None)."""


def lifespan(app: Starlette, host_lifespan: HostLifespan | None = None) -> HostLifespan:
    """A lifespan for the host app that runs ``app``'s (an app made by :func:`create_app`) inside its own.

    ::

        llm = create_app(extensions=extensions)
        host = FastAPI(lifespan=llmgine_ws.lifespan(llm, my_lifespan))
        host.mount("/ws", llm)

    ``host_lifespan`` (optional) goes around llmgine_ws's: what it sets up (a db pool on
    ``app.state``) exists before llmgine_ws starts and is still there while it drains on shutdown.
    The state it yields is passed on. Handlers and engines see the host app as ``ctx.host_app`` /
    ``ctx.state``.
    """
    runtime = get_runtime(app)

    @asynccontextmanager
    async def combined(host: Any) -> AsyncIterator[Any]:
        runtime.set_host(host)
        if host_lifespan is None:
            async with runtime.lifespan(host):
                yield None
            return
        async with host_lifespan(host) as state, runtime.lifespan(host):
            yield state

    return combined


def mount(host: Any, path: str = "/ws", app: Starlette | None = None, *, config: APIConfig | None = None,
          extensions: Extensions | None = None, authenticator: Authenticator | None = None,
          backplane: Backplane | None = None, name: str | None = None) -> Starlette:
    """Mount an llmgine_ws app at ``path`` in a Starlette/FastAPI ``host`` and run its lifespan with the host's.

    ::

        host = FastAPI(lifespan=my_lifespan)            # your own lifespan, state, routes
        llmgine_ws.mount(host, "/ws", extensions=extensions)
        # the WebSocket endpoint is /ws/api/ws (path + ws_path)

    Mounts ``app``, or a new ``create_app(config, extensions, ...)``, and returns it. The host's
    lifespan (whatever it was given) keeps running, around llmgine_ws's (see :func:`lifespan`).
    Call it once the host app exists, before it starts serving.
    """
    if not path.startswith("/") or (path.endswith("/") and path != "/"):
        raise ValueError(f"mount path {path!r} must start with '/' and not end with one (e.g. '/ws')")
    router = getattr(host, "router", None)
    if router is None or not hasattr(router, "lifespan_context"):
        raise TypeError(f"{host!r} is not a Starlette or FastAPI app")
    llm = create_app(config, extensions, authenticator=authenticator, backplane=backplane) if app is None else app
    runtime = get_runtime(llm)
    if getattr(router.lifespan_context, "__self__", None) is runtime:
        raise ValueError("the host app already runs this app's lifespan (lifespan=app.router.lifespan_context): "
                         "drop that, mount() runs it")
    if path == "/":
        path = ""
    router.routes.append(Mount(path, app=llm, name=name))
    router.lifespan_context = lifespan(llm, router.lifespan_context)
    router.default = _websocket_not_found(router.default, runtime)
    runtime.set_host(host, path)
    return llm


def _websocket_not_found(default: ASGIApp, runtime: Runtime) -> ASGIApp:
    """The host router's fallback, answering a WebSocket that matched no route with 404 and the right path
    (only what no route matched: routes added to the host later are not shadowed)."""

    async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await default(scope, receive, send)
            return
        websocket = WebSocket(scope, receive=receive, send=send)
        await refuse(websocket, 404, "NOT_FOUND", f"no WebSocket endpoint at {websocket.url.path}: llmgine_ws "
                     f"serves {runtime.ws_url_path}")

    return not_found


def mounted_apps(host: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, Runtime]]:
    """Every llmgine_ws app served by ``host`` (itself included), with the path it is mounted at."""
    found: list[tuple[str, Runtime]] = []
    runtime = getattr(getattr(host, "state", None), "llmgine", None)
    if isinstance(runtime, Runtime):
        found.append((prefix, runtime))
    if depth > 8:
        return found
    for route in getattr(host, "routes", None) or []:
        if isinstance(route, Mount):
            found.extend(mounted_apps(route.app, prefix + route.path, depth + 1))
    return found


def lifespan_problems(host: Any) -> list[str]:
    """Why llmgine_ws apps served by ``host`` are not running once the host's startup is over (empty: none)."""
    return [f"the llmgine_ws app mounted at {path or '/'} did not start with the host app's lifespan: mount it with "
            "llmgine_ws.mount(host, path, app) or give the host lifespan=llmgine_ws.lifespan(app, your_lifespan)"
            for path, runtime in mounted_apps(host) if runtime.lifecycle.state is State.CREATED]
