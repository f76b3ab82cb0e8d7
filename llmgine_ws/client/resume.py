"""Resume bookkeeping, sans I/O: sequence numbers, acks, the ``resume`` handshake's payloads, and
the reconnect policy.

Wire protocol (``docs/protocol.md``, "Resume"): ``connected.data`` carries ``resume_token`` and
``resume_window`` when the server keeps apps resumable; every server frame after ``connected``
carries a top-level ``seq`` (1, 2, 3… per app, never reset by a resume). A client opts in by acking
(``ack {seq}``, cumulative; its first ack may be ``seq`` 0). After a drop, the first message on a new
connection is ``resume {app_id, resume_token, last_seq}``, answered by ``resume_res``: either
``resumed: true`` (then the frames after ``last_seq``, then the server requests still pending, then
live traffic) or ``resumed: false`` with a ``reason`` (the new connection is then a new app).

Nothing here does I/O or reads a clock: the client feeds it frames and times, and sends what it
says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgspec

from .messages import Message

__all__ = [
    "RECONNECT_CLOSE_CODES",
    "RESUME_FAILURE_REASONS",
    "Reconnect",
    "ResumeOutcome",
    "ResumeState",
    "reconnect_after_rejection",
]

_log = logging.getLogger("llmgine_ws.client")

RESUME_FAILURE_REASONS = ("unknown", "expired", "gap", "disabled")
"""The ``reason`` of a ``resume_res`` with ``resumed: false``, as the server sends it."""

RECONNECT_CLOSE_CODES = frozenset({1001, 1006, 1011, 1012, 1013, 1014})
"""Close codes after which a resumable client reconnects: the connection was lost (1006), the server
went away or restarts (1001, 1012), failed (1011), is overloaded or found us too slow (1013), or a
gateway failed (1014). Any other code — 1000 (the server ended the app), 1008 (policy), 4000
("superseded": the app was resumed on another connection)… — ends the client."""

_MAX_HELD = 1000
"""Frames of the new connection's own app kept while its ``resume_res`` is awaited."""


@dataclass(frozen=True)
class Reconnect:
    """How a resumable client reconnects after a drop: exponential backoff with jitter, bounded.

    The n-th attempt (from 1) waits ``min(max_delay, initial_delay × factor^(n-1)) × (1 − jitter ×
    random)`` seconds first. The client gives up (and closes for good) after ``max_attempts``
    attempts, or once ``max_time`` seconds have passed since the drop — by default the server's
    ``resume_window``, after which a resume could only answer ``expired``.
    """

    initial_delay: float = 0.05
    max_delay: float = 5.0
    factor: float = 2.0
    jitter: float = 0.5
    max_attempts: int | None = None
    """``None``: no bound but ``max_time``."""
    max_time: float | None = None
    """``None``: the ``resume_window`` the server announced."""

    def delay(self, attempt: int, random: float) -> float:
        """Seconds to wait before attempt number ``attempt`` (from 1); ``random`` is in [0, 1)."""
        base = min(self.max_delay, self.initial_delay * self.factor ** max(0, attempt - 1))
        return max(0.0, base * (1.0 - min(max(self.jitter, 0.0), 1.0) * random))

    def gives_up(self, attempt: int, elapsed: float, window: float) -> bool:
        """Whether attempt number ``attempt``, starting ``elapsed`` seconds after the drop, is one too many."""
        if self.max_attempts is not None and attempt > self.max_attempts:
            return True
        limit = self.max_time if self.max_time is not None else window
        return elapsed > limit


def reconnect_after_rejection(status_code: int) -> bool:
    """Whether an HTTP status refusing a reconnect's handshake is worth another attempt: overload,
    shutdown and timeouts are (408, 429, 5xx); a refused origin or credentials (403…) are not."""
    return status_code in (408, 429) or status_code >= 500


class ResumeOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """How a reconnect ended: ``client.last_resume``, and what ``on_resumed`` handlers get.

    Attributes:
        resumed: ``True`` when the server restored the app (nothing was lost).
        app_id: the app the client now is (the old one when resumed, else the new connection's).
        previous_app_id: the app the client was before the drop.
        reason: why the state was lost (``unknown``, ``expired``, ``gap``, ``disabled``), else ``None``.
        replayed: frames the server replayed (sent before the drop, not received).
        sessions: the app's sessions as the server listed them (``session_id``, ``status``, ``engine``).
    """

    resumed: bool
    app_id: str
    previous_app_id: str
    reason: str | None = None
    replayed: int = 0
    sessions: list[dict[str, Any]] = msgspec.field(default_factory=list)


