"""The Python client against the real server, over real sockets, under asyncio and trio.

Wire order, the engine helpers (commands, cancel, typed ask_user/confirm answers), server requests of
a custom message type, and backing off on ``RATE_LIMITED``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from starlette.applications import Starlette

from llmgine_ws import EngineContext, Extensions, HandlerContext, Session
from llmgine_ws.client import (
    ClientError,
    CommandResult,
    ConfirmationRequest,
    CreatedEngine,
    EngineEvent,
    Message,
    RequestError,
    RequestTimeout,
    UserInputRequest,
    connect,
)

from .client_support import serve_any
from .support import LiveServer

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Worker:
    """An engine whose commands say what to do: stream a burst, ask, run until cancelled, fail."""

    def __init__(self, session: Session, config: dict[str, Any]) -> None:
        self.session = session

    async def start(self) -> None:
        return None

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        kind = command["kind"]
        if kind == "burst":
            for i in range(command["n"]):
                await ctx.emit("token", {"i": i})
            return {"n": command["n"]}
        if kind == "ask":
            name = await ctx.ask_user("What is your name?", placeholder="a name")
            choice = await ctx.confirm(f"Greet {name}?", ["yes", "no", "maybe"])
            return {"name": name, "choice": choice}
        if kind == "forever":
            i = 0
            while True:
                await ctx.emit("tick", {"i": i})
                i += 1
                await anyio.sleep(0.002)
        if kind == "fail":
            raise RuntimeError("the engine broke")
        raise ValueError(kind)

    async def stop(self) -> None:
        return None


async def ask_me(data: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
    """Asks this very client (``send_to_app_and_wait``) with the message type it names; returns the answer."""
    answer = await ctx.ask(data["message_type"], data.get("data"), timeout=5)
    return answer.data


async def notify_me(data: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
    """Sends ``n`` notifications (or messages of ``type``) to this client before answering."""
    for i in range(data["n"]):
        await ctx.send(data.get("type", "notification"), {"notification_type": "info", "message": str(i)})
    return {"sent": data["n"]}


@pytest.fixture
def app(make_app: Callable[..., Starlette]) -> Starlette:
    extensions = Extensions()
    extensions.register_engine("worker", Worker)
    extensions.register_handler("ask_me", dict[str, Any], ask_me)
    extensions.register_handler("notify_me", dict[str, Any], notify_me)
    return make_app(extensions, rate_limit=0)


@pytest.fixture
async def server(app: Starlette) -> AsyncIterator[LiveServer]:
    async with serve_any(app) as live:
        yield live


# ------------------------------------------------------------------------------------- wire order


async def test_a_result_never_overtakes_the_events_before_it(server: LiveServer) -> None:
    """30 commands of 200 fast events, events handled by an ``on_message`` handler, commands sent
    with ``request``: every event of a command has been handled when its result is returned."""
    async with connect(server.ws_url) as client:
        session_id = await client.create_session()
        await client.request("create_engine", {"session_id": session_id, "engine_type": "worker"})
        handled: Counter[str] = Counter()

        @client.on_message("engine_event")
        async def on_event(message: Message) -> None:
            await anyio.lowlevel.checkpoint()  # a real handler awaits something
            handled[message.data["command_id"]] += 1

        for i in range(30):
            response = await client.request("engine_command", {"session_id": session_id,
                                                                "command": {"kind": "burst", "n": 200}},
                                             message_id=f"command-{i}")
            assert response.data["status"] == "completed"
            assert handled[f"command-{i}"] == 200, f"command {i}: {handled[f'command-{i}']} of 200 events handled"


async def test_a_handler_may_make_requests_and_still_runs_in_order(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        answered: list[str] = []

        @client.on_notification
        async def on_note(message: Message) -> None:
            # Answered although delivery is busy running this very handler.
            pong = await client.request("ping", {"timestamp": message.data["message"]}, timeout=5)
            answered.append(pong.data["timestamp"])

        response = await client.request("notify_me", {"n": 5})
        assert response.data == {"sent": 5}
        assert answered == ["0", "1", "2", "3", "4"]


# ------------------------------------------------------------------------------------- commands


async def test_command_iterates_its_events_and_ends_with_its_result(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        session_id = await client.create_session()
        created = await client.create_engine(session_id, "worker")
        assert isinstance(created, CreatedEngine)
        assert (created.session_id, created.engine_type) == (session_id, "worker")
        command = client.command(session_id, {"kind": "burst", "n": 50})
        events = [event async for event in command]
        assert all(isinstance(event, EngineEvent) for event in events)
        assert [event.seq for event in events] == list(range(50))
        assert {(event.session_id, event.command_id, event.event_type) for event in events} == {
            (session_id, command.message_id, "token")}
        assert [event.payload["i"] for event in events] == list(range(50))
        assert command.result == CommandResult(session_id=session_id, status="completed", result={"n": 50})
        assert command.done
        assert [event async for event in command] == []  # iterating again: nothing more

        # wait() reads a command to its end; a failing engine ends "failed" (not an exception).
        assert (await client.command(session_id, {"kind": "burst", "n": 3}).wait()).result == {"n": 3}
        failed = await client.command(session_id, {"kind": "fail"}).wait()
        assert failed.status == "failed"
        assert failed.error and "broke" not in failed.error  # generic: the exception's text stays on the server
        # The command's events reached its iterator only.
        with pytest.raises(RequestTimeout):
            await client.receive(timeout=0)


async def test_command_refusals_and_engine_errors_raise_request_error(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        session_id = await client.create_session()
        with pytest.raises(RequestError) as error:
            await client.command(session_id, {"kind": "burst", "n": 1}).wait()
        assert error.value.code == "ENGINE_NOT_FOUND"
        with pytest.raises(RequestError) as error:
            await client.create_engine(session_id, "no-such-engine")
        assert error.value.code == "INVALID_ENGINE_TYPE"
        await client.create_engine(session_id, "worker")
        await client.delete_engine(session_id)
        with pytest.raises(RequestError) as error:
            await anext(client.command(session_id, {"kind": "burst", "n": 1}))
        assert error.value.code == "ENGINE_NOT_FOUND"


async def test_cancel_a_running_command(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        session_id = await client.create_session()
        await client.create_engine(session_id, "worker")
        seqs = []
        async with client.command(session_id, {"kind": "forever"}) as command:
            async for event in command:
                seqs.append(event.seq)
                if event.seq == 3:
                    assert await command.cancel() is True
        assert seqs == list(range(len(seqs))) and len(seqs) >= 4
        assert command.result is not None and command.result.status == "cancelled"
        assert await client.cancel(command.message_id) is False  # already over

        other = client.command(session_id, {"kind": "forever"})
        first = await other.__anext__()
        assert first.seq == 0
        assert await client.cancel(other.message_id) is True
        assert (await other.wait()).status == "cancelled"


async def test_leaving_a_command_early_cancels_it_and_drops_its_frames(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        session_id = await client.create_session()
        await client.create_engine(session_id, "worker")
        async with client.command(session_id, {"kind": "forever"}) as command:
            async for _event in command:
                break
        # Commands to one engine run one at a time: this one runs only if the first was cancelled.
        with anyio.fail_after(10):
            assert (await client.command(session_id, {"kind": "burst", "n": 2}).wait()).status == "completed"
        with pytest.raises(RequestTimeout):  # the abandoned command's late events went nowhere
            await client.receive(timeout=0)


async def test_a_command_read_too_slowly_is_cancelled_not_stalling_the_rest(server: LiveServer) -> None:
    async with connect(server.ws_url, max_queue=16) as client:
        session_id = await client.create_session()
        await client.create_engine(session_id, "worker")
        unread = client.command(session_id, {"kind": "burst", "n": 500})
        # Everything else is still delivered while nobody reads the first command.
        with anyio.fail_after(10):
            assert (await client.command(session_id, {"kind": "burst", "n": 1}).wait()).status == "completed"
            assert (await client.request("ping")).type == "ping_res"
        seqs: list[int] = []

        async def read_all() -> None:
            async for event in unread:
                seqs.append(event.seq)

        with pytest.raises(ClientError, match="waiting to be read"):
            await read_all()
        assert seqs == list(range(16))


# ------------------------------------------------------------------------------------- ask_user / confirm


async def test_typed_answers_to_ask_user_and_confirm(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        asked: list[UserInputRequest] = []
        confirmations: list[ConfirmationRequest] = []

        @client.on_user_input
        async def name(request: UserInputRequest) -> str:
            asked.append(request)
            await anyio.lowlevel.checkpoint()
            return "Ada"

        @client.on_confirmation
        def choose(request: ConfirmationRequest) -> str:
            confirmations.append(request)
            return "maybe"

        session_id = await client.create_session()
        await client.create_engine(session_id, "worker")
        command = client.command(session_id, {"kind": "ask"})
        result = await command.wait()
        assert result.status == "completed"
        assert result.result == {"name": "Ada", "choice": "maybe"}  # the engine read user_input / selection
        (question,) = asked
        assert (question.prompt, question.session_id, question.command_id) == (
            "What is your name?", session_id, command.message_id)
        assert question.extra == {"placeholder": "a name"}
        assert question.raw.type == "server_request"
        (confirmation,) = confirmations
        assert (confirmation.message, confirmation.options) == ("Greet Ada?", ["yes", "no", "maybe"])

        # An option that was not offered is never sent as a selection: the engine's confirm fails.
        client.on_confirmation(lambda request: "not offered")
        assert (await client.command(session_id, {"kind": "ask"}).wait()).status == "failed"


# ------------------------------------------------------------------------------------- custom server requests


async def test_server_request_with_a_custom_message_type(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        asked: list[Message] = []

        @client.on_server_request("ask_color")
        async def color(message: Message) -> dict[str, Any]:
            asked.append(message)
            return {"color": "blue", "about": message.data["question"]}

        # send_to_app_and_wait(app, "ask_color", data): a frame of type ask_color, answered by the handler.
        response = await client.request("ask_me", {"message_type": "ask_color", "data": {"question": "sky?"}})
        assert response.data == {"response_type": "ask_color", "color": "blue", "about": "sky?"}
        assert (asked[0].type, asked[0].server_initiated) == ("ask_color", True)
        # The same handler answers a server_request whose request_type is ask_color.
        response = await client.request("ask_me", {"message_type": "server_request",
                                                   "data": {"request_type": "ask_color", "question": "sea?"}})
        assert response.data == {"response_type": "ask_color", "color": "blue", "about": "sea?"}


async def test_a_custom_message_type_without_a_handler_is_an_ordinary_message(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        await client.request("notify_me", {"n": 1, "type": "fyi"})
        message = await client.receive(timeout=5)
        assert (message.type, message.server_initiated, message.data["message"]) == ("fyi", True, "0")


# ------------------------------------------------------------------------------------- RATE_LIMITED


async def test_requests_back_off_on_rate_limited(make_app: Callable[..., Starlette]) -> None:
    async with serve_any(make_app(rate_limit=20, rate_burst=5, rate_limit_strikes=30)) as server:
        async with connect(server.ws_url) as client:
            answers: list[str] = []

            async def ping(i: int) -> None:
                answers.append((await client.request("ping", {"timestamp": str(i)}, timeout=10)).data["timestamp"])

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    for i in range(25):
                        tg.start_soon(ping, i)
            assert sorted(answers, key=int) == [str(i) for i in range(25)]
            # 20 of the first 25 were refused (sent before any refusal came back); backing off kept
            # the retries inside the strike budget
            assert not client.closed

        async with connect(server.ws_url, rate_limit_retries=0) as client:
            errors: list[RequestError] = []

            async def unprotected(i: int) -> None:
                try:
                    await client.request("ping", timeout=10)
                except RequestError as error:
                    errors.append(error)

            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(unprotected, i)
            assert errors and {error.code for error in errors} == {"RATE_LIMITED"}
            assert all(error.details["retry_after"] > 0 for error in errors)


async def test_commands_refused_with_rate_limited_are_sent_again(make_app: Callable[..., Starlette]) -> None:
    extensions = Extensions()
    extensions.register_engine("worker", Worker)
    async with serve_any(make_app(extensions, rate_limit=20, rate_burst=5, rate_limit_strikes=30)) as server, \
            connect(server.ws_url) as client:
        sessions = [await client.create_session() for _ in range(2)]
        for session_id in sessions:
            await client.create_engine(session_id, "worker")
        # Sent at once, past the burst: most are refused, and each is sent again when its turn comes.
        commands = [client.command(sessions[i % 2], {"kind": "burst", "n": 3}) for i in range(10)]
        with anyio.fail_after(20):
            results = [await command.wait() for command in commands]
        assert [result.status for result in results] == ["completed"] * 10
        assert not client.closed
