"""Opening a WebSocket connection: TCP (or TLS) over anyio, then the HTTP upgrade through wsproto."""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.utilities import RemoteProtocolError

from .errors import ClientError, ConnectionClosed, HandshakeRejected
from .transport import CLOSE_ABNORMAL, RECEIVE_CHUNK, Transport

__all__ = ["Headers", "open_transport"]

Headers = Mapping[str, str] | Sequence[tuple[str, str]]
"""Extra HTTP headers for the opening handshake: a mapping or ``(name, value)`` pairs."""


async def open_transport(
    url: str,
    *,
    headers: Headers | None = None,
    subprotocols: Sequence[str] = (),
    ssl_context: ssl.SSLContext | None = None,
    max_message_size: int,
    close_timeout: float,
) -> Transport:
    """Connect to ``url`` (``ws://`` or ``wss://``) and complete the opening handshake.

    Raises:
        ValueError: the URL is not a ``ws://``/``wss://`` URL with a host.
        OSError: the TCP (or TLS) connection failed.
        HandshakeRejected: the server answered with an HTTP status other than 101.
        ConnectionClosed: the server closed the connection during the handshake.
        ClientError: the response was not a valid WebSocket upgrade.
    """
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
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = f"[{host}]" if ":" in host else host
    if port != default_port:
        host_header += f":{port}"

    stream: anyio.abc.ByteStream
    if secure:
        stream = await anyio.connect_tcp(host, port, tls=True, ssl_context=ssl_context or ssl.create_default_context(),
                                         tls_hostname=host, tls_standard_compatible=False)
    else:
        stream = await anyio.connect_tcp(host, port)
    try:
        ws = WSConnection(ConnectionType.CLIENT)
        request = Request(host=host_header, target=target, extra_headers=_encode_headers(headers),
                          subprotocols=list(subprotocols))
        await stream.send(ws.send(request))
        subprotocol = await _read_response(stream, ws, max_message_size)
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise
    return Transport(stream, ws, subprotocol=subprotocol, max_message_size=max_message_size,
                     close_timeout=close_timeout)


async def _read_response(stream: anyio.abc.ByteStream, ws: WSConnection, max_body: int) -> str | None:
    """Read the handshake response; return the accepted subprotocol or raise what went wrong."""
    rejection: RejectConnection | None = None
    body = bytearray()
    while True:
        try:
            data: bytes | None = await stream.receive(RECEIVE_CHUNK)
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            data = None
        try:
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    return event.subprotocol  # frames after it stay buffered in wsproto
                if isinstance(event, RejectConnection):
                    rejection = event
                    if not event.has_body:
                        raise _rejected(event, b"")
                elif isinstance(event, RejectData):
                    if len(body) < max_body:
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
            raise ConnectionClosed(CLOSE_ABNORMAL, "connection closed during the opening handshake")


def _encode_headers(headers: Headers | None) -> list[tuple[bytes, bytes]]:
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in items]


def _rejected(event: RejectConnection, body: bytes) -> HandshakeRejected:
    headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers]
    return HandshakeRejected(event.status_code, headers, body)
