"""The node app of ``benchmarks/cluster.py``: the default llmgine_ws app plus load-driving routes.

The routes run the messaging API *on this node* (configured from ``LLMGINE_API_*``, so
``LLMGINE_API_BACKPLANE`` decides whether it is a cluster node):

* ``POST /bench/requests {"app_ids", "concurrency", "duration"}`` — ``concurrency`` tasks each run
  ``send_to_app_and_wait`` back to back (round-robin over ``app_ids``) for ``duration`` seconds;
  answers ``{"count", "errors", "elapsed"}``.
* ``POST /bench/broadcast {"count"}`` — ``count`` broadcasts back to back; answers
  ``{"sent", "reached", "elapsed"}`` (``reached`` sums the counts ``broadcast`` returned).
* ``GET /bench/apps`` — how many apps this node sees (cluster-wide with a backplane).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from llmgine_ws import Extensions, MessagingError, create_app, get_runtime


def _json(payload: Any) -> Response:
    return Response(msgspec.json.encode(payload), media_type="application/json")


async def requests(request: Request) -> Response:
    """Closed-loop server requests for a fixed duration."""
    api = get_runtime(request.app).messaging
    body = msgspec.json.decode(await request.body())
    app_ids: list[str] = body["app_ids"]
    targets = itertools.cycle(app_ids)
    deadline = time.monotonic() + float(body["duration"])
    count = errors = 0

    async def loop() -> None:
        nonlocal count, errors
        while time.monotonic() < deadline:
            try:
                await api.send_to_app_and_wait(next(targets), "server_request", {"request_type": "bench"}, timeout=10)
                count += 1
            except (MessagingError, TimeoutError):
                errors += 1
                await anyio.sleep(0.01)  # an error may come back without yielding: never spin the loop

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(int(body["concurrency"])):
            tg.start_soon(loop)
    return _json({"count": count, "errors": errors, "elapsed": time.monotonic() - started})


async def broadcast(request: Request) -> Response:
    """``count`` broadcasts, back to back."""
    api = get_runtime(request.app).messaging
    body = msgspec.json.decode(await request.body())
    reached = 0
    started = time.monotonic()
    for index in range(int(body["count"])):
        reached += await api.broadcast("bench", {"i": index})
    return _json({"sent": int(body["count"]), "reached": reached, "elapsed": time.monotonic() - started})


async def apps(request: Request) -> Response:
    """How many apps this node sees."""
    return _json({"apps": len(get_runtime(request.app).messaging.get_connected_apps())})


def make_app() -> Any:
    """Build the node app."""
    extensions = Extensions()
    for route in (Route("/bench/requests", requests, methods=["POST"]),
                  Route("/bench/broadcast", broadcast, methods=["POST"]),
                  Route("/bench/apps", apps, methods=["GET"])):
        extensions.add_route(route)
    return create_app(extensions=extensions)


app = make_app()
