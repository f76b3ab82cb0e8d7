"""The backplane conformance suite: the same tests, unchanged, against memory, NATS and Redis.

Two parts: the :class:`~llmgine_ws.backplane.Backplane` transport contract itself, then cluster
semantics (presence, every messaging API across nodes, requests, fan-out, groups, expiry, outage)
with several in-process nodes — real apps served by uvicorn, real clients, a real broker.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from llmgine_ws import AppDisconnected, AppNotConnected, ServerRequestFailed
from llmgine_ws.backplane import Backplane
from llmgine_ws.backplane.wire import AppEntry, Heartbeat, Hello, Snapshot
from llmgine_ws.client import Client, Message, RequestError, connect
from llmgine_ws.errors import BackplaneUnavailable, MessageTooLarge

from .brokers import Broker
from .cluster_support import ADMIN, HEARTBEAT, BrokerHandle, cluster, router_of, wait_visible
from .support import LiveServer

pytestmark = pytest.mark.anyio

KINDS = ["memory", "nats", "redis"]


@pytest.fixture(params=KINDS)
def broker(request: pytest.FixtureRequest) -> BrokerHandle:
    """A broker of each kind (the real ones are shared by the session: each test uses its own cluster name)."""
    kind = str(request.param)
    if kind == "memory":
        return BrokerHandle(kind)
    process: Broker = request.getfixturevalue(f"{kind}_broker")
    return BrokerHandle(kind, process)


@pytest.fixture(params=KINDS)
def private_broker(request: pytest.FixtureRequest) -> Iterator[BrokerHandle]:
    """A broker of each kind for this test alone (it will be taken down)."""
    kind = str(request.param)
    if kind == "memory":
        yield BrokerHandle(kind)
        return
    process = Broker(kind)
    process.start()
    try:
        yield BrokerHandle(kind, process)
    finally:
        process.kill()


class Received:
    """Collects what a backplane receives."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.up = anyio.Event()
        self.down = anyio.Event()
        self._arrived = anyio.Event()

    def on_message(self, subject: str, payload: bytes) -> None:
        self.messages.append((subject, payload))
        self._arrived.set()
        self._arrived = anyio.Event()

    def on_state(self, up: bool) -> None:
        if up:
            self.up.set()
            self.down = anyio.Event()
        else:
            self.down.set()
            self.up = anyio.Event()

    async def wait_count(self, count: int, timeout: float = 10.0) -> None:
        with anyio.fail_after(timeout):
            while len(self.messages) < count:
                await self._arrived.wait()


async def running(backplane: Backplane, subjects: list[str], received: Received,
                  tg: anyio.abc.TaskGroup) -> None:
    await tg.start(backplane.run, subjects, received.on_message, received.on_state)
    with anyio.fail_after(10):
        await received.up.wait()


# ------------------------------------------------------------------------------ transport contract


async def test_publish_subscribe_in_order_and_only_subscribed_subjects(broker: BrokerHandle) -> None:
    subject = f"conf.{uuid.uuid4().hex}"
    sender, receiver = broker.backplane(), broker.backplane()
    got, ignored = Received(), Received()
    async with anyio.create_task_group() as tg:
        await running(receiver, [subject], got, tg)
        await running(sender, [subject + ".other"], ignored, tg)
        assert sender.connected and receiver.connected
        for index in range(500):
            await sender.publish(subject, index.to_bytes(4, "big"))
        await got.wait_count(500)
        assert [int.from_bytes(payload, "big") for _, payload in got.messages] == list(range(500))
        assert {s for s, _ in got.messages} == {subject}
        assert ignored.messages == []
        tg.cancel_scope.cancel()


async def test_message_size_limit_is_enforced_loudly(broker: BrokerHandle) -> None:
    subject = f"conf.{uuid.uuid4().hex}"
    backplane = broker.backplane()
    got = Received()
    async with anyio.create_task_group() as tg:
        await running(backplane, [subject], got, tg)
        limit = backplane.max_payload
        assert limit >= 1024 * 1024
        await backplane.publish(subject, b"x" * limit)  # exactly the limit goes through
        with pytest.raises(MessageTooLarge) as too_large:
            await backplane.publish(subject, b"x" * (limit + 1))
        assert (too_large.value.size, too_large.value.limit) == (limit + 1, limit)
        await got.wait_count(1)
        assert len(got.messages[0][1]) == limit
        tg.cancel_scope.cancel()


