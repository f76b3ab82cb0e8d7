"""What an engine implements (:class:`Engine`), and its line to the client while a command runs
(:class:`EngineContext`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

import anyio.lowlevel
import msgspec

from ..connection import Connection
from ..lifecycle import Host
from ..messaging import MessagingAPI
from ..protocol import (
    EngineEventData,
    FrameEncoder,
    UserConfirmationRequest,
    UserInputRequest,
)
from ..sessions import Session
from .coalescing import CoalescingLine


@runtime_checkable
class Engine(Protocol):
    """What an engine implements. All three methods are coroutines."""

    async def start(self) -> None:
        """Prepare the engine (open clients, load prompts). Raising fails ``create_engine``."""

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        """Run one command; the return value (JSON-serialisable) is the command's ``result``.

        Runs inside a cancel scope: a client ``cancel`` (or the session closing) cancels it at its
        next ``await``.
        """

    async def stop(self) -> None:
        """Release everything; called once, with a deadline, on every path that ends the engine."""


EngineFactory = Callable[[Session, dict[str, Any]], "Engine | Awaitable[Engine]"]
"""``factory(session, config)`` → an engine (sync or async).

``config`` is ``create_engine``'s ``config``: it comes from the client, so treat it as untrusted input
(validate it; never let it choose credentials, models you pay for, or unbounded work).
"""


class EngineContext:
    """The running command's line to its client. Every message it sends carries the session_id."""

    __slots__ = ("_connection", "_emitted", "_encoder", "_host", "_line", "_messaging", "_seq", "command_id",
                 "session_id")

    def __init__(self, connection: Connection, session_id: str, command_id: str, *, encoder: FrameEncoder,
                 messaging: MessagingAPI, host: Host | None = None, line: CoalescingLine | None = None) -> None:
        self._connection = connection
        self._host = host
        self._encoder = encoder
        self._messaging = messaging
        self._line = line
        self._seq = 0
        self._emitted = 0
        self.session_id = session_id
        self.command_id = command_id
        """The command's message_id (events and the final ``engine_command_res`` refer to it)."""

    @property
    def app_id(self) -> str:
        """The app that sent the command."""
        return self._connection.app_id

    @property
    def principal(self) -> Any:
        """Who authenticated the connection that sent the command (``None`` without an authenticator)."""
        return self._connection.principal

    @property
    def host_app(self) -> Any:
        """The app llmgine_ws is served by: the FastAPI/Starlette host it is mounted in, else itself
        (see ``HandlerContext.host_app``)."""
        return self._host.app if self._host is not None else None  # None only for a context built by hand

    @property
    def state(self) -> Any:
        """``host_app.state``: the host app's db pool, clients, settings."""
        return self._host.state if self._host is not None else None

    @property
    def coalescing(self) -> bool:
        """Whether this command's ``token`` deltas are coalesced (``engine_event_coalesce_ms`` > 0)."""
        return self._line is not None

    async def emit(self, event_type: str, payload: Any = None) -> None:
        """Stream an ``engine_event`` to the client; ``seq`` counts the frames from 0 with no gaps.

        Waits when the client is slow to read; a client too slow for the send grace is disconnected
        (rather than shown a gap in the stream). With coalescing on (``engine_event_coalesce_ms``), a
        ``"token"`` event with payload ``{"text": str}`` never waits: its delta joins the command's
        pending batch, sent within the flush interval (see :mod:`llmgine_ws.engines.coalescing`).
        """
        self._emitted += 1
        if self._emitted % 32 == 0:
            # An engine that only ever emits would otherwise never yield (sending rarely has to wait):
            # every 32 events, let other tasks run and a cancel through. Not every event: a
            # checkpoint per event costs a fifth of the streaming throughput.
            await anyio.lowlevel.checkpoint()
        line = self._line
        if line is not None:
            # token_text(), inlined: this runs for every token of every answer.
            if event_type == "token" and type(payload) is dict and len(payload) == 1:
                text = payload.get("text")
                if type(text) is str:
                    line.token(text)
                    return
            await line.event(event_type, payload)
            return
        data = EngineEventData(session_id=self.session_id, command_id=self.command_id, seq=self._seq,
                               event_type=event_type, payload=payload)
        self._seq += 1
        await self._connection.send(self._encoder.event("engine_event", data))

    async def _finish(self) -> None:
        """The command ended: its pending deltas go out (before its result), waiting for room like a send."""
        line = self._line
        if line is not None:
            try:
                await line.flush()
            finally:
                line.close()

    async def ask_user(self, prompt: str, *, timeout: float | None = None, **extra: Any) -> str:
        """Ask the user for text (``server_request`` with ``request_type: "user_input"``).

        Returns the answer's ``user_input`` field. Raises ``TimeoutError``, ``AppDisconnected``
        or ``ServerRequestFailed``; a ``cancel`` of the command interrupts the wait.
        """
        request = UserInputRequest(request_type="user_input", prompt=prompt, session_id=self.session_id,
                                   command_id=self.command_id)
        answer = await self._ask(request, extra, timeout)
        return str(answer.get("user_input", ""))

    async def confirm(self, message: str, options: list[str] | None = None, *, timeout: float | None = None,
                      **extra: Any) -> str:
        """Ask the user to choose (``request_type: "user_confirmation"``); returns the ``selection``.

        ``options`` defaults to ``["yes", "no"]``. An answer that is not one of them raises
        ``ValueError`` (the client cannot make the engine act on an option it did not offer).
        """
        choices = options or ["yes", "no"]
        request = UserConfirmationRequest(request_type="user_confirmation", message=message, options=choices,
                                          session_id=self.session_id, command_id=self.command_id)
        answer = await self._ask(request, extra, timeout)
        selection = answer.get("selection")
        if selection not in choices:
            raise ValueError(f"the client chose {selection!r}, which is not one of {choices}")
        return str(selection)

    async def notify(self, notification_type: str, message: str = "", **additional_data: Any) -> None:
        """Send a ``notification`` about this session to the client.

        Extra keyword arguments go under ``additional_data`` (the seed's notification shape), not next
        to ``message``: ``notify("progress", "half way", percent=50)`` sends
        ``{notification_type, message, session_id, command_id, additional_data: {percent: 50}}``.
        """
        data: dict[str, Any] = {"notification_type": notification_type, "message": message,
                                "session_id": self.session_id, "command_id": self.command_id}
        if additional_data:
            data["additional_data"] = additional_data
        await self._connection.send(self._encoder.event("notification", data))

    async def _ask(self, request: msgspec.Struct, extra: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        # Extra fields travel alongside the declared ones, which always win.
        data = {**extra, **msgspec.to_builtins(request)}
        answer = await self._messaging.send_to_app_and_wait(self.app_id, "server_request", data, timeout)
        return answer.data
