"""The LLM engine's parts as units (tools, history, config), and the engine itself under trio."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Annotated, Any, Literal

import anyio
import msgspec
import pytest

from llmgine_ws.llm import ChatMessage, History, LLMConfig, LLMEngineFactory, LLMError, ToolCall, Tools, estimate_tokens
from llmgine_ws.llm.config import apply_client_config, check_client_fields
from llmgine_ws.llm.errors import retry_after_seconds
from llmgine_ws.llm.tools import InvalidArguments, Tool

from .openai_server import OpenAIServer, error, serve_in_thread, text, tool_calls

# ------------------------------------------------------------------ tools


class Place(msgspec.Struct):
    city: str
    country: str = "FR"


def forecast(place: Place, days: Annotated[int, msgspec.Meta(ge=1, le=7)] = 3,
             unit: Literal["C", "F"] = "C") -> str:
    """The forecast for a place.

    Longer explanation that the model does not need.
    """
    return f"{place.city} {days} {unit}"


def test_tool_schema_comes_from_type_hints_and_docstring() -> None:
    tool = Tool(forecast)
    assert tool.name == "forecast"
    assert tool.description == "The forecast for a place."
    assert tool.spec.parameters == {
        "type": "object",
        "properties": {
            "place": {"$ref": "#/$defs/Place"},
            "days": {"type": "integer", "minimum": 1, "maximum": 7, "default": 3},
            "unit": {"enum": ["C", "F"], "default": "C"},
        },
        "required": ["place"],
        "additionalProperties": False,
        "$defs": {"Place": {"title": "Place", "type": "object",
                            "properties": {"city": {"type": "string"}, "country": {"type": "string", "default": "FR"}},
                            "required": ["city"]}},
    }


def test_tool_arguments_are_validated_against_the_schema() -> None:
    tool = Tool(forecast)
    arguments = tool.parse_arguments('{"place": {"city": "Lyon"}, "days": 2}')
    assert arguments == {"place": Place("Lyon"), "days": 2, "unit": "C"}
    for bad in ('{"place": {"city": "Lyon"}, "days": 9}', '{"days": 2}', '{"place": 1}', "not json",
                '{"place": {"city": "Lyon"}, "extra": 1}'):
        with pytest.raises(InvalidArguments):
            tool.parse_arguments(bad)


@pytest.mark.anyio
async def test_sync_tools_run_in_a_worker_thread_and_async_ones_inline() -> None:
    import threading

    main = threading.get_ident()
    tools = Tools()

    @tools.register(name="where", description="Which thread runs me.")
    def sync_tool() -> bool:
        return threading.get_ident() != main

    @tools.register
    async def async_tool() -> bool:
        return threading.get_ident() == main

    sync, asynchronous = list(tools)
    assert sync.name == "where" and sync.description == "Which thread runs me."
    assert await sync.call({}) is True
    assert await asynchronous.call({}) is True


def test_tools_refuse_what_cannot_be_described() -> None:
    def untyped(city):  # type: ignore[no-untyped-def]
        return city

    def variadic(*cities: str) -> str:
        return ""

    for function in (untyped, variadic):
        with pytest.raises(TypeError):
            Tool(function)
    tools = Tools(forecast)
    with pytest.raises(ValueError, match="already registered"):
        tools.register(forecast)


# ------------------------------------------------------------------ history


def turn(n: int, size: int = 0) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=f"q{n}" + "x" * size),
            ChatMessage(role="assistant", content=f"a{n}" + "x" * size)]


def test_history_drops_whole_turns_oldest_first() -> None:
    history = History(max_messages=4, max_tokens=None)
    for n in range(3):
        history.append(turn(n))
    assert [m.content for m in history.messages] == ["q1", "a1", "q2", "a2"]
    # A tool round is one turn: it is kept or dropped whole, never split.
    history.append([ChatMessage(role="user", content="q3"),
                    ChatMessage(role="assistant", tool_calls=(ToolCall("c", "t", "{}"),)),
                    ChatMessage(role="tool", tool_call_id="c", content="r"),
                    ChatMessage(role="assistant", content="a3")])
    assert [m.content for m in history.messages] == ["q3", "", "r", "a3"]
    assert len(history) == 4


def test_history_keeps_the_newest_turn_even_over_the_bounds() -> None:
    history = History(max_messages=1, max_tokens=10)
    history.append(turn(0, size=400))
    assert len(history) == 2


def test_context_fits_the_token_budget_around_the_current_turn() -> None:
    history = History(max_messages=None, max_tokens=100)
    for n in range(5):
        history.append(turn(n, size=36))  # 4 + ceil(38 / 4) = 14 tokens a message, 28 a turn
    assert estimate_tokens(turn(0, size=36)[0]) == 14
    current = [ChatMessage(role="user", content="x" * 36)]  # 13 tokens: 87 left, three turns fit
    assert [m.content[:2] for m in history.context(current)] == ["q2", "a2", "q3", "a3", "q4", "a4"]
    huge = [ChatMessage(role="user", content="x" * 1000)]
    assert history.context(huge) == []


# ------------------------------------------------------------------ config


def test_config_repr_hides_the_api_key() -> None:
    config = LLMConfig(model="m", api_key="sk-very-secret")
    assert "sk-very-secret" not in repr(config)
    assert "sk-very-secret" not in str(config)
    assert "model='m'" in repr(config)


def test_config_from_the_environment() -> None:
    config = LLMConfig.from_env({"OPENAI_BASE_URL": "http://h:1/v1", "OPENAI_API_KEY": "k",
                                 "LLMGINE_LLM_MODEL": "llama3"}, max_tool_rounds=2)
    assert (config.base_url, config.api_key, config.model, config.max_tool_rounds) == ("http://h:1/v1", "k",
                                                                                      "llama3", 2)
    assert LLMConfig.from_env({}).base_url is None


def test_client_overrides_follow_the_allow_list() -> None:
    config = LLMConfig(model="m", temperature=0.5, max_output_tokens=500)
    allowed = check_client_fields(["temperature", "max_output_tokens"])
    assert apply_client_config(config, {}, allowed) == config
    changed = apply_client_config(config, {"temperature": 0, "max_output_tokens": 100}, allowed)
    assert (changed.temperature, changed.max_output_tokens, changed.model) == (0, 100, "m")
    for refused, message in [({"model": "other"}, "may not set ['model']"),
                             ({"api_key": "x"}, "may not set ['api_key']"),
                             ({"temperature": 3}, "invalid create_engine config"),
                             ({"max_output_tokens": 501}, "may not exceed 500")]:
        with pytest.raises(LLMError) as failure:
            apply_client_config(config, refused, allowed)
        assert failure.value.code == "INVALID_ENGINE_CONFIG"
        assert message in failure.value.message
    with pytest.raises(ValueError, match="api_key"):
        check_client_fields(["api_key"])
    with pytest.raises(ValueError, match="base_url"):
        LLMEngineFactory(config, client_fields=["base_url"])


def test_retry_after_headers() -> None:
    assert retry_after_seconds({"retry-after": "2"}) == 2
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert retry_after_seconds({"retry-after": "inf"}) is None
    assert retry_after_seconds({}) is None


# ------------------------------------------------------------------ the engine under trio


class RecordingContext:
    """Stands in for EngineContext: what the engine emits and asks."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.events: list[tuple[str, Any]] = []
        self.asked: list[dict[str, Any]] = []
        self.first_token = anyio.Event()

    async def emit(self, event_type: str, payload: Any = None) -> None:
        self.events.append((event_type, payload))
        if event_type == "token":
            self.first_token.set()

    async def confirm(self, message: str, options: list[str] | None = None, *, timeout: float | None = None,
                      **extra: Any) -> str:
        self.asked.append({"message": message, "options": options, **extra})
        return self.answer


