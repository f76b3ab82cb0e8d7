"""The presence replica: which apps are connected to which node of the cluster, as this node knows it.

Free of I/O and of any event loop, like the ``websockets`` library's ``protocol.py``: the router
feeds it this node's own changes (:meth:`~PresenceReplica.app_added` …), the messages other nodes
send (:meth:`~PresenceReplica.receive`) and the passing of time (``now``, monotonic seconds), then
takes what to publish (:meth:`~PresenceReplica.data_to_send`) and what happened
(:meth:`~PresenceReplica.events_received`). The protocol is described in ``docs/scaling.md``
("Cluster protocol").
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from .wire import AppEntry, Delta, Goodbye, Heartbeat, Hello, NodeMessage, Snapshot, SyncRequest

EXPIRY_FACTOR = 1.5
"""A node is expired this many heartbeat intervals after its last sign of life."""
SNAPSHOT_PART_APPS = 500
"""Apps per snapshot part (a part must fit in one backplane message)."""
MAX_BUFFERED_DELTAS = 10000
"""Deltas kept per node while waiting for its snapshot; later ones are dropped (the snapshot covers them)."""


class Outgoing(NamedTuple):
    """A message to publish: to every node (``to`` is None: the presence subject) or to one node's inbox."""

    to: str | None
    message: NodeMessage


@dataclass(frozen=True)
class NodeJoined:
    """A node this node did not know of spoke."""

    node_id: str
    name: str


@dataclass(frozen=True)
class NodeLeft:
    """A node said goodbye (``silent_for`` is None) or was expired after ``silent_for`` seconds of silence."""

    node_id: str
    name: str
    apps: int
    silent_for: float | None = None


@dataclass(frozen=True)
class AppLeft:
    """An app of another node disconnected (requests waiting on it will get no answer)."""

    node_id: str
    app_id: str


PresenceEvent = NodeJoined | NodeLeft | AppLeft


class AppRecord:
    """One connected app: who it is, since when (seconds since the epoch), and its sessions."""

    __slots__ = ("app_id", "connected_at", "sessions", "user_id")

    def __init__(self, app_id: str, user_id: str | None, connected_at: float, sessions: Iterable[str] = ()) -> None:
        self.app_id = app_id
        self.user_id = user_id
        self.connected_at = connected_at
        self.sessions = set(sessions)


class NodeRecord:
    """Another node of the cluster: its apps as of its presence change ``seq``, and how in sync we are."""

    __slots__ = ("apps", "buffered", "last_seen", "name", "node_id", "parts", "parts_seq", "seq",
                 "sync_requested_at", "synced")

    def __init__(self, node_id: str, name: str, now: float) -> None:
        self.node_id = node_id
        self.name = name
        self.seq = 0
        self.last_seen = now
        self.apps: dict[str, AppRecord] = {}
        self.synced = False
        """Whether ``apps`` is that node's snapshot plus every delta since, with no gap."""
        self.buffered: list[Delta] = []
        self.sync_requested_at: float | None = None
        self.parts: dict[int, list[AppEntry]] = {}
        self.parts_seq: int | None = None


