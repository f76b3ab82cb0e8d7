"""Transport bounds (issue 10, item 4): what a client holds below the WebSocket protocol — PING storms,
closes a non-reading client would pin, unfinished or oversized request headers, permessage-deflate —
stays bounded under the server the CLI runs (:func:`llmgine_ws.transport.uvicorn_options`)."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from llmgine_ws import APIConfig
from llmgine_ws.auth import mint_token
from llmgine_ws.client import HandshakeRejected, connect
from llmgine_ws.transport import GuardedWebSocketProtocol, TransportLimits, uvicorn_options

from .rawws import OP_PING, OP_TEXT, build_frame, raw_connect
from .support import LiveServer, listening_socket, serve, small_send_buffer_socket

pytestmark = pytest.mark.anyio

HIGH_WATER = 64 * 1024  # asyncio's default write-buffer high-water mark
READ_CHUNK = 256 * 1024  # the most asyncio reads (and so answers) in one go


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for transport state no app event announces (polled; bounded by ``timeout``)."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - nothing to wait on: transport state has no event
            await anyio.sleep(0.01)


@asynccontextmanager
async def guarded(make_app: Any, limits: TransportLimits | None = None, sock: Any = None,
                  **config: Any) -> AsyncIterator[LiveServer]:
    app_config = APIConfig(**config)
    options = uvicorn_options(app_config, limits)
    async with serve(make_app(**config), sock=sock, **options) as server:
        yield server


def ws_protocols(server: LiveServer) -> list[GuardedWebSocketProtocol]:
    assert server.uvicorn is not None
    return [c for c in server.uvicorn.server_state.connections if isinstance(c, GuardedWebSocketProtocol)]


async def handshake_response(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        received = b""
        with anyio.fail_after(timeout):
            while b"\r\n\r\n" not in received:
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
        return received


def upgrade_request(port: int, extra: bytes = b"") -> bytes:
    return (b"GET /api/ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" % port) + extra + b"\r\n"


# ------------------------------------------------------------------------------------ PING storms


async def test_a_ping_storm_from_a_client_that_does_not_read_is_paced_by_its_reading(make_app: Any) -> None:
    """PING frames as fast as the socket takes them, nothing read: the server stops reading while its
    PONGs wait, so its write buffer stays near the high-water mark instead of growing with the storm;
    a neighbour's round trips go on."""
    payload = b"p" * 125
    frames = build_frame(OP_PING, payload) * 512  # ~66 KB per write
    async with guarded(make_app, sock=small_send_buffer_socket()) as server, raw_connect(server.ws_url) as raw:
        [protocol] = ws_protocols(server)
        sent = 0
        peak = 0

        async def storm() -> None:
            nonlocal sent
            while sent < 64 * 1024 * 1024:
                await raw.stream.send(frames)
                sent += len(frames)

        async with anyio.create_task_group() as tg:
            tg.start_soon(storm)
            await until(lambda: protocol._held_for_writes)
            async with connect(server.ws_url) as neighbour:
                for n in range(20):
                    peak = max(peak, protocol.transport.get_write_buffer_size())
                    started = time.monotonic()
                    await neighbour.request("ping", {"timestamp": n})
                    assert time.monotonic() - started < 2.0
            peak = max(peak, protocol.transport.get_write_buffer_size())
            assert protocol._held_for_writes
            tg.cancel_scope.cancel()
    assert peak <= HIGH_WATER + READ_CHUNK
    assert sent < 16 * 1024 * 1024  # the client could not push the storm: the server stopped reading


async def test_a_closed_connection_whose_client_does_not_read_is_aborted(make_app: Any) -> None:
    """The app closes a connection whose client never reads (its close frame cannot even be written):
    the transport is aborted within the close timeout instead of pinned by the unread buffer."""
    limits = TransportLimits(close_timeout=0.5)
    frames = build_frame(OP_PING, b"p" * 125) * 512
    async with guarded(make_app, limits, sock=small_send_buffer_socket()) as server, \
            raw_connect(server.ws_url) as raw:
        [protocol] = ws_protocols(server)
        [connection] = list(server.runtime.hub)

        async def storm() -> None:
            try:
                while True:
                    await raw.stream.send(frames)
            except (anyio.BrokenResourceError, OSError):
                pass  # aborted

        async with anyio.create_task_group() as tg:
            tg.start_soon(storm)
            await until(lambda: protocol._held_for_writes)
            connection.force_close(1008, "test")
            await until(lambda: protocol.disconnected, timeout=10)
            tg.cancel_scope.cancel()
        assert server.uvicorn is not None and not ws_protocols(server)


# ------------------------------------------------------------------------------------ handshakes