async def test_publish_without_a_connection_raises(broker: BrokerHandle) -> None:
    backplane = broker.backplane()
    assert not backplane.connected
    with pytest.raises(BackplaneUnavailable):
        await backplane.publish("conf.nowhere", b"lost")


async def test_outage_is_reported_and_the_backplane_reconnects(private_broker: BrokerHandle) -> None:
    subject = f"conf.{uuid.uuid4().hex}"
    backplane = private_broker.backplane()
    got = Received()
    async with anyio.create_task_group() as tg:
        await running(backplane, [subject], got, tg)
        private_broker.outage()
        with anyio.fail_after(10):
            await got.down.wait()
        assert not backplane.connected
        with pytest.raises(BackplaneUnavailable):
            await backplane.publish(subject, b"during the outage")
        private_broker.restore()
        with anyio.fail_after(15):
            await got.up.wait()
        await backplane.publish(subject, b"after")
        await got.wait_count(1)
        assert got.messages == [(subject, b"after")]
        tg.cancel_scope.cancel()


# ------------------------------------------------------------------------------ cluster semantics


async def test_presence_and_unicast_across_nodes(broker: BrokerHandle) -> None:
    async with cluster(broker, 2) as (a, b):
        async with connect(a.ws_url) as client:
            await _presence_and_unicast(a, b, client)
        api_b = b.runtime.messaging
        await router_of(b).wait_for(lambda: not api_b.is_app_connected(client.app_id), 5)
        assert api_b.get_connected_apps() == []


async def _presence_and_unicast(a: LiveServer, b: LiveServer, client: Client) -> None:
    await wait_visible(b, client.app_id)
    api_b, router_a, router_b = b.runtime.messaging, router_of(a), router_of(b)
    assert api_b.is_app_connected(client.app_id)
    assert client.app_id in api_b.get_connected_apps()
    [seen] = [p for p in api_b.get_presence() if p.app_id == client.app_id]
    assert (seen.node_id, seen.local) == (router_a.node_id, False)
    assert router_b.node_of(client.app_id) == router_a.node_id

    session_id = await client.create_session()
    await router_b.wait_for(lambda: api_b.get_app_sessions(client.app_id) == [session_id], 5)

    # Per sender → per app, in order; send_to_app and send_to_session mixed.
    for index in range(100):
        if index % 10 == 0:
            await api_b.send_to_session(session_id, "notification", {"n": index})
        else:
            await api_b.send_to_app(client.app_id, "notification", {"n": index})
    received = [await client.receive(timeout=5) for _ in range(100)]
    assert [m.data["n"] for m in received] == list(range(100))
    assert all(m.server_initiated and m.type == "notification" for m in received)
    assert received[0].data["session_id"] == session_id

    # The HTTP view is cluster-wide, with each app's node.
    async with httpx.AsyncClient(base_url=b.http_url) as http:
        body = (await http.get("/api/connections", headers=ADMIN)).json()
    assert body["app_ids"] == [client.app_id] and body["total"] == 1
    assert body["connections"] == []  # nothing is connected to b itself
    assert body["cluster"]["apps"][0]["node_id"] == router_a.node_id
    assert {n["node_id"] for n in body["cluster"]["nodes"]} == {router_a.node_id, router_b.node_id}

    with pytest.raises(AppNotConnected):
        await api_b.send_to_app("no-such-app", "notification", {})


async def test_request_round_trip_and_client_error(broker: BrokerHandle) -> None:
    async with cluster(broker, 2) as (a, b), connect(a.ws_url) as client:

        @client.on_server_request("ask")
        async def ask(message: Message) -> dict[str, Any]:
            return {"answer": message.data["question"] * 2}

        await wait_visible(b, client.app_id)
        api_b = b.runtime.messaging
        response = await api_b.send_to_app_and_wait(client.app_id, "server_request",
                                                    {"request_type": "ask", "question": "hi"}, timeout=5)
        assert response.data == {"response_type": "ask", "answer": "hihi"}
        assert response.app_id == client.app_id
        with pytest.raises(ServerRequestFailed):
            await api_b.send_to_app_and_wait(client.app_id, data={"request_type": "unknown"}, timeout=5)
        # Many at once, all routed back to the right waiter.
        results: dict[int, Any] = {}

        async def one(index: int) -> None:
            answer = await api_b.send_to_app_and_wait(client.app_id, data={"request_type": "ask", "question": index},
                                                      timeout=5)
            results[index] = answer.data["answer"]

        async with anyio.create_task_group() as tg:
            for index in range(20):
                tg.start_soon(one, index)
        assert results == {index: index * 2 for index in range(20)}
        assert a.runtime.hub.pending_request_count() == 0