class PresenceReplica:
    """This node's presence (announced to the others) and its replica of everyone else's."""

    def __init__(self, node_id: str, node_name: str, heartbeat_interval: float) -> None:
        self.node_id = node_id
        self.node_name = node_name
        self.heartbeat_interval = heartbeat_interval
        self.expiry = EXPIRY_FACTOR * heartbeat_interval
        self.connected = False
        """Whether the backplane is up: changes made while it is down are announced by the next snapshot."""
        self.seq = 0
        """The number of this node's latest presence change."""
        self.revision = 0
        """Moves whenever the replica's view of the cluster (this node's apps included) changes."""
        self._local: dict[str, AppRecord] = {}
        self._nodes: dict[str, NodeRecord] = {}
        self._app_nodes: dict[str, NodeRecord] = {}
        self._session_apps: dict[str, str] = {}
        self._user_nodes: dict[str, dict[str, int]] = {}
        """user_id → {node_id: apps of that user there}: a fan-out to a user only asks those nodes."""
        self._outgoing: list[Outgoing] = []
        self._events: list[PresenceEvent] = []

    # ------------------------------------------------------------------ outputs

    @property
    def has_output(self) -> bool:
        """Whether :meth:`data_to_send` or :meth:`events_received` has something."""
        return bool(self._outgoing or self._events)

    def data_to_send(self) -> list[Outgoing]:
        """The messages to publish since the last call, in order."""
        outgoing, self._outgoing = self._outgoing, []
        return outgoing

    def events_received(self) -> list[PresenceEvent]:
        """Nodes that joined or left and apps that left since the last call, in order."""
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------ this node

    def backplane_up(self) -> None:
        """The backplane (re)connected: say hello (everyone answers with a snapshot) and a heartbeat."""
        self.connected = True
        self._announce(Hello(node=self.node_id, name=self.node_name, seq=self.seq))
        self._announce(Heartbeat(node=self.node_id, name=self.node_name, seq=self.seq))

    def backplane_down(self) -> None:
        """The backplane is gone: stop announcing until it is back."""
        self.connected = False

    def heartbeat(self) -> None:
        """Time for a heartbeat (every ``heartbeat_interval``)."""
        if self.connected:
            self._announce(Heartbeat(node=self.node_id, name=self.node_name, seq=self.seq))

    def leave(self) -> None:
        """This node is shutting down cleanly: say goodbye."""
        if self.connected:
            self._announce(Goodbye(node=self.node_id))

    def app_added(self, app_id: str, user_id: str | None, connected_at: float) -> None:
        """An app connected to this node (``connected_at`` in seconds since the epoch)."""
        self._local[app_id] = AppRecord(app_id, user_id, connected_at)
        self._delta("app+", app_id, user_id=user_id, connected_at=connected_at)

    def app_removed(self, app_id: str) -> None:
        """An app of this node disconnected."""
        self._local.pop(app_id, None)
        self._delta("app-", app_id)

    def session_added(self, app_id: str, session_id: str) -> None:
        """A session was created for an app of this node."""
        app = self._local.get(app_id)
        if app is not None:
            app.sessions.add(session_id)
        self._delta("session+", app_id, session_id=session_id)

    def session_removed(self, app_id: str, session_id: str) -> None:
        """A session of an app of this node was removed."""
        app = self._local.get(app_id)
        if app is not None:
            app.sessions.discard(session_id)
        self._delta("session-", app_id, session_id=session_id)

    def _delta(self, op: str, app_id: str, *, session_id: str = "", user_id: str | None = None,
               connected_at: float = 0.0) -> None:
        self.seq += 1
        self.revision += 1
        if self.connected:
            self._announce(Delta(node=self.node_id, seq=self.seq, op=op, app_id=app_id, session_id=session_id,
                                 user_id=user_id, connected_at=connected_at))

    def _announce(self, message: NodeMessage) -> None:
        self._outgoing.append(Outgoing(None, message))

    def _send_snapshot(self, to: str) -> None:
        entries = [AppEntry(app.app_id, app.user_id, app.connected_at, sorted(app.sessions))
                   for app in self._local.values()]
        chunks = [entries[i:i + SNAPSHOT_PART_APPS] for i in range(0, len(entries), SNAPSHOT_PART_APPS)] or [[]]
        for index, chunk in enumerate(chunks):
            self._outgoing.append(Outgoing(to, Snapshot(node=self.node_id, name=self.node_name, seq=self.seq,
                                                        part=index, parts=len(chunks), apps=chunk)))

    # ------------------------------------------------------------------ other nodes

    def receive(self, message: NodeMessage, now: float) -> None:
        """A message from another node arrived: any message is a sign of life; presence ones are applied."""
        if message.node == self.node_id:
            return
        node = self._nodes.get(message.node)
        if node is not None:
            node.last_seen = now
        receiver = self._receivers.get(type(message))  # a dict, not isinstance(): this runs for every message
        if receiver is not None:
            receiver(self, message, now)

    def _on_hello(self, message: Hello, now: float) -> None:
        node = self._seen(message.node, message.name, now)
        self._send_snapshot(message.node)
        if not node.synced or node.seq != message.seq:
            self._request_sync(node, now, force=True)

    def _on_heartbeat(self, message: Heartbeat, now: float) -> None:
        node = self._seen(message.node, message.name, now)
        if not node.synced or node.seq != message.seq:
            self._request_sync(node, now)

    def _on_goodbye(self, message: Goodbye, now: float) -> None:
        node = self._nodes.get(message.node)
        if node is not None:
            self._drop(node, silent_for=None)

    def _on_sync_request(self, message: SyncRequest, now: float) -> None:
        self._send_snapshot(message.node)

    def expire(self, now: float) -> None:
        """Expire nodes silent for longer than ``expiry``; ask again for snapshots that did not come."""
        for node in list(self._nodes.values()):
            if now - node.last_seen > self.expiry:
                self._drop(node, silent_for=now - node.last_seen)
            elif not node.synced and node.sync_requested_at is not None \
                    and now - node.sync_requested_at > self.heartbeat_interval:
                self._request_sync(node, now)

    def _seen(self, node_id: str, name: str, now: float) -> NodeRecord:
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = NodeRecord(node_id, name, now)
            self._events.append(NodeJoined(node_id, name))
            self.revision += 1
        node.last_seen = now
        node.name = name or node.name
        return node

    def _request_sync(self, node: NodeRecord, now: float, *, force: bool = False) -> None:
        """Ask ``node`` for its snapshot: at most once a heartbeat interval unless ``force`` (it restarted)."""
        node.synced = False
        if not force and node.sync_requested_at is not None \
                and now - node.sync_requested_at < self.heartbeat_interval:
            return
        node.sync_requested_at = now
        self._outgoing.append(Outgoing(node.node_id, SyncRequest(node=self.node_id)))

    def _on_delta(self, delta: Delta, now: float) -> None:
        node = self._seen(delta.node, "", now)
        if node.synced:
            if delta.seq <= node.seq:
                return
            if delta.seq == node.seq + 1:
                self._apply(node, delta)
                return
        if len(node.buffered) < MAX_BUFFERED_DELTAS:
            node.buffered.append(delta)
        self._request_sync(node, now)

    def _on_snapshot(self, part: Snapshot, now: float) -> None:
        node = self._seen(part.node, part.name, now)
        if node.synced and part.seq <= node.seq:
            return
        if node.parts_seq != part.seq:
            node.parts_seq, node.parts = part.seq, {}
        node.parts[part.part] = part.apps
        if len(node.parts) < part.parts:
            return
        entries = [entry for index in sorted(node.parts) for entry in node.parts[index]]
        node.parts, node.parts_seq = {}, None
        self._forget_apps(node)
        for entry in entries:
            self._add_app(node, AppRecord(entry.app_id, entry.user_id, entry.connected_at, entry.sessions))
        node.seq = part.seq
        node.synced = True
        node.sync_requested_at = None
        buffered, node.buffered = sorted(node.buffered, key=lambda delta: delta.seq), []
        for delta in buffered:
            if delta.seq <= node.seq:
                continue
            if delta.seq != node.seq + 1:
                self._request_sync(node, now, force=True)
                break
            self._apply(node, delta)
        self.revision += 1

    def _apply(self, node: NodeRecord, delta: Delta) -> None:
        node.seq = delta.seq
        if delta.op == "app+":
            self._add_app(node, AppRecord(delta.app_id, delta.user_id, delta.connected_at))
        elif delta.op == "app-":
            app = node.apps.pop(delta.app_id, None)
            if app is not None:
                self._unindex(app)
            self._events.append(AppLeft(node.node_id, delta.app_id))
        elif delta.op == "session+":
            app = node.apps.get(delta.app_id)
            if app is not None:
                app.sessions.add(delta.session_id)
                self._session_apps[delta.session_id] = delta.app_id
        elif delta.op == "session-":
            app = node.apps.get(delta.app_id)
            if app is not None:
                app.sessions.discard(delta.session_id)
            if self._session_apps.get(delta.session_id) == delta.app_id:
                del self._session_apps[delta.session_id]
        self.revision += 1

    def _add_app(self, node: NodeRecord, app: AppRecord) -> None:
        node.apps[app.app_id] = app
        self._app_nodes[app.app_id] = node
        for session_id in app.sessions:
            self._session_apps[session_id] = app.app_id
        if app.user_id is not None:
            counts = self._user_nodes.setdefault(app.user_id, {})
            counts[node.node_id] = counts.get(node.node_id, 0) + 1

    def _unindex(self, app: AppRecord) -> None:
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

    def _forget_apps(self, node: NodeRecord) -> None:
        for app in node.apps.values():
            if self._app_nodes.get(app.app_id) is node:
                self._unindex(app)
        node.apps = {}

    def _drop(self, node: NodeRecord, *, silent_for: float | None) -> None:
        del self._nodes[node.node_id]
        apps = len(node.apps)
        self._forget_apps(node)
        self._events.append(NodeLeft(node.node_id, node.name, apps, silent_for))
        self.revision += 1

    _receivers: ClassVar[dict[type[Any], Callable[[PresenceReplica, Any, float], None]]] = {
        Hello: _on_hello,
        Heartbeat: _on_heartbeat,
        Goodbye: _on_goodbye,
        SyncRequest: _on_sync_request,
        Delta: _on_delta,
        Snapshot: _on_snapshot,
    }

    # ------------------------------------------------------------------ queries

    def nodes(self) -> list[NodeRecord]:
        """The other nodes this node knows of (treat the records as read-only)."""
        return list(self._nodes.values())

    def knows(self, node_id: str) -> bool:
        """Whether ``node_id`` is a live node of the cluster (not this one)."""
        return node_id in self._nodes

    def app_ids(self) -> list[str]:
        """Every app connected to another node."""
        return list(self._app_nodes)

    def node_of(self, app_id: str) -> str | None:
        """The node serving ``app_id`` if it is another node."""
        node = self._app_nodes.get(app_id)
        return node.node_id if node is not None else None

    def app_sessions(self, app_id: str) -> list[str]:
        """The sessions of ``app_id`` if it is connected to another node."""
        node = self._app_nodes.get(app_id)
        app = node.apps.get(app_id) if node is not None else None
        return sorted(app.sessions) if app is not None else []

    def session_owner(self, session_id: str) -> str | None:
        """The app owning ``session_id`` if it is connected to another node."""
        return self._session_apps.get(session_id)

    def fanout_nodes(self, scope: str, target: str, exclude: Collection[str]) -> set[str]:
        """The nodes a fan-out to ``scope`` (``all``, ``user`` or ``group``) must ask: those that may have a recipient.

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


__all__ = ["AppLeft", "AppRecord", "NodeJoined", "NodeLeft", "NodeRecord", "Outgoing", "PresenceEvent",
           "PresenceReplica"]
