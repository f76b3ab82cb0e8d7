"""The WebSocket endpoint: one reader, one writer and a keepalive per connection.

The reader decodes and dispatches each frame (:mod:`llmgine_ws.dispatch`) and never waits on a
handler; the writer is the only task that writes to the socket; both live in the connection's task
group together with the handlers, so closing the connection cancels all of them at once.
"""

from __future__ import annotations

import logging
import time

import anyio
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from .connection import WS_INTERNAL_ERROR, WS_MESSAGE_TOO_BIG, CloseRequest, Connection, OutboundItem
from .errors import AppDisconnected, ErrorCode, ProtocolError
from .lifecycle import LazyEvent
from .outbox import OutboxClosed
from .protocol import ServerPingData, new_message_id, utcnow
from .runtime import Runtime

logger = logging.getLogger("llmgine_ws.endpoint")

BINARY_FRAME_ERROR = ProtocolError(
    ErrorCode.WEBSOCKET_ERROR, "binary frames are not accepted: send each message as a JSON text frame",
    {"frame": "binary"},
)
CLOSE_FRAME_TIMEOUT = 1.0
"""How long the close frame may take to go out before cleanup goes on without it."""


class MessageEndpoint:
    """The ASGI endpoint serving every WebSocket connection of one app (mounted by ``create_app``)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handshake, then read/write/keepalive until either side closes, then clean up."""
        runtime = self.runtime
        websocket = WebSocket(scope, receive=receive, send=send)
        connection = await runtime.gate.open(websocket)
        if connection is None:
            return
        async with anyio.create_task_group() as tg:
            connection.attach(tg)
            writer_done = LazyEvent()
            tg.start_soon(self._write, connection, send, writer_done)
            if runtime.config.ping_interval > 0:
                tg.start_soon(self._keepalive, connection)
            if runtime.extensions.connection_callbacks["connect"]:  # no task for nothing to run
                tg.start_soon(runtime.on_connected, connection)
            peer_gone = False
            try:
                peer_gone = await self._read(connection, receive)
            finally:
                # Cleanup runs here, inside the task group, right after cancelling it: whatever user
                # code does not stop in time is abandoned (the task group waits for it afterwards),
                # but never holds the connection's cleanup up past its own deadlines.
                if connection.flushing and not peer_gone:  # the queued frames go out before the close
                    with anyio.CancelScope(shield=True), anyio.move_on_after(runtime.config.send_grace):
                        await writer_done.wait()
                connection.lose()
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    with anyio.move_on_after(CLOSE_FRAME_TIMEOUT):
                        await writer_done.wait()  # the close frame must not overtake a frame being written
                    if not peer_gone:
                        await self._send_close(connection, send)
                    await runtime.close_connection(connection)

    async def _read(self, connection: Connection, receive: Receive) -> bool:
        """Read until the client leaves (True) or the connection starts closing (False)."""
        max_size = self.runtime.config.max_message_size
        dispatcher = self.runtime.dispatcher
        dispatch = dispatcher.dispatch
        message: Message | None
        text: str | None
        while True:
            message = text = None  # an idle connection keeps no reference to the last frame it read
            message = await receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                if connection.close_code is None:
                    connection.close_code = int(message.get("code") or 1005)
                return True
            if connection.closing:
                # uvicorn's receive() does not yield while frames are queued, so a cancelled reader
                # would go on reading a flooding client: a closing connection reads nothing more.
                return False
            if kind != "websocket.receive":
                continue
            connection.last_activity = time.monotonic()
            text = message.get("text")
            if text is not None:
                size = len(text)
                # The limit is in bytes: a character takes up to 4 in UTF-8 (isascii() is O(1)).
                if size * 4 > max_size and not text.isascii():
                    size = len(text.encode())
            else:
                size = len(message.get("bytes") or b"")
            if size > max_size:
                connection.force_close(WS_MESSAGE_TOO_BIG, "message too big", size=size, limit=max_size)
                return False
            if text is not None:
                dispatch(connection, text)  # the hot path: no coroutine, no await
            elif dispatcher.within_rate_limit(connection, None):
                connection.send_soon(self.runtime.encoder.error(None, BINARY_FRAME_ERROR))

    async def _write(self, connection: Connection, send: Send, done: LazyEvent) -> None:
        outbox = connection.outbox
        item: OutboundItem | None
        try:
            while True:
                item = await outbox.get()
                if isinstance(item, CloseRequest):
                    connection.close(item.code, item.reason)
                    return
                await send({"type": "websocket.send", "text": item})
                item = None  # an idle connection keeps no reference to the last frame it wrote
        except OutboxClosed:
            return
        except Exception as exc:  # the transport is gone: treat as a disconnect
            logger.debug("write to %s failed: %r", connection.app_id, exc, extra={"app_id": connection.app_id})
            connection.close(WS_INTERNAL_ERROR if connection.close_code is None else connection.close_code,
                             "write failed")
        finally:
            done.set()

    async def _send_close(self, connection: Connection, send: Send) -> None:
        """The close frame goes out before cleanup: cleanup (engine stops, callbacks) may take seconds,
        and a client must learn the server's close code (1008, 1009, 1013, 1001...) without waiting."""
        with anyio.move_on_after(CLOSE_FRAME_TIMEOUT):
            try:
                await send({"type": "websocket.close", "code": connection.close_code or 1000,
                            "reason": connection.close_reason})
            except Exception:  # the peer may vanish mid-close; cleanup goes on regardless
                logger.debug("close frame to %s not delivered", connection.app_id, exc_info=True)

    async def _keepalive(self, connection: Connection) -> None:
        interval = self.runtime.config.ping_interval
        allowed_misses = self.runtime.config.missed_pongs
        encoder = self.runtime.encoder
        while True:
            await anyio.sleep(interval)
            if len(connection.unanswered_pings) >= allowed_misses:
                connection.force_close(WS_INTERNAL_ERROR, "server pings unanswered",
                                       missed=len(connection.unanswered_pings))
                return
            message_id = new_message_id()
            connection.unanswered_pings[message_id] = time.monotonic()
            try:
                await connection.send(encoder.frame("server_ping", message_id, ServerPingData(timestamp=utcnow()),
                                                    server_initiated=True))
            except AppDisconnected:
                return
