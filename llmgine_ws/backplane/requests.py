"""Remote-request bookkeeping: what this node waits for from other nodes, and what it holds for them.

* :class:`SentRequest` — a ``send_to_app_and_wait`` from here to an app on another node, settled by
  that node's :class:`~llmgine_ws.backplane.wire.Reply`;
* :class:`ForwardedRequest` — a request from another node, pending on a connection here; its
  outcome is sent back to that node;
* :class:`AckWait` — a fan-out or group operation waiting for other nodes to acknowledge it.

However they end — answered, withdrawn, overdue, their node or app gone, the broker lost, this node
shutting down — each kind ends through one path (:meth:`RemoteRequests.fail_sent`,
:meth:`ForwardedRequest.discard`, :meth:`AckWait.fail` / :meth:`AckWait.forget`). See
``docs/scaling.md`` ("Cluster protocol").
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection
from typing import Any

import anyio

from ..connection import Connection
from ..errors import (
    AppDisconnected,
    AppNotConnected,
    BackplaneUnavailable,
    MessageTooLarge,
    PendingRequestLimit,
    ServerShuttingDown,
)
from ..pending import PendingRequest
from ..protocol import answer_check
from .wire import Reply, Request

Answer = dict[str, Any] | str | None
"""What a forwarded request's waiting node is told: the client's data, an error code, or nothing."""


class SentRequest:
    """A request this node sent to an app on another node, waiting for that node's reply."""

    __slots__ = ("node_id", "pending", "settled")

    def __init__(self, node_id: str, app_id: str, message_id: str) -> None:
        self.node_id = node_id
        self.pending = PendingRequest(app_id, message_id)
        self.settled = False
        """Whether an outcome arrived (else a waiter that gives up withdraws the request)."""

    def settle(self, outcome: dict[str, Any] | BaseException) -> None:
        """The outcome: the client's answer, or the error the waiter raises (first one wins)."""
        if self.settled:
            return
        self.settled = True
        if isinstance(outcome, BaseException):
            self.pending.fail(outcome)
        else:
            self.pending.resolve(outcome)


class ForwardedRequest(PendingRequest):
    """A request waited for on another node, pending on the target connection here.

    Lives in ``connection.pending`` like a local one, so only that connection can answer it; the
    outcome goes back to the waiting node (``origin``) instead of waking a local waiter.
    """

    __slots__ = ("_on_settled", "connection", "deadline", "origin", "settled")

    def __init__(self, connection: Connection, origin: str, message_id: str, deadline: float,
                 on_settled: Callable[[ForwardedRequest, Answer], None]) -> None:
        super().__init__(connection.app_id, message_id)
        self.connection = connection
        self.origin = origin
        self.deadline = deadline
        self.settled = False
        self._on_settled = on_settled

    def resolve(self, data: dict[str, Any]) -> None:
        """The client answered: forward the answer to the waiting node."""
        if self._settle():
            super().resolve(data)
            self._on_settled(self, data)

    def fail(self, error: BaseException) -> None:
        """The app went away (or this node is shutting down): tell the waiting node."""
        if self._settle():
            super().fail(error)
            self._on_settled(self, "shutting_down" if isinstance(error, ServerShuttingDown) else "disconnected")

    def discard(self) -> None:
        """Drop without an answer: withdrawn, overdue, or the waiting node is gone."""
        if self._settle():
            super().fail(AppDisconnected(self.app_id, self.message_id))
            self._on_settled(self, None)

    def _settle(self) -> bool:
        if self.settled:
            return False
        self.settled = True
        return True


class AckWait:
    """Acknowledgements expected from ``expected`` nodes; ``count`` sums what they reported."""

    __slots__ = ("count", "done", "expected", "failed")

    def __init__(self, expected: Collection[str]) -> None:
        self.expected = set(expected)  # a copy: the caller may still be iterating over its own
        self.count = 0
        self.failed = False
        self.done = anyio.Event()
        if not expected:
            self.done.set()

    def got(self, node_id: str, count: int) -> None:
        """``node_id`` acknowledged, having reached ``count`` apps (-1: the app was not there)."""
        if node_id in self.expected:
            self.expected.discard(node_id)
            self.count += count
            if not self.expected:
                self.done.set()

    def forget(self, node_id: str) -> None:
        """``node_id`` left the cluster: stop waiting for it."""
        self.expected.discard(node_id)
        if not self.expected:
            self.done.set()

    def fail(self) -> None:
        """The broker connection was lost: no acknowledgement will come."""
        self.failed = True
        self.done.set()


def reply_error(reply: Reply, app_id: str, backplane_kind: str) -> Exception:
    """The exception a waiter raises for an error ``reply``."""
    if reply.error == "not_connected":
        return AppNotConnected(app_id)
    if reply.error == "pending_limit":
        return PendingRequestLimit(app_id, reply.limit)
    if reply.error == "too_large":
        return MessageTooLarge(reply.size, reply.limit, backplane_kind)
    return AppDisconnected(app_id, reply.message_id)


