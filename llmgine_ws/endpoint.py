"""The WebSocket endpoint: one reader and one writer per socket (its link), pinged by the app's one
keepalive task (:class:`~llmgine_ws.keepalive.KeepAlive`).

The reader decodes and dispatches each frame (:mod:`llmgine_ws.dispatch`) and never waits on a
handler; the writer is the only task that writes to the socket. They live in the link's task group;
the app's handlers and engine workers live in the app's own task group (a child of the lifespan's),
so closing the app cancels all of them, while a dropped socket may leave a resumable app detached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

import anyio
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from .connection import (
    WS_GOING_AWAY,
    WS_INTERNAL_ERROR,
    WS_MESSAGE_TOO_BIG,
    WS_NORMAL,
    CloseRequest,
    Connection,
    DetachRequest,
    Link,
    LinkTasks,
    OutboundItem,
    keep_alive,
)
from .errors import ErrorCode, ProtocolError
from .keepalive import KeepAlive
from .lifecycle import LazyEvent
from .outbox import OutboxClosed
from .runtime import Runtime

logger = logging.getLogger("llmgine_ws.endpoint")

BINARY_FRAME_ERROR = ProtocolError(
    ErrorCode.WEBSOCKET_ERROR, "binary frames are not accepted: send each message as a JSON text frame",
    {"frame": "binary"},
)
DROP_CODES = frozenset({1001, 1005, 1006, 1012, 1014})
"""Close codes from the client side that are a drop (going away, no close frame, connection lost,
restart, bad gateway): a resumable app is detached. Any other (1000: goodbye; 1002, 1007, 1009…: the
client broke the protocol) ends it."""
CLOSE_FRAME_TIMEOUT = 1.0
"""How long the close frame may take to go out before cleanup goes on without it."""


class MessageEndpoint:
    """The ASGI endpoint serving every WebSocket connection of one app (mounted by ``create_app``).

    Each call owns one socket — its :class:`~llmgine_ws.connection.Link`: a reader and a writer
    (the app's keepalive task pings it). The app the socket serves runs its own task group (handlers,
    engine workers) in the lifespan's task group, so that a resumable app outlives its socket (docs/resume.md).
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handshake, then read/write/keepalive until either side closes, then clean up."""
        runtime = self.runtime
        websocket = WebSocket(scope, receive=receive, send=send)
        connection = await runtime.gate.open(websocket)
        if connection is None:
            return
        link = Link(connection)
        connection.link = link
        if runtime.adopt(connection):  # the app's task group starts with its first task, in the lifespan's
            await self._serve(link, receive, send, keepalive=runtime.keepalive)
            return
        async with anyio.create_task_group() as local:  # no lifespan: the app ends with this socket
            await local.start(runtime.host_app, connection)
            if runtime.extensions.connection_callbacks["connect"]:
                connection.spawn(runtime.on_connected, connection)
            await self._serve(link, receive, send)

    async def _serve(self, link: Link, receive: Receive, send: Send, keepalive: KeepAlive | None = None) -> None:
        runtime = self.runtime
        tg: LinkTasks
        async with (_WriterTask() if asyncio._get_running_loop() is not None else anyio.create_task_group()) as tg:
            link.task_group = tg
            writer_done = LazyEvent()
            tg.start_soon(self._write, link, send, writer_done)
            if keepalive is not None:  # the app's one pinger (in the lifespan) pings this socket too
                keepalive.add(link)
            elif runtime.config.ping_interval > 0:  # no lifespan: a task of this socket's own
                tg.start_soon(keep_alive, link, runtime.config.ping_interval, runtime.config.missed_pongs,
                              runtime.encoder)
            peer_gone = False
            ending: Connection | None = None
            try:
                peer_gone = await self._read(link, receive)
            finally:
                if keepalive is not None:
                    keepalive.discard(link)
                # An app that ends with this socket is cleaned up here once the close frame is out (its
                # task group, cancelled, winds down meanwhile: user code that does not stop in time is
                # abandoned, never holding cleanup up). A detached app is cleaned up by its own task.
                app = link.app
                if app.link is link:
                    if app.flushing and not peer_gone:  # the queued frames go out before the close
                        with anyio.CancelScope(shield=True), anyio.move_on_after(runtime.config.send_grace):
                            await writer_done.wait()
                    code = link.close_code if link.close_code is not None else WS_GOING_AWAY
                    dropped = link.lost or (peer_gone and code in DROP_CODES)  # not a goodbye (1000)
                    if app.closing or not dropped or not runtime.resumer.detach(app, code, "connection lost"):
                        ending = app
                        app.lose()
                        app.close(code, link.close_reason)
                tg.cancel_scope.cancel()
                # One shielded scope for the rest (a cancel scope costs: this runs for every socket).
                with anyio.CancelScope(shield=True):
                    if not peer_gone:
                        with anyio.move_on_after(CLOSE_FRAME_TIMEOUT):
                            await writer_done.wait()  # the close frame must not overtake a frame being written
                        if ending is not None:
                            await self._send_close(ending.close_code or WS_NORMAL, ending.close_reason, send,
                                                   ending.app_id)
                        else:
                            await self._send_close(link.close_code or WS_GOING_AWAY, link.close_reason, send,
                                                   app.app_id)
                    # (peer gone: no close frame to hold back, the writer unwinds meanwhile)
                    link.released.set()
                    if ending is not None:  # an app that ends with its socket is cleaned up here, as in the seed
                        await runtime.close_connection(ending)

    async def _read(self, link: Link, receive: Receive) -> bool:
        """Read until the client leaves (True) or the socket starts closing (False)."""
        max_size = self.runtime.config.max_message_size
        dispatcher = self.runtime.dispatcher
        dispatch = dispatcher.dispatch
        message: Message | None
        text: str | None
        while True:
            message = text = None  # an idle connection keeps no reference to the last frame it read
            message = await receive()
            kind = message["type"]
            connection = link.app  # changes when this socket resumes another app
            if kind == "websocket.disconnect":
                code = int(message.get("code") or 1005)
                if link.close_code is None:
                    link.close_code = code
                if connection.close_code is None and connection.link is link:
                    connection.close_code = code
                return True
            if connection.closing or link.close_code is not None:
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
                proxy = connection.proxy
                if proxy is None:
                    dispatch(connection, text)  # the hot path: no coroutine, no await
                else:
                    await proxy.forward(text)  # the app lives on another node (cluster resume)
            elif dispatcher.within_rate_limit(connection, None):
                connection.send_soon(self.runtime.encoder.error(None, BINARY_FRAME_ERROR))

    async def _write(self, link: Link, send: Send, done: LazyEvent) -> None:
        connection = link.app
        item: OutboundItem | None
        try:
            while True:
                connection = link.app
                outbox = connection.outbox
                try:
                    preamble = link.preamble
                    while preamble:  # a resume's answer and replay, before the app's live frames
                        await send({"type": "websocket.send", "text": preamble[0]})
                        preamble.popleft()
                    while True:
                        item = await outbox.get()
                        if isinstance(item, CloseRequest):
                            if isinstance(item, DetachRequest):  # drain: the app stays, resumable elsewhere
                                connection.drop_link(item.code, item.reason)
                            else:
                                connection.close(item.code, item.reason)
                            return
                        await send({"type": "websocket.send", "text": item})
                        item = None  # an idle connection keeps no reference to the last frame it wrote
                except OutboxClosed:
                    if link.app is connection:
                        return
                    # this socket now serves the app it resumed: go on with that app's frames
        except Exception as exc:  # the transport is gone: treat as a disconnect
            logger.debug("write to %s failed: %r", connection.app_id, exc, extra={"app_id": connection.app_id})
            code = WS_INTERNAL_ERROR if connection.close_code is None else connection.close_code
            lost = connection.on_link_lost
            if connection.link is link and not (lost is not None and lost(connection, code, "write failed")):
                connection.close(code, "write failed")  # not resumable: the app ends with its socket
        finally:
            done.set()

    async def _send_close(self, code: int, reason: str, send: Send, app_id: str) -> None:
        """The close frame goes out before cleanup: cleanup (engine stops, callbacks) may take seconds,
        and a client must learn the server's close code (1008, 1009, 1013, 1001...) without waiting."""
        with anyio.move_on_after(CLOSE_FRAME_TIMEOUT):
            try:
                await send({"type": "websocket.close", "code": code, "reason": reason})
            except Exception:  # the peer may vanish mid-close; cleanup goes on regardless
                logger.debug("close frame to %s not delivered", app_id, exc_info=True)


