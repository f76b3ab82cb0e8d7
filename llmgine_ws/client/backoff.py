"""Backing off when the server answers ``RATE_LIMITED``.

The server refuses (and drops) a frame over a connection's message rate with an ``error`` envelope
``RATE_LIMITED`` whose ``details.retry_after`` says when the next one would be accepted; every refused
frame also spends one of the connection's strikes, and a connection out of strikes is closed (1008).
So after a refusal the client must not simply fire again: :class:`RateLimitBackoff` holds every
send until ``retry_after`` has passed, then lets the waiting senders through one at a time,
``retry_after`` apart, and gets out of the way as soon as nobody is waiting.
"""

from __future__ import annotations

import math
from typing import Any

import anyio

__all__ = ["RateLimitBackoff", "retry_after_of"]

_MAX_WAIT = 60.0
"""Never wait longer than this for one refusal, whatever the server said."""

_PACING = 1.25
"""Senders go a quarter slower than the server refills: a frame that arrives a little early (network or
scheduling jitter) would be refused again and spend one of the connection's strikes."""


class RateLimitBackoff:
    """A gate every send passes through: open unless the server recently refused a frame."""

    def __init__(self) -> None:
        self._not_before = -math.inf
        self._interval = 0.0
        self._lock = anyio.Lock()

    def refused(self, retry_after: float) -> None:
        """The server refused a frame and asked to wait ``retry_after`` seconds."""
        delay = min(max(retry_after, 0.0) * _PACING, _MAX_WAIT)
        # retry_after is the time to the server's next token: the longest one seen while backing off
        # is the best estimate of the time between tokens, so that is how far apart senders go.
        self._interval = max(self._interval, delay) if self.waiting else delay
        self._not_before = max(self._not_before, anyio.current_time() + delay)

    @property
    def waiting(self) -> bool:
        """Whether a send made now would be held."""
        return anyio.current_time() < self._not_before

    async def wait(self) -> None:
        """Return when a frame may be sent (at once unless backing off)."""
        if not self.waiting:
            return
        async with self._lock:  # FIFO: senders go through in the order they came
            delay = self._not_before - anyio.current_time()
            if delay > 0:
                await anyio.sleep(delay)
            # The next sender waits one more interval: a burst after a refusal would only be refused again.
            self._not_before = anyio.current_time() + self._interval


def retry_after_of(data: Any) -> float | None:
    """The ``retry_after`` of a ``RATE_LIMITED`` error payload, or ``None`` for any other payload."""
    if not isinstance(data, dict) or data.get("code") != "RATE_LIMITED":
        return None
    details = data.get("details")
    value = details.get("retry_after") if isinstance(details, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
