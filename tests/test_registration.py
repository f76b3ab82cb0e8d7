"""Registration fails early with a precise error; what a registered message accepts and replies (issue 13)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from llmgine_ws import EngineContext, Extensions, HandlerContext, Session
from llmgine_ws.client import RequestError, connect

from .support import serve

pytestmark = pytest.mark.anyio


class Summarize(msgspec.Struct, frozen=True):
    """Summarize a text."""

    text: str
    max_words: int = 10


async def summarize(data: Summarize, ctx: HandlerContext) -> dict[str, Any]:
    assert isinstance(data, Summarize)  # the handler gets its own struct, strict or not
    return {"summary": " ".join(data.text.split()[: data.max_words])}


class GoodEngine:
    def __init__(self, session: Session, config: dict[str, Any]) -> None: ...
    async def start(self) -> None: ...
    async def handle_command(self, command: Any, ctx: EngineContext) -> Any: ...
    async def stop(self) -> None: ...


class NotAnEngine:
    def __init__(self, session: Session, config: dict[str, Any]) -> None: ...
    def start(self) -> None: ...


def test_a_handler_that_is_not_callable_is_refused_at_registration() -> None:
    with pytest.raises(TypeError, match=r"'summarize' must be a callable handler\(data, ctx\), not None"):
        Extensions().register_handler("summarize", Summarize, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("handler", [lambda data: data, lambda: None, lambda data, ctx, extra: None])
def test_a_handler_of_the_wrong_arity_is_refused_at_registration(handler: Any) -> None:
    with pytest.raises(TypeError, match=r"must be callable as handler\(data, ctx\)"):
        Extensions().register_handler("summarize", Summarize, handler)


def test_handlers_with_defaults_or_star_args_are_fine() -> None:
    extensions = Extensions()
    extensions.register_handler("a", Summarize, lambda data, ctx, extra=None: None)
    extensions.register_handler("b", Summarize, lambda *args: None)


def test_an_undecodable_data_type_is_refused_at_registration() -> None:
    with pytest.raises(TypeError, match="the data type of 'summarize' is None"):
        Extensions().register_handler("summarize", None, summarize)
    with pytest.raises(TypeError, match="the data type of 'summarize' cannot be decoded by msgspec"):
        Extensions().register_handler("summarize", NotAnEngine, summarize)  # a plain class


@pytest.mark.parametrize(("factory", "error"), [
    (42, r"the factory of engine type 'x' must be a callable factory\(session, config\), not 42"),
    (None, "must be a callable"),
    (lambda session: None, r"must be callable as factory\(session, config\)"),
    (NotAnEngine, r"engine class NotAnEngine .* missing or not async: start, handle_command, stop"),
])
def test_a_bad_engine_factory_is_refused_at_registration(factory: Any, error: str) -> None:
    with pytest.raises(TypeError, match=error):
        Extensions().register_engine("x", factory)


def test_good_engine_factories_register() -> None:
    extensions = Extensions()
    extensions.register_engine("class", GoodEngine)

    async def make(session: Session, config: dict[str, Any]) -> GoodEngine:
        return GoodEngine(session, config)

    extensions.register_engine("async", make)
    assert set(extensions.engine_factories) == {"class", "async"}


async def test_unknown_fields_are_refused_by_default_and_allowed_on_request(make_app: Any) -> None:
    extensions = Extensions()
    extensions.register_handler("summarize", Summarize, summarize)
    extensions.register_handler("summarize_lax", Summarize, summarize, forbid_unknown_fields=False)
    async with serve(make_app(extensions)) as server, connect(server.ws_url) as client:
        with pytest.raises(RequestError) as refused:
            await client.request("summarize", {"text": "a b c", "max_wrds": 1})
        assert refused.value.code == "VALIDATION_ERROR"
        assert "max_wrds" in refused.value.message
        ok = await client.request("summarize", {"text": "a b c", "max_words": 1})
        assert ok.data == {"summary": "a"}
        lax = await client.request("summarize_lax", {"text": "a b c", "max_wrds": 1})
        assert lax.data == {"summary": "a b c"}


@pytest.mark.parametrize("inline", [True, False])
async def test_a_handler_returning_a_list_answers_internal_error_and_logs_why(
        make_app: Any, inline: bool, caplog: pytest.LogCaptureFixture) -> None:
    def listing(data: dict[str, Any], ctx: HandlerContext) -> Any:
        return [1, 2, 3]

    async def listing_async(data: dict[str, Any], ctx: HandlerContext) -> Any:
        return [1, 2, 3]

    extensions = Extensions()
    extensions.register_handler("listing", dict[str, Any], listing if inline else listing_async)
    extensions.register_handler("wrapped", dict[str, Any], lambda data, ctx: {"items": [1, 2, 3]})
    async with serve(make_app(extensions)) as server, connect(server.ws_url) as client:
        with pytest.raises(RequestError) as failed:
            await client.request("listing", {})
        assert failed.value.code == "INTERNAL_ERROR"
        assert (await client.request("wrapped", {})).data == {"items": [1, 2, 3]}
    assert any(r.exc_info and "returned a list: a reply's data is an object" in str(r.exc_info[1])
               for r in caplog.records)


def test_a_pydantic_model_is_refused_with_a_pointer_to_the_docs() -> None:
    from pydantic import BaseModel

    class Note(BaseModel):
        text: str

    with pytest.raises(TypeError, match=r"cannot be decoded by msgspec .*pydantic models: see docs/fastapi.md"):
        Extensions().register_handler("note", Note, summarize)
