"""Waiting for a condition over an app's state, re-checked at every change instead of polled."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio


class StateWatch:
    """Told about every change of an app's state (connections, sessions, engines, pending requests);
    lets code wait until a condition over that state holds.

    Telling it costs one attribute check unless someone is waiting.
    """

    __slots__ = ("_changed",)

    def __init__(self) -> None:
        self._changed: anyio.Event | None = None

    def notify(self, *_: Any) -> None:
        """Something changed: wake whoever waits (callable with any arguments, to serve as a listener)."""
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    # Hub and session-store listener protocols: every registration change is a change.
    app_added = app_removed = session_added = session_removed = notify

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until ``predicate()`` holds; raises ``TimeoutError`` after ``timeout`` seconds.

        E.g. ``await runtime.watch.wait_for(lambda: not runtime.hub, 5)``.
        """
        with anyio.fail_after(timeout):
            while not predicate():
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()
