"""Async Python client for the llmgine_ws WebSocket protocol.

The client is backend-agnostic: it runs under asyncio and trio alike, because it is built on
:mod:`anyio` byte streams and the sans-IO WebSocket implementation :mod:`wsproto` (it does not use
the ``websockets`` library).

Typical use::

    async with connect("ws://127.0.0.1:8000/ws") as client:
        print(client.app_id)
        session_id = await client.create_session()
        reply = await client.request("ping", {"timestamp": "2024-01-01T00:00:00Z"})

        @client.on_server_request("user_input")
        async def answer(message: Message) -> dict[str, Any]:
            return {"text": "yes"}

        notification = await client.receive(timeout=5)

Wire protocol: every frame is a JSON text frame ``{"type", "message_id", "data"}``;
server-initiated frames also carry ``"server_initiated": true``; a response repeats the
request's ``message_id``; a failed request is answered with a ``type == "error"`` envelope whose
``data`` holds ``code``, ``message`` and ``details``.

Concurrency model: :func:`connect` owns an anyio task group holding a reader task (the only task
that reads the socket), a writer task (the only task that writes it, fed by an in-memory queue,
so a frame is never interleaved with another and a cancelled caller never leaves half a frame on
the wire), the tasks that run ``server_request`` handlers, and one dispatch task per handled
message type (so one type's messages reach its handlers in arrival order).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import ssl
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

__all__ = (
    "RAW_MESSAGE_TYPE",
    "Client",
    "ClientError",
    "ConnectionClosed",
    "HandshakeRejected",
    "Message",
    "MessageHandler",
    "RequestError",
    "RequestTimeout",
    "ServerRequestHandler",
    "connect",
)

_log = logging.getLogger(__name__)

#: ``Message.type`` given to frames that could not be decoded as a protocol message.
RAW_MESSAGE_TYPE = "<raw>"

_DEFAULT_INBOX_LIMIT = 10_000
_RECEIVE_CHUNK = 65_536
_OPCODE_TEXT = 0x1
_OPCODE_BINARY = 0x2
_CLOSE_ABNORMAL = 1006
_CLOSE_TOO_BIG = 1009


# --------------------------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------------------------


class ClientError(Exception):
    """Base class of every error raised by the llmgine_ws client."""


class HandshakeRejected(ClientError):
    """The server answered the WebSocket opening handshake with an HTTP status other than 101.

    Attributes:
        status_code: the HTTP status code (e.g. 403).
        headers: the response headers, as ``(name, value)`` pairs decoded as latin-1.
        body: the response body.
    """

    def __init__(self, status_code: int, headers: list[tuple[str, str]], body: bytes) -> None:
        super().__init__(f"WebSocket handshake rejected with HTTP {status_code}: {body[:200]!r}")
        self.status_code = status_code
        self.headers = headers
        self.body = body


class ConnectionClosed(ClientError):
    """The connection is closed (or closing), so the operation cannot complete.

    Attributes:
        code: the WebSocket close code (1006 when the connection was lost without a close
            frame), or ``None`` if the connection is only closing and no code is known yet.
        reason: the close reason sent by the peer, or a description of what happened.
    """

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"connection closed (code={code}, reason={reason!r})")
        self.code = code
        self.reason = reason


class RequestError(ClientError):
    """The server answered a request with an ``error`` envelope.

    Attributes:
        code: the machine-readable error code (e.g. ``"SESSION_NOT_FOUND"``).
        message: the human-readable message.
        details: the optional ``details`` field (any JSON value).
        message_id: the id of the failed request.
        response: the complete error message.
    """

    def __init__(self, code: str, message: str, details: Any, message_id: str, response: Message) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details
        self.message_id = message_id
        self.response = response


class RequestTimeout(ClientError, TimeoutError):
    """A bounded wait timed out: a request's response, :meth:`Client.receive`, or the opening
    of the connection (TCP connect, handshake and the ``connected`` message)."""


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


class Message(msgspec.Struct, frozen=True):
    """One protocol message, as received from the server.

    Attributes:
        type: the message type (``"ping_res"``, ``"notification"``, ``"error"``...). Frames that
            could not be decoded as a message get :data:`RAW_MESSAGE_TYPE` (``"<raw>"``).
        message_id: the message id (a response repeats its request's id); ``""`` for raw frames.
        data: the decoded JSON payload (usually a dict); for raw frames the frame's text (``str``)
            or, for a binary frame, its ``bytes``.
        server_initiated: ``True`` for messages the server sent on its own initiative.
    """

    type: str
    message_id: str
    data: Any = None
    server_initiated: bool = False


class _Envelope(msgspec.Struct):
    """An outgoing message."""

    type: str
    message_id: str
    data: Any


#: Handler for a ``server_request``: returns the result fields of the ``server_response``
#: (a mapping, or ``None`` for no fields), directly or through an awaitable.
ServerRequestHandler = Callable[[Message], Mapping[str, Any] | Awaitable[Mapping[str, Any] | None] | None]
#: Handler for notifications and other server-initiated messages (sync or async).
MessageHandler = Callable[[Message], Awaitable[None] | None]

_SRH = TypeVar("_SRH", bound=ServerRequestHandler)
_MH = TypeVar("_MH", bound=MessageHandler)


class _Waiter:
    """A pending request waiting for its response."""

    __slots__ = ("event", "response")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.response: Message | None = None


class _Write:
    """One chunk of bytes queued for the writer task."""

    __slots__ = ("data", "done", "error")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.done = anyio.Event()
        self.error: BaseException | None = None


def _new_message_id() -> str:
    return uuid.uuid4().hex


def _utc_now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _build_frame(opcode: int, payload: bytes) -> bytes:
    """Serialise one complete (FIN) masked client frame.

    Data frames are built here rather than by wsproto so that a text frame can carry arbitrary
    bytes (see :meth:`Client.send_raw_text_bytes`) and a JSON payload encoded by msgspec is not
    round-tripped through ``str``. The client never fragments outgoing messages, so this never
    interferes with wsproto's outbound fragmentation state.
    """
    length = len(payload)
    header = bytearray((0x80 | opcode,))
    if length < 126:
        header.append(0x80 | length)
    elif length < 1 << 16:
        header.append(0x80 | 126)
        header += length.to_bytes(2, "big")
    else:
        header.append(0x80 | 127)
        header += length.to_bytes(8, "big")
    key = os.urandom(4)
    header += key
    if not length:
        return bytes(header)
    mask = (key * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(length, "big")
    return bytes(header) + masked


def _normalise_headers(
    headers: Mapping[str, str] | Sequence[tuple[str, str]] | None,
) -> list[tuple[bytes, bytes]]:
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in items]


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


class Client:
    """A connected llmgine_ws client. Obtain one with :func:`connect`; do not instantiate directly.

    Attributes:
        app_id: the ``app_id`` announced by the server's ``connected`` message (``""`` until it
            arrives).
        subprotocol: the subprotocol the server accepted, or ``None``.
    """

    def __init__(
        self,
        *,
        stream: anyio.abc.ByteStream,
        ws: WSConnection,
        task_group: anyio.abc.TaskGroup,
        subprotocol: str | None,
        request_timeout: float,
        max_message_size: int,
        wait_connected: bool,
        auto_pong: bool,
        close_timeout: float,
        inbox_limit: int,
    ) -> None:
        self.app_id: str = ""
        self.subprotocol: str | None = subprotocol
        self._stream = stream
        self._ws = ws
        self._tg = task_group
        self._request_timeout = request_timeout
        self._max_message_size = max_message_size
        self._wait_connected = wait_connected
        self._auto_pong = auto_pong
        self._close_timeout = close_timeout
        self._inbox_limit = max(1, inbox_limit)

        self._decoder = msgspec.json.Decoder(Message)
        self._encoder = msgspec.json.Encoder()

        self._closed = False
        self._close_code: int | None = None
        self._close_reason = ""
        self._closed_event = anyio.Event()
        self._connected_event = anyio.Event()
        self._connect_wait = anyio.Event()  # set on `connected` or on close
        self._stream_closed = False
        # Shielded from the cancellation of connect()'s caller, so that the close handshake can
        # still complete; cancelled by abort() and _close_stream().
        self._reader_scope = anyio.CancelScope(shield=True)
        self._writer_alive = False
        self._writer_done = anyio.Event()

        self._pending: dict[str, _Waiter] = {}
        self._inbox: deque[Message] = deque()
        self._inbox_event = anyio.Event()
        self._dropped = 0

        self._server_request_handlers: dict[str, ServerRequestHandler] = {}
        self._running_requests: dict[str, anyio.CancelScope] = {}
        self._handlers: dict[str, list[MessageHandler]] = {}
        self._dispatch: dict[str, MemoryObjectSendStream[Message]] = {}

        self._write_send: MemoryObjectSendStream[_Write]
        self._write_receive: MemoryObjectReceiveStream[_Write]
        self._write_send, self._write_receive = anyio.create_memory_object_stream[_Write](math.inf)
        self._write_error: BaseException | None = None

        # Fragmented-message reassembly.
        self._text_parts: list[str] = []
        self._binary_parts: list[bytes] = []
        self._partial_size = 0
        self._discarding = False

    def __repr__(self) -> str:
        state = f"closed code={self._close_code}" if self._closed else "open"
        return f"<Client app_id={self.app_id!r} {state}>"

    # ---------------------------------------------------------------- state

    @property
    def closed(self) -> bool:
        """``True`` once the connection is closed (close handshake done, lost, or aborted)."""
        return self._closed

    @property
    def close_code(self) -> int | None:
        """The close code (1006 if the connection was lost without a close frame), or ``None``
        while the connection is open."""
        return self._close_code

    @property
    def close_reason(self) -> str:
        """The close reason received from the server (or a description of the failure)."""
        return self._close_reason

    # ---------------------------------------------------------------- sending

    async def request(
        self,
        type: str,
        data: Any = None,
        *,
        message_id: str | None = None,
        timeout: float | None = None,
    ) -> Message:
        """Send a request and wait for the message carrying the same ``message_id``.

        Args:
            type: the message type (e.g. ``"ping"``).
            data: the payload, a dict or a msgspec Struct (``None`` sends ``{}``).
            message_id: the id to use; a fresh one is generated by default.
            timeout: seconds to wait for the response (sending included); ``None`` uses the
                ``request_timeout`` given to :func:`connect`, ``math.inf`` waits forever.

        Returns:
            The response message.

        Raises:
            RequestError: the server answered with an ``error`` envelope.
            RequestTimeout: no response in time (a late response then goes to :meth:`receive`).
            ConnectionClosed: the connection is closed or closes while waiting (raised at once).
            ValueError: ``message_id`` is already used by a pending request.
        """
        mid = message_id if message_id is not None else _new_message_id()
        frame = _build_frame(_OPCODE_TEXT, self._encode(type, mid, data))
        if mid in self._pending:
            raise ValueError(f"message_id {mid!r} is already used by a pending request")
        self._raise_if_closed()
        waiter = _Waiter()
        self._pending[mid] = waiter
        try:
            with anyio.move_on_after(self._request_timeout if timeout is None else timeout):
                await self._write_frame(frame)
                await waiter.event.wait()
        finally:
            if self._pending.get(mid) is waiter:
                del self._pending[mid]
        response = waiter.response
        if response is None:
            if self._closed:
                raise ConnectionClosed(self._close_code, self._close_reason)
            raise RequestTimeout(f"no response to {type!r} request {mid!r} in time")
        if response.type == "error":
            raise self._request_error(response, mid)
        return response

    async def send(self, type: str, data: Any = None, *, message_id: str | None = None) -> str:
        """Send a message without waiting for any response.

        Returns once the frame has been written to the socket.

        Args:
            type: the message type.
            data: the payload, a dict or a msgspec Struct (``None`` sends ``{}``).
            message_id: the id to use; a fresh one is generated by default.

        Returns:
            The message id.

        Raises:
            ConnectionClosed: the connection is closed.
        """
        mid = message_id if message_id is not None else _new_message_id()
        frame = _build_frame(_OPCODE_TEXT, self._encode(type, mid, data))
        self._raise_if_closed()
        await self._write_frame(frame)
        return mid

    async def create_session(self) -> str:
        """Create a session on the server (``create_session`` request) and return its id.

        Raises:
            RequestError: the server refused.
            ClientError: the response carries no ``session_id``.
        """
        response = await self.request("create_session", {"app_id": self.app_id})
        data = response.data
        session_id = data.get("session_id") if isinstance(data, dict) else None
        if not isinstance(session_id, str):
            raise ClientError(f"create_session response has no session_id: {data!r}")
        return session_id

    async def send_raw(self, payload: str | bytes) -> None:
        """Send one unvalidated frame: a ``str`` as a text frame, ``bytes`` as a binary frame.

        Meant for protocol tests (malformed JSON, binary frames...).

        Raises:
            ConnectionClosed: the connection is closed.
        """
        if isinstance(payload, str):
            frame = _build_frame(_OPCODE_TEXT, payload.encode("utf-8"))
        else:
            frame = _build_frame(_OPCODE_BINARY, bytes(payload))
        self._raise_if_closed()
        await self._write_frame(frame)

    async def send_raw_text_bytes(self, payload: bytes) -> None:
        """Send a TEXT frame whose payload is ``payload`` verbatim, even if it is not valid UTF-8.

        The frame is serialised (and masked) by the client itself, bypassing wsproto's
        validation, so a server's handling of invalid UTF-8 (close 1007) can be tested.

        Raises:
            ConnectionClosed: the connection is closed.
        """
        frame = _build_frame(_OPCODE_TEXT, bytes(payload))
        self._raise_if_closed()
        await self._write_frame(frame)

    # ---------------------------------------------------------------- receiving

    async def receive(self, timeout: float | None = None) -> Message:
        """Return the next message not consumed otherwise, in arrival order.

        These are the messages that are neither a response to a pending request nor handled by a
        registered handler: server-initiated messages without handler, responses with unknown
        (or timed-out) ids, and raw frames (``type == "<raw>"``). The inbox is bounded; past its
        limit the oldest messages are dropped with a logged warning.

        Args:
            timeout: seconds to wait; ``None`` waits until a message arrives or the connection
                closes.

        Raises:
            ConnectionClosed: the connection is closed and the inbox is empty.
            RequestTimeout: nothing arrived in time.
        """
        with anyio.move_on_after(timeout):
            while True:
                if self._inbox:
                    return self._inbox.popleft()
                if self._closed:
                    raise ConnectionClosed(self._close_code, self._close_reason)
                await self._inbox_event.wait()
        raise RequestTimeout("no message received in time")

    # ---------------------------------------------------------------- handlers

    def on_server_request(self, request_type: str) -> Callable[[_SRH], _SRH]:
        """Decorator registering the handler of ``server_request`` messages of ``request_type``.

        The handler receives the request :class:`Message` and returns (directly or through an
        awaitable) a mapping of result fields, or ``None``. The client answers with a
        ``server_response`` whose data is ``{"response_type": request_type, **result}``; if the
        handler raises, the data is ``{"response_type": request_type, "error": str(exc)}``.
        Each request runs in its own task of the client's task group, so a slow handler never
        blocks the reader (it may itself call :meth:`request`). Registering again replaces the
        previous handler.

        A ``server_request`` whose type has no handler is answered at once with
        ``{"response_type": <type>, "error": "no handler for request_type '<type>'"}``.
        """

        def register(handler: _SRH) -> _SRH:
            self._server_request_handlers[request_type] = handler
            return handler

        return register

    def on_notification(self, handler: _MH) -> _MH:
        """Register (usable as a decorator) a handler for ``notification`` messages.

        The handler (sync or async) receives each notification :class:`Message`; notifications
        are delivered in arrival order, one at a time, from a dispatch task of the client's task
        group. Exceptions are logged and do not stop delivery. Several handlers may be registered;
        they are called in registration order. Notifications received while no handler is
        registered go to :meth:`receive`.
        """
        return self.on_message("notification")(handler)

    def on_message(self, type: str) -> Callable[[_MH], _MH]:
        """Decorator registering a handler for messages of ``type`` (e.g. ``"engine_event"``).

        Same delivery rules as :meth:`on_notification`: per type, messages reach the handlers in
        arrival order from one dispatch task. Responses to pending requests, ``server_request``
        and (with auto-pong) ``server_ping`` are never passed to these handlers.
        """

        def register(handler: _MH) -> _MH:
            self._handlers.setdefault(type, []).append(handler)
            return handler

        return register

    # ---------------------------------------------------------------- closing

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection: send a close frame, wait (bounded by ``close_timeout``) for the
        server's close frame, then close the socket. Pending requests fail with
        :class:`ConnectionClosed`. Idempotent."""
        if not self._closed:
            with anyio.move_on_after(self._close_timeout):
                if self._ws.state is ConnectionState.OPEN:
                    with contextlib.suppress(ConnectionClosed):
                        await self._send_event(CloseConnection(code=code, reason=reason))
                await self._closed_event.wait()
            if not self._closed:
                self._mark_closed(_CLOSE_ABNORMAL, "close handshake timed out")
                await self._close_stream()
                return
        # Let the writer flush what is queued (e.g. the reply to the server's close frame): it then
        # closes the socket itself.
        self._write_send.close()
        if self._writer_alive:
            with anyio.move_on_after(self._close_timeout):
                await self._writer_done.wait()
        await self._close_stream()

    async def abort(self) -> None:
        """Drop the TCP connection at once, without a close frame (simulates a client that
        vanishes). Pending requests fail with ``ConnectionClosed(1006)``."""
        self._mark_closed(_CLOSE_ABNORMAL, "connection aborted by the client")
        self._reader_scope.cancel()
        await self._close_stream()

    async def wait_closed(self, timeout: float | None = None) -> int | None:
        """Wait until the connection is closed and return the close code.

        Args:
            timeout: seconds to wait; ``None`` waits forever.

        Returns:
            The close code, or ``None`` if the connection was still open when ``timeout`` elapsed.
        """
        with anyio.move_on_after(timeout):
            await self._closed_event.wait()
        return self._close_code

    # ---------------------------------------------------------------- internals: lifecycle

    def _start(self) -> None:
        self._writer_alive = True
        self._tg.start_soon(self._writer)
        self._tg.start_soon(self._reader)

    async def _await_connected(self, deadline: float) -> None:
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            await self._connect_wait.wait()
        if self._connected_event.is_set():
            return
        if self._closed:
            raise ConnectionClosed(self._close_code, self._close_reason)
        raise RequestTimeout("timed out waiting for the server's 'connected' message")

    async def _shutdown(self) -> None:
        """Close gracefully (bounded), then make sure the socket is closed."""
        with contextlib.suppress(Exception):
            await self.close()
        await self._close_stream()

    def _mark_closed(self, code: int | None, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_code = code
        self._close_reason = reason
        for waiter in self._pending.values():
            waiter.event.set()
        self._pending.clear()
        self._inbox_event.set()
        self._closed_event.set()
        self._connect_wait.set()
        for stream in self._dispatch.values():
            stream.close()

    async def _close_stream(self) -> None:
        """Close the socket now (queued frames not yet written are dropped); this also ends the
        reader and the writer."""
        if self._stream_closed:
            return
        self._stream_closed = True
        self._write_send.close()
        self._reader_scope.cancel()
        await anyio.aclose_forcefully(self._stream)

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise ConnectionClosed(self._close_code, self._close_reason)

    # ---------------------------------------------------------------- internals: writing

    def _encode(self, type: str, message_id: str, data: Any) -> bytes:
        return self._encoder.encode(_Envelope(type=type, message_id=message_id, data={} if data is None else data))

    def _enqueue(self, data: bytes) -> _Write:
        if self._write_error is not None or self._stream_closed:
            raise ConnectionClosed(self._close_code, self._close_reason or "connection is closed")
        item = _Write(data)
        try:
            self._write_send.send_nowait(item)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
            raise ConnectionClosed(self._close_code, self._close_reason or "connection is closed") from exc
        return item

    async def _wait_written(self, item: _Write) -> None:
        await item.done.wait()
        if item.error is not None:
            raise ConnectionClosed(self._close_code, self._close_reason or "connection lost") from item.error

    async def _write_frame(self, frame: bytes) -> None:
        """Queue a serialised data frame and wait until it is written to the socket."""
        if self._ws.state is not ConnectionState.OPEN:
            raise ConnectionClosed(self._close_code, self._close_reason or "connection is closing")
        await self._wait_written(self._enqueue(frame))

    def _send_event_nowait(self, event: Event) -> _Write:
        try:
            data = self._ws.send(event)
        except LocalProtocolError as exc:
            raise ConnectionClosed(self._close_code, self._close_reason or "connection is closing") from exc
        return self._enqueue(data)

    async def _send_event(self, event: Event) -> None:
        await self._wait_written(self._send_event_nowait(event))

    def _send_message_nowait(self, type: str, message_id: str, data: Any) -> None:
        """Queue a message from a non-async context (reader), ignoring a closed connection."""
        if self._ws.state is not ConnectionState.OPEN:
            return
        with contextlib.suppress(ConnectionClosed):
            self._enqueue(_build_frame(_OPCODE_TEXT, self._encode(type, message_id, data)))

    async def _writer(self) -> None:
        """The only task writing to the socket. Once its queue is closed and drained (the
        connection is finished), it closes the socket."""
        try:
            # Shielded: when the caller of connect() is cancelled, the close handshake still goes
            # through (bounded by close_timeout); _close_stream() always ends this loop.
            with anyio.CancelScope(shield=True):
                async with self._write_receive:
                    async for item in self._write_receive:
                        if self._write_error is None:
                            try:
                                await self._stream.send(item.data)
                            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                                self._write_error = exc
                                self._mark_closed(_CLOSE_ABNORMAL, f"connection lost while sending: {exc!r}")
                                await self._close_stream()  # also stops the reader
                        item.error = self._write_error
                        item.done.set()
                await self._close_stream()
        finally:
            self._writer_alive = False
            self._writer_done.set()

    # ---------------------------------------------------------------- internals: reading

    async def _reader(self) -> None:
        """The only task reading the socket."""
        try:
            with self._reader_scope:
                try:
                    await self._read_loop()
                except Exception:  # a bug here must not take the user's task group down
                    _log.exception("llmgine_ws client reader failed")
                    self._mark_closed(_CLOSE_ABNORMAL, "client reader failed")
            self._mark_closed(_CLOSE_ABNORMAL, "connection lost")
        finally:
            # No more frames will be queued (except by close()): the writer flushes the queue
            # (e.g. the reply to the server's close frame), then closes the socket.
            self._write_send.close()

    async def _read_loop(self) -> None:
        # Frames that arrived together with the handshake response are already buffered.
        if self._process_events():
            return
        while True:
            try:
                data = await self._stream.receive(_RECEIVE_CHUNK)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self._mark_closed(_CLOSE_ABNORMAL, "connection lost without a close frame")
                return
            self._ws.receive_data(data)
            if self._process_events():
                return

    def _process_events(self) -> bool:
        """Handle the buffered wsproto events; return ``True`` once the connection is finished."""
        for event in self._ws.events():
            if isinstance(event, TextMessage):
                self._on_data_frame(event.data, event.message_finished)
            elif isinstance(event, BytesMessage):
                self._on_data_frame(bytes(event.data), event.message_finished)
            elif isinstance(event, Ping):
                with contextlib.suppress(ConnectionClosed):
                    self._send_event_nowait(event.response())
            elif isinstance(event, CloseConnection):
                self._on_close_event(event)
                return True
        return False

    def _on_close_event(self, event: CloseConnection) -> None:
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
                self._send_event_nowait(reply)

    def _on_data_frame(self, chunk: str | bytes, finished: bool) -> None:
        if self._discarding:
            return
        if isinstance(chunk, str):
            self._text_parts.append(chunk)
        else:
            self._binary_parts.append(chunk)
        self._partial_size += len(chunk)
        if self._partial_size > self._max_message_size:
            self._discarding = True
            self._text_parts.clear()
            self._binary_parts.clear()
            _log.warning("message larger than max_message_size=%d: closing", self._max_message_size)
            self._tg.start_soon(self.close, _CLOSE_TOO_BIG, "message too big")
            return
        if not finished:
            return
        self._partial_size = 0
        if isinstance(chunk, str):
            text = self._text_parts[0] if len(self._text_parts) == 1 else "".join(self._text_parts)
            self._text_parts.clear()
            try:
                message = self._decoder.decode(text)
            except msgspec.DecodeError:
                self._push_inbox(Message(type=RAW_MESSAGE_TYPE, message_id="", data=text))
                return
            self._route(message)
        else:
            payload = b"".join(self._binary_parts)
            self._binary_parts.clear()
            self._push_inbox(Message(type=RAW_MESSAGE_TYPE, message_id="", data=payload))

    def _route(self, message: Message) -> None:
        if not message.server_initiated:
            waiter = self._pending.pop(message.message_id, None)
            if waiter is not None:
                waiter.response = message
                waiter.event.set()
                return
        mtype = message.type
        if mtype == "connected" and not self._connected_event.is_set():
            data = message.data
            app_id = data.get("app_id") if isinstance(data, dict) else None
            if isinstance(app_id, str):
                self.app_id = app_id
            self._connected_event.set()
            self._connect_wait.set()
            if self._wait_connected:
                return
        elif mtype == "server_ping" and self._auto_pong:
            data = message.data
            timestamp = data.get("timestamp") if isinstance(data, dict) else None
            self._send_message_nowait(
                "server_pong",
                message.message_id,
                {"timestamp": timestamp, "server_timestamp": _utc_now_iso()},
            )
            return
        elif mtype == "server_request":
            self._on_server_request(message)
            return
        elif mtype == "server_request_cancelled":
            # The server stopped waiting (timeout, or the command that asked was cancelled): stop
            # the handler, nobody will read its answer. The notice itself still flows on below.
            data = message.data
            target = data.get("message_id") if isinstance(data, dict) else None
            scope = self._running_requests.get(target) if isinstance(target, str) else None
            if scope is not None:
                scope.cancel()
        elif mtype in self._handlers:
            self._dispatch_to_handlers(mtype, message)
            return
        self._push_inbox(message)

    def _push_inbox(self, message: Message) -> None:
        if len(self._inbox) >= self._inbox_limit:
            self._inbox.popleft()
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                _log.warning(
                    "client inbox full (%d messages): dropped %d oldest message(s) so far",
                    self._inbox_limit,
                    self._dropped,
                )
        self._inbox.append(message)
        self._inbox_event.set()
        self._inbox_event = anyio.Event()

    # ---------------------------------------------------------------- internals: handlers

    def _on_server_request(self, message: Message) -> None:
        data = message.data
        request_type = data.get("request_type") if isinstance(data, dict) else None
        handler = self._server_request_handlers.get(request_type) if isinstance(request_type, str) else None
        if handler is None:
            self._send_message_nowait(
                "server_response",
                message.message_id,
                {"response_type": request_type, "error": f"no handler for request_type '{request_type}'"},
            )
            return
        assert isinstance(request_type, str)
        self._tg.start_soon(self._run_server_request, handler, message, request_type)

    async def _run_server_request(self, handler: ServerRequestHandler, message: Message, request_type: str) -> None:
        response: dict[str, Any]
        try:
            with anyio.CancelScope() as scope:
                self._running_requests[message.message_id] = scope
                result = handler(message)
                if inspect.isawaitable(result):
                    result = await result
            if scope.cancel_called:
                return  # withdrawn by the server
            if result is None:
                response = {"response_type": request_type}
            elif isinstance(result, Mapping):
                response = {"response_type": request_type, **result}
            else:
                raise TypeError(f"server_request handler returned {type(result).__name__}, expected a dict")
        except Exception as exc:
            _log.debug("server_request handler for %r failed", request_type, exc_info=True)
            response = {"response_type": request_type, "error": str(exc)}
        finally:
            self._running_requests.pop(message.message_id, None)
        if self._ws.state is ConnectionState.OPEN:
            with contextlib.suppress(ConnectionClosed):
                await self._write_frame(
                    _build_frame(_OPCODE_TEXT, self._encode("server_response", message.message_id, response))
                )

    def _dispatch_to_handlers(self, mtype: str, message: Message) -> None:
        stream = self._dispatch.get(mtype)
        if stream is None:
            send, receive = anyio.create_memory_object_stream[Message](math.inf)
            self._dispatch[mtype] = stream = send
            self._tg.start_soon(self._dispatcher, mtype, receive)
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            stream.send_nowait(message)

    async def _dispatcher(self, mtype: str, receive: MemoryObjectReceiveStream[Message]) -> None:
        async with receive:
            async for message in receive:
                for handler in list(self._handlers.get(mtype, ())):
                    try:
                        result = handler(message)
                        if inspect.isawaitable(result):
                            await result
                    except Exception:
                        _log.exception("handler for %r messages failed", mtype)

    def _request_error(self, response: Message, message_id: str) -> RequestError:
        data = response.data if isinstance(response.data, dict) else {}
        return RequestError(
            code=str(data.get("code", "UNKNOWN_ERROR")),
            message=str(data.get("message", "")),
            details=data.get("details"),
            message_id=message_id,
            response=response,
        )


# --------------------------------------------------------------------------------------------
# connect()
# --------------------------------------------------------------------------------------------


async def _open_connection(
    url: str,
    headers: Mapping[str, str] | Sequence[tuple[str, str]] | None,
    subprotocols: Sequence[str],
    ssl_context: ssl.SSLContext | None,
    max_message_size: int,
) -> tuple[anyio.abc.ByteStream, WSConnection, str | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} (expected ws:// or wss://)")
    host = parts.hostname
    if not host:
        raise ValueError(f"URL has no host: {url!r}")
    secure = scheme == "wss"
    default_port = 443 if secure else 80
    port = parts.port or default_port
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    host_header = f"[{host}]" if ":" in host else host
    if port != default_port:
        host_header += f":{port}"

    stream: anyio.abc.ByteStream
    if secure:
        stream = await anyio.connect_tcp(
            host,
            port,
            tls=True,
            ssl_context=ssl_context or ssl.create_default_context(),
            tls_hostname=host,
            tls_standard_compatible=False,
        )
    else:
        stream = await anyio.connect_tcp(host, port)

    try:
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send(
            ws.send(
                Request(
                    host=host_header,
                    target=target,
                    extra_headers=_normalise_headers(headers),
                    subprotocols=list(subprotocols),
                )
            )
        )
        rejection: RejectConnection | None = None
        body = bytearray()
        while True:
            try:
                data: bytes | None = await stream.receive(_RECEIVE_CHUNK)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                data = None
            try:
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, AcceptConnection):
                        return stream, ws, event.subprotocol
                    if isinstance(event, RejectConnection):
                        rejection = event
                        if not event.has_body:
                            raise _rejected(event, b"")
                    elif isinstance(event, RejectData):
                        if len(body) < max_message_size:
                            body += event.data
                        if event.body_finished and rejection is not None:
                            raise _rejected(rejection, bytes(body))
            except RemoteProtocolError as exc:
                if rejection is not None:
                    raise _rejected(rejection, bytes(body)) from exc
                raise ClientError(f"invalid WebSocket handshake response: {exc}") from exc
            if data is None:
                if rejection is not None:
                    raise _rejected(rejection, bytes(body))
                raise ConnectionClosed(_CLOSE_ABNORMAL, "connection closed during the opening handshake")
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise


def _rejected(event: RejectConnection, body: bytes) -> HandshakeRejected:
    headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers]
    return HandshakeRejected(event.status_code, headers, body)


