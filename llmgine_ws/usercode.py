"""Running user code — handlers, engines, callbacks, authenticators — without letting it hurt the server.

Whatever user code raises is logged and contained; a *real* cancellation of the task running it
(a cancel scope, a deadline, uvicorn cancelling the connection's task) always gets through. Every
place that calls user code uses :func:`contained`, so that distinction is written once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import anyio


def being_cancelled() -> bool:
    """Whether the current task is really being cancelled: by one of its enclosing cancel scopes, or
    (on asyncio) by ``Task.cancel()``, e.g. uvicorn cancelling connection tasks when its graceful
    shutdown times out.

    A cancellation exception caught while this is False was not meant for us: user code raised it
    on its own (typically by awaiting a task or future that something else cancelled). It is then
    treated like any other exception from user code instead of passing for the cancellation of the
    server's own task (which would, e.g., tear a whole connection down).
    """
    if anyio.current_effective_deadline() <= anyio.current_time():
        return True
    try:
        task = asyncio.current_task()
    except RuntimeError:  # not running on asyncio: cancellation only ever comes through scopes
        return False
    return task is not None and task.cancelling() > 0


class Outcome:
    """What :func:`contained` saw: ``error`` is the exception user code raised (None if it returned)."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: BaseException | None = None

    @property
    def failed(self) -> bool:
        """Whether the user code raised."""
        return self.error is not None


@contextmanager
def contained(log: logging.Logger, message: str, *args: Any, extra: dict[str, Any] | None = None,
              traceback: bool = True) -> Iterator[Outcome]:
    """Run the block's user code; log and swallow what it raises, except a real cancellation.

    ``message % args`` is logged at ERROR (with the traceback unless ``traceback=False``) and the
    exception is kept in the :class:`Outcome`. A stray cancellation exception raised by the user
    code itself (see :func:`being_cancelled`) counts as a failure like any other.
    """
    outcome = Outcome()
    try:
        yield outcome
    except Exception as exc:
        outcome.error = exc
        log.error(message, *args, exc_info=exc if traceback else None, extra=extra)
    except anyio.get_cancelled_exc_class() as exc:
        if being_cancelled():
            raise
        outcome.error = exc
        log.error(message, *args, exc_info=exc if traceback else None, extra=extra)


async def run_callbacks(callbacks: Sequence[Callable[..., Awaitable[None]]], *args: Any, timeout: float,
                        log: logging.Logger) -> None:
    """Await each callback in turn with ``timeout`` seconds each; failures and overruns are logged."""
    for callback in callbacks:
        with anyio.move_on_after(timeout) as scope, contained(log, "callback %r failed; cleanup continues",
                                                              callback):
            await callback(*args)
        if scope.cancelled_caught:
            log.error("callback %r did not finish within %.1fs; abandoned", callback, timeout)
