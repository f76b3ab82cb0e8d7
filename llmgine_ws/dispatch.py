"""Decode a frame once, look its type up in the dispatch table, run its handler.

This is the reader's only job per frame, and it never waits: ``async`` handlers are started in the
connection's task group, plain ``def`` handlers (trivial by contract) run inline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import anyio
import msgspec

from .audit import AuditLog
from .connection import WS_POLICY_VIOLATION, Connection
from .context import NO_REPLY, HandlerContext, Services
from .errors import AppDisconnected, ErrorCode, ProtocolError
from .extensions import HandlerSpec
from .metrics import Metrics
from .protocol import ANSWERS, CORE_CLIENT_MESSAGES, ClientMessage, MessageDecoder, envelope_for
from .usercode import contained

logger = logging.getLogger("llmgine_ws.dispatch")

def decoded_size_estimate(text: str) -> int:
    """A generous estimate of the memory a frame takes once decoded (bytes).

    JSON text is far smaller than the objects it decodes to: every container and every element costs
    tens of bytes (``[[],[],…]`` decodes to ~25 times its size), so they are counted, not only the
    characters. Small frames are not worth counting: their text length stands in.
    """
    size = len(text)
    if size < 4096:
        return size
    return size + 48 * (text.count("[") + text.count("{") + text.count(","))


def _fresh_ack(connection: Connection, message: Any) -> bool:
    """Whether ``message`` is an ``ack`` of frames not acked yet (or the first, opting in): free under the
    rate limit, like an answer, since there can be no more of them than frames the server sent."""
    resume = connection.resume
    seq = getattr(message.data, "seq", None)
    if resume is None or not isinstance(seq, int) or isinstance(message.data, dict):
        return False
    return not resume.ack_seen or (resume.resumable and resume.acked < seq <= resume.seq)

QUEUED_INLINE = frozenset({"engine_command"})
"""Inline handlers whose requests are queued and held in flight (and so charged to the byte budget)."""

ALLOWED_WHILE_DRAINING = frozenset(name for name, spec in CORE_CLIENT_MESSAGES.items() if spec.while_draining)
"""What a draining server still answers: what lets running work finish, and harmless reads."""


class Dispatcher:
    """The decoder and dispatch table of one app, built once from every registered message type."""

    def __init__(self, specs: Iterable[HandlerSpec], services: Services, *, audit: AuditLog,
                 metrics: Metrics | None) -> None:
        self._services = services
        self._encoder = services.encoder
        self._lifecycle = services.lifecycle
        self._max_inflight = services.config.max_inflight_requests
        self._max_inflight_bytes = services.config.max_inflight_bytes
        self._audit = audit
        self._metrics = metrics
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
        if len(text) >= 4096 and connection.in_flight and self._refused_undecoded(connection, text):
            return
        try:
            message: Any = self.decoder.decode(text)
        except (msgspec.DecodeError, RecursionError) as exc:
            readable_id, error = self.decoder.explain(text, exc)
            if self.within_rate_limit(connection, readable_id):
                connection.send_soon(self._encoder.error(readable_id, error))
            return
        spec = self._table[type(message)]
        message_id: str = message.message_id
        if spec.message_type in ANSWERS and (connection.awaits_answer(message_id) or _fresh_ack(connection, message)):
            pass  # an answer to the server's own request (or an ack of new frames): the server bounds how many
        elif not self.within_rate_limit(connection, message_id):
            return
        if self._metrics is not None:
            self._metrics.message_in(spec.message_type)
        resume = connection.resume
        if resume is not None and resume.resend_ids and spec.message_type not in ANSWERS \
                and resume.is_resend(message_id):
            return  # resent after a resume: it is running (answered once, when done) or its answer was replayed
        if not self._lifecycle.accepting and spec.message_type not in ALLOWED_WHILE_DRAINING:
            connection.send_soon(self._encoder.error(message_id, ProtocolError(
                ErrorCode.SHUTTING_DOWN, "the server is shutting down; reconnect shortly",
                {"message_type": spec.message_type})))
            return
        cost = decoded_size_estimate(text)
        ctx = HandlerContext(self._services, connection, spec.message_type, message_id, cost)
        if spec.inline:
            self._run_inline(spec, message.data, ctx)
            return
        try:
            scope = connection.begin_request(message_id, self._max_inflight, cost, self._max_inflight_bytes)
        except ProtocolError as exc:
            connection.send_soon(self._encoder.error(message_id, exc))
            return
        if spec.prepare is not None:
            try:
                ctx.prepared = spec.prepare(message.data, ctx)
            except ProtocolError as exc:
                connection.end_request(message_id, scope)
                connection.send_soon(self._encoder.error(message_id, exc))
                return
        if not connection.spawn(self._run, spec, message.data, ctx, scope, connection.last_activity):
            connection.end_request(message_id, scope)

    def _refused_undecoded(self, connection: Connection, text: str) -> bool:
        """Refuse a large request the connection's in-flight byte budget cannot take, *before* decoding
        it: a 1 MiB ``[[],[],…]`` takes ~70 ms to decode and ~25 MiB once decoded, only to be refused.
        Reads just the envelope (type, message_id); False (the caller decodes as usual) for anything else.
        """
        cost = decoded_size_estimate(text)
        if connection.in_flight_bytes + cost <= self._max_inflight_bytes:
            return False
        envelope = self.decoder.envelope(text)
        if envelope is None:
            return False
        message_type, message_id = envelope
        spec = self.specs.get(message_type)
        if spec is None or (spec.inline and message_type not in QUEUED_INLINE) or message_id in connection.in_flight:
            return False
        if spec.message_type in ANSWERS and connection.awaits_answer(message_id):
            return False
        if self.within_rate_limit(connection, message_id):
            connection.send_soon(self._encoder.error(message_id, ProtocolError(
                ErrorCode.TOO_MANY_REQUESTS, "the requests in flight on this connection hold too much data: wait "
                "for answers before sending more", {"limit_bytes": self._max_inflight_bytes,
                                                    "in_flight_bytes": connection.in_flight_bytes,
                                                    "request_bytes": cost})))
        return True

    def within_rate_limit(self, connection: Connection, message_id: str | None) -> bool:
        """Spend one message of the connection's rate limit; False if the frame must be dropped.

        Over the limit: answer ``RATE_LIMITED`` (with ``retry_after``) and drop the frame; once the
        strike budget is spent too, close the connection (1008).
        """
        limiter, user_limiter = connection.rate_limiter, connection.user_rate_limiter
        if limiter is None and user_limiter is None:
            return True
        now = connection.last_activity  # the reader stamped this frame's arrival just before
        refused_by = None
        if limiter is not None and not limiter.messages.take(now):
            refused_by = limiter.messages
        elif user_limiter is not None and not user_limiter.take(now):
            refused_by = user_limiter
        if refused_by is None:
            connection.rate_limit_noted = False
            return True
        if limiter is not None and not limiter.strikes.take(now):
            connection.force_close(WS_POLICY_VIOLATION, "rate limit exceeded")
            return False
        if not connection.rate_limit_noted:  # once per episode, not once per message: no log flooding
            connection.rate_limit_noted = True
            self._audit("limit_hit", level=logging.WARNING, limit="rate" if refused_by is not user_limiter
                        else "user_rate", app_id=connection.app_id, user_id=connection.user_id,
                        client_ip=connection.client_ip)
        connection.send_soon(self._encoder.error(message_id, ProtocolError(
            ErrorCode.RATE_LIMITED, "too many messages: slow down",
            {"retry_after": round(refused_by.retry_after(), 3)})))
        return False

    def _run_inline(self, spec: HandlerSpec, data: Any, ctx: HandlerContext) -> None:
        frame: str | None = None
        with contained(logger, "handler for %r raised", spec.message_type,
                       extra={"app_id": ctx.app_id, "message_id": ctx.message_id}) as outcome:
            try:
                result = spec.handler(data, ctx)
                if result is NO_REPLY:
                    return
                frame = self._encoder.frame(spec.response_type, ctx.message_id, {} if result is None else result)
            except ProtocolError as exc:
                frame = self._protocol_error(spec, ctx, exc)
        if outcome.failed or frame is None:
            frame = self._internal_error(spec, ctx.message_id)
        ctx.connection.send_soon(frame)

    async def _run(self, spec: HandlerSpec, data: Any, ctx: HandlerContext, scope: anyio.CancelScope,
                   arrived: float) -> None:
        connection = ctx.connection
        frame: str | None = None
        try:
            with contained(logger, "handler for %r raised", spec.message_type,
                           extra={"app_id": ctx.app_id, "message_id": ctx.message_id}) as outcome:
                try:
                    with scope:
                        result = await spec.handler(data, ctx)
                        if result is NO_REPLY:
                            return
                        frame = self._encoder.frame(spec.response_type, ctx.message_id,
                                                    {} if result is None else result)
                    if scope.cancelled_caught:
                        frame = self._encoder.error(ctx.message_id, ProtocolError(
                            ErrorCode.CANCELLED, "the request was cancelled", {"message_id": ctx.message_id}))
                except ProtocolError as exc:
                    frame = self._protocol_error(spec, ctx, exc)
                except AppDisconnected:
                    if connection.closing:
                        return  # this very connection is going away: nobody to answer
                    raise  # another app went away and the handler did not handle it
        finally:
            connection.end_request(ctx.message_id, scope)
        if outcome.failed or frame is None:
            frame = self._internal_error(spec, ctx.message_id)
        try:
            await connection.send(frame)
        except AppDisconnected:
            pass
        if self._metrics is not None:
            self._metrics.request_done(spec.message_type, time.monotonic() - arrived)

    def _protocol_error(self, spec: HandlerSpec, ctx: HandlerContext, exc: ProtocolError) -> str | None:
        try:
            return self._encoder.error(ctx.message_id, exc)
        except Exception:  # details that cannot be encoded: a bug in the handler
            logger.exception("handler for %r raised a ProtocolError whose details cannot be encoded",
                             spec.message_type, extra={"app_id": ctx.app_id, "message_id": ctx.message_id})
            return None

    def _internal_error(self, spec: HandlerSpec, message_id: str) -> str:
        error = ProtocolError(ErrorCode.INTERNAL_ERROR,
                              f"the server failed to handle this {spec.message_type!r} message",
                              {"message_type": spec.message_type})
        return self._encoder.error(message_id, error)