@asynccontextmanager
async def connect(
    url: str,
    *,
    headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    subprotocols: Sequence[str] = (),
    ssl_context: ssl.SSLContext | None = None,
    open_timeout: float = 10.0,
    request_timeout: float = 30.0,
    max_message_size: int = 16 * 1024 * 1024,
    wait_connected: bool = True,
    auto_pong: bool = True,
    close_timeout: float = 5.0,
    inbox_limit: int = _DEFAULT_INBOX_LIMIT,
) -> AsyncIterator[Client]:
    """Connect to an llmgine_ws server and yield a :class:`Client`.

    Leaving the context closes the connection (close frame 1000, waiting at most
    ``close_timeout`` for the server's close frame) and cancels the client's tasks (running
    handlers included).

    Args:
        url: a ``ws://`` or ``wss://`` URL, with path and query string.
        headers: extra HTTP headers for the opening handshake.
        subprotocols: subprotocols to offer; the accepted one is ``client.subprotocol``.
        ssl_context: TLS context for ``wss://`` (default: ``ssl.create_default_context()``).
        open_timeout: bound on TCP connect + TLS + handshake + waiting for ``connected``.
        request_timeout: default timeout of :meth:`Client.request`.
        max_message_size: largest incoming message (characters for text, bytes for binary);
            a larger one makes the client close the connection with code 1009.
        wait_connected: wait for the server's ``connected`` message and set ``client.app_id``
            before yielding (the message is then consumed; with ``False`` it also goes to
            :meth:`Client.receive`).
        auto_pong: answer ``server_ping`` messages with ``server_pong`` automatically
            (``False`` delivers them to :meth:`Client.receive`).
        close_timeout: bound on the closing handshake.
        inbox_limit: capacity of the :meth:`Client.receive` inbox (oldest dropped past it).

    Raises:
        HandshakeRejected: the server answered the handshake with an HTTP error status.
        ConnectionClosed: the server closed the connection before ``connected``.
        RequestTimeout: the connection could not be opened within ``open_timeout``.
        ClientError: the handshake response was not a valid WebSocket upgrade.
        OSError: the TCP (or TLS) connection failed.
        ValueError: the URL is not a ``ws://``/``wss://`` URL.
    """
    deadline = anyio.current_time() + open_timeout
    with anyio.move_on_after(open_timeout) as open_scope:
        stream, ws, subprotocol = await _open_connection(url, headers, subprotocols, ssl_context, max_message_size)
    if open_scope.cancelled_caught:
        raise RequestTimeout(f"timed out opening {url!r}")

    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        client = Client(
            stream=stream,
            ws=ws,
            task_group=tg,
            subprotocol=subprotocol,
            request_timeout=request_timeout,
            max_message_size=max_message_size,
            wait_connected=wait_connected,
            auto_pong=auto_pong,
            close_timeout=close_timeout,
            inbox_limit=inbox_limit,
        )
        client._start()
        try:
            if wait_connected:
                await client._await_connected(deadline)
            yield client
        except Exception as exc:
            # Re-raised below, outside the task group, so that callers see their own exception
            # rather than an ExceptionGroup.
            error = exc
        finally:
            with anyio.CancelScope(shield=True):
                await client._shutdown()
            tg.cancel_scope.cancel()
    if error is not None:
        raise error
