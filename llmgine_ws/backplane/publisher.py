"""Publishing for code that cannot wait: a bounded queue drained, in order, by one task."""

from __future__ import annotations

import logging

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..errors import MessagingError
from . import Backplane

logger = logging.getLogger("llmgine_ws.cluster")

QUEUE_SIZE = 16384
"""Messages queued at most; past it, new ones are dropped (and logged)."""
PUBLISH_BATCH = 256
"""Messages handed to the backplane in one round trip at most."""

_Queued = tuple[str, bytes, anyio.Event | None]


class Publisher:
    """Publishes what presence listeners and receive callbacks queue, in order, batching what piled up.

    Publishing is at most once, as the backplane's: a message that cannot go out (the broker is
    down, the queue is full) is logged and dropped; whoever needs an answer has its own deadline.
    """

    def __init__(self, backplane: Backplane, node_id: str, *, queue_size: int = QUEUE_SIZE) -> None:
        self._backplane = backplane
        self._node_id = node_id
        self._queue_size = queue_size
        self._send: MemoryObjectSendStream[_Queued]
        self._receive: MemoryObjectReceiveStream[_Queued]
        self._send, self._receive = anyio.create_memory_object_stream[_Queued](queue_size)
        self.dropped = 0
        """Messages dropped because the queue was full."""

    def enqueue(self, subject: str, payload: bytes) -> None:
        """Queue ``payload`` for ``subject`` without waiting."""
        self._put((subject, payload, None))

    async def flush(self) -> None:
        """Wait until everything queued so far was published (or failed to be)."""
        flushed = anyio.Event()
        self._put(("", b"", flushed))
        await flushed.wait()

    def _put(self, item: _Queued) -> None:
        try:
            self._send.send_nowait(item)
        except anyio.WouldBlock:
            self.dropped += 1
            logger.error("cluster node %s: %d backplane messages queued; dropping one for %s", self._node_id,
                         self._queue_size, item[0])
            if item[2] is not None:
                item[2].set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Publish what was queued until cancelled."""
        task_status.started()
        async for item in self._receive:
            batch = [item]
            while len(batch) < PUBLISH_BATCH:
                try:
                    batch.append(self._receive.receive_nowait())
                except anyio.WouldBlock:
                    break
            messages: list[tuple[str, bytes]] = []
            for subject, payload, flushed in batch:
                if flushed is None:
                    messages.append((subject, payload))
                    continue
                await self._publish(messages)  # a flush marker: everything before it goes first
                messages = []
                flushed.set()
            await self._publish(messages)

    async def _publish(self, messages: list[tuple[str, bytes]]) -> None:
        if not messages:
            return
        try:
            await self._backplane.publish_many(messages)
        except MessagingError as exc:
            log = logger.warning if self._backplane.connected else logger.debug
            log("cluster node %s: %d queued message(s) not published: %s", self._node_id, len(messages), exc)
