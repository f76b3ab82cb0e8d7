"""Target apps for W6 (``llm_answers.py``): llmgine_ws serving LLM-like answers.

An ``answer`` engine streams the bursts of :mod:`benchmarks._tokens` with
``ctx.emit("token", {"text": token})``, one call per token, like an LLM engine forwarding a
provider's stream. ``app`` coalesces (``engine_event_coalesce_ms``, default 25 ms, from the
environment); ``per_token_app`` sends one frame per token (coalescing off). Command
``{"bursts": n, "start": <monotonic s>, "silent": false}``; with ``silent`` the engine reads its
source but emits nothing (what the token source alone costs).
"""

from __future__ import annotations

from typing import Any

from benchmarks._tokens import TokenSource, tune_gc
from llmgine_ws import APIConfig, EngineContext, Extensions, Session, create_app

SOURCE = TokenSource()
tune_gc()

# Thousands of sessions from one address, no rate limit or pings: this measures streaming.
LIMITS: dict[str, Any] = {
    "rate_limit": 0, "ping_interval": 0, "max_connections": 1_000_000, "max_connections_per_ip": 1_000_000,
    "max_sessions": 1_000_000, "max_sessions_per_ip": 1_000_000, "max_sessions_per_user": 1_000_000,
    "user_rate_limit": 0,
}


class AnswerEngine:
    """Forwards each token of its answer to the client as it arrives."""

    def __init__(self, session: Session, config: dict[str, Any]) -> None:
        self.session = session

    async def start(self) -> None:
        return None

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        tokens = 0
        silent = bool(command.get("silent"))
        async for burst in SOURCE.answer(int(command["bursts"]), float(command["start"])):
            tokens += len(burst)
            if not silent:
                for token in burst:
                    await ctx.emit("token", {"text": token})
        return {"tokens": tokens}

    async def stop(self) -> None:
        return None


def _app(**overrides: Any) -> Any:
    extensions = Extensions()
    extensions.register_engine("answer", AnswerEngine)
    return create_app(APIConfig.from_env(**LIMITS, **overrides), extensions)


app = _app()
per_token_app = _app(engine_event_coalesce_ms=0)

