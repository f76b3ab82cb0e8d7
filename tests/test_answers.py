"""Answers to the server's questions must fit them; what ``message_type`` means for a server request
(issue 13). The custom-type request on both clients: tests/test_client_e2e.py and tests/test_node_clients.py."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from llmgine_ws import EngineContext, Extensions, Session
from llmgine_ws.client import Message, connect

from .support import LiveServer, serve

pytestmark = pytest.mark.anyio


class AskingEngine:
    def __init__(self, session: Session, config: dict[str, Any]) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        if command["kind"] == "confirm":
            return {"choice": await ctx.confirm("Deploy?", ["staging", "production"])}
        return {"text": await ctx.ask_user("Your name?")}


@pytest.fixture
async def server(make_app: Any) -> Any:
    extensions = Extensions()
    extensions.register_engine("asking", AskingEngine)
    async with serve(make_app(extensions)) as live:
        yield live


async def _ask_and_answer(server: LiveServer, kind: str, wrong: dict[str, Any], right: dict[str, Any]) -> Any:
    async with connect(server.ws_url) as client:
        questions: list[Message] = []
        errors: list[Message] = []
        asked, refused = anyio.Event(), anyio.Event()

        @client.on_message("error")
        def on_error(message: Message) -> None:
            errors.append(message)
            refused.set()

        @client.on_server_request(kind)
        def first_answer(message: Message) -> dict[str, Any]:
            questions.append(message)
            asked.set()
            return wrong

        session_id = await client.create_session()
        await client.create_engine(session_id, "asking")
        async with client.command(session_id, {"kind": "confirm" if kind == "user_confirmation" else "input"}) as cmd:
            with anyio.fail_after(5):
                await asked.wait()
                await refused.wait()
            question_id = questions[0].message_id
            assert errors[0].message_id == question_id
            assert errors[0].data["code"] == "VALIDATION_ERROR"
            # The question is still open: the right answer goes through, and the command ends with it.
            assert question_id in server.runtime.hub.get(client.app_id).pending  # type: ignore[union-attr]
            await client.send("server_response", {"response_type": kind, **right}, message_id=question_id)
            result = await cmd.wait()
        return errors[0].data["message"], result.result


async def test_a_confirm_answered_with_an_option_not_offered_is_refused_and_stays_open(server: LiveServer) -> None:
    message, result = await _ask_and_answer(server, "user_confirmation", {"selection": "rm -rf /"},
                                            {"selection": "staging"})
    assert message == ("selection 'rm -rf /' is not one of the options offered (['staging', 'production']); "
                       "the question is still open")
    assert result == {"choice": "staging"}


async def test_a_user_input_answer_of_the_wrong_shape_is_refused_and_stays_open(server: LiveServer) -> None:
    message, result = await _ask_and_answer(server, "user_input", {"text": "Ada"}, {"user_input": "Ada"})
    assert message == ("an answer to a user_input request needs a string field 'user_input' (this one has: text); "
                       "the question is still open")
    assert result == {"text": "Ada"}


async def test_a_backend_question_gets_the_same_check(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        answers = iter([{"user_input": 42}, {"user_input": "fine"}])
        refused = anyio.Event()
        client.on_message("error")(lambda message: refused.set())

        @client.on_server_request("user_input")
        def answer(message: Message) -> dict[str, Any]:
            return next(answers)

        async with anyio.create_task_group() as tg:
            async def ask_again_when_refused() -> None:
                await refused.wait()
                [question_id] = server.runtime.hub.get(client.app_id).pending  # type: ignore[union-attr]
                await client.send("server_response", {"response_type": "user_input", **next(answers)},
                                  message_id=question_id)

            tg.start_soon(ask_again_when_refused)
            response = await server.runtime.messaging.send_to_app_and_wait(
                client.app_id, "server_request", {"request_type": "user_input", "prompt": "ok?"}, timeout=5)
        assert response.data == {"response_type": "user_input", "user_input": "fine"}


async def test_declining_always_fits(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        client.on_server_request("user_confirmation")(lambda message: {"error": "the user closed the dialog"})
        from llmgine_ws import ServerRequestFailed

        with pytest.raises(ServerRequestFailed):
            await server.runtime.messaging.send_to_app_and_wait(
                client.app_id, "server_request", {"request_type": "user_confirmation", "message": "?",
                                                  "options": ["a"]}, timeout=5)


async def test_a_server_request_without_request_type_is_refused_before_it_is_sent(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        with pytest.raises(ValueError, match="a server_request's data needs a request_type"):
            await server.runtime.messaging.send_to_app_and_wait(client.app_id, "server_request", {"prompt": "?"})
        with pytest.raises(ValueError, match="needs a request_type"):
            await server.runtime.messaging.send_to_app_and_wait(client.app_id)
        assert server.runtime.hub.get(client.app_id).pending == {}  # type: ignore[union-attr]


async def test_answers_after_a_refusal_cost_like_any_message(make_app: Any) -> None:
    """The first answer to a question is exempt from the rate limit; once refused, retries are not."""
    async with serve(make_app(rate_limit=0.001, rate_burst=1)) as server, connect(server.ws_url) as client:
        replies: list[str] = []
        first, got = anyio.Event(), anyio.Event()

        @client.on_message("error")
        def on_error(message: Message) -> None:
            replies.append(message.data["code"])
            first.set()
            if len(replies) == 3:
                got.set()

        client.on_server_request("user_input")(lambda message: {"text": "wrong shape"})
        async with anyio.create_task_group() as tg:
            async def ask() -> None:
                with pytest.raises(TimeoutError):
                    await server.runtime.messaging.send_to_app_and_wait(
                        client.app_id, "server_request", {"request_type": "user_input", "prompt": "?"}, timeout=5)

            tg.start_soon(ask)
            with anyio.fail_after(5):
                await first.wait()
            [question] = server.runtime.hub.get(client.app_id).pending  # type: ignore[union-attr]
            for _ in range(2):
                await client.send("server_response", {"text": "again"}, message_id=question)
            with anyio.fail_after(5):
                await got.wait()
            assert replies == ["VALIDATION_ERROR", "VALIDATION_ERROR", "RATE_LIMITED"]
            tg.cancel_scope.cancel()
