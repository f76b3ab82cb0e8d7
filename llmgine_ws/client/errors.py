"""The exceptions of the Python client: every one of them is a :class:`ClientError`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .messages import Message

__all__ = ["ClientError", "ConnectionClosed", "HandshakeRejected", "RequestError", "RequestTimeout", "StateLost"]


class ClientError(Exception):
    """Base class of every error raised by the llmgine_ws client."""


class HandshakeRejected(ClientError):
    """The server answered the WebSocket opening handshake with an HTTP status other than 101.

    Attributes:
        status_code: the HTTP status code (e.g. 403).
        headers: the response headers, as ``(name, value)`` pairs decoded as latin-1.
        body: the response body.
    """

    def __init__(self, status_code: int, headers: list[tuple[str, str]], body: bytes) -> None:
        super().__init__(f"WebSocket handshake rejected with HTTP {status_code}: {body[:200]!r}")
        self.status_code = status_code
        self.headers = headers
        self.body = body


class ConnectionClosed(ClientError):
    """The connection is closed (or closing), so the operation cannot complete.

    Attributes:
        code: the WebSocket close code (1006 when the connection was lost without a close
            frame), or ``None`` if the connection is only closing and no code is known yet.
        reason: the close reason sent by the peer, or a description of what happened.
    """

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"connection closed (code={code}, reason={reason!r})")
        self.code = code
        self.reason = reason


class RequestError(ClientError):
    """The server answered a request with an ``error`` envelope.

    Attributes:
        code: the machine-readable error code (e.g. ``"SESSION_NOT_FOUND"``).
        message: the human-readable message.
        details: the optional ``details`` field (any JSON value).
        message_id: the id of the failed request.
        response: the complete error message.
    """

    def __init__(self, code: str, message: str, details: Any, message_id: str, response: Message) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details
        self.message_id = message_id
        self.response = response

    @classmethod
    def from_response(cls, response: Message) -> RequestError:
        """The error carried by an ``error`` envelope."""
        data = response.data if isinstance(response.data, dict) else {}
        return cls(
            code=str(data.get("code", "UNKNOWN_ERROR")),
            message=str(data.get("message", "")),
            details=data.get("details"),
            message_id=response.message_id,
            response=response,
        )


class RequestTimeout(ClientError, TimeoutError):
    """A bounded wait timed out: a request's response, :meth:`Client.receive`, or the opening
    of the connection (TCP connect, handshake and the ``connected`` message)."""


class StateLost(ClientError):
    """The connection dropped and the server could not resume the app: what the client had there
    (sessions, engines, running commands, questions asked) is gone.

    Requests and commands that were waiting for an answer fail with it; the client itself goes on,
    reconnected as a new app (``client.app_id``), and ``on_state_lost`` handlers get it.

    Attributes:
        reason: the server's ``reason``: ``unknown`` (no such app or token), ``expired`` (the
            resume window passed), ``gap`` (frames we missed are no longer buffered) or
            ``disabled`` (the server does not resume).
        previous_app_id: the app that was lost.
        app_id: the new app the client now is.
    """

    def __init__(self, reason: str, previous_app_id: str, app_id: str) -> None:
        super().__init__(f"the server could not resume app {previous_app_id!r} ({reason}): its sessions, "
                         f"engines and pending requests are gone; the client is now app {app_id!r}")
        self.reason = reason
        self.previous_app_id = previous_app_id
        self.app_id = app_id
