"""An app's lifecycle, as one :class:`State` instead of flags."""

from __future__ import annotations

import enum
from typing import Any

import anyio
import anyio.lowlevel


class State(enum.Enum):
    """Where an app is in its life. It only ever moves forward: CREATED → RUNNING → DRAINING → STOPPED."""

    CREATED = "created"
    """Built, lifespan not running: connections are served, but nothing runs in the background."""
    RUNNING = "running"
    """The lifespan runs: background tasks are up and the app takes traffic."""
    DRAINING = "draining"
    """Shutting down: new handshakes and new work are refused, running work gets to finish."""
    STOPPED = "stopped"
    """Shutdown finished."""


class Lifecycle:
    """The current :class:`State`, with events to wait on its transitions."""

    __slots__ = ("_stopped", "draining", "state")

    def __init__(self) -> None:
        self.state = State.CREATED
        self.draining = anyio.Event()
        """Set when shutdown begins: long-running work may watch it to wrap up early."""
        self._stopped = anyio.Event()

    @property
    def running(self) -> bool:
        """Whether the lifespan runs and shutdown has not begun."""
        return self.state is State.RUNNING

    @property
    def accepting(self) -> bool:
        """Whether new connections and new work are accepted (not draining or stopped)."""
        return self.state is State.CREATED or self.state is State.RUNNING

    def start(self) -> None:
        """The lifespan started."""
        if self.state is not State.CREATED:
            raise RuntimeError(f"cannot start an app that is {self.state.value}")
        self.state = State.RUNNING

    def begin_draining(self) -> bool:
        """Enter DRAINING; False if shutdown had already begun (the caller then waits for it)."""
        if self.state is State.DRAINING or self.state is State.STOPPED:
            return False
        self.state = State.DRAINING
        self.draining.set()
        return True

    def stop(self) -> None:
        """Shutdown finished."""
        self.state = State.STOPPED
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Wait until shutdown has finished."""
        await self._stopped.wait()


class Host:
    """Where an app is served: the app hosting it and the path it is mounted at.

    Unmounted, ``app`` is the llmgine_ws app itself and ``mount_path`` is empty. ``llmgine_ws.mount`` /
    ``llmgine_ws.lifespan`` (or the host's lifespan running this app's) fill both in.
    """

    __slots__ = ("app", "mount_path")

    def __init__(self) -> None:
        self.app: Any = None
        self.mount_path = ""

    @property
    def state(self) -> Any:
        """The hosting app's ``state`` (Starlette/FastAPI ``app.state``): your db pools, clients, settings."""
        return self.app.state if self.app is not None else None


class LazyEvent:
    """A one-shot event like ``anyio.Event`` (``set``, ``is_set``, ``wait``) that allocates the real
    event only when someone waits before it is set.

    For the per-connection signals almost nobody waits on (a connection's ``closed``, its writer
    finishing): an ``anyio.Event`` costs ~0.8 KiB per idle connection on asyncio (docs/performance.md).
    """

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._set = False
        self._event: anyio.Event | None = None

    def set(self) -> None:
        """Set the event, waking every waiter (idempotent)."""
        self._set = True
        if self._event is not None:
            self._event.set()

    def is_set(self) -> bool:
        """Whether :meth:`set` was called."""
        return self._set

    async def wait(self) -> None:
        """Return once the event is set (a checkpoint either way, like ``anyio.Event.wait``)."""
        if self._set:
            await anyio.lowlevel.checkpoint()
            return
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()
