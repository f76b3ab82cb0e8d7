"""Test support: a real uvicorn server on an ephemeral port, in the test's own event loop."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import uvicorn

from llmgine_ws import get_runtime
from llmgine_ws.runtime import Runtime


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class LiveServer:
    """A running server: its URLs and (for in-process servers) the app and its runtime."""

    def __init__(self, app: Any, port: int, ws_path: str = "/api/ws", server: uvicorn.Server | None = None) -> None:
        self.app = app
        self.uvicorn = server
        """The uvicorn server (in-process servers only)."""
        self.port = port
        self.http_url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}{ws_path}"

    @property
    def runtime(self) -> Runtime:
        """The runtime of the llmgine_ws app being served."""
        return get_runtime(self.app)

    async def eventually(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` holds, re-checked at every change of the server's state."""
        await self.runtime.watch.wait_for(predicate, timeout)


def listening_socket() -> socket.socket:
    """A socket bound to an ephemeral loopback port and already listening.

    Clients may connect before uvicorn starts accepting: the kernel queues them, so no test ever
    has to wait (or sleep) for the server to come up.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


def small_send_buffer_socket(size: int = 32 * 1024) -> socket.socket:
    """A :func:`listening_socket` whose accepted connections get a small, fixed kernel send buffer."""
    sock = listening_socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    return sock


@asynccontextmanager
async def serve(
    app: Any, *, ws_path: str = "/api/ws", sock: socket.socket | None = None, **uvicorn_options: Any
) -> AsyncIterator[LiveServer]:
    """Serve ``app`` with uvicorn on an ephemeral port for the duration of the block.

    With ``sock`` (a :func:`listening_socket` the caller keeps open), serve on that socket instead:
    a later ``serve`` on the same socket restarts the server on the same port, and clients that
    connect in between wait in the kernel's backlog. Fails the test if uvicorn logs an unhandled
    exception from the app.
    """
    own = sock is None
    listener = listening_socket() if sock is None else sock
    port = listener.getsockname()[1]
    # uvicorn closes the sockets it serves on when it stops: give it a duplicate of a caller's socket.
    sock = listener if own else listener.dup()
    options: dict[str, Any] = {"log_level": "warning", "lifespan": "on", "ws_per_message_deflate": False,
                               "proxy_headers": False}
    options.update(uvicorn_options)
    server = uvicorn.Server(uvicorn.Config(app, **options))
    errors = _Collect()
    uvicorn_logger = logging.getLogger("uvicorn.error")
    uvicorn_logger.addHandler(errors)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            try:
                yield LiveServer(app, port, ws_path, server)
            finally:
                server.should_exit = True
    finally:
        uvicorn_logger.removeHandler(errors)
        sock.close()
        if own:
            listener.close()
    crashes = [r for r in errors.records if "Exception in ASGI application" in r.getMessage()]
    assert not crashes, f"the app raised into uvicorn: {[r.getMessage() for r in crashes]}"


async def wait_cleaned(connection: Any, timeout: float = 5.0) -> None:
    """Wait until the server has finished cleaning up after ``connection``."""
    with anyio.fail_after(timeout):
        await connection.closed.wait()
