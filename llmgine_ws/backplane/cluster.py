"""The cluster router: the :class:`~llmgine_ws.routing.MessageRouter` of a node that shares a backplane.

Apps connected to this node are served by the node's :class:`~llmgine_ws.routing.LocalRouter`
exactly as without a cluster; everything else crosses the backplane. The protocol between nodes is
implemented here, once, on top of the thin :class:`~llmgine_ws.backplane.Backplane` transport, so it
behaves the same over memory, NATS and Redis.

Subjects (``<cluster>`` is ``APIConfig.cluster_name``)::

    <cluster>.presence          every node: hello, heartbeat, presence deltas, goodbye
    <cluster>.node.<node_id>    one node's inbox: deliveries, requests and replies, fan-outs, acks,
                                snapshots, group operations

**Presence.** Each node numbers its presence changes (app connected/disconnected, session
created/removed) and publishes each as a delta; every ``heartbeat_interval`` it publishes a
heartbeat carrying the latest number. A node that sees a gap (a lost delta, a node it does not know,
a node that restarted or reconnected) asks that node for a snapshot, sent to its inbox in parts.
A node that falls silent (no heartbeat, nor any other message) is expired after
``1.5 × heartbeat_interval`` (checked four times an interval), so a node killed without warning
disappears from presence within two intervals and requests to its apps fail with
``AppNotConnected`` instead of hanging; a node that shuts down cleanly says goodbye and disappears
at once. A node expired by mistake (say, a long stall) reappears with its next heartbeat.

**Requests.** ``send_to_app_and_wait`` to an app on node T publishes a request to T's inbox. T
registers the request in the target connection's ``pending`` table as a :class:`_RemotePending`, so
ownership is unchanged (only that connection's ``server_response`` can answer it); answering,
failing (the app disconnects: ``AppDisconnected``) or T shutting down all send the outcome back to
the waiting node's inbox. A waiter that times out or is cancelled withdraws the request; T drops it
anyway past its deadline, and when the waiting node leaves or expires.

**Fan-out.** ``broadcast``, ``send_to_user`` and ``send_to_group`` deliver locally, then publish
one message to each other node's inbox and wait (at most ``2 × heartbeat_interval``) for each node to
acknowledge with how many apps it reached, so the count returned is cluster-wide.

**Ordering.** Everything one node sends to another goes through the other's single inbox, so
messages a task sends to one app arrive in the order it sent them, whatever the mix of unicast,
fan-out and requests; on the receiving node a client that cannot keep up gets them through an
ordered backlog (and is closed after ``send_grace``, as locally).

**Broker outage.** Local connections keep being served; remote operations raise
:class:`~llmgine_ws.errors.BackplaneUnavailable` (fan-outs after delivering locally: the exception
says how many apps that reached); waiters for remote answers fail with it; ``/health/ready`` is 503
until the backplane is back *and* the node has seen its own hello loop back through it; the
backplane reconnects by itself and presence resynchronises.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime
from typing import Any, ClassVar, Union

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..config import APIConfig
from ..connection import Connection, PendingRequest
from ..errors import (
    AppDisconnected,
    AppNotConnected,
    BackplaneUnavailable,
    MessageTooLarge,
    MessagingError,
    PendingRequestLimit,
    ServerShuttingDown,
)
from ..hub import Hub
from ..routing import AppPresence, LocalRouter, MessageRouter, NodePresence, default_node_name
from ..sessions import Session, SessionStore
from . import Backplane, backplane_from_url

logger = logging.getLogger("llmgine_ws.cluster")

CLUSTER_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
EXPIRY_FACTOR = 1.5
"""A node is expired this many heartbeat intervals after its last sign of life."""
SWEEPS_PER_INTERVAL = 4
SNAPSHOT_PART_APPS = 500
OUTBOX_SIZE = 16384
MAX_BUFFERED_DELTAS = 10000
PUBLISH_BATCH = 256


# ---------------------------------------------------------------------------------------- wire


class _Wire(msgspec.Struct, tag_field="k", frozen=True, kw_only=True):
    node: str
    """The sending node."""


class Hello(_Wire, tag="hello", frozen=True):
    """A node (re)joined: answer with a snapshot."""

    name: str
    seq: int


class Heartbeat(_Wire, tag="hb", frozen=True):
    """A node is alive; ``seq`` is its latest presence change."""

    name: str
    seq: int


class Goodbye(_Wire, tag="bye", frozen=True):
    """A node is leaving cleanly."""


class Delta(_Wire, tag="delta", frozen=True):
    """One presence change: ``op`` is ``app+``, ``app-``, ``session+`` or ``session-``."""

    seq: int
    op: str
    app_id: str
    session_id: str = ""
    user_id: str | None = None
    connected_at: float = 0.0


class SyncRequest(_Wire, tag="sync", frozen=True):
    """Send me your snapshot."""


class AppEntry(msgspec.Struct, array_like=True, frozen=True):
    """One app in a snapshot."""

    app_id: str
    user_id: str | None
    connected_at: float
    sessions: list[str]


class Snapshot(_Wire, tag="snap", frozen=True):
    """Part ``part`` of ``parts`` of a node's presence as of ``seq``."""

    name: str
    seq: int
    part: int
    parts: int
    apps: list[AppEntry]


class Deliver(_Wire, tag="send", frozen=True):
    """Deliver ``frame`` to ``app_id``."""

    app_id: str
    frame: str