class ResumeState:
    """What the client must remember to resume: its app, token, and the frames it has seen and acked."""

    def __init__(self, *, enabled: bool, ack_frames: int) -> None:
        self.enabled = enabled
        self.ack_frames = max(1, ack_frames)
        self.app_id = ""
        self.token: str | None = None
        self.window = 0.0
        self.last_seq = 0
        """The highest ``seq`` received (frames at or below it are duplicates)."""
        self.acked_seq = -1
        """The highest ``seq`` acked (-1: never acked, so the server keeps nothing for us)."""
        self.duplicates = 0
        """Frames dropped because their ``seq`` had been seen (a replay overlapping what arrived)."""
        self._resume_id: str | None = None
        self._next_app_id = ""
        self._next_token: str | None = None
        self._next_window = 0.0
        self._held: list[Message] = []

    # ---------------------------------------------------------------- the live connection

    @property
    def resumable(self) -> bool:
        """Whether a drop now can be resumed: on, and the server gave us a token."""
        return self.enabled and self.token is not None

    def connected(self, data: Any) -> None:
        """The first connection's ``connected`` data: remember the app and its token."""
        self.app_id, self.token, self.window = _connected_fields(data)
        self.last_seq = 0
        self.acked_seq = -1

    def accept(self, seq: int | None) -> bool:
        """A frame with this ``seq`` arrived: ``False`` if it is a duplicate to drop."""
        if seq is None or not self.enabled:
            return True
        if seq <= self.last_seq:
            self.duplicates += 1
            return False
        if seq != self.last_seq + 1 and self.last_seq:
            _log.warning("server frames %d..%d never arrived (seq jumped)", self.last_seq + 1, seq - 1)
        self.last_seq = seq
        return True

    def ack_due(self, *, periodic: bool) -> int | None:
        """The ``seq`` to ack now, or ``None``: every ``ack_frames`` frames, and at each period
        while anything is unacked; the very first ack (``seq`` 0) opts in at once."""
        if not self.resumable:
            return None
        if self.acked_seq < 0:
            return self.last_seq
        unacked = self.last_seq - self.acked_seq
        if unacked >= self.ack_frames or (periodic and unacked > 0):
            return self.last_seq
        return None

    def acked(self, seq: int) -> None:
        self.acked_seq = max(self.acked_seq, seq)

    # ---------------------------------------------------------------- the resume handshake

    def resume_request(self, connected_data: Any, message_id: str) -> dict[str, Any]:
        """The new connection's ``connected`` data is in: the ``resume`` payload to send first."""
        self._next_app_id, self._next_token, self._next_window = _connected_fields(connected_data)
        self._resume_id = message_id
        self._held = []
        return {"app_id": self.app_id, "resume_token": self.token, "last_seq": self.last_seq}

    def is_answer(self, message: Message) -> bool:
        """Whether ``message`` answers our ``resume`` (a ``resume_res``, or an ``error`` from a
        server that does not know the message)."""
        if self._resume_id is None:
            return False
        return message.type == "resume_res" or (message.type == "error" and message.message_id == self._resume_id)

    def hold(self, message: Message) -> None:
        """A frame of the new connection's app, before ``resume_res``: kept until we know whose it is."""
        if len(self._held) < _MAX_HELD:
            self._held.append(message)
        else:
            _log.warning("dropped a frame that arrived before resume_res (more than %d)", _MAX_HELD)

    def finish(self, message: Message) -> tuple[ResumeOutcome, list[Message]]:
        """Take the answer to ``resume``; return the outcome and the frames to deliver now (those of
        the new app when the resume failed; none when it succeeded: they were the discarded app's)."""
        data = message.data if isinstance(message.data, dict) else {}
        previous = self.app_id
        held, self._held, self._resume_id = self._held, [], None
        if message.type == "resume_res" and data.get("resumed") is True:
            token = data.get("resume_token")
            self.token = token if isinstance(token, str) else None
            app_id = data.get("app_id")
            self.app_id = app_id if isinstance(app_id, str) else self.app_id
            replayed = data.get("replayed")
            sessions = data.get("sessions")
            outcome = ResumeOutcome(resumed=True, app_id=self.app_id, previous_app_id=previous,
                                    replayed=replayed if isinstance(replayed, int) else 0,
                                    sessions=[s for s in sessions if isinstance(s, dict)]
                                    if isinstance(sessions, list) else [])
            return outcome, []
        if message.type == "resume_res":
            reason = data.get("reason")
            reason = reason if isinstance(reason, str) else "unknown"
            app_id, token = data.get("app_id"), data.get("resume_token")
            self.app_id = app_id if isinstance(app_id, str) else self._next_app_id
            self.token = token if isinstance(token, str) else self._next_token
        else:  # an error: a server without resume
            code = data.get("code")
            _log.warning("the server refused resume (%s): it does not keep apps across connections", code)
            reason = "disabled"
            self.app_id, self.token = self._next_app_id, self._next_token
        self.window = self._next_window
        self.last_seq = 0
        self.acked_seq = -1
        return ResumeOutcome(resumed=False, app_id=self.app_id, previous_app_id=previous, reason=reason), held


def _connected_fields(data: Any) -> tuple[str, str | None, float]:
    data = data if isinstance(data, dict) else {}
    app_id = data.get("app_id")
    token = data.get("resume_token")
    window = data.get("resume_window")
    return (app_id if isinstance(app_id, str) else "", token if isinstance(token, str) and token else None,
            float(window) if isinstance(window, int | float) and not isinstance(window, bool) else 0.0)
