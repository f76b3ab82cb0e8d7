"""Test support for the clients' resume: a TCP proxy the test can sever or black-hole, and a scripted
fake server speaking the resume protocol (issue 12's wire contract) over a real socket.

The fake server is deliberately small: one ``App`` per resumable client, a ``seq`` counter, a replay
buffer of the frames not acked yet, single-use tokens, pending server requests re-sent after the
replay, client requests executed once per ``message_id``. Tests drive it through its methods and
events; nothing sleeps.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

WAIT = 10.0


# ============================================================================================ proxy


class TcpProxy:
    """Forwards TCP connections from its own port to ``upstream``; ``sever()`` drops every current
    connection (both sides see the socket close without a WebSocket close frame), ``blackhole()``
    keeps the current ones open but forwards nothing more on them (a half-open connection), and
    ``refuse()`` closes new connections at once (the client keeps trying: ``attempts`` counts)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.accepted = 0
        self.attempts = 0
        self.refusing = False
        self._links: list[tuple[anyio.abc.SocketStream, anyio.abc.SocketStream, anyio.CancelScope]] = []
        self._blackholed: set[int] = set()
        self._changed = anyio.Event()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def sever(self) -> None:
        links, self._links = self._links, []
        for client, upstream, scope in links:
            scope.cancel()
            await anyio.aclose_forcefully(client)
            await anyio.aclose_forcefully(upstream)

    def blackhole(self) -> None:
        """Stop forwarding bytes on the connections open now (new ones work)."""
        self._blackholed.update(id(client) for client, _, _ in self._links)

    def refuse(self, on: bool = True) -> None:
        """Close new connections at once (or stop doing so)."""
        self.refusing = on

    async def wait_attempts(self, count: int) -> None:
        with anyio.fail_after(WAIT):
            while self.attempts < count:
                await self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _serve(self, client: anyio.abc.SocketStream) -> None:
        self.attempts += 1
        self._wake()
        if self.refusing:
            await anyio.aclose_forcefully(client)
            return
        try:
            upstream = await anyio.connect_tcp("127.0.0.1", self.upstream_port)
        except OSError:
            await anyio.aclose_forcefully(client)
            return
        self.accepted += 1
        self._wake()
        with anyio.CancelScope() as scope:
            self._links.append((client, upstream, scope))
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, client, upstream, scope, id(client))
                tg.start_soon(self._pump, upstream, client, scope, id(client))
        await anyio.aclose_forcefully(client)
        await anyio.aclose_forcefully(upstream)

    async def _pump(self, source: anyio.abc.SocketStream, target: anyio.abc.SocketStream,
                    scope: anyio.CancelScope, link: int) -> None:
        try:
            async for chunk in source:
                if link not in self._blackholed:
                    await target.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        scope.cancel()


@asynccontextmanager
async def tcp_proxy(upstream_port: int) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(upstream_port)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    proxy.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, proxy._serve)
        try:
            yield proxy
        finally:
            await proxy.sever()
            tg.cancel_scope.cancel()
    await listener.aclose()


# ============================================================================================ fake server


