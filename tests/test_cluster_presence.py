"""The presence replica on its own: no event loop, no broker, time passed in by the test.

A :class:`Net` carries what each replica wants to send to the others, so a test can lose, reorder
or hold back messages and see exactly what each replica answers.
"""

from __future__ import annotations

from llmgine_ws.backplane.presence import (
    SNAPSHOT_PART_APPS,
    AppLeft,
    NodeJoined,
    NodeLeft,
    Outgoing,
    PresenceReplica,
)
from llmgine_ws.backplane.wire import (
    Deliver,
    Delta,
    Goodbye,
    Heartbeat,
    Hello,
    NodeMessage,
    Snapshot,
    SyncRequest,
    decode,
    encode,
)

HEARTBEAT = 2.0


class Net:
    """Replicas joined by a perfect network that the test drives by hand."""

    def __init__(self, *node_ids: str) -> None:
        self.replicas = {node_id: PresenceReplica(node_id, f"{node_id}:1", HEARTBEAT) for node_id in node_ids}

    def __getitem__(self, node_id: str) -> PresenceReplica:
        return self.replicas[node_id]

    def deliver(self, sender: str, now: float) -> list[Outgoing]:
        """Hand what ``sender`` has to send to its destinations (through the wire codec); returns it."""
        sent = self.replicas[sender].data_to_send()
        for to, message in sent:
            for node_id, replica in self.replicas.items():
                if node_id != sender and to in (None, node_id):
                    replica.receive(decode(encode(message)), now)
        return sent

    def settle(self, now: float) -> None:
        """Deliver until nobody has anything left to say."""
        while any([self.deliver(node_id, now) for node_id in self.replicas]):
            pass

    def start(self, now: float = 0.0) -> None:
        for replica in self.replicas.values():
            replica.backplane_up()
        self.settle(now)
        for replica in self.replicas.values():
            replica.events_received()


def kinds(sent: list[Outgoing]) -> list[tuple[str | None, type[NodeMessage]]]:
    return [(to, type(message)) for to, message in sent]


def test_hello_is_answered_with_a_snapshot_and_a_sync_request() -> None:
    net = Net("a", "b")
    net["a"].app_added("a1", "alice", 100.0)
    net["a"].data_to_send()  # nobody was listening yet
    net["a"].backplane_up()
    assert kinds(net["a"].data_to_send()) == [(None, Hello), (None, Heartbeat)]

    b = net["b"]
    b.receive(Hello(node="a", name="a:1", seq=1), now=0.0)
    assert b.events_received() == [NodeJoined("a", "a:1")]
    # b sends its own snapshot to the newcomer, and asks for the newcomer's (forced: a hello).
    assert kinds(b.data_to_send()) == [("a", Snapshot), ("a", SyncRequest)]
    assert b.node_of("a1") is None
    net["a"].receive(SyncRequest(node="b"), now=0.0)
    [(to, snapshot)] = net["a"].data_to_send()
    assert to == "b" and isinstance(snapshot, Snapshot) and snapshot.seq == 1
    revision = b.revision
    b.receive(snapshot, now=0.0)
    assert b.revision > revision
    assert b.node_of("a1") == "a" and b.app_ids() == ["a1"]
    # A heartbeat that agrees with what b knows costs nothing.
    b.receive(Heartbeat(node="a", name="a:1", seq=1), now=0.5)
    assert b.data_to_send() == []


def test_deltas_keep_replicas_in_step() -> None:
    net = Net("a", "b")
    net.start()
    a, b = net["a"], net["b"]
    a.app_added("a1", "alice", 100.0)
    a.session_added("a1", "s1")
    net.deliver("a", now=1.0)
    assert b.node_of("a1") == "a"
    assert b.app_sessions("a1") == ["s1"] and b.session_owner("s1") == "a1"
    a.session_removed("a1", "s1")
    a.app_removed("a1")
    net.deliver("a", now=1.0)
    assert b.session_owner("s1") is None and b.node_of("a1") is None
    assert b.events_received() == [AppLeft("a", "a1")]
    assert b.data_to_send() == []  # no gap, nothing to ask


