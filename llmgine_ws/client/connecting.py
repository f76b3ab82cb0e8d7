"""Opening a client: :func:`connect`.

:func:`connect` opens the first connection (TCP, TLS, the WebSocket handshake: :mod:`.handshake`),
starts the client's tasks (:mod:`.session`) in a task group of its own, yields the
:class:`~.connection.Client` and, when its block is left, closes the connection and cancels them.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio

from .connection import Client
from .errors import RequestTimeout
from .handshake import Headers, open_transport
from .resume import Reconnect
from .transport import Transport

__all__ = ["connect"]


@asynccontextmanager
async def connect(
    url: str,
    *,
    headers: Headers | None = None,
    subprotocols: Sequence[str] = (),
    ssl_context: ssl.SSLContext | None = None,
    open_timeout: float = 10.0,
    request_timeout: float = 30.0,
    max_message_size: int = 16 * 1024 * 1024,
    wait_connected: bool = True,
    auto_pong: bool = True,
    close_timeout: float = 5.0,
    inbox_limit: int = 10_000,
    max_queue: int = 10_000,
    rate_limit_retries: int = 3,
    resume: bool = True,
    reconnect: Reconnect | None = None,
    ack_interval: float = 1.0,
    ack_frames: int = 64,
    ping_interval: float | None = 20.0,
    ping_timeout: float = 20.0,
) -> AsyncIterator[Client]:
    """Connect to an llmgine_ws server and yield a :class:`Client`.

    Leaving the context closes the connection (close frame 1000, waiting at most
    ``close_timeout`` for the server's close frame) and cancels the client's tasks (running
    handlers included). Code 1000 is a goodbye: the server ends the app at once.

    With ``resume`` (the default) and a server that keeps apps resumable (its ``connected`` has a
    ``resume_token``), a dropped connection is reopened and the app resumed: sessions, engines,
    running commands, pending requests and questions survive, and every message arrives once, in
    order. See ``docs/python-client.md``, "Lost connections and resume".

    Args:
        url: a ``ws://`` or ``wss://`` URL, with path and query string (the server's endpoint is
            ``/api/ws``, under the mount path when mounted in another app).
        headers: extra HTTP headers for the opening handshake (e.g. ``Authorization``).
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
        max_queue: messages received but not yet delivered (beyond it the client stops reading the
            socket), and events a :class:`Command` may hold unread (beyond it the command is
            cancelled and its iteration raises).
        rate_limit_retries: times a request refused with ``RATE_LIMITED`` is sent again after the
            server's ``retry_after``; 0 turns backing off off.
        resume: ack what arrives and resume the app after a drop (when the server offers it);
            ``False`` behaves like a client that never heard of resume (no acks, no reconnect: a
            drop ends the client and the server cleans the app up at once).
        reconnect: the backoff of reconnections (:class:`Reconnect`: delays, jitter, attempts, time).
        ack_interval: seconds between acks while something is unacked.
        ack_frames: frames received after which an ack is sent at once.
        ping_interval: seconds between WebSocket pings that check the connection is alive
            (``None`` or 0: no heartbeat).
        ping_timeout: a connection that sends nothing for this long after a ping is lost (1006),
            which a resumable client resumes from.

    Raises:
        HandshakeRejected: the server answered the handshake with an HTTP error status.
        ConnectionClosed: the server closed the connection before ``connected``.
        RequestTimeout: the connection could not be opened within ``open_timeout``.
        ClientError: the handshake response was not a valid WebSocket upgrade.
        OSError: the TCP (or TLS) connection failed.
        ValueError: the URL is not a ``ws://``/``wss://`` URL.
    """
    async def opener() -> Transport:
        return await open_transport(url, headers=headers, subprotocols=subprotocols, ssl_context=ssl_context,
                                    max_message_size=max_message_size, close_timeout=close_timeout)

    deadline = anyio.current_time() + open_timeout
    with anyio.move_on_after(open_timeout) as open_scope:
        transport = await opener()
    if open_scope.cancelled_caught:
        raise RequestTimeout(f"timed out opening {url!r}")

    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        client = Client(transport, tg, request_timeout=request_timeout, wait_connected=wait_connected,
                        auto_pong=auto_pong, inbox_limit=inbox_limit, max_queue=max_queue,
                        rate_limit_retries=rate_limit_retries, opener=opener, open_timeout=open_timeout,
                        resume=resume, reconnect=reconnect, ack_interval=ack_interval, ack_frames=ack_frames,
                        ping_interval=ping_interval, ping_timeout=ping_timeout)
        session = client._session  # the connection under the client: connect() runs its tasks
        session.start()
        try:
            if wait_connected:
                await session.await_connected(deadline)
            session.start_delivery()
            yield client
        except Exception as exc:
            # Re-raised below, outside the task group, so that callers see their own exception
            # rather than an ExceptionGroup.
            error = exc
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await client.close()
                await client.transport.abort()
            session.finish()  # when the delivery task was cancelled before it could
            tg.cancel_scope.cancel()
    if error is not None:
        raise error
