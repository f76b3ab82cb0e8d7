"""What a client is told when the model provider fails: a code, a safe message, safe details.

A provider's own error text can quote the request, the API key's prefix or internal hostnames, so
it never reaches the client: adapters turn provider exceptions into :class:`LLMError` with a
message of our own, and log the status and error type server-side.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any

from ..errors import ProtocolError


class LLMErrorCode(enum.StrEnum):
    """Codes of the errors an LLM engine command can fail with."""

    AUTH_FAILED = "LLM_AUTH_FAILED"
    """The provider rejected the server's credentials (401/403): a server configuration problem."""
    RATE_LIMITED = "LLM_RATE_LIMITED"
    """The provider is rate limiting this server (429); ``details.retry_after`` in seconds when known."""
    QUOTA_EXCEEDED = "LLM_QUOTA_EXCEEDED"
    """The provider account is out of quota or credit (a 429 that waiting does not fix)."""
    CONTEXT_LENGTH_EXCEEDED = "LLM_CONTEXT_LENGTH_EXCEEDED"
    """The conversation no longer fits the model's context window."""
    BAD_REQUEST = "LLM_BAD_REQUEST"
    """The provider refused the request (400/404/422: unknown model, invalid parameter...)."""
    TIMEOUT = "LLM_TIMEOUT"
    """No first chunk within ``first_chunk_timeout``, or a gap over ``stall_timeout`` mid-stream."""
    PROVIDER_ERROR = "LLM_PROVIDER_ERROR"
    """The provider failed (5xx, or an error event in the stream); ``details.status`` when known."""
    UNAVAILABLE = "LLM_UNAVAILABLE"
    """The provider could not be reached (connection refused, DNS, TLS)."""
    STREAM_INTERRUPTED = "LLM_STREAM_INTERRUPTED"
    """The reply stream was cut off before the model finished."""
    REPLY_TOO_LONG = "LLM_REPLY_TOO_LONG"
    """One model call's text plus tool-call arguments outgrew ``max_reply_chars``."""
    TOOL_ROUNDS_EXCEEDED = "LLM_TOOL_ROUNDS_EXCEEDED"
    """The model kept calling tools after ``max_tool_rounds`` rounds and an answer was demanded."""
    INVALID_COMMAND = "INVALID_COMMAND"
    """The command is not ``{"text": "<non-empty string>"}``."""
    INVALID_ENGINE_CONFIG = "INVALID_ENGINE_CONFIG"
    """``create_engine.config`` sets a field the app does not let clients set, or an invalid value."""


class LLMError(ProtocolError):
    """A failed LLM call, safe to show the client.

    The engine command fails with ``"<code>: <message>"`` as its ``error``. ``retryable`` tells the
    engine a new attempt may succeed (it retries only while nothing of the reply was streamed);
    ``retry_after`` is the provider's requested wait in seconds, when it gave one.
    """

    def __init__(self, code: LLMErrorCode, message: str, *, retryable: bool = False,
                 retry_after: float | None = None, status: int | None = None) -> None:
        details: dict[str, Any] = {}
        if retry_after is not None:
            details["retry_after"] = retry_after
        if status is not None:
            details["status"] = status
        super().__init__(code, f"{code.value}: {message}", details)
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


_CONTEXT_LENGTH_HINTS = ("context_length", "context length", "maximum context", "too many tokens", "prompt is too long")


def status_error(status: int, *, headers: Mapping[str, str] | None = None, hint: str = "") -> LLMError:
    """The client-safe error for a provider's HTTP error ``status``: for any provider adapter.

    ``headers`` give ``retry-after``; ``hint`` is the provider's error code/type/message, only
    searched for known markers (quota, context length) and never shown.
    """
    hint = hint.lower()
    if status in (401, 403):
        return LLMError(LLMErrorCode.AUTH_FAILED, "the model provider refused this server's credentials", status=status)
    if status == 429:
        if "insufficient_quota" in hint:
            return LLMError(LLMErrorCode.QUOTA_EXCEEDED, "the model provider account is out of quota", status=status)
        retry_after = retry_after_seconds(headers or {})
        wait = "" if retry_after is None else f"; retry after {retry_after:g} s"
        return LLMError(LLMErrorCode.RATE_LIMITED, f"the model provider is rate limiting requests{wait}",
                        retryable=True, retry_after=retry_after, status=status)
    if status >= 500:
        return LLMError(LLMErrorCode.PROVIDER_ERROR, f"the model provider failed (HTTP {status})", retryable=True,
                        status=status)
    if status in (400, 413, 422) and any(marker in hint for marker in _CONTEXT_LENGTH_HINTS):
        return LLMError(LLMErrorCode.CONTEXT_LENGTH_EXCEEDED,
                        "the conversation is too long for the model's context window", status=status)
    return LLMError(LLMErrorCode.BAD_REQUEST, f"the model provider refused the request (HTTP {status})",
                    status=status)


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """``retry-after-ms`` or ``retry-after`` (seconds) from a response's headers, if given as a number."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue  # an HTTP date: rare from LLM providers; the engine's own backoff applies
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None
