"""Engine helpers: a command as an async iterator of its events, and typed answers to an engine's
``ask_user`` / ``confirm``.

Wire protocol (see the server's ``llmgine_ws.engines``): ``engine_command {session_id, command}``
is answered by zero or more ``engine_event`` frames ``{session_id, command_id, seq, event_type,
payload}`` (``command_id`` is the command's ``message_id``), then exactly one
``engine_command_res {session_id, status, result, error?}`` with the command's ``message_id``.
``ctx.ask_user`` sends a ``server_request`` ``user_input`` answered by ``{"user_input": text}``;
``ctx.confirm`` sends ``user_confirmation`` with ``options``, answered by ``{"selection": option}``.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar

import anyio
import msgspec

from .backoff import retry_after_of
from .errors import ClientError, RequestError
from .handlers import ServerRequestHandler
from .messages import Message

__all__ = [
    "Command",
    "CommandResult",
    "ConfirmationRequest",
    "CreatedEngine",
    "EngineEvent",
    "UserInputRequest",
    "confirmation_handler",
    "user_input_handler",
]


class EngineEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One ``engine_event`` of a command: ``seq`` counts the command's frames from 0 with no gaps.

    A server that coalesces token streams sends the deltas emitted within its flush interval as one
    ``token`` event: ``payload["text"]`` is their concatenation and :attr:`coalesced` their number.
    """

    session_id: str
    command_id: str
    seq: int
    event_type: str
    payload: Any = None
    coalesced: int = 1
    """How many of the engine's ``token`` deltas this event carries (1 unless coalesced)."""


class CommandResult(msgspec.Struct, frozen=True, kw_only=True):
    """A command's ``engine_command_res``: how it ended, and the engine's return value."""

    session_id: str
    status: Literal["completed", "cancelled", "failed"]
    result: Any = None
    """The engine's return value (``None`` unless ``completed``)."""
    error: str | None = None
    """Why it failed (only when ``status`` is ``failed``)."""


class CreatedEngine(msgspec.Struct, frozen=True, kw_only=True):
    """``create_engine_res``: the engine now attached to the session."""

    session_id: str
    engine_id: str
    engine_type: str


class CommandHost(Protocol):
    """What a :class:`Command` needs from its client."""

    rate_limit_retries: int

    async def _resend_command(self, command: Command) -> None:
        """Send the command's frame again (after a ``RATE_LIMITED`` refusal), backing off first."""

    def _abandon_command(self, command: Command) -> None:
        """Stop routing the command's frames to it, and ask the server to cancel it."""

    async def cancel(self, message_id: str) -> bool:
        """Cancel a request of ours; ``True`` if it was still running."""


class Command:
    """A running engine command. Obtain one with :meth:`Client.command`.

    Iterate it for its :class:`EngineEvent`\\ s in order; the iteration ends after the command's
    ``engine_command_res``, which is then :attr:`result` (``completed``, ``cancelled`` or ``failed``).
    Used as ``async with``, leaving the block before the end cancels the command on the server.

    Attributes:
        message_id: the command's ``message_id`` (its events' ``command_id``; what :meth:`cancel` names).
        session_id: the session whose engine runs it.
        result: the command's result once it ended, else ``None``.
    """

    def __init__(self, host: CommandHost, session_id: str, message_id: str, frame: str, limit: int) -> None:
        self.message_id = message_id
        self.session_id = session_id
        self.result: CommandResult | None = None
        self.frame = frame
        """The ``engine_command`` frame as sent (sent again after a ``RATE_LIMITED`` refusal, and
        after a resume if its result had not come)."""
        self.link = -1
        """The connection the frame was last sent on (-1: not sent yet)."""
        self._host = host
        self._unsent = False
        self._limit = limit
        self._frames: deque[Message] = deque()
        self._arrived = anyio.Event()
        self._failure: BaseException | None = None
        self._finished = False
        self._refusals = 0

    def __repr__(self) -> str:
        state = self.result.status if self.result is not None else "running"
        return f"<Command {self.message_id} session={self.session_id} {state}>"

    @property
    def done(self) -> bool:
        """``True`` once the command ended (result, error, or a lost connection) and was iterated to the end."""
        return self._finished

    # ---------------------------------------------------------------- fed by the client

    def feed(self, message: Message) -> None:
        """Take one of the command's frames (an event, its result, or an error); never blocks.

        A consumer that falls ``limit`` frames behind loses the command (it is cancelled, and the
        iteration raises :class:`ClientError`) rather than stalling every other message.
        """
        if self._failure is not None:
            return
        if len(self._frames) >= self._limit:
            self.fail(ClientError(f"command {self.message_id}: more than {self._limit} events were waiting to be "
                                  "read; it was cancelled (read its events as they come, or raise max_queue)"))
            self._host._abandon_command(self)
            return
        self._frames.append(message)
        self._wake()

    @property
    def waiting_to_send(self) -> bool:
        """Whether the command is held back by a ``RATE_LIMITED`` back-off (its first read sends it)."""
        return self._unsent

    def send_later(self) -> None:
        """The client is backing off: the first read of the command sends it."""
        self._unsent = True

    def fail(self, error: BaseException) -> None:
        """End the command with ``error`` (e.g. the connection closed) after the frames already fed."""
        if self._failure is None:
            self._failure = error
            self._wake()

    def _wake(self) -> None:
        self._arrived.set()
        self._arrived = anyio.Event()

    # ---------------------------------------------------------------- iteration

    def __aiter__(self) -> Command:
        return self

    async def __anext__(self) -> EngineEvent:
        if self._unsent:
            self._unsent = False
            await self._host._resend_command(self)
        while not self._finished:
            if not self._frames:
                if self._failure is not None:
                    self._finished = True
                    raise self._failure
                await self._arrived.wait()
                continue
            message = self._frames.popleft()
            if message.type == "engine_event":
                return _convert(message, EngineEvent)
            if message.type == "error":
                if retry_after_of(message.data) is not None and self._refusals < self._host.rate_limit_retries:
                    self._refusals += 1
                    await self._host._resend_command(self)
                    continue
                self._finished = True
                raise RequestError.from_response(message)
            self.result = _convert(message, CommandResult)
            self._finished = True
        raise StopAsyncIteration

    async def wait(self) -> CommandResult:
        """Read the command to its end (discarding events not read yet) and return its result.

        Raises:
            RequestError: the server refused the command (e.g. ``ENGINE_NOT_FOUND``).
            ConnectionClosed: the connection closed before the result came.
        """
        async for _ in self:
            pass
        if self.result is None:
            raise ClientError(f"command {self.message_id} ended without a result")
        return self.result

    async def cancel(self) -> bool:
        """Ask the server to cancel this command; its result then says ``cancelled`` (unless it had
        already finished: then ``False``)."""
        return await self._host.cancel(self.message_id)

    async def __aenter__(self) -> Command:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self.result is None and self._failure is None:
            self.fail(ClientError(f"command {self.message_id} was left before it ended"))
            self._host._abandon_command(self)


