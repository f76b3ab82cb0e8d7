"""Raw WebSocket for protocol tests and benchmarks: the one hand-made frame builder, a client below
the protocol's rules, and raw sends on a real :class:`~llmgine_ws.client.Client`.

``build_frame`` is the only place in the repository that serialises WebSocket frames by hand (the
client, the server and the rest of the tests use wsproto or uvicorn): it exists to put on the wire
what a correct implementation refuses to (invalid UTF-8, reserved bits, data after a close) and, in
``benchmarks/_rawws.py``, to frame thousands of connections with no per-connection state.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
import msgspec
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, RejectConnection, Request, TextMessage

from llmgine_ws.client import Client

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9


def build_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    """One masked client frame, exactly as given (no validation of opcode, payload or flags)."""
    length = len(payload)
    header = bytearray(((0x80 if fin else 0) | (rsv & 0x7) << 4 | opcode,))
    if length < 126:
        header.append(0x80 | length)
    elif length < 1 << 16:
        header += bytes((0x80 | 126,)) + length.to_bytes(2, "big")
    else:
        header += bytes((0x80 | 127,)) + length.to_bytes(8, "big")
    key = os.urandom(4)
    if not length:
        return bytes(header) + key
    mask = (key * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(length, "big")
    return bytes(header) + key + masked


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode()


async def send_raw(client: Client, payload: str | bytes) -> None:
    """Send one unvalidated frame on a client's connection: ``str`` as text, ``bytes`` as binary."""
    if isinstance(payload, str):
        await send_raw_frame(client, OP_TEXT, payload.encode())
    else:
        await send_raw_frame(client, OP_BINARY, bytes(payload))


async def send_raw_text_bytes(client: Client, payload: bytes) -> None:
    """Send a text frame whose payload is ``payload`` verbatim, even if it is not valid UTF-8."""
    await send_raw_frame(client, OP_TEXT, payload)


async def send_raw_frame(client: Client, opcode: int, payload: bytes) -> None:
    """Write one hand-made frame through the client's transport, in order with its other writes.

    Raises:
        ConnectionClosed: the connection is closed.
    """
    await client.transport.write(build_frame(opcode, payload))


class RawClient:
    """A WebSocket client below the protocol's rules: it writes frames verbatim (data after a close
    frame, invalid UTF-8, reserved bits...), parses what the server sends with wsproto, and reads
    only when asked, so the server's outbound queue for it fills up like a stalled tab's would
    (serve on ``small_send_buffer_socket`` so the kernel does not absorb megabytes first)."""

    def __init__(self, stream: anyio.abc.ByteStream, ws: WSConnection) -> None:
        self.stream = stream
        self._ws = ws
        self._events: list[Any] = []
        self._parts: list[str] = []
        self.close_code: int | None = None
        self.eof = False
        self.broken = False

    async def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> None:
        """Write one frame; a peer that already hung up is noted in ``broken``, not raised."""
        try:
            await self.stream.send(build_frame(opcode, payload, fin=fin, rsv=rsv))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self.broken = True

    async def send_text(self, text: str | bytes) -> None:
        await self.send_frame(OP_TEXT, text.encode() if isinstance(text, str) else text)

    async def send_json(self, message: Any) -> None:
        await self.send_frame(OP_TEXT, msgspec.json.encode(message))

    async def send_close(self, code: int = 1000, reason: str = "") -> None:
        await self.send_frame(OP_CLOSE, close_payload(code, reason))

    async def abort(self) -> None:
        """Vanish: close the TCP connection without a close frame."""
        await anyio.aclose_forcefully(self.stream)

    def _take(self, events: Any) -> None:
        for event in events:
            if isinstance(event, TextMessage):  # reassemble: wsproto hands over big frames in pieces
                self._parts.append(event.data)
                if event.message_finished:
                    self._events.append(TextMessage(data="".join(self._parts)))
                    self._parts.clear()
            elif isinstance(event, BytesMessage | CloseConnection):
                self._events.append(event)

    async def next_event(self) -> Any:
        """The next complete text/bytes message or close event from the server, or None at end of stream."""
        while not self._events:
            if self.eof:
                return None
            try:
                data = await self.stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self.eof = True
                continue
            self._ws.receive_data(data)
            self._take(self._ws.events())
        return self._events.pop(0)

    async def messages_until_close(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Every JSON message until the server's close frame (or end of stream); sets ``close_code``."""
        messages: list[dict[str, Any]] = []
        with anyio.fail_after(timeout):
            while True:
                event = await self.next_event()
                if event is None:
                    return messages
                if isinstance(event, CloseConnection):
                    self.close_code = event.code
                    return messages
                if isinstance(event, TextMessage):
                    messages.append(msgspec.json.decode(event.data))

    async def receive_json(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next JSON message (fails on a close or end of stream)."""
        with anyio.fail_after(timeout):
            event = await self.next_event()
        assert isinstance(event, TextMessage), f"expected a text message, got {event!r}"
        message: dict[str, Any] = msgspec.json.decode(event.data)
        return message


@asynccontextmanager
async def raw_connect(url: str, headers: list[tuple[str, str]] | None = None) -> AsyncIterator[RawClient]:
    """Open a WebSocket connection for :class:`RawClient` (handshake through wsproto, then raw bytes)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    stream = await anyio.connect_tcp(parts.hostname, parts.port)
    try:
        ws = WSConnection(ConnectionType.CLIENT)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        await stream.send(ws.send(Request(host=f"{parts.hostname}:{parts.port}", target=target,
                                          extra_headers=list(headers or []))))
        client = RawClient(stream, ws)
        with anyio.fail_after(5):
            while True:
                ws.receive_data(await stream.receive(65536))
                events = list(ws.events())
                if any(isinstance(e, RejectConnection) for e in events):
                    raise AssertionError("handshake rejected")
                if any(isinstance(e, AcceptConnection) for e in events):
                    client._take(e for e in events if not isinstance(e, AcceptConnection))
                    break
        yield client
    finally:
        await anyio.aclose_forcefully(stream)


__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_TEXT",
    "RawClient",
    "build_frame",
    "close_payload",
    "raw_connect",
    "send_raw",
    "send_raw_frame",
    "send_raw_text_bytes",
]
