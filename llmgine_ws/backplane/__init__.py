"""Backplanes: the message broker that connects the nodes (processes) of a cluster.

A :class:`Backplane` is a thin, uniform transport — publish bytes to a subject, receive the
subjects a node subscribed to — over a proven broker:

* :class:`~llmgine_ws.backplane.memory.MemoryBackplane` — in-process (one process, zero setup; also
  how several apps in one process, e.g. tests, form a cluster through a shared
  :class:`~llmgine_ws.backplane.memory.MemoryBroker`);
* :class:`~llmgine_ws.backplane.nats.NatsBackplane` — NATS core pub/sub (``pip install llmgine-ws[nats]``);
* :class:`~llmgine_ws.backplane.redis.RedisBackplane` — Redis pub/sub (``pip install llmgine-ws[redis]``).

Everything above the transport — presence, heartbeats, request/reply, fan-out with acknowledgements —
is implemented once, in :class:`~llmgine_ws.backplane.cluster.ClusterRouter`, so every backplane
behaves the same way (one conformance suite runs against all three).

Selecting one: ``LLMGINE_API_BACKPLANE`` / ``APIConfig.backplane`` is ``memory`` (the default: no
cluster, the process routes locally), ``nats://host:4222`` (or ``tls://``) or ``redis://host:6379/0``
(or ``rediss://``). See ``docs/scaling.md``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import ClassVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.abc

from ..config import BACKPLANE_SCHEMES, ConfigError, backplane_kind

MessageHandler = Callable[[str, bytes], None]
"""Called with ``(subject, payload)`` for each message received, in arrival order per subject.

It must not block: it runs on the backplane's receive path.
"""

StateHandler = Callable[[bool], None]
"""Called with ``True`` once connected *and* subscribed, ``False`` when the connection is lost."""

class Backplane(abc.ABC):
    """A connection of one node to the cluster's message broker.

    Contract (checked by the conformance suite in ``tests/test_cluster_conformance.py``):

    * :meth:`run` connects, subscribes to the given subjects, reports the state through
      ``on_state`` and hands every message to ``on_message``; it reconnects by itself, forever, until
      cancelled. It signals ``task_status.started()`` at once, without waiting for the broker, so a
      server starts (and serves its local connections) while the broker is down.
    * :meth:`publish` is at-most-once: it raises :class:`~llmgine_ws.errors.BackplaneUnavailable`
      when not connected (never buffers silently) and :class:`~llmgine_ws.errors.MessageTooLarge`
      past :attr:`max_payload`. Messages one task publishes to one subject arrive in order.
    """

    kind: ClassVar[str]
    """``memory``, ``nats`` or ``redis``."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """Whether the broker connection is up and subscribed."""

    @property
    @abc.abstractmethod
    def max_payload(self) -> int:
        """The largest message (bytes) :meth:`publish` accepts right now."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where this backplane connects, for logs and health output (never with credentials)."""

    @abc.abstractmethod
    async def run(
        self,
        subjects: Sequence[str],
        on_message: MessageHandler,
        on_state: StateHandler,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Stay connected and subscribed to ``subjects`` until cancelled (see the class docstring)."""

    @abc.abstractmethod
    async def publish(self, subject: str, payload: bytes) -> None:
        """Send ``payload`` to every current subscriber of ``subject`` (at most once)."""

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish several messages in order (a backplane may batch them into one round trip).

        Raises like :meth:`publish` at the first failure (later messages are then not sent).
        """
        for subject, payload in messages:
            await self.publish(subject, payload)


def backplane_from_url(url: str) -> Backplane | None:
    """The backplane an ``LLMGINE_API_BACKPLANE`` value names; ``None`` for ``memory`` (no cluster).

    Raises :class:`~llmgine_ws.config.ConfigError` for an unknown scheme or a missing extra.
    """
    kind = backplane_kind(url)
    if kind == "memory":
        return None
    if kind == "nats":
        try:
            from .nats import NatsBackplane
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ConfigError(f"LLMGINE_API_BACKPLANE={redact(url)!r} needs the NATS client: "
                              f"pip install 'llmgine-ws[nats]' ({exc})") from None
        return NatsBackplane(url)
    try:
        from .redis import RedisBackplane
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ConfigError(f"LLMGINE_API_BACKPLANE={redact(url)!r} needs the Redis client: "
                          f"pip install 'llmgine-ws[redis]' ({exc})") from None
    return RedisBackplane(url)


def redact(url: str) -> str:
    """``url`` without a password (for logs and health output)."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


__all__ = ["BACKPLANE_SCHEMES", "Backplane", "MessageHandler", "StateHandler", "backplane_from_url", "backplane_kind",
           "redact"]
