"""A connection's outbound queue: bounded in items *and* bytes, FIFO, one consumer (the writer task).

It has the semantics of an anyio memory object stream — ``put_nowait`` refuses when full, ``put``
waits for room in FIFO order, ``get`` waits for an item — but it is built for the one place where
every frame passes: an anyio stream's ``receive`` costs a checkpoint plus a ``TaskInfo`` snapshot
each time the writer finds the queue empty, which measured ~20% of the server's CPU in the
64-connection ping benchmark (see benchmarks/README.md). Here an empty-queue wait costs one bare
future on asyncio (an ``anyio.Event`` elsewhere), and a non-empty one costs nothing.

Room means fewer than ``capacity`` items *and* at most ``max_bytes`` queued (each item's size is
given by its producer); an item larger than ``max_bytes`` still goes through an empty queue, so a
big frame is slow, never impossible.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")


class OutboxClosed(Exception):
    """The outbox was closed: nothing more goes in, and the writer has finished."""


class _Waiter(Generic[T]):
    """A producer waiting for room; ``queued`` once its item was handed room (else woken by a close)."""

    __slots__ = ("event", "item", "queued", "size")

    def __init__(self, item: T, size: int, event: anyio.Event) -> None:
        self.item = item
        self.size = size
        self.event = event
        self.queued = False


class Outbox(Generic[T]):
    """Bounded FIFO between any number of producers and one consumer.

    Kept small for idle connections: one deque of ``(item, size)`` pairs, only while something is
    queued, and the queue of waiting producers only once a producer has had to wait.
    """

    __slots__ = ("_bytes", "_capacity", "_closed", "_commit", "_item_ready", "_items", "_max_bytes",
                 "_waiting_producers")

    def __init__(self, capacity: int, max_bytes: int, commit: Callable[[T], T] | None = None) -> None:
        """``commit``, if given, is applied to each item at the moment it enters the queue (in queue
        order, never to an item whose producer gave up waiting): the connection stamps ``seq`` there."""
        if capacity < 1 or max_bytes < 1:
            raise ValueError("capacity and max_bytes must be >= 1")
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._items: deque[tuple[T, int]] | None = None
        """Only while something is queued: an idle connection's outbox holds no deque (~0.7 KiB)."""
        self._bytes = 0
        self._item_ready: asyncio.Future[None] | anyio.Event | None = None
        """What the consumer waits on while the outbox is empty: a bare future on asyncio (the
        cheapest wake-up there is), an ``anyio.Event`` on other backends."""
        self._waiting_producers: deque[_Waiter[T]] | None = None
        self._closed = False
        self._commit = commit

    def __len__(self) -> int:
        return (len(self._items) if self._items else 0) + self.waiting

    @property
    def waiting(self) -> int:
        """Producers waiting for room (the consumer is behind)."""
        return len(self._waiting_producers) if self._waiting_producers else 0

    def queued(self) -> list[T]:
        """The items queued right now, oldest first (for inspection and tests)."""
        return [item for item, _ in self._items or ()]

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
        if self._commit is not None:
            item = self._commit(item)
        items = self._items
        if items is None:
            items = self._items = deque()
        items.append((item, size))
        self._bytes += size
        if self._item_ready is not None:
            self._wake_consumer()
        return True

    def _wake_consumer(self) -> None:
        ready, self._item_ready = self._item_ready, None
        if isinstance(ready, asyncio.Future):
            if not ready.done():
                ready.set_result(None)
        elif ready is not None:
            ready.set()

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
        entry = _Waiter(item, size, queued)
        if self._waiting_producers is None:
            self._waiting_producers = deque()
        waiting = self._waiting_producers
        waiting.append(entry)
        try:
            await queued.wait()
        except BaseException:
            if not queued.is_set():
                waiting.remove(entry)
            raise
        if not entry.queued:  # woken by close(); an item handed room before the close was queued (and
            raise OutboxClosed  # committed: with a resume, stamped into the replay), so it is not put twice

    async def get(self) -> T:
        """The next item, waiting for one if needed. Raises :class:`OutboxClosed` once closed."""
        while not self._items:
            if self._closed:
                raise OutboxClosed
            loop = asyncio._get_running_loop()  # None outside asyncio (trio)
            if loop is not None:
                future = self._item_ready = loop.create_future()
                await future  # if cancelled, the next put finds it done and skips it
            else:
                event = self._item_ready = anyio.Event()
                await event.wait()
        items = self._items
        assert items is not None
        item, size = items.popleft()
        self._bytes -= size
        waiting = self._waiting_producers
        if waiting:
            while waiting and self._has_room(waiting[0].size):  # hand the room to the longest-waiting producers
                waiter = waiting.popleft()
                waiting_item = waiter.item
                if self._commit is not None:
                    waiting_item = self._commit(waiting_item)
                items.append((waiting_item, waiter.size))
                self._bytes += waiter.size
                waiter.queued = True
                waiter.event.set()
        if not items:
            self._items = None
        return item

    def set_commit(self, commit: Callable[[T], T] | None) -> None:
        """Apply ``commit`` to the items queued from now on (see the constructor)."""
        self._commit = commit

    def take_all(self) -> list[T]:
        """Remove and return the items queued (not those of producers still waiting for room)."""
        items = [item for item, _ in self._items or ()]
        self._items = None
        self._bytes = 0
        return items

    def close(self) -> None:
        """Accept nothing more; wake everyone waiting (producers get ``OutboxClosed``)."""
        self._closed = True
        self._items = None
        self._bytes = 0
        if self._waiting_producers:
            for waiter in self._waiting_producers:
                waiter.event.set()
            self._waiting_producers.clear()
        if self._item_ready is not None:
            self._wake_consumer()
