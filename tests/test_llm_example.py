"""``examples/llm_chat.py`` served exactly as documented (``python -m llmgine_ws --app examples.llm_chat:app``
from the repository root) and driven over the wire; and the chat demo running on the LLM engine."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest

from llmgine_ws import APIConfig
from llmgine_ws.client import Message, connect

from .llm_support import Chat, deltas, fake_provider, streamed
from .openai_server import OpenAIServer, text, tool_calls
from .support import listening_socket, serve

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def example_server(provider: OpenAIServer) -> AsyncIterator[str]:
    """The example app in its own process, pointed at ``provider`` through the environment."""
    sock = listening_socket()  # handed to the server process: no port race, no waiting for startup
    env = {**os.environ, "OPENAI_BASE_URL": provider.base_url, "OPENAI_API_KEY": "sk-example-key",
           "LLMGINE_LLM_MODEL": "example-model", "LLMGINE_API_PING_INTERVAL": "0"}
    process = await anyio.open_process(
        [sys.executable, "-m", "llmgine_ws", "--app", "examples.llm_chat:app", "--fd", str(sock.fileno())],
        env=env, cwd=ROOT, pass_fds=(sock.fileno(),), stdout=None)
    try:
        yield f"ws://127.0.0.1:{sock.getsockname()[1]}/api/ws"
    finally:
        process.terminate()
        with anyio.fail_after(15):
            await process.wait()
        await process.aclose()
        sock.close()


@pytest.mark.parametrize("answer", ["yes", "no"])
async def test_the_example_over_the_wire(answer: str) -> None:
    script = [text("Let me check. ", usage={"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}),
              tool_calls(("call_w", "get_weather", {"city": "Paris"})),
              text("It is ", "18°C in Paris.")]
    asked: list[dict[str, Any]] = []
    async with fake_provider(*script) as provider, example_server(provider) as url, \
            connect(url, open_timeout=30) as client:

        @client.on_server_request("user_confirmation")
        async def confirm(message: Message) -> dict[str, Any]:
            asked.append(message.data)
            return {"selection": answer}

        chat = Chat(client)
        await chat.start()
        first, events = await chat.say("Hello!")
        assert first["status"] == "completed"
        assert first["result"] == {"reply": "Let me check. ", "finish_reason": "stop",
                                   "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}
        assert streamed(events) == "Let me check. " and deltas(events) == 1
        second, events = await chat.say("Weather in Paris?")
    assert second["status"] == "completed"
    assert second["result"]["reply"] == "It is 18°C in Paris."
    assert streamed(events) == "It is 18°C in Paris." and deltas(events) == 2
    assert all(set(event["payload"]) == {"text"} for event in events if event["event_type"] == "token")
    [question] = asked
    assert (question["request_type"], question["options"], question["tool"], question["arguments"]) == (
        "user_confirmation", ["yes", "no"], "get_weather", {"city": "Paris"})
    assert {request["model"] for request in provider.requests} == {"example-model"}
    assert set(provider.authorizations) == {"Bearer sk-example-key"}
    # The conversation carries over from the first command; the tool's result (or refusal) went back.
    last = provider.requests[-1]["messages"]
    assert [m["role"] for m in last] == ["user", "assistant", "user", "assistant", "tool"]
    if answer == "yes":
        assert last[-1]["content"] == "18°C and cloudy in Paris"
    else:
        assert "declined" in last[-1]["content"]


def load_chat_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chat_demo_app", ROOT / "examples" / "chat" / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_chat_demo_runs_on_the_llm_engine_when_openai_base_url_is_set() -> None:
    demo = load_chat_demo()
    async with fake_provider(text("Hi from ", "the model")) as provider:
        environ = {"OPENAI_BASE_URL": provider.base_url, "OPENAI_API_KEY": "k", "LLMGINE_LLM_MODEL": "demo-model"}
        async with serve(demo.build_demo_app(APIConfig(ping_interval=0), environ=environ)) as server, \
                connect(server.ws_url) as client:
            chat = Chat(client)
            await chat.start(engine_type="chat")  # what the page creates
            result, events = await chat.say("hello")
    assert result["result"]["reply"] == "Hi from the model"
    assert streamed(events) == "Hi from the model" and deltas(events) == 2
    assert provider.requests[0]["model"] == "demo-model"


async def test_the_chat_demo_falls_back_to_the_canned_engine() -> None:
    demo = load_chat_demo()
    async with serve(demo.build_demo_app(APIConfig(ping_interval=0), environ={})) as server, \
            connect(server.ws_url) as client:
        chat = Chat(client)
        await chat.start({"token_delay": 0}, engine_type="chat")
        result, _ = await chat.say("hello")
    assert result["result"]["reply"] == "Hello, I am Ada. You said: hello"
