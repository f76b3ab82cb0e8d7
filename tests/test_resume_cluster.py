"""Resume across nodes (issue 12, cluster part) with real brokers: a client that drops off node A
resumes on node B while A keeps the app and its engine; B proxies its socket over the backplane.

In-process nodes (uvicorn in the test's loop, each with its own backplane connection to a real
nats-server / redis-server) share the test's gates; the owning node's SIGKILL runs real processes.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest

from llmgine_ws.backplane.links import LinkTable
from llmgine_ws.client import Reconnect, connect

from .brokers import Broker
from .cluster_support import HEARTBEAT, BrokerHandle, cluster_node, router_of, wait_visible
from .support import LiveServer
from .tcp_proxy import tcp_proxy
from .test_cluster_processes import node_env, node_process
from .test_resume import Gates, app_of, extensions_for, peer, resumed, start_engine

pytestmark = pytest.mark.anyio

FAST = Reconnect(initial_delay=0.01, max_delay=0.2, max_time=10)
AS_ALICE = "?user=alice"
"""The test nodes authenticate ``?user=NAME`` as NAME (and anyone else as a user of their own): a
resume must come from the principal that opened the app."""


@pytest.fixture(params=["nats", "redis"])
def broker(request: pytest.FixtureRequest) -> Broker:
    result: Broker = request.getfixturevalue(f"{request.param}_broker")
    return result


@asynccontextmanager
async def two_nodes(broker: Broker, **config: Any) -> AsyncIterator[tuple[LiveServer, LiveServer, Gates]]:
    gates = Gates()
    config.setdefault("resume_window", 120)
    handle = BrokerHandle(broker.kind, broker)
    name = "r" + uuid.uuid4().hex[:12]
    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(cluster_node(handle, name, extensions_for(gates), **config))
                 for _ in range(2)]
        for node in nodes:
            router = router_of(node)
            await router.wait_for(lambda router=router: len(router.nodes()) == 2, 10)  # type: ignore[misc]
        yield nodes[0], nodes[1], gates


async def test_resume_on_another_node_mid_stream(broker: Broker) -> None:
    async with two_nodes(broker) as (a, b, gates), tcp_proxy(a.port) as proxy:
        async with peer(proxy.ws_url() + AS_ALICE) as client:
            session_id = await start_engine(client)
            await client.ack()
            await client.send("engine_command", {"session_id": session_id, "command": {
                "kind": "stream", "n": 100, "pause_at": 60, "gate": "go"}}, "cmd")
            events = []
            while len(events) < 30:  # the rest of what A sent before the drop is replayed by B
                message = await client.recv()
                if message["type"] == "engine_event":
                    events.append(message["data"]["seq"])
            app_id, token, last_seq = client.app_id, client.token, client.last_seq
            connection = app_of(a, app_id)
            await proxy.sever()
            await a.eventually(lambda: connection.detached)
        await wait_visible(b, app_id)
        async with resumed(b.ws_url + AS_ALICE, app_id, token, last_seq) as (client, answer):
            assert answer["data"]["resumed"] is True, answer
            assert answer["data"]["app_id"] == app_id and answer["data"]["resume_token"] != token
            assert answer["data"]["sessions"][0]["session_id"] == session_id
            assert answer["data"]["replayed"] == 30  # events 30..59; the engine waits at 60
            await a.eventually(lambda: not connection.detached)
            assert app_id not in b.runtime.hub and connection.link is not None and connection.link.remote
            assert a.runtime.live_counts()["remote_links_served"] == 1
            assert b.runtime.live_counts()["remote_links_proxied"] == 1
            gates["go"].set()  # live frames now flow from A's engine through B
            result = await client.until_result(events)
            assert events == list(range(100))
            assert result["data"]["result"] == {"n": 100}
            # the client's messages reach the app on A: a request, answered through B; a burst of
            # frames far past the link's window arrives whole and in order (seq checked by the peer)
            reply = await client.request("ping", {}, "after")
            assert reply["message_id"] == "after"
            noise_before = client.last_seq
            reply = await client.request("blast", {"n": 2000, "pad": 200}, "burst")
            assert reply["data"] == {"sent": 2000} and client.last_seq == noise_before + 2001
            assert ("resumed", app_id) in gates.callbacks and ("disconnect", app_id) not in gates.callbacks
            await client.ack()
            await client.raw.send_close(1000)  # goodbye through B: the app ends on A
            await client.raw.messages_until_close()
        await a.eventually(lambda: app_id not in a.runtime.hub)
        await a.eventually(lambda: ("disconnect", app_id) in gates.callbacks)


async def test_the_python_client_resumes_through_another_node(broker: Broker) -> None:
    """The real client, behind a "load balancer" that sends its reconnect to node B."""
    async with two_nodes(broker) as (a, b, gates), tcp_proxy(a.port) as proxy, \
            connect(proxy.ws_url() + AS_ALICE, reconnect=FAST) as client:
        app_id = client.app_id
        session_id = await client.create_session()
        await client.create_engine(session_id, "test")
        command = client.command(session_id, {"kind": "stream", "n": 80, "pause_at": 40, "gate": "go"})
        seen = [(await command.__anext__()).seq for _ in range(20)]
        await wait_visible(b, app_id)
        proxy.retarget(b.port)
        await proxy.sever()  # the client reconnects (through the proxy, to B) and resumes
        gates["go"].set()
        async for event in command:
            seen.append(event.seq)
        assert seen == list(range(80))
        assert command.result is not None and command.result.result == {"n": 80}
        assert client.resumed is True and client.app_id == app_id
        connection = app_of(a, app_id)  # the app, its session and engine stay on A
        assert connection.link is not None and connection.link.remote
        assert (await client.request("ping")).type in ("ping_res", "pong")


async def test_pending_request_answered_on_the_other_node(broker: Broker) -> None:
    async with two_nodes(broker) as (a, b, _gates), tcp_proxy(a.port) as proxy:
        async with peer(proxy.ws_url() + AS_ALICE) as client:
            session_id = await start_engine(client)
            await client.ack()
            await client.send("engine_command", {"session_id": session_id, "command": {"kind": "ask"}}, "cmd")
            question = await client.recv_type("server_request")
            await client.ack_synced()
            app_id, token, last_seq = client.app_id, client.token, client.last_seq
            connection = app_of(a, app_id)
            await proxy.sever()
            await a.eventually(lambda: connection.detached)
        assert connection.pending  # the engine on A still waits for its answer
        await wait_visible(b, app_id)
        async with resumed(b.ws_url + AS_ALICE, app_id, token, last_seq) as (client, answer):
            assert answer["data"]["resumed"] is True and answer["data"]["replayed"] == 0
            again = await client.recv()
            assert again["type"] == "server_request" and again["message_id"] == question["message_id"]
            await client.send("server_response", {"response_type": "user_input", "user_input": "Ada"},
                              question["message_id"])
            result = await client.recv_type("engine_command_res")
            assert result["data"]["result"] == {"answer": "Ada"}


async def test_two_resumes_at_once_on_two_nodes_exactly_one_wins(broker: Broker) -> None:
    async with two_nodes(broker) as (a, b, _gates), tcp_proxy(a.port) as proxy:
        async with peer(proxy.ws_url() + AS_ALICE) as client:
            await client.ack_synced()
            app_id, token, last_seq = client.app_id, client.token, client.last_seq
            connection = app_of(a, app_id)
            await proxy.sever()
            await a.eventually(lambda: connection.detached)
        await wait_visible(b, app_id)
        answers: list[dict[str, Any]] = []

        async def attempt(url: str, done: anyio.Event) -> None:
            async with resumed(url, app_id, token, last_seq) as (_client, answer):
                answers.append(answer)
                done.set()
                await hold.wait()

        hold = anyio.Event()
        done_a, done_b = anyio.Event(), anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(attempt, a.ws_url + AS_ALICE, done_a)
            tg.start_soon(attempt, b.ws_url + AS_ALICE, done_b)
            with anyio.fail_after(5):
                await done_a.wait()
                await done_b.wait()
            hold.set()
        outcomes = sorted(answer["data"]["resumed"] for answer in answers)
        assert outcomes == [False, True], answers
        assert next(answer for answer in answers if not answer["data"]["resumed"])["data"]["reason"] == "unknown"


async def test_resume_elsewhere_supersedes_a_half_open_socket(broker: Broker) -> None:
    async with two_nodes(broker) as (a, b, _gates), tcp_proxy(a.port) as proxy, \
            peer(proxy.ws_url() + AS_ALICE) as old:
        await old.ack_synced()
        app_id, token, last_seq = old.app_id, old.token, old.last_seq
        await wait_visible(b, app_id)  # (a resume there before B heard of the app is `unknown`)
        proxy.blackhole()  # the old socket still looks open to A
        async with resumed(b.ws_url + AS_ALICE, app_id, token, last_seq) as (client, answer):
            assert answer["data"]["resumed"] is True
            reply = await client.request("ping", {}, "p")
            assert reply["message_id"] == "p"
            connection = app_of(a, app_id)
            assert connection.link is not None and connection.link.remote
            # ... and a resume back on A supersedes B's socket (4000), fenced by generation
            token2, seq2 = answer["data"]["resume_token"], client.last_seq
            await client.ack()
            await client.request("ping", {}, "sync")
            seq2 = client.last_seq
            async with resumed(a.ws_url + AS_ALICE, app_id, token2, seq2) as (back, answer2):
                assert answer2["data"]["resumed"] is True
                await client.raw.messages_until_close()
                assert client.raw.close_code == 4000
                reply = await back.request("ping", {}, "p2")
                assert reply["message_id"] == "p2"


async def test_the_owner_pings_a_proxied_socket_and_notices_it_half_open(broker: Broker) -> None:
    async with two_nodes(broker, ping_interval=0.3, missed_pongs=2) as (a, b, _gates), \
            tcp_proxy(b.port) as proxy, peer(a.ws_url + AS_ALICE) as first:
        await first.ack()
        ping = await first.recv_type("server_ping")
        await first.send("server_pong", {"timestamp": ping["data"]["timestamp"]}, ping["message_id"])
        await first.ack_synced()
        app_id, token, last_seq = first.app_id, first.token, first.last_seq
        await wait_visible(b, app_id)
        connection = app_of(a, app_id)
        async with resumed(proxy.ws_url() + AS_ALICE, app_id, token, last_seq) as (client, answer):
            assert answer["data"]["resumed"] is True
            await first.raw.messages_until_close()
            assert first.raw.close_code == 4000
            # the owner's pings reach the client through B, in the app's seq; the answer goes back
            ping = await client.recv_type("server_ping")
            await client.send("server_pong", {"timestamp": ping["data"]["timestamp"]}, ping["message_id"])
            await a.eventually(lambda: ping["message_id"] not in connection.unanswered_pings)
            proxy.blackhole()  # B's socket is half-open now: A's pings go unanswered
            await a.eventually(lambda: connection.detached)
            await b.eventually(lambda: not b.runtime.resumer.remote.table.proxied)  # type: ignore[union-attr]


async def test_rolling_restart_drains_to_the_other_node(broker: Broker) -> None:
    async with two_nodes(broker, drain_timeout=10) as (a, b, gates), peer(a.ws_url + AS_ALICE) as client:
        session_id = await start_engine(client)
        await client.ack()
        await client.send("engine_command", {"session_id": session_id, "command": {
            "kind": "stream", "n": 50, "pause_at": 20, "gate": "go"}}, "cmd")
        events = []
        while len(events) < 20:
            message = await client.recv()
            if message["type"] == "engine_event":
                events.append(message["data"]["seq"])
        app_id, token = client.app_id, client.token
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.runtime.shutdown)  # node A restarts: it drains
            notice = await client.recv_type("notification")
            assert notice["data"]["notification_type"] == "server_shutting_down"
            assert notice["data"]["additional_data"]["resume"] is True
            assert await client.raw.messages_until_close() == []
            assert client.raw.close_code == 1012
            last_seq = client.last_seq
            async with resumed(b.ws_url + AS_ALICE, app_id, token, last_seq) as (moved, answer):
                assert answer["data"]["resumed"] is True, answer
                gates["go"].set()  # A's engine goes on; its frames reach the client through B
                result = await moved.until_result(events)
                assert events == list(range(50))
                assert result["data"]["result"] == {"n": 50}
                # once its engines are done, A ends the app: the client learns it through B
                await moved.raw.messages_until_close(15)
                assert moved.raw.close_code == 1001


async def test_the_proxying_node_drains_the_client_comes_back_to_the_owner(broker: Broker) -> None:
    async with two_nodes(broker) as (a, b, _gates), tcp_proxy(a.port) as proxy:
        async with peer(proxy.ws_url() + AS_ALICE) as client:
            await client.ack_synced()
            app_id, token, last_seq = client.app_id, client.token, client.last_seq
            connection = app_of(a, app_id)
            await proxy.sever()
            await a.eventually(lambda: connection.detached)
        await wait_visible(b, app_id)
        async with resumed(b.ws_url + AS_ALICE, app_id, token, last_seq) as (client, answer):
            assert answer["data"]["resumed"] is True
            await client.ack_synced()
            token, last_seq = answer["data"]["resume_token"], client.last_seq
            async with anyio.create_task_group() as tg:
                tg.start_soon(b.runtime.shutdown)  # B restarts: the socket it proxies goes at once
                await client.raw.messages_until_close()
                assert client.raw.close_code == 1012
                await a.eventually(lambda: connection.detached)  # ... and the app waits on A
                async with resumed(a.ws_url + AS_ALICE, app_id, token, last_seq) as (back, again):
                    assert again["data"]["resumed"] is True
                    reply = await back.request("ping", {}, "home")
                    assert reply["message_id"] == "home"


async def test_a_frames_message_lost_between_nodes_is_a_resume_not_a_gap() -> None:
    """The backplane is at-most-once: a lost ``ln.out`` closes the proxied socket (1011); the client
    resumes and the owner replays what it missed: every frame once, in order."""
    from llmgine_ws.backplane.wire import LinkFrames, decode

    broker = BrokerHandle("memory")
    gates = Gates()
    name = "m" + uuid.uuid4().hex[:12]
    async with cluster_node(broker, name, extensions_for(gates), resume_window=120) as a, \
            cluster_node(broker, name, extensions_for(gates), resume_window=120) as b:
        await router_of(b).wait_for(lambda: len(router_of(b).nodes()) == 2, 10)
        async with peer(a.ws_url + AS_ALICE) as first:
            await first.ack_synced()
            app_id, token, last_seq = first.app_id, first.token, first.last_seq
            await wait_visible(b, app_id)
            async with resumed(b.ws_url + AS_ALICE, app_id, token, last_seq) as (client, answer):
                assert answer["data"]["resumed"] is True
                await first.raw.messages_until_close()
                backplane = router_of(a).backplane
                publish = backplane.publish
                dropped: list[int] = []

                async def lossy(subject: str, payload: bytes) -> None:
                    message = decode(payload)
                    if isinstance(message, LinkFrames) and message.n == 3 and not dropped:
                        dropped.append(message.n)  # lost in transit
                        return
                    await publish(subject, payload)

                backplane.publish = lossy  # type: ignore[method-assign]
                token = answer["data"]["resume_token"]
                await client.send("blast", {"n": 1000, "pad": 100}, "burst")
                received = await client.raw.messages_until_close()
                assert dropped == [3] and client.raw.close_code == 1011
                for message in received:  # what arrived before the gap: in order, no hole
                    assert message["seq"] == client.last_seq + 1
                    client.last_seq = message["seq"]
        connection = app_of(a, app_id)
        await a.eventually(lambda: connection.detached)
        async with resumed(b.ws_url + AS_ALICE, app_id, token, client.last_seq) as (again, answer):
            assert answer["data"]["resumed"] is True
            noise = [m for m in received if m["type"] == "noise"]
            while True:
                message = await again.recv()
                if message["type"] == "noise":
                    noise.append(message)
                elif message.get("message_id") == "burst":
                    break
            assert [m["data"]["i"] for m in noise] == list(range(1000))


async def test_owner_killed_resume_answers_within_two_heartbeats(broker: Broker) -> None:
    env = {**node_env(broker.url, "k" + uuid.uuid4().hex[:12]), "LLMGINE_API_RESUME_WINDOW": "120"}
    async with node_process(env) as a, node_process(env) as b:
        await b.wait_until("node_count", 2)
        await a.wait_until("node_count", 2)
        async with peer(a.ws_url + AS_ALICE) as client:
            await client.ack_synced()
            app_id, token, last_seq = client.app_id, client.token, client.last_seq
            await b.wait_until("is_app_connected", True, app_id=app_id)
            os.killpg(a.process.pid, signal.SIGKILL)
            async with peer(b.ws_url + AS_ALICE) as fresh:
                started = time.monotonic()  # (B's presence may still name A: it asks, and gives up in time)
                await fresh.send("resume", {"app_id": app_id, "resume_token": token, "last_seq": last_seq}, "res")
                answer = await fresh.recv_type("resume_res", timeout=10)
                elapsed = time.monotonic() - started
                assert answer["data"] == {"resumed": False, "reason": "unknown", "app_id": fresh.app_id,
                                          "resume_token": fresh.token}
                # the contract is 2 heartbeat intervals; the margin is for a busy machine's scheduling
                assert elapsed < 2 * HEARTBEAT + 0.5, elapsed
            await a.process.wait()


async def test_the_proxying_node_killed_the_owner_detaches_and_the_client_comes_back(broker: Broker) -> None:
    env = {**node_env(broker.url, "q" + uuid.uuid4().hex[:12]), "LLMGINE_API_RESUME_WINDOW": "120"}
    async with node_process(env) as a, node_process(env) as b:
        await a.wait_until("node_count", 2)
        await b.wait_until("node_count", 2)
        async with peer(a.ws_url + AS_ALICE) as first:
            await first.ack_synced()
            app_id, token, last_seq = first.app_id, first.token, first.last_seq
            await b.wait_until("is_app_connected", True, app_id=app_id)
            async with resumed(b.ws_url + AS_ALICE, app_id, token, last_seq) as (client, answer):
                assert answer["data"]["resumed"] is True
                await client.ack_synced()
                token, last_seq = answer["data"]["resume_token"], client.last_seq
                os.killpg(b.process.pid, signal.SIGKILL)  # the node holding the socket dies
                await client.raw.messages_until_close()
                await a.wait_until("node_count", 1)  # A expires B, and detaches the app B served
        async with resumed(a.ws_url + AS_ALICE, app_id, token, last_seq) as (back, answer):
            assert answer["data"]["resumed"] is True, answer
            assert (await back.request("ping", {}, "p"))["message_id"] == "p"
        await b.process.wait()


async def test_rolling_restart_of_a_node_process(broker: Broker) -> None:
    """SIGTERM to the node holding a conversation: the client is sent to the other node and the
    answer goes on (the engine stays on the restarting node until the drain ends)."""
    env = {**node_env(broker.url, "d" + uuid.uuid4().hex[:12]), "LLMGINE_API_RESUME_WINDOW": "120",
           "LLMGINE_API_DRAIN_TIMEOUT": "20"}
    async with node_process(env) as a, node_process(env) as b:
        await a.wait_until("node_count", 2)
        await b.wait_until("node_count", 2)
        async with peer(a.ws_url + AS_ALICE) as client:
            session_id = (await client.request("create_session", {}, "cs"))["data"]["session_id"]
            reply = await client.request("create_engine", {"session_id": session_id, "engine_type": "gated"}, "ce")
            assert reply["type"] == "create_engine_res", reply
            await client.ack()
            await client.send("engine_command", {"session_id": session_id, "command": {
                "n": 40, "pause_at": 20, "gate": "g"}}, "cmd")
            events = []
            while len(events) < 20:
                message = await client.recv()
                if message["type"] == "engine_event":
                    events.append(message["data"]["payload"]["i"])
            app_id, token = client.app_id, client.token
            await b.wait_until("is_app_connected", True, app_id=app_id)
            os.killpg(a.process.pid, signal.SIGTERM)  # a rolling restart reaches node A
            notice = await client.recv_type("notification", timeout=10)
            assert notice["data"]["additional_data"]["resume"] is True
            assert await client.raw.messages_until_close() == []
            assert client.raw.close_code == 1012
            last_seq = client.last_seq
        async with resumed(b.ws_url + AS_ALICE, app_id, token, last_seq) as (moved, answer):
            assert answer["data"]["resumed"] is True, answer
            assert (await a.call("release", gate="g"))["ok"]  # (A still serves HTTP while it drains)
            result = await moved.until_result(events, lambda data: data["payload"]["i"], timeout=10)
            assert events == list(range(40))
            assert result["data"]["result"] == {"n": 40}
            await moved.raw.messages_until_close(20)  # A's drain ends: the app ends, the client is told
            assert moved.raw.close_code == 1001
        with anyio.fail_after(20):
            await a.process.wait()


async def test_an_item_handed_room_before_the_outbox_closes_is_not_put_twice() -> None:
    """A producer that got room (its frame committed: stamped into the replay) just before the outbox
    closed (a detach) must not be told to try again: its frame would take a second seq."""
    from llmgine_ws.outbox import Outbox, OutboxClosed

    committed: list[str] = []
    outbox: Outbox[str] = Outbox(1, 1 << 20, lambda item: committed.append(item) or item)  # type: ignore[func-returns-value]
    assert outbox.put_nowait("a", 1)
    outcomes: list[str] = []

    async def produce(item: str) -> None:
        try:
            await outbox.put(item, 1)
            outcomes.append(f"{item} queued")
        except OutboxClosed:
            outcomes.append(f"{item} refused")

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce, "b")
        tg.start_soon(produce, "c")
        await anyio.wait_all_tasks_blocked()
        assert await outbox.get() == "a"  # "b" is handed the room (committed), "c" still waits
        outbox.close()  # ... and the outbox closes before "b" runs again
    assert committed == ["a", "b"]
    assert sorted(outcomes) == ["b queued", "c refused"]


def test_a_lost_frames_message_is_a_gap_never_silent() -> None:
    table = LinkTable()
    table.ask("l1", "A", "app", now=0.0, timeout=1.0)
    proxied = table.opened("l1", "A", gen=1)
    assert proxied is not None
    assert all(proxied.take(n, [f"f{n}"]) for n in range(1, 9))
    assert [proxied.queued(n) for n in range(1, 9)] == [False] * 7 + [True]  # a credit every 8 messages
    assert not proxied.take(10, ["f10"])  # message 9 never came
    assert len(proxied.pending) == 8


def test_link_table_fences_by_generation() -> None:
    table = LinkTable()
    asking = table.ask("l1", "A", "app", now=0.0, timeout=1.0)
    assert table.overdue(0.5) == []
    proxied = table.opened("l1", "A", gen=3)
    assert proxied is not None and asking.opened
    assert table.frames_for("l1", "A", 3) is proxied
    assert table.frames_for("l1", "A", 2) is None and table.frames_for("l1", "C", 3) is None
    assert table.opened("l1", "A", 3) is None  # a duplicate answer is not a second link
    # an answer after the deadline finds nothing: the asking side tells the owner the link is lost
    table.ask("l2", "A", "app2", now=0.0, timeout=1.0)
    assert [late.link for late in table.overdue(1.0)] == ["l2"]
    assert table.opened("l2", "A", 1) is None
    # owner side: input from a superseded generation is fenced off
    table.serve("app", "B", "l1", 5)
    assert table.current("app", "B", 5) and not table.current("app", "B", 4) and not table.current("app", "C", 5)
    table.serve("app", "C", "l9", 6)
    table.unserve("app", 5)  # the old link's end does not touch the new one
    assert table.current("app", "C", 6)
    _asks, _links, apps = table.node_gone("C")
    assert apps == ["app"] and not table.current("app", "C", 6)
    _asks, links, apps = table.node_gone("A")
    assert [entry.link for entry in links] == ["l1"]
