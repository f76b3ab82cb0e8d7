"""The audit log: one structured record per security-relevant decision.

Records go to the ``llmgine_ws.audit`` logger at INFO (WARNING for refusals, limits and forced
closes). Each carries ``event`` plus fields such as ``app_id``, ``user_id``, ``message_type``,
``message_id``, ``outcome`` and ``reason`` as attributes of the log record (and in its message), so
any handler or JSON formatter can pick them up. Payloads and credentials are never recorded.

Every app has its own :class:`AuditLog`; when the app has metrics, the same events are counted.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .metrics import Metrics

logger = logging.getLogger("llmgine_ws.audit")

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class AuditLog:
    """Records audit events for one app (and counts them in its metrics, if any)."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics

    def __call__(self, event: str, *, level: int = logging.INFO, **fields: Any) -> None:
        """Record one event. Field names must not be ``LogRecord`` attributes."""
        clash = _RESERVED.intersection(fields)
        if clash:
            raise ValueError(f"audit fields {sorted(clash)} clash with LogRecord attributes")
        shown = " ".join(f"{key}={value}" for key, value in fields.items() if value is not None)
        logger.log(level, "%s %s", event, shown, extra={"event": event, "audit": fields, **fields})
        metrics = self._metrics
        if metrics is None:
            return
        if event == "limit_hit":
            metrics.limit_hit(str(fields.get("limit")))
        elif event == "forced_close":
            metrics.forced_close(str(fields.get("reason")))
        elif event == "handshake_refused" or (event == "auth" and fields.get("outcome") == "refused"):
            metrics.handshake_refused("auth" if event == "auth" else str(fields.get("reason")))
        elif event == "server_request" and fields.get("outcome") != "sent":
            metrics.server_request_done(str(fields.get("outcome")), float(fields.get("duration") or 0.0))
