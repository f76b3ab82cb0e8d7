"""Cross-node vs same-node messaging, side by side, over a real broker.

For each backplane (NATS, Redis) the benchmark starts its own broker on a free port and three
server processes running ``benchmarks.cluster_app``: nodes A and B of one cluster, and S, a
standalone node without a backplane (the no-cluster reference). Then, alternating the order every
round, it measures:

* ``send_to_app_and_wait`` round trips/s, issued by the backend on a node to clients that answer at
  once: **same node** (A → clients on A), **cross-node** (B → clients on A), and standalone (S → S);
* ``broadcast`` fan-out: ``--broadcasts`` broadcasts to ``--clients`` connections, deliveries/s
  measured at the clients (first trigger to last delivery): **one node** (all clients on A, sent
  from A), **two nodes** (half on A, half on B, sent from A), and standalone.

It prints medians over ``--rounds`` and the ratios cross/same and two/one (and cluster/standalone).
On a 2-core machine the brokers, the three servers and the load generator share the CPUs: read the
ratios, not the absolute numbers.

    .venv/bin/python benchmarks/cluster.py --rounds 5 --duration 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import httpx
import msgspec
import websockets

from benchmarks._server import ServerProcess, UvicornSettings

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------- brokers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def broker(kind: str) -> Iterator[str]:
    """Run our own nats-server / redis-server on a free loopback port; yields its URL."""
    port = _free_port()
    if kind == "nats":
        binary = str(Path(sys.executable).parent / "nats-server")
        if not Path(binary).exists():
            binary = shutil.which("nats-server") or ""
        argv, marker = [binary, "-a", "127.0.0.1", "-p", str(port)], "Server is ready"
        url = f"nats://127.0.0.1:{port}"
    else:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        marker, url = "Ready to accept connections", f"redis://127.0.0.1:{port}"
    if not binary or not Path(binary).exists():
        raise SystemExit(f"cluster benchmark: no {kind} broker binary (install the test extra / redis-server)")
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    ready = threading.Event()
    assert process.stdout is not None
    stream = process.stdout

    def pump() -> None:
        for line in stream:
            if marker.encode() in line:
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        if not ready.wait(15) or process.poll() is not None:
            raise SystemExit(f"cluster benchmark: {kind} broker did not start")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)


@contextlib.contextmanager
def node(label: str, env: dict[str, str]) -> Iterator[ServerProcess]:
    """One server process of ``benchmarks.cluster_app`` with ``env`` (it inherits the environment)."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        server = ServerProcess("benchmarks.cluster_app:app", UvicornSettings(lifespan="on"), label=label)
        server.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------- clients


@dataclass
class Clients:
    """Benchmark WebSocket clients: answer every server_request at once, count broadcasts."""

    app_ids: list[str] = field(default_factory=list)
    received: dict[str, int] = field(default_factory=dict)
    last_receipt: float = 0.0
    expected: int = 0
    done: anyio.Event = field(default_factory=anyio.Event)


_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


async def _client(url: str, clients: Clients, task_status: anyio.abc.TaskStatus[None]) -> None:
    async with websockets.connect(url, compression=None, max_size=None, ping_interval=None) as ws:
        greeting = _decode(await ws.recv())
        app_id = greeting["data"]["app_id"]
        clients.app_ids.append(app_id)
        clients.received[app_id] = 0
        task_status.started()
        async for raw in ws:
            message = _decode(raw)
            kind = message["type"]
            if kind == "server_request":
                await ws.send(_encode({"type": "server_response", "message_id": message["message_id"],
                                       "data": {"response_type": "bench"}}).decode())
            elif kind == "bench":
                clients.received[app_id] += 1
                clients.last_receipt = time.monotonic()
                if clients.expected and all(n >= clients.expected for n in clients.received.values()):
                    clients.done.set()


@contextlib.asynccontextmanager
async def connected(urls: list[str]) -> AsyncIterator[Clients]:
    clients = Clients()
    async with anyio.create_task_group() as tg:
        for url in urls:
            await tg.start(_client, url, clients)
        yield clients
        tg.cancel_scope.cancel()


async def _post(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await http.post(url, json=body, timeout=120)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


async def _wait_apps(http: httpx.AsyncClient, base: str, count: int) -> None:
    """Bounded poll: until the sending node sees ``count`` apps (presence crossed the backplane)."""
    deadline = time.monotonic() + 15
    while (await http.get(base + "/bench/apps")).json()["apps"] != count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base} never saw {count} apps")
        await anyio.sleep(0.02)


# ---------------------------------------------------------------------------------- measurements


def _http(server: ServerProcess) -> str:
    return f"http://127.0.0.1:{server.port}"


def _ws(server: ServerProcess) -> str:
    return server.url("/api/ws")


async def measure_requests(http: httpx.AsyncClient, caller: ServerProcess, target: ServerProcess,
                           concurrency: int, duration: float) -> float:
    async with connected([_ws(target)] * min(concurrency, 8)) as clients:
        await _wait_apps(http, _http(caller), len(clients.app_ids))
        result = await _post(http, _http(caller) + "/bench/requests",
                             {"app_ids": clients.app_ids, "concurrency": concurrency, "duration": duration})
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} request(s) failed: {result}")
    return float(result["count"] / result["elapsed"])


