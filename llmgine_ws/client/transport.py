"""One WebSocket connection: an anyio byte stream (TCP or TLS) framed by wsproto.

The transport knows frames, not the llmgine_ws protocol: :meth:`Transport.receive` returns the next
complete message (text or binary), answering WebSocket pings and reassembling fragments on the way;
writes are queued and written by one writer task (:meth:`Transport.run_writer`), so frames are never
interleaved and a caller cancelled mid-send never leaves half a frame on the wire. Framing and
masking are wsproto's.

One transport is one socket. The :class:`~llmgine_ws.client.Client` on top of it keeps everything
that must outlive a socket (pending requests, handlers), so a transport can be replaced under a
live client.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque

import anyio
import anyio.abc
from wsproto import WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, TextMessage
from wsproto.utilities import LocalProtocolError

from .errors import ConnectionClosed

__all__ = ["CLOSE_ABNORMAL", "CLOSE_TOO_BIG", "Transport"]

_log = logging.getLogger("llmgine_ws.client")

CLOSE_ABNORMAL = 1006
"""Close code of a connection lost without a close frame (never sent on the wire)."""
CLOSE_TOO_BIG = 1009
RECEIVE_CHUNK = 65_536


class _Write:
    """Bytes queued for the writer; ``done`` is set once they are on the socket (or never will be)."""

    __slots__ = ("data", "done", "error")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.done = anyio.Event()
        self.error: BaseException | None = None


class Transport:
    """One open WebSocket connection. Obtained from :func:`~llmgine_ws.client.handshake.open_transport`.

    Exactly one task calls :meth:`receive`, and :meth:`run_writer` must run (in the owner's task
    group) for anything to be written.

    Attributes:
        subprotocol: the subprotocol the server accepted, or ``None``.
    """

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        ws: WSConnection,
        *,
        subprotocol: str | None,
        max_message_size: int,
        close_timeout: float,
    ) -> None:
        self.subprotocol = subprotocol
        self._stream = stream
        self._ws = ws
        self._max_message_size = max_message_size
        self._close_timeout = close_timeout
        # Frames that arrived together with the handshake response are already in wsproto's buffer.
        self._events: deque[Event] = deque(ws.events())
        self._parts: list[str | bytes] = []
        self._partial_size = 0
        self._discarding = False
        self._close_deadline: float | None = None
        self._last_activity = anyio.current_time()
        self._activity = anyio.Event()

        self._closed = anyio.Event()
        self._close_code: int | None = None
        self._close_reason = ""
        self._stream_closed = False
        self._write_error: BaseException | None = None
        self._writes_in, self._writes_out = anyio.create_memory_object_stream[_Write](math.inf)
        self._writer_done = anyio.Event()

    # ---------------------------------------------------------------- state

    @property
    def closed(self) -> bool:
        """``True`` once the connection is closed (handshake done, lost, or aborted)."""
        return self._closed.is_set()

    @property
    def close_code(self) -> int | None:
        """The close code (1006 when lost without a close frame); ``None`` while open."""
        return self._close_code

    @property
    def close_reason(self) -> str:
        """The peer's close reason, or a description of what happened."""
        return self._close_reason

    @property
    def open(self) -> bool:
        """Whether data frames can still be sent (no close frame sent or received)."""
        return self._ws.state is ConnectionState.OPEN and not self.closed

    async def wait_closed(self) -> None:
        """Wait until the connection is closed."""
        await self._closed.wait()

    def closed_error(self, default: str = "connection is closed") -> ConnectionClosed:
        """The :class:`ConnectionClosed` describing this connection's end."""
        return ConnectionClosed(self._close_code, self._close_reason or default)

    # ---------------------------------------------------------------- reading

    async def receive(self) -> str | bytes:
        """The next complete message: ``str`` for a text frame, ``bytes`` for a binary one.

        Raises:
            ConnectionClosed: the connection is closed (close frame, lost, aborted, or the peer
                sent a message larger than ``max_message_size``: the client closes with 1009).
        """
        while True:
            while self._events:
                message = self._on_event(self._events.popleft())
                if message is not None:
                    return message
            if self.closed:
                raise self.closed_error()
            try:
                if self._close_deadline is None:
                    data = await self._stream.receive(RECEIVE_CHUNK)
                else:  # we sent a close frame: the peer's answer is waited for only so long
                    with anyio.fail_after(max(0.0, self._close_deadline - anyio.current_time())):
                        data = await self._stream.receive(RECEIVE_CHUNK)
            except TimeoutError:
                await self._lost("close handshake timed out")
                continue
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await self._lost("connection lost without a close frame")
                continue
            self._last_activity = anyio.current_time()
            self._activity.set()
            self._activity = anyio.Event()
            self._ws.receive_data(data)
            self._events.extend(self._ws.events())

    def _on_event(self, event: Event) -> str | bytes | None:
        if isinstance(event, TextMessage | BytesMessage):
            return self._on_data(event.data, event.message_finished)
        if isinstance(event, Ping):
            with contextlib.suppress(ConnectionClosed):
                self._send_event_soon(event.response())
        elif isinstance(event, CloseConnection):
            self._on_close_frame(event)
        return None

    def _on_data(self, chunk: str | bytes | bytearray, finished: bool) -> str | bytes | None:
        if self._discarding:
            return None
        self._parts.append(chunk if isinstance(chunk, str) else bytes(chunk))
        self._partial_size += len(chunk)
        if self._partial_size > self._max_message_size:
            self._discarding = True
            self._parts.clear()
            _log.warning("message larger than max_message_size=%d: closing", self._max_message_size)
            self.start_close(CLOSE_TOO_BIG, "message too big")
            return None
        if not finished:
            return None
        parts, self._parts, self._partial_size = self._parts, [], 0
        if len(parts) == 1:
            return parts[0]
        if isinstance(parts[0], str):
            return "".join(part for part in parts if isinstance(part, str))
        return b"".join(part for part in parts if isinstance(part, bytes))

    def _on_close_frame(self, event: CloseConnection) -> None:
        state = self._ws.state
        self._mark_closed(event.code, event.reason or "")
        reply: CloseConnection | None = None
        if state is ConnectionState.REMOTE_CLOSING:
            reply = event.response()  # complete the closing handshake
        elif state is ConnectionState.OPEN:
            # wsproto found a protocol violation by the server (e.g. invalid UTF-8: 1007).
            reply = CloseConnection(code=event.code, reason=event.reason)
        if reply is not None:
            with contextlib.suppress(ConnectionClosed):
                self._send_event_soon(reply)
        # Nothing else will be written: the writer flushes the reply, then closes the socket.
        self._writes_in.close()

    async def _lost(self, reason: str) -> None:
        self._mark_closed(CLOSE_ABNORMAL, reason)
        await self._close_stream()

    def _mark_closed(self, code: int | None, reason: str) -> None:
        if self._closed.is_set():
            return
        self._close_code = code
        self._close_reason = reason
        self._closed.set()
        self._activity.set()

    # ---------------------------------------------------------------- liveness

    @property
    def last_activity(self) -> float:
        """When bytes last arrived from the peer (``anyio.current_time()`` clock)."""
        return self._last_activity

    async def wait_activity(self, since: float) -> None:
        """Return once bytes arrived after ``since`` (or the connection closed)."""
        while self._last_activity <= since and not self.closed:
            await self._activity.wait()  # also set when the connection closes

    def ping(self, payload: bytes = b"llmgine") -> None:
        """Queue a WebSocket ping (its pong, like any bytes, counts as activity).

        Raises:
            ConnectionClosed: the connection is closed or closing.
        """
        if self.closed:
            raise self.closed_error()
        self._send_event_soon(Ping(payload=payload))

    async def lose(self, reason: str) -> None:
        """Declare the connection lost (close code 1006, ``reason``) and drop the socket, e.g. when
        the peer stopped answering pings (a half-open connection)."""
        await self._lost(reason)

    # ---------------------------------------------------------------- writing

    def send_text_soon(self, text: str) -> _Write:
        """Queue one text message; returns the queued write (see :meth:`written`).

        Raises:
            ConnectionClosed: the connection is closed or closing.
        """
        if self.closed:
            raise self.closed_error()
        return self._send_event_soon(TextMessage(data=text))

    async def send_text(self, text: str) -> None:
        """Send one text message and wait until it is written to the socket."""
        await self.written(self.send_text_soon(text))

    async def write(self, data: bytes) -> None:
        """Write bytes that already are WebSocket frames, in order with every other write.

        Everything the client sends goes through here (serialised by wsproto); protocol tests use it
        to put hand-made frames on the wire.
        """
        if self.closed:
            raise self.closed_error()
        await self.written(self._queue(data))

    async def written(self, item: _Write) -> None:
        """Wait until a queued write is on the socket.

        Raises:
            ConnectionClosed: the connection was lost before it could be written.
        """
        await item.done.wait()
        if item.error is not None:
            raise self.closed_error("connection lost") from item.error

    def _send_event_soon(self, event: Event) -> _Write:
        try:
            data = self._ws.send(event)
        except LocalProtocolError as exc:
            raise self.closed_error("connection is closing") from exc
        return self._queue(data)

    def _queue(self, data: bytes) -> _Write:
        if self._write_error is not None or self._stream_closed:
            raise self.closed_error()
        item = _Write(data)
        try:
            self._writes_in.send_nowait(item)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
            raise self.closed_error() from exc
        return item

    async def run_writer(self) -> None:
        """The only task writing to the socket. Once the connection is finished and the queue is
        drained, it closes the socket."""
        try:
            # Shielded: when the owner is cancelled, the closing handshake still goes out (bounded by
            # close_timeout); closing the socket always ends this loop.
            with anyio.CancelScope(shield=True):
                async with self._writes_out:
                    async for item in self._writes_out:
                        if self._write_error is None and not self._stream_closed:
                            try:
                                await self._stream.send(item.data)
                            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                                self._write_error = exc
                                await self._lost(f"connection lost while sending: {exc!r}")
                                item.error = exc
                        else:
                            item.error = self._write_error or self.closed_error()
                        item.done.set()
                await self._close_stream()
        finally:
            self._writer_done.set()

    # ---------------------------------------------------------------- closing

    def start_close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame; the peer's answer is then awaited by :meth:`receive` for at most
        ``close_timeout`` seconds."""
        if self._ws.state is not ConnectionState.OPEN or self.closed:
            return
        with contextlib.suppress(ConnectionClosed):
            self._send_event_soon(CloseConnection(code=code, reason=reason))
            self._close_deadline = anyio.current_time() + self._close_timeout

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close: send a close frame, wait (at most ``close_timeout``) for the peer's, then close the
        socket. The peer's close frame is read by the task calling :meth:`receive`. Idempotent."""
        if not self.closed:
            self.start_close(code, reason)
            with anyio.move_on_after(self._close_timeout):
                await self._closed.wait()
            if not self.closed:
                await self._lost("close handshake timed out")
                return
        # Let the writer flush what is queued (the reply to the peer's close frame): it then closes
        # the socket itself.
        self._writes_in.close()
        with anyio.move_on_after(self._close_timeout):
            await self._writer_done.wait()
        await self._close_stream()

    async def abort(self) -> None:
        """Drop the TCP connection at once, without a close frame."""
        self._mark_closed(CLOSE_ABNORMAL, "connection aborted by the client")
        await self._close_stream()

    async def _close_stream(self) -> None:
        """Close the socket now (queued writes are dropped); this also ends the reader and writer."""
        if self._stream_closed:
            return
        self._stream_closed = True
        self._writes_in.close()
        await anyio.aclose_forcefully(self._stream)
