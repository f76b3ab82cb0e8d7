"""Metrics scraped from /metrics and structured log output, against a real server."""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
import httpx
import pytest

from llmgine_ws import Extensions, HandlerContext
from llmgine_ws.client import RequestError, connect
from llmgine_ws.logconfig import ContextFormatter, JSONFormatter, logging_config

from .rawws import send_raw
from .support import serve

pytestmark = pytest.mark.anyio


def parse_metrics(text: str) -> dict[str, float]:
    """``name{labels}`` → value, for the samples of a Prometheus text exposition."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def scrape(http: httpx.AsyncClient, **kwargs: Any) -> dict[str, float]:
    response = await http.get("/metrics", **kwargs)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse_metrics(response.text)


async def test_metrics_count_what_happens(make_app: Any) -> None:
    async def boom(data: dict[str, Any], ctx: HandlerContext) -> None:
        raise RuntimeError("boom")

    extensions = Extensions()
    extensions.register_handler("boom", dict[str, Any], boom)
    app = make_app(extensions, rate_limit=2, rate_burst=2, rate_limit_strikes=100)
    async with serve(app) as server, httpx.AsyncClient(base_url=server.http_url) as http:
        before = await scrape(http)
        assert before["llmgine_ws_connections"] == 0
        async with connect(server.ws_url, rate_limit_retries=0, resume=False) as client:
            session_id = await client.create_session()
            with pytest.raises(RequestError):
                await client.request("boom", {})
            with pytest.raises(RequestError):  # the third message in a burst of two
                await client.request("status", {"session_id": session_id})
            client.on_server_request("user_input")(lambda message: {"user_input": "x"})
            await server.runtime.messaging.send_to_app_and_wait(client.app_id, data={"request_type": "user_input"},
                                                                timeout=5)
            during = await scrape(http)
        assert during["llmgine_ws_connections"] == 1
        assert during["llmgine_ws_sessions"] == 1
        assert during["llmgine_ws_ready"] == 1
        assert during['llmgine_ws_messages_in_total{type="create_session"}'] == 1
        assert during['llmgine_ws_messages_in_total{type="boom"}'] == 1
        assert during['llmgine_ws_messages_out_total{type="connected"}'] == 1
        assert during['llmgine_ws_errors_total{code="INTERNAL_ERROR"}'] == 1
        assert during['llmgine_ws_errors_total{code="RATE_LIMITED"}'] == 1
        assert during['llmgine_ws_limit_hits_total{limit="rate"}'] == 1
        assert during['llmgine_ws_server_requests_total{outcome="answered"}'] == 1
        assert during['llmgine_ws_server_request_duration_seconds_count{outcome="answered"}'] == 1
        assert during['llmgine_ws_request_duration_seconds_count{type="create_session"}'] == 1


async def test_metrics_count_forced_closes_and_refused_handshakes(make_app: Any) -> None:
    app = make_app(max_message_size=64, allowed_origins=["https://ok.example"])
    async with serve(app) as server, httpx.AsyncClient(base_url=server.http_url) as http:
        async with connect(server.ws_url) as client:
            await send_raw(client, "x" * 100)
            assert await client.wait_closed(timeout=5) == 1009
        from llmgine_ws.client import HandshakeRejected

        with pytest.raises(HandshakeRejected):
            async with connect(server.ws_url, headers={"Origin": "https://evil.example"}):
                pass
        with anyio.fail_after(5):
            await server.runtime.hub.wait_empty()
        samples = await scrape(http)
    assert samples['llmgine_ws_forced_closes_total{reason="message too big"}'] == 1
    assert samples['llmgine_ws_handshakes_refused_total{reason="origin not allowed"}'] == 1


async def test_two_apps_keep_separate_metrics(make_app: Any) -> None:
    async with serve(make_app()) as one, serve(make_app()) as two, connect(one.ws_url) as client:
        await client.create_session()
        async with httpx.AsyncClient(base_url=one.http_url) as first, \
                httpx.AsyncClient(base_url=two.http_url) as second:
            assert (await scrape(first))["llmgine_ws_sessions"] == 1
            assert (await scrape(second))["llmgine_ws_sessions"] == 0


async def test_metrics_behind_the_admin_token(make_app: Any) -> None:
    async with serve(make_app(admin_token="s3cret")) as server, httpx.AsyncClient(base_url=server.http_url) as http:
        assert (await http.get("/metrics")).status_code == 401
        await scrape(http, headers={"Authorization": "Bearer s3cret"})


async def test_metrics_can_be_turned_off(make_app: Any) -> None:
    async with serve(make_app(metrics=False)) as server, httpx.AsyncClient(base_url=server.http_url) as http:
        response = await http.get("/metrics")
    assert response.status_code == 404
    assert "metrics" in response.text


def _record(**extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("llmgine_ws.dispatch", logging.ERROR, __file__, 1, "handler for %r raised",
                               ("boom",), None)
    record.__dict__.update(extra)
    return record


def test_json_formatter_carries_the_context() -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        import sys

        record = _record(app_id="app-1", message_id="m-1")
        record.exc_info = sys.exc_info()
    line = json.loads(JSONFormatter().format(record))
    assert line["level"] == "ERROR"
    assert line["logger"] == "llmgine_ws.dispatch"
    assert line["message"] == "handler for 'boom' raised"
    assert (line["app_id"], line["message_id"]) == ("app-1", "m-1")
    assert "ValueError: bad" in line["exception"]


def test_text_formatter_appends_the_context() -> None:
    text = ContextFormatter().format(_record(app_id="app-1", message_id="m-1"))
    assert text.endswith("handler for 'boom' raised [app_id=app-1 message_id=m-1]")


def test_logging_config_is_valid_for_both_formats() -> None:
    import logging.config

    for log_format in ("text", "json"):
        config = logging_config(log_format, "debug")
        logging.config.dictConfig(config)
        assert logging.getLogger("llmgine_ws").level == logging.DEBUG
        assert not logging.getLogger("llmgine_ws").propagate
    logging.getLogger("llmgine_ws").propagate = True  # give pytest's caplog its records back
    logging.getLogger("llmgine_ws").handlers.clear()
    logging.getLogger("uvicorn").propagate = True
    logging.getLogger("uvicorn").handlers.clear()
    logging.getLogger("uvicorn.access").propagate = True
    logging.getLogger("uvicorn.access").handlers.clear()
