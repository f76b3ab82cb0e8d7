"""The provider-neutral conversation and stream types, and the :class:`ChatProvider` protocol.

The engine keeps the conversation in these types and hands a :class:`ChatRequest` to a provider
adapter, which translates it to its SDK's wire format and translates the SDK's stream back into
:data:`StreamItem` values. Everything provider-specific lives in the adapter.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

import msgspec

Role = Literal["system", "user", "assistant", "tool"]


class ToolCall(msgspec.Struct, frozen=True):
    """A tool call the model made: ``arguments`` is the JSON text the model produced."""

    id: str
    name: str
    arguments: str


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One message of the conversation."""

    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    """On an assistant message: the tools it called (answered by the ``tool`` messages after it)."""
    tool_call_id: str | None = None
    """On a ``tool`` message: the call it answers."""


class ToolSpec(msgspec.Struct, frozen=True):
    """A tool as the model sees it: ``parameters`` is a JSON Schema object."""

    name: str
    description: str
    parameters: dict[str, Any]


class ChatRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One call to the model."""

    model: str
    messages: list[ChatMessage]
    """The system prompt (if any) first, then the conversation."""
    tools: list[ToolSpec] = msgspec.field(default_factory=list)
    tool_choice: Literal["auto", "none"] = "auto"
    """``"none"`` when the engine demands an answer (the tool-round limit was reached)."""
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None


class Usage(msgspec.Struct, frozen=True):
    """Token counts as the provider reported them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens,
                     self.total_tokens + other.total_tokens)


class TextDelta(msgspec.Struct, frozen=True):
    """A piece of the reply's text."""

    text: str


class ToolCallDelta(msgspec.Struct, frozen=True):
    """A piece of a tool call: calls are told apart by ``index``; ``id`` and ``name`` come once
    (usually first), ``arguments`` arrives in fragments that the engine concatenates."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class StreamEnd(msgspec.Struct, frozen=True):
    """The model finished: the last item of a complete stream. A stream without it was cut off."""

    finish_reason: str
    usage: Usage | None = None


StreamItem = TextDelta | ToolCallDelta | StreamEnd


class ChatProvider(Protocol):
    """An adapter between the engine and one provider's SDK.

    ``stream`` is an async generator: the engine iterates it under its own timeouts and cancel
    scope, and closes it (``aclose``) when it stops early, so the adapter must release the
    provider's HTTP response in a ``finally`` (shielded from cancellation). It raises
    :class:`~llmgine_ws.llm.LLMError` for provider failures, never the SDK's own exceptions.
    """

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        """Call the model and yield its reply as it streams in."""
        ...

    async def aclose(self) -> None:
        """Release the SDK client (called from the engine's ``stop``)."""
