"""Second baseline: the bare echo, but with llmgine_ws's shape — replies go through a writer task.

Identical to :mod:`benchmarks.bare_echo` except that the reader hands each reply to a separate writer
task through a bounded outbox (the same ``llmgine_ws.outbox.Outbox``), so exactly one task writes to
the socket and the reader never waits on a send. Comparing llmgine_ws with this isolates what
llmgine_ws costs *beyond* that architecture; comparing this with ``bare_echo`` prices the
architecture itself (one task hop per reply).
"""

from __future__ import annotations

import uuid

import anyio
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from benchmarks.bare_echo import APP_ID, Connected, ConnectedData, PingData, PingResponse, _decode, _encode
from llmgine_ws.outbox import Outbox


async def ws_endpoint(websocket: WebSocket) -> None:
    """Greet, then answer every ping through the writer task until the client disconnects."""
    await websocket.accept()
    outbox: Outbox[str] = Outbox(256, 1 << 22)
    outbox.put_nowait(_encode(Connected(message_id=uuid.uuid4().hex, data=ConnectedData(app_id=APP_ID))).decode())

    async def write() -> None:
        send = websocket.send
        while True:
            await send({"type": "websocket.send", "text": await outbox.get()})

    async with anyio.create_task_group() as tg:
        tg.start_soon(write)
        try:
            while True:
                msg = _decode(await websocket.receive_text())
                if msg.type == "ping":
                    reply = PingResponse(message_id=msg.message_id, data=PingData(msg.data.timestamp))
                    outbox.put_nowait(_encode(reply).decode())
        except WebSocketDisconnect:
            pass
        tg.cancel_scope.cancel()


app = Starlette(routes=[WebSocketRoute("/api/ws", ws_endpoint)])
