"""Server-side configuration of an LLM engine, and the part of it a client may override.

Everything that costs money or reaches a secret — the provider URL, the API key, the model, the
limits — is decided by the server when it registers the engine. A client's ``create_engine.config``
may only set the generation fields the app lists in ``client_fields``; anything else is refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

import msgspec

from .errors import LLMError, LLMErrorCode

Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class LLMConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How an LLM engine talks to its provider, and its limits. Given when the engine is registered."""

    model: str
    """The model name as the provider spells it (``gpt-4o-mini``, ``llama3.1:8b``...)."""
    base_url: str | None = None
    """The OpenAI-compatible endpoint, e.g. ``http://localhost:11434/v1``; ``None``: OpenAI's own."""
    api_key: str = ""
    """Sent as a bearer token; never logged, never shown in a repr. Empty for keyless local servers."""
    system_prompt: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_output_tokens: PositiveInt | None = None
    """The reply's token limit (sent as ``max_tokens``); ``None`` leaves it to the provider."""
    history_max_messages: PositiveInt | None = 50
    """Earlier messages kept per session; the oldest whole turns are dropped first."""
    history_max_tokens: PositiveInt | None = None
    """Estimated tokens (about 4 characters each) of history plus the current turn sent to the model."""
    max_tool_rounds: NonNegativeInt = 5
    """Tool rounds per command; after that the model is asked to answer without tools."""
    max_reply_chars: PositiveInt = 200_000
    """Bound on what the engine buffers from one model call: its text plus its tool calls' arguments."""
    max_tool_result_chars: PositiveInt = 16_000
    """A tool's result is cut to this before it goes back to the model (and to the client's event)."""
    approval_timeout: Seconds | None = None
    """Seconds the user has to approve a tool call; no answer counts as declined.

    ``None``: the server's ``server_request_timeout`` (``LLMGINE_API_SERVER_REQUEST_TIMEOUT``, 30 s by default).
    """
    first_chunk_timeout: Seconds = 60.0
    """Seconds from sending the request to the first streamed chunk."""
    stall_timeout: Seconds = 30.0
    """Longest silence allowed between two chunks of a stream."""
    max_retries: NonNegativeInt = 2
    """New attempts after a retryable failure (429, 5xx, connection error) that streamed nothing yet."""
    retry_backoff: Seconds = 0.5
    """First backoff in seconds, doubled on each retry (with jitter) unless the provider says ``retry_after``."""
    max_retry_wait: Seconds = 20.0
    """A ``retry_after`` longer than this fails the command at once (reporting it) instead of waiting."""
    stream_usage: bool = True
    """Ask for token usage in the stream (``stream_options.include_usage``); turn off for servers that reject it."""
    tool_events: bool = True
    """Emit ``tool_call`` / ``tool_result`` engine events around each tool run."""
    extra_headers: dict[str, str] = msgspec.field(default_factory=dict)
    extra_body: dict[str, Any] = msgspec.field(default_factory=dict)
    """Provider-specific request fields (e.g. ``{"reasoning_effort": "low"}``)."""

    def __repr__(self) -> str:
        # The API key must not end up in logs or tracebacks through a repr.
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__struct_fields__ if name != "api_key")
        return f"LLMConfig({fields}, api_key={'***' if self.api_key else ''!r})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> LLMConfig:
        """Read ``OPENAI_BASE_URL``, ``OPENAI_API_KEY`` and ``LLMGINE_LLM_MODEL`` (the usual SDK names).

        ``overrides`` set the other fields (and win over the environment).
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {"base_url": env.get("OPENAI_BASE_URL") or None,
                                  "api_key": env.get("OPENAI_API_KEY", ""),
                                  "model": env.get("LLMGINE_LLM_MODEL") or "gpt-4o-mini"}
        values.update(overrides)
        return msgspec.convert(values, cls)


class ClientOverrides(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The fields a client may be allowed to set through ``create_engine.config``."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    system_prompt: Annotated[str, msgspec.Meta(max_length=20_000)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_output_tokens: PositiveInt | None = None
    """May lower the server's ``max_output_tokens``, never raise it."""


CLIENT_SETTABLE = frozenset(ClientOverrides.__struct_fields__)


def check_client_fields(fields: Iterable[str]) -> frozenset[str]:
    """Validate an app's allow-list (at registration, so a typo fails at startup)."""
    allowed = frozenset(fields)
    unknown = sorted(allowed - CLIENT_SETTABLE)
    if unknown:
        raise ValueError(f"client_fields {unknown} cannot be opened to clients; choose among {sorted(CLIENT_SETTABLE)}")
    return allowed


def apply_client_config(config: LLMConfig, client_config: Mapping[str, Any], allowed: frozenset[str]) -> LLMConfig:
    """``config`` with the client's overrides applied, or :class:`LLMError` ``INVALID_ENGINE_CONFIG``."""
    refused = sorted(str(name) for name in client_config if name not in allowed)
    if refused:
        settable = sorted(allowed) or "none"
        raise LLMError(LLMErrorCode.INVALID_ENGINE_CONFIG,
                       f"create_engine config may not set {refused}; settable by the client: {settable}")
    try:
        overrides = msgspec.convert(dict(client_config), ClientOverrides)
    except msgspec.ValidationError as exc:
        raise LLMError(LLMErrorCode.INVALID_ENGINE_CONFIG, f"invalid create_engine config: {exc}") from None
    changes = {name: getattr(overrides, name) for name in client_config}
    limit = config.max_output_tokens
    wanted = changes.get("max_output_tokens")
    if limit is not None and wanted is not None and wanted > limit:
        raise LLMError(LLMErrorCode.INVALID_ENGINE_CONFIG, f"max_output_tokens may not exceed {limit}")
    return msgspec.structs.replace(config, **changes)