async def test_remote_disconnect_fails_the_waiter_promptly(broker: BrokerHandle) -> None:
    async with cluster(broker, 2) as (a, b):
        api_b = b.runtime.messaging
        outcome: dict[str, Any] = {}
        async with connect(a.ws_url, resume=False) as client:
            seen = anyio.Event()

            @client.on_server_request("never")
            async def never(message: Message) -> dict[str, Any]:
                seen.set()
                await anyio.sleep_forever()
                raise AssertionError

            await wait_visible(b, client.app_id)

            async def wait_for_answer() -> None:
                try:
                    await api_b.send_to_app_and_wait(client.app_id, data={"request_type": "never"}, timeout=30)
                except AppDisconnected as exc:
                    outcome["error"], outcome["at"] = exc, time.monotonic()

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_for_answer)
                with anyio.fail_after(5):
                    await seen.wait()
                assert a.runtime.hub.pending_request_count() == 1
                dropped_at = time.monotonic()
                await client.abort()
        assert isinstance(outcome.get("error"), AppDisconnected)
        assert outcome["at"] - dropped_at < 1.0, "the remote waiter must fail promptly, not at its timeout"
        await router_of(b).wait_for(lambda: not api_b.is_app_connected(client.app_id), 5)
        with pytest.raises(AppNotConnected):
            await api_b.send_to_app_and_wait(client.app_id, data={"request_type": "never"}, timeout=5)


async def test_remote_timeout_and_cancel_withdraw_the_request(broker: BrokerHandle) -> None:
    async with cluster(broker, 2) as (a, b), connect(a.ws_url) as client:
        events: dict[str, anyio.Event] = {}

        @client.on_server_request("slow")
        async def slow(message: Message) -> dict[str, Any]:
            events["entered"].set()
            try:
                await anyio.sleep_forever()
            finally:
                events["cancelled"].set()
            raise AssertionError

        await wait_visible(b, client.app_id)
        api_b = b.runtime.messaging
        for reason in ("timeout", "cancelled"):
            events.update(entered=anyio.Event(), cancelled=anyio.Event())
            if reason == "timeout":
                with pytest.raises(TimeoutError):
                    await api_b.send_to_app_and_wait(client.app_id, data={"request_type": "slow"}, timeout=0.3)
            else:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(lambda: api_b.send_to_app_and_wait(client.app_id, data={"request_type": "slow"},
                                                                     timeout=30))
                    with anyio.fail_after(5):
                        await events["entered"].wait()
                    assert a.runtime.hub.pending_request_count() == 1
                    tg.cancel_scope.cancel()  # the caller gives up
            notice = await client.receive(timeout=5)
            assert (notice.type, notice.data["reason"]) == ("server_request_cancelled", reason)
            with anyio.fail_after(5):
                await events["cancelled"].wait()
            # The withdrawal travelled ahead of the notice through a's inbox: nothing is left pending there.
            assert a.runtime.hub.pending_request_count() == 0


async def test_only_the_target_connection_can_answer(broker: BrokerHandle) -> None:
    async with cluster(broker, 2) as (a, b), connect(a.ws_url) as target, connect(a.ws_url) as other, \
            connect(b.ws_url) as elsewhere:
        asked: list[Message] = []
        arrived, release = anyio.Event(), anyio.Event()

        @target.on_server_request("q")
        async def answer(message: Message) -> dict[str, Any]:
            asked.append(message)
            arrived.set()
            await release.wait()
            return {"by": "target"}

        await wait_visible(b, target.app_id)
        async with anyio.create_task_group() as tg:
            result: dict[str, Any] = {}

            async def ask() -> None:
                result["response"] = await b.runtime.messaging.send_to_app_and_wait(
                    target.app_id, data={"request_type": "q"}, timeout=10)

            tg.start_soon(ask)
            with anyio.fail_after(5):
                await arrived.wait()
            message_id = asked[0].message_id
            for impostor in (other, elsewhere):
                with pytest.raises(RequestError) as refused:
                    await impostor.request("server_response", {"by": "impostor"}, message_id=message_id)
                assert refused.value.code == "UNKNOWN_REQUEST"
            release.set()
        assert result["response"].data == {"response_type": "q", "by": "target"}


