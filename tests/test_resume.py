"""Resume (issue 12, one node) over real sockets: a raw client behind a TCP proxy the test severs or
black-holes; uvicorn serves the app in the test's loop. The Python client's own resume is tested
with the client."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from starlette.testclient import TestClient

from llmgine_ws import APIConfig, EngineContext, Extensions, create_app
from llmgine_ws.context import HandlerContext
from llmgine_ws.errors import AppDisconnected

from .rawws import RawClient, raw_connect
from .support import LiveServer, serve, wait_cleaned
from .tcp_proxy import TcpProxy, tcp_proxy

pytestmark = pytest.mark.anyio


class Peer:
    """A raw client that checks ``seq`` (1, 2, 3… without gaps) and acks on request."""

    def __init__(self, raw: RawClient) -> None:
        self.raw = raw
        self.last_seq = 0
        self.connected: dict[str, Any] = {}

    @property
    def app_id(self) -> str:
        return str(self.connected["data"]["app_id"])

    @property
    def token(self) -> str:
        return str(self.connected["data"]["resume_token"])

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        message = await self.raw.receive_json(timeout)
        if "seq" in message:
            assert message["seq"] == self.last_seq + 1, (message, self.last_seq)
            self.last_seq = message["seq"]
        return message

    async def recv_type(self, message_type: str, timeout: float = 5.0) -> dict[str, Any]:
        with anyio.fail_after(timeout):
            while True:
                message = await self.recv()
                if message["type"] == message_type:
                    return message

    async def until_result(self, events: list[Any],
                           event_key: Callable[[dict[str, Any]], Any] = lambda data: data["seq"],
                           timeout: float = 5.0) -> dict[str, Any]:
        """Read up to the command's ``engine_command_res`` (returned), appending each ``engine_event``'s
        ``event_key(data)`` to ``events`` on the way."""
        while True:
            message = await self.recv(timeout)
            if message["type"] == "engine_event":
                events.append(event_key(message["data"]))
            elif message["type"] == "engine_command_res":
                return message

    async def send(self, message_type: str, data: Any = None, message_id: str = "m") -> None:
        await self.raw.send_json({"type": message_type, "message_id": message_id, "data": data or {}})

    async def ack(self, seq: int | None = None) -> None:
        await self.send("ack", {"seq": self.last_seq if seq is None else seq}, "ack")

    async def ack_synced(self) -> None:
        """Ack, and make sure the server has read it (a ping round trip behind it) before a drop."""
        await self.ack()
        await self.request("ping", {}, "sync")

    async def request(self, message_type: str, data: Any = None, message_id: str = "r") -> dict[str, Any]:
        await self.send(message_type, data, message_id)
        with anyio.fail_after(5):
            while True:
                message = await self.recv()
                if message.get("message_id") == message_id:
                    return message


@asynccontextmanager
async def peer(url: str, headers: list[tuple[str, str]] | None = None) -> AsyncIterator[Peer]:
    async with raw_connect(url, headers) as raw:
        client = Peer(raw)
        client.connected = await raw.receive_json()
        assert client.connected["type"] == "connected" and "seq" not in client.connected
        yield client


@asynccontextmanager
async def resumed(url: str, app_id: str, token: str, last_seq: int,
                  headers: list[tuple[str, str]] | None = None) -> AsyncIterator[tuple[Peer, dict[str, Any]]]:
    """A new connection that sends ``resume``; yields it (its seq continues the app's) and ``resume_res``."""
    async with peer(url, headers) as client:
        await client.send("resume", {"app_id": app_id, "resume_token": token, "last_seq": last_seq}, "res")
        with anyio.fail_after(5):
            while True:  # frames before resume_res belong to the throwaway app of this connection
                message = await client.raw.receive_json()
                if message["type"] == "resume_res":
                    break
        assert "seq" not in message
        if message["data"]["resumed"]:
            client.last_seq = last_seq
        yield client, message


class Gates:
    """Events the test's engines and handlers wait on, and what they report."""

    def __init__(self) -> None:
        self.events: dict[str, anyio.Event] = {}
        self.runs: dict[str, int] = {}
        self.callbacks: list[tuple[str, str]] = []

    def __getitem__(self, name: str) -> anyio.Event:
        return self.events.setdefault(name, anyio.Event())


class GatedEngine:
    def __init__(self, gates: Gates) -> None:
        self.gates = gates

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        if command["kind"] == "stream":
            for i in range(command["n"]):
                if i == command.get("pause_at"):
                    await self.gates[command["gate"]].wait()
                await ctx.emit("token", {"i": i})
            return {"n": command["n"]}
        answer = await ctx.ask_user("name?")
        return {"answer": answer}


def extensions_for(gates: Gates) -> Extensions:
    extensions = Extensions()
    extensions.register_engine("test", lambda session, config: GatedEngine(gates))

    async def slow(data: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
        gates.runs[ctx.message_id] = gates.runs.get(ctx.message_id, 0) + 1
        await gates[data["gate"]].wait()
        return {"done": data["gate"]}

    async def blast(data: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
        for i in range(data["n"]):
            await ctx.send("noise", {"i": i, "pad": "x" * data.get("pad", 0)})
        return {"sent": data["n"]}

    extensions.register_handler("slow", dict[str, Any], slow)
    extensions.register_handler("blast", dict[str, Any], blast)
    for event in ("connect", "disconnect", "detached", "resumed"):
        async def record(app_id: str, event: str = event) -> None:
            gates.callbacks.append((event, app_id))
        extensions.register_connection_callback(event, record)  # type: ignore[arg-type]
    return extensions


@asynccontextmanager
async def stack(make_app: Callable[..., Any], **config: Any) -> AsyncIterator[tuple[LiveServer, TcpProxy, Gates]]:
    gates = Gates()
    config.setdefault("resume_window", 120)
    async with serve(make_app(extensions_for(gates), **config)) as server, tcp_proxy(server.port) as proxy:
        yield server, proxy, gates


async def start_engine(client: Peer) -> str:
    session_id = (await client.request("create_session", {}, "cs"))["data"]["session_id"]
    reply = await client.request("create_engine", {"session_id": session_id, "engine_type": "test"}, "ce")
    assert reply["type"] == "create_engine_res", reply
    return str(session_id)


def app_of(server: LiveServer, app_id: str) -> Any:
    connection = server.runtime.hub.get(app_id)
    assert connection is not None
    return connection


# ------------------------------------------------------------------------ the wire


async def test_connected_has_token_and_window_and_every_frame_a_seq(make_app: Callable[..., Any]) -> None:
    async with stack(make_app) as (_server, proxy, _), peer(proxy.ws_url()) as client:
        data = client.connected["data"]
        assert data["resume_window"] == 120
        assert len(data["resume_token"]) >= 22 and set(data["resume_token"]) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        for i in range(3):
            reply = await client.request("ping", {"timestamp": i}, f"p{i}")
            assert reply["seq"] == i + 1


async def test_resume_off_omits_the_fields(make_app: Callable[..., Any]) -> None:
    async with stack(make_app, resume_window=0) as (_server, proxy, _), peer(proxy.ws_url()) as client:
        assert set(client.connected["data"]) == {"app_id", "status"}
        await client.ack()
        reply = await client.request("resume", {"app_id": client.app_id, "resume_token": "x" * 30, "last_seq": 0})
        assert reply["data"] == {"resumed": False, "reason": "disabled", "app_id": client.app_id}


# ------------------------------------------------------------------------ what survives a drop


async def test_drop_mid_engine_stream_replays_every_event_once_in_order(make_app: Callable[..., Any]) -> None:
    async with stack(make_app) as (server, proxy, gates):
        async with peer(proxy.ws_url()) as client:
            session_id = await start_engine(client)
            await client.ack()
            await client.send("engine_command", {"session_id": session_id,
                                                 "command": {"kind": "stream", "n": 200, "pause_at": 50,
                                                             "gate": "go"}}, "cmd")
            events = []
            while len(events) < 50:
                message = await client.recv()
                if message["type"] == "engine_event":
                    events.append(message["data"]["seq"])
            await client.ack(client.last_seq - 10)  # acked a little behind what it holds
            app_id, token, last_seq = client.app_id, client.token, client.last_seq
            connection = app_of(server, app_id)
            await proxy.sever()
            await server.eventually(lambda: connection.detached)
        gates["go"].set()  # the engine goes on while detached: its events go to the buffer
        await server.eventually(lambda: not connection.in_flight)
        assert server.runtime.messaging.is_app_connected(app_id)
        assert [p.state for p in server.runtime.messaging.get_presence()] == ["detached"]
        async with resumed(proxy.ws_url(), app_id, token, last_seq) as (client, answer):
            assert answer["data"]["resumed"] is True
            assert answer["data"]["app_id"] == app_id
            assert answer["data"]["resume_token"] != token
            assert answer["data"]["sessions"] == [{"session_id": session_id, "status": "active", "engine": {
                "engine_id": answer["data"]["sessions"][0]["engine"]["engine_id"], "engine_type": "test",
                "status": "idle"}}]
            replayed = answer["data"]["replayed"]
            assert replayed == 151  # 150 events and the result
            result = await client.until_result(events)
            assert events == list(range(200))
            assert result["data"] == {"session_id": session_id, "status": "completed", "result": {"n": 200}}
            assert ("detached", app_id) in gates.callbacks and ("resumed", app_id) in gates.callbacks
            assert ("disconnect", app_id) not in gates.callbacks
            assert [p.state for p in server.runtime.messaging.get_presence()] == ["connected"]
            await client.raw.send_close(1000)  # goodbye: the app ends
            await client.raw.messages_until_close()
        await wait_cleaned(connection)
        assert len(server.runtime.sessions) == 0


async def test_pending_question_is_asked_again_after_the_resume(make_app: Callable[..., Any]) -> None:
    async with stack(make_app) as (server, proxy, _):
        async with peer(proxy.ws_url()) as client:
            session_id = await start_engine(client)
            await client.ack()
            await client.send("engine_command", {"session_id": session_id, "command": {"kind": "ask"}}, "cmd")
            question = await client.recv_type("server_request")
            await client.ack_synced()  # acked: it is not in the replay, and still asked again
            app_id, token, last_seq = client.app_id, client.token, client.last_seq
            connection = app_of(server, app_id)
            await proxy.sever()
            await server.eventually(lambda: connection.detached)
        assert connection.pending  # the engine's question still waits
        async with resumed(proxy.ws_url(), app_id, token, last_seq) as (client, answer):
            assert answer["data"]["replayed"] == 0
            again = await client.recv()
            assert again["type"] == "server_request" and again["message_id"] == question["message_id"]
            assert again["seq"] == last_seq + 1
            await client.send("server_response", {"response_type": "user_input", "user_input": "Ada"},
                              question["message_id"])
            result = await client.recv_type("engine_command_res")
            assert result["data"]["result"] == {"answer": "Ada"}
            # a second answer to the same question is an unknown id
            await client.send("server_response", {"response_type": "user_input", "user_input": "again"},
                              question["message_id"])
            error = await client.recv_type("error")
            assert error["data"]["code"] == "INVALID_MESSAGE_ID" or error["message_id"] == question["message_id"]


@pytest.mark.parametrize("answered_while_detached", [False, True])
async def test_a_request_resent_after_the_resume_is_answered_once(make_app: Callable[..., Any],
                                                                   answered_while_detached: bool) -> None:
    async with stack(make_app) as (server, proxy, gates):
        async with peer(proxy.ws_url()) as client:
            await client.ack()
            await client.send("slow", {"gate": "slow"}, "req-1")
            connection = app_of(server, client.app_id)
            await server.eventually(lambda: "req-1" in connection.in_flight)
            app_id, token, last_seq = client.app_id, client.token, client.last_seq
            await proxy.sever()
            await server.eventually(lambda: connection.detached)
        if answered_while_detached:
            gates["slow"].set()
            await server.eventually(lambda: not connection.in_flight)
        async with resumed(proxy.ws_url(), app_id, token, last_seq) as (client, answer):
            assert answer["data"]["replayed"] == (1 if answered_while_detached else 0)
            await client.send("slow", {"gate": "slow"}, "req-1")  # the client resends what got no answer
            gates["slow"].set()
            reply = await client.recv_type("slow_res")
            assert reply["message_id"] == "req-1" and reply["data"] == {"done": "slow"}
            reply = await client.request("ping", {}, "after")  # nothing else came in between
            assert reply["type"] == "ping_res"
        assert gates.runs["req-1"] == 1


# ------------------------------------------------------------------------ the window and the bounds


async def test_window_expiry_cleans_up_then_expired_then_unknown(make_app: Callable[..., Any]) -> None:
    async with stack(make_app, resume_window=0.3) as (server, proxy, gates):
        async with peer(proxy.ws_url()) as client:
            await start_engine(client)
            await client.ack_synced()
            app_id, token, last_seq = client.app_id, client.token, client.last_seq
            connection = app_of(server, app_id)
            await proxy.sever()
        await wait_cleaned(connection)
        assert len(server.runtime.sessions) == 0 and server.runtime.engines.running() == 0
        assert [event for event, app in gates.callbacks if app == app_id] == ["connect", "detached", "disconnect"]
        async with resumed(proxy.ws_url(), app_id, "wrong" + token, last_seq) as (_, answer):
            assert answer["data"]["reason"] == "unknown"  # a wrong token learns nothing
        async with resumed(proxy.ws_url(), app_id, token, last_seq) as (client, answer):
            assert answer["data"]["resumed"] is False and answer["data"]["reason"] == "expired"
            assert answer["data"]["app_id"] == client.app_id != app_id
            assert answer["data"]["resume_token"] == client.token
        async with resumed(proxy.ws_url(), app_id, token, last_seq) as (_, answer):
            assert answer["data"]["reason"] == "unknown"


async def test_overflow_while_connected_evicts_then_gap(make_app: Callable[..., Any]) -> None:
    async with stack(make_app, resume_buffer_bytes=4000) as (server, proxy, _):
        async with peer(proxy.ws_url()) as client:
            await client.ack()
            reply = await client.request("blast", {"n": 100, "pad": 50}, "b")
            assert reply["data"] == {"sent": 100}
            app_id, token = client.app_id, client.token
            connection = app_of(server, app_id)
            assert connection.resume.buffered_bytes <= 4000 and connection.resume.evicted > 0
            await proxy.sever()
            await server.eventually(lambda: connection.detached)
        async with resumed(proxy.ws_url(), app_id, token, 0) as (_, answer):
            assert answer["data"]["reason"] == "gap"
        await wait_cleaned(connection)  # its rightful owner cannot continue it: it ends


async def test_overflow_while_detached_ends_the_app(make_app: Callable[..., Any]) -> None:
    async with stack(make_app, resume_buffer_bytes=4000) as (server, proxy, gates):
        async with peer(proxy.ws_url()) as client:
            await client.ack()
            await client.send("slow", {"gate": "go"}, "s")
            connection = app_of(server, client.app_id)
            await server.eventually(lambda: "s" in connection.in_flight)
            app_id, token, last_seq = client.app_id, client.token, client.last_seq
            await proxy.sever()
            await server.eventually(lambda: connection.detached)
        async def flood() -> None:
            for i in range(100):
                await server.runtime.messaging.send_to_app(app_id, "noise", {"i": i, "pad": "x" * 100})

        with pytest.raises(AppDisconnected):  # the frame that does not fit ends the app, never blocks
            await flood()
        await wait_cleaned(connection)
        assert ("disconnect", app_id) in gates.callbacks
        assert server.runtime.resumer.budget.used == 0
        async with resumed(proxy.ws_url(), app_id, token, last_seq) as (_, answer):
            assert answer["data"]["reason"] == "gap"


# ------------------------------------------------------------------------ security


async def test_token_is_single_use_and_a_wrong_token_or_seq_ahead_is_refused(make_app: Callable[..., Any],
                                                                            caplog: pytest.LogCaptureFixture
                                                                            ) -> None:
    caplog.set_level(logging.DEBUG)
    async with stack(make_app) as (server, proxy, _):
        async with peer(proxy.ws_url()) as client:
            await client.ack_synced()
            app_id, first_token = client.app_id, client.token
            connection = app_of(server, app_id)
            await proxy.sever()
            await server.eventually(lambda: connection.detached)
        wrong_token = first_token[:-1] + ("B" if first_token.endswith("A") else "A")  # 1 in 64 ends with "A"
        async with resumed(proxy.ws_url(), app_id, wrong_token, 0) as (_, answer):
            assert answer["data"]["reason"] == "unknown"
        async with resumed(proxy.ws_url(), "no-such-app", first_token, 0) as (_, answer):
            assert answer["data"]["reason"] == "unknown"
        async with resumed(proxy.ws_url(), app_id, first_token, 0) as (client, answer):
            assert answer["data"]["resumed"] is True
            second_token = answer["data"]["resume_token"]
            await proxy.sever()
            await server.eventually(lambda: connection.detached)
        async with resumed(proxy.ws_url(), app_id, first_token, 0) as (_, answer):
            assert answer["data"]["reason"] == "unknown"  # already used
        async with resumed(proxy.ws_url(), app_id, second_token, 5) as (_, answer):
            assert answer["data"]["reason"] == "gap"  # frames the server never sent
    logged = caplog.text
    assert first_token not in logged and second_token not in logged


async def test_another_principal_cannot_resume(make_app: Callable[..., Any]) -> None:
    keys = {"alice": "key-alice-0123456789", "bob": "key-bob-0123456789"}
    async with stack(make_app, api_keys=list(keys.values())) as (server, proxy, _):
        alice = [("authorization", f"Bearer {keys['alice']}")]
        bob = [("authorization", f"Bearer {keys['bob']}")]
        async with peer(proxy.ws_url(), alice) as client:
            await client.ack_synced()
            app_id, token = client.app_id, client.token
            connection = app_of(server, app_id)
            await proxy.sever()
            await server.eventually(lambda: connection.detached)
        async with resumed(proxy.ws_url(), app_id, token, 0, bob) as (_, answer):
            assert answer["data"]["reason"] == "unknown"
        async with resumed(proxy.ws_url(), app_id, token, 0, alice) as (_, answer):
            assert answer["data"]["resumed"] is True


async def test_two_resumes_with_one_token_exactly_one_wins(make_app: Callable[..., Any]) -> None:
    async with stack(make_app) as (server, proxy, _):
        async with peer(proxy.ws_url()) as client:
            await client.ack_synced()
            app_id, token = client.app_id, client.token
            connection = app_of(server, app_id)
            await proxy.sever()
            await server.eventually(lambda: connection.detached)
        async with peer(proxy.ws_url()) as first, peer(proxy.ws_url()) as second:
            for contender in (first, second):  # both on the wire before either is answered
                await contender.send("resume", {"app_id": app_id, "resume_token": token, "last_seq": 0}, "res")
            outcomes = sorted([(await first.recv_type("resume_res"))["data"]["resumed"],
                               (await second.recv_type("resume_res"))["data"]["resumed"]])
        assert outcomes == [False, True]


async def test_half_open_socket_is_superseded(make_app: Callable[..., Any]) -> None:
    async with stack(make_app) as (server, proxy, _), peer(proxy.ws_url()) as client:
        await client.ack_synced()
        app_id, token, last_seq = client.app_id, client.token, client.last_seq
        connection = app_of(server, app_id)
        old_link = connection.link
        proxy.blackhole()  # neither side notices
        async with resumed(proxy.ws_url(), app_id, token, last_seq) as (fresh, answer):
            assert answer["data"]["resumed"] is True
            assert old_link.close_code == 4000 and connection.link is not old_link
            await server.eventually(lambda: old_link.released.is_set())
            reply = await fresh.request("ping", {}, "p")
            assert reply["type"] == "ping_res" and reply["seq"] == last_seq + 1
            assert not connection.closing


# ------------------------------------------------------------------------ what did not change


async def test_a_client_that_never_acks_is_cleaned_up_at_disconnect(make_app: Callable[..., Any]) -> None:
    async with stack(make_app) as (server, proxy, gates):
        async with peer(proxy.ws_url()) as client:
            await start_engine(client)
            app_id, token = client.app_id, client.token
            connection = app_of(server, app_id)
            await proxy.sever()
        await wait_cleaned(connection)
        assert len(server.runtime.sessions) == 0
        assert ("detached", app_id) not in gates.callbacks and ("disconnect", app_id) in gates.callbacks
        assert connection.resume.buffered == 0
        async with resumed(proxy.ws_url(), app_id, token, 0) as (_, answer):
            assert answer["data"]["reason"] == "unknown"


async def test_close_1000_ends_even_a_resumable_app(make_app: Callable[..., Any]) -> None:
    async with stack(make_app) as (server, proxy, gates):
        async with peer(proxy.ws_url()) as client:
            await start_engine(client)
            await client.ack_synced()
            connection = app_of(server, client.app_id)
            await client.raw.send_close(1000)
            await client.raw.messages_until_close()
        await wait_cleaned(connection)
        assert ("detached", connection.app_id) not in gates.callbacks
        assert len(server.runtime.sessions) == 0


# ------------------------------------------------------------------------ trio


def test_resume_under_trio() -> None:
    """The server side of a resume on trio (Starlette's test client drives the ASGI app there)."""
    gates = Gates()
    app = create_app(APIConfig(ping_interval=0), extensions_for(gates))
    with TestClient(app, backend="trio") as http:
        with http.websocket_connect("/api/ws") as ws:
            connected = ws.receive_json()["data"]
            ws.send_json({"type": "create_session", "message_id": "c", "data": {}})
            created = ws.receive_json()
            session_id, last_seq = created["data"]["session_id"], created["seq"]
            ws.send_json({"type": "ack", "message_id": "a", "data": {"seq": last_seq}})
            ws.send_json({"type": "ping", "message_id": "p", "data": {}})
            assert ws.receive_json()["seq"] == last_seq + 1
            ws.close(1001)  # going away: a drop, not a goodbye
        runtime = app.state.llmgine
        connection = runtime.hub.get(connected["app_id"])
        assert connection is not None
        with http.websocket_connect("/api/ws") as ws:
            ws.receive_json()
            ws.send_json({"type": "resume", "message_id": "r", "data": {
                "app_id": connected["app_id"], "resume_token": connected["resume_token"], "last_seq": last_seq}})
            answer = ws.receive_json()
            assert answer["type"] == "resume_res" and answer["data"]["resumed"] is True
            assert answer["data"]["replayed"] == 1 and answer["data"]["sessions"][0]["session_id"] == session_id
            assert ws.receive_json() == {"seq": last_seq + 1, "type": "ping_res", "message_id": "p",
                                         "data": {"timestamp": None}}
    assert len(runtime.hub) == 0 and len(runtime.sessions) == 0


async def test_detached_apps_keep_their_connection_slot_and_resumes_are_counted(make_app: Callable[..., Any]
                                                                               ) -> None:
    async with stack(make_app, max_connections_per_ip=1) as (server, proxy, _):
        async with peer(proxy.ws_url()) as client:
            await client.ack_synced()
            app_id, token, last_seq = client.app_id, client.token, client.last_seq
            connection = app_of(server, app_id)
            await proxy.sever()
            await server.eventually(lambda: connection.detached)
        assert server.runtime.connection_counter.total == 1  # a detached app cannot be farmed for free
        async with peer(proxy.ws_url()) as comeback:  # one past the cap: the address has a detached app
            with pytest.raises(AssertionError, match="handshake rejected"):  # but only one (429)
                async with peer(proxy.ws_url()):
                    pass
            await comeback.send("resume", {"app_id": app_id, "resume_token": token, "last_seq": last_seq}, "res")
            answer = await comeback.raw.receive_json()
            assert answer["type"] == "resume_res" and answer["data"]["resumed"] is True
            await server.eventually(lambda: server.runtime.connection_counter.total == 1)  # the throwaway's slot
            metrics = server.runtime.metrics
            if metrics is not None:
                assert metrics.resumes == {"resumed": 1}
            assert server.runtime.live_counts()["detached_apps"] == 0
