"""Resume bookkeeping of one app, sans I/O: sequence numbers, the replay buffer, acks, the resume
token, the resent-request table — and the node-wide byte budget they share.

Nothing here awaits, sleeps or touches a socket (like python-websockets' protocol objects): the
connection feeds it events — a frame committed to the wire (:meth:`ResumeState.stamp`), an ``ack``
(:meth:`ResumeState.ack`), a drop (:meth:`ResumeState.detach`), a resume attempt
(:meth:`ResumeState.check` then :meth:`ResumeState.attach`), a clock tick (:meth:`ResumeState.expired`)
— and acts on what it answers. A cluster router can therefore run the same state machine for an app
whose socket lives on another node. See docs/resume.md.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict, deque
from typing import Literal

ResumeFailure = Literal["unknown", "expired", "gap", "disabled"]
"""Why a ``resume`` was refused (``resume_res.reason``)."""

TOKEN_BYTES = 24
"""Random bytes in a resume token (192 bits; URL-safe base64 on the wire)."""


def new_token() -> str:
    """A fresh resume token: 192 random bits, URL-safe."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def tokens_equal(given: str, expected: str) -> bool:
    """Compare two tokens in constant time (for equal lengths)."""
    return hmac.compare_digest(given.encode(), expected.encode())


class NodeBudget:
    """Bytes held by every replay buffer of this node together (``resume_node_buffer_bytes``)."""

    __slots__ = ("evictions", "limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.evictions = 0
        """Unacked frames evicted from full buffers (connected apps) since start."""

    @property
    def over(self) -> bool:
        """Whether the buffers hold more than the limit."""
        return self.used > self.limit


class ResumeState:
    """Everything resume needs to know about one app (see the module docstring).

    Sequence numbers count every server frame after ``connected``: 1, 2, 3… with no gaps, never
    reset. Frames are kept (already stamped, ready to write again) only once the client has acked
    at least once (:attr:`resumable`), and only until acked.
    """

    __slots__ = ("_budget", "_bytes", "_completed", "_dedupe_entries", "_first", "_frames", "_max_bytes",
                 "ack_seen", "acked", "detached_at", "epoch", "evicted", "floor", "overflowed", "principal_key",
                 "resend_ids", "resumable", "seq", "token")

    def __init__(self, *, max_bytes: int, budget: NodeBudget, principal_key: str | None,
                 dedupe_entries: int = 1024) -> None:
        self.seq = 0
        """The last sequence number given to a frame."""
        self.acked = 0
        """The client's highest cumulative ack."""
        self.floor = 0
        """Frames with ``seq <= floor`` can no longer be replayed (acked, evicted or never kept)."""
        self.resumable = False
        """True once the client has acked: from then on frames are kept for a replay."""
        self.ack_seen = False
        """The client has sent an ``ack`` (even if resume is off and it changed nothing)."""
        self.token = new_token()
        """The token a resume must present (rotated on every successful resume)."""
        self.principal_key = principal_key
        """Who opened the app (user id), or None for an unauthenticated app."""
        self.epoch = 0
        """Incremented at every attach and detach: a fence for deferred work (expiry timers, remote
        writers) that must not act on a later incarnation of the app."""
        self.detached_at: float | None = None
        """``time.monotonic()`` of the drop while detached, else None."""
        self.evicted = 0
        """Frames evicted unacked (buffer full while connected)."""
        self.overflowed = False
        """Set when a frame did not fit while detached: the app must end (a later resume is ``gap``)."""
        self.resend_ids: set[str] | None = None
        """Client message_ids that were running or answered when the app last resumed: one resend of
        each is ignored (the request is never executed twice). None until a resume (most apps never do)."""
        self._frames: deque[str] | None = None
        """Made on the first frame kept (after the first ``ack``): most apps never ack."""
        self._first = 1
        """The seq of ``_frames[0]``."""
        self._bytes = 0
        self._max_bytes = max_bytes
        self._budget = budget
        self._completed: OrderedDict[str, None] | None = None
        """Client requests answered lately (made once the app is resumable)."""
        self._dedupe_entries = dedupe_entries

    # ------------------------------------------------------------------ frames

    @property
    def buffered(self) -> int:
        """Frames kept for a replay."""
        return len(self._frames) if self._frames else 0

    @property
    def buffered_bytes(self) -> int:
        """Characters of the frames kept for a replay."""
        return self._bytes

    @property
    def detached(self) -> bool:
        """Whether the app has no socket right now."""
        return self.detached_at is not None

    def stamp(self, frame: str) -> str:
        """Give ``frame`` (an encoded JSON object) the next ``seq``; keep it if the app is resumable.

        Returns the stamped frame (``{"seq":N,`` spliced in front: the frame is not re-encoded).
        Past the buffer's bounds the oldest frames are evicted while connected; while detached the
        frame is still stamped but :attr:`overflowed` is set (the app must end).
        """
        seq = self.seq = self.seq + 1
        stamped = f'{{"seq":{seq},{frame[1:]}'
        if self.resumable:
            size = len(stamped)
            frames = self._frames
            if frames is None:
                frames = self._frames = deque()
            if not frames:
                self._first = seq
            frames.append(stamped)
            self._bytes += size
            budget = self._budget
            budget.used += size
            if self._bytes > self._max_bytes or budget.used > budget.limit:
                if self.detached_at is not None:
                    self.overflowed = True
                else:
                    self._evict()
        return stamped

    def _evict(self) -> None:
        frames, budget = self._frames, self._budget
        while frames and (self._bytes > self._max_bytes or budget.used > budget.limit):
            self._drop_first()
            self.evicted += 1
            budget.evictions += 1
            self.floor = self._first - 1

    def _drop_first(self) -> None:
        frames = self._frames
        assert frames is not None  # only called while frames are kept
        size = len(frames.popleft())
        self._bytes -= size
        self._budget.used -= size
        self._first += 1

    def ack(self, seq: int) -> None:
        """The client has every frame up to ``seq`` (cumulative; later or out-of-range acks are harmless)."""
        if not self.resumable:
            self.resumable = True
            self.floor = self.seq  # what went out before the first ack was not kept
            self._first = self.seq + 1
        seq = min(seq, self.seq)
        if seq <= self.acked:
            return
        self.acked = seq
        while self._frames and self._first <= seq:
            self._drop_first()
        self.floor = max(self.floor, seq)

    def release(self) -> None:
        """Give the buffer's bytes back to the node budget (the app ended)."""
        self._budget.used -= self._bytes
        self._bytes = 0
        self._frames = None

    # ------------------------------------------------------------------ requests

    def completed(self, message_id: str) -> None:
        """A client request was answered (remembered, bounded, so that its resend is not run again)."""
        if not self.resumable:
            return
        table = self._completed
        if table is None:
            table = self._completed = OrderedDict()
        table[message_id] = None
        table.move_to_end(message_id)
        if len(table) > self._dedupe_entries:
            table.popitem(last=False)

    def is_resend(self, message_id: str) -> bool:
        """Whether a request is the first resend of one received before the last resume (then it is
        not run: it is running and will be answered, or its answer is in the replay)."""
        if self.resend_ids is not None and message_id in self.resend_ids:
            self.resend_ids.discard(message_id)
            return True
        return False

    # ------------------------------------------------------------------ drop and resume

    def detach(self, now: float | None = None) -> None:
        """The socket is gone; frames now only go to the buffer."""
        self.detached_at = time.monotonic() if now is None else now
        self.epoch += 1

    def expired(self, window: float, now: float | None = None) -> bool:
        """Whether a detached app has waited longer than ``window`` seconds."""
        if self.detached_at is None:
            return False
        return (time.monotonic() if now is None else now) - self.detached_at >= window

    def check(self, token: str, principal_key: str | None, last_seq: int) -> ResumeFailure | None:
        """Why a resume presenting ``token`` as ``principal_key`` from ``last_seq`` must be refused, or None.

        A wrong token and another principal are both ``unknown`` (indistinguishable); frames the
        server never sent (``last_seq`` ahead of it) or no longer holds are ``gap``.
        """
        token_ok = tokens_equal(token, self.token)
        if not token_ok or principal_key != self.principal_key or not self.resumable:
            return "unknown"
        if last_seq > self.seq or last_seq < self.floor:
            return "gap"
        return None

    def attach(self, last_seq: int, in_flight: list[str]) -> tuple[str, list[str]]:
        """A resume from ``last_seq`` succeeded: the new token and the frames to replay, in order.

        The frames up to ``last_seq`` count as acked. ``in_flight`` (requests still running) and the
        requests answered lately become :attr:`resend_ids`.
        """
        self.ack(last_seq)
        replay = list(self._frames or ())
        self.token = new_token()
        self.detached_at = None
        self.epoch += 1
        self.resend_ids = set(in_flight) | set(self._completed or ())
        self._completed = None
        return self.token, replay


class Tombstones:
    """Why recently ended resumable apps ended (``expired`` / ``gap``), for as long as a resume
    window, bounded in entries. Only a resume presenting the right token and principal learns the
    reason; anyone else gets ``unknown``."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._entries: OrderedDict[str, tuple[str, str | None, ResumeFailure, float]] = OrderedDict()
        self._max = max_entries

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, app_id: str, state: ResumeState, reason: ResumeFailure, until: float) -> None:
        """Remember that ``app_id`` ended for ``reason`` (until ``until``, monotonic)."""
        self._entries[app_id] = (state.token, state.principal_key, reason, until)
        self._entries.move_to_end(app_id)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def reason(self, app_id: str, token: str, principal_key: str | None, now: float | None = None) -> ResumeFailure:
        """The reason ``app_id`` ended, or ``unknown`` (also for a wrong token or principal); single use."""
        entry = self._entries.get(app_id)
        if entry is None:
            return "unknown"
        expected, principal, reason, until = entry
        if (time.monotonic() if now is None else now) > until:
            del self._entries[app_id]
            return "unknown"
        if not tokens_equal(token, expected) or principal != principal_key:
            return "unknown"
        del self._entries[app_id]
        return reason
