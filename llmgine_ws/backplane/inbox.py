"""What a node does with the messages other nodes send to its inbox (presence aside).

Deliveries, requests and fan-outs are served on this node's connections through its
:class:`~llmgine_ws.routing.LocalRouter`; replies and acknowledgements settle what this node waits
for (:class:`~llmgine_ws.backplane.requests.RemoteRequests`). See ``docs/scaling.md`` ("Cluster
protocol").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import Any, ClassVar

from ..connection import Connection
from ..errors import AppDisconnected
from ..routing import LocalRouter
from .requests import RemoteRequests
from .wire import Ack, Deliver, Fanout, GroupOp, NodeMessage, Reply, Request, Withdraw

logger = logging.getLogger("llmgine_ws.cluster")


class Inbox:
    """Serves other nodes' messages; ``send(node_id, message)`` queues an answer for ``node_id``'s inbox."""

    def __init__(self, node_id: str, local: LocalRouter, requests: RemoteRequests,
                 send: Callable[[str, NodeMessage], None], *, grace: float) -> None:
        self._node_id = node_id
        self._local = local
        self._hub = local.hub
        self._requests = requests
        self._send = send
        self._grace = grace
        """How long past its waiter's timeout a request is held here (should the withdrawal be lost)."""

    def handle(self, message: NodeMessage) -> None:
        """Act on ``message`` (presence messages are not for the inbox: they are ignored here)."""
        handler = self._handlers.get(type(message))
        if handler is not None:
            handler(self, message)

    def _on_deliver(self, message: Deliver) -> None:
        connection = self._hub.get(message.app_id)
        if connection is None or not connection.send_soon(message.frame):
            logger.debug("cluster node %s: frame for %s from %s dropped: app not connected here", self._node_id,
                         message.app_id, message.node)

    def _on_request(self, message: Request) -> None:
        def refuse(error: str, limit: int = 0) -> None:
            self._send(message.node, Reply(node=self._node_id, message_id=message.message_id, error=error,
                                           limit=limit))

        connection = self._hub.get(message.app_id)
        if connection is None:
            refuse("not_connected")
            return
        if connection.closing:
            refuse("disconnected")
            return
        limit = self._local.max_pending_requests
        if len(connection.pending) >= limit:
            refuse("pending_limit", limit)
            return
        request = self._requests.hold(connection, message, time.monotonic() + message.timeout + self._grace)
        if not connection.send_soon(message.frame):
            request.fail(AppDisconnected(message.app_id, message.message_id))

    def _on_withdraw(self, message: Withdraw) -> None:
        self._requests.withdrawn(message.node, message.message_id)

    def _on_reply(self, message: Reply) -> None:
        self._requests.replied(message)

    def _on_fanout(self, message: Fanout) -> None:
        if message.scope == "all":
            targets: Collection[Connection] = list(self._hub)
        elif message.scope == "user":
            targets = self._hub.user_connections(message.target)
        else:
            targets = self._hub.group_connections(message.target)
        count = self._local.deliver_many(targets, message.frame, set(message.exclude))
        self._send(message.node, Ack(node=self._node_id, ack=message.ack, count=count))

    def _on_group_op(self, message: GroupOp) -> None:
        if message.join:
            joined = self._hub.join_group(message.app_id, message.group)
            ack = Ack(node=self._node_id, ack=message.ack, count=1, error=None if joined else "not_connected")
        else:
            left = self._hub.leave_group(message.app_id, message.group)
            ack = Ack(node=self._node_id, ack=message.ack, count=int(left))
        self._send(message.node, ack)

    def _on_ack(self, message: Ack) -> None:
        self._requests.acked(message.node, message.ack, -1 if message.error else message.count)

    _handlers: ClassVar[dict[type[Any], Callable[[Inbox, Any], None]]] = {
        Deliver: _on_deliver,
        Request: _on_request,
        Withdraw: _on_withdraw,
        Reply: _on_reply,
        Fanout: _on_fanout,
        GroupOp: _on_group_op,
        Ack: _on_ack,
    }


__all__ = ["Inbox"]