class RemoteRequests:
    """Every request and acknowledgement in flight between this node and the others.

    ``answer(request, reply)`` is called with the outcome of each :class:`ForwardedRequest` (the
    router sends it to ``request.origin``).
    """

    def __init__(self, node_id: str, backplane_kind: str,
                 answer: Callable[[ForwardedRequest, Reply], None]) -> None:
        self._node_id = node_id
        self._backplane_kind = backplane_kind
        self._answer = answer
        self._sent: dict[str, SentRequest] = {}
        self._held: dict[str, ForwardedRequest] = {}
        self._acks: dict[str, AckWait] = {}

    # ------------------------------------------------------------------ requests this node waits for

    def expect(self, node_id: str, app_id: str, message_id: str) -> SentRequest:
        """Register a request about to be sent to ``app_id`` on ``node_id``; :meth:`done` when it ends."""
        sent = self._sent[message_id] = SentRequest(node_id, app_id, message_id)
        return sent

    def done(self, sent: SentRequest) -> None:
        """The waiter is gone (answered, failed, timed out or cancelled)."""
        if self._sent.get(sent.pending.message_id) is sent:
            del self._sent[sent.pending.message_id]

    def replied(self, reply: Reply) -> None:
        """A reply arrived: settle the request it answers (if it is still waited for, from that node)."""
        sent = self._sent.get(reply.message_id)
        if sent is None or sent.node_id != reply.node:
            return
        if reply.error is None:
            sent.settle(reply.data or {})
        else:
            sent.settle(reply_error(reply, sent.pending.app_id, self._backplane_kind))

    def fail_sent(self, which: Callable[[SentRequest], bool], error: Callable[[str, str], Exception]) -> None:
        """Fail the requests waited for that ``which`` selects with ``error(app_id, message_id)``."""
        for message_id, sent in list(self._sent.items()):
            if not sent.settled and which(sent):
                sent.settle(error(sent.pending.app_id, message_id))

    # ------------------------------------------------------------------ requests held for other nodes

    def hold(self, connection: Connection, message: Request, deadline: float) -> ForwardedRequest:
        """Register ``message`` (from another node) as pending on ``connection`` until ``deadline``."""
        request = ForwardedRequest(connection, message.node, message.message_id, deadline, self._held_settled)
        request.check = answer_check(message.frame)
        connection.pending[message.message_id] = request
        self._held[message.message_id] = request
        return request

    def withdrawn(self, origin: str, message_id: str) -> None:
        """The waiting node gave up on a request."""
        request = self._held.get(message_id)
        if request is not None and request.origin == origin:
            request.discard()

    def overdue(self, now: float) -> None:
        """Drop held requests past their deadline (their waiter has timed out)."""
        for request in list(self._held.values()):
            if now > request.deadline:
                request.discard()

    def _held_settled(self, request: ForwardedRequest, answer: Answer) -> None:
        if self._held.get(request.message_id) is request:
            del self._held[request.message_id]
        if request.connection.pending.get(request.message_id) is request:
            del request.connection.pending[request.message_id]
        if isinstance(answer, dict):
            self._answer(request, Reply(node=self._node_id, message_id=request.message_id, data=answer))
        elif answer is not None:
            self._answer(request, Reply(node=self._node_id, message_id=request.message_id, error=answer))

    # ------------------------------------------------------------------ acknowledgements

    def expect_acks(self, nodes: Collection[str]) -> tuple[str, AckWait]:
        """A new acknowledgement id, and what waits for ``nodes`` to use it; :meth:`acks_done` when it ends."""
        ack = uuid.uuid4().hex
        wait = self._acks[ack] = AckWait(nodes)
        return ack, wait

    def acked(self, node_id: str, ack: str, count: int) -> None:
        """``node_id`` acknowledged ``ack``."""
        wait = self._acks.get(ack)
        if wait is not None:
            wait.got(node_id, count)

    def acks_done(self, ack: str) -> None:
        """Nobody waits for ``ack`` any more."""
        self._acks.pop(ack, None)

    # ------------------------------------------------------------------ what ends them

    def app_gone(self, app_id: str) -> None:
        """An app of another node disconnected: its requests get no answer."""
        self.fail_sent(lambda sent: sent.pending.app_id == app_id, AppDisconnected)

    def node_gone(self, node_id: str) -> None:
        """A node left or expired: fail what waits on it, drop what is held for it."""
        self.fail_sent(lambda sent: sent.node_id == node_id, AppDisconnected)
        for wait in self._acks.values():
            wait.forget(node_id)
        for request in list(self._held.values()):
            if request.origin == node_id:
                request.discard()

    def broker_lost(self) -> None:
        """The backplane connection was lost: no reply or acknowledgement in flight will arrive."""
        self.fail_sent(lambda sent: True, lambda app_id, message_id: BackplaneUnavailable(
            f"connection to the broker lost while request {message_id!r} to app {app_id!r} was pending"))
        for wait in self._acks.values():
            wait.fail()

    def shutting_down(self) -> None:
        """This node stops: fail every request it waits for."""
        self.fail_sent(lambda sent: True, ServerShuttingDown)


__all__ = ["AckWait", "ForwardedRequest", "RemoteRequests", "SentRequest", "reply_error"]
