"""One anonymous connection must not be able to take a node down: every buffer it can fill is bounded by
configuration, a forced close is final, and cleanup keeps its deadlines whatever user code does (issue 10).

Each test plays the attack over a real socket and checks the bound the server kept.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import anyio
import anyio.to_thread
import pytest

from llmgine_ws import APIConfig, EngineContext, Extensions, Session, create_app
from llmgine_ws.auth import Handshake, Principal
from llmgine_ws.client import RequestError, connect

from .rawws import raw_connect
from .support import serve, small_send_buffer_socket, wait_cleaned

pytestmark = pytest.mark.anyio


def audit_events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if getattr(record, "event", None) == event]


def ping(n: int, pad: str = "") -> dict[str, Any]:
    return {"type": "ping", "message_id": f"p{n}", "data": {"timestamp": pad or n}}


# ------------------------------------------------------------------------ answers and floods


async def test_unsolicited_answers_are_rate_limited(make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Answers to nothing the server asked cost the sender like any message: RATE_LIMITED, then 1008."""
    app = make_app(rate_limit=5, rate_burst=5, rate_limit_strikes=3)
    async with serve(app) as server, raw_connect(server.ws_url) as raw:
        for n in range(40):
            kind = "server_response" if n % 2 else "server_pong"
            await raw.send_json({"type": kind, "message_id": str(uuid.uuid4()), "data": {"response_type": "x"}})
        messages = await raw.messages_until_close()
    codes = [m["data"]["code"] for m in messages if m["type"] == "error"]
    assert codes.count("UNKNOWN_REQUEST") == 5  # the burst, answered
    assert "RATE_LIMITED" in codes
    assert raw.close_code == 1008
    assert len(audit_events(caplog, "forced_close")) == 1


async def test_answers_to_the_servers_own_requests_are_never_rate_limited(make_app: Any) -> None:
    app = make_app(rate_limit=1, rate_burst=1, rate_limit_strikes=50)
    async with serve(app) as server, connect(server.ws_url, rate_limit_retries=0, resume=False) as client:
        answered = 0

        @client.on_server_request("question")
        async def answer(message: Any) -> dict[str, Any]:
            nonlocal answered
            answered += 1
            return {"response_type": "question", "value": answered}

        await client.request("ping", {"timestamp": 0})
        with pytest.raises(RequestError):  # the budget is spent
            await client.request("ping", {"timestamp": 1})
        api = server.runtime.messaging
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(api.send_to_app_and_wait, client.app_id, "server_request",
                              {"request_type": "question"}, 5)
        assert answered == 10


