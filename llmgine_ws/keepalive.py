"""Keepalive: one task pings every socket of the app's node (instead of a task per socket).

The endpoint adds each link when its socket is accepted and discards it when the socket goes; the
runtime runs :meth:`KeepAlive.run` in the lifespan's task group.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import anyio
import anyio.abc
import anyio.lowlevel

from .connection import WS_INTERNAL_ERROR, Link
from .protocol import FrameEncoder, ServerPingData, new_message_id, utcnow


class KeepAlive:
    """One task pings every socket of the app (instead of a task per socket).

    A schedule, sans I/O apart from :meth:`run`'s sleeps: each link is due ``interval`` seconds after it
    was added, then every ``interval`` seconds, as with a task per link. Every link has the same
    interval, so the schedule stays in due order with a link appended when added and moved to the end
    when pinged; :meth:`run` sleeps until the first one is due. After ``allowed_misses`` unanswered
    pings in a row the link is dropped (a resumable app is detached, the socket likely half-open; any
    other is closed with 1011).
    """

    __slots__ = ("_added", "_due", "allowed_misses", "encoder", "interval")

    def __init__(self, interval: float, allowed_misses: int, encoder: FrameEncoder) -> None:
        self.interval = interval
        self.allowed_misses = allowed_misses
        self.encoder = encoder
        self._due: OrderedDict[Link, float] = OrderedDict()
        self._added: anyio.Event | None = None

    def __len__(self) -> int:
        return len(self._due)

    def add(self, link: Link) -> None:
        """Ping ``link``'s client from ``interval`` seconds on (until :meth:`discard`)."""
        self._due[link] = anyio.current_time() + self.interval
        if self._added is not None:
            self._added.set()
            self._added = None

    def discard(self, link: Link) -> None:
        """Stop pinging ``link`` (its socket is gone)."""
        self._due.pop(link, None)

    def ping(self, link: Link) -> bool:
        """Ping ``link``'s client once (or drop the link: too many pings unanswered); False when the
        link needs no more pings."""
        connection = link.app
        if connection.proxy is not None:
            return True  # the app's own node sequences its frames (and pings): nothing from here
        if connection.link is not link and link.remote:
            return False  # a remote link that was superseded, detached or closed
        if len(connection.unanswered_pings) >= self.allowed_misses:
            connection.drop_link(WS_INTERNAL_ERROR, "server pings unanswered", missed=len(connection.unanswered_pings))
            return False
        message_id = new_message_id()
        connection.unanswered_pings[message_id] = time.monotonic()
        # Not awaited: a full outbox puts it in the connection's backlog, which waits like send()
        # (a client too slow for the send grace is closed with 1013).
        return connection.send_soon(self.encoder.frame("server_ping", message_id, ServerPingData(timestamp=utcnow()),
                                                       server_initiated=True))

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Ping every link when it is due, until cancelled."""
        task_status.started()
        due = self._due
        while True:
            if not due:
                self._added = added = anyio.Event()
                await added.wait()
                continue
            link, when = next(iter(due.items()))
            delay = when - anyio.current_time()
            if delay > 0:
                await anyio.sleep(delay)  # a link added meanwhile is due later still
                continue
            if self.ping(link) and link in due:
                due[link] = anyio.current_time() + self.interval
                due.move_to_end(link)
            else:
                due.pop(link, None)
            await anyio.lowlevel.checkpoint()