class Request(_Wire, tag="req", frozen=True):
    """A server request for ``app_id``; the outcome goes back to the sender's inbox."""

    app_id: str
    message_id: str
    frame: str
    timeout: float


class Withdraw(_Wire, tag="withdraw", frozen=True):
    """The waiter gave up on a request (timeout or cancellation)."""

    app_id: str
    message_id: str


class Reply(_Wire, tag="reply", frozen=True):
    """The outcome of a request: the client's answer, or an error code."""

    message_id: str
    data: dict[str, Any] | None = None
    error: str | None = None
    limit: int = 0
    size: int = 0


class Fanout(_Wire, tag="fanout", frozen=True):
    """Deliver ``frame`` to every app here in ``scope`` (``all``, ``user`` or ``group``) and ack."""

    ack: str
    scope: str
    target: str
    frame: str
    exclude: list[str] = msgspec.field(default_factory=list)


class GroupOp(_Wire, tag="group", frozen=True):
    """Add ``app_id`` to (or remove it from) ``group`` and ack."""

    ack: str
    app_id: str
    group: str
    join: bool


class Ack(_Wire, tag="ack", frozen=True):
    """Acknowledges a fan-out (``count`` apps reached) or a group operation."""

    ack: str
    count: int = 0
    error: str | None = None


WireMessage = Union[  # noqa: UP007 - a runtime union for msgspec
    Hello, Heartbeat, Goodbye, Delta, SyncRequest, Snapshot, Deliver, Request, Withdraw, Reply, Fanout, GroupOp, Ack
]

# ---------------------------------------------------------------------------------------- state


class _RemoteApp:
    __slots__ = ("app_id", "connected_at", "sessions", "user_id")

    def __init__(self, app_id: str, user_id: str | None, connected_at: float, sessions: Collection[str]) -> None:
        self.app_id = app_id
        self.user_id = user_id
        self.connected_at = connected_at
        self.sessions = set(sessions)


class _RemoteNode:
    __slots__ = ("apps", "buffered", "last_seen", "name", "node_id", "parts", "parts_seq", "seq",
                 "sync_requested_at", "synced")

    def __init__(self, node_id: str, name: str) -> None:
        self.node_id = node_id
        self.name = name
        self.seq = 0
        self.last_seen = time.monotonic()
        self.apps: dict[str, _RemoteApp] = {}
        self.synced = False
        self.buffered: list[Delta] = []
        self.sync_requested_at: float | None = None
        self.parts: dict[int, list[AppEntry]] = {}
        self.parts_seq: int | None = None


class _Waiter:
    """A request this node sent to an app on another node."""

    __slots__ = ("answered", "node_id", "pending")

    def __init__(self, node_id: str, pending: PendingRequest) -> None:
        self.node_id = node_id
        self.pending = pending
        self.answered = False


class _AckWait:
    __slots__ = ("count", "done", "expected", "failed")

    def __init__(self, expected: set[str]) -> None:
        self.expected = expected
        self.count = 0
        self.failed = False
        self.done = anyio.Event()
        if not expected:
            self.done.set()

    def got(self, node_id: str, count: int) -> None:
        if node_id in self.expected:
            self.expected.discard(node_id)
            self.count += count
            if not self.expected:
                self.done.set()

    def forget(self, node_id: str) -> None:
        self.expected.discard(node_id)
        if not self.expected:
            self.done.set()

    def fail(self) -> None:
        self.failed = True
        self.done.set()


class _RemotePending(PendingRequest):
    """A server request waited for on another node, pending on the target connection here.

    Lives in ``connection.pending`` like a local one, so only that connection can answer it; the
    outcome is sent to the waiting node instead of waking a local waiter.
    """

    __slots__ = ("deadline", "origin", "router")

    def __init__(self, router: ClusterRouter, origin: str, app_id: str, message_id: str, deadline: float) -> None:
        super().__init__(app_id, message_id)
        self.router = router
        self.origin = origin
        self.deadline = deadline

    @property
    def done(self) -> bool:
        """Whether an outcome was decided."""
        return self._done.is_set()

    def resolve(self, data: dict[str, Any]) -> None:
        """The client answered: forward the answer to the waiting node."""
        if not self.done:
            super().resolve(data)
            self.router._answer(self, Reply(node=self.router.node_id, message_id=self.message_id, data=data))

    def fail(self, error: BaseException) -> None:
        """The app went away (or this node is shutting down): tell the waiting node."""
        if not self.done:
            super().fail(error)
            code = "shutting_down" if isinstance(error, ServerShuttingDown) else "disconnected"
            self.router._answer(self, Reply(node=self.router.node_id, message_id=self.message_id, error=code))

    def discard(self) -> None:
        """Drop without an answer (withdrawn, or the waiting node is gone)."""
        if not self.done:
            super().fail(AppDisconnected(self.app_id, self.message_id))


_Outgoing = tuple[str, bytes, anyio.Event | None]


# ---------------------------------------------------------------------------------------- router