async def test_broadcast_user_and_groups_across_nodes(broker: BrokerHandle) -> None:
    async with cluster(broker, 2) as (a, b), connect(a.ws_url + "?user=alice") as a1, \
            connect(a.ws_url + "?user=bob") as a2, connect(b.ws_url + "?user=alice") as b1:
        for app_id in (a1.app_id, a2.app_id):
            await wait_visible(b, app_id)
        await wait_visible(a, b1.app_id)
        api_a, api_b = a.runtime.messaging, b.runtime.messaging

        assert await api_b.broadcast("notification", {"what": "all"}, exclude_apps=[a2.app_id]) == 2
        assert (await a1.receive(timeout=5)).data == {"what": "all"}
        assert (await b1.receive(timeout=5)).data == {"what": "all"}

        assert await api_b.send_to_user("alice", "notification", {"what": "alice"}) == 2
        assert (await a1.receive(timeout=5)).data == {"what": "alice"}
        assert (await b1.receive(timeout=5)).data == {"what": "alice"}
        assert await api_a.send_to_user("nobody", "notification", {}) == 0

        # Groups: joined from either node, cluster-wide.
        await api_b.join_group(a1.app_id, "doc-1")  # remote app
        await api_b.join_group(b1.app_id, "doc-1")  # local app
        await api_a.join_group(a2.app_id, "doc-1")
        assert await api_b.send_to_group("doc-1", "notification", {"what": "doc"}, exclude_apps=[b1.app_id]) == 2
        assert (await a1.receive(timeout=5)).data == {"what": "doc"}
        assert (await a2.receive(timeout=5)).data == {"what": "doc"}
        assert await api_b.leave_group(a2.app_id, "doc-1") is True
        assert await api_b.leave_group(a2.app_id, "doc-1") is False
        assert await api_a.send_to_group("doc-1", "notification", {"what": "doc2"}) == 2
        assert (await a1.receive(timeout=5)).data == {"what": "doc2"}
        assert (await b1.receive(timeout=5)).data == {"what": "doc2"}
        assert await api_a.send_to_group("empty", "notification", {}) == 0
        with pytest.raises(AppNotConnected):
            await api_b.join_group("no-such-app", "doc-1")
        # Nothing else arrived anywhere (exclusions held).
        for client in (a1, a2, b1):
            with pytest.raises(TimeoutError):
                await client.receive(timeout=0.05)


async def test_graceful_node_exit_removes_its_apps_at_once(broker: BrokerHandle) -> None:
    async with cluster(broker, 2) as (a, b):
        router_b = router_of(b)
        async with connect(a.ws_url) as client:
            await wait_visible(b, client.app_id)
            app_id = client.app_id
            stopping = anyio.Event()

            @client.on_server_request("never")
            async def never(message: Message) -> dict[str, Any]:
                stopping.set()
                await anyio.sleep_forever()
                raise AssertionError

            failure: dict[str, BaseException] = {}

            async def waiter() -> None:
                try:
                    await b.runtime.messaging.send_to_app_and_wait(app_id, data={"request_type": "never"}, timeout=30)
                except Exception as exc:
                    failure["error"] = exc

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                with anyio.fail_after(5):
                    await stopping.wait()
                await a.runtime.shutdown()  # what the lifespan does on SIGTERM
            assert isinstance(failure["error"], AppDisconnected)
        await router_b.wait_for(lambda: not router_b.is_app_connected(app_id), 5)


