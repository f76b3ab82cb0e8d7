"""Engines: the per-session workers (LLM agents) that clients drive with ``engine_command``.

An engine is plain async Python implementing :class:`Engine`. Each session has at most one; its
commands run one at a time, in arrival order, in a worker task that belongs to the owning
connection (so nothing an engine does can outlive the connection). While a command runs, the
engine talks to its client through :class:`EngineContext`: stream events, ask the user, ask for a
confirmation, notify.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import anyio
import anyio.lowlevel
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .errors import being_cancelled
from .protocol import EngineInfo, new_message_id, utcnow

if TYPE_CHECKING:
    from .connection import Connection
    from .runtime import Runtime
    from .sessions import Session

logger = logging.getLogger("llmgine_ws.engines")

EngineStatus = Literal["created", "idle", "running", "stopped", "failed"]


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


EngineFactory = Callable[["Session", dict[str, Any]], "Engine | Awaitable[Engine]"]
"""``factory(session, config)`` → an engine (sync or async). ``config`` is ``create_engine``'s ``config``."""


class EngineEventData(msgspec.Struct, frozen=True, kw_only=True):
    """``engine_event``: one streamed item of a running command."""

    session_id: str
    command_id: str
    seq: int
    event_type: str
    payload: Any


class EngineCommandResData(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """``engine_command_res``: exactly one per command, after all of its events."""

    session_id: str
    status: Literal["completed", "cancelled", "failed"]
    result: Any
    """The engine's return value (``null`` unless completed); always present."""
    error: str | None = None
    """Present only when ``status`` is ``failed``."""


class EngineContext:
    """The running command's line to its client. Every message it sends carries the session_id."""

    __slots__ = ("_connection", "_runtime", "_seq", "command_id", "session_id")

    def __init__(self, runtime: Runtime, connection: Connection, session_id: str, command_id: str) -> None:
        self._runtime = runtime
        self._connection = connection
        self._seq = 0
        self.session_id = session_id
        self.command_id = command_id
        """The command's message_id (events and the final ``engine_command_res`` refer to it)."""

    @property
    def app_id(self) -> str:
        """The app that sent the command."""
        return self._connection.app_id

    async def emit(self, event_type: str, payload: Any = None) -> None:
        """Stream an ``engine_event`` to the client; ``seq`` counts from 0 with no gaps.

        Waits when the client is slow to read; a client too slow for the send grace is disconnected
        (rather than shown a gap in the stream).
        """
        if self._seq % 32 == 31:
            # An engine that only ever emits would otherwise never yield (sending rarely has to wait):
            # every 32 events, let other tasks run and a cancel through. Not every event: a
            # checkpoint per event costs a fifth of the streaming throughput.
            await anyio.lowlevel.checkpoint()
        data = EngineEventData(session_id=self.session_id, command_id=self.command_id, seq=self._seq,
                               event_type=event_type, payload=payload)
        self._seq += 1
        await self._connection.send(
            self._runtime.encoder.frame("engine_event", new_message_id(), data, server_initiated=True)
        )

    async def ask_user(self, prompt: str, *, timeout: float | None = None, **extra: Any) -> str:
        """Ask the user for text (``server_request`` with ``request_type: "user_input"``).

        Returns the answer's ``user_input`` field. Raises ``TimeoutError``, ``AppDisconnected``
        or ``ServerRequestFailed``; a ``cancel`` of the command interrupts the wait.
        """
        data = {"request_type": "user_input", "prompt": prompt, **extra, **self._ids()}
        answer = await self._runtime.messaging.send_to_app_and_wait(self.app_id, "server_request", data, timeout)
        return str(answer.data.get("user_input", ""))

    async def confirm(self, message: str, options: list[str] | None = None, *, timeout: float | None = None,
                      **extra: Any) -> str:
        """Ask the user to choose (``request_type: "user_confirmation"``); returns the ``selection``.

        ``options`` defaults to ``["yes", "no"]``. An answer that is not one of them raises
        ``ValueError`` (the client cannot make the engine act on an option it did not offer).
        """
        choices = options or ["yes", "no"]
        data = {"request_type": "user_confirmation", "message": message, "options": choices, **extra,
                **self._ids()}
        answer = await self._runtime.messaging.send_to_app_and_wait(self.app_id, "server_request", data, timeout)
        selection = answer.data.get("selection")
        if selection not in choices:
            raise ValueError(f"the client chose {selection!r}, which is not one of {choices}")
        return str(selection)

    async def notify(self, notification_type: str, message: str = "", **additional_data: Any) -> None:
        """Send a ``notification`` about this session to the client."""
        data: dict[str, Any] = {"notification_type": notification_type, "message": message, **self._ids()}
        if additional_data:
            data["additional_data"] = additional_data
        await self._connection.send(
            self._runtime.encoder.frame("notification", new_message_id(), data, server_initiated=True)
        )

    def _ids(self) -> dict[str, str]:
        return {"session_id": self.session_id, "command_id": self.command_id}


class QueuedCommand:
    """A command waiting for (or holding) its engine."""

    __slots__ = ("arrived", "command", "message_id", "scope")

    def __init__(self, message_id: str, command: Any, scope: anyio.CancelScope) -> None:
        self.message_id = message_id
        self.command = command
        self.scope = scope
        self.arrived = time.monotonic()


class EngineHandle:
    """An engine attached to a session: its identity, status, and command queue."""

    def __init__(self, engine: Engine, engine_type: str, session_id: str) -> None:
        self.engine = engine
        self.engine_id = str(uuid.uuid4())
        self.engine_type = engine_type
        self.session_id = session_id
        self.status: EngineStatus = "created"
        self.last_activity_at: datetime = utcnow()
        self._last_activity = time.monotonic()
        self.stopped = False
        self.stop_reason = ""
        self.current: QueuedCommand | None = None
        self.queued = 0
        self.worker_done = anyio.Event()
        """Set when the command worker has exited (or will never run)."""
        self._commands_in: MemoryObjectSendStream[QueuedCommand]
        self.commands: MemoryObjectReceiveStream[QueuedCommand]
        self._commands_in, self.commands = anyio.create_memory_object_stream[QueuedCommand](math.inf)

    def info(self) -> EngineInfo:
        """The engine's part of ``status_res``."""
        return EngineInfo(engine_id=self.engine_id, engine_type=self.engine_type, status=self.status,
                          last_activity_at=self.last_activity_at)

    def touch(self) -> None:
        """Record activity (resets the idle clock)."""
        self.last_activity_at = utcnow()
        self._last_activity = time.monotonic()

    def idle_for(self, now: float) -> float:
        """Seconds with no command running or queued (0 while busy)."""
        if self.current is not None or self.queued:
            return 0.0
        return now - self._last_activity

    def submit(self, queued: QueuedCommand) -> None:
        """Queue a command in arrival order (the caller checked the engine is not stopped).

        Unbounded here: every queued command counts against the connection's
        ``max_inflight_requests``, which is what bounds the queue.
        """
        self._commands_in.send_nowait(queued)
        self.queued += 1

    def close_queue(self) -> None:
        """Accept no more commands; the worker drains what is queued, answering each as cancelled."""
        self.stopped = True
        self._commands_in.close()
        if self.current is not None:
            self.current.scope.cancel()

    async def stop_engine(self, timeout: float) -> None:
        """End the engine: cancel its commands, then run its ``stop()`` with a deadline.

        The running command gets ``timeout`` seconds to unwind, then ``stop()`` gets ``timeout``
        seconds; a failure or overrun is logged and cleanup goes on. Never raises.
        """
        self.close_queue()
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(timeout):
                await self.worker_done.wait()
            with anyio.move_on_after(timeout) as scope:
                try:
                    await self.engine.stop()
                except Exception:
                    logger.exception("engine %s (%s) failed to stop cleanly", self.engine_id, self.engine_type,
                                     extra={"session_id": self.session_id})
                except anyio.get_cancelled_exc_class():
                    if being_cancelled():
                        raise
                    logger.exception("engine %s (%s) failed to stop cleanly", self.engine_id, self.engine_type,
                                     extra={"session_id": self.session_id})
            if scope.cancelled_caught:
                logger.error("engine %s (%s) did not stop within %.1fs; abandoned", self.engine_id,
                             self.engine_type, timeout, extra={"session_id": self.session_id})
        self.status = "stopped"


async def discard_engine(engine: Engine, engine_type: str, session_id: str, timeout: float) -> None:
    """Stop an engine that was started but never attached to a session."""
    handle = EngineHandle(engine, engine_type, session_id)
    handle.worker_done.set()
    await handle.stop_engine(timeout)