async def measure_broadcast(http: httpx.AsyncClient, sender: ServerProcess, homes: list[ServerProcess],
                            clients_count: int, broadcasts: int) -> float:
    urls = [_ws(homes[i % len(homes)]) for i in range(clients_count)]
    async with connected(urls) as clients:
        await _wait_apps(http, _http(sender), clients_count)
        clients.expected = broadcasts
        started = time.monotonic()
        result = await _post(http, _http(sender) + "/bench/broadcast", {"count": broadcasts})
        with anyio.fail_after(60):
            await clients.done.wait()
        elapsed = clients.last_receipt - started
    if result["reached"] != broadcasts * clients_count:
        raise RuntimeError(f"broadcast reached {result['reached']}, expected {broadcasts * clients_count}")
    return broadcasts * clients_count / elapsed


@dataclass
class Row:
    name: str
    unit: str
    columns: dict[str, list[float]] = field(default_factory=dict)

    def add(self, column: str, value: float) -> None:
        self.columns.setdefault(column, []).append(value)

    def median(self, column: str) -> float:
        return statistics.median(self.columns[column])


async def run_backplane(kind: str, args: argparse.Namespace) -> list[Row]:
    cluster_env = {"LLMGINE_API_BACKPLANE": "", "LLMGINE_API_CLUSTER_NAME": "bench" + uuid.uuid4().hex[:8],
                   "LLMGINE_API_HEARTBEAT_INTERVAL": "1", "LLMGINE_API_PING_INTERVAL": "0",
                   "LLMGINE_API_OUTBOUND_QUEUE_SIZE": str(max(256, 2 * args.broadcasts)),
                   "LLMGINE_API_MAX_PENDING_REQUESTS": "256",
                   # A load test, not a rate-limit test: the default broadcast limit (50/s, burst 100)
                   # made /bench/broadcast answer 500 (limit_hit limit=broadcast) mid-run.
                   "LLMGINE_API_BROADCAST_RATE_LIMIT": "0", "LLMGINE_API_RATE_LIMIT": "0",
                   "LLMGINE_API_MAX_CONNECTIONS_PER_IP": "100000", "LLMGINE_API_LOG_LEVEL": "warning"}
    with broker(kind) as url:
        cluster_env["LLMGINE_API_BACKPLANE"] = url
        standalone_env = {**cluster_env, "LLMGINE_API_BACKPLANE": "memory"}
        with node("A", cluster_env) as a, node("B", cluster_env) as b, node("S", standalone_env) as s:
            rows = [Row(f"send_to_app_and_wait c={c}", "req/s") for c in args.concurrency]
            fanout = Row(f"broadcast {args.clients} clients", "deliveries/s")
            async with httpx.AsyncClient() as http:
                for round_index in range(args.rounds):
                    for row, concurrency in zip(rows, args.concurrency, strict=True):
                        plan = [("same", a, a), ("cross", b, a), ("standalone", s, s)]
                        for column, caller, target in (plan if round_index % 2 == 0 else plan[::-1]):
                            value = await measure_requests(http, caller, target, concurrency, args.duration)
                            row.add(column, value)
                            print(f"  [{kind}] round {round_index + 1} {row.name} {column}: {value:,.0f} {row.unit}",
                                  file=sys.stderr, flush=True)
                    plan_b = [("same", a, [a]), ("cross", a, [a, b]), ("standalone", s, [s])]
                    for column, sender, homes in (plan_b if round_index % 2 == 0 else plan_b[::-1]):
                        value = await measure_broadcast(http, sender, homes, args.clients, args.broadcasts)
                        fanout.add(column, value)
                        print(f"  [{kind}] round {round_index + 1} {fanout.name} {column}: {value:,.0f} "
                              f"{fanout.unit}", file=sys.stderr, flush=True)
    return [*rows, fanout]


def report(kind: str, rows: list[Row]) -> None:
    print(f"\n## {kind} backplane — medians of {len(rows[0].columns['same'])} rounds")
    print(f"{'measurement':<34} {'same node':>12} {'cross-node':>12} {'ratio':>7}  {'standalone':>12} "
          f"{'same/standalone':>15}")
    for row in rows:
        same, cross, alone = row.median("same"), row.median("cross"), row.median("standalone")
        paired = [c / s for c, s in zip(row.columns["cross"], row.columns["same"], strict=True)]
        print(f"{row.name + ' (' + row.unit + ')':<34} {same:>12,.0f} {cross:>12,.0f} {cross / same:>7.2f}  "
              f"{alone:>12,.0f} {same / alone:>15.2f}   (per-round cross/same {min(paired):.2f}-{max(paired):.2f})")
    print("same node = caller and clients on node A; cross-node = caller on B, clients on A (requests) / "
          "clients split over A and B (broadcast); standalone = one node without a backplane.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backplane", nargs="+", default=["nats", "redis"], choices=["nats", "redis"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per request measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--clients", type=int, default=16, help="connections receiving the broadcasts")
    parser.add_argument("--broadcasts", type=int, default=200, help="broadcasts per fan-out measurement")
    args = parser.parse_args(argv)
    for kind in args.backplane:
        rows = anyio.run(run_backplane, kind, args)
        report(kind, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
