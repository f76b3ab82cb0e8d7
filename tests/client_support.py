"""Serving an app to the Python client under either anyio backend.

uvicorn runs on asyncio only: under asyncio the server shares the test's loop (``support.serve``);
under trio it runs in a thread with an asyncio loop of its own, and the test talks to it only
through sockets (and through handlers it registered in the app).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
import sniffio
import uvicorn

from .support import LiveServer, listening_socket, serve


class _ThreadServer(uvicorn.Server):
    """uvicorn reporting the end of its startup (no polling)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.up = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.up.set()


@asynccontextmanager
async def serve_in_thread(app: Any) -> AsyncIterator[LiveServer]:
    """Serve ``app`` with uvicorn in a thread of its own (its own asyncio loop) on an ephemeral port."""
    sock = listening_socket()
    port = sock.getsockname()[1]
    server = _ThreadServer(uvicorn.Config(app, log_level="warning", lifespan="on", ws_per_message_deflate=False,
                                          proxy_headers=False, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert await anyio.to_thread.run_sync(server.up.wait, 10), "uvicorn did not start"
        yield LiveServer(app, port)
    finally:
        server.should_exit = True
        await anyio.to_thread.run_sync(thread.join, 10)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


@asynccontextmanager
async def serve_any(app: Any) -> AsyncIterator[LiveServer]:
    """Serve ``app`` in this loop under asyncio, in a thread under trio."""
    if sniffio.current_async_library() == "trio":
        async with serve_in_thread(app) as live:
            yield live
    else:
        async with serve(app) as live:
            yield live
