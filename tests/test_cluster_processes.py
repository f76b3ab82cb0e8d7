"""Multi-process clusters: real uvicorn processes on different ports, real brokers, real clients.

Every node runs ``tests.cluster_app`` (the default app + ``POST /test/call``, which makes a
messaging API call *on that node*), so "a client on node A, the backend call on node B" is literal.
A test waits for a node's view of the cluster to change by asking that node to wait (op ``wait``:
its router's ``wait_for``, woken by every presence or connectivity change) — never by polling.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from llmgine_ws.client import Message, connect

from .brokers import Broker
from .cluster_support import ADMIN, ADMIN_TOKEN
from .support import listening_socket

pytestmark = pytest.mark.anyio

REPO_ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT = 0.5


class NodeProcess:
    """``python -m llmgine_ws`` (or ``uvicorn``) serving tests.cluster_app on a pre-bound socket."""

    def __init__(self, process: anyio.abc.Process, port: int, log: Any) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/api/ws"
        self._log = log

    def output(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return str(self._log.read().decode(errors="replace"))

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        """One messaging API call made on this node (a fresh HTTP connection each time)."""
        async with httpx.AsyncClient(base_url=self.url, timeout=30 + float(args.get("timeout", 0))) as http:
            response = await http.post("/test/call", json={"op": op, "args": args})
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as http:
            return await http.get(path, headers=headers)

    async def wait_until(self, query: str, equals: Any, timeout: float = 10, **args: Any) -> None:
        """Wait until the query op ``query`` answers ``equals`` on this node (the node does the waiting)."""
        await wait_on(self.call, query, equals, timeout, **args)


async def wait_on(call: Callable[..., Awaitable[dict[str, Any]]], query: str, equals: Any, timeout: float,
                  **args: Any) -> None:
    """Make a node wait (op ``wait``, see tests.cluster_app) until ``query(**args) == equals`` there."""
    outcome = await call("wait", until=query, args=args, equals=equals, timeout=timeout)
    assert outcome["ok"], f"{query}({args}) never became {equals!r} within {timeout}s on node {outcome['node']}: " \
                          f"{outcome}"


@asynccontextmanager
async def node_process(env: dict[str, str], *, runner: str = "llmgine_ws", workers: int | None = None,
                       ) -> AsyncIterator[NodeProcess]:
    sock = listening_socket()
    port = sock.getsockname()[1]
    if runner == "llmgine_ws":
        argv = [sys.executable, "-m", "llmgine_ws", "--app", "tests.cluster_app:app", "--log-level", "warning"]
    else:
        argv = [sys.executable, "-m", "uvicorn", "tests.cluster_app:app", "--log-level", "warning"]
    argv += ["--fd", str(sock.fileno())]
    if workers:
        argv += ["--workers", str(workers)]
    with tempfile.TemporaryFile() as log:
        process = await anyio.open_process(argv, env={**os.environ, **env}, pass_fds=(sock.fileno(),),
                                           cwd=REPO_ROOT, stdout=log, stderr=log, start_new_session=True)
        sock.close()
        node = NodeProcess(process, port, log)
        try:
            yield node
        finally:
            if process.returncode is None:
                os.killpg(process.pid, signal.SIGTERM)
                with anyio.move_on_after(15):
                    await process.wait()
                if process.returncode is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    await process.wait()
            await process.aclose()
        output = node.output()
        assert "Traceback" not in output, output


def node_env(broker_url: str, cluster: str) -> dict[str, str]:
    return {
        "LLMGINE_API_BACKPLANE": broker_url,
        "LLMGINE_API_CLUSTER_NAME": cluster,
        "LLMGINE_API_HEARTBEAT_INTERVAL": str(HEARTBEAT),
        "LLMGINE_API_PING_INTERVAL": "0",
        "LLMGINE_API_RESUME_WINDOW": "0",  # apps end with their socket (resume: tests/test_resume_cluster.py)
        "LLMGINE_API_ADMIN_TOKEN": ADMIN_TOKEN,
        "LLMGINE_API_SHUTDOWN_TIMEOUT": "3",
    }


async def wait_ready(node: NodeProcess, cluster_size: int, timeout: float = 30) -> None:
    """Wait until ``node`` is ready and knows ``cluster_size`` nodes (its socket queues us until it serves)."""
    await node.wait_until("ready", True, timeout)
    await node.wait_until("node_count", cluster_size, timeout)
    assert (await node.get("/health/ready")).status_code == 200
    assert len((await node.get("/api/connections", headers=ADMIN)).json()["cluster"]["nodes"]) == cluster_size


@asynccontextmanager
async def process_cluster(broker_url: str, size: int) -> AsyncIterator[list[NodeProcess]]:
    env = node_env(broker_url, "p" + uuid.uuid4().hex[:12])
    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(node_process(env)) for _ in range(size)]
        async with anyio.create_task_group() as tg:
            for node in nodes:
                tg.start_soon(wait_ready, node, size)
        yield nodes


async def visible(node: NodeProcess, app_id: str, timeout: float = 10) -> None:
    await node.wait_until("is_app_connected", True, timeout, app_id=app_id)


@pytest.fixture(params=["nats", "redis"])
def broker(request: pytest.FixtureRequest) -> Broker:
    result: Broker = request.getfixturevalue(f"{request.param}_broker")
    return result


@pytest.fixture(params=["nats", "redis"])
def own_broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    process = Broker(str(request.param))
    process.start()
    yield process
    process.kill()


async def test_two_nodes_every_api_from_the_other_node(broker: Broker) -> None:
    async with process_cluster(broker.url, 2) as (a, b), connect(a.ws_url + "?user=alice") as client, \
            connect(b.ws_url + "?user=alice") as neighbour:

        @client.on_server_request("ask")
        async def ask(message: Message) -> dict[str, Any]:
            return {"answer": f"{message.data['q']}!"}

        await visible(b, client.app_id)
        await visible(a, neighbour.app_id)
        node_a = (await a.call("whoami"))["result"]
        assert (await b.call("node_of", app_id=client.app_id))["result"] == node_a
        assert set((await b.call("get_connected_apps"))["result"]) == {client.app_id, neighbour.app_id}

        session_id = await client.create_session()

        await b.wait_until("get_app_sessions", [session_id], app_id=client.app_id)

        # Unicast, in order, from node b.
        for index in range(10):
            assert (await b.call("send_to_app", app_id=client.app_id, data={"n": index}))["ok"]
        assert [(await client.receive(timeout=5)).data["n"] for _ in range(10)] == list(range(10))
        assert (await b.call("send_to_session", session_id=session_id, data={"s": 1}))["ok"]
        assert (await client.receive(timeout=5)).data == {"s": 1, "session_id": session_id}

        # Fan-out, counted cluster-wide.
        assert (await b.call("send_to_user", user_id="alice", data={"u": 1}))["result"] == 2
        assert (await b.call("broadcast", data={"all": 1}, exclude=[neighbour.app_id]))["result"] == 1
        assert (await client.receive(timeout=5)).data == {"u": 1}
        assert (await client.receive(timeout=5)).data == {"all": 1}
        assert (await neighbour.receive(timeout=5)).data == {"u": 1}

        # Groups.
        assert (await b.call("join_group", app_id=client.app_id, group="doc"))["ok"]
        assert (await b.call("join_group", app_id=neighbour.app_id, group="doc"))["ok"]
        assert (await b.call("send_to_group", group="doc", data={"g": 1}))["result"] == 2
        assert (await b.call("leave_group", app_id=client.app_id, group="doc"))["result"] is True
        assert (await b.call("send_to_group", group="doc", data={"g": 2}))["result"] == 1
        assert (await client.receive(timeout=5)).data == {"g": 1}
        assert [(await neighbour.receive(timeout=5)).data for _ in range(2)] == [{"g": 1}, {"g": 2}]

        # A request from node b, answered by the client on node a.
        answer = await b.call("send_to_app_and_wait", app_id=client.app_id, data={"request_type": "ask", "q": "hi"})
        assert answer == {"ok": True, "result": {"response_type": "ask", "answer": "hi!"}, "node": answer["node"]}

        # A timed-out request is withdrawn on the client.
        @client.on_server_request("slow")
        async def slow(message: Message) -> dict[str, Any]:
            await anyio.sleep_forever()
            raise AssertionError

        timed_out = await b.call("send_to_app_and_wait", app_id=client.app_id, data={"request_type": "slow"},
                                 timeout=0.3)
        assert timed_out["error"] == "ServerRequestTimeout"  # a TimeoutError
        notice = await client.receive(timeout=5)
        assert (notice.type, notice.data["reason"]) == ("server_request_cancelled", "timeout")

        unknown = await b.call("send_to_app", app_id="nobody", data={})
        assert unknown["error"] == "AppNotConnected"


async def disconnect_while_waited_on(waiting: NodeProcess, target: NodeProcess) -> float:
    """How long after the client on ``target`` drops does the waiter on ``waiting`` fail?"""
    async with connect(target.ws_url, resume=False) as client:
        seen = anyio.Event()

        @client.on_server_request("never")
        async def never(message: Message) -> dict[str, Any]:
            seen.set()
            await anyio.sleep_forever()
            raise AssertionError

        await visible(waiting, client.app_id)
        outcome: dict[str, Any] = {}

        async def wait() -> None:
            outcome["response"] = await waiting.call("send_to_app_and_wait", app_id=client.app_id,
                                                     data={"request_type": "never"}, timeout=30)
            outcome["at"] = time.monotonic()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            with anyio.fail_after(10):
                await seen.wait()
            dropped = time.monotonic()
            await client.abort()
    assert outcome["response"]["error"] == "AppDisconnected", outcome
    return float(outcome["at"] - dropped)


async def test_three_nodes_remote_disconnect_and_kill_9(nats_broker: Broker) -> None:
    async with process_cluster(nats_broker.url, 3) as (a, b, c):
        assert await disconnect_while_waited_on(b, a) < 1.0
        async with connect(a.ws_url) as on_a, connect(c.ws_url) as on_c:
            for client in (on_a, on_c):

                @client.on_server_request("ask")
                async def ask(message: Message) -> dict[str, Any]:
                    return {"ok": True}

                await visible(b, client.app_id)
            assert (await b.call("broadcast", data={}))["result"] == 2
            for client in (on_a, on_c):
                assert (await b.call("send_to_app_and_wait", app_id=client.app_id,
                                     data={"request_type": "ask"}))["result"]["ok"] is True

            os.killpg(c.process.pid, signal.SIGKILL)  # no goodbye, no cleanup
            killed = time.monotonic()

            await b.wait_until("is_app_connected", False, 5, app_id=on_c.app_id)
            elapsed = time.monotonic() - killed
            assert elapsed <= 2 * HEARTBEAT + 0.25, f"presence expiry took {elapsed:.2f}s"
            refused = await b.call("send_to_app_and_wait", app_id=on_c.app_id, data={"request_type": "ask"})
            assert refused["error"] == "AppNotConnected"
            assert (await b.call("broadcast", data={}))["result"] == 1
            connections = (await b.get("/api/connections", headers=ADMIN)).json()
            assert len(connections["cluster"]["nodes"]) == 2


@pytest.mark.parametrize(("runner", "kind"), [("llmgine_ws", "redis"), ("uvicorn", "nats")])
async def test_workers_share_messaging(runner: str, kind: str, request: pytest.FixtureRequest) -> None:
    broker_process: Broker = request.getfixturevalue(f"{kind}_broker")
    env = node_env(broker_process.url, "w" + uuid.uuid4().hex[:12])
    async with node_process(env, runner=runner, workers=2) as server:
        await wait_ready(server, 2)
        async with connect(server.ws_url) as client:

            @client.on_server_request("ask")
            async def ask(message: Message) -> dict[str, Any]:
                return {"from": "client"}

            await visible(server, client.app_id)
            home = (await server.call("node_of", app_id=client.app_id))["result"]
            assert home is not None

            async def on_other_worker(op: str, **args: Any) -> dict[str, Any]:
                """Retry (bounded) until the call lands on the worker the client is NOT connected to."""
                for _ in range(300):
                    result = await server.call(op, require_other_than=home, **args)
                    if result.get("error") != "WrongNode":
                        assert result["node"] != home
                        return result
                raise AssertionError("300 HTTP connections never reached the other worker")

            await visible_from_other(on_other_worker, client.app_id)
            answer = await on_other_worker("send_to_app_and_wait", app_id=client.app_id, data={"request_type": "ask"})
            assert answer["result"] == {"response_type": "ask", "from": "client"}
            sent = await on_other_worker("broadcast", data={"hello": "workers"})
            assert sent["result"] == 1
            message = await client.receive(timeout=5)
            assert message.data == {"hello": "workers"}


async def visible_from_other(on_other: Callable[..., Awaitable[dict[str, Any]]], app_id: str) -> None:
    await wait_on(on_other, "is_app_connected", True, 10, app_id=app_id)


async def test_broker_restart_not_ready_then_recovers(own_broker: Broker) -> None:
    async with process_cluster(own_broker.url, 2) as (a, b), connect(a.ws_url) as on_a, \
            connect(b.ws_url) as on_b:
        await visible(b, on_a.app_id)
        own_broker.kill()

        await a.wait_until("ready", False)
        ready = await a.get("/health/ready")
        assert ready.status_code == 503
        problems = ready.json()["problems"]
        assert any("backplane" in problem for problem in problems), problems
        # Local service goes on...
        assert (await on_a.request("ping", {"timestamp": 1})).data == {"timestamp": 1}
        assert (await a.call("send_to_app", app_id=on_a.app_id, data={"local": True}))["ok"]
        assert (await on_a.receive(timeout=5)).data == {"local": True}
        # ...remote routing fails loudly.
        failed = await b.call("send_to_app", app_id=on_a.app_id, data={})
        assert failed["error"] == "BackplaneUnavailable", failed

        own_broker.restart()
        for node in (a, b):
            await wait_ready(node, 2)
        await visible(b, on_a.app_id)
        await visible(a, on_b.app_id)
        assert (await b.call("send_to_app", app_id=on_a.app_id, data={"back": True}))["ok"]
        assert (await on_a.receive(timeout=5)).data == {"back": True}
        assert (await a.call("send_to_app_and_wait", app_id=on_b.app_id,
                             data={"request_type": "none"}))["error"] == "ServerRequestFailed"

