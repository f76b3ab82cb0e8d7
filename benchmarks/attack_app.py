"""Target app for ``attack.py``: the default app and its default limits (``LLMGINE_API_*``), plus one
engine whose commands wait for the user (``ask_user``) — what the queued-command flood queues behind."""

from __future__ import annotations

from typing import Any

from llmgine_ws import APIConfig, EngineContext, Extensions, Session, create_app


class AskingEngine:
    """Each command asks the user a question and waits for the answer."""

    def __init__(self, session: Session, config: dict[str, Any]) -> None:
        self.session = session

    async def start(self) -> None:
        return None

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        return {"answer": await ctx.ask_user("and then?", timeout=3600)}

    async def stop(self) -> None:
        return None


extensions = Extensions()
extensions.register_engine("asking", AskingEngine)
app = create_app(APIConfig.from_env(), extensions)
