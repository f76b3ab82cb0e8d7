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

    def __init__(self, app: Any, port: int, ws_path: str = "/api/ws") -> None:
        self.app = app
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
                yield LiveServer(app, port, ws_path)
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


class RawWebSocket:
    """A bare-bones WebSocket client over one TCP stream, for tests that need to *stop reading*.

    Our real client always reads; this one reads only when asked, so the server's outbound queue
    for it fills up like a stalled browser tab's would (serve on :func:`small_send_buffer_socket` so
    the kernel does not absorb megabytes first).
    """

    def __init__(self, stream: anyio.abc.SocketStream, ws: Any) -> None:
        self.stream = stream
        self.ws = ws

    @classmethod
    async def open(cls, port: int, path: str = "/api/ws") -> RawWebSocket:
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, Request

        stream = await anyio.connect_tcp("127.0.0.1", port)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send(ws.send(Request(host="127.0.0.1", target=path)))
        with anyio.fail_after(10):
            while True:
                ws.receive_data(await stream.receive())
                if any(isinstance(event, AcceptConnection) for event in ws.events()):
                    return cls(stream, ws)

    async def send_text(self, text: str) -> None:
        from wsproto.events import Message as WSMessage
        from wsproto.events import TextMessage

        event: WSMessage[Any] = TextMessage(data=text)
        await self.stream.send(self.ws.send(event))

    async def read_until_closed(self, timeout: float = 10.0) -> tuple[list[str], int | None]:
        """Read everything left (text messages) until the server's close frame or EOF."""
        from wsproto.events import CloseConnection, TextMessage

        texts: list[str] = []
        partial: list[str] = []
        with anyio.fail_after(timeout):
            while True:
                try:
                    data = await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    return texts, None
                self.ws.receive_data(data)
                for event in self.ws.events():
                    if isinstance(event, TextMessage):
                        partial.append(event.data)
                        if event.message_finished:
                            texts.append("".join(partial))
                            partial.clear()
                    elif isinstance(event, CloseConnection):
                        return texts, event.code

    async def aclose(self) -> None:
        await self.stream.aclose()
