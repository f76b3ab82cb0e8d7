"""An app's lifecycle, as one :class:`State` instead of flags."""

from __future__ import annotations

import enum
from typing import Any

import anyio


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
