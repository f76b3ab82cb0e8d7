"""A connection's outbound queue: bounded, FIFO, one consumer (the writer task).

It has the semantics of an anyio memory object stream of the same size — ``put_nowait`` refuses
when full, ``put`` waits for room in FIFO order, ``get`` waits for an item — but it is built for the
one place where every frame passes: an anyio stream's ``receive`` costs a checkpoint plus a
``TaskInfo`` snapshot each time the writer finds the queue empty, which measured ~20% of the
server's CPU in the 64-connection ping benchmark (see benchmarks/README.md). Here an empty-queue
wait costs one ``anyio.Event``, and a non-empty one costs nothing.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")


class OutboxClosed(Exception):
    """The outbox was closed: nothing more goes in, and the writer has finished."""


class Outbox(Generic[T]):
    """Bounded FIFO between any number of producers and one consumer."""

    __slots__ = ("_capacity", "_closed", "_item_ready", "_items", "_new_event", "_waiting_producers")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._capacity = capacity
        self._items: deque[T] = deque()
        self._item_ready: anyio.Event | None = None
        self._waiting_producers: deque[tuple[T, anyio.Event]] = deque()
        self._closed = False
        self._new_event: type[anyio.Event] | None = None

    def __len__(self) -> int:
        return len(self._items) + len(self._waiting_producers)

    @property
    def waiting(self) -> int:
        """Producers waiting for room (the consumer is behind)."""
        return len(self._waiting_producers)

    def put_nowait(self, item: T) -> bool:
        """Queue ``item`` if there is room and nobody is already waiting for room; else False."""
        if self._closed or self._waiting_producers or len(self._items) >= self._capacity:
            return False
        self._items.append(item)
        if self._item_ready is not None:
            self._item_ready.set()
            self._item_ready = None
        return True

    async def put(self, item: T) -> None:
        """Queue ``item``, waiting (in FIFO order with other producers) until there is room.

        Raises :class:`OutboxClosed` if the outbox is, or gets, closed before the item is queued.
        If cancelled while waiting, the item is not queued.
        """
        if self._closed:
            raise OutboxClosed
        if self.put_nowait(item):
            return
        queued = anyio.Event()
        entry = (item, queued)
        self._waiting_producers.append(entry)
        try:
            await queued.wait()
        except BaseException:
            if not queued.is_set():
                self._waiting_producers.remove(entry)
            raise
        if self._closed:
            raise OutboxClosed

    async def get(self) -> T:
        """The next item, waiting for one if needed. Raises :class:`OutboxClosed` once closed."""
        while not self._items:
            if self._closed:
                raise OutboxClosed
            if self._new_event is None:
                # anyio.Event() looks the backend up on every call; its concrete class does not.
                self._new_event = type(anyio.Event())
            ready = self._item_ready = self._new_event()
            await ready.wait()
        item = self._items.popleft()
        if self._waiting_producers:  # hand the room to the longest-waiting producer
            waiting, queued = self._waiting_producers.popleft()
            self._items.append(waiting)
            queued.set()
        return item

    def close(self) -> None:
        """Accept nothing more; wake everyone waiting (producers get ``OutboxClosed``)."""
        self._closed = True
        self._items.clear()
        for _, queued in self._waiting_producers:
            queued.set()
        self._waiting_producers.clear()
        if self._item_ready is not None:
            self._item_ready.set()
            self._item_ready = None
