"""Baseline server: the least work that still speaks the llmgine_ws ping protocol.

A bare Starlette app with one ``WebSocketRoute("/api/ws")``: accept, send a ``connected`` greeting
(like the real server, so the same load generator drives both), then loop: receive a text frame,
decode it with msgspec into :class:`PingMessage`, answer ``ping_res`` with the same message_id and
timestamp. No sessions, no dispatch, no registries: whatever the real server costs beyond this is its
overhead.

Run with ``python -m uvicorn benchmarks.bare_echo:app --ws-per-message-deflate false``.
"""

from __future__ import annotations

import uuid

import msgspec
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

APP_ID = "bare-echo"


class PingData(msgspec.Struct):
    """``data`` of a ping / ping_res."""

    timestamp: str | None = None


class PingMessage(msgspec.Struct):
    """An incoming client message (only pings are answered)."""

    type: str
    message_id: str
    data: PingData


class PingResponse(msgspec.Struct, kw_only=True):
    """The answer to a ping."""

    type: str = "ping_res"
    message_id: str
    data: PingData


class ConnectedData(msgspec.Struct):
    """``data`` of the ``connected`` greeting."""

    app_id: str
    status: str = "connected"


class Connected(msgspec.Struct, kw_only=True):
    """Greeting sent once, right after accepting the connection."""

    type: str = "connected"
    message_id: str
    server_initiated: bool = True
    data: ConnectedData


_decode = msgspec.json.Decoder(PingMessage).decode
_encode = msgspec.json.Encoder().encode


async def ws_endpoint(websocket: WebSocket) -> None:
    """Greet, then answer every ping until the client disconnects."""
    await websocket.accept()
    greeting = Connected(message_id=uuid.uuid4().hex, data=ConnectedData(app_id=APP_ID))
    await websocket.send_text(_encode(greeting).decode())
    try:
        while True:
            msg = _decode(await websocket.receive_text())
            if msg.type != "ping":
                continue
            reply = PingResponse(message_id=msg.message_id, data=PingData(msg.data.timestamp))
            await websocket.send_text(_encode(reply).decode())
    except WebSocketDisconnect:
        pass


app = Starlette(routes=[WebSocketRoute("/api/ws", ws_endpoint)])
