"""The WebSocket endpoint: one reader, one writer and a keepalive per connection.

The reader decodes and dispatches each frame (:mod:`llmgine_ws.dispatch`) and never waits on a
handler; the writer is the only task that writes to the socket; both live in the connection's task
group together with the handlers, so closing the connection cancels all of them at once.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
from starlette.endpoints import WebSocketEndpoint
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketState

from .connection import WS_INTERNAL_ERROR, WS_MESSAGE_TOO_BIG, CloseRequest, Connection
from .errors import AppDisconnected, ErrorCode, ProtocolError
from .outbox import OutboxClosed
from .protocol import ServerPingData, new_message_id, utcnow
from .runtime import Runtime

logger = logging.getLogger("llmgine_ws.endpoint")

BINARY_FRAME_ERROR = ProtocolError(
    ErrorCode.WEBSOCKET_ERROR, "binary frames are not accepted: send each message as a JSON text frame",
    {"frame": "binary"},
)


class MessageEndpoint(WebSocketEndpoint):
    """Serves one WebSocket connection for a :class:`Runtime`.

    Mounted by :func:`llmgine_ws.create_app` as ``partial(MessageEndpoint, runtime=...)``.
    """

    encoding = None

    def __init__(self, scope: Scope, receive: Receive, send: Send, *, runtime: Runtime) -> None:
        super().__init__(scope, receive, send)
        self.runtime = runtime
        self.connection: Connection | None = None

    async def dispatch(self) -> None:
        """Handshake, then read/write/keepalive until either side closes, then clean up."""
        websocket = WebSocket(self.scope, receive=self.receive, send=self.send)
        await self.on_connect(websocket)
        connection = self.connection
        if connection is None:
            return
        try:
            async with anyio.create_task_group() as tg:
                connection.attach(tg)
                tg.start_soon(self._write, websocket, connection)
                if self.runtime.config.ping_interval > 0:
                    tg.start_soon(self._keepalive, connection)
                tg.start_soon(self.runtime.on_connected, connection)
                await self._read(websocket, connection)
                self.runtime.connection_lost(connection)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.on_disconnect(websocket, connection.close_code or 1000)

    async def on_connect(self, websocket: WebSocket) -> None:
        """Accept and register the connection (or refuse it)."""
        self.connection = await self.runtime.open_connection(websocket)

    async def on_receive(self, websocket: WebSocket, data: Any) -> None:
        """One frame from the client: decode once, dispatch, never wait on the handler."""
        assert self.connection is not None
        if isinstance(data, str):
            self.runtime.dispatcher.dispatch(self.connection, data)
        else:
            self.connection.send_soon(self.runtime.encoder.error(None, BINARY_FRAME_ERROR))

    async def on_disconnect(self, websocket: WebSocket, close_code: int) -> None:
        """Finish the closing handshake, then clean up everything the connection owned.

        The close frame goes first: cleanup (engine stops, callbacks) may take seconds, and a client
        must learn the server's close code (1008, 1009, 1013, 1001...) without waiting for it.
        """
        connection = self.connection
        assert connection is not None
        self.runtime.connection_lost(connection)  # waiters fail now, not after the close frame
        connected = WebSocketState.CONNECTED
        if websocket.client_state == connected and websocket.application_state == connected:
            with anyio.move_on_after(1.0):
                try:
                    await websocket.close(code=close_code, reason=connection.close_reason)
                except Exception:  # the peer may vanish mid-close; cleanup goes on regardless
                    logger.debug("close frame to %s not delivered", connection.app_id, exc_info=True)
        await self.runtime.close_connection(connection)

    async def _read(self, websocket: WebSocket, connection: Connection) -> None:
        max_size = self.runtime.config.max_message_size
        receive = self.receive
        dispatch = self.runtime.dispatcher.dispatch
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                if connection.close_code is None:
                    connection.close_code = int(message.get("code") or 1005)
                return
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
                return
            if text is not None:
                dispatch(connection, text)  # the hot path: no coroutine, no await
            elif self.runtime.dispatcher.admit(connection, None):
                await self.on_receive(websocket, message.get("bytes"))

    async def _write(self, websocket: WebSocket, connection: Connection) -> None:
        send = self.send
        outbox = connection.outbox
        try:
            while True:
                item = await outbox.get()
                if isinstance(item, CloseRequest):
                    connection.close(item.code, item.reason)
                    return
                await send({"type": "websocket.send", "text": item})
        except OutboxClosed:
            return
        except Exception as exc:  # the transport is gone: treat as a disconnect
            logger.debug("write to %s failed: %r", connection.app_id, exc, extra={"app_id": connection.app_id})
            connection.close(WS_INTERNAL_ERROR if connection.close_code is None else connection.close_code,
                             "write failed")

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
