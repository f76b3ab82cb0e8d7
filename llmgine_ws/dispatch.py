"""Decode a frame once, look its type up in the dispatch table, run its handler.

This is the reader's only job per frame, and it never waits: ``async`` handlers are started in the
connection's task group, plain ``def`` handlers (trivial by contract) run inline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from .connection import WS_POLICY_VIOLATION, Connection
from .context import HandlerContext
from .errors import AppDisconnected, ErrorCode, ProtocolError, being_cancelled
from .extensions import HandlerSpec
from .handlers import NO_REPLY
from .protocol import ClientMessage, MessageDecoder, envelope_for

if TYPE_CHECKING:
    from .runtime import Runtime

logger = logging.getLogger("llmgine_ws.dispatch")

ANSWERS = frozenset({"server_response", "server_pong"})
"""Answers to the server's own requests: never rate-limited (the server bounds how many it asks)."""

ALLOWED_WHILE_DRAINING = frozenset({"server_response", "server_pong", "cancel", "ping", "status"})
"""What a draining server still answers: what lets running work finish, and harmless reads."""


class Dispatcher:
    """The decoder and dispatch table of one app, built once from every registered message type."""

    def __init__(self, runtime: Runtime, specs: Iterable[HandlerSpec]) -> None:
        self._runtime = runtime
        self._encoder = runtime.encoder
        self._max_inflight = runtime.config.max_inflight_requests
        self._metrics = runtime.metrics
        self.specs: dict[str, HandlerSpec] = {}
        self._table: dict[type[ClientMessage], HandlerSpec] = {}
        envelopes: dict[str, type[ClientMessage]] = {}
        for spec in specs:
            envelope = envelope_for(spec.message_type, spec.data_type)
            envelopes[spec.message_type] = envelope
            self._table[envelope] = spec
            self.specs[spec.message_type] = spec
        self.envelopes = envelopes
        self.decoder = MessageDecoder(envelopes)

    def dispatch(self, connection: Connection, text: str) -> None:
        """Handle one text frame from ``connection``. Never blocks, never raises."""
        try:
            message: Any = self.decoder.decode(text)
        except (msgspec.DecodeError, RecursionError) as exc:
            readable_id, error = self.decoder.explain(text, exc)
            if self.admit(connection, readable_id):
                connection.send_soon(self._encoder.error(readable_id, error))
            return
        spec = self._table[type(message)]
        message_id: str = message.message_id
        if spec.message_type not in ANSWERS and not self.admit(connection, message_id):
            return
        if self._metrics is not None:
            self._metrics.message_in(spec.message_type)
        if self._runtime.shutting_down and spec.message_type not in ALLOWED_WHILE_DRAINING:
            connection.send_soon(self._encoder.error(message_id, ProtocolError(
                ErrorCode.SHUTTING_DOWN, "the server is shutting down; reconnect shortly",
                {"message_type": spec.message_type})))
            return
        ctx = HandlerContext(self._runtime, connection, spec.message_type, message_id)
        if spec.inline:
            self._run_inline(spec, message.data, ctx)
            return
        try:
            scope = connection.begin_request(message_id, self._max_inflight)
        except ProtocolError as exc:
            connection.send_soon(self._encoder.error(message_id, exc))
            return
        if not connection.spawn(self._run, spec, message.data, ctx, scope, connection.last_activity):
            connection.end_request(message_id, scope)

    def admit(self, connection: Connection, message_id: str | None) -> bool:
        """Apply the connection's rate limit to one incoming frame.

        Over the limit: answer ``RATE_LIMITED`` (with ``retry_after``) and drop the frame; once the
        strike budget is spent too, close the connection (1008). Answers to the server's own
        requests are exempt: the server bounds those itself.
        """
        limiter = connection.rate_limiter
        if limiter is None:
            return True
        now = connection.last_activity  # the reader stamped this frame's arrival just before
        if limiter.messages.take(now):
            connection.rate_limit_noted = False
            return True
        if not limiter.strikes.take(now):
            connection.force_close(WS_POLICY_VIOLATION, "rate limit exceeded")
            return False
        if not connection.rate_limit_noted:  # once per episode, not once per message: no log flooding
            connection.rate_limit_noted = True
            self._runtime.audit("limit_hit", level=logging.WARNING, limit="rate", app_id=connection.app_id,
                                user_id=connection.user_id, client_ip=connection.client_ip)
        connection.send_soon(self._encoder.error(message_id, ProtocolError(
            ErrorCode.RATE_LIMITED, "too many messages: slow down",
            {"retry_after": round(limiter.messages.retry_after(), 3)})))
        return False

    def _run_inline(self, spec: HandlerSpec, data: Any, ctx: HandlerContext) -> None:
        try:
            result = spec.handler(data, ctx)
            if result is NO_REPLY:
                return
            frame = self._encoder.frame(spec.response_type, ctx.message_id, {} if result is None else result)
        except ProtocolError as exc:
            frame = self._protocol_error(spec, ctx, exc)
        except Exception:
            frame = self._internal_error(spec, ctx)
        except anyio.get_cancelled_exc_class():  # raised by the handler itself: nothing here awaits
            frame = self._internal_error(spec, ctx)
        ctx.connection.send_soon(frame)

    async def _run(self, spec: HandlerSpec, data: Any, ctx: HandlerContext, scope: anyio.CancelScope,
                   arrived: float) -> None:
        connection = ctx.connection
        try:
            with scope:
                result = await spec.handler(data, ctx)
                if result is NO_REPLY:
                    return
                frame = self._encoder.frame(spec.response_type, ctx.message_id, {} if result is None else result)
            if scope.cancelled_caught:
                frame = self._encoder.error(ctx.message_id, ProtocolError(
                    ErrorCode.CANCELLED, "the request was cancelled", {"message_id": ctx.message_id}))
        except ProtocolError as exc:
            frame = self._protocol_error(spec, ctx, exc)
        except AppDisconnected:
            if connection.closing:
                return  # this very connection is going away: nobody to answer
            frame = self._internal_error(spec, ctx)  # another app went away and the handler did not handle it
        except Exception:
            frame = self._internal_error(spec, ctx)
        except anyio.get_cancelled_exc_class():
            if being_cancelled():
                raise
            frame = self._internal_error(spec, ctx)  # a stray cancellation from the handler's own code
        finally:
            connection.end_request(ctx.message_id, scope)
        try:
            await connection.send(frame)
        except AppDisconnected:
            pass
        if self._metrics is not None:
            self._metrics.request_done(spec.message_type, time.monotonic() - arrived)

    def _protocol_error(self, spec: HandlerSpec, ctx: HandlerContext, exc: ProtocolError) -> str:
        try:
            return self._encoder.error(ctx.message_id, exc)
        except Exception:  # details that cannot be encoded: a bug in the handler
            return self._internal_error(spec, ctx)

    def _internal_error(self, spec: HandlerSpec, ctx: HandlerContext) -> str:
        logger.exception("handler for %r raised", spec.message_type,
                         extra={"app_id": ctx.app_id, "message_id": ctx.message_id})
        error = ProtocolError(ErrorCode.INTERNAL_ERROR,
                              f"the server failed to handle this {spec.message_type!r} message",
                              {"message_type": spec.message_type})
        return self._encoder.error(ctx.message_id, error)

