"""Log output: text or JSON lines, with the context (app_id, message_id...) of each record.

The package only *emits* records, one logger per area (``llmgine_ws.endpoint``, ``.dispatch``,
``.runtime``, ``.engines``, ``.messaging``, ``.audit``...), with ``app_id`` / ``message_id`` /
``session_id`` as record attributes wherever they are known. Configuring output is the process's
job: the CLI does it with :func:`logging_config` (``LLMGINE_API_LOG_FORMAT=json`` for JSON lines);
with plain uvicorn pass the same dictionary as ``--log-config`` (a JSON file).

When nobody configured logging at all (plain ``uvicorn myapp:app`` configures only uvicorn's own
loggers), :func:`install_fallback_handler` gives the ``llmgine_ws`` logger a handler of its own when
the app starts, so INFO and audit lines are not dropped and warnings carry their level and logger. A
process that configures logging itself (a handler on the root logger or on ``llmgine_ws``) keeps
full control: nothing is installed, and records propagate to its handlers.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import msgspec

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime",
                                                                                   "color_message", "audit"}
CONTEXT_FIELDS = ("app_id", "user_id", "session_id", "message_id", "message_type")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in record.__dict__.items() if key not in _STANDARD and value is not None}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then every extra field of the record."""

    def __init__(self) -> None:
        super().__init__()
        self._encoder = msgspec.json.Encoder(enc_hook=str)

    def format(self, record: logging.LogRecord) -> str:
        """Render the record."""
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return self._encoder.encode(payload).decode()


class ContextFormatter(logging.Formatter):
    """Text lines that end with the record's context, e.g. ``[app_id=… message_id=…]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Render the record."""
        text = super().format(record)
        message = record.message  # set by super().format(): not formatted again per context field
        context = " ".join(f"{key}={getattr(record, key)}" for key in CONTEXT_FIELDS
                           if getattr(record, key, None) is not None and key not in message)
        if context:
            first, newline, rest = text.partition("\n")
            text = f"{first} [{context}]{newline}{rest}"
        return text


_QUERY_TOKEN = re.compile(r"([?&]token=)[^&\s\"']*")


class RedactQueryTokens(logging.Filter):
    """Hides the value of a ``token`` query parameter in a record's arguments (uvicorn's access lines
    and its ``"WebSocket /api/ws?token=…" [accepted]`` lines show the full URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the record in place; always keep it."""
        if isinstance(record.args, tuple) and any(isinstance(arg, str) and "token=" in arg for arg in record.args):
            record.args = tuple(_QUERY_TOKEN.sub(r"\1<redacted>", arg) if isinstance(arg, str) else arg
                                for arg in record.args)
        elif isinstance(record.msg, str) and "token=" in record.msg:
            record.msg = _QUERY_TOKEN.sub(r"\1<redacted>", record.msg)
        return True


def logging_config(log_format: str = "text", level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dictionary for llmgine_ws and uvicorn (uvicorn's ``log_config``)."""
    level = level.upper()
    if log_format == "json":
        formatters: dict[str, Any] = {
            "app": {"()": f"{__name__}.JSONFormatter"},
            "access": {"()": f"{__name__}.JSONFormatter"},
        }
    else:
        formatters = {
            "app": {"()": f"{__name__}.ContextFormatter"},
            "access": {"()": "uvicorn.logging.AccessFormatter",
                       "fmt": '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s'},
        }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": formatters,
        "filters": {"redact": {"()": f"{__name__}.RedactQueryTokens"}},
        "handlers": {
            "app": {"class": "logging.StreamHandler", "formatter": "app", "stream": "ext://sys.stderr",
                    "filters": ["redact"]},
            "access": {"class": "logging.StreamHandler", "formatter": "access", "stream": "ext://sys.stdout",
                       "filters": ["redact"]},
        },
        "loggers": {
            "llmgine_ws": {"handlers": ["app"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["app"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["access"], "level": level, "propagate": False},
        },
    }


def install_fallback_handler(log_format: str = "text", level: str = "info") -> logging.Handler | None:
    """Give the ``llmgine_ws`` logger a stderr handler (text or JSON lines, at ``level``) when logging has
    not been configured: neither the root logger nor ``llmgine_ws`` has a handler. Returns the handler
    installed (None when the process configured logging itself, or one was installed before)."""
    package = logging.getLogger("llmgine_ws")
    if package.handlers or logging.getLogger().handlers:
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else ContextFormatter())
    package.addHandler(handler)
    if package.level == logging.NOTSET:
        package.setLevel(level.upper())
    return handler
