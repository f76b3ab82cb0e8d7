"""The llmgine_ws side of the fan-out and memory benchmarks: the default app plus two HTTP routes and
an engine.

* ``POST /broadcast`` (body ``{"seq": n, "pad": bytes}``) calls
  ``get_messaging_api(app).broadcast("fanout", {"seq": n, "pad": "..."})`` and answers
  ``{"reached": count, "seconds": time spent inside broadcast()}``.
* ``POST /flood`` (body ``{"app_id": ..., "size": bytes, "seconds": s}``) sends ``flood`` messages to
  one app with ``send_to_app`` until a send has to wait for room (the app's outbound queue is full
  because the client stopped reading), or ``seconds`` pass: this is how a benchmark makes a client
  "stalled" from the server's point of view. Answers ``{"frames": sent}``.
* engine ``echo``: ``engine_command`` → one ``engine_event``, then the command back as the result.

Configured from ``LLMGINE_API_*`` like ``llmgine_ws.main:app`` (the benchmarks set rate limits off,
pings off, high connection caps).
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from llmgine_ws import EngineContext, Extensions, Session, create_app


class BroadcastBody(msgspec.Struct):
    seq: int
    pad: int = 0


class FloodBody(msgspec.Struct):
    app_id: str
    size: int = 16384
    seconds: float = 2.0


class EchoEngine:
    async def start(self) -> None:
        pass

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        await ctx.emit("echo", None)
        return {"echo": command}

    async def stop(self) -> None:
        pass


def _json(content: Any) -> Response:
    return Response(msgspec.json.encode(content), media_type="application/json")


async def broadcast(request: Request) -> Response:
    body = msgspec.json.decode(await request.body(), type=BroadcastBody)
    api = extensions.get_messaging_api()
    started = time.perf_counter()
    reached = await api.broadcast("fanout", {"seq": body.seq, "pad": "x" * body.pad})
    return _json({"reached": reached, "seconds": time.perf_counter() - started})


async def flood(request: Request) -> Response:
    body = msgspec.json.decode(await request.body(), type=FloodBody)
    api = extensions.get_messaging_api()
    frames = 0
    payload = {"pad": "x" * body.size}
    with anyio.move_on_after(body.seconds):
        while True:
            with anyio.move_on_after(0.2) as waited:  # a send that waits this long: the queue is full
                await api.send_to_app(body.app_id, "flood", payload)
            if waited.cancelled_caught:
                break
            frames += 1
            await anyio.lowlevel.checkpoint()  # let the writer move frames to the socket meanwhile
    return _json({"frames": frames})


def _echo_engine(session: Session, config: dict[str, Any]) -> EchoEngine:
    return EchoEngine()


extensions = Extensions()
extensions.register_engine("echo", _echo_engine)
extensions.add_route(Route("/broadcast", broadcast, methods=["POST"]))
extensions.add_route(Route("/flood", flood, methods=["POST"]))
app = create_app(extensions=extensions)
