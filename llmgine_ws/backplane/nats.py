"""The NATS backplane: NATS core pub/sub through ``nats-py`` (``pip install 'llmgine-ws[nats]'``).

Guarantees (NATS core): at-most-once; messages from one connection to one subject reach each
subscriber in order; nothing is stored for a subscriber that is disconnected. The largest message is
the server's ``max_payload`` (1 MiB by default; raise it in ``nats-server.conf``), read at connect.

Reconnection is nats-py's own (forever, every ``reconnect_wait`` seconds; subscriptions are
re-established by the client). Unlike nats-py's default, nothing is buffered while disconnected:
:meth:`NatsBackplane.publish` raises :class:`~llmgine_ws.errors.BackplaneUnavailable` instead.
asyncio only (nats-py is an asyncio library), which is what uvicorn runs.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from ..errors import BackplaneUnavailable, MessageTooLarge
from . import Backplane, MessageHandler, StateHandler, redact

logger = logging.getLogger("llmgine_ws.backplane.nats")


class NatsBackplane(Backplane):
    """One node's connection to a NATS server (or cluster: give several URLs separated by commas)."""

    kind = "nats"

    def __init__(
        self,
        url: str,
        *,
        reconnect_wait: float = 0.5,
        connect_timeout: float = 2.0,
        ping_interval: float = 5.0,
        name: str | None = None,
    ) -> None:
        self.url = url
        self.servers = [part.strip() for part in url.split(",") if part.strip()]
        self.reconnect_wait = reconnect_wait
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.name = name or f"llmgine_ws@{socket.gethostname()}:{os.getpid()}"
        self._client: NatsClient | None = None
        self._up = False

    @property
    def connected(self) -> bool:
        """See :attr:`Backplane.connected`."""
        client = self._client
        return self._up and client is not None and client.is_connected

    @property
    def max_payload(self) -> int:
        """The server's ``max_payload`` (0 while not connected)."""
        client = self._client
        return int(client.max_payload) if client is not None and client.is_connected else 0

    def describe(self) -> str:
        """See :meth:`Backplane.describe`."""
        return ",".join(redact(server) for server in self.servers)

    async def run(
        self,
        subjects: Sequence[str],
        on_message: MessageHandler,
        on_state: StateHandler,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """See :meth:`Backplane.run`."""
        task_status.started()
        failures = 0
        while True:
            closed = anyio.Event()

            def set_state(up: bool) -> None:
                if up != self._up:
                    self._up = up
                    on_state(up)

            async def disconnected() -> None:
                if self._up:
                    logger.warning("NATS backplane %s: connection lost; reconnecting", self.describe())
                set_state(False)

            async def reconnected() -> None:
                logger.warning("NATS backplane %s: reconnected", self.describe())
                set_state(True)

            async def closed_cb(closed: anyio.Event = closed) -> None:
                closed.set()

            async def error_cb(exc: Exception) -> None:
                logger.debug("NATS backplane %s: %r", self.describe(), exc)

            client = NatsClient()
            try:
                await client.connect(
                    servers=self.servers,
                    name=self.name,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=self.reconnect_wait,  # type: ignore[arg-type]
                    connect_timeout=self.connect_timeout,  # type: ignore[arg-type]
                    ping_interval=self.ping_interval,  # type: ignore[arg-type]
                    max_outstanding_pings=2,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    closed_cb=closed_cb,
                    error_cb=error_cb,
                )
            except Exception as exc:
                failures += 1
                if failures == 1:
                    logger.warning("NATS backplane %s: cannot connect (%s); retrying every %.1fs",
                                   self.describe(), exc or type(exc).__name__, self.reconnect_wait)
                await _close_quietly(client)
                await anyio.sleep(self.reconnect_wait)
                continue
            try:
                self._client = client
                for subject in subjects:
                    await client.subscribe(subject, cb=_callback(on_message))
                await client.flush(timeout=self.connect_timeout)  # type: ignore[arg-type]
                if failures:
                    logger.warning("NATS backplane %s: connected after %d failed attempt(s)", self.describe(),
                                   failures)
                else:
                    logger.info("NATS backplane %s: connected", self.describe())
                failures = 0
                set_state(True)
                await closed.wait()  # nats-py reconnects by itself; it only closes for good on fatal errors
                logger.error("NATS backplane %s: connection closed; starting over", self.describe())
            except Exception as exc:
                logger.warning("NATS backplane %s: subscribing failed (%r); starting over", self.describe(), exc)
            finally:
                set_state(False)
                self._client = None
                with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                    await _close_quietly(client)
            await anyio.sleep(self.reconnect_wait)

    async def publish(self, subject: str, payload: bytes) -> None:
        """See :meth:`Backplane.publish`."""
        client = self._client
        if client is None or not self._up or not client.is_connected:
            raise BackplaneUnavailable(f"not connected to NATS at {self.describe()}")
        if len(payload) > client.max_payload:
            raise MessageTooLarge(len(payload), int(client.max_payload), self.kind)
        try:
            await client.publish(subject, payload)
        except nats.errors.MaxPayloadError:
            raise MessageTooLarge(len(payload), int(client.max_payload), self.kind) from None
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
                nats.errors.OutboundBufferLimitError, OSError) as exc:
            raise BackplaneUnavailable(f"NATS publish failed: {exc!r}") from None


def _callback(on_message: MessageHandler) -> Any:
    async def deliver(msg: Msg) -> None:
        try:
            on_message(msg.subject, msg.data)
        except Exception:
            logger.exception("NATS backplane: handling a message on %s failed", msg.subject)

    return deliver


async def _close_quietly(client: NatsClient) -> None:
    try:
        await client.close()
    except Exception:
        logger.debug("NATS backplane: close failed", exc_info=True)


__all__ = ["NatsBackplane"]
