"""Slow consumers over real sockets: nobody else waits for them, and they never see a gap."""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
import pytest

from llmgine_ws import EngineContext, Extensions, Session
from llmgine_ws.client import Client, connect

from .rawws import raw_connect
from .support import serve, small_send_buffer_socket, wait_cleaned

pytestmark = pytest.mark.anyio

PAYLOAD = "x" * 8192  # big frames fill the stalled client's socket buffers quickly


async def receive_all(client: Client, count: int) -> list[int]:
    seen: list[int] = []
    with anyio.fail_after(30):
        while len(seen) < count:
            message = await client.receive()
            if message.type == "tick":
                seen.append(message.data["n"])
    return seen


async def test_broadcast_is_not_held_up_by_a_stalled_client(make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(outbound_queue_size=16, send_grace=0.5, rate_limit=0, broadcast_rate_limit=0)
    rounds = 500
    with small_send_buffer_socket() as sock:
        await _broadcast_with_a_stalled_client(app, sock, rounds)
    closes = [r for r in caplog.records if getattr(r, "event", None) == "forced_close"]
    assert [r.reason for r in closes] == ["outbound queue full"]  # type: ignore[attr-defined]


async def _broadcast_with_a_stalled_client(app: Any, sock: Any, rounds: int) -> None:
    async with serve(app, sock=sock) as server, raw_connect(server.ws_url) as stalled:
        runtime = server.runtime
        async with connect(server.ws_url, inbox_limit=rounds * 2) as a, \
                connect(server.ws_url, inbox_limit=rounds * 2) as b, \
                connect(server.ws_url, inbox_limit=rounds * 2) as c:
            stalled_connection = next(conn for conn in runtime.hub if conn.app_id not in {a.app_id, b.app_id,
                                                                                          c.app_id})
            reached = []
            for n in range(rounds):
                reached.append(await runtime.messaging.broadcast("tick", {"n": n, "pad": PAYLOAD}))
                await anyio.lowlevel.checkpoint()
            # Every reader got every message, in order, while the stalled client was closed (1013)
            # instead of being allowed to hold anyone up or to lose messages silently.
            for client in (a, b, c):
                assert await receive_all(client, rounds) == list(range(rounds))
            await wait_cleaned(stalled_connection, timeout=30)
            assert stalled_connection.close_code == 1013
            assert min(reached) >= 3
        messages = await stalled.messages_until_close(timeout=10)
    ticks = [message["data"]["n"] for message in messages if message["type"] == "tick"]
    assert ticks == list(range(len(ticks)))  # what it did get has no gap
    assert stalled.close_code in (1013, None)


class Streamer:
    """Streams ``n`` large events."""

    def __init__(self, session: Session, config: dict[str, Any]) -> None:
        self.outcome: list[str] = config["outcome"]

    async def start(self) -> None:
        return None

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        try:
            for i in range(command["n"]):
                await ctx.emit("token", {"i": i, "pad": PAYLOAD})
        except BaseException as exc:
            self.outcome.append(type(exc).__name__)
            raise
        self.outcome.append("completed")
        return None

    async def stop(self) -> None:
        return None


async def test_engine_stream_to_a_stalled_client_closes_it_without_a_gap(make_app: Any) -> None:
    outcome: list[str] = []
    extensions = Extensions()
    extensions.register_engine("stream", lambda session, config: Streamer(session, {"outcome": outcome}))
    app = make_app(extensions, outbound_queue_size=16, send_grace=0.3, rate_limit=0)
    with small_send_buffer_socket() as sock:
        events = await _stream_to_a_stalled_client(app, sock)
    assert events, "some events were delivered before the stall"
    assert [event["seq"] for event in events] == list(range(len(events)))  # no gap, ever
    assert len(events) < 2000
    assert outcome
    assert outcome[0] != "completed"


async def _stream_to_a_stalled_client(app: Any, sock: Any) -> list[dict[str, Any]]:
    async with serve(app, sock=sock) as server, raw_connect(server.ws_url) as raw:
        connection = next(iter(server.runtime.hub))
        await raw.send_text(json.dumps({"type": "create_session", "message_id": "c", "data": {}}))
        await server.eventually(lambda: bool(connection.session_ids))
        session_id = next(iter(connection.session_ids))
        await raw.send_text(json.dumps({"type": "create_engine", "message_id": "e",
                                        "data": {"session_id": session_id, "engine_type": "stream"}}))
        engines = server.runtime.engines  # a client waits for create_engine_res before commanding the engine
        await server.eventually(lambda: (handle := engines.get(session_id)) is not None and handle.status == "idle")
        await raw.send_text(json.dumps({"type": "engine_command", "message_id": "run",
                                        "data": {"session_id": session_id, "command": {"n": 2000}}}))
        await wait_cleaned(connection, timeout=30)  # the client never read: the server gave up on it
        assert connection.close_code == 1013
        messages = await raw.messages_until_close(timeout=10)
        assert len(server.runtime.sessions) == 0
    return [message["data"] for message in messages if message["type"] == "engine_event"]


async def test_a_slow_reader_slows_only_its_own_stream(make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A reader that is merely slow (not stalled) gets everything: backpressure, not a close."""
    caplog.set_level(logging.INFO, "llmgine_ws.audit")
    outcome: list[str] = []
    extensions = Extensions()
    extensions.register_engine("stream", lambda session, config: Streamer(session, {"outcome": outcome}))
    app = make_app(extensions, outbound_queue_size=4, send_grace=5, rate_limit=0)
    async with serve(app) as server, connect(server.ws_url, inbox_limit=10_000) as client:
        session_id = await client.create_session()
        await client.request("create_engine", {"session_id": session_id, "engine_type": "stream"})
        await client.send("engine_command", {"session_id": session_id, "command": {"n": 300}}, message_id="run")
        seqs = []
        with anyio.fail_after(30):
            while True:
                message = await client.receive()
                if message.type == "engine_event":
                    seqs.append(message.data["seq"])
                    if len(seqs) % 50 == 0:
                        await anyio.sleep(0.01)  # a slow consumer (the delay is the behaviour under test)
                elif message.type == "engine_command_res":
                    break
        assert seqs == list(range(300))
        assert message.data["status"] == "completed"
    assert not [r for r in caplog.records if getattr(r, "event", None) == "forced_close"]
