"""Target app for ``engine_stream.py``: llmgine_ws with an engine that streams ``n`` events per command."""

from __future__ import annotations

from typing import Any

from llmgine_ws import APIConfig, EngineContext, Extensions, Session, create_app


class StreamEngine:
    """Emits ``command["n"]`` token events as fast as the connection takes them."""

    def __init__(self, session: Session, config: dict[str, Any]) -> None:
        self.session = session

    async def start(self) -> None:
        return None

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        n = int(command["n"])
        for _ in range(n):
            await ctx.emit("token", {"text": "token "})
        return {"tokens": n}

    async def stop(self) -> None:
        return None


extensions = Extensions()
extensions.register_engine("stream", StreamEngine)
# No per-connection rate limit or pings: this measures streaming, not the security defaults.
app = create_app(APIConfig.from_env(rate_limit=0, ping_interval=0), extensions)
