"""Running user code — handlers, engines, callbacks, authenticators — without letting it hurt the server.

Whatever user code raises is logged and contained; a *real* cancellation of the task running it
(a cancel scope, a deadline, uvicorn cancelling the connection's task) always gets through. Every
place that calls user code uses :func:`contained`, so that distinction is written once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
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


class _Contained:
    """The context manager :func:`contained` returns (a class, not a generator: it runs once per
    message on the hot path, where ``@contextmanager``'s generator costs twice as much)."""

    __slots__ = ("_args", "_extra", "_log", "_message", "_traceback", "outcome")

    def __init__(self, log: logging.Logger, message: str, args: tuple[Any, ...], extra: dict[str, Any] | None,
                 traceback: bool) -> None:
        self._log = log
        self._message = message
        self._args = args
        self._extra = extra
        self._traceback = traceback
        self.outcome = Outcome()

    def __enter__(self) -> Outcome:
        return self.outcome

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            return False
        if not isinstance(exc, Exception) and (
            not isinstance(exc, anyio.get_cancelled_exc_class()) or being_cancelled()
        ):
            return False  # a real cancellation (or KeyboardInterrupt...) gets through
        self.outcome.error = exc
        self._log.error(self._message, *self._args, exc_info=exc if self._traceback else None, extra=self._extra)
        return True


def contained(log: logging.Logger, message: str, *args: Any, extra: dict[str, Any] | None = None,
              traceback: bool = True) -> _Contained:
    """Run the block's user code; log and swallow what it raises, except a real cancellation.

    ``message % args`` is logged at ERROR (with the traceback unless ``traceback=False``) and the
    exception is kept in the :class:`Outcome` the block gets (``with contained(...) as outcome``). A
    stray cancellation exception raised by the user code itself (see :func:`being_cancelled`) counts
    as a failure like any other.
    """
    return _Contained(log, message, args, extra, traceback)


async def run_callbacks(callbacks: Sequence[Callable[..., Awaitable[None]]], *args: Any, timeout: float,
                        log: logging.Logger) -> None:
    """Await each callback in turn with ``timeout`` seconds each; failures and overruns are logged."""
    for callback in callbacks:
        with anyio.move_on_after(timeout) as scope, contained(log, "callback %r failed; cleanup continues",
                                                              callback):
            await callback(*args)
        if scope.cancelled_caught:
            log.error("callback %r did not finish within %.1fs; abandoned", callback, timeout)
