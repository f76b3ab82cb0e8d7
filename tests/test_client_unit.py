"""Unit tests of ``llmgine_ws.client`` against fake servers.

Two fake servers are used, both written here so these tests do not depend on the real server:

* a Starlette app served by uvicorn in the test's own event loop (asyncio) on an ephemeral port,
  speaking the llmgine_ws wire protocol (``FakeServer``);
* a raw wsproto server on an anyio TCP listener (``raw_server``), for frame-level behaviour that an
  ASGI app cannot produce: fragmented messages, WebSocket pings, abrupt TCP drops, invalid UTF-8.

One test runs the client under trio against uvicorn running in a separate thread.

No sleep is used as synchronisation: every wait is on an event and bounded by ``anyio.fail_after``.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest
import uvicorn
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSListener
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from llmgine_ws.client import (
    RAW_MESSAGE_TYPE,
    ClientError,
    ConnectionClosed,
    HandshakeRejected,
    Message,
    RequestError,
    RequestTimeout,
    connect,
)

from .rawws import send_raw, send_raw_text_bytes

SUPPORTED_SUBPROTOCOLS = ("llmgine.v1",)
WAIT = 5.0  # upper bound of any single wait in these tests


# ============================================================================================
# Fake llmgine_ws server (Starlette + uvicorn)
# ============================================================================================


def _dumps(obj: Any) -> str:
    return json.dumps(obj)


class ConnRecord:
    """What the fake server saw of one connection."""

    def __init__(self, websocket: WebSocket, app_id: str, subprotocol: str | None) -> None:
        self.websocket = websocket
        self.app_id = app_id
        self.subprotocol = subprotocol
        self.path = websocket.url.path
        self.query = websocket.url.query
        self.headers = dict(websocket.headers)
        self.received: list[str | bytes] = []
        self.changed = anyio.Event()
        self.disconnected = anyio.Event()
        self.close_code: int | None = None
        self.held: list[dict[str, Any]] = []
        self.pending: dict[str, tuple[anyio.Event, list[dict[str, Any]]]] = {}
        self.lock = anyio.Lock()

    def record(self, item: str | bytes) -> None:
        self.received.append(item)
        self.changed.set()
        self.changed = anyio.Event()

    async def wait_received(self, predicate: Callable[[str | bytes], bool]) -> str | bytes:
        with anyio.fail_after(WAIT):
            while True:
                for item in self.received:
                    if predicate(item):
                        return item
                await self.changed.wait()

    async def send(self, obj: dict[str, Any]) -> None:
        async with self.lock:
            await self.websocket.send_text(_dumps(obj))

    async def reply(self, request: dict[str, Any], type_: str, data: dict[str, Any]) -> None:
        await self.send({"type": type_, "message_id": request["message_id"], "data": data})

    async def server_call(self, type_: str, data: dict[str, Any]) -> dict[str, Any]:
        """Send a server-initiated message and wait for the client's answer (same id)."""
        mid = uuid.uuid4().hex
        event = anyio.Event()
        slot: list[dict[str, Any]] = []
        self.pending[mid] = (event, slot)
        await self.send({"type": type_, "message_id": mid, "server_initiated": True, "data": data})
        with anyio.fail_after(WAIT):
            await event.wait()
        return slot[0]


