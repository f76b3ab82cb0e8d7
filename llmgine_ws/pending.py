"""A server request waiting for its answer: the waiter ``send_to_app_and_wait`` awaits.

One per request a connection has pending (:attr:`llmgine_ws.connection.Connection.pending`); the
client's ``server_response`` resolves it, a disconnect, a cancellation or the timeout fail it.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import anyio
import anyio.lowlevel

from .protocol import AnswerCheck


class PendingRequest:
    """A server request waiting for the client's ``server_response``.

    On asyncio the waiter is a bare future and the timeout a loop timer (no cancel scope, no
    ``anyio.Event``: this is the per-request cost of ``send_to_app_and_wait``, see
    docs/performance.md); on any other backend an ``anyio.Event`` under ``anyio.fail_after``.
    The outcome is the same either way: the answer, the error given to :meth:`fail`, or
    ``TimeoutError``.
    """

    __slots__ = ("_done", "_error", "_future", "_response", "_settled", "app_id", "check", "frame", "message_id",
                 "refused")

    def __init__(self, app_id: str, message_id: str, check: AnswerCheck | None = None, *, frame: str = "") -> None:
        self.app_id = app_id
        self.message_id = message_id
        self.frame = frame
        """The request as sent (sent again after a resume)."""
        self.check = check
        """Why an answer does not fit the question (it is then refused and the question stays open)."""
        self.refused = False
        """An answer was refused: further answers cost like any message (no free retries under the rate limit)."""
        loop = asyncio._get_running_loop()  # None outside asyncio (trio), where anyio's Event serves
        self._future: asyncio.Future[None] | None = loop.create_future() if loop is not None else None
        self._done: anyio.Event | None = None if loop is not None else anyio.Event()
        self._settled = False
        self._response: dict[str, Any] | None = None
        self._error: BaseException | None = None

    def _wake(self) -> None:
        future = self._future
        if future is not None:
            if not future.done():
                future.set_result(None)
        elif self._done is not None:
            self._done.set()

    def resolve(self, data: dict[str, Any]) -> None:
        """Deliver the client's answer (first outcome wins)."""
        if not self._settled:
            self._settled = True
            self._response = data
            self._wake()

    def fail(self, error: BaseException) -> None:
        """Fail the waiter with ``error`` (first outcome wins)."""
        if not self._settled:
            self._settled = True
            self._error = error
            self._wake()

    def _expire(self) -> None:
        self.fail(TimeoutError())

    async def wait(self, timeout: float = math.inf) -> dict[str, Any]:
        """Wait for the outcome, at most ``timeout`` seconds (then ``TimeoutError``); raises what
        :meth:`fail` was given."""
        future = self._future
        if future is None:
            assert self._done is not None
            with anyio.fail_after(timeout):
                await self._done.wait()
        elif not self._settled:
            timer = future.get_loop().call_later(timeout, self._expire) if timeout < _FOREVER else None
            try:
                await future
            finally:
                if timer is not None:
                    timer.cancel()
        else:
            await anyio.lowlevel.checkpoint()
        if self._error is not None:
            raise self._error
        assert self._response is not None
        return self._response


_FOREVER = 10.0 ** 9
"""Timeouts from here on are no timeout (a loop timer cannot take ``math.inf``)."""
