"""The cluster router and the in-memory backplane as units, under asyncio and trio alike.

No uvicorn here: two nodes are a Hub + SessionStore + ClusterRouter each, joined by one
MemoryBroker, with fake connections whose outbound queues the test reads directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest

from llmgine_ws import APIConfig, AppDisconnected, AppNotConnected, ConfigError
from llmgine_ws.auth import Principal
from llmgine_ws.backplane import backplane_from_url, backplane_kind, redact
from llmgine_ws.backplane.cluster import ClusterRouter, build_router
from llmgine_ws.backplane.memory import MemoryBackplane, MemoryBroker
from llmgine_ws.backplane.requests import ForwardedRequest, RemoteRequests
from llmgine_ws.backplane.wire import Reply, Request
from llmgine_ws.connection import Connection
from llmgine_ws.errors import BackplaneUnavailable, MessageTooLarge, ServerShuttingDown
from llmgine_ws.hub import Hub
from llmgine_ws.routing import LocalRouter
from llmgine_ws.sessions import SessionStore

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Node:
    def __init__(self, broker: MemoryBroker) -> None:
        self.hub = Hub()
        self.sessions = SessionStore(max_sessions=10)
        local = LocalRouter(self.hub, self.sessions, max_pending_requests=4)
        self.router = ClusterRouter(local, self.sessions, MemoryBackplane(broker), cluster_name="unit",
                                    heartbeat_interval=0.2)

    def connect(self, tg: anyio.abc.TaskGroup, app_id: str, user: str | None = None) -> Connection:
        connection = Connection(app_id, queue_size=16, send_grace=0.5,
                                principal=Principal(user_id=user) if user else None)
        connection.attach(tg)
        self.hub.add(connection)
        return connection

    def disconnect(self, connection: Connection) -> None:
        connection.closing = True
        connection.fail_pending(AppDisconnected)
        self.hub.remove(connection)


@asynccontextmanager
async def two_nodes() -> AsyncIterator[tuple[Node, Node, anyio.abc.TaskGroup]]:
    broker = MemoryBroker()
    a, b = Node(broker), Node(broker)
    async with anyio.create_task_group() as tg:
        await tg.start(a.router.run)
        await tg.start(b.router.run)
        for node in (a, b):
            await node.router.wait_for(lambda node=node: node.router.ready and len(node.router.nodes()) == 2, 5)
        yield a, b, tg
        tg.cancel_scope.cancel()


async def next_frame(connection: Connection) -> str:
    with anyio.fail_after(5):
        item = await connection.outbox.get()
    assert isinstance(item, str)
    return item


async def test_unicast_request_and_presence_across_nodes() -> None:
    async with two_nodes() as (a, b, tg):
        conn = a.connect(tg, "app-1")
        await b.router.wait_for(lambda: b.router.is_app_connected("app-1"), 5)
        assert b.router.node_of("app-1") == a.router.node_id
        session = a.sessions.create("app-1")
        conn.session_ids.add(session.session_id)
        await b.router.wait_for(lambda: b.router.session_owner(session.session_id) == "app-1", 5)
        assert b.router.app_sessions("app-1") == [session.session_id]

        await b.router.send_to_app("app-1", "frame-1")
        assert await next_frame(conn) == "frame-1"

        result: dict[str, Any] = {}
        answered = anyio.Event()

        async def ask() -> None:
            result["answer"] = await b.router.request("app-1", "m-1", "question", timeout=5)
            answered.set()

        tg.start_soon(ask)
        assert await next_frame(conn) == "question"
        conn.pending.pop("m-1").resolve({"ok": True})  # what the server_response handler does
        with anyio.fail_after(5):
            await answered.wait()
        assert result["answer"] == {"ok": True}

        a.disconnect(conn)
        await b.router.wait_for(lambda: not b.router.is_app_connected("app-1"), 5)
        with pytest.raises(AppNotConnected):
            await b.router.send_to_app("app-1", "late")


async def test_disconnect_fails_remote_waiter_and_limit_applies() -> None:
    async with two_nodes() as (a, b, tg):
        conn = a.connect(tg, "app-1")
        await b.router.wait_for(lambda: b.router.is_app_connected("app-1"), 5)
        failed = anyio.Event()

        async def ask() -> None:
            with pytest.raises(AppDisconnected):
                await b.router.request("app-1", "m-1", "question", timeout=30)
            failed.set()

        tg.start_soon(ask)
        assert await next_frame(conn) == "question"
        a.disconnect(conn)
        with anyio.fail_after(1):
            await failed.wait()


async def test_fanout_counts_and_groups() -> None:
    async with two_nodes() as (a, b, tg):
        a1, a2 = a.connect(tg, "a1", user="alice"), a.connect(tg, "a2")
        b1 = b.connect(tg, "b1", user="alice")
        for app_id in ("a1", "a2"):
            await b.router.wait_for(lambda app_id=app_id: b.router.is_app_connected(app_id), 5)
        assert await b.router.broadcast("all", exclude_apps={"a2"}) == 2
        assert (await next_frame(a1), await next_frame(b1)) == ("all", "all")
        assert await b.router.send_to_user("alice", "hi alice") == 2
        assert (await next_frame(a1), await next_frame(b1)) == ("hi alice", "hi alice")
        await b.router.join_group("a2", "g")
        await a.router.join_group("b1", "g")
        assert await a.router.send_to_group("g", "to g", exclude_apps=()) == 2
        assert (await next_frame(a2), await next_frame(b1)) == ("to g", "to g")
        assert await b.router.leave_group("a2", "g") is True
        assert await b.router.send_to_group("g", "to g again", exclude_apps=()) == 1
        assert await next_frame(b1) == "to g again"
        with pytest.raises(AppNotConnected):
            await b.router.join_group("nobody", "g")


async def test_outage_fails_loudly_and_recovers() -> None:
    broker = MemoryBroker()
    a, b = Node(broker), Node(broker)
    async with anyio.create_task_group() as tg:
        await tg.start(a.router.run)
        await tg.start(b.router.run)
        a.connect(tg, "a1")
        await b.router.wait_for(lambda: b.router.is_app_connected("a1"), 5)
        broker.set_available(False)
        await b.router.wait_for(lambda: not b.router.ready, 5)
        assert b.router.health_problems()
        with pytest.raises(BackplaneUnavailable):
            await b.router.send_to_app("a1", "lost")
        with pytest.raises(BackplaneUnavailable) as partial:
            await b.router.broadcast("lost", exclude_apps=())
        assert partial.value.reached_locally == 0
        broker.set_available(True)
        await b.router.wait_for(lambda: b.router.ready and b.router.is_app_connected("a1"), 5)
        assert b.router.health_problems() == []
        tg.cancel_scope.cancel()


def test_backplane_selection_and_config() -> None:
    assert backplane_from_url("memory") is None
    assert backplane_kind("nats://h:4222") == "nats" and backplane_kind("tls://h:4222") == "nats"
    assert backplane_kind("redis://h:6379/0") == "redis" and backplane_kind("rediss://h") == "redis"
    assert type(backplane_from_url("nats://127.0.0.1:1")).__name__ == "NatsBackplane"
    assert type(backplane_from_url("redis://127.0.0.1:1")).__name__ == "RedisBackplane"
    assert redact("redis://user:secret@h:6379/0") == "redis://***@h:6379/0"
    with pytest.raises(ValueError, match="backplane"):
        backplane_kind("kafka://h")
    config = APIConfig.from_env({"LLMGINE_API_BACKPLANE": "nats://127.0.0.1:4222", "LLMGINE_API_CLUSTER_NAME": "prod",
                                 "LLMGINE_API_HEARTBEAT_INTERVAL": "1.5"})
    assert (config.backplane, config.cluster_name, config.heartbeat_interval) == ("nats://127.0.0.1:4222", "prod", 1.5)
    for variable, value in [("LLMGINE_API_BACKPLANE", "kafka://x"), ("LLMGINE_API_CLUSTER_NAME", "a.b"),
                            ("LLMGINE_API_HEARTBEAT_INTERVAL", "0")]:
        with pytest.raises(ConfigError, match=variable):
            APIConfig.from_env({variable: value})
    hub, sessions = Hub(), SessionStore(1)
    assert isinstance(build_router(APIConfig(), hub, sessions), LocalRouter)
    assert isinstance(build_router(APIConfig(backplane="redis://127.0.0.1:1"), hub, sessions), ClusterRouter)


async def test_starts_without_its_broker_serves_locally_and_joins_later() -> None:
    broker = MemoryBroker()
    broker.set_available(False)
    a, b = Node(broker), Node(broker)
    async with anyio.create_task_group() as tg:
        await tg.start(a.router.run)  # returns at once: the broker is not needed to start
        await tg.start(b.router.run)
        conn = a.connect(tg, "a1")
        assert not a.router.ready and "disconnected" in a.router.health_problems()[0]
        await a.router.send_to_app("a1", "local still works")
        assert await next_frame(conn) == "local still works"
        with pytest.raises(BackplaneUnavailable):
            await a.router.send_to_app("elsewhere", "x")
        broker.set_available(True)
        await b.router.wait_for(lambda: b.router.ready and b.router.is_app_connected("a1"), 5)
        await b.router.send_to_app("a1", "from b")
        assert await next_frame(conn) == "from b"
        tg.cancel_scope.cancel()


async def test_memory_transport_order_size_and_outage() -> None:
    broker = MemoryBroker(max_payload=1024)
    sender, receiver = MemoryBackplane(broker), MemoryBackplane(broker)
    got: list[bytes] = []
    states: list[bool] = []
    arrived = anyio.Event()

    def on_message(subject: str, payload: bytes) -> None:
        got.append(payload)
        if len(got) == 100:
            arrived.set()

    sender_up = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(receiver.run, ["s"], on_message, states.append)
        await tg.start(sender.run, ["other"], lambda subject, payload: None, lambda up: up and sender_up.set())
        with anyio.fail_after(5):
            await sender_up.wait()  # run() returns before connecting (a broker may be down at start)
        assert states == [True]
        for index in range(100):
            await sender.publish("s", str(index).encode())
        with anyio.fail_after(5):
            await arrived.wait()
        assert got == [str(index).encode() for index in range(100)]
        with pytest.raises(MessageTooLarge):
            await sender.publish("s", b"x" * 1025)
        broker.set_available(False)
        with pytest.raises(BackplaneUnavailable):
            await sender.publish("s", b"lost")
        tg.cancel_scope.cancel()
    assert states[:2] == [True, False]


async def test_remote_request_bookkeeping_ends_every_way_through_one_path() -> None:
    """Every way a remote request ends goes through RemoteRequests, which clears both its table and the connection's."""
    answers: list[tuple[str, Reply]] = []
    requests = RemoteRequests("here", "memory", lambda request, reply: answers.append((request.origin, reply)))
    connection = Connection("app-1", queue_size=4, send_grace=0.5)

    def hold(message_id: str, origin: str = "there", deadline: float = 10.0) -> ForwardedRequest:
        message = Request(node=origin, app_id="app-1", message_id=message_id, frame="q", timeout=1.0)
        return requests.hold(connection, message, deadline)

    # Held for other nodes: answered or failed (the outcome goes back to the waiting node)...
    hold("m1")
    hold("m2")
    assert set(connection.pending) == {"m1", "m2"}
    connection.pending.pop("m1").resolve({"ok": True})  # what the server_response handler does
    connection.fail_pending(ServerShuttingDown)  # what shutdown does
    assert [(origin, reply.node, reply.message_id, reply.data, reply.error) for origin, reply in answers] == [
        ("there", "here", "m1", {"ok": True}, None), ("there", "here", "m2", None, "shutting_down")]
    # ...or dropped without an answer: withdrawn, overdue, or the waiting node gone.
    answers.clear()
    withdrawn, overdue, orphan, kept = hold("m3"), hold("m4", deadline=1.0), hold("m5", origin="gone"), hold("m6")
    requests.withdrawn("someone-else", "m3")  # only the node that asked may withdraw
    assert not withdrawn.settled
    requests.withdrawn("there", "m3")
    requests.overdue(now=2.0)
    requests.node_gone("gone")
    assert answers == [] and set(connection.pending) == {"m6"}
    assert withdrawn.settled and overdue.settled and orphan.settled and not kept.settled
    kept.discard()
    assert connection.pending == {} and answers == []

    # Waited for here: settled by a reply, the app or node gone, or the broker lost.
    replied, app_gone, node_gone, lost = (requests.expect("n1", "x", "r1"), requests.expect("n1", "y", "r2"),
                                          requests.expect("n2", "z", "r3"), requests.expect("n1", "x", "r4"))
    requests.replied(Reply(node="n2", message_id="r1", data={"forged": True}))  # not from n1: ignored
    assert not replied.settled
    requests.replied(Reply(node="n1", message_id="r1", data={"ok": 1}))
    requests.app_gone("y")
    requests.node_gone("n2")
    requests.broker_lost()
    assert await replied.pending.wait() == {"ok": 1}
    for sent, error in ((app_gone, AppDisconnected), (node_gone, AppDisconnected), (lost, BackplaneUnavailable)):
        with pytest.raises(error):
            await sent.pending.wait()
    for sent in (replied, app_gone, node_gone, lost):
        requests.done(sent)
    shutdown = requests.expect("n1", "x", "r5")
    requests.shutting_down()
    with pytest.raises(ServerShuttingDown):
        await shutdown.pending.wait()

    # Acknowledgements: counted per node; a node that leaves is not waited for; the caller's set is left alone.
    nodes = {"n1", "n2"}
    ack, wait = requests.expect_acks(nodes)
    requests.acked("n1", ack, 2)
    requests.acked("n1", ack, 5)  # a duplicate counts once
    assert nodes == {"n1", "n2"} and not wait.done.is_set()
    requests.node_gone("n2")
    assert wait.done.is_set() and (wait.count, wait.expected, wait.failed) == (2, set(), False)
    requests.acks_done(ack)
    _, lost_ack = requests.expect_acks(nodes)
    requests.broker_lost()
    assert lost_ack.done.is_set() and lost_ack.failed
