"""Baseline for the fan-out benchmark: a bare Starlette + msgspec app that keeps its sockets in a dict
and broadcasts by looping over them (``await websocket.send_text(...)`` one after the other).

Same wire behaviour as ``benchmarks.fanout_app`` where the benchmark looks: a ``connected``
greeting with an ``app_id``, ``POST /broadcast`` and ``POST /flood`` with the same bodies and
answers. No sessions, no queues, no isolation: a client that stops reading eventually blocks the
loop (that is the point of comparing with it).
"""

from __future__ import annotations

import time
import uuid

import anyio
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from benchmarks.fanout_app import BroadcastBody, FloodBody

_encode = msgspec.json.encode
sockets: dict[str, WebSocket] = {}


async def ws_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    app_id = str(uuid.uuid4())
    await websocket.send_text(_encode({"type": "connected", "message_id": uuid.uuid4().hex, "server_initiated": True,
                                       "data": {"app_id": app_id, "status": "connected"}}).decode())
    sockets[app_id] = websocket
    try:
        while True:
            await websocket.receive_text()
    except WebSocketDisconnect:
        pass
    finally:
        sockets.pop(app_id, None)


def _json(content: object) -> Response:
    return Response(_encode(content), media_type="application/json")


async def broadcast(request: Request) -> Response:
    body = msgspec.json.decode(await request.body(), type=BroadcastBody)
    text = _encode({"type": "fanout", "message_id": uuid.uuid4().hex, "server_initiated": True,
                    "data": {"seq": body.seq, "pad": "x" * body.pad}}).decode()
    started = time.perf_counter()
    reached = 0
    for websocket in list(sockets.values()):
        try:
            await websocket.send_text(text)
            reached += 1
        except Exception:  # gone meanwhile
            pass
    return _json({"reached": reached, "seconds": time.perf_counter() - started})


async def flood(request: Request) -> Response:
    body = msgspec.json.decode(await request.body(), type=FloodBody)
    websocket = sockets[body.app_id]
    text = _encode({"type": "flood", "message_id": "f", "server_initiated": True,
                    "data": {"pad": "x" * body.size}}).decode()
    frames = 0
    with anyio.move_on_after(body.seconds):
        while True:
            with anyio.move_on_after(0.2) as waited:  # a send that waits this long: the socket is backed up
                await websocket.send_text(text)
            if waited.cancelled_caught:
                break
            frames += 1
    return _json({"frames": frames})


app = Starlette(routes=[WebSocketRoute("/api/ws", ws_endpoint), Route("/broadcast", broadcast, methods=["POST"]),
                        Route("/flood", flood, methods=["POST"])])
