"""Mounting llmgine_ws in a host app: the CLIs import from the current directory, ``mount`` / ``lifespan``
helpers, the mounted path in logs and 404s, host state and principal in handlers and engines (issue 13)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi import FastAPI, WebSocket
from starlette.applications import Starlette
from starlette.routing import Mount

import llmgine_ws
from llmgine_ws import APIConfig, EngineContext, Extensions, HandlerContext, Session, create_app
from llmgine_ws.auth import APIKeyAuthenticator
from llmgine_ws.client import HandshakeRejected, connect

from .rawws import raw_connect
from .support import listening_socket, serve

pytestmark = pytest.mark.anyio

MYAPP = textwrap.dedent("""
    from llmgine_ws import APIConfig, Extensions, create_app

    async def hello(data, ctx):
        return {"hello": data["name"]}

    extensions = Extensions()
    extensions.register_handler("hello", dict, hello)
    app = create_app(APIConfig(ping_interval=0), extensions)
""")


async def _run_cli(argv: list[str], cwd: Path, url_path: str = "/api/ws") -> bytes:
    sock = listening_socket()
    process = await anyio.open_process([sys.executable, "-m", "llmgine_ws", *argv, "--fd", str(sock.fileno())],
                                       cwd=cwd, pass_fds=(sock.fileno(),))
    try:
        with anyio.fail_after(30):
            async with connect(f"ws://127.0.0.1:{sock.getsockname()[1]}{url_path}", open_timeout=20) as client:
                assert (await client.request("hello", {"name": "cwd"})).data == {"hello": "cwd"}
    finally:
        process.terminate()
        with anyio.fail_after(15):
            await process.wait()
        sock.close()
    assert process.stderr is not None
    stderr = b"".join([chunk async for chunk in process.stderr])
    await process.aclose()
    return stderr


async def test_the_cli_imports_the_app_from_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "myapp.py").write_text(MYAPP)
    stderr = await _run_cli(["--app", "myapp:app"], cwd=tmp_path)
    assert b"Traceback" not in stderr, stderr.decode()


async def test_the_cli_imports_the_app_from_app_dir(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "myapp.py").write_text(MYAPP)
    await _run_cli(["--app", "myapp:app", "--app-dir", "src"], cwd=tmp_path)


def test_the_schema_cli_imports_the_app_from_the_current_directory_or_app_dir(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "myapp.py").write_text(MYAPP)
    for cwd, extra in ((tmp_path / "src", []), (tmp_path, ["--app-dir", "src"])):
        result = subprocess.run([sys.executable, "-m", "llmgine_ws.schemagen", "--app", "myapp:app", *extra],
                                cwd=cwd, capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr.decode()
        assert "hello" in json.dumps(json.loads(result.stdout)["x-llmgine"])


def test_the_schema_cli_describes_an_app_mounted_in_a_host(tmp_path: Path) -> None:
    (tmp_path / "host.py").write_text(MYAPP + textwrap.dedent("""
        import llmgine_ws
        from fastapi import FastAPI
        host = FastAPI()
        llmgine_ws.mount(host, "/ws", app)
    """))
    result = subprocess.run([sys.executable, "-m", "llmgine_ws.schemagen", "--app", "host:host"], cwd=tmp_path,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert "hello" in json.dumps(json.loads(result.stdout)["x-llmgine"])
    other = subprocess.run([sys.executable, "-m", "llmgine_ws.schemagen", "--app", "fastapi:FastAPI", "--factory"],
                           cwd=tmp_path, capture_output=True, timeout=60)
    assert other.returncode != 0
    assert b"is not an llmgine_ws app and has none mounted in it" in other.stderr


def test_an_app_that_cannot_be_imported_is_a_clean_cli_error(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "llmgine_ws", "--app", "nowhere:app"], cwd=tmp_path,
                            capture_output=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.decode().startswith("llmgine-ws: "), result.stderr.decode()
    assert b"Traceback" not in result.stderr


def test_the_cli_refuses_to_start_a_host_that_forgot_the_lifespan(tmp_path: Path) -> None:
    (tmp_path / "host.py").write_text(MYAPP + textwrap.dedent("""
        from fastapi import FastAPI
        host = FastAPI()
        host.mount("/ws", app)          # llmgine_ws's lifespan forgotten
    """))
    sock = listening_socket()
    result = subprocess.run([sys.executable, "-m", "llmgine_ws", "--app", "host:host", "--fd", str(sock.fileno())],
                            cwd=tmp_path, capture_output=True, timeout=60, pass_fds=(sock.fileno(),))
    sock.close()
    stderr = result.stderr.decode()
    assert result.returncode != 0, stderr
    assert "the llmgine_ws app mounted at /ws did not start with the host app's lifespan" in stderr
    assert "llmgine_ws.mount(host, path, app)" in stderr


# ----------------------------------------------------------------------------- mount() and lifespan()

class Counter:
    """Stands in for a database pool the host keeps on app.state."""

    def __init__(self) -> None:
        self.open = False
        self.queries = 0

    def query(self) -> int:
        assert self.open, "the pool is closed"
        self.queries += 1
        return self.queries


class PoolEngine:
    def __init__(self, session: Session, config: dict[str, Any]) -> None:
        self.session = session

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        return {"query": ctx.state.pool.query(), "host_is_fastapi": isinstance(ctx.host_app, FastAPI),
                "user": ctx.principal.user_id, "session_user": self.session.principal.user_id}


async def whoami(data: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
    return {"query": ctx.state.pool.query(), "user": ctx.principal.user_id, "host": ctx.host_app.title}


def _extensions() -> Extensions:
    extensions = Extensions()
    extensions.register_handler("whoami", dict[str, Any], whoami)
    extensions.register_engine("pool", PoolEngine)
    return extensions


async def test_mount_runs_both_lifespans_in_order_and_shares_the_host_state(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "llmgine_ws")
    events: list[str] = []

    @asynccontextmanager
    async def host_lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = Counter()
        app.state.pool.open = True
        events.append("host up")
        yield
        events.append(f"host down, llmgine_ws {runtime.lifecycle.state.value}")
        app.state.pool.open = False

    host = FastAPI(title="Host", lifespan=host_lifespan)
    llm = llmgine_ws.mount(host, "/ws", config=APIConfig(ping_interval=0), extensions=_extensions(),
                           authenticator=APIKeyAuthenticator({"alice": "k1"}))
    runtime = llmgine_ws.get_runtime(llm)
    assert runtime.ws_url_path == "/ws/api/ws"
    async with serve(host, ws_path="/ws/api/ws") as server, \
            connect(server.ws_url, headers={"Authorization": "Bearer k1"}) as client:
        reply = await client.request("whoami", {})
        assert reply.data == {"query": 1, "user": "api-key:alice", "host": "Host"}
        session_id = await client.create_session()
        assert runtime.sessions.get(session_id).principal.user_id == "api-key:alice"  # type: ignore[union-attr]
        await client.create_engine(session_id, "pool")
        result = (await client.command(session_id, {}).wait()).result
        assert result == {"query": 2, "host_is_fastapi": True, "user": "api-key:alice",
                          "session_user": "api-key:alice"}
    # The host's lifespan goes around llmgine_ws's: its pool outlives llmgine_ws's drain.
    assert events == ["host up", "host down, llmgine_ws stopped"]
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("llmgine_ws")]
    assert "llmgine_ws WebSocket endpoint at /ws/api/ws" in messages


async def test_the_lifespan_helper_for_fastapi_lifespan_argument() -> None:
    @asynccontextmanager
    async def host_lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        app.state.pool = Counter()
        app.state.pool.open = True
        yield {"from_host": True}

    llm = create_app(APIConfig(ping_interval=0), _extensions(), authenticator=APIKeyAuthenticator({"bob": "k2"}))
    host = FastAPI(title="Lifespan", lifespan=llmgine_ws.lifespan(llm, host_lifespan))
    host.mount("/realtime", llm)

    @host.get("/state")
    async def state(request: Any) -> dict[str, Any]:
        return {"from_host": request.state.from_host}

    async with serve(host, ws_path="/realtime/api/ws") as server, \
            connect(server.ws_url, headers={"Authorization": "Bearer k2"}) as client:
        assert (await client.request("whoami", {})).data == {"query": 1, "user": "api-key:bob", "host": "Lifespan"}
        assert llmgine_ws.get_runtime(llm).ws_url_path == "/realtime/api/ws"


async def test_a_starlette_host_given_the_apps_lifespan_knows_the_mount_path(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "llmgine_ws")
    llm = create_app(APIConfig(ping_interval=0))
    host = Starlette(routes=[Mount("/llm", app=llm)], lifespan=llm.router.lifespan_context)
    async with serve(host, ws_path="/llm/api/ws") as server, connect(server.ws_url):
        pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("any client that can reach /llm/api/ws may connect" in w for w in warnings), warnings


@pytest.mark.parametrize("wrong", ["/ws/api/wss", "/ws/", "/ws/api", "/api/ws", "/ws"])
async def test_a_wrong_path_under_the_mount_is_a_404_naming_the_real_one(wrong: str) -> None:
    host = FastAPI()
    llmgine_ws.mount(host, "/ws", config=APIConfig(ping_interval=0))

    @host.websocket("/echo")  # added after mount(): the host's own WebSocket routes are not shadowed
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"echo": True})
        await websocket.close()

    async with serve(host, ws_path="/ws/api/ws") as server:
        with pytest.raises(HandshakeRejected) as refused:
            async with connect(f"ws://127.0.0.1:{server.port}{wrong}"):
                raise AssertionError("must not connect")
        assert refused.value.status_code == 404
        body = json.loads(refused.value.body)
        assert body == {"error": "NOT_FOUND", "message": f"no WebSocket endpoint at {wrong}: llmgine_ws serves "
                                                          "/ws/api/ws"}
        async with connect(server.ws_url) as client:  # the right one still works
            await client.create_session()
        async with raw_connect(f"ws://127.0.0.1:{server.port}/echo") as echo:
            assert await echo.receive_json() == {"echo": True}


async def test_a_wrong_path_on_the_plain_app_is_a_404(make_app: Any) -> None:
    async with serve(make_app()) as server:
        with pytest.raises(HandshakeRejected) as refused:
            async with connect(f"ws://127.0.0.1:{server.port}/ws"):
                raise AssertionError("must not connect")
        assert refused.value.status_code == 404
        assert "llmgine_ws serves /api/ws" in refused.value.body.decode()


async def test_a_forgotten_lifespan_is_an_error_naming_the_fix(caplog: pytest.LogCaptureFixture) -> None:
    llm = create_app(APIConfig(ping_interval=0))
    host = FastAPI()
    host.mount("/ws", llm)
    assert [problem.split(":")[0] for problem in llmgine_ws.app.lifespan_problems(host)] == [
        "the llmgine_ws app mounted at /ws did not start with the host app's lifespan"]
    async with serve(host, ws_path="/ws/api/ws") as server, connect(server.ws_url):
        pass
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == "llmgine_ws.gate"]
    assert len(errors) == 1
    assert "lifespan is not running (WebSocket at /ws/api/ws)" in errors[0]
    assert "llmgine_ws.mount(host, path, app)" in errors[0]


def test_mount_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="must start with '/'"):
        llmgine_ws.mount(FastAPI(), "ws")
    with pytest.raises(ValueError, match="not end with one"):
        llmgine_ws.mount(FastAPI(), "/ws/")
    with pytest.raises(TypeError, match="not a Starlette or FastAPI app"):
        llmgine_ws.mount(object(), "/ws")


async def test_running_the_lifespan_twice_says_how_to_fix_it() -> None:
    llm = create_app(APIConfig(ping_interval=0))
    with pytest.raises(ValueError, match="already runs this app's lifespan"):
        llmgine_ws.mount(FastAPI(lifespan=llm.router.lifespan_context), "/ws", llm)
    runtime = llmgine_ws.get_runtime(llm)
    async with runtime.lifespan():
        with pytest.raises(RuntimeError, match="not both"):
            async with runtime.lifespan():
                pass
