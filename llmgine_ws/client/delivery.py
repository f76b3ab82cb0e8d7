"""Where each incoming message goes, in wire order.

The client's reader queues every message; one delivery task takes them in order and, for each one,
hands a response to the request waiting for it, feeds a command its event or result, starts a
server-request handler, runs the ``on_message`` handlers (awaited, one at a time) or puts it in
the inbox of :meth:`Client.receive`. Because one task does all of it, a request's response never
overtakes the messages sent before it.

Two exceptions keep that from deadlocking: a request (or command) made from *inside* a message
handler is answered by the reader directly, since the delivery task is busy running that very
handler; and a command whose consumer falls ``max_queue`` events behind is cancelled rather than
allowed to stall delivery.

Everything here belongs to the client, not to a socket: pending requests and handlers survive a
replaced transport.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

import anyio
import anyio.abc

from .backoff import retry_after_of
from .engines import Command
from .errors import ConnectionClosed
from .handlers import MessageHandler, Respond, ServerRequestHandler, ServerRequestRunner, request_type_of
from .inbox import Inbox
from .messages import Message

__all__ = ["Delivery", "Waiter"]

_log = logging.getLogger("llmgine_ws.client")

_ABANDONED_LIMIT = 1000
"""How many abandoned commands are remembered (their late frames are then dropped quietly)."""


class Waiter:
    """A request waiting for its response (``None`` when the connection ended first, ``error`` when
    it cannot be answered any more: the server lost the app's state).

    ``frame`` is the request as sent (sent again, same ``message_id``, after a resume); ``link`` is
    the connection it was last sent on (-1: not sent yet).
    """

    __slots__ = ("error", "event", "frame", "link", "response")

    def __init__(self, frame: str | None = None) -> None:
        self.event = anyio.Event()
        self.response: Message | None = None
        self.error: BaseException | None = None
        self.frame = frame
        self.link = -1

    def resolve(self, response: Message | None) -> None:
        self.response = response
        self.event.set()

    def fail(self, error: BaseException) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()


class _HandlerCall:
    """Marks a running message handler: requests it makes are answered by the reader directly."""

    __slots__ = ("active", "delivery")

    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery
        self.active = True


_running_handler: ContextVar[_HandlerCall | None] = ContextVar("llmgine_ws_client_handler", default=None)


class Delivery:
    """The client's routing state: pending requests, running commands, handlers, inbox."""

    def __init__(self, task_group: anyio.abc.TaskGroup, respond: Respond, *, inbox_limit: int,
                 on_refused: Callable[[float], None]) -> None:
        self.pending: dict[str, Waiter] = {}
        self.commands: dict[str, Command] = {}
        self.message_handlers: dict[str, list[MessageHandler]] = {}
        self.request_handlers: dict[str, ServerRequestHandler] = {}
        self.inbox = Inbox(inbox_limit)
        self.finished = False
        self._abandoned: dict[str, None] = {}
        self._direct: set[str] = set()
        self._on_refused = on_refused
        self._server_requests = ServerRequestRunner(task_group, respond)

    # ---------------------------------------------------------------- registering

    def in_use(self, message_id: str) -> bool:
        """Whether ``message_id`` belongs to a request or command still waiting for its answer."""
        return message_id in self.pending or message_id in self.commands

    def expect(self, message_id: str, frame: str | None = None) -> Waiter:
        """Register a request about to be sent; its answer is delivered to the returned waiter."""
        waiter = self.pending[message_id] = Waiter(frame)
        if self._in_handler():
            self._direct.add(message_id)
        return waiter

    def forget(self, message_id: str, waiter: Waiter) -> None:
        """The request is over (answered, timed out or cancelled)."""
        if self.pending.get(message_id) is waiter:
            del self.pending[message_id]
        self._direct.discard(message_id)

    def track(self, command: Command) -> None:
        """Route a command's events and result to it."""
        self.commands[command.message_id] = command
        if self._in_handler():
            self._direct.add(command.message_id)

    def untrack(self, message_id: str) -> None:
        self.commands.pop(message_id, None)
        self._direct.discard(message_id)

    def drop(self, message_id: str) -> None:
        """Frames still to come for ``message_id`` (an abandoned command, a cancel nobody waits for)
        are dropped quietly."""
        self.untrack(message_id)
        self._abandoned[message_id] = None
        if len(self._abandoned) > _ABANDONED_LIMIT:
            del self._abandoned[next(iter(self._abandoned))]

    # ---------------------------------------------------------------- delivering

    def deliver_now(self, message: Message) -> bool:
        """Called by the reader: deliver at once the answer to a request made inside a handler."""
        if self._direct and _target(message) in self._direct:
            return self.settle(message)
        return False

    def settle(self, message: Message) -> bool:
        """Hand an answer to its request or command (or drop it if abandoned); ``True`` if it was one."""
        if message.type == "error":
            retry_after = retry_after_of(message.data)
            if retry_after is not None:
                self._on_refused(retry_after)
        target = _target(message)
        if target is None:
            return False
        if message.server_initiated:  # an engine_event: command_id is the target
            command = self.commands.get(target)
            if command is not None:
                command.feed(message)
                return True
            return target in self._abandoned
        waiter = self.pending.pop(target, None)
        if waiter is not None:
            waiter.resolve(message)
            return True
        command = self.commands.get(target)
        if command is not None:
            if message.type in ("engine_command_res", "error"):
                self.untrack(target)  # a refused command is tracked again when it is sent again
            command.feed(message)
            return True
        if target in self._abandoned:
            if message.type in ("engine_command_res", "error", "cancel_res"):
                del self._abandoned[target]
            return True
        return False

    async def dispatch(self, message: Message) -> None:
        """Deliver a message that answers nothing of ours: server request, handlers, or inbox."""
        request_type = request_type_of(message, self.request_handlers)
        if request_type is not None:
            self._server_requests.start(message, request_type, self.request_handlers.get(request_type))
            return
        if message.type == "server_request_cancelled" and message.server_initiated:
            data = message.data
            target = data.get("message_id") if isinstance(data, dict) else None
            if isinstance(target, str):
                self._server_requests.withdraw(target)  # the notice itself flows on below
        handlers = self.message_handlers.get(message.type)
        if handlers:
            await self._run_handlers(handlers, message)
        else:
            self.inbox.push(message)

    @property
    def server_requests(self) -> ServerRequestRunner:
        """The running (and recently answered) server requests."""
        return self._server_requests

    def is_direct(self, message_id: str) -> bool:
        """Whether the request is answered by the reader (it was made inside a message handler)."""
        return message_id in self._direct

    def finish(self, error: Callable[[], ConnectionClosed]) -> None:
        """The connection is over and every message before its end was delivered: fail what waits."""
        if self.finished:
            return
        self.finished = True
        for waiter in self.pending.values():
            waiter.resolve(None)
        self.pending.clear()
        for command in self.commands.values():
            command.fail(error())
        self.commands.clear()
        self.inbox.close(error)

    async def _run_handlers(self, handlers: list[MessageHandler], message: Message) -> None:
        await self.run_callbacks(handlers, message, f"handler for {message.type!r} messages")

    async def run_callbacks(self, callbacks: Sequence[Callable[[Any], Any]], argument: Any, label: str) -> None:
        """Call each callback (sync or async) with ``argument``, in order, as a message handler: its
        exceptions are logged, and requests it makes are answered by the reader directly."""
        call = _HandlerCall(self)
        token = _running_handler.set(call)
        try:
            for callback in list(callbacks):
                try:
                    result = callback(argument)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    _log.exception("%s failed", label)
        finally:
            call.active = False
            _running_handler.reset(token)

    def _in_handler(self) -> bool:
        call = _running_handler.get()
        return call is not None and call.delivery is self and call.active


def _target(message: Message) -> str | None:
    """What a message answers: a response's message_id, or an engine event's command_id."""
    if not message.server_initiated:
        return message.message_id
    if message.type == "engine_event" and isinstance(message.data, dict):
        command_id = message.data.get("command_id")
        return command_id if isinstance(command_id, str) else None
    return None
