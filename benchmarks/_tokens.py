"""W6's token source: every streaming answer of a server process, paced by one shared ticker.

An answer is ``bursts`` bursts of ``BURST`` tokens, one burst every ``INTERVAL`` seconds (jittered by
up to ±``JITTER``), the way a provider's HTTP stream hands tokens over (Centrifugo's AI guide and
OpenAI streams show ~5 tokens per chunk). Each token is 4–6 characters: ``~`` + the burst's
*scheduled* time in milliseconds (``CLOCK_MONOTONIC``, shared by every process of the machine) in 3
base-62 digits (wrapping every ~238 s) + 0–2 ``_``. So a client can tell, for every token, when the
provider delivered it — even when a server that falls behind reads its "provider" late, which then
counts as added latency, as it would in production.

The source must cost far less than the delivery, or the benchmark measures itself: one task per
process (not one timer per answer) wakes every ``TICK`` seconds and resolves the future of every
answer whose burst is due; an answer's task wakes once per burst, exactly as an engine reading a
provider's stream does. ``benchmarks/llm_answers.py`` measures the source alone ("source" side).
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import os
import random
import time
from collections.abc import AsyncIterator

BURST = 5
INTERVAL = 0.100
JITTER = 0.020
TICK = 0.002

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
WRAP = len(ALPHABET) ** 3
_DIGIT = {ch: i for i, ch in enumerate(ALPHABET)}
_PADS = ("", "_", "__")


GC_THRESHOLD_ENV = "W6_GC_THRESHOLD"
"""Set by ``llm_answers.py --gc-threshold``: the same garbage-collector setting for every side."""


def tune_gc() -> None:
    """Apply ``W6_GC_THRESHOLD`` (the collector's generation-0 threshold; Python's default is 700)."""
    value = os.environ.get(GC_THRESHOLD_ENV)
    if value:
        gc.set_threshold(int(value), 10, 10)


def stamp(ms: int) -> str:
    """``ms`` (mod ``WRAP``) as 3 base-62 digits."""
    ms %= WRAP
    return ALPHABET[ms // 3844] + ALPHABET[ms // 62 % 62] + ALPHABET[ms % 62]


def unstamp(digits: str) -> int:
    """The inverse of :func:`stamp` (the milliseconds mod ``WRAP``)."""
    return _DIGIT[digits[0]] * 3844 + _DIGIT[digits[1]] * 62 + _DIGIT[digits[2]]


def burst_tokens(ms: int, first: int) -> list[str]:
    """The ``BURST`` tokens of a burst scheduled at ``ms``; ``first`` is the answer's token count so far."""
    digits = "~" + stamp(ms)
    return [digits + _PADS[(first + i) % 3] for i in range(BURST)]


def now_ms() -> int:
    """The shared clock, in milliseconds."""
    return int(time.monotonic() * 1000)


class TokenSource:
    """The answers of one process, paced by one ticker task (started on first use)."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, asyncio.Future[float]]] = []
        self._ticker: asyncio.Task[None] | None = None
        self._count = 0

    async def answer(self, bursts: int, start: float) -> AsyncIterator[list[str]]:
        """Yield the bursts of one answer; the first is due at ``start`` (``time.monotonic()``)."""
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())
        rng = random.Random(self._count)
        loop = asyncio.get_running_loop()
        due = start
        emitted = 0
        for _ in range(bursts):
            future: asyncio.Future[float] = loop.create_future()
            self._count += 1
            heapq.heappush(self._due, (due, self._count, future))
            scheduled = await future
            yield burst_tokens(int(scheduled * 1000), emitted)
            emitted += BURST
            due += INTERVAL + rng.uniform(-JITTER, JITTER)

    async def _tick(self) -> None:
        due = self._due
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            while due and due[0][0] <= now:
                scheduled, _, future = heapq.heappop(due)
                if not future.done():
                    future.set_result(scheduled)
