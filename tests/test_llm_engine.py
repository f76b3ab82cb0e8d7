"""The LLM engine end to end: the real ``openai`` SDK over real HTTP to a scripted OpenAI-compatible
server, the engine inside a real llmgine_ws server, driven by the Python client over a socket."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import pytest

from llmgine_ws.client import Message, RequestError, connect
from llmgine_ws.llm import ToolError, Tools

from .llm_support import SERVER_KEY, Chat, deltas, fake_provider, llm_server, streamed
from .openai_server import SECRET_IN_ERRORS, End, error, text, tool_calls

pytestmark = pytest.mark.anyio


async def test_streams_tokens_then_reply_finish_reason_and_usage() -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    async with fake_provider(text("Hel", "lo", " world", usage=usage)) as provider, \
            llm_server(provider, system_prompt="Be brief.", temperature=0.2) as server, \
            connect(server.ws_url) as client:
        chat = Chat(client)
        await chat.start()
        result, events = await chat.say("Say hello")
    assert result["status"] == "completed"
    assert result["result"] == {"reply": "Hello world", "finish_reason": "stop", "usage": usage}
    assert streamed(events) == "Hello world" and deltas(events) == 3
    assert [event["seq"] for event in events] == list(range(len(events)))  # frames: no gaps
    assert {event["event_type"] for event in events} == {"token"}
    [request] = provider.requests
    assert request["model"] == "test-model"
    assert request["temperature"] == 0.2
    assert request["stream"] is True
    assert request["stream_options"] == {"include_usage": True}
    assert request["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
    assert "tools" not in request
    assert provider.authorizations == [f"Bearer {SERVER_KEY}"]


async def test_history_is_kept_per_session_and_bounded_in_messages() -> None:
    replies = [text(f"answer {n}") for n in range(1, 4)] + [text("other session")]
    async with fake_provider(*replies) as provider, llm_server(provider, history_max_messages=2) as server, \
            connect(server.ws_url) as client:
        chat = Chat(client)
        await chat.start()
        for n in range(1, 4):
            result, _ = await chat.say(f"question {n}")
            assert result["result"]["reply"] == f"answer {n}"
        other = Chat(client)
        await other.start()
        await other.say("fresh start")
    contents = [[message["content"] for message in request["messages"]] for request in provider.requests]
    assert contents == [
        ["question 1"],
        ["question 1", "answer 1", "question 2"],
        ["question 2", "answer 2", "question 3"],  # two messages of history, then the new turn
        ["fresh start"],  # history is per session
    ]


async def test_history_bounded_in_estimated_tokens() -> None:
    # 100 characters a message ≈ 25 tokens + 4 overhead = 29: with a 100-token budget the new
    # question (29) leaves 71, room for one earlier exchange (58) but never two.
    long = "x" * 100
    async with fake_provider(*[text(long) for _ in range(3)]) as provider, \
            llm_server(provider, history_max_tokens=100, history_max_messages=None) as server, \
            connect(server.ws_url) as client:
        chat = Chat(client)
        await chat.start()
        for n in range(3):
            await chat.say(f"{n}{long[1:]}")
    assert [len(request["messages"]) for request in provider.requests] == [1, 3, 3]
    assert [m["content"][0] for m in provider.requests[2]["messages"]] == ["1", "x", "2"]
    # Short messages all fit.
    async with fake_provider(*[text("ok") for _ in range(3)]) as provider, \
            llm_server(provider, history_max_tokens=100, history_max_messages=None) as server, \
            connect(server.ws_url) as client:
        chat = Chat(client)
        await chat.start()
        for n in range(3):
            await chat.say(f"question {n}")
    assert [len(request["messages"]) for request in provider.requests] == [1, 3, 5]


def weather_tools(calls: list[dict[str, Any]]) -> Tools:
    tools = Tools()

    @tools.register(needs_approval=True)
    async def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append({"city": city})
        return f"sunny in {city}"

    return tools


@pytest.mark.parametrize("answer", ["yes", "no"])
async def test_tool_call_needing_approval(answer: str) -> None:
    calls: list[dict[str, Any]] = []
    asked: list[dict[str, Any]] = []
    script = [tool_calls(("call_1", "get_weather", {"city": "Paris"})), text("Here you go.")]
    async with fake_provider(*script) as provider, llm_server(provider, tools=weather_tools(calls)) as server, \
            connect(server.ws_url) as client:

        @client.on_server_request("user_confirmation")
        async def confirm(message: Message) -> dict[str, Any]:
            asked.append(message.data)
            return {"selection": answer}

        chat = Chat(client)
        await chat.start()
        result, events = await chat.say("Weather in Paris?")
    assert result["status"] == "completed"
    assert result["result"]["reply"] == "Here you go."
    assert result["result"]["finish_reason"] == "stop"
    # usage adds up both model calls (25 + 11)
    assert result["result"]["usage"] == {"prompt_tokens": 30, "completion_tokens": 6, "total_tokens": 36}
    [question] = asked
    assert question["options"] == ["yes", "no"]
    assert question["tool"] == "get_weather"
    assert question["arguments"] == {"city": "Paris"}
    assert "get_weather" in question["message"] and "Paris" in question["message"]
    assert question["session_id"] == result["session_id"]
    first, second = provider.requests
    assert first["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                       "additionalProperties": False}}}]
    assert first["tool_choice"] == "auto"
    assistant, tool_message = second["messages"][-2:]
    assert assistant["tool_calls"] == [{"id": "call_1", "type": "function",
                                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    assert tool_message["role"] == "tool"
    assert tool_message["tool_call_id"] == "call_1"
    if answer == "yes":
        assert calls == [{"city": "Paris"}]
        assert tool_message["content"] == "sunny in Paris"
        assert [(e["event_type"], e["payload"]) for e in events if e["event_type"] != "token"] == [
            ("tool_call", {"tool": "get_weather", "args": {"city": "Paris"}, "id": "call_1"}),
            ("tool_result", {"tool": "get_weather", "result": "sunny in Paris", "id": "call_1"}),
        ]
    else:
        assert calls == []  # a declined tool never runs
        assert "declined" in tool_message["content"]
        assert [e for e in events if e["event_type"] != "token"] == []


async def test_several_tool_calls_assembled_from_interleaved_fragments() -> None:
    seen: list[tuple[str, Any]] = []
    tools = Tools()

    @tools.register
    def add(a: int, b: int = 1) -> int:
        """Add two integers."""
        seen.append(("add", (a, b)))
        return a + b

    @tools.register
    async def shout(words: str) -> dict[str, str]:
        seen.append(("shout", words))
        return {"loud": words.upper()}

    @tools.register
    async def broken() -> str:
        raise ToolError("the backend is down")

    script = [
        tool_calls(("c1", "add", {"a": 20, "b": 22}), ("c2", "shout", {"words": "split across many chunks"}),
                   ("c3", "broken", {}), ("c4", "missing", {}), ("c5", "add", '{"a": "not a number"}'),
                   deltas=["Let me ", "work. "], split=4, interleave=True),
        text("Done."),
    ]
    async with fake_provider(*script) as provider, llm_server(provider, tools=tools) as server, \
            connect(server.ws_url) as client:
        chat = Chat(client)
        await chat.start()
        result, events = await chat.say("go")
    assert result["result"]["reply"] == "Let me work. Done."
    assert streamed(events) == result["result"]["reply"]
    assert seen == [("add", (20, 22)), ("shout", "split across many chunks")]
    answers = {m["tool_call_id"]: m["content"] for m in provider.requests[1]["messages"] if m["role"] == "tool"}
    assert answers["c1"] == "42"
    assert json.loads(answers["c2"]) == {"loud": "SPLIT ACROSS MANY CHUNKS"}
    assert answers["c3"] == "Error: the backend is down"
    assert "no tool named 'missing'" in answers["c4"]
    assert answers["c5"].startswith("Error: invalid arguments for add: Expected `int`, got `str`")
    assistant = next(m for m in provider.requests[1]["messages"] if m.get("tool_calls"))
    assert assistant["content"] == "Let me work. "
    assert [call["id"] for call in assistant["tool_calls"]] == ["c1", "c2", "c3", "c4", "c5"]


async def test_tool_rounds_are_bounded() -> None:
    tools = Tools()

    @tools.register
    def ping() -> str:
        return "pong"

    script = [tool_calls(("c1", "ping", {})), tool_calls(("c2", "ping", {}))]
    async with fake_provider(*script) as provider, llm_server(provider, tools=tools, max_tool_rounds=1) as server, \
            connect(server.ws_url) as client:
        chat = Chat(client)
        await chat.start()
        result, _ = await chat.say("ping forever")
    assert [request["tool_choice"] for request in provider.requests] == ["auto", "none"]
    assert result["status"] == "failed"
    assert result["error"].startswith("LLM_TOOL_ROUNDS_EXCEEDED:")


@pytest.mark.parametrize("end", ["stall", "drip"])
async def test_cancel_closes_the_upstream_stream_at_once(end: End) -> None:
    async with fake_provider(text("first ", end=end, interval=0.005)) as provider, \
            llm_server(provider) as server, connect(server.ws_url) as client:
        chat = Chat(client)
        await chat.start()
        outcome: dict[str, Any] = {}

        async def command() -> None:
            response = await client.request("engine_command", {"session_id": chat.session_id,
                                                               "command": {"text": "talk"}}, message_id="cmd")
            outcome.update(response.data)

        async with anyio.create_task_group() as tg:
            tg.start_soon(command)
            first = await client.receive(timeout=10)
            assert first.type == "engine_event"
            assert first.data["payload"]["text"].startswith("first ")  # (maybe coalesced with a tick or two)
            cancelled_at = time.monotonic()
            answer = await client.request("cancel", {"target_message_id": "cmd"})
            assert answer.data["cancelled"] is True
            disconnected_at = await provider.wait_for_disconnect(timeout=5)
        assert outcome["status"] == "cancelled"
        delay = disconnected_at - cancelled_at
        assert delay < 0.1, f"the upstream stream closed {delay:.3f}s after the cancel"
        # The engine is still usable after a cancel, and the cancelled turn left no history behind.
        provider.add(text("again"))
        result, _ = await chat.say("hello again")
    assert result["result"]["reply"] == "again"
    assert [m["content"] for m in provider.requests[-1]["messages"]] == ["hello again"]


async def test_rate_limit_is_retried_after_the_providers_retry_after() -> None:
    script = [error(429, "slow down", type="requests", headers={"retry-after": "0.05"}), text("made it")]
    async with fake_provider(*script) as provider, llm_server(provider) as server, connect(server.ws_url) as client:
        chat = Chat(client)
        await chat.start()
        started = time.monotonic()
        result, events = await chat.say("hi")
        elapsed = time.monotonic() - started
    assert result["result"]["reply"] == "made it"
    assert streamed(events) == "made it" and deltas(events) == 1
    assert len(provider.requests) == 2
    assert elapsed >= 0.05


async def test_rate_limit_with_a_long_retry_after_fails_at_once_and_says_when() -> None:
    script = [error(429, "slow down", type="requests", headers={"retry-after": "30"})]
    async with fake_provider(*script) as provider, llm_server(provider, max_retry_wait=5) as server, \
            connect(server.ws_url) as client:
        chat = Chat(client)
        await chat.start()
        result, _ = await chat.say("hi")
    assert result["status"] == "failed"
    assert result["error"] == "LLM_RATE_LIMITED: the model provider is rate limiting requests; retry after 30 s"
    assert len(provider.requests) == 1


@pytest.mark.parametrize(("reply", "retries", "expected"), [
    (error(500, "boom"), 1, "LLM_PROVIDER_ERROR: the model provider failed (HTTP 500)"),
    (error(503, "overloaded"), 0, "LLM_PROVIDER_ERROR: the model provider failed (HTTP 503)"),
    (error(401, "Incorrect API key provided", type="invalid_request_error", code="invalid_api_key"), 2,
     "LLM_AUTH_FAILED: the model provider refused this server's credentials"),
    (error(400, "This model's maximum context length is 8192 tokens", type="invalid_request_error",
           code="context_length_exceeded"), 2,
     "LLM_CONTEXT_LENGTH_EXCEEDED: the conversation is too long for the model's context window"),
    (error(404, "The model does not exist", type="invalid_request_error", code="model_not_found"), 2,
     "LLM_BAD_REQUEST: the model provider refused the request (HTTP 404)"),
    (error(429, "You exceeded your current quota", type="insufficient_quota", code="insufficient_quota"), 2,
     "LLM_QUOTA_EXCEEDED: the model provider account is out of quota"),
])
async def test_provider_errors_map_to_clear_engine_errors_without_leaking(reply: Any, retries: int,
                                                                           expected: str) -> None:
    retryable = reply.status >= 500
    script = [reply] * (retries + 1 if retryable else 1)
    async with fake_provider(*script) as provider, llm_server(provider, max_retries=retries) as server, \
            connect(server.ws_url) as client:
        received: list[str] = []
        chat = Chat(client)
        await chat.start()
        result, _ = await chat.say("hi")
        received.append(json.dumps(result))
        received.extend(json.dumps(event) for event in await chat.drain())
    assert result["status"] == "failed"
    assert result["error"] == expected
    assert len(provider.requests) == len(script)  # retried (only) when retryable, as often as configured
    assert not any(SECRET_IN_ERRORS in frame or SERVER_KEY in frame for frame in received)


async def test_a_5xx_then_success_is_retried_transparently() -> None:
    async with fake_provider(error(502, "bad gateway"), text("fine")) as provider, llm_server(provider) as server, \
            connect(server.ws_url) as client:
        chat = Chat(client)
        await chat.start()
        result, events = await chat.say("hi")
    assert result["result"]["reply"] == "fine"
    assert streamed(events) == "fine" and deltas(events) == 1


async def test_a_stalled_stream_times_out_with_a_clear_error() -> None:
    async with fake_provider(text("partial", end="stall")) as provider, \
            llm_server(provider, stall_timeout=0.3) as server, connect(server.ws_url) as client:
        chat = Chat(client)
        await chat.start()
        result, events = await chat.say("hi")
        disconnected_at = await provider.wait_for_disconnect()
    assert result["status"] == "failed"
    assert result["error"] == "LLM_TIMEOUT: the model provider sent nothing for 0.3 s (waiting for the next chunk)"
    assert streamed(events) == "partial" and deltas(events) == 1
    assert disconnected_at  # the stalled connection was closed, not left hanging
    assert len(provider.requests) == 1  # never retried once tokens were shown


async def test_no_first_chunk_in_time_is_a_timeout() -> None:
    async with fake_provider(text(end="stall")) as provider, \
            llm_server(provider, first_chunk_timeout=0.3, stall_timeout=0.3) as server, \
            connect(server.ws_url) as client:
        chat = Chat(client)
        await chat.start()
        result, _ = await chat.say("hi")
    # (the fake server sends a role chunk first, like OpenAI: the wait that times out is the next one)
    assert result["error"].startswith("LLM_TIMEOUT: the model provider sent nothing for 0.3 s")


@pytest.mark.parametrize("end", ["cut", "no_finish"])
async def test_a_cut_stream_fails_with_a_clear_error(end: End) -> None:
    async with fake_provider(text("half ", "an answer", end=end)) as provider, llm_server(provider) as server, \
            connect(server.ws_url) as client:
        chat = Chat(client)
        await chat.start()
        result, events = await chat.say("hi")
    assert result["status"] == "failed"
    assert result["error"].startswith("LLM_STREAM_INTERRUPTED: ")
    assert streamed(events) == "half an answer" and deltas(events) == 2
    assert len(provider.requests) == 1


async def test_a_stream_cut_before_any_token_is_retried() -> None:
    async with fake_provider(text(end="cut"), text("whole")) as provider, llm_server(provider) as server, \
            connect(server.ws_url) as client:
        chat = Chat(client)
        await chat.start()
        result, events = await chat.say("hi")
    assert result["result"]["reply"] == "whole"
    assert streamed(events) == "whole" and deltas(events) == 1
    assert len(provider.requests) == 2


async def test_client_config_only_sets_the_fields_the_app_allows() -> None:
    async with fake_provider(text("ok")) as provider, \
            llm_server(provider, client_fields=["temperature"], temperature=0.7) as server, \
            connect(server.ws_url) as client:
        chat = Chat(client)
        for refused in ({"api_key": "sk-mine"}, {"base_url": "http://evil.example/v1"}, {"model": "gpt-expensive"},
                        {"temperature": 5}):
            with pytest.raises(RequestError) as failure:
                await chat.start(refused)
            # (create_engine reports every factory failure as ENGINE_CREATION_FAILED for now)
            assert failure.value.code == "ENGINE_CREATION_FAILED"
        await chat.start({"temperature": 0.1})
        result, _ = await chat.say("hi")
    assert result["result"]["reply"] == "ok"
    assert provider.requests[0]["temperature"] == 0.1
    assert provider.requests[0]["model"] == "test-model"


async def test_malformed_commands_fail_clearly() -> None:
    async with fake_provider() as provider, llm_server(provider) as server, connect(server.ws_url) as client:
        chat = Chat(client)
        await chat.start()
        for command in ({"text": ""}, {"prompt": "hi"}, "hi", None):
            response = await client.request("engine_command", {"session_id": chat.session_id, "command": command})
            assert response.data["status"] == "failed"
            assert response.data["error"] == 'INVALID_COMMAND: the command must be {"text": "<your message>"}'
    assert provider.requests == []


async def test_an_unanswered_approval_declines_the_tool_and_withdraws_the_question() -> None:
    calls: list[dict[str, Any]] = []
    withdrawn = anyio.Event()
    script = [tool_calls(("call_1", "get_weather", {"city": "Rome"})), text("Never mind.")]
    async with fake_provider(*script) as provider, \
            llm_server(provider, tools=weather_tools(calls), approval_timeout=0.3) as server, \
            connect(server.ws_url) as client:

        @client.on_server_request("user_confirmation")
        async def never_answer(message: Message) -> dict[str, Any]:
            try:
                await anyio.sleep_forever()
            finally:
                withdrawn.set()  # the client cancels the handler when the server withdraws the request
            return {}

        chat = Chat(client)
        await chat.start()
        result, _ = await chat.say("Weather in Rome?")
        with anyio.fail_after(5):
            await withdrawn.wait()
    assert result["result"]["reply"] == "Never mind."
    assert calls == []
    assert "declined" in provider.requests[1]["messages"][-1]["content"]


async def test_an_unreachable_provider_is_retried_then_reported(caplog: pytest.LogCaptureFixture) -> None:
    async with fake_provider() as provider:
        provider.base_url = "http://127.0.0.1:9/v1"  # nothing listens on the discard port
        async with llm_server(provider, max_retries=1) as server, connect(server.ws_url) as client:
            chat = Chat(client)
            await chat.start()
            result, _ = await chat.say("hi")
    assert result["status"] == "failed"
    assert result["error"] == "LLM_UNAVAILABLE: the model provider could not be reached"
    retries = [r.getMessage() for r in caplog.records if r.name == "llmgine_ws.llm" and "retry" in r.getMessage()]
    assert len(retries) == 1 and "LLM_UNAVAILABLE; retry 1/1" in retries[0]


@pytest.mark.parametrize("reply", [text("0123456", "789abc"), tool_calls(("c1", "t", {"long": "x" * 40}))])
async def test_a_reply_over_max_reply_chars_fails(reply: Any) -> None:
    async with fake_provider(reply) as provider, llm_server(provider, max_reply_chars=10) as server, \
            connect(server.ws_url) as client:
        chat = Chat(client)
        await chat.start()
        result, _ = await chat.say("hi")
    assert result["status"] == "failed"
    assert result["error"] == "LLM_REPLY_TOO_LONG: the model's reply (text and tool calls) exceeded 10 characters"
