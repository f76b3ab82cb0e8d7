"""The audit log: one structured record per security-relevant decision.

Records go to the ``llmgine_ws.audit`` logger at INFO (WARNING for refusals, limits and forced
closes). Each carries ``event`` plus fields such as ``app_id``, ``user_id``, ``message_type``,
``message_id``, ``outcome`` and ``reason`` as attributes of the log record (and in its message), so
any handler or JSON formatter can pick them up. Payloads and credentials are never recorded.

Every app has its own :class:`AuditLog`; an observer (the app's metrics, when it has them) sees
every event recorded. A hot path may skip a record nobody writes (:meth:`AuditLog.logs`) and tell the
observer only what it counts (:meth:`AuditLog.observe`): a server request's final outcome.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger("llmgine_ws.audit")

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

_PLAIN = re.compile(r"^[A-Za-z0-9._:/@+\-\[\]]*$")
"""Values shown bare in the text line; anything else is quoted, so a client-supplied value (an
Origin header, say) can never pass for another field (``origin=x outcome=accepted``)."""

AuditObserver = Callable[[str, Mapping[str, Any]], None]
"""Called with ``(event, fields)`` for every audit record."""


class AuditLog:
    """Records audit events for one app (and tells its observer, if any)."""

    def __init__(self, observer: AuditObserver | None = None) -> None:
        self._observer = observer

    def __call__(self, event: str, *, level: int = logging.INFO, **fields: Any) -> None:
        """Record one event. Field names must not be ``LogRecord`` attributes.

        The text line is built only when the ``llmgine_ws.audit`` logger takes records of ``level``:
        with audit logging off an event costs the observer's call and little more.
        """
        if logger.isEnabledFor(level):
            clash = _RESERVED.intersection(fields)
            if clash:
                raise ValueError(f"audit fields {sorted(clash)} clash with LogRecord attributes")
            shown = " ".join(f"{key}={_shown(value)}" for key, value in fields.items() if value is not None)
            logger.log(level, "%s %s", event, shown, extra={"event": event, "audit": fields, **fields})
        if self._observer is not None:
            self._observer(event, fields)

    def logs(self, level: int = logging.INFO) -> bool:
        """Whether records of ``level`` are written (hot paths skip building records nobody logs)."""
        return logger.isEnabledFor(level)

    def observe(self, event: str, fields: Mapping[str, Any]) -> None:
        """Tell the observer only: for a hot path's event that :meth:`logs` says is not written."""
        if self._observer is not None:
            self._observer(event, fields)


def _shown(value: Any) -> str:
    text = str(value)
    return text if _PLAIN.match(text) else json.dumps(text)
