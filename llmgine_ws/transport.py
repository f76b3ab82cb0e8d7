"""Transport guards: what a client can hold below the WebSocket protocol, bounded (issue 10).

uvicorn parses HTTP and WebSocket frames before the app sees anything, and a few of its paths have no
bound a client cannot push past: a connection that never finishes its request headers is held forever
(slowloris), a request's headers may grow without an answer, every PING frame is answered with a PONG
written whatever the client reads (a non-reading client's PING storm grows the write buffer without
limit), and a connection whose app has finished is closed by flushing a buffer a non-reading client
never drains. The protocol classes here add those bounds on top of uvicorn's own implementations:

* :class:`GuardedHttpProtocol` (httptools): each request's headers must be complete within
  ``handshake_timeout`` seconds (408) and within ``max_header_bytes`` (431); one address may hold at most
  ``max_connections_per_ip`` connections that have not become WebSockets yet (429; addresses in
  ``trusted_proxies`` are exempt: every client comes through them).
* :class:`GuardedWebSocketProtocol` (websockets' sans-I/O implementation): PONGs are flow-controlled
  (the server stops reading while its write buffer is over the transport's high-water mark, so a PING
  storm is paced by the client's own reading); a connection whose app has finished, that uvicorn shut
  down, or that missed its keepalive is aborted if its buffer has not drained within ``CLOSE_TIMEOUT``
  seconds, or as soon as the client has sent more than a frame's worth after the close frame;
  invalid UTF-8 closes with 1007 without a traceback; refused handshakes do not log an ERROR.

The CLI serves with them (:func:`uvicorn_options`). With plain uvicorn pass
``--http llmgine_ws.transport:GuardedHttpProtocol --ws llmgine_ws.transport:GuardedWebSocketProtocol``
(limits then come from the ``LLMGINE_API_*`` variables).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from typing import Any

import msgspec
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from .config import APIConfig

logger = logging.getLogger("llmgine_ws.transport")

CLOSE_TIMEOUT = 5.0
"""Seconds a closing WebSocket transport may take to flush before it is aborted."""
UVICORN_GRACEFUL_TIMEOUT = 2
"""uvicorn's own graceful-shutdown timeout under the CLI: by the time uvicorn shuts down, the app has
already drained and closed every connection (``drain_timeout`` + ``shutdown_timeout``)."""


class TransportLimits(msgspec.Struct, frozen=True, kw_only=True):
    """The transport bounds of one server (taken from an :class:`APIConfig`)."""

    handshake_timeout: float = 10.0
    max_header_bytes: int = 16 * 1024
    max_pending_per_ip: int = 100
    trusted_proxies: tuple[str, ...] = ()
    close_timeout: float = CLOSE_TIMEOUT

    @classmethod
    def from_config(cls, config: APIConfig) -> TransportLimits:
        """The limits ``config`` sets."""
        return cls(handshake_timeout=config.handshake_timeout, max_header_bytes=config.max_header_bytes,
                   max_pending_per_ip=config.max_connections_per_ip, trusted_proxies=tuple(config.trusted_proxies))


class _ServerGuard:
    """State shared by every connection of one uvicorn server: its limits and the connections of each
    address still in their HTTP phase."""

    def __init__(self, limits: TransportLimits) -> None:
        self.limits = limits
        self._trusted = [ipaddress.ip_network(proxy, strict=False) for proxy in limits.trusted_proxies]
        self._pending: dict[str, int] = {}

    @classmethod
    def of(cls, server_state: ServerState, limits: TransportLimits | None) -> _ServerGuard:
        """The guard of the server ``server_state`` belongs to (made by its first connection)."""
        guard: _ServerGuard | None = getattr(server_state, "llmgine_transport_guard", None)
        if guard is None:
            guard = cls(limits if limits is not None else TransportLimits.from_config(APIConfig.from_env()))
            server_state.llmgine_transport_guard = guard  # type: ignore[attr-defined]
        return guard

    def admit(self, address: str | None) -> bool:
        """Count one more HTTP-phase connection from ``address``; False (nothing counted) past the cap."""
        if address is None or self._exempt(address):
            return True
        held = self._pending.get(address, 0)
        if held >= self.limits.max_pending_per_ip:
            return False
        self._pending[address] = held + 1
        return True

    def release(self, address: str | None) -> None:
        """Count one HTTP-phase connection from ``address`` out."""
        if address is None or address not in self._pending:
            return
        remaining = self._pending[address] - 1
        if remaining > 0:
            self._pending[address] = remaining
        else:
            del self._pending[address]

    def _exempt(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._trusted)


def _http_error(status: bytes) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size limit on each request's headers, and a
    per-address cap on connections that have not become WebSockets."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, limits: TransportLimits | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._guard = _ServerGuard.of(server_state, limits)
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._awaiting_headers = False
        self._counted: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Count the connection under its address's cap (or refuse it: 429) and arm the header deadline."""
        super().connection_made(transport)
        address = self.client[0] if self.client else None
        if not self._guard.admit(address):
            logger.debug("refused a connection from %s: too many unfinished handshakes", address)
            transport.write(_http_error(b"429 Too Many Requests"))
            transport.close()
            return
        self._counted = address
        self._expect_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection."""
        self._stop_deadline()
        self._release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Parse ``data``; headers still incomplete past ``max_header_bytes`` get a 431."""
        if not self._awaiting_headers:
            super().data_received(data)
            return
        self._header_bytes += len(data)
        super().data_received(data)
        if (self._awaiting_headers and self._header_bytes > self._guard.limits.max_header_bytes
                and not self.transport.is_closing()):
            self._refuse(b"431 Request Header Fields Too Large", "request headers too large")

    def on_headers_complete(self) -> None:
        """The headers arrived in time."""
        self._awaiting_headers = False
        self._stop_deadline()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        """A kept-alive connection's next request gets its own deadline."""
        super().on_response_complete()
        if not self.transport.is_closing():
            self._expect_headers()

    def handle_websocket_upgrade(self) -> None:
        """The connection becomes a WebSocket: it leaves the HTTP-phase count."""
        self._stop_deadline()
        self._release()
        super().handle_websocket_upgrade()

    def _expect_headers(self) -> None:
        self._awaiting_headers = True
        self._header_bytes = 0
        self._stop_deadline()
        self._deadline = self.loop.call_later(self._guard.limits.handshake_timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._deadline = None
        if self._awaiting_headers and not self.transport.is_closing():
            self._refuse(b"408 Request Timeout", "request headers not complete in time")

    def _refuse(self, status: bytes, why: str) -> None:
        logger.debug("closed a connection from %s: %s", self._counted, why)
        self._awaiting_headers = False
        self.transport.write(_http_error(status))
        self.transport.close()
        self.loop.call_later(self._guard.limits.close_timeout, _abort_if_open, self.transport)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _release(self) -> None:
        if self._counted is not None:
            self._guard.release(self._counted)
            self._counted = None


def _abort_if_open(transport: asyncio.Transport) -> None:
    transport.abort()  # a no-op once the connection is lost


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol with flow-controlled PONGs and closes that cannot be pinned
    by a client that stops reading."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, limits: TransportLimits | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._close_timeout = _ServerGuard.of(server_state, limits).limits.close_timeout
        self._held_for_writes = False
        self._abort_timer: asyncio.TimerHandle | None = None
        self._after_close = 0

    def data_received(self, data: bytes) -> None:
        """Parse ``data``; after the close frame went out, only a bounded amount more is read."""
        if self.close_sent and not self.disconnected:
            self._after_close += len(data)
            if self._after_close > self.config.ws_max_size + 65536:
                # The peer keeps sending instead of answering the close: every byte read now is parsed
                # only to be discarded (a flood after a 1008 kept a core busy). Done waiting.
                self.transport.abort()
                return
        super().data_received(data)

    def handle_ping(self) -> None:
        """Answer the PING; while the answers are not read, read nothing more."""
        super().handle_ping()
        if not self.writable.is_set() and not self._held_for_writes:
            self._held_for_writes = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """The client read its backlog: read again."""
        super().resume_writing()
        if self._held_for_writes:
            self._held_for_writes = False
            if not self.read_paused and not self.transport.is_closing():
                self.transport.resume_reading()

    async def receive(self) -> Any:
        """The next ASGI event (reading stays paused while PONGs wait to be read)."""
        message = await self.queue.get()
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            if not self._held_for_writes:
                self.transport.resume_reading()
        return message

    def send_receive_event_to_app(self) -> None:
        """Hand a complete message to the app; invalid UTF-8 closes 1007 (logged without a traceback)."""
        if self.curr_msg_data_type != "text" or self.close_sent:
            super().send_receive_event_to_app()
            return
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        try:
            text = data.decode()
        except UnicodeDecodeError:
            logger.info("closed a connection from %s: invalid UTF-8 in a text frame (1007)",
                        self.client[0] if self.client else None)
            self.conn.send_close(1007, "invalid UTF-8")
            self.handle_parser_exception()
            self._abort_later()
            return
        self.queue.put_nowait({"type": "websocket.receive", "text": text})
        if not self.read_paused:  # as uvicorn does: one message at a time
            self.read_paused = True
            self.transport.pause_reading()

    async def send(self, message: Any) -> None:
        """Send an ASGI event; a handshake refused with an HTTP response counts as complete."""
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True
            self._abort_later()

    async def run_asgi(self) -> None:
        """Run the app; once it has finished, the transport is gone within ``CLOSE_TIMEOUT``."""
        try:
            await super().run_asgi()
        finally:
            self._abort_later()

    def shutdown(self) -> None:
        """uvicorn's shutdown (the app has closed its connections by then): a socket whose client left
        its buffer unread is aborted at once instead of holding uvicorn's graceful timeout."""
        super().shutdown()
        if self.transport.get_write_buffer_size() and not self.disconnected:
            self.transport.abort()
        else:
            self._abort_later()

    def keepalive_timeout(self) -> None:
        """A missed keepalive PONG, bounded like any close."""
        super().keepalive_timeout()
        self._abort_later()

    def connection_lost(self, exc: Exception | None) -> None:
        """The transport is gone."""
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        super().connection_lost(exc)

    def _abort_later(self) -> None:
        if self._abort_timer is None and not self.disconnected:
            self._abort_timer = self.loop.call_later(self._close_timeout, self._abort)

    def _abort(self) -> None:
        self._abort_timer = None
        if not self.disconnected:
            logger.debug("aborted a connection from %s: its close did not complete in %.0fs",
                         self.client[0] if self.client else None, self._close_timeout)
            self.transport.abort()


def uvicorn_options(config: APIConfig, limits: TransportLimits | None = None) -> dict[str, Any]:
    """The keyword arguments of ``uvicorn.run`` / ``uvicorn.Config`` that serve an app configured by
    ``config`` with the transport bounds above (what the CLI passes); ``limits`` overrides the bounds
    taken from ``config``."""
    limits = limits or TransportLimits.from_config(config)
    ping = config.ping_interval or None
    return {
        "http": functools.partial(GuardedHttpProtocol, limits=limits),
        "ws": functools.partial(GuardedWebSocketProtocol, limits=limits),
        "lifespan": "on",
        # Client addresses are resolved by llmgine_ws itself from LLMGINE_API_TRUSTED_PROXIES; uvicorn
        # rewriting them first (it trusts 127.0.0.1 by default) would bypass that list.
        "proxy_headers": False,
        # Frames over the limit are refused by the protocol layer itself (close 1009).
        "ws_max_size": config.max_message_size,
        "ws_per_message_deflate": config.ws_per_message_deflate,
        "ws_ping_interval": ping,
        "ws_ping_timeout": ping,
        "h11_max_incomplete_event_size": config.max_header_bytes,
        "timeout_keep_alive": 5,
        # Sockets at once (WebSockets and HTTP): past it uvicorn answers 503. Each WebSocket counts as a
        # connection and a task; the app's own cap (max_connections) refuses WebSockets first.
        "limit_concurrency": config.max_connections + 256,
        "timeout_graceful_shutdown": UVICORN_GRACEFUL_TIMEOUT,
    }
