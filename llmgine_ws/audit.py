"""The audit log: one structured record per security-relevant decision.

Records go to the ``llmgine_ws.audit`` logger at INFO (WARNING for refusals and forced closes).
Each carries ``event`` plus fields such as ``app_id``, ``user_id``, ``message_type``,
``message_id``, ``outcome`` and ``reason`` as attributes of the log record (and in its message), so
any handler or JSON formatter can pick them up. Payloads and credentials are never recorded.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("llmgine_ws.audit")

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def audit(event: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Record one audit event. Field names must not be ``LogRecord`` attributes."""
    clash = _RESERVED.intersection(fields)
    if clash:
        raise ValueError(f"audit fields {sorted(clash)} clash with LogRecord attributes")
    shown = " ".join(f"{key}={value}" for key, value in fields.items() if value is not None)
    logger.log(level, "%s %s", event, shown, extra={"event": event, "audit": fields, **fields})