def test_a_lost_delta_is_detected_and_repaired_by_a_snapshot() -> None:
    net = Net("a", "b")
    net.start()
    a, b = net["a"], net["b"]
    a.app_added("a1", None, 100.0)
    a.data_to_send()  # lost on the way
    a.app_added("a2", None, 101.0)
    net.deliver("a", now=1.0)
    # b sees seq 2 after seq 0: it keeps the delta and asks a for a snapshot.
    assert b.node_of("a2") is None
    assert kinds(b.data_to_send()) == [("a", SyncRequest)]
    # Meanwhile a third change arrives (buffered too), then the snapshot as of seq 2.
    a.app_added("a3", None, 102.0)
    [(_, third)] = a.data_to_send()
    a.receive(SyncRequest(node="b"), now=1.0)
    [(_, snapshot)] = a.data_to_send()
    b.receive(third, now=1.0)
    b.receive(snapshot, now=1.0)
    assert sorted(b.app_ids()) == ["a1", "a2", "a3"]
    # In step again: the next delta applies directly.
    a.app_removed("a1")
    net.deliver("a", now=1.5)
    assert sorted(b.app_ids()) == ["a2", "a3"]


def test_heartbeat_reveals_a_gap_and_sync_requests_are_rate_limited() -> None:
    net = Net("a", "b")
    net.start()
    b = net["b"]
    # a changed things b never heard of: every heartbeat says so, but b asks once per interval.
    b.receive(Heartbeat(node="a", name="a:1", seq=5), now=10.0)
    assert kinds(b.data_to_send()) == [("a", SyncRequest)]
    b.receive(Heartbeat(node="a", name="a:1", seq=5), now=10.5)
    b.receive(Delta(node="a", seq=6, op="app+", app_id="x"), now=11.0)
    assert b.data_to_send() == []
    b.expire(now=11.9)
    assert b.data_to_send() == []
    # The snapshot never came: asked again once the interval has passed.
    b.expire(now=12.1)
    assert kinds(b.data_to_send()) == [("a", SyncRequest)]
    b.receive(Heartbeat(node="a", name="a:1", seq=6), now=12.2)
    assert b.data_to_send() == []


def test_snapshot_in_parts_applies_only_when_complete() -> None:
    net = Net("a", "b")
    net.start()
    a, b = net["a"], net["b"]
    count = 2 * SNAPSHOT_PART_APPS + 1
    for index in range(count):
        a.app_added(f"app-{index}", "bob" if index % 2 else None, float(index))
    a.data_to_send()  # b missed all of it
    a.receive(SyncRequest(node="b"), now=1.0)
    parts = [message for _, message in a.data_to_send()]
    assert [(p.part, p.parts) for p in parts if isinstance(p, Snapshot)] == [(0, 3), (1, 3), (2, 3)]
    b.receive(Heartbeat(node="a", name="a:1", seq=count), now=1.0)  # b now knows it is behind
    b.data_to_send()
    for part in (parts[2], parts[0]):  # out of order, one still missing
        b.receive(part, now=1.0)
    assert b.app_ids() == []
    b.receive(parts[1], now=1.0)
    assert len(b.app_ids()) == count
    assert b.fanout_nodes("user", "bob", ()) == {"a"} and b.fanout_nodes("user", "carol", ()) == set()


def test_silent_node_expires_after_one_and_a_half_heartbeats() -> None:
    net = Net("a", "b")
    net.start(now=0.0)
    a, b = net["a"], net["b"]
    a.app_added("a1", None, 100.0)
    net.deliver("a", now=1.0)
    # Any message is a sign of life, not only heartbeats.
    b.receive(Deliver(node="a", app_id="b1", frame="x"), now=2.0)
    b.expire(now=2.0 + 1.5 * HEARTBEAT)
    assert b.knows("a") and b.events_received() == []
    b.expire(now=2.0 + 1.5 * HEARTBEAT + 0.01)
    [left] = b.events_received()
    assert isinstance(left, NodeLeft) and (left.node_id, left.apps) == ("a", 1)
    assert left.silent_for is not None and left.silent_for > 1.5 * HEARTBEAT
    assert not b.knows("a") and b.node_of("a1") is None and b.nodes() == []
    # Expired by mistake (a long stall): back with its next heartbeat, and resynchronised.
    b.receive(Heartbeat(node="a", name="a:1", seq=a.seq), now=10.0)
    assert b.events_received() == [NodeJoined("a", "a:1")]
    net.settle(now=10.0)
    assert b.node_of("a1") == "a"


