"""What the client does with server-initiated messages: the handler registry, and the runner that
answers server requests.

A **server request** is a frame the server sent with ``send_to_app_and_wait`` and waits on: it must
be answered with a ``server_response`` carrying the same ``message_id``. It is either

* a ``server_request`` frame: its *request type* is ``data.request_type`` (``user_input``,
  ``user_confirmation``, or any name a backend chose); or
* a server-initiated frame of a custom type (``send_to_app_and_wait(app, "ask_color", data)``) for
  which a server-request handler is registered: its request type is the frame's own ``type``.

One handler per request type answers both forms: ``client.on_server_request("ask_color")`` answers
``server_request`` frames with ``request_type: "ask_color"`` and frames of type ``ask_color``. The
answer is ``{"response_type": <request type>, **fields}``. A custom-type frame with no such handler
is an ordinary message (for ``on_message`` or ``receive()``), since the same frame is what
``send_to_app`` sends when it expects no answer; a ``server_request`` with no handler is refused at
once so the server does not wait for its timeout.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.abc

from .messages import Message

__all__ = ["CORE_SERVER_TYPES", "MessageHandler", "ServerRequestHandler", "ServerRequestRunner", "request_type_of"]

_log = logging.getLogger("llmgine_ws.client")

ServerRequestHandler = Callable[[Message], Mapping[str, Any] | Awaitable[Mapping[str, Any] | None] | None]
"""Answers a server request: returns the fields of the ``server_response`` (a mapping, or ``None``
for none), directly or through an awaitable; an exception becomes ``{"error": str(exc)}``."""

MessageHandler = Callable[[Message], Awaitable[None] | None]
"""Handles a notification or another server-initiated message (sync or async)."""

CORE_SERVER_TYPES = frozenset(
    {"connected", "notification", "engine_event", "server_ping", "server_request", "server_request_cancelled",
     "error"}
)
"""Server message types that are never server requests by their own type."""

Respond = Callable[[str, dict[str, Any]], None]
"""``respond(message_id, data)`` queues a ``server_response``."""


def request_type_of(message: Message, handlers: Mapping[str, ServerRequestHandler]) -> str | None:
    """The request type when ``message`` is a server request this client must answer, else ``None``."""
    if not message.server_initiated:
        return None
    if message.type == "server_request":
        data = message.data
        request_type = data.get("request_type") if isinstance(data, dict) else None
        return request_type if isinstance(request_type, str) else ""
    if message.type in handlers and message.type not in CORE_SERVER_TYPES:
        return message.type
    return None


class ServerRequestRunner:
    """Runs server-request handlers, each in its own task of the client's task group, and answers.

    A request the server withdraws (``server_request_cancelled``) has its handler cancelled and gets
    no answer. Requests are deduplicated by ``message_id``: one that is already being handled is
    ignored, and one already answered (the server sends every request still waiting again after a
    resume: our answer may have been lost with the old connection) gets the same answer again,
    without calling the handler twice. The last ``answered_limit`` answers are remembered.
    """

    def __init__(self, task_group: anyio.abc.TaskGroup, respond: Respond, *, answered_limit: int = 1000) -> None:
        self._task_group = task_group
        self._respond = respond
        self._running: dict[str, anyio.CancelScope] = {}
        self._answered: dict[str, dict[str, Any]] = {}
        self._answered_limit = max(0, answered_limit)

    def start(self, message: Message, request_type: str, handler: ServerRequestHandler | None) -> None:
        """Answer ``message`` with ``handler`` (refuse it at once when there is none)."""
        if message.message_id in self._running:
            return
        answered = self._answered.get(message.message_id)
        if answered is not None:
            self._respond(message.message_id, answered)
            return
        if handler is None:
            self._respond(message.message_id, {"response_type": request_type,
                                               "error": f"no handler for request_type '{request_type}'"})
            return
        scope = anyio.CancelScope()
        self._running[message.message_id] = scope
        self._task_group.start_soon(self._run, handler, message, request_type, scope)

    def reset(self) -> None:
        """The app these requests came from is gone (a failed resume): stop every handler, forget
        every answer."""
        for scope in self._running.values():
            scope.cancel()
        self._running.clear()
        self._answered.clear()

    def withdraw(self, message_id: str) -> None:
        """The server stopped waiting: stop the handler, nobody will read its answer."""
        scope = self._running.get(message_id)
        if scope is not None:
            scope.cancel()

    async def _run(self, handler: ServerRequestHandler, message: Message, request_type: str,
                   scope: anyio.CancelScope) -> None:
        answer: dict[str, Any]
        try:
            with scope:
                result = handler(message)
                if inspect.isawaitable(result):
                    result = await result
            if scope.cancel_called:
                return
            if result is None:
                result = {}
            if not isinstance(result, Mapping):
                raise TypeError(f"a server request handler returned {type(result).__name__}, expected a mapping")
            answer = {**result, "response_type": request_type}
        except Exception as exc:
            _log.debug("server request handler for %r failed", request_type, exc_info=True)
            answer = {"response_type": request_type, "error": str(exc) or type(exc).__name__}
        finally:
            if self._running.get(message.message_id) is scope:
                del self._running[message.message_id]
        if scope.cancel_called:
            return
        if self._answered_limit:
            self._answered[message.message_id] = answer
            if len(self._answered) > self._answered_limit:
                del self._answered[next(iter(self._answered))]
        self._respond(message.message_id, answer)