class ClusterRouter:
    """A :class:`~llmgine_ws.routing.MessageRouter` over a :class:`~llmgine_ws.backplane.Backplane`.

    Built by the runtime when a backplane is configured; run by the app's lifespan (:meth:`run`).
    Falls back to the local router for apps connected to this node.
    """

    def __init__(
        self,
        local: LocalRouter,
        sessions: SessionStore,
        backplane: Backplane,
        *,
        cluster_name: str = "llmgine",
        heartbeat_interval: float = 2.0,
        node_name: str | None = None,
    ) -> None:
        if not CLUSTER_NAME_RE.match(cluster_name):
            raise ValueError("cluster_name must be 1-64 characters of letters, digits, '_' and '-'")
        if heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be > 0")
        self._local = local
        self._hub: Hub = local.hub
        self._sessions = sessions
        self.backplane = backplane
        self._node_id = uuid.uuid4().hex
        self._node_name = node_name or default_node_name()
        self.cluster_name = cluster_name
        self.heartbeat_interval = heartbeat_interval
        self.expiry = EXPIRY_FACTOR * heartbeat_interval
        self.ack_timeout = 2 * heartbeat_interval
        self._presence_subject = f"{cluster_name}.presence"
        self._inbox_prefix = f"{cluster_name}.node."
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(WireMessage)
        self._seq = 0
        self._nodes: dict[str, _RemoteNode] = {}
        self._app_nodes: dict[str, _RemoteNode] = {}
        self._session_apps: dict[str, str] = {}
        self._user_nodes: dict[str, dict[str, int]] = {}
        """user_id → {node_id: apps of that user there}: ``send_to_user`` only asks those nodes."""
        self._waiters: dict[str, _Waiter] = {}
        self._acks: dict[str, _AckWait] = {}
        self._remote_pending: dict[str, tuple[Connection, _RemotePending]] = {}
        self._outbox: MemoryObjectSendStream[_Outgoing]
        self._outbox_receive: MemoryObjectReceiveStream[_Outgoing]
        self._outbox, self._outbox_receive = anyio.create_memory_object_stream[_Outgoing](OUTBOX_SIZE)
        self._up = False
        self._echoed = False
        self._down_since = time.monotonic()
        self._running = False
        self._was_up = False
        self._dropped_outgoing = 0
        self._changed = anyio.Event()
        self._hub.listeners.append(self)
        self._sessions.listeners.append(self)

    # ------------------------------------------------------------------ identity & health

    @property
    def node_id(self) -> str:
        """This node's id: fresh for every process (a restarted node is a new node)."""
        return self._node_id

    @property
    def node_name(self) -> str:
        """This node's label (``hostname:pid`` unless configured)."""
        return self._node_name

    @property
    def ready(self) -> bool:
        """Connected to the backplane, and this node's own hello came back through it."""
        return self._running and self._up and self._echoed and self.backplane.connected

    def health_problems(self) -> list[str]:
        """See :meth:`~llmgine_ws.routing.MessageRouter.health_problems`."""
        where = f"{self.backplane.kind} backplane {self.backplane.describe()}"
        if not self._running:
            return [f"{where}: router not running"]
        if not self._up or not self.backplane.connected:
            return [f"{where}: disconnected for {time.monotonic() - self._down_since:.1f}s (reconnecting)"]
        if not self._echoed:
            return [f"{where}: connected, waiting for this node's hello to come back"]
        return []

    def _bump(self) -> None:
        """Wake whoever waits in :meth:`wait_for`: presence or connectivity changed."""
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until ``predicate()`` holds, re-checking after every presence or connectivity change.

        E.g. ``await router.wait_for(lambda: router.is_app_connected(app_id), 5)``. Raises
        ``TimeoutError`` after ``timeout`` seconds.
        """
        with anyio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, announce, heartbeat and expire nodes until cancelled; then say goodbye.

        Returns ``started`` at once: the backplane connects in the background, and the node serves
        its local connections meanwhile (not ready until connected).
        """
        subjects = [self._presence_subject, self._inbox(self._node_id)]
        transport, publisher = anyio.CancelScope(shield=True), anyio.CancelScope(shield=True)
        async with anyio.create_task_group() as tg:
            # The transport and its publisher are shielded from the lifespan's cancellation, so that
            # the presence changes of the shutdown and the goodbye still go out; they stop below.
            await tg.start(self._shielded, transport, self._run_backplane, subjects)
            await tg.start(self._shielded, publisher, self._publish_outgoing)
            tg.start_soon(self._heartbeat)
            tg.start_soon(self._sweep)
            self._running = True
            logger.info("cluster node %s (%s) started on the %s backplane %s", self._node_id, self._node_name,
                        self.backplane.kind, self.backplane.describe())
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._running = False
                with anyio.CancelScope(shield=True):
                    try:
                        with anyio.move_on_after(2.0):
                            await self._leave()
                    finally:
                        transport.cancel()
                        publisher.cancel()
                        tg.cancel_scope.cancel()
                        self._fail_waiters(lambda waiter: True, lambda app_id, message_id: ServerShuttingDown(
                            app_id, message_id))

    @staticmethod
    async def _shielded(
        scope: anyio.CancelScope,
        func: Callable[..., Awaitable[None]],
        *args: Any,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        with scope:
            await func(*args, task_status=task_status)

    async def _run_backplane(self, subjects: list[str], *,
                             task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self.backplane.run(subjects, self._on_message, self._on_state, task_status=task_status)

    async def _leave(self) -> None:
        """Flush queued presence changes, then say goodbye (bounded by the caller)."""
        if not self._up:
            return
        flushed = anyio.Event()
        self._enqueue_raw("", b"", flushed)
        await flushed.wait()
        try:
            await self.backplane.publish(self._presence_subject, self._encode(Goodbye(node=self._node_id)))
        except MessagingError as exc:
            logger.warning("cluster: goodbye not sent: %s", exc)

    def _on_state(self, up: bool) -> None:
        if up == self._up:
            return
        self._up = up
        self._echoed = False
        self._bump()
        if up:
            if self._was_up:
                logger.warning("cluster node %s: backplane %s reconnected", self._node_id, self.backplane.describe())
            self._was_up = True
            self._enqueue(self._presence_subject, Hello(node=self._node_id, name=self._node_name, seq=self._seq))
            self._enqueue(self._presence_subject, Heartbeat(node=self._node_id, name=self._node_name, seq=self._seq))
            return
        self._down_since = time.monotonic()
        if self._running:
            logger.error("cluster node %s: backplane %s lost; serving local connections only until it is back",
                         self._node_id, self.backplane.describe())
        self._fail_waiters(lambda waiter: True, lambda app_id, message_id: BackplaneUnavailable(
            f"connection to the broker lost while request {message_id!r} to app {app_id!r} was pending"))
        for wait in self._acks.values():
            wait.fail()

    # ------------------------------------------------------------------ outgoing

    def _inbox(self, node_id: str) -> str:
        return self._inbox_prefix + node_id

    def _encode(self, message: _Wire) -> bytes:
        return self._encoder.encode(message)

    def _enqueue(self, subject: str, message: _Wire) -> None:
        """Publish from code that cannot wait, in order, from the publisher task."""
        self._enqueue_raw(subject, self._encode(message), None)

    def _enqueue_raw(self, subject: str, payload: bytes, done: anyio.Event | None) -> None:
        try:
            self._outbox.send_nowait((subject, payload, done))
        except anyio.WouldBlock:
            self._dropped_outgoing += 1
            logger.error("cluster node %s: %d backplane messages queued; dropping one for %s", self._node_id,
                         OUTBOX_SIZE, subject)
            if done is not None:
                done.set()

    async def _publish_outgoing(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Publish what was queued, in order, batching whatever piled up meanwhile."""
        task_status.started()
        async for item in self._outbox_receive:
            batch = [item]
            while len(batch) < PUBLISH_BATCH:
                try:
                    batch.append(self._outbox_receive.receive_nowait())
                except anyio.WouldBlock:
                    break
            messages: list[tuple[str, bytes]] = []
            for subject, payload, done in batch:
                if done is None:
                    messages.append((subject, payload))
                    continue
                await self._publish_batch(messages)  # a flush marker: everything before it goes first
                messages = []
                done.set()
            await self._publish_batch(messages)

    async def _publish_batch(self, messages: list[tuple[str, bytes]]) -> None:
        if not messages:
            return
        try:
            await self.backplane.publish_many(messages)
        except MessagingError as exc:
            log = logger.warning if self._up else logger.debug
            log("cluster node %s: %d queued message(s) not published: %s", self._node_id, len(messages), exc)

    async def _publish(self, node_id: str, message: _Wire) -> None:
        await self.backplane.publish(self._inbox(node_id), self._encode(message))

    def _answer(self, pending: _RemotePending, reply: Reply) -> None:
        entry = self._remote_pending.get(pending.message_id)
        if entry is not None and entry[1] is pending:
            del self._remote_pending[pending.message_id]
        payload = self._encode(reply)
        limit = self.backplane.max_payload
        if limit and len(payload) > limit:  # (0 while disconnected: then the publish fails anyway)
            logger.error("cluster node %s: the answer of %s to request %s is %d bytes, over the %s backplane's "
                         "limit of %d; the waiter gets MessageTooLarge", self._node_id, pending.app_id,
                         pending.message_id, len(payload), self.backplane.kind, limit)
            payload = self._encode(Reply(node=self._node_id, message_id=pending.message_id, error="too_large",
                                         limit=limit, size=len(payload)))
        self._enqueue_raw(self._inbox(pending.origin), payload, None)

    # ------------------------------------------------------------------ background

    async def _heartbeat(self) -> None:
        while True:
            if self._up:
                self._enqueue(self._presence_subject,
                              Heartbeat(node=self._node_id, name=self._node_name, seq=self._seq))
            await anyio.sleep(self.heartbeat_interval)

    async def _sweep(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_interval / SWEEPS_PER_INTERVAL)
            self.sweep()

    def sweep(self) -> None:
        """Expire silent nodes and overdue requests from other nodes (runs four times an interval)."""
        now = time.monotonic()
        for node in list(self._nodes.values()):
            if now - node.last_seen > self.expiry:
                logger.warning("cluster node %s: node %s (%s) expired: no heartbeat for %.1fs; its %d app(s) are "
                               "gone", self._node_id, node.node_id, node.name, now - node.last_seen, len(node.apps))
                self._drop_node(node)
            elif not node.synced and node.sync_requested_at is not None \
                    and now - node.sync_requested_at > self.heartbeat_interval:
                self._request_sync(node)
        for message_id, (connection, pending) in list(self._remote_pending.items()):
            if now > pending.deadline:
                del self._remote_pending[message_id]
                if connection.pending.get(message_id) is pending:
                    del connection.pending[message_id]
                pending.discard()

    # ------------------------------------------------------------------ local presence (hub/session listeners)

    def _delta(self, op: str, app_id: str, **fields: Any) -> None:
        self._seq += 1
        if self._up:
            self._enqueue(self._presence_subject,
                          Delta(node=self._node_id, seq=self._seq, op=op, app_id=app_id, **fields))

    def app_added(self, connection: Connection) -> None:
        """Hub listener: announce the app."""
        self._delta("app+", connection.app_id, user_id=connection.user_id,
                    connected_at=connection.connected_at.timestamp())

    def app_removed(self, connection: Connection) -> None:
        """Hub listener: announce that the app is gone."""
        self._delta("app-", connection.app_id)

    def session_added(self, session: Session) -> None:
        """Session listener: announce the session."""
        self._delta("session+", session.app_id, session_id=session.session_id)

    def session_removed(self, session: Session) -> None:
        """Session listener: announce that the session is gone."""
        self._delta("session-", session.app_id, session_id=session.session_id)

    def _snapshot(self) -> list[Snapshot]:
        entries = [AppEntry(c.app_id, c.user_id, c.connected_at.timestamp(), sorted(c.session_ids)) for c in self._hub]
        chunks = [entries[i:i + SNAPSHOT_PART_APPS] for i in range(0, len(entries), SNAPSHOT_PART_APPS)] or [[]]
        return [Snapshot(node=self._node_id, name=self._node_name, seq=self._seq, part=i, parts=len(chunks),
                         apps=chunk) for i, chunk in enumerate(chunks)]

    def _send_snapshot(self, node_id: str) -> None:
        for part in self._snapshot():
            self._enqueue(self._inbox(node_id), part)

    # ------------------------------------------------------------------ incoming

    def _on_message(self, subject: str, payload: bytes) -> None:
        try:
            message = self._decoder.decode(payload)
        except msgspec.DecodeError as exc:
            logger.error("cluster node %s: undecodable message on %s dropped: %s", self._node_id, subject, exc)
            return
        if message.node == self._node_id:
            if isinstance(message, Hello) and not self._echoed:
                self._echoed = True
                self._bump()
            return
        node = self._nodes.get(message.node)
        if node is not None:
            node.last_seen = time.monotonic()  # any traffic is a sign of life, not only heartbeats
        handler = self._handlers.get(type(message))
        if handler is not None:
            try:
                handler(self, message)
            except Exception:
                logger.exception("cluster node %s: handling %s from %s failed", self._node_id,
                                 type(message).__name__, message.node)

    def _seen(self, node_id: str, name: str) -> _RemoteNode:
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = _RemoteNode(node_id, name)
            logger.info("cluster node %s: node %s (%s) joined", self._node_id, node_id, name)
            self._bump()
        node.last_seen = time.monotonic()
        node.name = name or node.name
        return node

    def _on_hello(self, message: Hello) -> None:
        node = self._seen(message.node, message.name)
        self._send_snapshot(message.node)
        if not node.synced or node.seq != message.seq:
            self._request_sync(node, force=True)

    def _on_heartbeat(self, message: Heartbeat) -> None:
        node = self._seen(message.node, message.name)
        if not node.synced or node.seq != message.seq:
            self._request_sync(node)

    def _on_goodbye(self, message: Goodbye) -> None:
        node = self._nodes.get(message.node)
        if node is not None:
            logger.info("cluster node %s: node %s (%s) left", self._node_id, node.node_id, node.name)
            self._drop_node(node)

    def _on_sync_request(self, message: SyncRequest) -> None:
        self._send_snapshot(message.node)

    def _request_sync(self, node: _RemoteNode, *, force: bool = False) -> None:
        now = time.monotonic()
        node.synced = False
        if not force and node.sync_requested_at is not None and now - node.sync_requested_at < self.heartbeat_interval:
            return
        node.sync_requested_at = now
        self._enqueue(self._inbox(node.node_id), SyncRequest(node=self._node_id))

    def _on_delta(self, message: Delta) -> None:
        node = self._nodes.get(message.node)
        if node is None:
            node = self._seen(message.node, "")
        node.last_seen = time.monotonic()
        if node.synced:
            if message.seq <= node.seq:
                return
            if message.seq == node.seq + 1:
                self._apply_delta(node, message)
                return
        if len(node.buffered) < MAX_BUFFERED_DELTAS:
            node.buffered.append(message)
        self._request_sync(node)

    def _on_snapshot(self, message: Snapshot) -> None:
        node = self._seen(message.node, message.name)
        if node.synced and message.seq <= node.seq:
            return
        if node.parts_seq != message.seq:
            node.parts_seq, node.parts = message.seq, {}
        node.parts[message.part] = message.apps
        if len(node.parts) < message.parts:
            return
        entries = [entry for part in sorted(node.parts) for entry in node.parts[part]]
        node.parts, node.parts_seq = {}, None
        self._forget_apps(node)
        for entry in entries:
            self._add_app(node, _RemoteApp(entry.app_id, entry.user_id, entry.connected_at, entry.sessions))
        node.seq = message.seq
        node.synced = True
        node.sync_requested_at = None
        buffered, node.buffered = sorted(node.buffered, key=lambda delta: delta.seq), []
        for delta in buffered:
            if delta.seq <= node.seq:
                continue
            if delta.seq != node.seq + 1:
                self._request_sync(node, force=True)
                break
            self._apply_delta(node, delta)
        self._bump()

    def _apply_delta(self, node: _RemoteNode, delta: Delta) -> None:
        node.seq = delta.seq
        if delta.op == "app+":
            self._add_app(node, _RemoteApp(delta.app_id, delta.user_id, delta.connected_at, ()))
        elif delta.op == "app-":
            app = node.apps.pop(delta.app_id, None)
            if app is not None:
                self._unindex(app)
            self._fail_waiters(lambda waiter: waiter.pending.app_id == delta.app_id, AppDisconnected)
        elif delta.op == "session+":
            remote = node.apps.get(delta.app_id)
            if remote is not None:
                remote.sessions.add(delta.session_id)
                self._session_apps[delta.session_id] = delta.app_id
        elif delta.op == "session-":
            remote = node.apps.get(delta.app_id)
            if remote is not None:
                remote.sessions.discard(delta.session_id)
            if self._session_apps.get(delta.session_id) == delta.app_id:
                del self._session_apps[delta.session_id]
        self._bump()

    def _add_app(self, node: _RemoteNode, app: _RemoteApp) -> None:
        node.apps[app.app_id] = app
        self._app_nodes[app.app_id] = node
        for session_id in app.sessions:
            self._session_apps[session_id] = app.app_id
        if app.user_id is not None:
            counts = self._user_nodes.setdefault(app.user_id, {})
            counts[node.node_id] = counts.get(node.node_id, 0) + 1

    def _unindex(self, app: _RemoteApp) -> None:
        node = self._app_nodes.pop(app.app_id, None)
        if app.user_id is not None and node is not None:
            counts = self._user_nodes.get(app.user_id, {})
            left = counts.get(node.node_id, 0) - 1
            if left > 0:
                counts[node.node_id] = left
            else:
                counts.pop(node.node_id, None)
                if not counts:
                    self._user_nodes.pop(app.user_id, None)
        for session_id in app.sessions:
            if self._session_apps.get(session_id) == app.app_id:
                del self._session_apps[session_id]

    def _forget_apps(self, node: _RemoteNode) -> None:
        for app in node.apps.values():
            if self._app_nodes.get(app.app_id) is node:
                self._unindex(app)
        node.apps = {}

    def _drop_node(self, node: _RemoteNode) -> None:
        if self._nodes.get(node.node_id) is not node:
            return
        del self._nodes[node.node_id]
        self._forget_apps(node)
        self._bump()
        self._fail_waiters(lambda waiter: waiter.node_id == node.node_id, AppDisconnected)
        for wait in self._acks.values():
            wait.forget(node.node_id)
        for message_id, (connection, pending) in list(self._remote_pending.items()):
            if pending.origin == node.node_id:
                del self._remote_pending[message_id]
                if connection.pending.get(message_id) is pending:
                    del connection.pending[message_id]
                pending.discard()

    def _fail_waiters(self, which: Callable[[_Waiter], bool], error: Callable[[str, str], Exception]) -> None:
        for message_id, waiter in list(self._waiters.items()):
            if not waiter.answered and which(waiter):
                waiter.answered = True
                waiter.pending.fail(error(waiter.pending.app_id, message_id))

    # -- deliveries to apps here

    def _on_deliver(self, message: Deliver) -> None:
        connection = self._hub.get(message.app_id)
        if connection is None or not connection.send_soon(message.frame):
            logger.debug("cluster node %s: frame for %s from %s dropped: app not connected here", self._node_id,
                         message.app_id, message.node)

    def _on_request(self, message: Request) -> None:
        def reply(error: str, limit: int = 0) -> None:
            self._enqueue(self._inbox(message.node), Reply(node=self._node_id, message_id=message.message_id,
                                                           error=error, limit=limit))

        connection = self._hub.get(message.app_id)
        if connection is None:
            reply("not_connected")
            return
        if connection.closing:
            reply("disconnected")
            return
        limit = self._local.max_pending_requests
        if len(connection.pending) >= limit:
            reply("pending_limit", limit)
            return
        deadline = time.monotonic() + message.timeout + self.heartbeat_interval
        pending = _RemotePending(self, message.node, message.app_id, message.message_id, deadline)
        connection.pending[message.message_id] = pending
        self._remote_pending[message.message_id] = (connection, pending)
        if not connection.send_soon(message.frame):
            connection.pending.pop(message.message_id, None)
            pending.fail(AppDisconnected(message.app_id, message.message_id))

    def _on_withdraw(self, message: Withdraw) -> None:
        entry = self._remote_pending.get(message.message_id)
        if entry is None or entry[1].origin != message.node:
            return
        connection, pending = entry
        del self._remote_pending[message.message_id]
        if connection.pending.get(message.message_id) is pending:
            del connection.pending[message.message_id]
        pending.discard()

    def _on_reply(self, message: Reply) -> None:
        waiter = self._waiters.get(message.message_id)
        if waiter is None or waiter.node_id != message.node or waiter.answered:
            return
        waiter.answered = True
        app_id = waiter.pending.app_id
        if message.error is None:
            waiter.pending.resolve(message.data or {})
        elif message.error == "not_connected":
            waiter.pending.fail(AppNotConnected(app_id))
        elif message.error == "pending_limit":
            waiter.pending.fail(PendingRequestLimit(app_id, message.limit))
        elif message.error == "too_large":
            waiter.pending.fail(MessageTooLarge(message.size, message.limit, self.backplane.kind))
        else:
            waiter.pending.fail(AppDisconnected(app_id, message.message_id))

    def _on_fanout(self, message: Fanout) -> None:
        if message.scope == "all":
            targets: Collection[Connection] = list(self._hub)
        elif message.scope == "user":
            targets = self._hub.user_connections(message.target)
        else:
            targets = self._hub.group_connections(message.target)
        exclude = set(message.exclude)
        count = 0
        for connection in targets:
            if connection.app_id not in exclude and not connection.closing and connection.send_soon(message.frame):
                count += 1
        self._enqueue(self._inbox(message.node), Ack(node=self._node_id, ack=message.ack, count=count))

    def _on_group_op(self, message: GroupOp) -> None:
        if message.join:
            joined = self._hub.join_group(message.app_id, message.group)
            ack = Ack(node=self._node_id, ack=message.ack, count=1, error=None if joined else "not_connected")
        else:
            ack = Ack(node=self._node_id, ack=message.ack, count=int(self._hub.leave_group(message.app_id,
                                                                                            message.group)))
        self._enqueue(self._inbox(message.node), ack)

    def _on_ack(self, message: Ack) -> None:
        wait = self._acks.get(message.ack)
        if wait is not None:
            wait.got(message.node, -1 if message.error else message.count)

    _handlers: ClassVar[dict[type[Any], Callable[[ClusterRouter, Any], None]]] = {
        Hello: _on_hello,
        Heartbeat: _on_heartbeat,
        Goodbye: _on_goodbye,
        SyncRequest: _on_sync_request,
        Delta: _on_delta,
        Snapshot: _on_snapshot,
        Deliver: _on_deliver,
        Request: _on_request,
        Withdraw: _on_withdraw,
        Reply: _on_reply,
        Fanout: _on_fanout,
        GroupOp: _on_group_op,
        Ack: _on_ack,
    }

    # ------------------------------------------------------------------ MessageRouter: delivery

    def _remote_node(self, app_id: str) -> _RemoteNode:
        """The node serving ``app_id`` (not this one); raises if it cannot be reached."""
        if not self._up:
            raise BackplaneUnavailable(f"app {app_id!r} is not connected to this node and the {self.backplane.kind} "
                                       f"backplane is down")
        node = self._app_nodes.get(app_id)
        if node is None:
            raise AppNotConnected(app_id)
        return node

    async def send_to_app(self, app_id: str, frame: str) -> None:
        """Deliver to the app wherever it is connected (at most once across nodes)."""
        if app_id in self._hub:
            await self._local.send_to_app(app_id, frame)
            return
        node = self._remote_node(app_id)
        await self._publish(node.node_id, Deliver(node=self._node_id, app_id=app_id, frame=frame))

    async def request(self, app_id: str, message_id: str, frame: str, timeout: float) -> dict[str, Any]:
        """See :meth:`~llmgine_ws.routing.MessageRouter.request`; the answer is routed back to this node."""
        if app_id in self._hub:
            return await self._local.request(app_id, message_id, frame, timeout)
        node = self._remote_node(app_id)
        waiter = _Waiter(node.node_id, PendingRequest(app_id, message_id))
        self._waiters[message_id] = waiter
        sent = False
        try:
            await self._publish(node.node_id, Request(node=self._node_id, app_id=app_id, message_id=message_id,
                                                      frame=frame, timeout=timeout))
            sent = True
            with anyio.fail_after(timeout):
                return await waiter.pending.wait()
        finally:
            del self._waiters[message_id]
            if sent and not waiter.answered:  # timed out or cancelled: the other node drops it
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    try:
                        await self._publish(node.node_id, Withdraw(node=self._node_id, app_id=app_id,
                                                                   message_id=message_id))
                    except MessagingError:
                        pass  # that node drops it at its deadline anyway

    def _fanout_nodes(self, scope: str, target: str, exclude: Collection[str]) -> set[str]:
        """The nodes a fan-out must ask: those that may have a recipient.

        Presence tells which nodes have apps (and which users' apps); a node whose presence is not in
        sync yet is always asked. Group membership is not in presence: every node is asked.
        """
        if scope == "group":
            return set(self._nodes)
        if scope == "user":
            with_user = self._user_nodes.get(target, {})
            return {node_id for node_id, node in self._nodes.items() if not node.synced or node_id in with_user}
        return {
            node_id for node_id, node in self._nodes.items()
            if not node.synced or len(node.apps) > len(exclude) or any(app not in exclude for app in node.apps)
        }

    async def _fanout(self, scope: str, target: str, frame: str, exclude: Collection[str], local: int) -> int:
        if not self._up:
            raise BackplaneUnavailable(f"the {self.backplane.kind} backplane is down: reached {local} app(s) on "
                                       f"this node only", reached_locally=local)
        nodes = self._fanout_nodes(scope, target, exclude)
        if not nodes:
            return local
        ack = uuid.uuid4().hex
        wait = self._acks[ack] = _AckWait(set(nodes))
        payload = self._encode(Fanout(node=self._node_id, ack=ack, scope=scope, target=target, frame=frame,
                                      exclude=list(exclude)))
        try:
            for node_id in nodes:
                await self.backplane.publish(self._inbox(node_id), payload)
            with anyio.move_on_after(self.ack_timeout):
                await wait.done.wait()
        except BackplaneUnavailable as exc:
            raise BackplaneUnavailable(exc.detail, reached_locally=local) from None
        finally:
            del self._acks[ack]
        if wait.failed:
            raise BackplaneUnavailable("connection to the broker lost before every node acknowledged",
                                       reached_locally=local)
        if wait.expected:
            logger.warning("cluster node %s: %s fan-out not acknowledged within %.1fs by node(s) %s", self._node_id,
                           scope, self.ack_timeout, ", ".join(sorted(wait.expected)))
        return local + wait.count

    async def broadcast(self, frame: str, exclude_apps: Collection[str]) -> int:
        """Deliver to every app of the cluster but the excluded; returns how many it reached."""
        local = await self._local.broadcast(frame, exclude_apps)
        return await self._fanout("all", "", frame, exclude_apps, local)

    async def send_to_user(self, user_id: str, frame: str) -> int:
        """Deliver to every connection of ``user_id`` in the cluster; returns how many it reached."""
        local = await self._local.send_to_user(user_id, frame)
        return await self._fanout("user", user_id, frame, (), local)

    async def send_to_group(self, group: str, frame: str, exclude_apps: Collection[str]) -> int:
        """Deliver to every member of ``group`` in the cluster but the excluded; returns the count."""
        local = await self._local.send_to_group(group, frame, exclude_apps)
        return await self._fanout("group", group, frame, exclude_apps, local)

    async def _group_op(self, node: _RemoteNode, app_id: str, group: str, join: bool) -> int:
        """Ask ``node`` to (un)register a group membership; its answer: 1 done, 0 not a member, -1 no app."""
        ack = uuid.uuid4().hex
        wait = self._acks[ack] = _AckWait({node.node_id})
        try:
            await self._publish(node.node_id, GroupOp(node=self._node_id, ack=ack, app_id=app_id, group=group,
                                                      join=join))
            with anyio.move_on_after(self.ack_timeout):
                await wait.done.wait()
        finally:
            del self._acks[ack]
        if wait.failed:
            raise BackplaneUnavailable(f"connection to the broker lost during a group operation for {app_id!r}")
        if node.node_id not in self._nodes:
            raise AppNotConnected(app_id)  # the node left (or expired) meanwhile
        if wait.expected:
            raise BackplaneUnavailable(f"node {node.node_id} did not answer a group operation within "
                                       f"{self.ack_timeout:.1f}s")
        return wait.count

    async def join_group(self, app_id: str, group: str) -> None:
        """Add the app (wherever it is connected) to ``group``; raises ``AppNotConnected``."""
        if app_id in self._hub:
            await self._local.join_group(app_id, group)
            return
        if await self._group_op(self._remote_node(app_id), app_id, group, True) < 0:
            raise AppNotConnected(app_id)

    async def leave_group(self, app_id: str, group: str) -> bool:
        """Remove the app (wherever it is connected) from ``group``; False if it was not a member."""
        if app_id in self._hub:
            return await self._local.leave_group(app_id, group)
        try:
            node = self._remote_node(app_id)
        except AppNotConnected:
            return False
        return await self._group_op(node, app_id, group, False) > 0

    # ------------------------------------------------------------------ MessageRouter: presence

    def connected_apps(self) -> list[str]:
        """Every app connected anywhere in the cluster (as this node knows it)."""
        return [*self._local.connected_apps(), *self._app_nodes]

    def is_app_connected(self, app_id: str) -> bool:
        """Whether ``app_id`` is connected anywhere in the cluster."""
        return self._local.is_app_connected(app_id) or app_id in self._app_nodes

    def app_sessions(self, app_id: str) -> list[str]:
        """Session ids owned by ``app_id``, wherever it is connected."""
        if app_id in self._hub:
            return self._local.app_sessions(app_id)
        node = self._app_nodes.get(app_id)
        app = node.apps.get(app_id) if node is not None else None
        return sorted(app.sessions) if app is not None else []

    def session_owner(self, session_id: str) -> str | None:
        """The app owning ``session_id``, wherever it is connected."""
        return self._local.session_owner(session_id) or self._session_apps.get(session_id)

    def node_of(self, app_id: str) -> str | None:
        """The node id serving ``app_id`` (this node's for a local app), or None."""
        if self._local.is_app_connected(app_id):
            return self._node_id
        node = self._app_nodes.get(app_id)
        return node.node_id if node is not None else None

    def presence(self) -> list[AppPresence]:
        """Every app of the cluster with its node (this node's first)."""
        mine = [
            AppPresence(app_id=c.app_id, node_id=self._node_id, node_name=self._node_name,
                        connected_at=c.connected_at, sessions=sorted(c.session_ids), local=True)
            for c in self._hub if not c.closing
        ]
        remote = [
            AppPresence(app_id=app.app_id, node_id=node.node_id, node_name=node.name,
                        connected_at=datetime.fromtimestamp(app.connected_at, UTC), sessions=sorted(app.sessions),
                        local=False)
            for node in self._nodes.values() for app in node.apps.values()
        ]
        return mine + remote

    def nodes(self) -> list[NodePresence]:
        """This node and every node it currently knows of."""
        now = time.monotonic()
        return [
            NodePresence(node_id=self._node_id, node_name=self._node_name, apps=len(self._hub), local=True,
                         last_seen_seconds=0.0),
            *(NodePresence(node_id=node.node_id, node_name=node.name, apps=len(node.apps), local=False,
                           last_seen_seconds=round(now - node.last_seen, 3)) for node in self._nodes.values()),
        ]


def build_router(config: APIConfig, hub: Hub, sessions: SessionStore,
                 backplane: Backplane | None = None) -> MessageRouter:
    """The router an app's configuration asks for: local, or a cluster router over a backplane.

    ``backplane`` (an object) wins over ``config.backplane`` (a URL); ``memory`` with no object means
    no cluster: a :class:`~llmgine_ws.routing.LocalRouter`, zero overhead.
    """
    local = LocalRouter(hub, sessions, max_pending_requests=config.max_pending_requests,
                        node_name=config.node_name or None)
    if backplane is None:
        backplane = backplane_from_url(config.backplane)
    if backplane is None:
        return local
    return ClusterRouter(local, sessions, backplane, cluster_name=config.cluster_name,
                         heartbeat_interval=config.heartbeat_interval, node_name=config.node_name or None)
