"""llmgine_ws's log lines under plain uvicorn and under a host's own logging configuration (issue 13)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from llmgine_ws.client import connect

from .support import listening_socket

pytestmark = pytest.mark.anyio

APP = textwrap.dedent("""
    from llmgine_ws import APIConfig, create_app
    app = create_app(APIConfig(ping_interval=0))
""")


async def _serve_and_connect(tmp_path: Path, module: str, *argv: str) -> str:
    sock = listening_socket()
    process = await anyio.open_process(
        [sys.executable, "-m", "uvicorn", f"{module}:app", "--fd", str(sock.fileno()), *argv],
        cwd=tmp_path, pass_fds=(sock.fileno(),))
    try:
        with anyio.fail_after(30):
            async with connect(f"ws://127.0.0.1:{sock.getsockname()[1]}/api/ws", open_timeout=20) as client:
                await client.create_session()
    finally:
        process.terminate()
        with anyio.fail_after(15):
            await process.wait()
        sock.close()
    assert process.stderr is not None
    stderr = b"".join([chunk async for chunk in process.stderr]).decode()
    await process.aclose()
    return stderr


async def test_plain_uvicorn_shows_info_lines_and_warnings_with_level_and_logger(tmp_path: Path) -> None:
    (tmp_path / "plainapp.py").write_text(APP)
    stderr = await _serve_and_connect(tmp_path, "plainapp")
    assert " INFO llmgine_ws.runtime: llmgine_ws WebSocket endpoint at /api/ws" in stderr, stderr
    assert " WARNING llmgine_ws.runtime: no authenticator configured" in stderr, stderr
    assert " INFO llmgine_ws.gate: app " in stderr and " connected from 127.0.0.1" in stderr, stderr
    assert "Traceback" not in stderr, stderr


async def test_plain_uvicorn_json_lines_follow_the_config(tmp_path: Path) -> None:
    (tmp_path / "jsonapp.py").write_text(APP.replace("APIConfig(ping_interval=0)",
                                                     "APIConfig(ping_interval=0, log_format='json')"))
    stderr = await _serve_and_connect(tmp_path, "jsonapp")
    assert '"level":"INFO","logger":"llmgine_ws.runtime","message":"llmgine_ws WebSocket endpoint at /api/ws"' \
        in stderr, stderr


async def test_a_hosts_own_logging_configuration_gets_the_records(tmp_path: Path) -> None:
    (tmp_path / "hostapp.py").write_text(textwrap.dedent("""
        import logging
        logging.basicConfig(level=logging.INFO, format="HOST %(levelname)s [%(name)s] %(message)s")
    """) + APP)
    stderr = await _serve_and_connect(tmp_path, "hostapp")
    assert "HOST INFO [llmgine_ws.runtime] llmgine_ws WebSocket endpoint at /api/ws" in stderr, stderr
    assert "HOST WARNING [llmgine_ws.runtime] no authenticator configured" in stderr, stderr
    # Nothing of ours on top: each record once, in the host's format.
    assert stderr.count("llmgine_ws WebSocket endpoint at /api/ws") == 1, stderr
