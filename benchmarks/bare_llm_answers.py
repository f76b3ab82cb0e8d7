"""W6 baseline: the same answers pushed by a bare Starlette + msgspec loop, one frame per token.

Speaks just enough of the protocol for ``llm_answers.py``: ``create_session`` / ``create_engine`` get
canned answers; ``engine_command`` streams the bursts of :mod:`benchmarks._tokens` as ``engine_event``
frames of the same shape as llmgine_ws's (one per token, ``await websocket.send_text`` each), then one
``engine_command_res``. No engine object, no queue, no writer task: the floor to compare to.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from benchmarks._tokens import TokenSource, tune_gc

SOURCE = TokenSource()
tune_gc()


class Incoming(msgspec.Struct):
    type: str
    message_id: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)


class Token(msgspec.Struct):
    text: str


class Event(msgspec.Struct):
    session_id: str
    command_id: str
    seq: int
    event_type: str
    payload: Token


class Outgoing(msgspec.Struct, omit_defaults=True):
    type: str
    message_id: str
    data: Any
    server_initiated: bool = False


_decode = msgspec.json.Decoder(Incoming).decode
_encode = msgspec.json.Encoder().encode


async def ws_endpoint(websocket: WebSocket) -> None:
    """Greet, then answer the workload's messages until the client disconnects."""
    await websocket.accept()
    send = websocket.send_text
    await send(_encode(Outgoing("connected", uuid.uuid4().hex, {"app_id": "bare", "status": "connected"},
                                True)).decode())
    try:
        while True:
            msg = _decode(await websocket.receive_text())
            if msg.type == "create_session":
                await send(_encode(Outgoing("create_session_res", msg.message_id, {"session_id": "s"})).decode())
            elif msg.type == "create_engine":
                await send(_encode(Outgoing("create_engine_res", msg.message_id, {"session_id": "s"})).decode())
            elif msg.type == "engine_command":
                command = msg.data["command"]
                seq = 0
                async for burst in SOURCE.answer(int(command["bursts"]), float(command["start"])):
                    if command.get("silent"):
                        seq += len(burst)
                        continue
                    for token in burst:
                        event = Event("s", msg.message_id, seq, "token", Token(token))
                        seq += 1
                        await send(_encode(Outgoing("engine_event", uuid.uuid4().hex, event, True)).decode())
                result = {"session_id": "s", "status": "completed", "result": {"tokens": seq}}
                await send(_encode(Outgoing("engine_command_res", msg.message_id, result)).decode())
    except WebSocketDisconnect:
        pass


app = Starlette(routes=[WebSocketRoute("/api/ws", ws_endpoint)])
