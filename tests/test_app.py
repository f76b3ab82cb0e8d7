"""The app as users deploy it: HTTP endpoints, mounting, configuration, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from llmgine_ws import APIConfig, ConfigError, Extensions, HandlerContext, create_app, get_messaging_api
from llmgine_ws.client import connect

from .support import LiveServer, listening_socket, serve

pytestmark = pytest.mark.anyio


class Translate(msgspec.Struct, frozen=True):
    text: str
    target: str = "fr"


async def test_health_endpoints(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        health = (await http.get("/health")).json()
        assert health["status"] == "healthy"
        assert health["version"] == server.runtime.config.version
        assert (await http.get("/health/live")).json()["status"] == "alive"
        assert (await http.get("/health/ready")).status_code == 200


async def test_info_lists_configuration_capabilities_and_custom_types(make_app: Any) -> None:
    async def translate(data: Translate, ctx: HandlerContext) -> dict[str, str]:
        return {"text": data.text}

    extensions = Extensions()
    extensions.register_handler("translate", Translate, translate)
    extensions.register_server_message("progress", dict[str, Any])
    app = make_app(extensions, title="Test API", custom={"api_key": "do-not-show"})
    async with serve(app) as server, httpx.AsyncClient(base_url=server.http_url) as http:
        info = (await http.get("/api/info")).json()
    assert info["title"] == "Test API"
    assert info["websocket_path"] == "/api/ws"
    assert info["custom_message_types"] == ["translate"]
    assert info["custom_server_message_types"] == ["progress"]
    assert "translate" in info["message_types"]["client"]
    assert {"ping", "create_session", "status", "close_session"} <= set(info["message_types"]["client"])
    assert {"notification", "server_request", "server_ping", "error"} <= set(info["message_types"]["server"])
    assert info["capabilities"]["server_requests"] is True
    assert info["config"]["max_sessions"] == 100
    assert "do-not-show" not in str(info)  # custom settings may hold secrets: only their keys are shown


async def test_connections_endpoint(server: LiveServer) -> None:
    async with connect(server.ws_url) as client, httpx.AsyncClient(base_url=server.http_url) as http:
        session_id = await client.create_session()
        body = (await http.get("/api/connections")).json()
    assert body["total"] == 1
    assert body["app_ids"] == [client.app_id]
    assert body["connections"][0]["sessions"] == [session_id]
    assert body["connections"][0]["pending_server_requests"] == 0


async def test_custom_handler_reply_type_and_struct_payload(make_app: Any) -> None:
    async def translate(data: Translate, ctx: HandlerContext) -> Translate:
        return Translate(text=data.text[::-1], target=data.target)

    extensions = Extensions()
    extensions.register_handler("translate", Translate, translate)
    extensions.register_handler("translate_v2", Translate, translate, response_type="translation")
    async with serve(make_app(extensions)) as server, connect(server.ws_url) as client:
        response = await client.request("translate", {"text": "abc", "target": "de"})
        assert (response.type, response.data) == ("translate_res", {"text": "cba", "target": "de"})
        response = await client.request("translate_v2", {"text": "xy"})
        assert (response.type, response.data) == ("translation", {"text": "yx", "target": "fr"})


def test_extension_registration_rules() -> None:
    extensions = Extensions()

    async def handler(data: Any, ctx: HandlerContext) -> None:
        return None

    with pytest.raises(ValueError, match="reserved"):
        extensions.register_handler("ping", dict[str, Any], handler)
    with pytest.raises(ValueError, match="must match"):
        extensions.register_handler("Bad Name", dict[str, Any], handler)
    extensions.register_handler("mine", dict[str, Any], handler)
    with pytest.raises(ValueError, match="already registered"):
        extensions.register_handler("mine", dict[str, Any], handler)
    with pytest.raises(TypeError, match="async"):
        extensions.register_connection_callback("connect", lambda app_id: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(RuntimeError, match="before asking"):
        extensions.get_messaging_api()
    create_app(APIConfig(), extensions)
    with pytest.raises(RuntimeError, match="registration is closed"):
        extensions.register_handler("later", dict[str, Any], handler)
    with pytest.raises(RuntimeError, match="already belong"):
        create_app(APIConfig(), extensions)


async def test_mounted_under_a_prefix_in_a_starlette_app() -> None:
    inner = create_app(APIConfig(ping_interval=0))

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("host app")

    host = Starlette(routes=[Route("/", home), Mount("/llm", app=inner)],
                     lifespan=inner.router.lifespan_context)
    async with serve(host, ws_path="/llm/api/ws") as server, httpx.AsyncClient(base_url=server.http_url) as http:
        assert (await http.get("/")).text == "host app"
        assert (await http.get("/llm/health/ready")).status_code == 200
        async with connect(server.ws_url) as client:
            session_id = await client.create_session()
            assert get_messaging_api(inner).get_app_sessions(client.app_id) == [session_id]


async def test_mounted_in_a_fastapi_app() -> None:
    fastapi = pytest.importorskip("fastapi")
    inner = create_app(APIConfig(ping_interval=0))
    host = fastapi.FastAPI(lifespan=inner.router.lifespan_context)

    @host.get("/items")
    async def items() -> dict[str, Any]:
        return {"items": [1, 2]}

    host.mount("/realtime", inner)
    async with serve(host, ws_path="/realtime/api/ws") as server, \
            httpx.AsyncClient(base_url=server.http_url) as http:
        assert (await http.get("/items")).json() == {"items": [1, 2]}
        assert (await http.get("/realtime/health/ready")).status_code == 200
        async with connect(server.ws_url) as client:
            assert (await client.request("ping", {"timestamp": "t"})).data == {"timestamp": "t"}


async def test_two_apps_in_one_process_share_nothing(make_app: Any) -> None:
    first, second = make_app(), make_app()
    async with serve(first) as one, serve(second) as two, connect(one.ws_url) as a, connect(two.ws_url) as b:
        await a.create_session()
        assert get_messaging_api(first).get_connected_apps() == [a.app_id]
        assert get_messaging_api(second).get_connected_apps() == [b.app_id]
        assert len(two.runtime.sessions) == 0
        assert await get_messaging_api(second).broadcast("notification", {}) == 1


def test_config_from_env_reads_seed_and_own_variables() -> None:
    env = {
        "LLMGINE_API_TITLE": "From Env",
        "LLMGINE_API_PORT": "9001",
        "LLMGINE_API_DEBUG": "true",
        "LLMGINE_API_MAX_SESSIONS": "7",
        "LLMGINE_API_SESSION_TIMEOUT": "60",
        "LLMGINE_API_SERVER_REQUEST_TIMEOUT": "2.5",
        "LLMGINE_API_PING_INTERVAL": "0",
        "LLMGINE_API_MISSED_PONGS": "4",
        "LLMGINE_API_OUTBOUND_QUEUE_SIZE": "64",
        "LLMGINE_API_CUSTOM": '{"timeouts": {"server_request_timeout": 30}}',
        "UNRELATED": "ignored",
    }
    config = APIConfig.from_env(env)
    assert (config.title, config.port, config.debug, config.max_sessions, config.session_timeout) == (
        "From Env", 9001, True, 7, 60.0)
    assert (config.server_request_timeout, config.ping_interval, config.missed_pongs) == (2.5, 0.0, 4)
    assert config.outbound_queue_size == 64
    assert config.custom == {"timeouts": {"server_request_timeout": 30}}
    assert APIConfig.from_env(env, max_sessions=3).max_sessions == 3


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LLMGINE_API_MAX_SESSIONS", "many"),
        ("LLMGINE_API_MAX_SESSIONS", "0"),
        ("LLMGINE_API_PORT", "70000"),
        ("LLMGINE_API_DEBUG", "maybe"),
        ("LLMGINE_API_SESSION_TIMEOUT", "-5"),
        ("LLMGINE_API_CUSTOM", "{not json"),
    ],
)
def test_bad_config_value_names_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        APIConfig.from_env({variable: value})


def test_bad_config_in_code_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="max_sessions"):
        APIConfig(max_sessions=0)


async def _talk_to(port: int) -> None:
    async with connect(f"ws://127.0.0.1:{port}/api/ws", open_timeout=20) as client:
        assert (await client.request("ping", {"timestamp": "cli"})).data == {"timestamp": "cli"}
        await client.create_session()


@pytest.mark.parametrize("argv", [["-m", "llmgine_ws"], ["-m", "uvicorn", "llmgine_ws.main:app"],
                                  # docs/deploy.md's plain-uvicorn command line
                                  ["-m", "uvicorn", "--lifespan", "on", "--no-proxy-headers",
                                   "--ws-max-size", "1048576", "--ws-per-message-deflate", "false",
                                   "--timeout-graceful-shutdown", "2",
                                   "--http", "llmgine_ws.transport:GuardedHttpProtocol", "--ws",
                                   "llmgine_ws.transport:GuardedWebSocketProtocol", "llmgine_ws.main:app"]])
async def test_cli_and_uvicorn_serve_the_default_app(argv: list[str]) -> None:
    sock = listening_socket()  # handed to the server process: no port race, no waiting for startup
    process = await anyio.open_process([sys.executable, *argv, "--fd", str(sock.fileno())],
                                       env={**os.environ, "LLMGINE_API_PING_INTERVAL": "0"},
                                       pass_fds=(sock.fileno(),))
    try:
        with anyio.fail_after(30):
            await _talk_to(sock.getsockname()[1])
    finally:
        process.terminate()
        with anyio.fail_after(15):
            await process.wait()
        sock.close()
    assert process.stderr is not None
    stderr = b"".join([chunk async for chunk in process.stderr])
    await process.aclose()
    assert b"Started server process" in stderr
    assert b"Traceback" not in stderr, stderr.decode()


def test_cli_bad_environment_exits_with_a_clear_message() -> None:
    result = subprocess.run([sys.executable, "-m", "llmgine_ws", "--port", "1"],
                            env={**os.environ, "LLMGINE_API_MAX_SESSIONS": "lots"}, capture_output=True, timeout=30)
    assert result.returncode == 2
    assert b"LLMGINE_API_MAX_SESSIONS" in result.stderr
    assert b"Traceback" not in result.stderr


def test_cli_help() -> None:
    result = subprocess.run([sys.executable, "-m", "llmgine_ws", "--help"], capture_output=True, timeout=30)
    assert result.returncode == 0
    for flag in (b"--host", b"--port", b"--app", b"--factory"):
        assert flag in result.stdout
