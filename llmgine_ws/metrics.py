"""Prometheus metrics for one app, served at ``/metrics`` (needs the ``metrics`` extra).

Each app has its own registry, so two apps in one process never mix their numbers. Live state
(connections, sessions, engines, pending server requests) is read at scrape time; events are
counted where they happen, through label children cached per label value to keep the per-frame
cost to a dictionary lookup and an increment.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def metrics_available() -> bool:
    """Whether ``prometheus-client`` is installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


class LiveState(Protocol):
    """The live figures read at scrape time (the app's runtime provides them)."""

    def live_counts(self) -> Mapping[str, int]:
        """``connections``, ``sessions``, ``engines``, ``pending_server_requests``, ``ready`` (0/1), ..."""


_GAUGES = {
    "connections": "Open connections",
    "sessions": "Live sessions",
    "engines": "Sessions with an engine",
    "pending_server_requests": "Server requests waiting for an answer",
    "ready": "1 while ready to take traffic",
    "detached_apps": "Resumable apps whose socket dropped, waiting for a resume",
    "resume_buffer_bytes": "Characters held by the replay buffers of this node",
    "resume_buffer_evictions": "Unacked frames evicted from full replay buffers since start (a later resume is gap)",
}


class Metrics:
    """The app's counters and histograms."""

    def __init__(self, state: LiveState) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self._messages_in = Counter("llmgine_ws_messages_in", "Client messages decoded, by type", ["type"],
                                    registry=registry)
        self._messages_out = Counter("llmgine_ws_messages_out", "Server messages encoded, by type (a broadcast "
                                     "counts once)", ["type"], registry=registry)
        self._errors = Counter("llmgine_ws_errors", "Error envelopes sent, by code", ["code"], registry=registry)
        self._server_requests = Counter("llmgine_ws_server_requests", "Server requests by outcome", ["outcome"],
                                        registry=registry)
        self._request_seconds = Histogram("llmgine_ws_request_duration_seconds",
                                          "Time from a client request's arrival to its reply, by type", ["type"],
                                          buckets=LATENCY_BUCKETS, registry=registry)
        self._server_request_seconds = Histogram("llmgine_ws_server_request_duration_seconds",
                                                 "Time a server request waited for its answer, by outcome",
                                                 ["outcome"], buckets=LATENCY_BUCKETS, registry=registry)
        self._limits = Counter("llmgine_ws_limit_hits", "Limits hit, by limit (rate, connections, sessions...)",
                               ["limit"], registry=registry)
        self._forced_closes = Counter("llmgine_ws_forced_closes", "Connections closed by the server, by reason",
                                      ["reason"], registry=registry)
        self._handshakes_refused = Counter("llmgine_ws_handshakes_refused", "Handshakes refused, by reason",
                                           ["reason"], registry=registry)
        self._resumes = Counter("llmgine_ws_resumes", "Resume attempts, by outcome (resumed, unknown, expired, gap, "
                                "disabled)", ["outcome"], registry=registry)
        self._replayed_frames = Counter("llmgine_ws_replayed_frames", "Frames replayed after a resume",
                                        registry=registry)
        self._replayed_bytes = Counter("llmgine_ws_replayed_bytes", "Characters replayed after a resume",
                                       registry=registry)
        self._children: dict[tuple[int, str], Any] = {}
        registry.register(_StateCollector(state))

    def _child(self, metric: Any, label: str) -> Any:
        key = (id(metric), label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(label)
        return child

    def message_in(self, message_type: str) -> None:
        """A client message of ``message_type`` was decoded."""
        self._child(self._messages_in, message_type).inc()

    def message_out(self, message_type: str) -> None:
        """A server message of ``message_type`` was encoded."""
        self._child(self._messages_out, message_type).inc()

    def error(self, code: str) -> None:
        """An error envelope with ``code`` was sent."""
        self._child(self._errors, code).inc()

    def request_done(self, message_type: str, seconds: float) -> None:
        """A client request was answered after ``seconds``."""
        self._child(self._request_seconds, message_type).observe(seconds)

    def server_request_done(self, outcome: str, seconds: float) -> None:
        """A server request ended (answered, timed_out, disconnected...) after ``seconds``."""
        self._child(self._server_requests, outcome).inc()
        self._child(self._server_request_seconds, outcome).observe(seconds)

    def limit_hit(self, limit: str) -> None:
        """A limit refused something."""
        self._child(self._limits, limit).inc()

    def forced_close(self, reason: str) -> None:
        """The server closed a connection (queue full, rate-limit abuse, missed pongs, too big...)."""
        self._child(self._forced_closes, reason).inc()

    def handshake_refused(self, reason: str) -> None:
        """A handshake was refused (auth, origin, caps, shutdown)."""
        self._child(self._handshakes_refused, reason).inc()

    def resume(self, outcome: str, frames: int = 0, size: int = 0) -> None:
        """A resume attempt ended with ``outcome``; ``frames`` (``size`` characters) were replayed."""
        self._child(self._resumes, outcome).inc()
        if frames:
            self._replayed_frames.inc(frames)
            self._replayed_bytes.inc(size)

    def observe_audit(self, event: str, fields: Mapping[str, Any]) -> None:
        """Count what the audit log records (an :data:`~llmgine_ws.audit.AuditObserver`)."""
        if event == "limit_hit":
            self.limit_hit(str(fields.get("limit")))
        elif event == "forced_close":
            self.forced_close(str(fields.get("reason")))
        elif event == "handshake_refused" or (event == "auth" and fields.get("outcome") == "refused"):
            self.handshake_refused("auth" if event == "auth" else str(fields.get("reason")))
        elif event == "server_request" and fields.get("outcome") != "sent":
            self.server_request_done(str(fields.get("outcome")), float(fields.get("duration") or 0.0))

    def render(self) -> tuple[bytes, str]:
        """The exposition (body, content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StateCollector:
    """Gauges read at scrape time (nothing to keep in sync on the hot path)."""

    def __init__(self, state: LiveState) -> None:
        self._state = state

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        counts = self._state.live_counts()
        for name, description in _GAUGES.items():
            yield GaugeMetricFamily(f"llmgine_ws_{name}", description, value=counts.get(name, 0))
