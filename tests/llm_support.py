"""Helpers for the LLM engine tests: the fake provider served over HTTP, an app with the engine, a chat driver."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from llmgine_ws import APIConfig, Extensions, create_app
from llmgine_ws.client import Client, Message, RequestTimeout
from llmgine_ws.llm import LLMConfig, LLMEngineFactory, Tools

from .openai_server import OpenAIServer
from .support import LiveServer, serve

SERVER_KEY = "sk-server-side-key"


@asynccontextmanager
async def fake_provider(*replies: Any) -> AsyncIterator[OpenAIServer]:
    """A scripted OpenAI-compatible server on a free port; ``provider.base_url`` ends in ``/v1``."""
    provider = OpenAIServer(*replies)
    async with serve(provider.app) as live:
        provider.base_url = f"{live.http_url}/v1"
        yield provider


def llm_config(provider: OpenAIServer, **options: Any) -> LLMConfig:
    options.setdefault("retry_backoff", 0.01)
    return LLMConfig(model="test-model", base_url=provider.base_url, api_key=SERVER_KEY, **options)


@asynccontextmanager
async def llm_server(provider: OpenAIServer, *, tools: Tools | None = None, client_fields: Iterable[str] = (),
                     **options: Any) -> AsyncIterator[LiveServer]:
    """An llmgine_ws app with the LLM engine registered as ``llm``, served on a free port."""
    extensions = Extensions()
    extensions.register_engine("llm", LLMEngineFactory(llm_config(provider, **options), tools=tools,
                                                       client_fields=client_fields))
    async with serve(create_app(APIConfig(ping_interval=0), extensions)) as live:
        yield live


class Chat:
    """Drives one session's engine over a real client connection."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.session_id = ""

    async def start(self, config: dict[str, Any] | None = None, engine_type: str = "llm") -> None:
        self.session_id = await self.client.create_session()
        await self.client.request("create_engine", {"session_id": self.session_id, "engine_type": engine_type,
                                                    "config": config or {}})

    async def say(self, text: str, *, message_id: str | None = None,
                  timeout: float = 20.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Send a command; returns the ``engine_command_res`` data and the command's events."""
        response = await self.client.request("engine_command", {"session_id": self.session_id,
                                                                "command": {"text": text}},
                                             message_id=message_id, timeout=timeout)
        return response.data, [event for event in await self.drain() if event["command_id"] == response.message_id]

    async def drain(self) -> list[dict[str, Any]]:
        """The engine events already received (they arrive before the command's response)."""
        events: list[dict[str, Any]] = []
        while True:
            try:
                message: Message = await self.client.receive(timeout=0)
            except RequestTimeout:
                return events
            if message.type == "engine_event":
                events.append(message.data)


def tokens(events: list[dict[str, Any]]) -> list[str]:
    """The texts of the token frames (a frame may carry several deltas: see ``deltas``)."""
    return [event["payload"]["text"] for event in events if event["event_type"] == "token"]


def streamed(events: list[dict[str, Any]]) -> str:
    """The streamed text, whatever the token frames coalesced."""
    return "".join(tokens(events))


def deltas(events: list[dict[str, Any]]) -> int:
    """How many token deltas the engine emitted (a coalesced frame counts ``coalesced`` of them)."""
    return sum(event.get("coalesced", 1) for event in events if event["event_type"] == "token")
