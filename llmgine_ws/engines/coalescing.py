"""Coalescing of a command's ``token`` events on their way to the socket.

An LLM answer is a stream of tiny deltas (20–100 a second per user); one frame per delta costs a
server more than the deltas are worth. With ``engine_event_coalesce_ms`` > 0, the deltas a command
emits within one flush interval go out as **one** ``engine_event`` whose payload is
``{"text": <the deltas concatenated>}`` and whose ``coalesced`` field says how many deltas it
carries (absent when 1). Nothing else changes:

- ``seq`` still counts the command's ``engine_event`` frames from 0 with no gaps; a client adds up
  ``coalesced`` (default 1) to count the deltas, so it can tell nothing was lost.
- Only events of type ``token`` whose payload is exactly ``{"text": <str>}`` are merged. Any other
  event is never merged or reordered: the pending deltas go out first, then the event.
- The pending deltas go out when the command ends (completed, cancelled or failed), before its
  ``engine_command_res``: the result never overtakes its tokens.
- A batch never holds more than ``engine_event_coalesce_bytes`` characters (one delta larger than
  that goes out alone).
- Back-pressure: a batch that finds the connection's outbox full keeps growing instead of waiting,
  so a slow client gets bigger batches and the engine never blocks on it. Batches that reached the
  byte cap wait in a per-command queue bounded like the outbox (``outbound_queue_size`` frames,
  ``outbound_queue_bytes`` characters); a client that lets it overflow loses its socket (1013): a
  resumable app is detached, any other ends.

Three parts: :class:`TokenCoalescer` is sans-I/O (deltas and events in, encoded frames out, no clock
and no socket); :class:`CoalescingLine` binds one to a connection; :class:`FlushScheduler` is the one
task per app that flushes every line whose interval is up.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio

from ..connection import WS_TRY_AGAIN_LATER, Connection
from ..errors import AppDisconnected
from ..protocol import EngineEventData

TOKEN_EVENT = "token"
"""The event type whose deltas are coalesced."""

EventEncoder = Callable[[EngineEventData], str]
"""Encodes an ``engine_event`` payload to a frame (``FrameEncoder.event("engine_event", data)``)."""

_NO_FRAMES: tuple[str, ...] = ()


def token_text(event_type: str, payload: Any) -> str | None:
    """The delta of a coalescable event (``"token"`` with payload exactly ``{"text": str}``), else None."""
    if event_type == TOKEN_EVENT and type(payload) is dict and len(payload) == 1:
        text = payload.get("text")
        if type(text) is str:
            return text
    return None


class TokenCoalescer:
    """The events of one command turned into frames, consecutive token deltas merged (sans-I/O).

    Feed it deltas (:meth:`add`) and other events (:meth:`event`); it hands back the frames to send,
    in order, each with its ``seq``. The deltas not yet in a frame are *pending*: :meth:`batch`
    encodes them without committing (so a batch that cannot be sent yet can go on growing), and
    :meth:`commit` makes that frame final.
    """

    __slots__ = ("_encode", "_max_chars", "_pending", "_pending_chars", "command_id", "deltas", "seq", "session_id")

    def __init__(self, session_id: str, command_id: str, encode: EventEncoder, *, max_chars: int) -> None:
        if max_chars < 1:
            raise ValueError("max_chars must be >= 1")
        self.session_id = session_id
        self.command_id = command_id
        self._encode = encode
        self._max_chars = max_chars
        self._pending: list[str] = []
        self._pending_chars = 0
        self.seq = 0
        """The ``seq`` of the next frame."""
        self.deltas = 0
        """Token deltas put into frames so far."""

    @property
    def pending(self) -> int:
        """Deltas waiting for a frame."""
        return len(self._pending)

    @property
    def pending_chars(self) -> int:
        """Characters of the deltas waiting for a frame."""
        return self._pending_chars

    def add(self, text: str) -> tuple[str, ...]:
        """Take one delta; returns the frames it completed (the batches that reached the byte cap)."""
        size = len(text)
        sealed = _NO_FRAMES
        if self._pending and self._pending_chars + size > self._max_chars:
            sealed = (self._seal(),)
        self._pending.append(text)
        self._pending_chars += size
        if self._pending_chars >= self._max_chars:
            sealed = (*sealed, self._seal())
        return sealed

    def batch(self) -> str | None:
        """The frame of the pending deltas (not committed: call :meth:`commit` once it is sent)."""
        if not self._pending:
            return None
        pending = self._pending
        count = len(pending)
        return self._encode(EngineEventData(session_id=self.session_id, command_id=self.command_id, seq=self.seq,
                                            event_type=TOKEN_EVENT, payload={"text": "".join(pending)},
                                            coalesced=count))

    def commit(self) -> None:
        """The frame :meth:`batch` returned was sent: its deltas are no longer pending."""
        self.deltas += len(self._pending)
        self._pending.clear()  # the same list again: no new object for the collector per batch
        self._pending_chars = 0
        self.seq += 1

    def flush(self) -> str | None:
        """The frame of the pending deltas, committed (None when nothing is pending)."""
        frame = self.batch()
        if frame is not None:
            self.commit()
        return frame

    def event(self, event_type: str, payload: Any) -> tuple[str, ...]:
        """An event that is not merged: the pending deltas' frame (if any), then the event's."""
        seq = self.seq + 1 if self._pending else self.seq
        data = EngineEventData(session_id=self.session_id, command_id=self.command_id, seq=seq,
                               event_type=event_type, payload=payload)
        frame = self._encode(data)  # first: an unserialisable payload raises with nothing changed
        if self._pending:
            sealed = self.flush()
            assert sealed is not None
            self.seq += 1
            return sealed, frame
        self.seq += 1
        return (frame,)

    def _seal(self) -> str:
        frame = self.flush()
        assert frame is not None
        return frame


class FlushScheduler:
    """The one task of an app that flushes every :class:`CoalescingLine` whose interval is up.

    Every line waiting for a flush sits in one FIFO, in deadline order (every deadline is "now +
    interval" with the same interval, so appending keeps it sorted). The task sleeps until the
    first deadline, then flushes every line due within a quarter interval of it: one wake-up serves
    many lines, whatever their number.
    """

    def __init__(self, interval: float, *, batch_chars: int, max_frames: int, max_chars: int) -> None:
        if not interval > 0:
            raise ValueError("interval must be > 0")
        self.interval = interval
        self.batch_chars = batch_chars
        """The most characters of deltas one frame carries (``engine_event_coalesce_bytes``)."""
        self.max_frames = max_frames
        self.max_chars = max_chars
        """Bounds of a line's frames waiting for room (``outbound_queue_size`` / ``_bytes``)."""
        self._slack = interval / 4
        self._due: deque[tuple[float, CoalescingLine]] = deque()
        self._wakeup: anyio.Event | None = None
        self._clock: Callable[[], float] = time.monotonic
        self.running = False
        """Whether the task runs (lines are only made while it does)."""

    def now(self) -> float:
        """The clock deadlines are measured with (the event loop's)."""
        return self._clock()

    def line(self, connection: Connection, session_id: str, command_id: str, encode: EventEncoder
             ) -> CoalescingLine | None:
        """A line for one command's events; None while the task does not run (no coalescing then)."""
        if not self.running:
            return None
        coalescer = TokenCoalescer(session_id, command_id, encode, max_chars=self.batch_chars)
        return CoalescingLine(connection, coalescer, self, max_frames=self.max_frames, max_chars=self.max_chars)

    def schedule(self, line: CoalescingLine) -> None:
        """Flush ``line`` one interval from now."""
        self._due.append((self._clock() + self.interval, line))
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    def __len__(self) -> int:
        return len(self._due)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Flush lines as their intervals end, until cancelled (in the app's lifespan)."""
        self._clock = _loop_clock()
        self.running = True
        task_status.started()
        due = self._due
        try:
            while True:
                if not due:
                    wakeup = self._wakeup = anyio.Event()
                    await wakeup.wait()
                    continue
                deadline = due[0][0]
                if deadline > self._clock():
                    await anyio.sleep_until(deadline)
                now = self._clock()
                limit = now + self._slack
                while due and due[0][0] <= limit:
                    _, line = due.popleft()
                    line.scheduled = False
                    line.flush_due()
        finally:
            self.running = False
            self._wakeup = None
            due.clear()


def _loop_clock() -> Callable[[], float]:
    """The running event loop's clock, as ``anyio.current_time`` reads it, minus its per-call backend
    lookup (a line is scheduled once per batch: thousands of times a second)."""
    loop = asyncio._get_running_loop()  # None under trio
    return loop.time if loop is not None else anyio.current_time


class CoalescingLine:
    """A command's coalesced events on their way to its connection.

    Token deltas never wait (:meth:`token`); other events and the end of the command (:meth:`event`,
    :meth:`flush`) wait for room like any send, after the pending deltas.
    """

    __slots__ = ("_connection", "_max_chars", "_max_frames", "_queued", "_queued_chars", "_scheduler", "_sending",
                 "closed",
                 "coalescer", "scheduled")

    def __init__(self, connection: Connection, coalescer: TokenCoalescer, scheduler: FlushScheduler, *,
                 max_frames: int, max_chars: int) -> None:
        self._connection = connection
        self.coalescer = coalescer
        self._scheduler = scheduler
        self._queued: deque[str] = deque()
        """Frames made (a full batch, an event) that found no room yet, in order."""
        self._queued_chars = 0
        self._max_frames = max_frames
        self._max_chars = max_chars
        self._sending = False
        self.scheduled = False
        self.closed = False

    def token(self, text: str) -> None:
        """Queue a delta; never waits. Raises ``AppDisconnected`` when the connection is going away
        (or was just closed with 1013 for letting full batches pile up past the bounds)."""
        connection = self._connection
        if connection.closing:
            raise AppDisconnected(connection.app_id)
        for frame in self.coalescer.add(text):
            self._push(frame)
        if not self.scheduled and self.coalescer.pending:
            self.scheduled = True
            self._scheduler.schedule(self)

    def _push(self, frame: str) -> None:
        if not self._queued and not self._sending and self._connection.send_nowait(frame):
            return
        self._queued.append(frame)
        self._queued_chars += len(frame)
        if len(self._queued) > self._max_frames or self._queued_chars > self._max_chars:
            # A stalled client, as when the outbox overflows: it loses its socket (1013). A resumable
            # app is detached rather than ended, and what waits here goes on to its replay buffer.
            connection = self._connection
            connection.drop_link(WS_TRY_AGAIN_LATER, "outbound queue full", coalesced_backlog=len(self._queued),
                                 coalesced_backlog_bytes=self._queued_chars)
            if connection.closing or not connection.detached:
                raise AppDisconnected(connection.app_id)
            self.flush_due()
            return
        if not self.scheduled:
            self.scheduled = True
            self._scheduler.schedule(self)

    def flush_due(self) -> None:
        """The interval is up: send what fits without waiting; what does not, waits (and grows)."""
        if self.closed or self._sending or self._connection.closing:
            return
        send_nowait = self._connection.send_nowait
        queued = self._queued
        while queued and send_nowait(queued[0]):
            self._queued_chars -= len(queued.popleft())
        if not queued:
            frame = self.coalescer.batch()
            if frame is None:
                return
            if send_nowait(frame):
                self.coalescer.commit()
                return
        self.scheduled = True  # the outbox is full: try again in an interval (the batch grows meanwhile)
        self._scheduler.schedule(self)

    async def event(self, event_type: str, payload: Any) -> None:
        """Send an event that is not merged, after the pending deltas (waits for room like ``send``)."""
        for frame in self.coalescer.event(event_type, payload):
            self._queued.append(frame)
            self._queued_chars += len(frame)
        await self._drain()

    async def flush(self) -> None:
        """Send everything pending (the command ended); waits for room like ``send``."""
        frame = self.coalescer.flush()
        if frame is not None:
            self._queued.append(frame)
            self._queued_chars += len(frame)
        await self._drain()

    def close(self) -> None:
        """The command is answered: the scheduler forgets this line."""
        self.closed = True

    async def _drain(self) -> None:
        if self._sending:  # another task of the engine drains already: ours is queued behind
            return
        self._sending = True
        queued = self._queued
        try:
            while queued:
                # Popped only once queued: a send cancelled while waiting leaves its frame here, for
                # the command's final flush.
                await self._connection.send(queued[0])
                self._queued_chars -= len(queued.popleft())
        finally:
            self._sending = False
