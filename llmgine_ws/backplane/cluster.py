"""The cluster router: the :class:`~llmgine_ws.routing.MessageRouter` of a node that shares a backplane.

Apps connected to this node are served by the node's :class:`~llmgine_ws.routing.LocalRouter`
exactly as without a cluster; everything else crosses the backplane. This module only does the
I/O and the wiring: the messages are in :mod:`~llmgine_ws.backplane.wire`, the presence state
machine in :mod:`~llmgine_ws.backplane.presence`, the requests in flight in
:mod:`~llmgine_ws.backplane.requests`, what other nodes ask of this one in
:mod:`~llmgine_ws.backplane.inbox`. The protocol (subjects, presence, requests, fan-out,
ordering, broker outage) is described in ``docs/scaling.md`` ("Cluster protocol").
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.abc
import msgspec

from ..config import APIConfig, check_cluster_name, check_heartbeat_interval
from ..connection import Connection
from ..dispatch import Dispatcher
from ..errors import AppNotConnected, BackplaneUnavailable, MessagingError
from ..hub import Hub
from ..protocol import FrameEncoder
from ..resumption import Resumer
from ..routing import AppPresence, LocalRouter, MessageRouter, NodePresence, default_node_name, local_presence
from ..sessions import Session, SessionStore
from . import Backplane, backplane_from_url
from .inbox import Inbox
from .presence import AppLeft, NodeJoined, PresenceEvent, PresenceReplica
from .publisher import Publisher
from .remote import RemoteResume
from .requests import ForwardedRequest, RemoteRequests
from .wire import Deliver, Fanout, GroupOp, Hello, NodeMessage, Reply, Request, Withdraw, decode, encode

logger = logging.getLogger("llmgine_ws.cluster")

SWEEPS_PER_INTERVAL = 4
"""How often a heartbeat interval silent nodes and overdue requests are looked for."""
RESUME_ASK_INTERVALS = 1.75
"""Heartbeat intervals a resume waits for the owning node's answer (plus a sweep: under two)."""
LINK_PROBE_INTERVALS = 2.0
"""Heartbeat intervals (at least 1 s) after which an idle remote link is probed."""


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
        check_cluster_name(cluster_name)
        check_heartbeat_interval(heartbeat_interval)
        self._local = local
        self._hub: Hub = local.hub
        self.backplane = backplane
        self._node_id = uuid.uuid4().hex
        self._node_name = node_name or default_node_name()
        self.cluster_name = cluster_name
        self.heartbeat_interval = heartbeat_interval
        self.ack_timeout = 2 * heartbeat_interval
        self._presence_subject = f"{cluster_name}.presence"
        self._inbox_prefix = f"{cluster_name}.node."
        self._presence = PresenceReplica(self._node_id, self._node_name, heartbeat_interval)
        self._revision = 0
        self._requests = RemoteRequests(self._node_id, backplane.kind, self._answer)
        self._publisher = Publisher(backplane, self._node_id)
        self._inbox = Inbox(self._node_id, local, self._requests, self._enqueue, grace=heartbeat_interval)
        self._remote: RemoteResume | None = None
        self._up = False
        self._echoed = False
        self._down_since = time.monotonic()
        self._running = False
        self._was_up = False
        self._changed = anyio.Event()
        self._hub.listeners.append(self)
        sessions.listeners.append(self)

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
    def expiry(self) -> float:
        """Seconds of silence after which another node is expired (1.5 heartbeat intervals)."""
        return self._presence.expiry

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

    def bind_resume(self, resumer: Resumer, dispatcher: Dispatcher, *, ping_interval: float = 0.0,
                    missed_pongs: int = 2, encoder: FrameEncoder | None = None) -> RemoteResume:
        """Let apps of this node resume on other nodes and theirs here (docs/scaling.md, "Resume across
        nodes"); called once by ``create_app``."""
        remote = self._remote = RemoteResume(
            self._node_id, hub=self._hub, resumer=resumer, dispatcher=dispatcher, publish=self._publish,
            enqueue=self._enqueue, owner_of=self._presence.node_of, max_payload=lambda: self.backplane.max_payload,
            timeout=RESUME_ASK_INTERVALS * self.heartbeat_interval,
            probe_interval=max(LINK_PROBE_INTERVALS * self.heartbeat_interval, 1.0), ping_interval=ping_interval,
            missed_pongs=missed_pongs, encoder=encoder)
        resumer.remote = remote
        return remote

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, announce, heartbeat and expire nodes until cancelled; then say goodbye.

        Returns ``started`` at once: the backplane connects in the background, and the node serves
        its local connections meanwhile (not ready until connected).
        """
        subjects = [self._presence_subject, self._inbox_subject(self._node_id)]
        transport, publisher = anyio.CancelScope(shield=True), anyio.CancelScope(shield=True)
        async with anyio.create_task_group() as tg:
            # The transport and its publisher are shielded from the lifespan's cancellation, so that
            # the presence changes of the shutdown and the goodbye still go out; they stop below.
            await tg.start(self._shielded, transport, self._run_backplane, subjects)
            await tg.start(self._shielded, publisher, self._publisher.run)
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
                        self._requests.shutting_down()

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
        await self._publisher.flush()
        self._presence.leave()
        for to, message in self._presence.data_to_send():
            try:
                await self.backplane.publish(self._subject(to), encode(message))
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
            self._presence.backplane_up()
            self._pump()
            return
        self._down_since = time.monotonic()
        self._presence.backplane_down()
        if self._running:
            logger.error("cluster node %s: backplane %s lost; serving local connections only until it is back",
                         self._node_id, self.backplane.describe())
        self._requests.broker_lost()

    async def _heartbeat(self) -> None:
        while True:
            self._presence.heartbeat()
            self._pump()
            await anyio.sleep(self.heartbeat_interval)

    async def _sweep(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_interval / SWEEPS_PER_INTERVAL)
            self.sweep()

    def sweep(self) -> None:
        """Expire silent nodes and overdue requests from other nodes (runs four times an interval)."""
        now = time.monotonic()
        self._presence.expire(now)
        self._requests.overdue(now)
        if self._remote is not None:
            self._remote.sweep(now)
        self._pump()

    # ------------------------------------------------------------------ presence: in and out

    def _pump(self) -> None:
        """Publish what the presence replica has to say, and act on what happened to it."""
        if self._presence.has_output:  # (most messages are not about presence: keep their path short)
            for to, message in self._presence.data_to_send():
                self._publisher.enqueue(self._subject(to), encode(message))
            for event in self._presence.events_received():
                self._on_presence_event(event)
        if self._presence.revision != self._revision:
            self._revision = self._presence.revision
            self._bump()

    def _on_presence_event(self, event: PresenceEvent) -> None:
        if isinstance(event, AppLeft):
            self._requests.app_gone(event.app_id)
        elif isinstance(event, NodeJoined):
            logger.info("cluster node %s: node %s (%s) joined", self._node_id, event.node_id, event.name)
        elif event.silent_for is None:
            logger.info("cluster node %s: node %s (%s) left", self._node_id, event.node_id, event.name)
            self._node_gone(event.node_id)
        else:
            logger.warning("cluster node %s: node %s (%s) expired: no heartbeat for %.1fs; its %d app(s) are gone",
                           self._node_id, event.node_id, event.name, event.silent_for, event.apps)
            self._node_gone(event.node_id)

    def _node_gone(self, node_id: str) -> None:
        self._requests.node_gone(node_id)
        if self._remote is not None:
            self._remote.node_gone(node_id)

    def app_added(self, connection: Connection) -> None:
        """Hub listener: announce the app."""
        self._presence.app_added(connection.app_id, connection.user_id, connection.connected_at.timestamp())
        self._pump()

    def app_removed(self, connection: Connection) -> None:
        """Hub listener: announce that the app is gone."""
        self._presence.app_removed(connection.app_id)
        self._pump()

    def session_added(self, session: Session) -> None:
        """Session listener: announce the session."""
        self._presence.session_added(session.app_id, session.session_id)
        self._pump()

    def session_removed(self, session: Session) -> None:
        """Session listener: announce that the session is gone."""
        self._presence.session_removed(session.app_id, session.session_id)
        self._pump()

    # ------------------------------------------------------------------ outgoing

    def _inbox_subject(self, node_id: str) -> str:
        return self._inbox_prefix + node_id

    def _subject(self, to: str | None) -> str:
        return self._presence_subject if to is None else self._inbox_subject(to)

    def _enqueue(self, node_id: str, message: NodeMessage) -> None:
        """Publish to ``node_id`` from code that cannot wait, in order, from the publisher task."""
        self._publisher.enqueue(self._inbox_subject(node_id), encode(message))

    async def _publish(self, node_id: str, message: NodeMessage) -> None:
        await self.backplane.publish(self._inbox_subject(node_id), encode(message))

    def _answer(self, request: ForwardedRequest, reply: Reply) -> None:
        """Send the outcome of a request held here to the node waiting for it."""
        payload = encode(reply)
        limit = self.backplane.max_payload
        if limit and len(payload) > limit:  # (0 while disconnected: then the publish fails anyway)
            logger.error("cluster node %s: the answer of %s to request %s is %d bytes, over the %s backplane's "
                         "limit of %d; the waiter gets MessageTooLarge", self._node_id, request.app_id,
                         request.message_id, len(payload), self.backplane.kind, limit)
            payload = encode(Reply(node=self._node_id, message_id=request.message_id, error="too_large",
                                   limit=limit, size=len(payload)))
        self._publisher.enqueue(self._inbox_subject(request.origin), payload)

    # ------------------------------------------------------------------ incoming

    def _on_message(self, subject: str, payload: bytes) -> None:
        try:
            message = decode(payload)
        except msgspec.DecodeError as exc:
            logger.error("cluster node %s: undecodable message on %s dropped: %s", self._node_id, subject, exc)
            return
        if message.node == self._node_id:
            if isinstance(message, Hello) and not self._echoed:
                self._echoed = True
                self._bump()
            return
        try:
            self._presence.receive(message, time.monotonic())
            if self._remote is None or not self._remote.handle(message):
                self._inbox.handle(message)
        except Exception:
            logger.exception("cluster node %s: handling %s from %s failed", self._node_id, type(message).__name__,
                             message.node)
        self._pump()

    # ------------------------------------------------------------------ MessageRouter: delivery

    def _remote_node(self, app_id: str) -> str:
        """The node serving ``app_id`` (not this one); raises if it cannot be reached."""
        if not self._up:
            raise BackplaneUnavailable(f"app {app_id!r} is not connected to this node and the {self.backplane.kind} "
                                       f"backplane is down")
        node_id = self._presence.node_of(app_id)
        if node_id is None:
            raise AppNotConnected(app_id)
        return node_id

    async def send_to_app(self, app_id: str, frame: str) -> None:
        """Deliver to the app wherever it is connected (at most once across nodes)."""
        if app_id in self._hub:
            await self._local.send_to_app(app_id, frame)
            return
        await self._publish(self._remote_node(app_id), Deliver(node=self._node_id, app_id=app_id, frame=frame))

    async def request(self, app_id: str, message_id: str, frame: str, timeout: float) -> dict[str, Any]:
        """See :meth:`~llmgine_ws.routing.MessageRouter.request`; the answer is routed back to this node."""
        if app_id in self._hub:
            return await self._local.request(app_id, message_id, frame, timeout)
        node_id = self._remote_node(app_id)
        sent = self._requests.expect(node_id, app_id, message_id)
        published = False
        try:
            await self._publish(node_id, Request(node=self._node_id, app_id=app_id, message_id=message_id,
                                                 frame=frame, timeout=timeout))
            published = True
            return await sent.pending.wait(timeout)
        finally:
            self._requests.done(sent)
            if published and not sent.settled:  # timed out or cancelled: the other node drops it
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    try:
                        await self._publish(node_id, Withdraw(node=self._node_id, app_id=app_id,
                                                              message_id=message_id))
                    except MessagingError:
                        pass  # that node drops it at its deadline anyway

    async def _fanout(self, scope: str, target: str, frame: str, exclude: Collection[str], local: int) -> int:
        if not self._up:
            raise BackplaneUnavailable(f"the {self.backplane.kind} backplane is down: reached {local} app(s) on "
                                       f"this node only", reached_locally=local)
        nodes = self._presence.fanout_nodes(scope, target, exclude)
        if not nodes:
            return local
        ack, wait = self._requests.expect_acks(nodes)
        payload = encode(Fanout(node=self._node_id, ack=ack, scope=scope, target=target, frame=frame,
                                exclude=list(exclude)))
        try:
            for node_id in nodes:
                await self.backplane.publish(self._inbox_subject(node_id), payload)
            with anyio.move_on_after(self.ack_timeout):
                await wait.done.wait()
        except BackplaneUnavailable as exc:
            raise BackplaneUnavailable(exc.detail, reached_locally=local) from None
        finally:
            self._requests.acks_done(ack)
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

    async def _group_op(self, node_id: str, app_id: str, group: str, join: bool) -> int:
        """Ask ``node_id`` to (un)register a group membership; its answer: 1 done, 0 not a member, -1 no app."""
        ack, wait = self._requests.expect_acks({node_id})
        try:
            await self._publish(node_id, GroupOp(node=self._node_id, ack=ack, app_id=app_id, group=group, join=join))
            with anyio.move_on_after(self.ack_timeout):
                await wait.done.wait()
        finally:
            self._requests.acks_done(ack)
        if wait.failed:
            raise BackplaneUnavailable(f"connection to the broker lost during a group operation for {app_id!r}")
        if not self._presence.knows(node_id):
            raise AppNotConnected(app_id)  # the node left (or expired) meanwhile
        if wait.expected:
            raise BackplaneUnavailable(f"node {node_id} did not answer a group operation within "
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
            node_id = self._remote_node(app_id)
        except AppNotConnected:
            return False
        return await self._group_op(node_id, app_id, group, False) > 0

    # ------------------------------------------------------------------ MessageRouter: presence

    def connected_apps(self) -> list[str]:
        """Every app connected anywhere in the cluster (as this node knows it)."""
        return [*self._local.connected_apps(), *self._presence.app_ids()]

    def is_app_connected(self, app_id: str) -> bool:
        """Whether ``app_id`` is connected anywhere in the cluster."""
        return self._local.is_app_connected(app_id) or self._presence.node_of(app_id) is not None

    def app_sessions(self, app_id: str) -> list[str]:
        """Session ids owned by ``app_id``, wherever it is connected."""
        if app_id in self._hub:
            return self._local.app_sessions(app_id)
        return self._presence.app_sessions(app_id)

    def session_owner(self, session_id: str) -> str | None:
        """The app owning ``session_id``, wherever it is connected."""
        return self._local.session_owner(session_id) or self._presence.session_owner(session_id)

    def node_of(self, app_id: str) -> str | None:
        """The node id serving ``app_id`` (this node's for a local app), or None."""
        if self._local.is_app_connected(app_id):
            return self._node_id
        return self._presence.node_of(app_id)

    def presence(self) -> list[AppPresence]:
        """Every app of the cluster with its node (this node's first)."""
        remote = [
            AppPresence(app_id=app.app_id, node_id=node.node_id, node_name=node.name,
                        connected_at=datetime.fromtimestamp(app.connected_at, UTC), sessions=sorted(app.sessions),
                        local=False)
            for node in self._presence.nodes() for app in node.apps.values()
        ]
        return local_presence(self._hub, self._node_id, self._node_name) + remote

    def nodes(self) -> list[NodePresence]:
        """This node and every node it currently knows of."""
        now = time.monotonic()
        return [
            NodePresence(node_id=self._node_id, node_name=self._node_name, apps=len(self._hub), local=True,
                         last_seen_seconds=0.0),
            *(NodePresence(node_id=node.node_id, node_name=node.name, apps=len(node.apps), local=False,
                           last_seen_seconds=round(now - node.last_seen, 3)) for node in self._presence.nodes()),
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


__all__ = ["ClusterRouter", "build_router"]
