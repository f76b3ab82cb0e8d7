"""The adapter for OpenAI-compatible chat-completions endpoints, through the official ``openai`` SDK.

The same adapter serves OpenAI, vLLM, Ollama, llama.cpp's server, LM Studio, Groq, Together,
OpenRouter... — anything that speaks ``POST /chat/completions`` with ``stream: true``. The SDK's
``AsyncOpenAI`` runs on httpx under anyio, so the adapter works under asyncio and trio.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import openai

from .config import LLMConfig
from .errors import LLMError, LLMErrorCode, status_error
from .messages import ChatMessage, ChatRequest, StreamEnd, StreamItem, TextDelta, ToolCallDelta, Usage

logger = logging.getLogger("llmgine_ws.llm")

KEYLESS = "unused"
"""Sent as the API key to servers that need none (the SDK refuses to start without one)."""
CLOSE_TIMEOUT = 2.0
"""Seconds allowed to close an abandoned response (closing the socket is what stops the provider)."""


class OpenAIChatProvider:
    """A :class:`~llmgine_ws.llm.ChatProvider` on ``openai.AsyncOpenAI`` (one client, its own connection pool).

    The SDK's own retries are off: the engine retries, and only while nothing has been streamed.
    """

    def __init__(self, config: LLMConfig) -> None:
        self.config = config
        self.client = openai.AsyncOpenAI(
            api_key=config.api_key or KEYLESS,
            base_url=config.base_url,
            max_retries=0,
            # A backstop only: the engine enforces first_chunk_timeout and stall_timeout itself.
            timeout=max(config.first_chunk_timeout, config.stall_timeout) + 5.0,
            default_headers=config.extra_headers or None,
        )

    async def aclose(self) -> None:
        """Close the SDK client's connection pool."""
        await self.client.close()

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        """Stream one chat completion; provider failures become :class:`LLMError`."""
        arguments = self._arguments(request)
        try:
            response = await self.client.chat.completions.create(**arguments)
        except openai.APIError as exc:
            raise _map_error(exc, streaming=False) from None
        finish_reason: str | None = None
        usage: Usage | None = None
        try:
            async for chunk in response:
                if chunk.usage is not None:
                    usage = Usage(chunk.usage.prompt_tokens or 0, chunk.usage.completion_tokens or 0,
                                  chunk.usage.total_tokens or 0)
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                delta = choice.delta
                if delta is not None:
                    if delta.content:
                        yield TextDelta(delta.content)
                    for position, call in enumerate(delta.tool_calls or ()):
                        function = call.function
                        # Some servers omit the index when each call comes whole in one chunk.
                        index = call.index if isinstance(call.index, int) else position
                        yield ToolCallDelta(index, call.id or None, function.name if function else None,
                                            (function.arguments or "") if function else "")
                if choice.finish_reason:
                    finish_reason = choice.finish_reason
        except openai.APIError as exc:
            raise _map_error(exc, streaming=True) from None
        finally:
            # Close at once, even when cancelled: a closed socket is what tells the provider to stop
            # generating (and billing). Shielded, or the cancellation would interrupt the close.
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                await response.close()
        if finish_reason is not None:
            yield StreamEnd(finish_reason, usage)

    def _arguments(self, request: ChatRequest) -> dict[str, Any]:
        arguments: dict[str, Any] = {"model": request.model, "stream": True,
                                     "messages": [_message(message) for message in request.messages]}
        if self.config.stream_usage:
            arguments["stream_options"] = {"include_usage": True}
        if request.tools:
            arguments["tools"] = [{"type": "function", "function": {"name": tool.name, "description": tool.description,
                                                                    "parameters": tool.parameters}}
                                  for tool in request.tools]
            arguments["tool_choice"] = request.tool_choice
        if request.temperature is not None:
            arguments["temperature"] = request.temperature
        if request.top_p is not None:
            arguments["top_p"] = request.top_p
        if request.max_output_tokens is not None:
            arguments["max_tokens"] = request.max_output_tokens
        if self.config.extra_body:
            arguments["extra_body"] = self.config.extra_body
        return arguments


def _message(message: ChatMessage) -> dict[str, Any]:
    wire: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        wire["content"] = message.content or None
        wire["tool_calls"] = [{"id": call.id, "type": "function",
                               "function": {"name": call.name, "arguments": call.arguments}}
                              for call in message.tool_calls]
    if message.tool_call_id is not None:
        wire["tool_call_id"] = message.tool_call_id
    return wire


def _map_error(exc: openai.APIError, *, streaming: bool) -> LLMError:
    """The client-safe error for an SDK exception; the provider's text goes to the log only."""
    status = exc.status_code if isinstance(exc, openai.APIStatusError) else None
    logger.warning("LLM provider error: %s (status %s, type %s, code %s)", type(exc).__name__, status,
                   exc.type, exc.code)
    if isinstance(exc, openai.APITimeoutError):
        return LLMError(LLMErrorCode.TIMEOUT, "the model provider did not answer in time")
    if isinstance(exc, openai.APIConnectionError):
        if streaming:
            # Retryable: the engine retries only if none of the reply reached the client yet.
            return LLMError(LLMErrorCode.STREAM_INTERRUPTED, "the model's reply stream was cut off", retryable=True)
        return LLMError(LLMErrorCode.UNAVAILABLE, "the model provider could not be reached", retryable=True)
    if not isinstance(exc, openai.APIStatusError):  # an error event inside the stream
        return LLMError(LLMErrorCode.PROVIDER_ERROR, "the model provider reported an error during the reply")
    return status_error(exc.status_code, headers=exc.response.headers,
                        hint=f"{exc.code or ''} {exc.type or ''} {exc.message}")
