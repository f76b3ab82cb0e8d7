"""A scriptable OpenAI-compatible chat-completions server, for testing LLM engines over real HTTP.

Each request to ``POST /v1/chat/completions`` takes the next :class:`Reply` of the script and
streams it as genuine server-sent events in the chat-completions chunk format (role chunk, content
or tool-call deltas, finish chunk, usage chunk when ``stream_options.include_usage`` asks for it,
``[DONE]``), or answers with an HTTP error. It records every request body and when each client
disconnected before the end of its stream, so a test can prove that a cancel closed the upstream
connection.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

SECRET_IN_ERRORS = "sk-test-SECRET-do-not-leak"
"""Put in every error body (as providers quote key prefixes): it must never reach a client."""

End = Literal["done", "stall", "cut", "drip", "no_finish"]


@dataclass
class ScriptedToolCall:
    id: str
    name: str
    arguments: str


@dataclass
class Reply:
    """One scripted answer."""

    deltas: Sequence[str] = ()
    tool_calls: Sequence[ScriptedToolCall] = ()
    split: int = 3
    """Each tool call's arguments go out in this many fragments (after a chunk with its id and name)."""
    interleave: bool = False
    """Send the fragments of several tool calls interleaved (index-based assembly must cope)."""
    finish_reason: str = "stop"
    usage: dict[str, int] | None = None
    end: End = "done"
    """``stall``: stop sending (keep the connection open); ``cut``: drop the connection;
    ``drip``: keep sending ``drip_text`` every ``interval`` until the client leaves;
    ``no_finish``: end the stream cleanly (``[DONE]``) without any finish_reason."""
    interval: float = 0.0
    drip_text: str = "tick "
    status: int = 200
    error: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def text(*deltas: str, finish_reason: str = "stop", usage: dict[str, int] | None = None, **options: Any) -> Reply:
    """A streamed text answer; usage defaults to ``prompt 10 / completion <number of deltas>``."""
    if usage is None:
        usage = {"prompt_tokens": 10, "completion_tokens": len(deltas), "total_tokens": 10 + len(deltas)}
    return Reply(deltas=deltas, finish_reason=finish_reason, usage=usage, **options)


def tool_calls(*calls: tuple[str, str, dict[str, Any] | str], deltas: Sequence[str] = (), **options: Any) -> Reply:
    """Tool calls ``(id, name, arguments)``, streamed in fragments, optionally after some text."""
    scripted = [ScriptedToolCall(call_id, name, args if isinstance(args, str) else json.dumps(args))
                for call_id, name, args in calls]
    options.setdefault("usage", {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25})
    return Reply(deltas=deltas, tool_calls=scripted, finish_reason="tool_calls", **options)


def error(status: int, message: str, *, code: str | None = None, type: str = "server_error",
          headers: dict[str, str] | None = None) -> Reply:
    """An HTTP error in OpenAI's error format (the body also quotes a fake secret)."""
    body = {"error": {"message": f"{message} ({SECRET_IN_ERRORS})", "type": type, "param": None, "code": code}}
    return Reply(status=status, error=body, headers=headers or {})


class OpenAIServer:
    """The server's script and records; :attr:`app` is the Starlette app to serve."""

    def __init__(self, *replies: Reply) -> None:
        self.script: deque[Reply] = deque(replies)
        self.requests: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        self.disconnects: list[float] = []
        """``time.monotonic()`` of each client that left before its stream ended."""
        self._disconnected: anyio.Event | None = None
        self.disconnected_flag = threading.Event()
        """Set on the first disconnect: for a test whose event loop is not the server's."""
        self.base_url = ""
        """Set by whoever serves :attr:`app`."""
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.completions, methods=["POST"])])

    def add(self, *replies: Reply) -> None:
        self.script.extend(replies)

    async def wait_for_disconnect(self, timeout: float = 5.0) -> float:
        """The time of the first client disconnect (waiting for it if none yet)."""
        if not self.disconnects:
            self._disconnected = anyio.Event()
            with anyio.fail_after(timeout):
                await self._disconnected.wait()
        return self.disconnects[0]

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.authorizations.append(request.headers.get("authorization"))
        if not self.script:
            return JSONResponse({"error": {"message": "the test script has no reply left", "type": "test"}}, 400)
        reply = self.script.popleft()
        if reply.error is not None:
            return JSONResponse(reply.error, reply.status, headers=reply.headers)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return _SSEResponse(self, reply, body.get("model", "test-model"), include_usage)

    def record_disconnect(self) -> None:
        self.disconnects.append(time.monotonic())
        self.disconnected_flag.set()
        if self._disconnected is not None:
            self._disconnected.set()


class _SSEResponse(Response):
    """Streams one :class:`Reply` as chat-completion chunks, watching for the client leaving."""

    def __init__(self, server: OpenAIServer, reply: Reply, model: str, include_usage: bool) -> None:
        super().__init__(media_type="text/event-stream")
        self.server = server
        self.reply = reply
        self.model = model
        self.include_usage = include_usage

    def chunk(self, delta: dict[str, Any] | None, finish_reason: str | None = None,
              usage: dict[str, int] | None = None) -> bytes:
        payload: dict[str, Any] = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1700000000,
                                   "model": self.model, "choices": []}
        if delta is not None:
            payload["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n".encode()

    def body_chunks(self) -> Iterator[bytes]:
        reply = self.reply
        yield self.chunk({"role": "assistant", "content": ""})
        for delta in reply.deltas:
            yield self.chunk({"content": delta})
        fragments: list[list[bytes]] = []
        for index, call in enumerate(reply.tool_calls):
            pieces = [self.chunk({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                                  "function": {"name": call.name, "arguments": ""}}]})]
            size = max(1, -(-len(call.arguments) // reply.split))
            for start in range(0, len(call.arguments), size):
                pieces.append(self.chunk({"tool_calls": [{"index": index, "function": {
                    "arguments": call.arguments[start:start + size]}}]}))
            fragments.append(pieces)
        if reply.interleave:
            for row in range(max((len(pieces) for pieces in fragments), default=0)):
                yield from (pieces[row] for pieces in fragments if row < len(pieces))
        else:
            for pieces in fragments:
                yield from pieces

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:
            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.server.record_disconnect()
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await self.stream(send)
            tg.cancel_scope.cancel()
        # Returning before the body's end (a cut, or the client left) makes uvicorn drop the connection.

    async def stream(self, send: Send) -> None:
        reply = self.reply
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})

        async def body(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})
            if reply.interval:
                await anyio.sleep(reply.interval)

        for data in self.body_chunks():
            await body(data)
        if reply.end == "stall":
            await anyio.sleep_forever()
        if reply.end == "cut":
            return
        if reply.end == "drip":
            while True:
                await body(self.chunk({"content": reply.drip_text}))
                await anyio.sleep(reply.interval or 0.01)
        if reply.end != "no_finish":
            await body(self.chunk({}, reply.finish_reason))
            if self.include_usage and reply.usage is not None:
                await body(self.chunk(None, usage=reply.usage))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on its own asyncio loop in a thread; yields the base URL (``…/v1``).

    For tests whose own event loop is trio (uvicorn only runs on asyncio).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve([sock])), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