class _WriterTask:
    """A socket's task group on asyncio: its one child (the writer) is a bare task of the endpoint's
    call, and the reader runs under one cancel scope.

    Like a task group (same parent, same end: :meth:`__aexit__` waits for the writer, cancelling it
    first if the body failed; :attr:`cancel_scope` cancels the reader and the writer), but without
    anyio's per-task handle, event and bookkeeping, which were the biggest part of a connection's own
    set-up cost (docs/performance.md). Trio gets anyio's task group.
    """

    __slots__ = ("_scope", "_task")

    def __init__(self) -> None:
        self._scope = anyio.CancelScope()
        self._task: asyncio.Task[Any] | None = None

    @property
    def cancel_scope(self) -> _WriterTask:
        """Cancelling it (:meth:`cancel`) stops the reader and the writer."""
        return self

    def cancel(self) -> None:
        """Cancel the reader (this scope) and the writer."""
        self._scope.cancel()
        if self._task is not None:
            self._task.cancel()

    def start_soon(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Start the writer (the only task this group runs)."""
        assert self._task is None
        self._task = asyncio.get_running_loop().create_task(func(*args))

    async def __aenter__(self) -> _WriterTask:
        self._scope.__enter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        task = self._task
        try:
            if task is not None and not task.done():
                if exc_type is not None:
                    task.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.wait((task,))
        finally:
            suppressed = self._scope.__exit__(exc_type, exc, tb)
        if task is not None and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]  # (the writer handles every Exception itself)
        return bool(suppressed)
