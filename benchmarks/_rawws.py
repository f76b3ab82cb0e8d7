"""A minimal WebSocket client on a bare ``asyncio.Protocol``, for benchmarks that hold thousands of
connections in one process (fan-out, memory).

A full client (``websockets``, or ``llmgine_ws.client``) costs tasks, queues and buffers per
connection; with 3,000 of them in one load-generator process that cost would dominate what is
measured. Here a connection is one protocol object: frames are parsed in ``data_received`` and each
text message is handed to a callback (or an in-memory list). Text frames only, no fragmentation,
no extensions (both servers run with per-message deflate off), which is all the benchmarks need.
Frames are made by ``tests/rawws.py``'s ``build_frame``, the repository's one hand-made frame builder.
A connection can also *stall*: stop reading (``pause_reading``) with a small receive buffer, so the
server's outbound side fills up exactly as it would for a client that stops reading.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from collections.abc import Callable
from typing import Any

import msgspec

from tests.rawws import OP_CLOSE, OP_TEXT, build_frame, close_payload

_decode = msgspec.json.decode
_encode = msgspec.json.encode


def text_frame(payload: bytes) -> bytes:
    """One masked, final text frame."""
    return build_frame(OP_TEXT, payload)


class RawWS(asyncio.Protocol):
    """One client connection. ``on_message(ws, message)`` gets every decoded JSON text message."""

    def __init__(self, on_message: Callable[[RawWS, Any], None] | None = None) -> None:
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self.handshake_done = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.inbox: list[Any] = []
        self.waiter: asyncio.Future[None] | None = None
        self.app_id: str | None = None
        self._buffer = bytearray()
        self._upgraded = False

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake_done.done():
            self.handshake_done.set_exception(ConnectionError(f"closed during the handshake: {exc!r}"))
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if not self._upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buffer[: buffer.find(b"\r\n")])
            del buffer[: end + 4]
            if b" 101 " not in status:
                self.handshake_done.set_exception(ConnectionError(f"handshake refused: {status!r}"))
                return
            self._upgraded = True
            self.handshake_done.set_result(None)
        while len(buffer) >= 2:
            opcode, length, offset = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length, offset = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length, offset = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < offset + length:
                return
            payload = bytes(buffer[offset: offset + length])
            del buffer[: offset + length]
            if opcode == 0x1:
                message = _decode(payload)
                if self.on_message is not None:
                    self.on_message(self, message)
                else:
                    self.inbox.append(message)
                    self._wake()
            elif opcode == 0x8 and self.transport is not None:
                self.transport.close()

    # -- API ---------------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def send(self, message: Any) -> None:
        assert self.transport is not None
        self.transport.write(text_frame(_encode(message)))

    async def receive(self) -> Any:
        """The next message (when no ``on_message`` callback is set)."""
        while not self.inbox:
            if self.closed.done():
                raise ConnectionError("connection closed")
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.inbox.pop(0)

    async def receive_type(self, message_type: str) -> Any:
        while True:
            message = await self.receive()
            if message.get("type") == message_type:
                return message

    async def request(self, message_type: str, data: Any, message_id: str) -> Any:
        """Send a request and wait for the reply with the same message_id (other messages are dropped)."""
        self.send({"type": message_type, "message_id": message_id, "data": data})
        while True:
            message = await self.receive()
            if message.get("message_id") == message_id and not message.get("server_initiated"):
                if message.get("type") == "error":
                    raise RuntimeError(f"{message_type} failed: {message['data']}")
                return message

    def stall(self) -> None:
        """Stop reading: the kernel buffers fill, then the server's."""
        assert self.transport is not None
        self.transport.pause_reading()

    def abort(self) -> None:
        """Vanish without a close frame."""
        if self.transport is not None:
            self.transport.abort()

    async def close(self, timeout: float = 5.0) -> None:
        """Send a close frame and wait (bounded) for the server to close the TCP connection."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(build_frame(OP_CLOSE, close_payload(1000)))
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            self.abort()


async def open_ws(
    host: str, port: int, path: str, *, on_message: Callable[[RawWS, Any], None] | None = None,
    rcvbuf: int | None = None, greeting: bool = True,
) -> RawWS:
    """Connect, upgrade, and (by default) read the server's ``connected`` greeting into ``app_id``."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    protocol = RawWS(None)
    _, _ = await loop.create_connection(lambda: protocol, sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    assert protocol.transport is not None
    protocol.transport.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await protocol.handshake_done
    if greeting:
        message = await protocol.receive_type("connected")
        protocol.app_id = message["data"]["app_id"]
    protocol.on_message = on_message
    return protocol


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-file limit toward ``wanted`` (children inherit it); returns the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (Linux ``/proc``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")
