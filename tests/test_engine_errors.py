"""What a client is told when an engine fails: which step of its creation, never internals (issue 13)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from llmgine_ws import EngineContext, Extensions, Session
from llmgine_ws.client import RequestError, connect

from .support import serve

pytestmark = pytest.mark.anyio


class Flaky:
    def __init__(self, session: Session, config: dict[str, Any]) -> None:
        if config.get("fail") == "factory":
            raise KeyError("OPENAI_API_KEY (secret internals)")
        self.config = config

    async def start(self) -> None:
        if self.config.get("fail") == "start":
            raise ConnectionError("db at 10.0.0.7:5432 refused (secret internals)")
        if self.config.get("fail") == "hang":
            await anyio.sleep_forever()

    async def stop(self) -> None: ...

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        return None.missing  # type: ignore[attr-defined]  # an AttributeError, as in the issue


@pytest.mark.parametrize(("fail", "step", "timed_out", "says"), [
    ("factory", "factory", False, "its factory failed"),
    ("start", "start", False, "its start failed"),
    ("hang", "start", True, "its start timed out after 0.3s"),
])
async def test_engine_creation_failed_says_which_step(make_app: Any, fail: str, step: str, timed_out: bool,
                                                      says: str) -> None:
    extensions = Extensions()
    extensions.register_engine("flaky", Flaky)
    async with serve(make_app(extensions, engine_start_timeout=0.3)) as server, connect(server.ws_url) as client:
        session_id = await client.create_session()
        with pytest.raises(RequestError) as failed:
            await client.create_engine(session_id, "flaky", {"fail": fail})
        assert failed.value.code == "ENGINE_CREATION_FAILED"
        assert failed.value.message == f"engine 'flaky' could not be created: {says}"
        assert failed.value.details == {"engine_type": "flaky", "step": step, "timed_out": timed_out}
        assert "secret" not in str(failed.value.response.data) and "Error" not in failed.value.message
        # The session can try again.
        await client.create_engine(session_id, "flaky")


async def test_an_engine_failure_is_generic(make_app: Any) -> None:
    extensions = Extensions()
    extensions.register_engine("flaky", Flaky)
    async with serve(make_app(extensions)) as server, connect(server.ws_url) as client:
        session_id = await client.create_session()
        await client.create_engine(session_id, "flaky")
        result = await client.command(session_id, {}).wait()
        assert (result.status, result.error) == ("failed", "the engine failed on this command")