async def test_a_flooding_client_that_does_not_read_is_closed_with_bounded_queues(
        make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Pings answered to a client that never reads: the replies queue in the outbox, then in the backlog
    of frames from the reader; past either bound (frames or bytes) the client is stalled: 1013."""
    limit = 64 * 1024
    app = make_app(rate_limit=0, outbound_queue_size=32, outbound_queue_bytes=limit, send_grace=30)
    pad = "x" * 4000
    async with serve(app, sock=small_send_buffer_socket()) as server, raw_connect(server.ws_url) as raw:
        connection = next(iter(server.runtime.hub))
        for n in range(2000):
            await raw.send_json(ping(n, pad))
            if raw.broken or connection.closing:
                break
        await wait_cleaned(connection, timeout=10)
    assert connection.close_code == 1013
    [close] = audit_events(caplog, "forced_close")
    assert close.reason == "outbound queue full"
    assert close.backlog_bytes <= limit and close.backlog <= 32


async def test_a_forced_close_is_final_while_the_client_keeps_sending(
        make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    """After a 1008 the client streams pings as fast as it can: the close frame arrives anyway, the
    frames after it are not read, and the close is audited once."""
    app = make_app(rate_limit=10, rate_burst=10, rate_limit_strikes=5)
    async with serve(app) as server, raw_connect(server.ws_url) as raw:
        connection = next(iter(server.runtime.hub))
        sent = 0

        async def flood() -> None:
            nonlocal sent
            while not raw.broken:
                await raw.send_json(ping(sent))
                sent += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(flood)
            await raw.messages_until_close(timeout=10)
            tg.cancel_scope.cancel()
        await wait_cleaned(connection)
    assert raw.close_code == 1008
    assert len(audit_events(caplog, "forced_close")) == 1
    assert sent > 15  # the flood went on past the close


# ------------------------------------------------------------------------ requests held in flight


class AskingEngine:
    """Its first command waits for an answer the test never gives; every command holds its payload."""

    def __init__(self, session: Session, config: dict[str, Any]) -> None:
        self.config = config

    async def start(self) -> None:
        return None

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        if isinstance(command, dict) and command.get("ask"):
            return await ctx.ask_user("never answered", timeout=command.get("timeout"))
        if isinstance(command, dict) and command.get("block_thread"):
            await anyio.to_thread.run_sync(time.sleep, command["block_thread"])  # cannot be cancelled
        return {"len": len(command)}

    async def stop(self) -> None:
        return None


def asking_app(make_app: Any, **config: Any) -> Any:
    extensions = Extensions()
    extensions.register_engine("asking", AskingEngine)
    return make_app(extensions, **config)


async def test_queued_engine_commands_are_bounded_by_their_decoded_size(make_app: Any) -> None:
    """While an engine waits for the user, 1 MiB frames of ``[[],[],...]`` queue up behind it: the
    decoded payloads they would hold are counted, and past max_inflight_bytes they are refused."""
    limit = 16 * 1024 * 1024
    async with serve(asking_app(make_app, max_inflight_bytes=limit)) as server, \
            connect(server.ws_url, rate_limit_retries=0) as client:
        connection = server.runtime.hub.get(client.app_id)
        assert connection is not None
        session_id = await client.create_session()
        await client.create_engine(session_id, "asking")
        await client.send("engine_command", {"session_id": session_id, "command": {"ask": True}},
                          message_id="asks")
        nested = [[] for _ in range(300_000)]  # ~0.9 MiB of text, ~25 MiB once decoded
        refused = []
        for n in range(8):
            try:
                await client.request("engine_command", {"session_id": session_id, "command": nested},
                                     message_id=f"big-{n}", timeout=5)
            except RequestError as error:
                refused.append(error)
            except TimeoutError:
                pass  # queued behind the asking command: it holds its payload
        assert refused and all(error.code == "TOO_MANY_REQUESTS" for error in refused)
        assert refused[0].details["limit_bytes"] == limit
        assert connection.in_flight_bytes <= limit + refused[0].details["request_bytes"]
        assert len(connection.in_flight) < 8


async def test_a_request_past_the_byte_budget_is_refused_before_it_is_decoded(make_app: Any) -> None:
    """Decoding is the expensive part (~70 ms and ~25 MiB for 1 MiB of ``[[],[],…]``): a big frame the
    in-flight budget cannot take is refused from its envelope alone — even an invalid one gets
    TOO_MANY_REQUESTS, not the VALIDATION_ERROR decoding would have found."""
    async with serve(asking_app(make_app, max_inflight_bytes=1024 * 1024)) as server, \
            connect(server.ws_url, rate_limit_retries=0) as client:
        connection = server.runtime.hub.get(client.app_id)
        assert connection is not None

        @client.on_user_input
        async def walk_away(request: Any) -> str:
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

        session_id = await client.create_session()
        await client.create_engine(session_id, "asking")
        await client.send("engine_command", {"session_id": session_id, "command": {"ask": True}}, message_id="asks")
        await server.eventually(lambda: "asks" in connection.in_flight)
        nested = [[] for _ in range(300_000)]
        with pytest.raises(RequestError) as error:
            await client.request("engine_command", {"session_id": 5, "command": nested}, message_id="bad", timeout=5)
        assert error.value.code == "TOO_MANY_REQUESTS"
        assert error.value.details["request_bytes"] > 1024 * 1024
        await client.request("ping", {"timestamp": "x" * 5000})  # inline: never refused for the budget


async def test_cleanup_keeps_its_deadline_when_user_code_cannot_be_cancelled(make_app: Any) -> None:
    """A command blocked in a thread cannot be cancelled: cleanup abandons it after engine_stop_timeout
    instead of keeping the connection, session, engine and address slot registered until it returns."""
    app = asking_app(make_app, engine_stop_timeout=0.2)
    async with serve(app) as server:
        async with connect(server.ws_url, resume=False) as client:
            connection = server.runtime.hub.get(client.app_id)
            assert connection is not None
            session_id = await client.create_session()
            await client.create_engine(session_id, "asking")
            await client.send("engine_command", {"session_id": session_id, "command": {"block_thread": 2}})
            await server.eventually(lambda: bool(connection.in_flight))
            await client.abort()
        started = time.monotonic()
        await wait_cleaned(connection, timeout=1.5)
        assert time.monotonic() - started < 1.5
        runtime = server.runtime
        assert (len(runtime.hub), len(runtime.sessions), runtime.engines.running(),
                runtime.connection_counter.total) == (0, 0, 0, 0)


# ------------------------------------------------------------------------ sessions and users


async def test_one_address_cannot_take_the_whole_session_pool(make_app: Any) -> None:
    async with serve(make_app()) as server:  # defaults: 100 sessions, 20 per connection, 20 per address
        async with connect(server.ws_url) as a, connect(server.ws_url) as b:
            for _ in range(15):
                await a.create_session()
            for _ in range(5):
                await b.create_session()
            with pytest.raises(RequestError) as refused:
                await b.create_session()
        assert refused.value.code == "SESSION_LIMIT_REACHED"
        assert refused.value.details == {"max_sessions_per_ip": 20}
        assert len(server.runtime.sessions) == 0  # and the slots came back with the sessions


async def same_user(handshake: Handshake) -> Principal:
    return Principal(user_id="alice", method="test")


async def test_a_users_connections_share_one_message_budget(make_app: Any) -> None:
    app = create_app(APIConfig(ping_interval=0, rate_limit=0, user_rate_limit=2, user_rate_burst=6),
                     authenticator=same_user)
    async with serve(app) as server, connect(server.ws_url, rate_limit_retries=0, resume=False) as a, \
            connect(server.ws_url, rate_limit_retries=0, resume=False) as b:
        outcomes = []
        for n in range(10):
            try:
                await (a if n % 2 else b).request("ping", {"timestamp": n})
                outcomes.append("ok")
            except RequestError as error:
                outcomes.append(error.code)
        assert outcomes[:6] == ["ok"] * 6
        assert "RATE_LIMITED" in outcomes[6:]
    assert len(server.runtime.gate._user_buckets) == 0  # forgotten with the user's last connection


async def test_user_buckets_are_per_user(make_app: Any) -> None:
    users = iter(["alice", "bob"])

    async def one_user_each(handshake: Handshake) -> Principal:
        return Principal(user_id=next(users), method="test")

    app = create_app(APIConfig(ping_interval=0, rate_limit=0, user_rate_limit=1, user_rate_burst=3),
                     authenticator=one_user_each)
    async with serve(app) as server, connect(server.ws_url, rate_limit_retries=0, resume=False) as a, \
            connect(server.ws_url, rate_limit_retries=0, resume=False) as b:
        for client in (a, b):
            for n in range(3):
                await client.request("ping", {"timestamp": n})


# ------------------------------------------------------------------------ expected outcomes are not errors


async def test_an_unanswered_question_is_a_typed_timeout_without_a_traceback(
        make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    async with serve(asking_app(make_app)) as server, connect(server.ws_url) as client:
        session_id = await client.create_session()
        await client.create_engine(session_id, "asking")

        @client.on_user_input
        async def walk_away(request: Any) -> str:
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

        result = await client.command(session_id, {"ask": True, "timeout": 0.2}).wait()
    assert result.status == "failed"
    assert result.error == "the user did not answer in time"
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith("llmgine_ws")]


async def test_shutdown_answers_a_command_waiting_for_the_user_before_closing(
        make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The command's question is withdrawn and the command answered (failed) before the 1001; the
    ServerShuttingDown it ended with is an expected outcome, logged without ERROR or traceback."""
    app = asking_app(make_app, drain_timeout=0.2, handle_signals=False)
    async with serve(app) as server, raw_connect(server.ws_url) as raw:
        assert (await raw.receive_json())["type"] == "connected"
        await raw.send_json({"type": "create_session", "message_id": "s", "data": {}})
        session_id = (await raw.receive_json())["data"]["session_id"]
        await raw.send_json({"type": "create_engine", "message_id": "e",
                             "data": {"session_id": session_id, "engine_type": "asking"}})
        await raw.send_json({"type": "engine_command", "message_id": "run",
                             "data": {"session_id": session_id, "command": {"ask": True}}})
        connection = next(iter(server.runtime.hub))
        await server.eventually(lambda: bool(connection.pending))
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.runtime.shutdown)
            messages = await raw.messages_until_close(timeout=10)
    kinds = [m["type"] for m in messages]
    question = next(m for m in messages if m["type"] == "server_request")
    withdrawn = next(m for m in messages if m["type"] == "server_request_cancelled")
    assert withdrawn["data"]["message_id"] == question["message_id"]
    result = next(m for m in messages if m["type"] == "engine_command_res")
    assert result["data"]["status"] == "failed" and result["data"]["error"] == "the server is shutting down"
    assert kinds.index("engine_command_res") > kinds.index("server_request")
    assert raw.close_code == 1001
    noisy = [r for r in caplog.records
             if r.name.startswith("llmgine_ws") and (r.exc_info or r.levelno >= logging.ERROR)]
    assert not noisy, [r.getMessage() for r in noisy]
