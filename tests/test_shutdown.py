"""Graceful shutdown of a real server process on SIGTERM: drain, then close, within a bounded time."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import Process

from llmgine_ws.client import HandshakeRejected, Message, RequestError, connect

from .rawws import OP_PING, OP_TEXT, build_frame, raw_connect
from .support import listening_socket

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def server_process(**env: str) -> AsyncIterator[tuple[Process, int]]:
    """``python -m llmgine_ws`` serving the shutdown test app on a socket we bound."""
    sock = listening_socket()
    environment = {**os.environ, "LLMGINE_API_PING_INTERVAL": "0", **env}
    process = await anyio.open_process(
        [sys.executable, "-m", "llmgine_ws", "--app", "tests.apps.shutdown_app:app", "--fd", str(sock.fileno()),
         "--log-level", "info"],
        env=environment, pass_fds=(sock.fileno(),),
    )
    try:
        yield process, sock.getsockname()[1]
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await process.aclose()
        sock.close()


async def stderr_of(process: Process) -> str:
    assert process.stderr is not None
    return b"".join([chunk async for chunk in process.stderr]).decode(errors="replace")


async def test_sigterm_drains_running_work_then_closes_with_1001() -> None:
    async with server_process(LLMGINE_API_DRAIN_TIMEOUT="20") as (process, port):
        url = f"ws://127.0.0.1:{port}/api/ws"
        # resume=False: a resuming client would try to come back after the 1001 (see docs/resume.md)
        async with connect(url, open_timeout=20, resume=False) as client, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/health/ready")).status_code == 200
            may_finish = anyio.Event()

            @client.on_server_request("finish")
            async def finish(message: Message) -> dict[str, Any]:
                await may_finish.wait()
                return {"value": "yes"}

            await client.send("work", {}, message_id="w1")
            assert (await client.receive(timeout=10)).data["notification_type"] == "working"

            process.send_signal(signal.SIGTERM)
            notice = await client.receive(timeout=10)
            assert notice.data["notification_type"] == "server_shutting_down"
            # While draining: not ready, no new connections, no new work; the running request lives on.
            assert (await http.get("/health/ready")).status_code == 503
            with pytest.raises(HandshakeRejected) as refused:
                async with connect(url):
                    pass
            assert refused.value.status_code == 503
            with pytest.raises(RequestError) as error:
                await client.request("create_session")
            assert error.value.code == "SHUTTING_DOWN"
            assert (await client.request("ping")).type == "ping_res"

            may_finish.set()
            reply = await client.receive(timeout=10)
            assert (reply.type, reply.message_id, reply.data) == ("work_res", "w1", {"done": True, "answer": "yes"})
            assert await client.wait_closed(timeout=10) == 1001
        with anyio.fail_after(20):
            await process.wait()
        log = await stderr_of(process)
    assert "Traceback" not in log, log
    assert "received SIGTERM" in log
    assert log.index("shutting down: draining 1 connection(s)") < log.index("Shutting down")  # before uvicorn's


async def test_shutdown_is_bounded_with_a_hanging_engine_and_a_client_that_stopped_reading() -> None:
    env = {"LLMGINE_API_DRAIN_TIMEOUT": "0.5", "LLMGINE_API_SHUTDOWN_TIMEOUT": "2",
           "LLMGINE_API_ENGINE_STOP_TIMEOUT": "0.5", "LLMGINE_API_SEND_GRACE": "0.5"}
    async with server_process(**env) as (process, port):
        url = f"ws://127.0.0.1:{port}/api/ws"
        async with connect(url, open_timeout=20, resume=False) as engine_user:  # ends with the 1001
            session_id = await engine_user.create_session()
            await engine_user.request("create_engine", {"session_id": session_id, "engine_type": "hang"})
            await engine_user.send("engine_command", {"session_id": session_id, "command": {}})
            assert (await engine_user.receive(timeout=10)).type == "engine_event"
            # A client that connects and then never reads again (its TCP window fills).
            stalled = await anyio.connect_tcp("127.0.0.1", port)
            await stalled.send(b"GET /api/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(20):
                code = await engine_user.wait_closed()
                await process.wait()
            elapsed = time.monotonic() - started
            await stalled.aclose()
        log = await stderr_of(process)
    assert code == 1001
    assert elapsed < 10, f"shutdown took {elapsed:.1f}s"
    assert "did not stop within 0.5s; abandoned" in log
    assert "Traceback" not in log, log


async def test_the_documented_shutdown_bound_holds_with_a_flooding_client_that_does_not_read() -> None:
    """SIGTERM to exit within DRAIN_TIMEOUT + SHUTDOWN_TIMEOUT + 3 s (docs/deploy.md) while a client floods
    pings and PING frames and reads nothing: uvicorn's own graceful timeout no longer stacks on top,
    and the unread socket cannot pin the exit."""
    drain, close = 1.0, 3.0
    env = {"LLMGINE_API_DRAIN_TIMEOUT": str(drain), "LLMGINE_API_SHUTDOWN_TIMEOUT": str(close),
           "LLMGINE_API_SEND_GRACE": "30", "LLMGINE_API_RATE_LIMIT": "0"}
    async with server_process(**env) as (process, port), raw_connect(f"ws://127.0.0.1:{port}/api/ws") as raw:
        flood = build_frame(OP_TEXT, b'{"type":"ping","message_id":"p","data":{"timestamp":"' + b"x" * 4000 + b'"}}')
        storm = build_frame(OP_PING, b"p" * 125) * 64

        async def attack() -> None:
            try:
                while True:
                    await raw.stream.send(flood + storm)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(attack)
            async with connect(f"ws://127.0.0.1:{port}/api/ws", open_timeout=20) as probe:
                await probe.request("ping")  # the server is up and serving while the flood runs
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                await process.wait()
            elapsed = time.monotonic() - started
            tg.cancel_scope.cancel()
        log = await stderr_of(process)
    assert elapsed < drain + close + 3 + 1.5, f"shutdown took {elapsed:.1f}s"  # 1.5 s: process exit on a busy host
    assert "Traceback" not in log, log
