"""Error codes and exceptions.

Two families live here:

* :class:`ErrorCode` and :class:`ProtocolError` — what a *client* sees. A handler raises
  ``ProtocolError(ErrorCode.SESSION_NOT_FOUND, "...")`` and the endpoint answers the request with an
  ``error`` envelope carrying that code; any other exception becomes ``INTERNAL_ERROR`` (the
  traceback goes to the log, never to the client).
* :class:`MessagingError` and its subclasses — what *server-side* code calling the messaging API
  sees (``AppNotConnected``, ``AppDisconnected``, ...).
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.StrEnum):
    """Codes carried in ``error`` envelopes (``data.code``)."""

    # The seed protocol's codes.
    SESSION_NOT_FOUND = "SESSION_NOT_FOUND"
    ENGINE_NOT_FOUND = "ENGINE_NOT_FOUND"
    INVALID_ENGINE_TYPE = "INVALID_ENGINE_TYPE"
    ENGINE_CREATION_FAILED = "ENGINE_CREATION_FAILED"
    INVALID_MESSAGE_TYPE = "INVALID_MESSAGE_TYPE"
    INVALID_JSON = "INVALID_JSON"
    VALIDATION_ERROR = "VALIDATION_ERROR"
    WEBSOCKET_ERROR = "WEBSOCKET_ERROR"
    # Ours, where they say more than the seed's.
    FORBIDDEN = "FORBIDDEN"
    SESSION_LIMIT_REACHED = "SESSION_LIMIT_REACHED"
    UNKNOWN_REQUEST = "UNKNOWN_REQUEST"
    DUPLICATE_MESSAGE_ID = "DUPLICATE_MESSAGE_ID"
    TOO_MANY_REQUESTS = "TOO_MANY_REQUESTS"
    ENGINE_EXISTS = "ENGINE_EXISTS"
    RATE_LIMITED = "RATE_LIMITED"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    CANCELLED = "CANCELLED"
    INTERNAL_ERROR = "INTERNAL_ERROR"


class ProtocolError(Exception):
    """Raise from a handler to answer the request with an ``error`` envelope.

    ``details`` must be JSON-serialisable; it is sent to the client as is, so never put secrets,
    tracebacks or other apps' data in it.
    """

    def __init__(self, code: ErrorCode | str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.code = str(code)
        self.message = message
        self.details = details

    def __repr__(self) -> str:
        return f"ProtocolError({self.code!r}, {self.message!r}, details={self.details!r})"


class MessagingError(Exception):
    """Base class of the errors raised by the server-side messaging API."""


class AppNotConnected(MessagingError):
    """The target app is not connected (anywhere this server can reach)."""

    def __init__(self, app_id: str) -> None:
        super().__init__(f"app {app_id!r} is not connected")
        self.app_id = app_id


class SessionNotFound(MessagingError):
    """The target session does not exist (or has expired)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} not found")
        self.session_id = session_id


class AppDisconnected(MessagingError):
    """The app disconnected while a server request to it was waiting for its answer."""

    def __init__(self, app_id: str, message_id: str | None = None) -> None:
        detail = f" while request {message_id!r} was pending" if message_id else ""
        super().__init__(f"app {app_id!r} disconnected{detail}")
        self.app_id = app_id
        self.message_id = message_id


class ServerRequestTimeout(TimeoutError, MessagingError):
    """The app did not answer a server request within its timeout (an expected outcome: users walk away).

    A ``TimeoutError``, so code written for the plain one keeps working.
    """

    def __init__(self, app_id: str, message_id: str, timeout: float) -> None:
        super().__init__(f"app {app_id!r} did not answer request {message_id!r} within {timeout:g}s")
        self.app_id = app_id
        self.message_id = message_id
        self.timeout = timeout


class ServerShuttingDown(MessagingError):
    """The server is shutting down; the operation was abandoned."""

    def __init__(self, app_id: str | None = None, message_id: str | None = None) -> None:
        super().__init__("the server is shutting down")
        self.app_id = app_id
        self.message_id = message_id


class PendingRequestLimit(MessagingError):
    """The app already has the maximum number of server requests waiting for an answer."""

    def __init__(self, app_id: str, limit: int) -> None:
        super().__init__(f"app {app_id!r} already has {limit} server requests pending")
        self.app_id = app_id
        self.limit = limit


class ServerRequestFailed(MessagingError):
    """The client answered a server request with an error (``data.error`` in its ``server_response``)."""

    def __init__(self, app_id: str, message_id: str, error: Any, data: dict[str, Any]) -> None:
        super().__init__(f"app {app_id!r} answered request {message_id!r} with an error: {error}")
        self.app_id = app_id
        self.message_id = message_id
        self.error = error
        self.data = data


class RateLimited(MessagingError):
    """A server-side rate limit (e.g. on broadcasts) refused the operation; retry after ``retry_after`` s."""

    def __init__(self, what: str, retry_after: float) -> None:
        super().__init__(f"{what} rate limit reached; retry after {retry_after:.3f}s")
        self.retry_after = retry_after


class BackplaneUnavailable(MessagingError):
    """The cluster backplane (message broker) cannot be reached, so the message could not be routed.

    Raised instead of silently dropping a message bound for (or possibly bound for) another node.
    ``reached_locally`` is the number of apps on *this* node that a fan-out (broadcast, user, group)
    did reach before the remote part failed; ``None`` for a single-app operation.
    """

    def __init__(self, detail: str, reached_locally: int | None = None) -> None:
        super().__init__(f"cluster backplane unavailable: {detail}")
        self.detail = detail
        self.reached_locally = reached_locally


class MessageTooLarge(MessagingError):
    """The message does not fit the backplane's largest message (``size`` > ``limit`` bytes)."""

    def __init__(self, size: int, limit: int, backplane: str) -> None:
        super().__init__(f"message of {size} bytes exceeds the {backplane} backplane's limit of {limit} bytes")
        self.size = size
        self.limit = limit
        self.backplane = backplane
