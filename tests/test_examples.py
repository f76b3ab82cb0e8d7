"""Every example runs: the chat example server, its Python client, and the backend HTTP route."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest

from llmgine_ws import APIConfig, Session
from llmgine_ws.client import RequestError, connect

from .support import serve

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return load_example("custom_engine_example")


@pytest.fixture(scope="module")
def chat_client() -> ModuleType:
    return load_example("chat_client")


async def test_scripted_chat_session(example: ModuleType, chat_client: ModuleType) -> None:
    lines: list[str] = []
    async with serve(example.build_app(APIConfig(ping_interval=0))) as server:
        with anyio.fail_after(30):
            results = await chat_client.run(server.ws_url, chat_client.SCRIPT, out=lines.append, token_delay=0)
        assert len(server.runtime.sessions) == 0
    assert [r["status"] for r in results] == ["completed"] * 3
    assert results[0]["result"]["reply"] == "Hello, I am Ada. You said: Hello there!"
    assert results[1]["result"]["reply"] == "I checked for you: it is 21°C and sunny in Paris."
    assert results[2]["result"]["reply"] == "I checked for you: it is 21°C and sunny in Oslo."
    transcript = "\n".join(lines)
    assert "translate: hello world -> bonjour monde" in transcript
    assert "engine? What would you like to talk about? -> the weather in Oslo" in transcript
    assert "engine * tool_call: {'tool': 'weather', 'args': {'city': 'Paris'}}" in transcript
    assert "notice! Welcome!" in transcript


async def test_declining_the_tool_call(example: ModuleType, chat_client: ModuleType) -> None:
    async with serve(example.build_app(APIConfig(ping_interval=0))) as server:
        results = await chat_client.run(server.ws_url, ["What's the weather in Rome?"], out=lambda line: None,
                                        answers=lambda message: "no", token_delay=0)
    assert results[0]["result"]["reply"] == "Alright, I will not look it up. Anything else?"


async def test_translate_errors(example: ModuleType) -> None:
    async with serve(example.build_app(APIConfig(ping_interval=0))) as server, connect(server.ws_url) as client:
        with pytest.raises(RequestError) as error:
            await client.request("translate", {"text": "hello", "target_language": "tlh"})
        assert error.value.code == "UNSUPPORTED_LANGUAGE"
        with pytest.raises(RequestError) as error:
            await client.request("translate", {"target_language": "fr"})
        assert error.value.code == "VALIDATION_ERROR"
        assert error.value.details["path"] == "$.data"


async def test_backend_asks_a_user_from_an_http_route(example: ModuleType) -> None:
    admin = {"Authorization": "Bearer admin-secret"}
    async with serve(example.build_app(APIConfig(ping_interval=0, admin_token="admin-secret"))) as server, \
            connect(server.ws_url) as client, httpx.AsyncClient(base_url=server.http_url) as http:
        client.on_server_request("user_input")(lambda message: {"user_input": f"re: {message.data['prompt']}"})
        response = await http.post(f"/demo/ask/{client.app_id}", json={"prompt": "favourite colour?"}, headers=admin)
        assert response.json() == {"answer": "re: favourite colour?"}
        assert (await http.post("/demo/ask/nobody", json={"prompt": "?"}, headers=admin)).status_code == 404
        # Nobody else may put questions to a user.
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = await http.post(f"/demo/ask/{client.app_id}", json={"prompt": "?"}, headers=headers)
            assert refused.status_code == 403
        assert (await http.post(f"/demo/ask/{client.app_id}", content=b"[", headers=admin)).status_code == 400


async def test_the_demo_route_is_closed_without_an_admin_token(example: ModuleType) -> None:
    async with serve(example.build_app(APIConfig(ping_interval=0))) as server, connect(server.ws_url) as client, \
            httpx.AsyncClient(base_url=server.http_url) as http:
        refused = await http.post(f"/demo/ask/{client.app_id}", json={"prompt": "?"},
                                  headers={"Authorization": "Bearer x"})
        assert refused.status_code == 403


@pytest.mark.parametrize("delay", [1e308, float("inf"), "nan", -5, "soon"])
async def test_the_example_engine_bounds_the_clients_config(example: ModuleType, delay: Any) -> None:
    """Client config is the client's word: an absurd token_delay cannot hold a command forever."""
    engine = example.ChatEngine(Session("s", "a"), {"token_delay": delay, "name": "x" * 10_000})
    assert 0 <= engine.token_delay <= example.ChatEngine.MAX_TOKEN_DELAY
    assert len(engine.name) <= 64


async def test_chat_client_command_line(example: ModuleType) -> None:
    async with serve(example.build_app(APIConfig(ping_interval=0))) as server:
        result = await anyio.run_process([sys.executable, str(EXAMPLES / "chat_client.py"), "--url", server.ws_url],
                                         check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert b"engine< I checked for you: it is 21\xc2\xb0C and sunny in Paris." in result.stdout


def test_module_level_app_exists(example: ModuleType) -> None:
    app: Any = example.app
    assert app.state.llmgine.extensions.engine_factories.keys() == {"chat"}