def test_the_engine_under_trio() -> None:
    import trio

    calls: list[str] = []
    tools = Tools()

    @tools.register(needs_approval=True)
    async def get_weather(city: str) -> str:
        calls.append(city)
        await trio.lowlevel.checkpoint()  # really trio
        return f"sunny in {city}"

    provider = OpenAIServer(
        tool_calls(("c1", "get_weather", {"city": "Oslo"})), text("It is ", "sunny."),
        error(429, "slow down", headers={"retry-after": "0.01"}), text("retried"),
        text("forever ", end="drip", interval=0.005),
    )
    outcome: dict[str, Any] = {}

    async def main() -> None:
        trio.lowlevel.current_trio_token()  # raises unless this really runs under trio
        with trio.fail_after(30):
            await run()

    async def run() -> None:
        config = LLMConfig(model="m", base_url=provider.base_url, api_key="k")
        engine = LLMEngineFactory(config, tools=tools)(SimpleNamespace(session_id="s"), {})  # type: ignore[arg-type]
        await engine.start()
        try:
            ctx = RecordingContext("yes")
            outcome["first"] = await engine.handle_command({"text": "weather?"}, ctx)  # type: ignore[arg-type]
            outcome["events"] = ctx.events
            outcome["asked"] = ctx.asked
            outcome["second"] = await engine.handle_command({"text": "again"}, RecordingContext("yes"))  # type: ignore[arg-type]
            ctx = RecordingContext("yes")
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(engine.handle_command, {"text": "talk"}, ctx)
                    await ctx.first_token.wait()
                    outcome["cancelled_at"] = time.monotonic()
                    scope.cancel()
            await anyio.to_thread.run_sync(provider.disconnected_flag.wait, 5)
        finally:
            await engine.stop()

    with serve_in_thread(provider.app) as base_url:
        provider.base_url = base_url
        trio.run(main)
    assert outcome["first"]["reply"] == "It is sunny."
    assert calls == ["Oslo"]
    assert outcome["asked"][0]["tool"] == "get_weather" and outcome["asked"][0]["options"] == ["yes", "no"]
    assert [kind for kind, _ in outcome["events"]] == ["tool_call", "tool_result", "token", "token"]
    assert outcome["second"]["reply"] == "retried"
    assert provider.disconnects[0] - outcome["cancelled_at"] < 0.1
