"""The app the multi-process cluster tests run on every node (``--app tests.cluster_app:app``).

The default llmgine_ws app (configured from ``LLMGINE_API_*``, so ``LLMGINE_API_BACKPLANE`` picks
the backplane) plus two test-only routes:

* ``POST /test/call`` runs one messaging API call *on this node* and answers
  ``{"ok", "result" | "error", "message", "node"}``, so a test can make "the backend call on node B";
  op ``wait`` (``{"until": op, "args": {...}, "equals": value, "timeout": seconds}``) waits, with the
  router's ``wait_for``, until a query op answers ``value`` here — how a test in another process
  waits for a node's view of the cluster to change, without polling;
* connections to ``...?user=NAME`` are authenticated as user NAME (to exercise ``send_to_user``);
* an engine ``gated`` that streams tokens and pauses until op ``release`` (the resume tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from llmgine_ws import EngineContext, Extensions, MessagingError, create_app, get_runtime
from llmgine_ws.backplane.cluster import ClusterRouter
from llmgine_ws.runtime import Runtime

from .cluster_support import user_from_query

QUERIES: dict[str, Callable[[Runtime, dict[str, Any]], Any]] = {
    "is_app_connected": lambda runtime, args: runtime.messaging.is_app_connected(args["app_id"]),
    "get_connected_apps": lambda runtime, args: runtime.messaging.get_connected_apps(),
    "get_app_sessions": lambda runtime, args: runtime.messaging.get_app_sessions(args["app_id"]),
    "node_of": lambda runtime, args: next(
        (p.node_id for p in runtime.messaging.get_presence() if p.app_id == args["app_id"]), None),
    "whoami": lambda runtime, args: runtime.message_router.node_id,
    "ready": lambda runtime, args: runtime.readiness()[0],
    "node_count": lambda runtime, args: len(runtime.message_router.nodes()),
}
"""The ops that only read this node's state (and that ``wait`` can wait on)."""


GATES: dict[str, anyio.Event] = {}
"""Events the ``gated`` engine waits on in this process (op ``release`` sets one)."""


class GatedEngine:
    """Streams ``n`` token events; before event ``pause_at`` it waits until op ``release`` opens ``gate``."""

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        for i in range(command["n"]):
            if i == command.get("pause_at"):
                await GATES.setdefault(command["gate"], anyio.Event()).wait()
            await ctx.emit("token", {"i": i})
        return {"n": command["n"]}


async def call(request: Request) -> Response:
    """Run ``{"op": name, "args": {...}}`` against this node's messaging API."""
    runtime = get_runtime(request.app)
    api = runtime.messaging
    body = msgspec.json.decode(await request.body())
    op, args = body["op"], body.get("args", {})
    node = runtime.message_router.node_id
    if args.pop("require_other_than", None) == node:  # lets a test aim at another worker of one port
        return Response(msgspec.json.encode({"ok": False, "error": "WrongNode", "node": node}),
                        media_type="application/json")
    result: Any
    try:
        if op in QUERIES:
            result = QUERIES[op](runtime, args)
        elif op == "wait":
            router = runtime.message_router
            assert isinstance(router, ClusterRouter)
            query, query_args, expected = QUERIES[args["until"]], args.get("args", {}), args["equals"]
            await router.wait_for(lambda: query(runtime, query_args) == expected, args.get("timeout", 10))
            result = True
        elif op == "release":
            GATES.setdefault(args["gate"], anyio.Event()).set()
            result = True
        elif op == "send_to_app":
            result = await api.send_to_app(args["app_id"], args.get("type", "notification"), args.get("data"))
        elif op == "send_to_session":
            result = await api.send_to_session(args["session_id"], args.get("type", "notification"), args.get("data"))
        elif op == "send_to_user":
            result = await api.send_to_user(args["user_id"], args.get("type", "notification"), args.get("data"))
        elif op == "broadcast":
            result = await api.broadcast(args.get("type", "notification"), args.get("data"), args.get("exclude"))
        elif op == "send_to_app_and_wait":
            response = await api.send_to_app_and_wait(args["app_id"], "server_request", args.get("data"),
                                                      timeout=args.get("timeout", 10))
            result = response.data
        elif op == "join_group":
            result = await api.join_group(args["app_id"], args["group"])
        elif op == "leave_group":
            result = await api.leave_group(args["app_id"], args["group"])
        elif op == "send_to_group":
            result = await api.send_to_group(args["group"], args.get("type", "notification"), args.get("data"),
                                              args.get("exclude"))
        else:
            return Response(f"unknown op {op!r}", status_code=400)
    except (MessagingError, TimeoutError) as exc:
        payload = {"ok": False, "error": type(exc).__name__, "message": str(exc),
                   "node": runtime.message_router.node_id}
        return Response(msgspec.json.encode(payload), media_type="application/json")
    payload = {"ok": True, "result": result, "node": runtime.message_router.node_id}
    return Response(msgspec.json.encode(payload), media_type="application/json")


def make_app() -> Any:
    """The node's app (a factory too: ``--app tests.cluster_app:make_app --factory``)."""
    extensions = Extensions()
    extensions.add_route(Route("/test/call", call, methods=["POST"]))
    extensions.register_engine("gated", lambda session, config: GatedEngine())
    app = create_app(extensions=extensions, authenticator=user_from_query)
    return app


app = make_app()
