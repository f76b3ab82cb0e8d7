"""Decode a frame once, look its type up in the dispatch table, run its handler.

This is the reader's only job per frame, and it never waits: ``async`` handlers are started in the
connection's task group, plain ``def`` handlers (trivial by contract) run inline.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from .connection import Connection
from .context import HandlerContext
from .errors import AppDisconnected, ErrorCode, ProtocolError, being_cancelled
from .extensions import HandlerSpec
from .handlers import NO_REPLY
from .protocol import ClientMessage, MessageDecoder, envelope_for

if TYPE_CHECKING:
    from .runtime import Runtime

logger = logging.getLogger("llmgine_ws.dispatch")


class Dispatcher:
    """The decoder and dispatch table of one app, built once from every registered message type."""

    def __init__(self, runtime: Runtime, specs: Iterable[HandlerSpec]) -> None:
        self._runtime = runtime
        self._encoder = runtime.encoder
        self._max_inflight = runtime.config.max_inflight_requests
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
            connection.send_soon(self._encoder.error(readable_id, error))
            return
        spec = self._table[type(message)]
        message_id: str = message.message_id
        ctx = HandlerContext(self._runtime, connection, spec.message_type, message_id)
        if spec.inline:
            self._run_inline(spec, message.data, ctx)
            return
        in_flight = connection.in_flight
        if message_id in in_flight:
            error = ProtocolError(ErrorCode.DUPLICATE_MESSAGE_ID, "a request with this message_id is still running",
                                  {"message_id": message_id})
            connection.send_soon(self._encoder.error(message_id, error))
            return
        if len(in_flight) >= self._max_inflight:
            error = ProtocolError(ErrorCode.TOO_MANY_REQUESTS, "too many requests in flight on this connection",
                                  {"limit": self._max_inflight})
            connection.send_soon(self._encoder.error(message_id, error))
            return
        scope = anyio.CancelScope()
        if connection.spawn(self._run, spec, message.data, ctx, scope):
            in_flight[message_id] = scope

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

    async def _run(self, spec: HandlerSpec, data: Any, ctx: HandlerContext, scope: anyio.CancelScope) -> None:
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
            if connection.in_flight.get(ctx.message_id) is scope:
                del connection.in_flight[ctx.message_id]
        try:
            await connection.send(frame)
        except AppDisconnected:
            pass

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