_T = TypeVar("_T")


def _convert(message: Message, type_: type[_T]) -> _T:
    try:
        return msgspec.convert(message.data, type_)
    except msgspec.ValidationError as exc:
        raise ClientError(f"malformed {message.type} from the server: {exc}") from exc


# ------------------------------------------------------------------------------ ask_user / confirm


class UserInputRequest(msgspec.Struct, frozen=True, kw_only=True):
    """An engine's ``ctx.ask_user(prompt, **extra)``: answer with the user's text."""

    prompt: str
    session_id: str | None = None
    command_id: str | None = None
    """The command that asks (``None`` when a backend asked outside an engine)."""
    extra: dict[str, Any] = msgspec.field(default_factory=dict)
    """The request's other fields (the ``**extra`` given to ``ask_user``)."""
    raw: Message
    """The ``server_request`` frame itself."""


class ConfirmationRequest(msgspec.Struct, frozen=True, kw_only=True):
    """An engine's ``ctx.confirm(message, options, **extra)``: answer with one of ``options``."""

    message: str
    options: list[str]
    session_id: str | None = None
    command_id: str | None = None
    extra: dict[str, Any] = msgspec.field(default_factory=dict)
    raw: Message


UserInputHandler = Callable[[UserInputRequest], str | Awaitable[str]]
"""Answers ``ask_user`` with the user's text (sync or async)."""
ConfirmationHandler = Callable[[ConfirmationRequest], str | Awaitable[str]]
"""Answers ``confirm`` with one of the offered options (sync or async)."""


def _fields(message: Message) -> dict[str, Any]:
    data = dict(message.data) if isinstance(message.data, dict) else {}
    data.pop("request_type", None)
    return data


def user_input_handler(handler: UserInputHandler) -> ServerRequestHandler:
    """Adapt ``handler(UserInputRequest) -> str`` into the ``user_input`` server-request handler."""

    async def answer(message: Message) -> dict[str, Any]:
        data = _fields(message)
        request = UserInputRequest(prompt=str(data.pop("prompt", "")), session_id=data.pop("session_id", None),
                                   command_id=data.pop("command_id", None), extra=data, raw=message)
        text = handler(request)
        if inspect.isawaitable(text):
            text = await text
        if not isinstance(text, str):
            raise TypeError(f"an on_user_input handler must return a str, not {type(text).__name__}")
        return {"user_input": text}

    return answer


def confirmation_handler(handler: ConfirmationHandler) -> ServerRequestHandler:
    """Adapt ``handler(ConfirmationRequest) -> option`` into the ``user_confirmation`` handler.

    An answer that is not one of the offered options is a bug in the handler: it is answered as an
    error (the engine's ``confirm`` raises) instead of being sent as a selection.
    """

    async def answer(message: Message) -> dict[str, Any]:
        data = _fields(message)
        raw_options = data.pop("options", None)
        options = [str(option) for option in raw_options] if isinstance(raw_options, list) else ["yes", "no"]
        request = ConfirmationRequest(message=str(data.pop("message", "")), options=options,
                                      session_id=data.pop("session_id", None), command_id=data.pop("command_id", None),
                                      extra=data, raw=message)
        selection = handler(request)
        if inspect.isawaitable(selection):
            selection = await selection
        if selection not in options:
            raise ValueError(f"the on_confirmation handler chose {selection!r}, which is not one of {options}")
        return {"selection": selection}

    return answer
