"""docs/llm-engines.md: every Python block runs, the functions it defines work over the wire, and
every setting and error code is documented."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from llmgine_ws import APIConfig, Extensions, create_app
from llmgine_ws.llm import ChatMessage, LLMConfig, LLMEngineFactory, LLMErrorCode, ToolCall

from .llm_support import fake_provider, llm_config
from .openai_server import text, tool_calls
from .support import serve

PAGE = (Path(__file__).resolve().parent.parent / "docs" / "llm-engines.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", PAGE, re.DOTALL | re.MULTILINE)


@pytest.fixture(scope="module")
def namespace() -> dict[str, Any]:
    """The page's Python blocks, run in order in one namespace (as a reader would paste them)."""
    assert len(BLOCKS) >= 6
    scope: dict[str, Any] = {"__name__": "llm_engines_doc"}
    for block in BLOCKS:
        exec(compile(block, "docs/llm-engines.md", "exec"), scope)
    return scope


def test_the_quick_start_builds_an_app(namespace: dict[str, Any]) -> None:
    factory = namespace["factory"]
    assert factory.client_fields == {"temperature", "system_prompt"}
    assert [tool.name for tool in namespace["tools"]] == ["get_weather", "convert"]
    assert namespace["tools"].get("get_weather").needs_approval
    assert namespace["app"].state.llmgine.extensions.engine_factories["llm"].config.model == "llama3.1:8b"


@pytest.mark.anyio
async def test_the_client_snippet_against_the_quick_start_tools(namespace: dict[str, Any],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    script = [tool_calls(("c1", "get_weather", {"city": "Oslo"})), text("It is ", "21°C.")]
    async with fake_provider(*script) as provider:
        extensions = Extensions()
        extensions.register_engine("llm", LLMEngineFactory(llm_config(provider), tools=namespace["tools"]))
        async with serve(create_app(APIConfig(ping_interval=0), extensions)) as server:
            reply = await namespace["ask"](server.ws_url, "Weather in Oslo?")
    assert reply == "It is 21°C."
    printed = capsys.readouterr().out
    assert 'Allow the tool get_weather to run with {"city":"Oslo"}?' in printed
    assert provider.requests[1]["messages"][-1]["content"] == "21°C and sunny in Oslo"


@pytest.mark.anyio
async def test_the_echo_adapter_over_the_wire(namespace: dict[str, Any]) -> None:
    async with serve(namespace["echo_app"]) as server:
        assert await namespace["ask"](server.ws_url, "hello there you") == "hello there you"


def test_the_anthropic_adapter_translates_a_tool_round(namespace: dict[str, Any]) -> None:
    provider = namespace["AnthropicProvider"]
    assert callable(provider.stream) and callable(provider.aclose)
    conversation = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Weather in Oslo and Rome?"),
        ChatMessage(role="assistant", content="Checking.",
                    tool_calls=(ToolCall("a", "get_weather", '{"city":"Oslo"}'),
                                ToolCall("b", "get_weather", '{"city":"Rome"}'))),
        ChatMessage(role="tool", tool_call_id="a", content="4°C"),
        ChatMessage(role="tool", tool_call_id="b", content="24°C"),
    ]
    assert namespace["to_anthropic"](conversation) == [
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "a", "name": "get_weather", "input": {"city": "Oslo"}},
            {"type": "tool_use", "id": "b", "name": "get_weather", "input": {"city": "Rome"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "content": "4°C"},
                                     {"type": "tool_result", "tool_use_id": "b", "content": "24°C"}]},
    ]


@pytest.mark.parametrize("field", LLMConfig.__struct_fields__)
def test_every_setting_is_documented(field: str) -> None:
    assert f"`{field}`" in PAGE


@pytest.mark.parametrize("code", [code.value for code in LLMErrorCode])
def test_every_error_code_is_documented(code: str) -> None:
    assert f"`{code}`" in PAGE