async def test_silent_node_expires_within_two_heartbeats(broker: BrokerHandle) -> None:
    """A node that stops without a word (kill -9): its apps vanish and waiters fail, nothing hangs."""
    async with cluster(broker, 1) as (b,):
        router_b = router_of(b)
        ghost = broker.backplane()
        got = Received()
        async with anyio.create_task_group() as tg:
            await running(ghost, [], got, tg)
            presence = f"{router_b.cluster_name}.presence"
            encode = msgspec.msgpack.encode
            # What a node says when it joins: hello, its snapshot (to whoever asks), then heartbeats.
            await ghost.publish(presence, encode(Hello(node="ghost", name="ghost:1", seq=1)))
            await ghost.publish(f"{router_b.cluster_name}.node.{router_b.node_id}", encode(Snapshot(
                node="ghost", name="ghost:1", seq=1, part=0, parts=1,
                apps=[AppEntry("ghost-app", None, time.time(), [])])))
            await ghost.publish(presence, encode(Heartbeat(node="ghost", name="ghost:1", seq=1)))
            await router_b.wait_for(lambda: router_b.is_app_connected("ghost-app"), 5)
            last_sign_of_life = time.monotonic()
            # A request to the ghost's app never gets an answer: it must fail when the ghost expires.
            with pytest.raises(AppDisconnected):
                await b.runtime.messaging.send_to_app_and_wait("ghost-app", data={"request_type": "x"}, timeout=30)
            gone_after = time.monotonic() - last_sign_of_life
            assert not router_b.is_app_connected("ghost-app")
            assert gone_after <= 2 * HEARTBEAT + 0.2, gone_after
            with pytest.raises(AppNotConnected):
                await b.runtime.messaging.send_to_app("ghost-app", "notification", {})
            tg.cancel_scope.cancel()


async def test_broker_outage_keeps_local_service_and_recovers(private_broker: BrokerHandle) -> None:
    async with cluster(private_broker, 2) as (a, b), connect(a.ws_url) as local, connect(b.ws_url) as remote, \
            httpx.AsyncClient(base_url=a.http_url) as http:
        await wait_visible(a, remote.app_id)
        api_a, router_a = a.runtime.messaging, router_of(a)
        assert (await http.get("/health/ready")).status_code == 200

        private_broker.outage()
        await router_a.wait_for(lambda: not router_a.ready, 10)
        ready = await http.get("/health/ready")
        assert ready.status_code == 503
        assert any("backplane" in problem for problem in ready.json()["problems"])
        # Local connections are still served...
        assert (await local.request("ping", {"timestamp": 1})).data == {"timestamp": 1}
        await api_a.send_to_app(local.app_id, "notification", {"still": "here"})
        assert (await local.receive(timeout=5)).data == {"still": "here"}
        # ...and what cannot be routed fails loudly.
        with pytest.raises(BackplaneUnavailable):
            await api_a.send_to_app(remote.app_id, "notification", {})
        with pytest.raises(BackplaneUnavailable):
            await api_a.send_to_app_and_wait(remote.app_id, data={"request_type": "x"}, timeout=5)
        with pytest.raises(BackplaneUnavailable) as partial:
            await api_a.broadcast("notification", {"to": "all"})
        assert partial.value.reached_locally == 1
        assert (await local.receive(timeout=5)).data == {"to": "all"}

        private_broker.restore()
        await router_a.wait_for(lambda: router_a.ready and router_a.is_app_connected(remote.app_id), 20)
        assert (await http.get("/health/ready")).status_code == 200
        await api_a.send_to_app(remote.app_id, "notification", {"back": True})
        assert (await remote.receive(timeout=5)).data == {"back": True}



async def test_messages_over_the_backplane_limit_fail_loudly(broker: BrokerHandle) -> None:
    async with cluster(broker, 2, max_message_size=16 * 1024 * 1024) as (a, b), \
            connect(a.ws_url, max_message_size=32 * 1024 * 1024) as client:
        limit = router_of(b).backplane.max_payload
        assert 0 < limit < 16 * 1024 * 1024

        @client.on_server_request("big")
        async def big(message: Message) -> dict[str, Any]:
            return {"blob": "x" * (limit + 1024)}

        await wait_visible(b, client.app_id)
        api_b = b.runtime.messaging
        with pytest.raises(MessageTooLarge):  # the frame to send does not fit
            await api_b.send_to_app(client.app_id, "notification", {"blob": "x" * (limit + 1024)})
        with pytest.raises(MessageTooLarge):  # the answer to carry back does not fit
            await api_b.send_to_app_and_wait(client.app_id, data={"request_type": "big"}, timeout=10)
        assert a.runtime.hub.pending_request_count() == 0
        # Below the limit all is well.
        await api_b.send_to_app(client.app_id, "notification", {"blob": "y" * (limit // 2)})
        assert len((await client.receive(timeout=10)).data["blob"]) == limit // 2