class App:
    """One app of the fake server: what survives its sockets."""

    def __init__(self, app_id: str, window: float) -> None:
        self.app_id = app_id
        self.token = secrets.token_urlsafe(16)
        self.window = window
        self.seq = 0
        self.buffer: list[tuple[int, str]] = []
        self.opted_in = False
        self.websocket: WebSocket | None = None
        self.lock = anyio.Lock()
        self.received: list[dict[str, Any]] = []
        self.acks: list[int] = []
        self.answers: dict[str, dict[str, Any]] = {}  # client request message_id -> its answer frame
        self.running: set[str] = set()
        self.executions: dict[str, int] = {}  # message_id -> times the request was executed
        self.server_requests: dict[str, dict[str, Any]] = {}  # pending server requests, by message_id
        self.responses: dict[str, list[dict[str, Any]]] = {}  # server_response frames, by message_id
        self.gates: dict[str, anyio.Event] = {}
        self.changed = anyio.Event()
        self.sockets = 0
        self.ended = False

    def notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def wait(self, predicate: Callable[[], bool]) -> None:
        with anyio.fail_after(WAIT):
            while not predicate():
                await self.changed.wait()

    async def emit(self, obj: dict[str, Any]) -> int:
        """Send a frame with the next seq (buffered for replay while the app is opted in)."""
        async with self.lock:
            self.seq += 1
            seq = self.seq
            text = json.dumps({**obj, "seq": seq})
            if self.opted_in:
                self.buffer.append((seq, text))
            websocket = self.websocket
            if websocket is not None:
                try:
                    await websocket.send_text(text)
                except Exception:  # the socket is going: the frame stays in the buffer
                    pass
            self.notify()
            return seq

    async def reply(self, request: dict[str, Any], type_: str, data: dict[str, Any]) -> None:
        frame = {"type": type_, "message_id": request["message_id"], "data": data}
        self.answers[request["message_id"]] = frame
        self.running.discard(request["message_id"])
        await self.emit(frame)

    async def event(self, type_: str, data: dict[str, Any], message_id: str | None = None) -> int:
        return await self.emit({"type": type_, "message_id": message_id or uuid.uuid4().hex,
                                "server_initiated": True, "data": data})

    async def ask(self, data: dict[str, Any], type_: str = "server_request") -> dict[str, Any]:
        """A server request: sent (and re-sent after every resume) until the first answer."""
        mid = uuid.uuid4().hex
        frame = {"type": type_, "message_id": mid, "server_initiated": True, "data": data}
        self.server_requests[mid] = frame
        await self.emit(frame)
        await self.wait(lambda: bool(self.responses.get(mid)))
        del self.server_requests[mid]
        return self.responses[mid][0]

    def open(self, name: str) -> None:
        self.gates.setdefault(name, anyio.Event()).set()

    async def gate(self, name: str) -> None:
        await self.gates.setdefault(name, anyio.Event()).wait()