class FakeServer:
    """A tiny llmgine_ws-protocol server. ``connections`` maps app_id to what was seen."""

    def __init__(self) -> None:
        self.base = ""  # ws://host:port, set once served
        self.connections: dict[str, ConnRecord] = {}
        self.app = Starlette(
            routes=[
                WebSocketRoute("/ws", self.ws_main),
                WebSocketRoute("/deny", self.ws_deny),
                WebSocketRoute("/bye", self.ws_bye),
            ]
        )

    async def ws_deny(self, websocket: WebSocket) -> None:
        await websocket.send_denial_response(PlainTextResponse("nope", status_code=403))

    async def ws_bye(self, websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close(code=4001, reason="go away")

    async def ws_main(self, websocket: WebSocket) -> None:
        offered = websocket.scope.get("subprotocols", [])
        subprotocol = next((p for p in offered if p in SUPPORTED_SUBPROTOCOLS), None)
        await websocket.accept(subprotocol=subprotocol)
        app_id = str(uuid.uuid4())
        rec = ConnRecord(websocket, app_id, subprotocol)
        self.connections[app_id] = rec
        try:
            await rec.send(
                {
                    "type": "connected",
                    "message_id": uuid.uuid4().hex,
                    "server_initiated": True,
                    "data": {"app_id": app_id, "status": "connected"},
                }
            )
            async with anyio.create_task_group() as tg:
                while True:
                    event = await websocket.receive()
                    if event["type"] == "websocket.disconnect":
                        rec.close_code = event.get("code")
                        break
                    if event.get("bytes") is not None:
                        rec.record(event["bytes"])
                        continue
                    text = event["text"]
                    rec.record(text)
                    try:
                        msg = json.loads(text)
                        mid = msg["message_id"]
                        mtype = msg["type"]
                    except (ValueError, KeyError, TypeError):
                        continue
                    if mtype in ("server_response", "server_pong") and mid in rec.pending:
                        done, slot = rec.pending.pop(mid)
                        slot.append(msg)
                        done.set()
                        continue
                    tg.start_soon(self.handle, rec, msg)
                tg.cancel_scope.cancel()
        except RuntimeError:  # sending on a connection the client already closed
            pass
        finally:
            rec.disconnected.set()

    async def handle(self, rec: ConnRecord, msg: dict[str, Any]) -> None:
        mtype = msg["type"]
        data = msg.get("data") or {}
        if mtype == "ping":
            await rec.reply(msg, "ping_res", {"timestamp": data.get("timestamp")})
        elif mtype == "echo":
            await rec.reply(msg, "echo_res", data)
        elif mtype == "whoami":
            await rec.reply(
                msg,
                "whoami_res",
                {"path": rec.path, "query": rec.query, "headers": rec.headers, "subprotocol": rec.subprotocol},
            )
        elif mtype == "create_session":
            if data.get("app_id") != rec.app_id:
                await rec.reply(msg, "error", {"code": "BAD_APP_ID", "message": "wrong app_id"})
            else:
                await rec.reply(msg, "create_session_res", {"session_id": "sess-" + rec.app_id[:8]})
        elif mtype == "hold":
            # Answer nothing until data["n"] "hold" requests arrived, then answer them in reverse.
            rec.held.append(msg)
            if len(rec.held) == data["n"]:
                held, rec.held = rec.held, []
                for m in reversed(held):
                    await rec.reply(m, "hold_res", {"value": m["data"]["value"]})
        elif mtype == "fail":
            await rec.send(
                {
                    "type": "error",
                    "message_id": msg["message_id"],
                    "data": {
                        "code": "SESSION_NOT_FOUND",
                        "message": "no such session",
                        "details": {"session_id": data.get("session_id")},
                    },
                }
            )
        elif mtype == "never":
            pass
        elif mtype == "close_me":
            await rec.websocket.close(code=data.get("code", 4000), reason="closing as asked")
        elif mtype == "ask":
            answer = await rec.server_call("server_request", {"request_type": data["request_type"], "prompt": "well?"})
            await rec.reply(msg, "ask_res", {"response": answer})
        elif mtype == "ping_me":
            answer = await rec.server_call("server_ping", {"timestamp": data["timestamp"]})
            await rec.reply(msg, "ping_me_res", {"pong": answer})
        elif mtype == "notify":
            for i in range(data["n"]):
                await rec.send(
                    {
                        "type": "notification",
                        "message_id": uuid.uuid4().hex,
                        "server_initiated": True,
                        "data": {"notification_type": "info", "message": f"n{i}"},
                    }
                )
            await rec.reply(msg, "notify_res", {})
        elif mtype == "emit":
            for i in range(data["n"]):
                await rec.send(
                    {
                        "type": data["type"],
                        "message_id": uuid.uuid4().hex,
                        "server_initiated": True,
                        "data": {"seq": i},
                    }
                )
            await rec.reply(msg, "emit_res", {})
        elif mtype == "send_binary":
            async with rec.lock:
                await rec.websocket.send_bytes(b"\x00\x01binary")
            await rec.reply(msg, "send_binary_res", {})
        elif mtype == "send_garbage":
            async with rec.lock:
                await rec.websocket.send_text("this is not json {")
            await rec.reply(msg, "send_garbage_res", {})
        else:
            await rec.reply(msg, "error", {"code": "UNKNOWN_TYPE", "message": mtype})


def _bound_socket() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


class _Server(uvicorn.Server):
    """uvicorn server that reports the end of its startup through callbacks (no polling)."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self._on_started()


def _config(app: Starlette) -> uvicorn.Config:
    return uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)


@asynccontextmanager
async def serve_in_loop(app: Starlette) -> AsyncIterator[str]:
    """Run uvicorn in the current (asyncio) event loop; yield the base ws:// URL."""
    sock, port = _bound_socket()
    started = anyio.Event()
    server = _Server(_config(app), started.set)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        with anyio.fail_after(WAIT):
            await started.wait()
        try:
            yield f"ws://127.0.0.1:{port}"
        finally:
            server.should_exit = True
    sock.close()


@contextmanager
def serve_in_thread(app: Starlette) -> Iterator[str]:
    """Run uvicorn with its own asyncio loop in a thread; yield the base ws:// URL."""
    sock, port = _bound_socket()
    started = threading.Event()
    server = _Server(_config(app), started.set)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert started.wait(WAIT), "uvicorn did not start"
        yield f"ws://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(WAIT)
        sock.close()
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    # uvicorn only runs on asyncio; the trio test runs its own trio loop.
    return "asyncio"


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeServer]:
    server = FakeServer()
    async with serve_in_loop(server.app) as base:
        server.base = base
        yield server


