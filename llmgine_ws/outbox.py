"""A connection's outbound queue: bounded in items *and* bytes, FIFO, one consumer (the writer task).

It has the semantics of an anyio memory object stream — ``put_nowait`` refuses when full, ``put``
waits for room in FIFO order, ``get`` waits for an item — but it is built for the one place where
every frame passes: an anyio stream's ``receive`` costs a checkpoint plus a ``TaskInfo`` snapshot
each time the writer finds the queue empty, which measured ~20% of the server's CPU in the
64-connection ping benchmark (see benchmarks/README.md). Here an empty-queue wait costs one
``anyio.Event``, and a non-empty one costs nothing.

Room means fewer than ``capacity`` items *and* at most ``max_bytes`` queued (each item's size is
given by its producer); an item larger than ``max_bytes`` still goes through an empty queue, so a
big frame is slow, never impossible.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")


class OutboxClosed(Exception):
    """The outbox was closed: nothing more goes in, and the writer has finished."""


class Outbox(Generic[T]):
    """Bounded FIFO between any number of producers and one consumer."""

    __slots__ = ("_bytes", "_capacity", "_closed", "_item_ready", "_items", "_max_bytes", "_new_event", "_sizes",
                 "_waiting_producers")

    def __init__(self, capacity: int, max_bytes: int) -> None:
        if capacity < 1 or max_bytes < 1:
            raise ValueError("capacity and max_bytes must be >= 1")
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._items: deque[T] = deque()
        self._sizes: deque[int] = deque()
        self._bytes = 0
        self._item_ready: anyio.Event | asyncio.Future[None] | None = None
        self._waiting_producers: deque[tuple[T, int, anyio.Event]] = deque()
        self._closed = False
        self._new_event: type[anyio.Event] | None = None

    def __len__(self) -> int:
        return len(self._items) + len(self._waiting_producers)

    @property
    def waiting(self) -> int:
        """Producers waiting for room (the consumer is behind)."""
        return len(self._waiting_producers)

    @property
    def queued_bytes(self) -> int:
        """Bytes of the items queued (not counting those of producers still waiting for room)."""
        return self._bytes

    def _has_room(self, size: int) -> bool:
        return not self._items or (len(self._items) < self._capacity and self._bytes + size <= self._max_bytes)

    def put_nowait(self, item: T, size: int = 0) -> bool:
        """Queue ``item`` if there is room and nobody is already waiting for room; else False."""
        if self._closed or self._waiting_producers or not self._has_room(size):
            return False
        self._items.append(item)
        self._sizes.append(size)
        self._bytes += size
        if self._item_ready is not None:
            self._wake()
        return True

    async def put(self, item: T, size: int = 0) -> None:
        """Queue ``item``, waiting (in FIFO order with other producers) until there is room.

        Raises :class:`OutboxClosed` if the outbox is, or gets, closed before the item is queued.
        If cancelled while waiting, the item is not queued.
        """
        if self._closed:
            raise OutboxClosed
        if self.put_nowait(item, size):
            return
        queued = anyio.Event()
        entry = (item, size, queued)
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
            loop = asyncio._get_running_loop()  # None under trio
            if loop is not None:
                # On asyncio a bare future: one object per wait instead of five (anyio's Event wraps an
                # asyncio.Event, its deque of waiters and their future). An idle writer waits once per
                # frame, and what it waits on lives until the next frame: with thousands of
                # connections these young objects are what the garbage collector spends its time on.
                future: asyncio.Future[None] = loop.create_future()
                self._item_ready = future
                await future
                continue
            if self._new_event is None:
                # anyio.Event() looks the backend up on every call; its concrete class does not.
                self._new_event = type(anyio.Event())
            ready = self._item_ready = self._new_event()
            await ready.wait()
        item = self._items.popleft()
        self._bytes -= self._sizes.popleft()
        waiting = self._waiting_producers
        while waiting and self._has_room(waiting[0][1]):  # hand the room to the longest-waiting producers
            waiting_item, size, queued = waiting.popleft()
            self._items.append(waiting_item)
            self._sizes.append(size)
            self._bytes += size
            queued.set()
        return item

    def close(self) -> None:
        """Accept nothing more; wake everyone waiting (producers get ``OutboxClosed``)."""
        self._closed = True
        self._items.clear()
        self._sizes.clear()
        self._bytes = 0
        for _, _, queued in self._waiting_producers:
            queued.set()
        self._waiting_producers.clear()
        if self._item_ready is not None:
            self._wake()

    def _wake(self) -> None:
        """Wake the consumer waiting in :meth:`get`."""
        ready = self._item_ready
        self._item_ready = None
        if isinstance(ready, asyncio.Future):
            if not ready.done():
                ready.set_result(None)
        elif ready is not None:
            ready.set()
