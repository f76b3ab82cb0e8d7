"""The bounded inbox behind :meth:`Client.receive`: messages nothing else consumed, oldest dropped first."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import anyio

from .errors import ConnectionClosed, RequestTimeout
from .messages import Message

__all__ = ["Inbox"]

_log = logging.getLogger("llmgine_ws.client")


class Inbox:
    """Messages waiting for :meth:`receive`, in arrival order, at most ``limit`` of them."""

    def __init__(self, limit: int) -> None:
        self._limit = max(1, limit)
        self._messages: deque[Message] = deque()
        self._arrived = anyio.Event()
        self._closed: Callable[[], ConnectionClosed] | None = None
        self._dropped = 0

    def __len__(self) -> int:
        return len(self._messages)

    def push(self, message: Message) -> None:
        """Add a message; past the limit the oldest one is dropped (with a logged warning)."""
        if len(self._messages) >= self._limit:
            self._messages.popleft()
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                _log.warning("client inbox full (%d messages): dropped %d oldest message(s) so far",
                             self._limit, self._dropped)
        self._messages.append(message)
        self._wake()

    def close(self, error: Callable[[], ConnectionClosed]) -> None:
        """No more messages will come: once empty, :meth:`receive` raises ``error()``."""
        self._closed = error
        self._wake()

    async def receive(self, timeout: float | None = None) -> Message:
        """The oldest message, waiting at most ``timeout`` seconds (``None``: no limit).

        Raises:
            ConnectionClosed: the inbox is closed and empty.
            RequestTimeout: nothing arrived in time.
        """
        with anyio.move_on_after(timeout):
            while True:
                if self._messages:
                    return self._messages.popleft()
                if self._closed is not None:
                    raise self._closed()
                await self._arrived.wait()
        raise RequestTimeout("no message received in time")

    def _wake(self) -> None:
        self._arrived.set()
        self._arrived = anyio.Event()
