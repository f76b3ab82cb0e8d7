"""examples/fastapi_app.py end to end: a FastAPI host with its own lifespan, state and auth dependency,
llmgine_ws mounted at /ws, driven by the Python client's helpers over a real socket (issue 13)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from llmgine_ws.client import (
    ConfirmationRequest,
    HandshakeRejected,
    Message,
    RequestError,
    UserInputRequest,
    connect,
)

from .support import LiveServer, serve

pytestmark = pytest.mark.anyio

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app.py"
ALICE = {"Authorization": "Bearer alice-token"}


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_fastapi_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def example(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("LLMGINE_API_PING_INTERVAL", "0")
    module = load()
    async with serve(module.app, ws_path="/ws/api/ws") as live:
        yield module, live


async def test_the_fastapi_example_end_to_end(example: tuple[ModuleType, LiveServer]) -> None:
    _module, server = example
    asked: list[str] = []
    async with connect(server.ws_url, headers=ALICE) as client, \
            httpx.AsyncClient(base_url=server.http_url, headers=ALICE) as http:

        @client.on_user_input
        def answer_input(request: UserInputRequest) -> str:
            asked.append(request.prompt)
            return "buy milk"

        @client.on_confirmation
        def answer_confirmation(request: ConfirmationRequest) -> str:
            asked.append(request.message)
            return "delete"

        @client.on_server_request("ask_color")
        def answer_color(message: Message) -> dict[str, Any]:
            asked.append(message.data["question"])
            return {"color": "teal"}

        session_id = await client.create_session()
        await client.create_engine(session_id, "notes")

        # The engine asks for input (the user has no notes yet), stores it with the host's db, streams it.
        async with client.command(session_id, {"action": "read"}) as command:
            events = [event async for event in command]
        assert [(e.event_type, e.payload["text"]) for e in events] == [("note", "buy milk")]
        assert command.result is not None and command.result.result == {"user": "alice", "count": 1}
        assert asked == ["You have no notes yet. What should I write down?"]

        # A custom msgspec message, its handler on the host's state and the principal.
        added = await client.request("add_note", {"text": "call Bob", "tag": "work"})
        assert added.data == {"note_id": 2, "user": "alice"}
        with pytest.raises(RequestError) as typo:
            await client.request("add_note", {"text": "x", "tagg": "work"})
        assert typo.value.code == "VALIDATION_ERROR" and "tagg" in typo.value.message

        # The HTTP side sees the same data, through FastAPI's own auth dependency.
        notes = (await http.get("/notes")).json()
        assert [n["text"] for n in notes["notes"]] == ["buy milk", "call Bob"]

        # An HTTP route asks the user's frontend with send_to_app_and_wait and a type of its own.
        reply = await http.post("/ask-color", json={"question": "Pick a color"})
        assert reply.json() == {"user": "alice", "color": "teal"}
        assert asked[-1] == "Pick a color"

        # A confirmation, answered by the typed handler.
        cleared = await client.command(session_id, {"action": "clear"}).wait()
        assert cleared.result == {"deleted": 2}
        assert asked[-1] == "Delete your 2 notes?"
        assert (await http.get("/notes")).json()["notes"] == []


async def test_the_example_keeps_users_apart_and_refuses_strangers(example: tuple[ModuleType, LiveServer]) -> None:
    _module, server = example
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        assert (await http.get("/notes")).status_code == 401
        assert (await http.get("/notes", headers={"Authorization": "Bearer nope"})).status_code == 401
        with pytest.raises(HandshakeRejected) as refused:
            async with connect(server.ws_url, headers={"Authorization": "Bearer nope"}):
                raise AssertionError("must not connect")
        assert refused.value.status_code == 403
        # Bob has no open frontend: the route says so instead of waiting.
        reply = await http.post("/ask-color", json={}, headers={"Authorization": "Bearer bob-token"})
        assert reply.status_code == 409
    async with connect(server.ws_url, headers={"Authorization": "Bearer bob-token"}) as bob:
        await bob.request("add_note", {"text": "bob's"})
    async with connect(server.ws_url, headers=ALICE) as alice:
        session_id = await alice.create_session()
        await alice.create_engine(session_id, "notes")
        alice.on_user_input(lambda request: "alice's")
        result = await alice.command(session_id, {"action": "read"}).wait()
        assert result.result == {"user": "alice", "count": 1}  # bob's note is not hers


async def test_the_host_pool_outlives_llmgine_ws() -> None:
    module = load()
    async with serve(module.app, ws_path="/ws/api/ws") as server, connect(server.ws_url, headers=ALICE) as client:
        await client.request("add_note", {"text": "kept"})
        assert module.app.state.db.is_open
    assert not module.app.state.db.is_open
    assert module.llm.state.llmgine.lifecycle.state.value == "stopped"
