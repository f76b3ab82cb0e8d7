"""An app for shutdown tests, run in its own process (``--app tests.apps.shutdown_app:app``)."""

from __future__ import annotations

from typing import Any

import anyio

from llmgine_ws import APIConfig, EngineContext, Extensions, HandlerContext, Session, create_app


async def work(data: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
    """Runs until shutdown starts, then asks its client whether to finish, then finishes."""
    await ctx.send("notification", {"notification_type": "working", "message": "started"})
    await ctx.stopping.wait()
    answer = await ctx.ask(data={"request_type": "finish"}, timeout=30)
    return {"done": True, "answer": answer.data.get("value")}


class HangingEngine:
    """Never finishes a command (until cancelled) and never returns from ``stop()``."""

    def __init__(self, session: Session, config: dict[str, Any]) -> None:
        self.session = session

    async def start(self) -> None:
        return None

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        await ctx.emit("started", {})
        await anyio.sleep_forever()

    async def stop(self) -> None:
        await anyio.sleep_forever()


extensions = Extensions()
extensions.register_handler("work", dict[str, Any], work)
extensions.register_engine("hang", HangingEngine)
app = create_app(APIConfig.from_env(ping_interval=0, rate_limit=0), extensions)