@pytest.fixture
def url(fake: FakeServer) -> str:
    return f"{fake.base}/ws"


# ============================================================================================
# Raw wsproto server, for frame-level tests
# ============================================================================================


class RawPeer:
    """Server side of one connection, driven by a test script through wsproto."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.SERVER)
        self.events: list[Event] = []
        self.skipped: list[Event] = []  # non-text events passed over by next_message()
        self.eof = False

    async def _fill(self) -> None:
        try:
            data: bytes | None = await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            data = None
            self.eof = True
        self.ws.receive_data(data)
        self.events.extend(self.ws.events())

    async def next_event(self) -> Event:
        while not self.events:
            if self.eof:
                raise EOFError
            await self._fill()
        return self.events.pop(0)

    async def accept(self, subprotocol: str | None = None) -> Request:
        event = await self.next_event()
        assert isinstance(event, Request)
        await self.send(AcceptConnection(subprotocol=subprotocol))
        return event

    async def send(self, event: Event) -> None:
        await self.stream.send(self.ws.send(event))

    async def send_json(self, obj: dict[str, Any]) -> None:
        await self.send(TextMessage(data=_dumps(obj)))

    async def send_connected(self, app_id: str = "raw-app") -> None:
        await self.send_json(
            {
                "type": "connected",
                "message_id": "c0",
                "server_initiated": True,
                "data": {"app_id": app_id, "status": "connected"},
            }
        )

    async def next_message(self) -> dict[str, Any]:
        parts: list[str] = []
        while True:
            event = await self.next_event()
            if isinstance(event, TextMessage):
                parts.append(event.data)
                if event.message_finished:
                    result: dict[str, Any] = json.loads("".join(parts))
                    return result
            else:
                self.skipped.append(event)


Script = Callable[[RawPeer], Awaitable[None]]


@asynccontextmanager
async def raw_server(
    script: Script, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[str, list[BaseException]]]:
    """Serve ``script`` for each connection; yield the URL and the list of script errors."""
    errors: list[BaseException] = []
    tcp_listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = tcp_listener.extra(SocketAttribute.local_port)
    listener: anyio.abc.Listener[Any] = tcp_listener
    if ssl_context is not None:
        listener = TLSListener(tcp_listener, ssl_context, standard_compatible=False)

    async def handle(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            try:
                await script(RawPeer(stream))
            except Exception as exc:
                errors.append(exc)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield f"{'wss' if ssl_context else 'ws'}://127.0.0.1:{port}/raw", errors
        finally:
            tg.cancel_scope.cancel()


# ============================================================================================
# Tests: connection
# ============================================================================================

pytestmark = pytest.mark.anyio


async def test_connect_sets_app_id_and_sends_headers(fake: FakeServer, url: str) -> None:
    async with connect(url + "?token=abc&x=1", headers={"X-Test": "yes"}) as client:
        assert client.app_id in fake.connections
        assert not client.closed
        assert client.subprotocol is None
        who = await client.request("whoami")
        assert who.type == "whoami_res"
        assert who.data["path"] == "/ws"
        assert who.data["query"] == "token=abc&x=1"
        assert who.data["headers"]["x-test"] == "yes"
    rec = fake.connections[client.app_id]
    with anyio.fail_after(WAIT):
        await rec.disconnected.wait()
    assert rec.close_code == 1000  # leaving the context sends close 1000
    assert client.closed
    assert client.close_code == 1000


async def test_headers_as_pairs_and_wait_connected_false(fake: FakeServer, url: str) -> None:
    async with connect(url, headers=[("X-Test", "pairs")], wait_connected=False) as client:
        connected = await client.receive(timeout=WAIT)
        assert connected.type == "connected"
        assert connected.server_initiated
        assert connected.data["status"] == "connected"
        assert client.app_id == connected.data["app_id"]
        who = await client.request("whoami")
        assert who.data["headers"]["x-test"] == "pairs"


async def test_subprotocol_negotiation(url: str) -> None:
    async with connect(url, subprotocols=["bogus", "llmgine.v1"]) as client:
        assert client.subprotocol == "llmgine.v1"
        who = await client.request("whoami")
        assert who.data["subprotocol"] == "llmgine.v1"
    async with connect(url, subprotocols=["bogus"]) as client:
        assert client.subprotocol is None


async def test_handshake_rejected(fake: FakeServer) -> None:
    with pytest.raises(HandshakeRejected) as info:
        async with connect(f"{fake.base}/deny"):
            pytest.fail("connected")
    assert info.value.status_code == 403
    assert info.value.body == b"nope"
    assert isinstance(info.value, ClientError)
    assert any(name.lower() == "content-type" for name, _ in info.value.headers)


async def test_accept_then_close_raises_connection_closed(fake: FakeServer) -> None:
    with pytest.raises(ConnectionClosed) as info:
        async with connect(f"{fake.base}/bye"):
            pytest.fail("connected")
    assert info.value.code == 4001
    assert info.value.reason == "go away"


async def test_bad_url_scheme() -> None:
    with pytest.raises(ValueError, match="scheme"):
        async with connect("http://127.0.0.1:1/ws"):
            pytest.fail("connected")


async def test_user_exception_propagates_unwrapped(url: str) -> None:
    with pytest.raises(KeyError, match="boom"):
        async with connect(url):
            raise KeyError("boom")


# ============================================================================================
# Tests: requests
# ============================================================================================


async def test_request_response_and_create_session(url: str) -> None:
    async with connect(url) as client:
        response = await client.request("ping", {"timestamp": "2024-01-01T00:00:00Z"}, message_id="m1")
        assert response == Message(type="ping_res", message_id="m1", data={"timestamp": "2024-01-01T00:00:00Z"})
        session_id = await client.create_session()
        assert session_id.startswith("sess-")


class EchoPayload(msgspec.Struct):
    text: str
    count: int


async def test_struct_payload_and_send(url: str, fake: FakeServer) -> None:
    async with connect(url) as client:
        response = await client.request("echo", EchoPayload(text="hi", count=2))
        assert response.data == {"text": "hi", "count": 2}
        mid = await client.send("never", {"x": 1})
        rec = fake.connections[client.app_id]
        raw = await rec.wait_received(lambda item: isinstance(item, str) and mid in item)
        assert json.loads(raw) == {"type": "never", "message_id": mid, "data": {"x": 1}}
        mid2 = await client.send("never")
        raw2 = await rec.wait_received(lambda item: isinstance(item, str) and mid2 in item)
        assert json.loads(raw2)["data"] == {}


async def test_many_concurrent_requests_answered_out_of_order(url: str) -> None:
    n = 50
    results: dict[int, Message] = {}
    async with connect(url) as client:

        async def one(i: int) -> None:
            results[i] = await client.request("hold", {"n": n, "value": i}, timeout=WAIT)

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(one, i)
    assert sorted(results) == list(range(n))
    for i, message in results.items():
        assert message.type == "hold_res"
        assert message.data == {"value": i}


async def test_duplicate_pending_message_id_rejected(url: str) -> None:
    async with connect(url) as client, anyio.create_task_group() as tg:
        started = anyio.Event()

        async def pending() -> None:
            started.set()
            with pytest.raises(RequestTimeout):
                await client.request("never", message_id="dup", timeout=0.2)

        tg.start_soon(pending)
        await started.wait()
        with pytest.raises(ValueError, match="dup"):
            await client.request("ping", message_id="dup")


async def test_error_envelope_raises_request_error(url: str) -> None:
    async with connect(url) as client:
        with pytest.raises(RequestError) as info:
            await client.request("fail", {"session_id": "s-404"}, message_id="req-9")
        err = info.value
        assert err.code == "SESSION_NOT_FOUND"
        assert err.message == "no such session"
        assert err.details == {"session_id": "s-404"}
        assert err.message_id == "req-9"
        assert err.response.type == "error"
        assert err.response.message_id == "req-9"
        # the connection is still usable
        assert (await client.request("ping")).type == "ping_res"


async def test_request_timeout(url: str) -> None:
    async with connect(url, request_timeout=0.2) as client:
        start = anyio.current_time()
        with pytest.raises(RequestTimeout) as info:
            await client.request("never")
        assert isinstance(info.value, TimeoutError)
        assert anyio.current_time() - start < 2
        with pytest.raises(TimeoutError):
            await client.request("never", timeout=0.05)
        assert (await client.request("ping", timeout=WAIT)).type == "ping_res"


async def test_server_close_fails_pending_requests_promptly(url: str) -> None:
    async with connect(url, request_timeout=30) as client:
        outcome: list[BaseException] = []

        async def pending() -> None:
            try:
                await client.request("never")
            except ConnectionClosed as exc:
                outcome.append(exc)

        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(pending)
            with pytest.raises(ConnectionClosed) as info:
                await client.request("close_me", {"code": 4002})
        assert anyio.current_time() - start < 1
        assert info.value.code == 4002
        assert info.value.reason == "closing as asked"
        assert len(outcome) == 1
        assert isinstance(outcome[0], ConnectionClosed)
        assert client.closed
        assert client.close_code == 4002
        assert await client.wait_closed(timeout=0) == 4002
        with pytest.raises(ConnectionClosed):
            await client.request("ping")
        with pytest.raises(ConnectionClosed):
            await client.send("ping")
        with pytest.raises(ConnectionClosed):
            await client.receive(timeout=WAIT)


async def test_local_close_and_wait_closed(url: str, fake: FakeServer) -> None:
    async with connect(url) as client:
        assert await client.wait_closed(timeout=0.01) is None
        await client.close(4100, "done")
        assert client.closed
        assert client.close_code == 4100
        rec = fake.connections[client.app_id]
        with anyio.fail_after(WAIT):
            await rec.disconnected.wait()
        assert rec.close_code == 4100
        await client.close()  # idempotent


async def test_cancelled_caller_still_closes_cleanly(url: str, fake: FakeServer) -> None:
    with anyio.CancelScope() as scope:
        async with connect(url) as client:
            scope.cancel()
            await client.receive()  # cancelled: leaving the context must still close with 1000
    assert scope.cancelled_caught
    rec = fake.connections[client.app_id]
    with anyio.fail_after(WAIT):
        await rec.disconnected.wait()
    assert rec.close_code == 1000
    assert client.close_code == 1000


async def test_abort_makes_server_see_disconnect(url: str, fake: FakeServer) -> None:
    async with connect(url) as client:
        rec = fake.connections[client.app_id]
        async with anyio.create_task_group() as tg:
            failed = anyio.Event()

            async def pending() -> None:
                with pytest.raises(ConnectionClosed) as info:
                    await client.request("never", timeout=30)
                assert info.value.code == 1006
                failed.set()

            tg.start_soon(pending)
            await rec.wait_received(lambda item: isinstance(item, str) and '"never"' in item)
            await client.abort()
            with anyio.fail_after(1):
                await failed.wait()
        with anyio.fail_after(WAIT):
            await rec.disconnected.wait()
        assert rec.close_code != 1000  # no close handshake happened
        assert client.close_code == 1006


# ============================================================================================
# Tests: server-initiated messages
# ============================================================================================


async def test_server_request_sync_and_async_handlers(url: str) -> None:
    async with connect(url) as client:

        @client.on_server_request("user_input")
        def answer_sync(message: Message) -> dict[str, Any]:
            assert message.type == "server_request"
            assert message.server_initiated
            return {"text": "hello", "prompt": message.data["prompt"]}

        @client.on_server_request("confirm")
        async def answer_async(message: Message) -> dict[str, Any]:
            # a handler may itself use the client: the reader is not blocked by handlers
            pong = await client.request("ping", {"timestamp": "inner"})
            return {"confirmed": True, "inner": pong.data["timestamp"]}

        response = (await client.request("ask", {"request_type": "user_input"})).data["response"]
        assert response["type"] == "server_response"
        assert response["data"] == {"response_type": "user_input", "text": "hello", "prompt": "well?"}
        response = (await client.request("ask", {"request_type": "confirm"})).data["response"]
        assert response["data"] == {"response_type": "confirm", "confirmed": True, "inner": "inner"}


async def test_server_request_unknown_type_and_raising_handler(url: str) -> None:
    async with connect(url) as client:

        @client.on_server_request("boom")
        async def explode(message: Message) -> dict[str, Any]:
            raise RuntimeError("kaboom")

        @client.on_server_request("nothing")
        def nothing(message: Message) -> None:
            return None

        response = (await client.request("ask", {"request_type": "mystery"})).data["response"]
        assert response["data"] == {
            "response_type": "mystery",
            "error": "no handler for request_type 'mystery'",
        }
        response = (await client.request("ask", {"request_type": "boom"})).data["response"]
        assert response["data"] == {"response_type": "boom", "error": "kaboom"}
        response = (await client.request("ask", {"request_type": "nothing"})).data["response"]
        assert response["data"] == {"response_type": "nothing"}


async def test_slow_server_request_handler_does_not_block_reader(url: str) -> None:
    async with connect(url) as client:
        started = anyio.Event()
        release = anyio.Event()

        @client.on_server_request("slow")
        async def slow(message: Message) -> dict[str, Any]:
            started.set()
            await release.wait()
            return {"ok": True}

        result: list[Message] = []

        async def ask() -> None:
            result.append(await client.request("ask", {"request_type": "slow"}))

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ask)
                await started.wait()
                assert (await client.request("ping")).type == "ping_res"
                assert not result
                release.set()
        assert result[0].data["response"]["data"] == {"response_type": "slow", "ok": True}


async def test_notifications_to_handler_in_order(url: str) -> None:
    n = 30
    async with connect(url) as client:
        seen: list[str] = []
        all_seen = anyio.Event()

        @client.on_notification
        async def on_note(message: Message) -> None:
            await anyio.lowlevel.checkpoint()  # an async handler that yields must keep the order
            seen.append(message.data["message"])
            if len(seen) == n:
                all_seen.set()

        await client.request("notify", {"n": n})
        with anyio.fail_after(WAIT):
            await all_seen.wait()
        assert seen == [f"n{i}" for i in range(n)]
        # nothing leaked into the inbox
        with pytest.raises(RequestTimeout):
            await client.receive(timeout=0.05)


async def test_on_message_handler_sync(url: str) -> None:
    async with connect(url) as client:
        seqs: list[int] = []
        done = anyio.Event()

        @client.on_message("engine_event")
        def on_event(message: Message) -> None:
            seqs.append(message.data["seq"])
            if len(seqs) == 10:
                done.set()

        await client.request("emit", {"type": "engine_event", "n": 10})
        with anyio.fail_after(WAIT):
            await done.wait()
        assert seqs == list(range(10))
        # another type without handler goes to receive()
        await client.request("emit", {"type": "custom_thing", "n": 2})
        first = await client.receive(timeout=WAIT)
        second = await client.receive(timeout=WAIT)
        assert (first.type, first.data, second.data) == ("custom_thing", {"seq": 0}, {"seq": 1})


async def test_notifications_to_receive_in_order(url: str) -> None:
    async with connect(url) as client:
        await client.request("notify", {"n": 5})
        got = [await client.receive(timeout=WAIT) for _ in range(5)]
        assert [m.type for m in got] == ["notification"] * 5
        assert [m.data["message"] for m in got] == [f"n{i}" for i in range(5)]
        assert all(m.server_initiated for m in got)
        with pytest.raises(RequestTimeout):
            await client.receive(timeout=0.05)


async def test_inbox_drops_oldest_past_limit(url: str, caplog: pytest.LogCaptureFixture) -> None:
    async with connect(url, inbox_limit=3) as client:
        await client.request("emit", {"type": "custom_thing", "n": 5})
        got = [(await client.receive(timeout=WAIT)).data["seq"] for _ in range(3)]
        assert got == [2, 3, 4]
    assert "inbox full" in caplog.text


async def test_server_ping_auto_pong(url: str) -> None:
    async with connect(url) as client:
        response = await client.request("ping_me", {"timestamp": "2024-05-06T07:08:09+00:00"})
        pong = response.data["pong"]
        assert pong["type"] == "server_pong"
        assert pong["data"]["timestamp"] == "2024-05-06T07:08:09+00:00"
        server_ts = datetime.fromisoformat(pong["data"]["server_timestamp"])
        assert server_ts.utcoffset() is not None
        assert server_ts.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


async def test_server_ping_without_auto_pong(url: str) -> None:
    async with connect(url, auto_pong=False) as client, anyio.create_task_group() as tg:
        result: list[Message] = []

        async def ask() -> None:
            result.append(await client.request("ping_me", {"timestamp": "t0"}))

        tg.start_soon(ask)
        ping = await client.receive(timeout=WAIT)
        assert ping.type == "server_ping"
        assert ping.data == {"timestamp": "t0"}
        await client.send("server_pong", {"timestamp": "manual"}, message_id=ping.message_id)
    assert result[0].data["pong"]["data"] == {"timestamp": "manual"}
    assert result[0].data["pong"]["message_id"] == ping.message_id


# ============================================================================================
# Tests: raw frames and large messages
# ============================================================================================


async def test_raw_frames_both_ways(url: str, fake: FakeServer) -> None:
    async with connect(url) as client:
        rec = fake.connections[client.app_id]
        await send_raw(client, b"\x00\x01\x02")
        assert await rec.wait_received(lambda item: isinstance(item, bytes)) == b"\x00\x01\x02"
        await send_raw(client, "definitely { not json")
        await rec.wait_received(lambda item: item == "definitely { not json")

        await client.request("send_binary")
        binary = await client.receive(timeout=WAIT)
        assert binary == Message(type=RAW_MESSAGE_TYPE, message_id="", data=b"\x00\x01binary")
        await client.request("send_garbage")
        garbage = await client.receive(timeout=WAIT)
        assert garbage == Message(type=RAW_MESSAGE_TYPE, message_id="", data="this is not json {")


async def test_large_message_round_trip(url: str) -> None:
    big = "x" * (1024 * 1024) + "é"  # 1 MiB: many TCP reads, partial frames in wsproto
    async with connect(url) as client:
        response = await client.request("echo", {"blob": big}, timeout=WAIT)
        assert response.data["blob"] == big


async def test_fragmented_message_and_websocket_ping() -> None:
    pongs: list[bytes] = []

    async def script(peer: RawPeer) -> None:
        await peer.accept()
        text = _dumps(
            {
                "type": "connected",
                "message_id": "c0",
                "server_initiated": True,
                "data": {"app_id": "frag-app", "status": "connected"},
            }
        )
        await peer.send(TextMessage(data=text[:10], message_finished=False))
        await peer.send(Ping(b"are you there"))  # control frame between fragments
        await peer.send(TextMessage(data=text[10:30], message_finished=False))
        await peer.send(TextMessage(data=text[30:], message_finished=True))
        request = await peer.next_message()
        pongs.extend(e.payload for e in peer.skipped if isinstance(e, Pong))
        reply = _dumps({"type": "ping_res", "message_id": request["message_id"], "data": {"ok": "é" * 1000}})
        for i in range(0, len(reply), 100):
            await peer.send(TextMessage(data=reply[i : i + 100], message_finished=i + 100 >= len(reply)))
        while True:
            event = await peer.next_event()
            if isinstance(event, Pong):
                pongs.append(event.payload)
            elif isinstance(event, CloseConnection):
                await peer.send(event.response())
                return

    async with raw_server(script) as (url, errors):
        async with connect(url) as client:
            assert client.app_id == "frag-app"
            response = await client.request("ping", timeout=WAIT)
            assert response.data == {"ok": "é" * 1000}
        assert client.close_code == 1000
    assert not errors
    assert pongs == [b"are you there"]


async def test_server_drops_tcp_fails_pending_request_promptly() -> None:
    async def script(peer: RawPeer) -> None:
        await peer.accept()
        await peer.send_connected()
        await peer.next_message()
        await peer.stream.aclose()  # vanish without a close frame

    async with raw_server(script) as (url, errors), connect(url, request_timeout=30) as client:
        start = anyio.current_time()
        with pytest.raises(ConnectionClosed) as info:
            await client.request("anything")
        assert anyio.current_time() - start < 1
        assert info.value.code == 1006
        assert client.closed
    assert not errors


async def test_message_too_big_closes_with_1009() -> None:
    close_codes: list[int] = []

    async def script(peer: RawPeer) -> None:
        await peer.accept()
        await peer.send_connected()
        await peer.send_json({"type": "notification", "message_id": "n", "data": {"blob": "y" * 5000}})
        while True:
            event = await peer.next_event()
            if isinstance(event, CloseConnection):
                close_codes.append(event.code)
                await peer.send(event.response())
                return

    async with raw_server(script) as (url, errors), connect(url, max_message_size=1000) as client:
        assert await client.wait_closed(timeout=WAIT) == 1009
        with pytest.raises(ConnectionClosed):
            await client.receive(timeout=WAIT)
    assert not errors
    assert close_codes == [1009]


async def test_invalid_utf8_text_frame_is_sent_verbatim() -> None:
    close_codes: list[int] = []

    async def script(peer: RawPeer) -> None:
        await peer.accept()
        await peer.send_connected()
        # A valid text frame built by the client's own framing first...
        assert (await peer.next_message())["type"] == "hello"
        # ...then the invalid one: wsproto on this side rejects it with 1007.
        event = await peer.next_event()
        assert isinstance(event, CloseConnection)
        close_codes.append(event.code)
        await peer.send(CloseConnection(code=event.code, reason="invalid utf-8"))

    async with raw_server(script) as (url, errors), connect(url) as client:
        await client.send("hello")
        await send_raw_text_bytes(client, b'{"type": "\xff\xfe"}')
        assert await client.wait_closed(timeout=WAIT) == 1007
        assert client.close_reason == "invalid utf-8"
    assert not errors
    assert close_codes == [1007]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a certificate")
async def test_wss_with_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await anyio.run_process(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
    )  # fmt: skip
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    targets: list[str] = []

    async def script(peer: RawPeer) -> None:
        request = await peer.accept()
        targets.append(request.target)
        await peer.send_connected("tls-app")
        message = await peer.next_message()
        await peer.send_json({"type": "ping_res", "message_id": message["message_id"], "data": {}})
        while not isinstance(await peer.next_event(), CloseConnection):
            pass
        await peer.send(CloseConnection(code=1000))

    async with raw_server(script, server_ctx) as (url, errors):
        assert url.startswith("wss://")
        async with connect(url + "?q=1", ssl_context=client_ctx) as client:
            assert client.app_id == "tls-app"
            assert (await client.request("ping", timeout=WAIT)).type == "ping_res"
        assert client.close_code == 1000
    assert not errors
    assert targets == ["/raw?q=1"]


async def test_close_is_bounded_when_server_never_answers() -> None:
    finished = anyio.Event()

    async def script(peer: RawPeer) -> None:
        await peer.accept()
        await peer.send_connected()
        with anyio.fail_after(WAIT):
            await finished.wait()  # ignore the close frame entirely

    async with raw_server(script) as (url, errors):
        start = anyio.current_time()
        async with connect(url, close_timeout=0.2) as client:
            pass
        assert anyio.current_time() - start < 2
        assert client.close_code == 1006
        finished.set()
    assert not errors


async def test_connect_timeout_waiting_for_connected() -> None:
    finished = anyio.Event()

    async def script(peer: RawPeer) -> None:
        await peer.accept()  # never sends "connected"
        with anyio.fail_after(WAIT):
            await finished.wait()

    async with raw_server(script) as (url, errors):
        with pytest.raises(RequestTimeout):
            async with connect(url, open_timeout=0.2, close_timeout=0.1):
                pytest.fail("connected")
        finished.set()
    assert not errors


# ============================================================================================
# Backend-agnostic: the client under trio, uvicorn in a thread
# ============================================================================================


def test_client_under_trio() -> None:
    server = FakeServer()
    outcome: dict[str, Any] = {}

    async def main() -> None:
        import trio

        trio.lowlevel.current_trio_token()  # raises unless this really runs under trio
        async with connect(f"{base}/ws", subprotocols=["llmgine.v1"]) as client:
            outcome["app_id"] = client.app_id
            outcome["subprotocol"] = client.subprotocol

            @client.on_server_request("user_input")
            async def answer(message: Message) -> dict[str, Any]:
                return {"text": "from trio"}

            async def one(i: int) -> None:
                outcome[f"hold{i}"] = (await client.request("hold", {"n": 5, "value": i})).data["value"]

            with anyio.fail_after(WAIT):
                async with anyio.create_task_group() as tg:
                    for i in range(5):
                        tg.start_soon(one, i)
            ask = await client.request("ask", {"request_type": "user_input"})
            outcome["ask"] = ask.data["response"]["data"]
            pong = await client.request("ping_me", {"timestamp": "trio-ts"})
            outcome["pong"] = pong.data["pong"]["data"]["timestamp"]
            await client.request("send_binary")
            outcome["raw"] = (await client.receive(timeout=WAIT)).data
            with pytest.raises(RequestError):
                await client.request("fail")
            outcome["session"] = await client.create_session()
        outcome["close_code"] = client.close_code

    def run_trio() -> None:
        try:
            anyio.run(main, backend="trio")
        except BaseException as exc:
            outcome["error"] = exc

    # Run trio in a thread of its own: pytest's anyio plugin may hold an asyncio loop in this one.
    with serve_in_thread(server.app) as base:
        trio_thread = threading.Thread(target=run_trio, daemon=True)
        trio_thread.start()
        trio_thread.join(4 * WAIT)
        assert not trio_thread.is_alive(), "trio client hung"

    if "error" in outcome:
        raise outcome["error"]

    assert outcome["app_id"]
    assert outcome["subprotocol"] == "llmgine.v1"
    assert [outcome[f"hold{i}"] for i in range(5)] == list(range(5))
    assert outcome["ask"] == {"response_type": "user_input", "text": "from trio"}
    assert outcome["pong"] == "trio-ts"
    assert outcome["raw"] == b"\x00\x01binary"
    assert outcome["session"].startswith("sess-")
    assert outcome["close_code"] == 1000


def test_message_struct_is_frozen_and_decodes() -> None:
    decoded = msgspec.json.decode(b'{"type":"t","message_id":"m","data":{"a":1},"extra":true}', type=Message)
    assert decoded == Message(type="t", message_id="m", data={"a": 1}, server_initiated=False)
    with pytest.raises(AttributeError):
        decoded.type = "other"  # type: ignore[misc]
    assert issubclass(RequestTimeout, TimeoutError)
    assert issubclass(RequestTimeout, ClientError)
