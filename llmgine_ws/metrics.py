"""Prometheus metrics for one app, served at ``/metrics`` (needs the ``metrics`` extra).

Each app has its own registry, so two apps in one process never mix their numbers. Live state
(connections, sessions, engines, pending server requests) is read at scrape time; events are
counted where they happen in plain dictionaries (a lookup and an increment per event) and
exposed as Prometheus families when scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping
from itertools import accumulate
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
    "remote_links_served": "Apps of this node resumed through another node (their socket is there)",
    "remote_links_proxied": "Sockets of this node serving apps of other nodes (resumed here)",
}


class _Histogram:
    """One label value's histogram: counts per bucket (not cumulative), sum and count."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self, size: int) -> None:
        self.buckets = [0] * size
        self.count = 0
        self.sum = 0.0


_FAMILIES: dict[str, tuple[str, str, str]] = {
    # attribute: (metric name, help, label)
    "messages_in": ("llmgine_ws_messages_in", "Client messages decoded, by type", "type"),
    "messages_out": ("llmgine_ws_messages_out", "Server messages encoded, by type (a broadcast counts once)", "type"),
    "errors": ("llmgine_ws_errors", "Error envelopes sent, by code", "code"),
    "server_requests": ("llmgine_ws_server_requests", "Server requests by outcome", "outcome"),
    "limits": ("llmgine_ws_limit_hits", "Limits hit, by limit (rate, connections, sessions...)", "limit"),
    "forced_closes": ("llmgine_ws_forced_closes", "Connections closed by the server, by reason", "reason"),
    "handshakes_refused": ("llmgine_ws_handshakes_refused", "Handshakes refused, by reason", "reason"),
    "resumes": ("llmgine_ws_resumes", "Resume attempts, by outcome (resumed, unknown, expired, gap, disabled)",
                "outcome"),
}
_HISTOGRAMS: dict[str, tuple[str, str, str]] = {
    "request_seconds": ("llmgine_ws_request_duration_seconds",
                        "Time from a client request's arrival to its reply, by type", "type"),
    "server_request_seconds": ("llmgine_ws_server_request_duration_seconds",
                               "Time a server request waited for its answer, by outcome", "outcome"),
}


class Metrics:
    """The app's counters and histograms.

    Events are counted in plain dictionaries (a lookup and an integer add per event, no lock: every
    event happens on the event loop) and turned into Prometheus metric families when ``/metrics`` is
    scraped. With ``prometheus_client``'s own ``Counter``/``Histogram`` (a label lookup and a lock
    per event) metrics were 15% of a server request's cost (docs/performance.md).
    """

    def __init__(self, state: LiveState) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=True)
        self.messages_in: dict[str, int] = {}
        self.messages_out: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.server_requests: dict[str, int] = {}
        self.limits: dict[str, int] = {}
        self.forced_closes: dict[str, int] = {}
        self.handshakes_refused: dict[str, int] = {}
        self.resumes: dict[str, int] = {}
        self.replayed_frames = 0
        self.replayed_bytes = 0
        self.request_seconds: dict[str, _Histogram] = {}
        self.server_request_seconds: dict[str, _Histogram] = {}
        self.registry.register(_EventCollector(self))
        self.registry.register(_StateCollector(state))

    @staticmethod
    def _observe(histograms: dict[str, _Histogram], label: str, seconds: float) -> None:
        histogram = histograms.get(label)
        if histogram is None:
            histogram = histograms[label] = _Histogram(len(LATENCY_BUCKETS) + 1)
        histogram.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        histogram.count += 1
        histogram.sum += seconds

    def message_in(self, message_type: str) -> None:
        """A client message of ``message_type`` was decoded."""
        counts = self.messages_in
        counts[message_type] = counts.get(message_type, 0) + 1

    def message_out(self, message_type: str) -> None:
        """A server message of ``message_type`` was encoded."""
        counts = self.messages_out
        counts[message_type] = counts.get(message_type, 0) + 1

    def error(self, code: str) -> None:
        """An error envelope with ``code`` was sent."""
        self.errors[code] = self.errors.get(code, 0) + 1

    def request_done(self, message_type: str, seconds: float) -> None:
        """A client request was answered after ``seconds``."""
        self._observe(self.request_seconds, message_type, seconds)

    def server_request_done(self, outcome: str, seconds: float) -> None:
        """A server request ended (answered, timed_out, disconnected...) after ``seconds``."""
        self.server_requests[outcome] = self.server_requests.get(outcome, 0) + 1
        self._observe(self.server_request_seconds, outcome, seconds)

    def limit_hit(self, limit: str) -> None:
        """A limit refused something."""
        self.limits[limit] = self.limits.get(limit, 0) + 1

    def forced_close(self, reason: str) -> None:
        """The server closed a connection (queue full, rate-limit abuse, missed pongs, too big...)."""
        self.forced_closes[reason] = self.forced_closes.get(reason, 0) + 1

    def handshake_refused(self, reason: str) -> None:
        """A handshake was refused (auth, origin, caps, shutdown)."""
        self.handshakes_refused[reason] = self.handshakes_refused.get(reason, 0) + 1

    def resume(self, outcome: str, frames: int = 0, size: int = 0) -> None:
        """A resume attempt ended with ``outcome``; ``frames`` (``size`` characters) were replayed."""
        self.resumes[outcome] = self.resumes.get(outcome, 0) + 1
        self.replayed_frames += frames
        self.replayed_bytes += size

    def observe_audit(self, event: str, fields: Mapping[str, Any]) -> None:
        """Count what the audit log records (an :data:`~llmgine_ws.audit.AuditObserver`)."""
        if event == "server_request":
            outcome = fields.get("outcome")
            if outcome != "sent":
                self.server_request_done(str(outcome), float(fields.get("duration") or 0.0))
        elif event == "limit_hit":
            self.limit_hit(str(fields.get("limit")))
        elif event == "forced_close":
            self.forced_close(str(fields.get("reason")))
        elif event == "handshake_refused" or (event == "auth" and fields.get("outcome") == "refused"):
            self.handshake_refused("auth" if event == "auth" else str(fields.get("reason")))

    def render(self) -> tuple[bytes, str]:
        """The exposition (body, content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EventCollector:
    """The counters and histograms of :class:`Metrics`, as metric families at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        for attribute, (name, description, label) in _FAMILIES.items():
            family = CounterMetricFamily(name, description, labels=[label])
            for value, count in list(getattr(self._metrics, attribute).items()):
                family.add_metric([value], count)
            yield family
        for name, description, value in (
                ("llmgine_ws_replayed_frames", "Frames replayed after a resume", self._metrics.replayed_frames),
                ("llmgine_ws_replayed_bytes", "Characters replayed after a resume", self._metrics.replayed_bytes)):
            yield CounterMetricFamily(name, description, value=value)
        bounds = [*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf"]
        for attribute, (name, description, label) in _HISTOGRAMS.items():
            histogram_family = HistogramMetricFamily(name, description, labels=[label])
            for value, histogram in list(getattr(self._metrics, attribute).items()):
                cumulative = list(accumulate(histogram.buckets))
                histogram_family.add_metric([value], list(zip(bounds, cumulative, strict=True)), histogram.sum)
            yield histogram_family


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
