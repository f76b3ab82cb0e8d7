"""The Redis backplane: Redis pub/sub through ``redis.asyncio`` (``pip install 'llmgine-ws[redis]'``).

Guarantees (Redis pub/sub): at-most-once; messages one client connection publishes reach each
subscriber in order (Redis executes commands one at a time); nothing is kept for a subscriber that
is disconnected. Redis itself accepts values up to 512 MB, but a subscriber more than 8 MB behind
is disconnected by the default ``client-output-buffer-limit pubsub 32mb 8mb 60``, so the backplane
refuses messages over ``max_payload`` (8 MiB by default; ``?max_payload=`` in the URL changes it).

The backplane keeps one subscriber connection and a small pool for publishing, and reconnects both
by itself (every ``reconnect_wait`` seconds) after an outage; redis-py's silent retries are turned
off so that a publish during an outage fails at once with
:class:`~llmgine_ws.errors.BackplaneUnavailable`. asyncio only (as uvicorn).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import anyio.abc
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..errors import BackplaneUnavailable, MessageTooLarge
from . import Backplane, MessageHandler, StateHandler, redact

logger = logging.getLogger("llmgine_ws.backplane.redis")

DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024

_CONNECTION_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, EOFError)


class RedisBackplane(Backplane):
    """One node's connection to a Redis server (``redis://[:password@]host:port/db``)."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        reconnect_wait: float = 0.5,
        connect_timeout: float = 2.0,
        publish_timeout: float = 5.0,
        max_payload: int | None = None,
        name: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        payload_limit = query.pop("max_payload", None)
        self.url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))
        self._max_payload = max_payload or (int(payload_limit) if payload_limit else DEFAULT_MAX_PAYLOAD)
        self.reconnect_wait = reconnect_wait
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self.name = name or f"llmgine_ws@{socket.gethostname()}:{os.getpid()}"
        self._publisher: aioredis.Redis | None = None
        self._up = False

    @property
    def connected(self) -> bool:
        """See :attr:`Backplane.connected`."""
        return self._up and self._publisher is not None

    @property
    def max_payload(self) -> int:
        """See :attr:`Backplane.max_payload`."""
        return self._max_payload

    def describe(self) -> str:
        """See :meth:`Backplane.describe`."""
        return redact(self.url)

    def _client(self, socket_timeout: float | None) -> aioredis.Redis:
        client: aioredis.Redis = aioredis.Redis.from_url(
            self.url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=self.connect_timeout,
            retry=Retry(NoBackoff(), 0),
            client_name=self.name.replace(" ", "_"),
        )
        return client

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
        # A publish-only node still holds a subscription, so that losing the broker is noticed.
        subjects = list(subjects) or [f"_llmgine_ws.idle.{uuid.uuid4().hex}"]
        failures = 0
        while True:
            subscriber = self._client(socket_timeout=None)
            publisher = self._client(socket_timeout=self.publish_timeout)
            pubsub: Any = subscriber.pubsub()
            try:
                await pubsub.subscribe(*subjects)
                confirmed = 0
                while confirmed < len(subjects):
                    message = await pubsub.get_message(timeout=self.connect_timeout)
                    if message is None:
                        raise TimeoutError("no subscription confirmation from Redis")
                    if message["type"] == "subscribe":
                        confirmed += 1
                await publisher.ping()
                self._publisher = publisher
                self._up = True
                if failures:
                    logger.warning("Redis backplane %s: connected after %d failed attempt(s)", self.describe(),
                                   failures)
                else:
                    logger.info("Redis backplane %s: connected", self.describe())
                failures = 0
                on_state(True)
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None or message["type"] != "message":
                        continue
                    channel = message["channel"]
                    try:
                        on_message(channel.decode() if isinstance(channel, bytes) else channel, message["data"])
                    except Exception:
                        logger.exception("Redis backplane: handling a message on %s failed", channel)
            except _CONNECTION_ERRORS as exc:
                if self._up:
                    logger.warning("Redis backplane %s: connection lost (%s); reconnecting", self.describe(),
                                   exc or type(exc).__name__)
                else:
                    failures += 1
                    if failures == 1:
                        logger.warning("Redis backplane %s: cannot connect (%s); retrying every %.1fs",
                                       self.describe(), exc or type(exc).__name__, self.reconnect_wait)
            except Exception:
                failures += 1
                logger.exception("Redis backplane %s: unexpected error; reconnecting", self.describe())
            finally:
                was_up = self._up
                self._up = False
                self._publisher = None
                if was_up:
                    on_state(False)
                with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                    for close in (pubsub.aclose, subscriber.aclose, publisher.aclose):
                        try:
                            await close()
                        except Exception:
                            logger.debug("Redis backplane: close failed", exc_info=True)
            await anyio.sleep(self.reconnect_wait)

    async def publish(self, subject: str, payload: bytes) -> None:
        """See :meth:`Backplane.publish`."""
        publisher = self._publisher
        if publisher is None or not self._up:
            raise BackplaneUnavailable(f"not connected to Redis at {self.describe()}")
        if len(payload) > self._max_payload:
            raise MessageTooLarge(len(payload), self._max_payload, self.kind)
        try:
            await publisher.publish(subject, payload)
        except _CONNECTION_ERRORS as exc:
            raise BackplaneUnavailable(f"Redis publish failed: {exc!r}") from None

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """One pipelined round trip for the lot (in order, on one connection)."""
        if len(messages) == 1:
            await self.publish(*messages[0])
            return
        publisher = self._publisher
        if publisher is None or not self._up:
            raise BackplaneUnavailable(f"not connected to Redis at {self.describe()}")
        for _, payload in messages:
            if len(payload) > self._max_payload:
                raise MessageTooLarge(len(payload), self._max_payload, self.kind)
        try:
            async with publisher.pipeline(transaction=False) as pipe:
                for subject, payload in messages:
                    pipe.publish(subject, payload)
                await pipe.execute()
        except _CONNECTION_ERRORS as exc:
            raise BackplaneUnavailable(f"Redis publish failed: {exc!r}") from None


__all__ = ["RedisBackplane"]
