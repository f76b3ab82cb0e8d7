"""LLM engines: an engine backed by a chat model, with streamed tokens, bounded history and approved tools.

Install the ``openai`` extra for the OpenAI-compatible adapter (OpenAI, vLLM, Ollama, llama.cpp,
LM Studio, Groq, Together, OpenRouter...)::

    from llmgine_ws.llm import LLMConfig, LLMEngineFactory, Tools

    tools = Tools()

    @tools.register(needs_approval=True)
    def get_weather(city: str) -> str:
        "The current weather in a city."
        return f"sunny in {city}"

    extensions.register_engine("llm", LLMEngineFactory(LLMConfig.from_env(), tools=tools))

See ``docs/llm-engines.md``; other providers plug in through :class:`ChatProvider`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ClientOverrides, LLMConfig
from .engine import LLMCommand, LLMEngine, LLMEngineFactory, ProviderFactory
from .errors import LLMError, LLMErrorCode, retry_after_seconds, status_error
from .history import History, estimate_tokens
from .messages import (
    ChatMessage,
    ChatProvider,
    ChatRequest,
    StreamEnd,
    StreamItem,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    Usage,
)
from .tools import Tool, ToolError, Tools

if TYPE_CHECKING:
    from .openai_provider import OpenAIChatProvider

__all__ = [
    "ChatMessage",
    "ChatProvider",
    "ChatRequest",
    "ClientOverrides",
    "History",
    "LLMCommand",
    "LLMConfig",
    "LLMEngine",
    "LLMEngineFactory",
    "LLMError",
    "LLMErrorCode",
    "OpenAIChatProvider",
    "ProviderFactory",
    "StreamEnd",
    "StreamItem",
    "TextDelta",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolError",
    "ToolSpec",
    "Tools",
    "Usage",
    "estimate_tokens",
    "retry_after_seconds",
    "status_error",
]


def __getattr__(name: str) -> Any:
    # The OpenAI adapter needs the `openai` extra; everything else (and other adapters) does not.
    if name == "OpenAIChatProvider":
        from .openai_provider import OpenAIChatProvider

        return OpenAIChatProvider
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