async def test_unfinished_request_headers_time_out_and_are_capped_per_address(make_app: Any) -> None:
    """Slowloris: connections that never finish their headers are closed with 408 after the handshake
    timeout, and one address holds at most max_connections_per_ip of them (429 past it)."""
    async with guarded(make_app, max_connections_per_ip=5, handshake_timeout=1.0) as server:
        streams: list[anyio.abc.SocketStream] = []
        try:
            for _ in range(5):
                stream = await anyio.connect_tcp("127.0.0.1", server.port)
                await stream.send(b"GET /api/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                streams.append(stream)
            refused = await handshake_response(server.port, upgrade_request(server.port))
            assert refused.startswith(b"HTTP/1.1 429")
            started = time.monotonic()
            for stream in streams:
                with anyio.fail_after(5):
                    assert (await stream.receive()).startswith(b"HTTP/1.1 408")
            assert time.monotonic() - started < 4
        finally:
            for stream in streams:
                await stream.aclose()
        async with connect(server.ws_url) as client:  # the slots are back
            await client.request("ping", {"timestamp": 0})


async def test_oversized_request_headers_are_answered_431(make_app: Any) -> None:
    async with guarded(make_app, max_header_bytes=8192) as server:
        response = await handshake_response(server.port, b"GET /api/ws HTTP/1.1\r\nX-Big: " + b"a" * 20_000)
        assert response.startswith(b"HTTP/1.1 431")
        response = await handshake_response(server.port, upgrade_request(server.port, b"X-Ok: " + b"a" * 4000
                                                                          + b"\r\n"))
        assert response.startswith(b"HTTP/1.1 101")


@pytest.mark.parametrize("enabled", [False, True])
async def test_permessage_deflate_is_negotiated_only_when_enabled(make_app: Any, enabled: bool) -> None:
    async with guarded(make_app, ws_per_message_deflate=enabled) as server:
        response = await handshake_response(server.port, upgrade_request(
            server.port, b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"))
    assert response.startswith(b"HTTP/1.1 101")
    assert (b"permessage-deflate" in response.lower()) is enabled


# ------------------------------------------------------------------------------------ logs


async def test_refused_handshakes_and_invalid_utf8_log_no_error(make_app: Any,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A refused handshake is not an ERROR ("returned without completing handshake"); invalid UTF-8
    closes 1007 without a traceback."""
    caplog.set_level(logging.INFO)
    async with guarded(make_app) as server:
        response = await handshake_response(server.port, upgrade_request(server.port, b"Origin: http://evil.test\r\n"))
        assert response.startswith(b"HTTP/1.1 403")
        async with raw_connect(server.ws_url) as raw:
            await raw.send_frame(OP_TEXT, b'{"type": "ping", "data": "\xff\xfe"}')
            await raw.messages_until_close()
            assert raw.close_code == 1007
        await server.eventually(lambda: len(server.runtime.hub) == 0)
    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]


async def test_the_cli_logs_no_query_token_and_no_error_for_refusals() -> None:
    """Under the CLI's log configuration a query token never reaches a log line (uvicorn prints URLs),
    and refused handshakes or invalid UTF-8 log no ERROR and no traceback."""
    secret = "cli-secret"
    token = mint_token(secret, "alice")
    sock = listening_socket()
    port = sock.getsockname()[1]
    env = {**os.environ, "LLMGINE_API_PING_INTERVAL": "0", "LLMGINE_API_TOKEN_SECRET": secret,
           "LLMGINE_API_ALLOW_QUERY_TOKEN": "true", "LLMGINE_API_LOG_LEVEL": "info"}
    process = await anyio.open_process([sys.executable, "-m", "llmgine_ws", "--fd", str(sock.fileno())], env=env,
                                       pass_fds=(sock.fileno(),))
    try:
        with anyio.fail_after(30):
            async with connect(f"ws://127.0.0.1:{port}/api/ws?token={token}", open_timeout=20) as client:
                await client.request("ping", {"timestamp": 0})
            with pytest.raises(HandshakeRejected):
                async with connect(f"ws://127.0.0.1:{port}/api/ws?token={token}x"):
                    pass
            async with httpx.AsyncClient() as http:
                assert (await http.get(f"http://127.0.0.1:{port}/health/live?token={token}")).status_code == 200
            async with raw_connect(f"ws://127.0.0.1:{port}/api/ws?token={token}") as raw:
                await raw.send_frame(OP_TEXT, b'"\xff"')
                await raw.messages_until_close()
    finally:
        process.terminate()
        with anyio.fail_after(15):
            await process.wait()
        sock.close()
    assert process.stdout is not None and process.stderr is not None
    output = b"".join([chunk async for chunk in process.stdout]) + b"".join([chunk async for chunk in process.stderr])
    await process.aclose()
    text = output.decode()
    assert "token=<redacted>" in text
    assert token.split(".")[-1] not in text
    assert " ERROR " not in text and "Traceback" not in text, text


async def test_a_client_that_floods_past_the_close_frame_is_cut_off(make_app: Any) -> None:
    """After the server's close frame, more than a frame's worth of data instead of the close reply ends
    the connection (each byte read now would be parsed only to be discarded)."""
    limits = TransportLimits(close_timeout=60)  # only the flood can end it in time
    batch = build_frame(OP_TEXT, b'{"type":"ping","message_id":"p","data":{}}') * 2000
    async with guarded(make_app, limits) as server, raw_connect(server.ws_url) as raw:
        [protocol] = ws_protocols(server)
        [connection] = list(server.runtime.hub)
        connection.force_close(1008, "test")
        await until(lambda: protocol.close_sent)
        sent = 0
        with anyio.fail_after(10):
            try:
                while True:
                    await raw.stream.send(batch)
                    sent += len(batch)
            except (anyio.BrokenResourceError, OSError):
                pass
        assert protocol.disconnected
        assert sent < 64 * 1024 * 1024
