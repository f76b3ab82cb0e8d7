"""Support for the reliability suites (fuzz, faults, churn): a raw WebSocket client that writes any
frame it is told to, an ERROR-record trap for the ``llmgine_ws`` loggers, and registry checks."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
import msgspec
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, RejectConnection, Request, TextMessage

from llmgine_ws.runtime import Runtime

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
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if length < 4096 else (
        (int.from_bytes(payload, "big") ^ int.from_bytes((key * (length // 4 + 1))[:length], "big"))
        .to_bytes(length, "big"))
    return bytes(header) + key + masked


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode()


class RawClient:
    """A WebSocket client below the protocol's rules: it writes frames verbatim (data after a close
    frame, invalid UTF-8, reserved bits...) and parses what the server sends with wsproto."""

    def __init__(self, stream: anyio.abc.ByteStream, ws: WSConnection) -> None:
        self.stream = stream
        self._ws = ws
        self._events: list[Any] = []
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

    async def next_event(self) -> Any:
        """The next text/bytes/close event from the server, or None at end of stream."""
        while not self._events:
            if self.eof:
                return None
            try:
                data = await self.stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self.eof = True
                continue
            self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, TextMessage | BytesMessage | CloseConnection):
                    self._events.append(event)
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
async def raw_connect(url: str) -> AsyncIterator[RawClient]:
    """Open a WebSocket connection for :class:`RawClient` (handshake through wsproto, then raw bytes)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    stream = await anyio.connect_tcp(parts.hostname, parts.port)
    try:
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send(ws.send(Request(host=f"{parts.hostname}:{parts.port}", target=parts.path)))
        client = RawClient(stream, ws)
        with anyio.fail_after(5):
            while True:
                ws.receive_data(await stream.receive(65536))
                events = list(ws.events())
                if any(isinstance(e, RejectConnection) for e in events):
                    raise AssertionError("handshake rejected")
                if any(isinstance(e, AcceptConnection) for e in events):
                    client._events.extend(e for e in events if isinstance(e, TextMessage | BytesMessage))
                    break
        yield client
    finally:
        await anyio.aclose_forcefully(stream)


class ErrorTrap(logging.Handler):
    """Collects ERROR (and worse) records of the ``llmgine_ws`` loggers, from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.expected: list[str] = []
        """Substrings of messages that are expected (e.g. a callback the test makes fail)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def unexpected(self) -> list[str]:
        found = []
        for record in self.records:
            text = record.getMessage()
            if not any(marker in text for marker in self.expected):
                exc = f" [{record.exc_info[0].__name__}: {record.exc_info[1]}]" if record.exc_info and \
                    record.exc_info[0] else ""
                found.append(f"{record.name}: {text}{exc}")
        return found

    def check(self) -> None:
        unexpected = self.unexpected()
        assert not unexpected, f"unexpected ERROR records: {unexpected}"


@contextmanager
def error_trap(*expected: str) -> Iterator[ErrorTrap]:
    """Attach an :class:`ErrorTrap` to ``llmgine_ws`` for the block; fail if it caught anything
    not marked as expected (substrings of the message)."""
    trap = ErrorTrap()
    trap.expected.extend(expected)
    logger = logging.getLogger("llmgine_ws")
    logger.addHandler(trap)
    try:
        yield trap
    finally:
        logger.removeHandler(trap)
    trap.check()


def registries(runtime: Runtime) -> dict[str, int]:
    """Everything that must be empty once every client is gone."""
    return {
        "connections": len(runtime.hub),
        "sessions": len(runtime.sessions),
        "engines": runtime.engines.running(),
        "pending_requests": runtime.hub.pending_request_count(),
        "connection_counter": runtime.connection_counter.total,
        "connection_counter_ips": runtime.connection_counter.addresses,
        "in_flight": sum(len(c.in_flight) for c in runtime.hub),
    }


EMPTY = {"connections": 0, "sessions": 0, "engines": 0, "pending_requests": 0, "connection_counter": 0,
         "connection_counter_ips": 0, "in_flight": 0}


async def wait_registries_empty(runtime: Runtime, timeout: float = 10.0) -> None:
    """Wait (bounded) until the hub is empty, then check every registry is."""
    with anyio.fail_after(timeout):
        await runtime.hub.wait_empty()
    assert registries(runtime) == EMPTY
