"""Baseline of the server→client round-trip benchmark (W2): the same exchange, written by hand.

A bare Starlette + msgspec app with the shape any server that lets backend code *await* a client's
answer needs, and nothing more: the endpoint task reads frames and resolves a pending
``asyncio.Future`` per ``server_response`` (a dict keyed by message_id); ``bench_ask`` starts a second
task, the asker, which loops: register a future, send a ``server_request`` (a fresh uuid4
message_id, ``server_initiated: true``) straight to the socket, await the future. The asker is not
the reader because real backend code never is (it asks from a handler, an engine or an HTTP route).
No writer task, no timeout, no audit, no metrics, no bounds: whatever ``send_to_app_and_wait`` costs
beyond this is llmgine_ws's overhead.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import msgspec
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from benchmarks.bare_echo import Connected, ConnectedData


class Incoming(msgspec.Struct):
    """A client message: only the envelope matters here."""

    type: str
    message_id: str | None = None
    data: msgspec.Raw = msgspec.Raw(b"null")


class RequestData(msgspec.Struct):
    request_type: str


class ServerRequest(msgspec.Struct, kw_only=True):
    type: str = "server_request"
    message_id: str
    server_initiated: bool = True
    data: RequestData


class AnswerData(msgspec.Struct):
    response_type: str


_decode = msgspec.json.Decoder(Incoming).decode
_decode_answer = msgspec.json.Decoder(AnswerData).decode
_encode = msgspec.json.Encoder().encode
_DATA = RequestData("bench")


async def ask_loop(websocket: WebSocket, pending: dict[str, asyncio.Future[AnswerData]]) -> None:
    """The backend side: ask, await the answer, ask again."""
    loop = asyncio.get_running_loop()
    while True:
        message_id = uuid.uuid4().hex
        answer: asyncio.Future[AnswerData] = loop.create_future()
        pending[message_id] = answer
        await websocket.send_text(_encode(ServerRequest(message_id=message_id, data=_DATA)).decode())
        await answer


async def ws_endpoint(websocket: WebSocket) -> None:
    """Greet; read frames, resolving answers; ``bench_ask`` starts the asker."""
    await websocket.accept()
    greeting = Connected(message_id=uuid.uuid4().hex, data=ConnectedData(app_id="bare-ask"))
    await websocket.send_text(_encode(greeting).decode())
    pending: dict[str, asyncio.Future[AnswerData]] = {}
    asker: asyncio.Task[None] | None = None
    try:
        while True:
            msg = _decode(await websocket.receive_text())
            if msg.type == "server_response":
                answer = pending.pop(msg.message_id or "", None)
                if answer is not None and not answer.done():
                    answer.set_result(_decode_answer(msg.data))
            elif msg.type == "bench_ask" and asker is None:
                asker = asyncio.create_task(ask_loop(websocket, pending))
    except WebSocketDisconnect:
        pass
    finally:
        if asker is not None:
            asker.cancel()
            with contextlib.suppress(BaseException):
                await asker


app = Starlette(routes=[WebSocketRoute("/api/ws", ws_endpoint)])
