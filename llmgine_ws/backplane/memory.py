"""The in-memory backplane: a broker living in this process.

One :class:`MemoryBroker` connects the :class:`MemoryBackplane` of every app that shares it, so
several apps in one process form a cluster exactly as processes do over NATS or Redis (tests,
embedded setups). It runs on any anyio backend (asyncio and trio).

Guarantees: at-most-once, in order per publisher and subject; a subscriber whose queue
(``queue_size`` messages) is full loses the message (logged), as a slow consumer does with a real
broker. :meth:`MemoryBroker.set_available` simulates an outage.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream

from ..errors import BackplaneUnavailable, MessageTooLarge
from . import Backplane, MessageHandler, StateHandler

logger = logging.getLogger("llmgine_ws.backplane.memory")

DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024


class _Subscriber:
    __slots__ = ("name", "send", "subjects")

    def __init__(self, name: str, subjects: frozenset[str], send: MemoryObjectSendStream[tuple[str, bytes]]) -> None:
        self.name = name
        self.subjects = subjects
        self.send = send


class MemoryBroker:
    """An in-process broker. Share one between apps to cluster them; state lives on the instance."""

    def __init__(self, *, max_payload: int = DEFAULT_MAX_PAYLOAD, queue_size: int = 65536) -> None:
        self.max_payload = max_payload
        self.queue_size = queue_size
        self._subscribers: dict[str, set[_Subscriber]] = {}
        self._available = True
        self._up = anyio.Event()
        self._up.set()

    @property
    def available(self) -> bool:
        """Whether the broker accepts connections (see :meth:`set_available`)."""
        return self._available

    def set_available(self, available: bool) -> None:
        """Simulate an outage (``False``: every connection drops) or the broker coming back."""
        if available == self._available:
            return
        self._available = available
        if available:
            self._up.set()
            return
        self._up = anyio.Event()
        for subscribers in list(self._subscribers.values()):
            for subscriber in list(subscribers):
                subscriber.send.close()
        self._subscribers.clear()

    async def wait_available(self) -> None:
        """Wait until the broker accepts connections."""
        await self._up.wait()

    def subscribe(self, subscriber: _Subscriber) -> None:
        """Register a subscriber for its subjects."""
        for subject in subscriber.subjects:
            self._subscribers.setdefault(subject, set()).add(subscriber)

    def unsubscribe(self, subscriber: _Subscriber) -> None:
        """Forget a subscriber (no-op if it is already gone)."""
        for subject in subscriber.subjects:
            subscribers = self._subscribers.get(subject)
            if subscribers is not None:
                subscribers.discard(subscriber)
                if not subscribers:
                    del self._subscribers[subject]

    def publish(self, subject: str, payload: bytes) -> int:
        """Queue ``payload`` for every subscriber of ``subject``; returns how many got it."""
        if not self._available:
            raise BackplaneUnavailable("the in-memory broker is unavailable")
        delivered = 0
        for subscriber in list(self._subscribers.get(subject, ())):
            try:
                subscriber.send.send_nowait((subject, payload))
                delivered += 1
            except anyio.WouldBlock:
                logger.error("in-memory backplane: subscriber %s is %d messages behind; message on %s dropped",
                             subscriber.name, self.queue_size, subject)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass
        return delivered


class MemoryBackplane(Backplane):
    """One node's connection to a :class:`MemoryBroker` (a private broker when none is given)."""

    kind = "memory"

    def __init__(self, broker: MemoryBroker | None = None, *, name: str = "memory") -> None:
        self.broker = MemoryBroker() if broker is None else broker
        self._name = name
        self._connected = False

    @property
    def connected(self) -> bool:
        """See :attr:`Backplane.connected`."""
        return self._connected and self.broker.available

    @property
    def max_payload(self) -> int:
        """See :attr:`Backplane.max_payload`."""
        return self.broker.max_payload

    def describe(self) -> str:
        """See :meth:`Backplane.describe`."""
        return "memory"

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
        while True:
            await self.broker.wait_available()
            queue_size = self.broker.queue_size
            send, receive = anyio.create_memory_object_stream[tuple[str, bytes]](
                math.inf if queue_size <= 0 else queue_size)
            subscriber = _Subscriber(self._name, frozenset(subjects), send)
            self.broker.subscribe(subscriber)
            self._connected = True
            try:
                on_state(True)
                async with receive:
                    async for subject, payload in receive:
                        on_message(subject, payload)
            finally:
                self.broker.unsubscribe(subscriber)
                send.close()
                self._connected = False
                on_state(False)

    async def publish(self, subject: str, payload: bytes) -> None:
        """See :meth:`Backplane.publish`."""
        if not self.connected:
            raise BackplaneUnavailable("not connected to the in-memory broker")
        if len(payload) > self.broker.max_payload:
            raise MessageTooLarge(len(payload), self.broker.max_payload, self.kind)
        self.broker.publish(subject, payload)
        await anyio.lowlevel.checkpoint()
