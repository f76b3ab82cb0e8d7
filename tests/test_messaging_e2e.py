"""The server-side messaging API against real clients over uvicorn."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import pytest

from llmgine_ws import (
    AppDisconnected,
    AppNotConnected,
    Extensions,
    HandlerContext,
    PendingRequestLimit,
    ServerRequestFailed,
    SessionNotFound,
)
from llmgine_ws.client import Message, connect

from .support import LiveServer, serve, wait_cleaned

pytestmark = pytest.mark.anyio


async def test_send_to_app_and_wait_round_trip(server: LiveServer) -> None:
    messaging = server.runtime.messaging
    async with connect(server.ws_url) as client:
        seen: list[Message] = []

        @client.on_server_request("user_input")
        async def answer(message: Message) -> dict[str, Any]:
            seen.append(message)
            return {"user_input": f"echo: {message.data['prompt']}"}

        response = await messaging.send_to_app_and_wait(
            client.app_id, "server_request", {"request_type": "user_input", "prompt": "name?"}, timeout=5)
        assert response.data == {"response_type": "user_input", "user_input": "echo: name?"}
        assert response.app_id == client.app_id
        # The client saw a proper server-initiated request with the same message_id.
        assert seen[0].server_initiated is True
        assert seen[0].type == "server_request"
        assert seen[0].message_id == response.message_id
        assert server.runtime.hub.pending_request_count() == 0


async def test_client_error_answer_raises_server_request_failed(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        with pytest.raises(ServerRequestFailed) as failure:
            await server.runtime.messaging.send_to_app_and_wait(
                client.app_id, data={"request_type": "no_such_handler"}, timeout=5)
        assert "no handler" in str(failure.value.error)


async def test_server_request_timeout_withdraws_the_request(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        received = anyio.Event()
        handler_cancelled = anyio.Event()

        @client.on_server_request("slow")
        async def slow(message: Message) -> dict[str, Any]:
            received.set()
            try:
                await anyio.sleep_forever()
            finally:
                handler_cancelled.set()
            raise AssertionError("unreachable")

        with pytest.raises(TimeoutError):
            await server.runtime.messaging.send_to_app_and_wait(client.app_id, data={"request_type": "slow"},
                                                                timeout=0.2)
        assert received.is_set()
        assert server.runtime.hub.pending_request_count() == 0
        notice = await client.receive(timeout=5)
        assert (notice.type, notice.server_initiated, notice.data["reason"]) == (
            "server_request_cancelled", True, "timeout")
        with anyio.fail_after(5):
            await handler_cancelled.wait()  # the client dropped the question (e.g. closed its dialog)


async def test_unknown_app(server: LiveServer) -> None:
    messaging = server.runtime.messaging
    with pytest.raises(AppNotConnected):
        await messaging.send_to_app("no-such-app", "notification", {"message": "hi"})
    with pytest.raises(AppNotConnected):
        await messaging.send_to_app_and_wait("no-such-app", data={"request_type": "x"}, timeout=1)
    with pytest.raises(SessionNotFound):
        await messaging.send_to_session("no-such-session", "notification", {})


async def test_disconnect_while_waiting_fails_the_waiter_within_100ms(server: LiveServer) -> None:
    messaging = server.runtime.messaging
    async with connect(server.ws_url, resume=False) as client:
        request_seen = anyio.Event()

        @client.on_server_request("never")
        async def never(message: Message) -> dict[str, Any]:
            request_seen.set()
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

        outcome: dict[str, Any] = {}

        async def wait_for_answer() -> None:
            try:
                await messaging.send_to_app_and_wait(client.app_id, data={"request_type": "never"}, timeout=30)
            except AppDisconnected as exc:
                outcome["error"] = exc
                outcome["at"] = time.monotonic()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for_answer)
            with anyio.fail_after(5):
                await request_seen.wait()
            assert server.runtime.hub.pending_request_count() == 1
            dropped_at = time.monotonic()
            await client.abort()
        assert isinstance(outcome["error"], AppDisconnected)
        assert outcome["at"] - dropped_at < 0.1, "the waiter must fail promptly, not at its timeout"
    assert server.runtime.hub.pending_request_count() == 0


async def test_handler_awaiting_its_own_connection_does_not_deadlock(make_app: Any) -> None:
    """The seed's request_user_input pattern, from inside a handler of the same connection."""

    async def greet(data: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
        answer = await ctx.messaging.send_to_app_and_wait(
            ctx.app_id, "server_request", {"request_type": "user_input", "prompt": "Your name?"}, timeout=5)
        confirm = await ctx.ask(data={"request_type": "user_confirmation", "message": "Proceed?",
                                      "options": ["yes", "no"]}, timeout=5)
        return {"greeting": f"hello {answer.data['user_input']}", "confirmed": confirm.data["selection"]}

    extensions = Extensions()
    extensions.register_handler("greet", dict[str, Any], greet)
    async with serve(make_app(extensions)) as server, connect(server.ws_url) as client:
        client.on_server_request("user_input")(lambda message: {"user_input": "Ada"})
        client.on_server_request("user_confirmation")(lambda message: {"selection": message.data["options"][0]})
        with anyio.fail_after(5):
            response = await client.request("greet", {})
        assert response.type == "greet_res"
        assert response.data == {"greeting": "hello Ada", "confirmed": "yes"}


async def test_server_responses_flow_while_many_handlers_wait(make_app: Any) -> None:
    async def ask(data: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
        answer = await ctx.ask(data={"request_type": "number", "n": data["n"]}, timeout=5)
        return {"n": answer.data["n"]}

    extensions = Extensions()
    extensions.register_handler("ask", dict[str, Any], ask)
    async with serve(make_app(extensions)) as server, connect(server.ws_url) as client:
        client.on_server_request("number")(lambda message: {"n": message.data["n"] * 10})
        results: dict[int, Any] = {}

        async def one(n: int) -> None:
            results[n] = (await client.request("ask", {"n": n})).data["n"]

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for n in range(30):
                    tg.start_soon(one, n)
        assert results == {n: n * 10 for n in range(30)}


async def test_notifications_send_to_app_and_session(server: LiveServer) -> None:
    messaging = server.runtime.messaging
    async with connect(server.ws_url) as client, connect(server.ws_url) as bystander:
        session_id = await client.create_session()
        await messaging.send_to_app(client.app_id, "notification",
                                    {"notification_type": "info", "message": "hello"})
        note = await client.receive(timeout=5)
        assert (note.type, note.server_initiated, note.data) == (
            "notification", True, {"notification_type": "info", "message": "hello"})

        await messaging.send_to_session(session_id, "notification", {"notification_type": "progress", "pct": 50})
        note = await client.receive(timeout=5)
        assert note.data == {"notification_type": "progress", "pct": 50, "session_id": session_id}

        await bystander.request("ping")  # the bystander got nothing: its next message is its own reply
        with pytest.raises(TimeoutError):
            await bystander.receive(timeout=0.05)


async def test_custom_server_message_struct(make_app: Any) -> None:
    class Progress(msgspec.Struct, frozen=True):
        step: int
        of: int

    extensions = Extensions()
    extensions.register_server_message("progress", Progress)
    async with serve(make_app(extensions)) as server, connect(server.ws_url) as client:
        await server.runtime.messaging.send_to_app(client.app_id, "progress", Progress(step=1, of=3))
        message = await client.receive(timeout=5)
        assert (message.type, message.data, message.server_initiated) == ("progress", {"step": 1, "of": 3}, True)


async def test_broadcast_with_exclusions_counts_recipients(server: LiveServer) -> None:
    messaging = server.runtime.messaging
    async with connect(server.ws_url) as a, connect(server.ws_url) as b, connect(server.ws_url) as c:
        sent = await messaging.broadcast("notification", {"message": "maintenance"}, exclude_apps={b.app_id})
        assert sent == 2
        for client in (a, c):
            message = await client.receive(timeout=5)
            assert message.data == {"message": "maintenance"}
        await b.request("ping")
        with pytest.raises(TimeoutError):
            await b.receive(timeout=0.05)
        assert await messaging.broadcast("notification", {}) == 3


async def test_presence_queries(server: LiveServer) -> None:
    messaging = server.runtime.messaging
    async with connect(server.ws_url) as a:
        async with connect(server.ws_url) as b:
            session_id = await b.create_session()
            assert sorted(messaging.get_connected_apps()) == sorted([a.app_id, b.app_id])
            assert messaging.is_app_connected(b.app_id)
            assert messaging.get_app_sessions(b.app_id) == [session_id]
            assert messaging.get_app_sessions(a.app_id) == []
            connection = server.runtime.hub.get(b.app_id)
        await wait_cleaned(connection)
        assert messaging.get_connected_apps() == [a.app_id]
        assert not messaging.is_app_connected(b.app_id)
        assert messaging.get_app_sessions(b.app_id) == []


async def test_pending_request_limit(make_app: Any) -> None:
    async with serve(make_app(max_pending_requests=2)) as server, connect(server.ws_url) as client:
        hold = anyio.Event()

        @client.on_server_request("hold")
        async def held(message: Message) -> dict[str, Any]:
            await hold.wait()
            return {}

        messaging = server.runtime.messaging
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(lambda: messaging.send_to_app_and_wait(client.app_id, data={"request_type": "hold"},
                                                                     timeout=5))
            await server.eventually(lambda: server.runtime.hub.pending_request_count() >= 2)
            with pytest.raises(PendingRequestLimit):
                await messaging.send_to_app_and_wait(client.app_id, data={"request_type": "hold"}, timeout=5)
            hold.set()


async def test_messaging_from_worker_threads(server: LiveServer) -> None:
    """Both ways in from a thread: anyio.from_thread in an anyio worker, and the blocking API anywhere."""
    messaging = server.runtime.messaging
    async with connect(server.ws_url) as client:
        client.on_server_request("user_input")(lambda message: {"user_input": "from-thread"})

        def in_anyio_worker() -> str:
            anyio.from_thread.run(messaging.send_to_app, client.app_id, "notification", {"message": "worker"})
            answer = anyio.from_thread.run(messaging.send_to_app_and_wait, client.app_id, "server_request",
                                           {"request_type": "user_input"}, 5)
            return str(answer.data["user_input"])

        assert await anyio.to_thread.run_sync(in_anyio_worker) == "from-thread"
        assert (await client.receive(timeout=5)).data == {"message": "worker"}

        results: dict[str, Any] = {}

        def in_plain_thread() -> None:
            blocking = messaging.blocking
            results["apps"] = blocking.get_connected_apps()
            results["connected"] = blocking.is_app_connected(client.app_id)
            blocking.send_to_app(client.app_id, "notification", {"message": "plain thread"})
            results["answer"] = blocking.send_to_app_and_wait(client.app_id, data={"request_type": "user_input"},
                                                              timeout=5).data["user_input"]
            results["count"] = blocking.broadcast("notification", {"message": "all"})

        thread = threading.Thread(target=in_plain_thread)
        thread.start()
        await anyio.to_thread.run_sync(thread.join, 5)
        assert not thread.is_alive()
        assert results == {"apps": [client.app_id], "connected": True, "answer": "from-thread", "count": 1}
        assert (await client.receive(timeout=5)).data == {"message": "plain thread"}
        assert (await client.receive(timeout=5)).data == {"message": "all"}


async def test_blocking_api_refuses_the_event_loop_thread(server: LiveServer) -> None:
    with pytest.raises(RuntimeError):
        server.runtime.messaging.blocking.get_connected_apps()


async def test_connect_callback_can_message_the_new_app(make_app: Any) -> None:
    extensions = Extensions()
    connected: list[str] = []
    disconnected: list[str] = []

    async def welcome(app_id: str) -> None:
        connected.append(app_id)
        await extensions.get_messaging_api().send_to_app(app_id, "notification", {"message": "welcome"})
        answer = await extensions.get_messaging_api().send_to_app_and_wait(
            app_id, data={"request_type": "user_input", "prompt": "nickname?"}, timeout=5)
        await extensions.get_messaging_api().send_to_app(app_id, "notification",
                                                         {"message": f"hi {answer.data['user_input']}"})

    async def bye(app_id: str) -> None:
        disconnected.append(app_id)

    extensions.register_connection_callback("connect", welcome)
    extensions.register_connection_callback("disconnect", bye)
    async with serve(make_app(extensions)) as server:
        async with connect(server.ws_url, wait_connected=False) as client:
            # Handlers registered before the first await: the server asks right after connecting.
            client.on_server_request("user_input")(lambda message: {"user_input": "neo"})
            assert (await client.receive(timeout=5)).type == "connected"
            assert (await client.receive(timeout=5)).data == {"message": "welcome"}
            assert (await client.receive(timeout=5)).data == {"message": "hi neo"}
            connection = server.runtime.hub.get(client.app_id)
        await wait_cleaned(connection)
    assert connected == [client.app_id]
    assert disconnected == [client.app_id]