def test_goodbye_removes_a_node_at_once() -> None:
    net = Net("a", "b")
    net.start()
    net["a"].app_added("a1", None, 100.0)
    net.deliver("a", now=1.0)
    net["a"].leave()
    assert kinds(net.deliver("a", now=1.0)) == [(None, Goodbye)]
    assert net["b"].events_received() == [NodeLeft("a", "a:1", 1, None)]
    assert net["b"].node_of("a1") is None


def test_reconnect_announces_again_and_restart_is_a_new_node() -> None:
    net = Net("a", "b")
    net.start()
    a, b = net["a"], net["b"]
    # a loses the backplane: its changes meanwhile are not announced...
    a.backplane_down()
    a.app_added("a1", None, 100.0)
    assert a.data_to_send() == []
    # ...b may learn of the new seq (a heartbeat that raced the outage) and ask in vain...
    b.receive(Heartbeat(node="a", name="a:1", seq=a.seq), now=1.0)
    assert kinds(b.data_to_send()) == [("a", SyncRequest)]  # lost: a is not connected
    # ...and when a is back, its hello makes b ask again at once, within the rate limit's interval.
    a.backplane_up()
    assert kinds(net.deliver("a", now=1.1)) == [(None, Hello), (None, Heartbeat)]
    assert kinds(net.deliver("b", now=1.1)) == [("a", Snapshot), ("a", SyncRequest)]
    net.settle(now=1.1)
    assert b.node_of("a1") == "a"
    # A restarted process is a new node (fresh id); the old one leaves by expiry.
    net.replicas["a2"] = PresenceReplica("a2", "a:1", HEARTBEAT)
    net["a2"].backplane_up()
    net.settle(now=1.2)
    assert {node.node_id for node in b.nodes()} == {"a", "a2"}
    b.receive(Heartbeat(node="a2", name="a:1", seq=0), now=4.0)
    b.expire(now=4.5)
    assert {node.node_id for node in b.nodes()} == {"a2"} and b.node_of("a1") is None


def test_fanout_asks_only_nodes_that_may_have_a_recipient() -> None:
    net = Net("a", "b", "c", "d")
    net.start()
    net["a"].app_added("a1", "alice", 1.0)
    net["b"].app_added("b1", None, 1.0)
    net["b"].app_added("b2", None, 1.0)
    for node_id in "abc":
        net.deliver(node_id, now=1.0)
    d = net["d"]
    assert d.fanout_nodes("all", "", ()) == {"a", "b"}  # c has no apps
    assert d.fanout_nodes("all", "", ["b1", "b2"]) == {"a"}  # every app of b is excluded
    assert d.fanout_nodes("all", "", ["b1"]) == {"a", "b"}
    assert d.fanout_nodes("user", "alice", ()) == {"a"}
    assert d.fanout_nodes("group", "g", ()) == {"a", "b", "c"}  # groups are not in presence
    # A node d is not in sync with is always asked.
    d.receive(Heartbeat(node="c", name="c:1", seq=3), now=1.5)
    assert d.fanout_nodes("all", "", ()) == {"a", "b", "c"}
    assert d.fanout_nodes("user", "alice", ()) == {"a", "c"}


def test_own_messages_are_ignored() -> None:
    replica = PresenceReplica("a", "a:1", HEARTBEAT)
    replica.receive(Hello(node="a", name="a:1", seq=0), now=0.0)
    assert replica.nodes() == [] and replica.data_to_send() == [] and replica.events_received() == []