class FakeResumeServer:
    """A Starlette app speaking the resume protocol; ``apps`` by app_id, ``resumes`` as answered."""

    def __init__(self, *, window: float = 30.0, resume: bool = True) -> None:
        self.window = window
        self.resume_enabled = resume
        self.apps: dict[str, App] = {}
        self.resumes: list[dict[str, Any]] = []
        self.close_codes: list[int | None] = []
        self.changed = anyio.Event()
        self.fail_next_resume: str | None = None  # answer the next resume resumed:false with this reason
        self._scopes: set[anyio.CancelScope] = set()
        self.app = Starlette(routes=[WebSocketRoute("/ws", self.endpoint)])

    def notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def wait(self, predicate: Callable[[], bool]) -> None:
        with anyio.fail_after(WAIT):
            while not predicate():
                await self.changed.wait()

    def stop(self) -> None:
        """Cancel what the apps still run (requests waiting on a gate nobody opens)."""
        for scope in list(self._scopes):
            scope.cancel()

    def only_app(self) -> App:
        (app,) = [a for a in self.apps.values() if not a.ended]
        return app

    async def endpoint(self, websocket: WebSocket) -> None:
        offered = websocket.scope.get("subprotocols", [])
        await websocket.accept(subprotocol="llmgine.v1" if "llmgine.v1" in offered else None)
        app = App(uuid.uuid4().hex, self.window)
        self.apps[app.app_id] = app
        app.websocket = websocket
        app.sockets += 1
        data: dict[str, Any] = {"app_id": app.app_id, "status": "connected"}
        if self.resume_enabled:
            data.update(resume_token=app.token, resume_window=app.window)
        await websocket.send_text(json.dumps({"type": "connected", "message_id": uuid.uuid4().hex,
                                              "server_initiated": True, "data": data}))
        self.notify()
        first = True
        try:
            # The requests of a resumable app outlive this socket: the task group is left only once
            # they are done (or the app ended, or the test stops the server).
            async with anyio.create_task_group() as tg:
                self._scopes.add(tg.cancel_scope)
                while True:
                    event = await websocket.receive()
                    if event["type"] == "websocket.disconnect":
                        self.close_codes.append(event.get("code"))
                        if app.websocket is websocket:
                            app.websocket = None
                            if (self.close_codes[-1] == 1000) or not app.opted_in:
                                app.ended = True
                                tg.cancel_scope.cancel()
                        app.notify()
                        self.notify()
                        break
                    msg = json.loads(event["text"])
                    if first and msg["type"] == "resume":
                        app = await self._resume(websocket, app, msg)
                        first = False
                        continue
                    first = False
                    app.received.append(msg)
                    app.notify()
                    self.notify()
                    tg.start_soon(self._handle, app, msg)
        finally:
            self._scopes.discard(tg.cancel_scope)
            if app.websocket is websocket:
                app.websocket = None
            app.notify()
            self.notify()

    async def _resume(self, websocket: WebSocket, fresh: App, msg: dict[str, Any]) -> App:
        data = msg["data"]
        old = self.apps.get(data.get("app_id"))
        reason: str | None = None
        if not self.resume_enabled:
            reason = "disabled"
        elif self.fail_next_resume is not None:
            reason, self.fail_next_resume = self.fail_next_resume, None
        elif old is None or old.ended or not secrets.compare_digest(old.token, str(data.get("resume_token"))):
            reason = "unknown"
        elif data["last_seq"] < old.seq and (not old.buffer or old.buffer[0][0] > data["last_seq"] + 1):
            reason = "gap"
        if reason is not None or old is None:
            answer = {"resumed": False, "reason": reason, "app_id": fresh.app_id, "resume_token": fresh.token}
            self.resumes.append(answer)
            await websocket.send_text(json.dumps({"type": "resume_res", "message_id": msg["message_id"],
                                                  "data": answer}))
            self.notify()
            return fresh
        del self.apps[fresh.app_id]
        previous = old.websocket
        async with old.lock:
            old.token = secrets.token_urlsafe(16)
            old.websocket = websocket
            old.sockets += 1
            replay = [text for seq, text in old.buffer if seq > data["last_seq"]]
            answer = {"resumed": True, "app_id": old.app_id, "resume_token": old.token, "replayed": len(replay),
                      "sessions": [{"session_id": "s1", "status": "active", "engine": None}]}
            self.resumes.append(answer)
            await websocket.send_text(json.dumps({"type": "resume_res", "message_id": msg["message_id"],
                                                  "data": answer}))
            for text in replay:
                await websocket.send_text(text)
        if previous is not None:
            try:
                await previous.close(code=4000, reason="superseded")
            except Exception:
                pass
        for frame in list(old.server_requests.values()):
            await old.emit(frame)
        # A marker after the re-sent requests: once a client handled it, it has seen them too.
        await old.event("notification", {"notification_type": "resumed_marker", "message": ""})
        old.notify()
        self.notify()
        return old

    async def _handle(self, app: App, msg: dict[str, Any]) -> None:
        mtype, mid, data = msg["type"], msg["message_id"], msg.get("data") or {}
        if mtype == "ack":
            app.opted_in = True
            app.acks.append(data["seq"])
            app.buffer = [(seq, text) for seq, text in app.buffer if seq > data["seq"]]
            app.notify()
            return
        if mtype == "server_response":
            app.responses.setdefault(mid, []).append(msg)
            app.notify()
            return
        if mtype in ("server_pong", "cancel"):
            return
        if mid in app.answers or mid in app.running:  # a resend: executed once, answered once
            return
        app.running.add(mid)
        app.executions[mid] = app.executions.get(mid, 0) + 1
        app.notify()
        if mtype == "ping":
            await app.reply(msg, "ping_res", {"timestamp": data.get("timestamp")})
        elif mtype == "gated":  # answered once the test opens the gate
            await app.gate(data["gate"])
            await app.reply(msg, "gated_res", {"gate": data["gate"]})
        elif mtype == "emit":
            for i in range(data["n"]):
                await app.event("notification", {"notification_type": "info", "message": f"n{i}"})
            await app.reply(msg, "emit_res", {})
        elif mtype == "ask":
            answer = await app.ask({"request_type": "user_input", "prompt": "well?"})
            await app.reply(msg, "ask_res", {"answer": answer["data"]})
        elif mtype == "engine_command":
            # events 0..k-1, then (after the gate "rest") events k..n-1, then the result
            total, first = data["command"]["n"], data["command"].get("first", data["command"]["n"])
            for i in range(total):
                if i == first:
                    await app.gate("rest")
                await app.event("engine_event", {"session_id": data["session_id"], "command_id": mid, "seq": i,
                                                 "event_type": "token", "payload": {"text": f"t{i}"}})
            await app.reply(msg, "engine_command_res", {"session_id": data["session_id"], "status": "completed",
                                                        "result": {"events": total}})
        else:
            await app.reply(msg, "error", {"code": "INVALID_MESSAGE_TYPE", "message": mtype})
