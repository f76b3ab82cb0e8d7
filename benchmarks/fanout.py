"""Broadcast fan-out: how long until the *last* of N clients has a broadcast, with and without one
stalled client, llmgine_ws vs a bare Starlette app that loops over its sockets.

Three servers run side by side (subprocesses, same uvicorn settings), each with N reading clients:

* ``llmgine``        ``benchmarks.fanout_app:app``: ``POST /broadcast`` → ``MessagingAPI.broadcast``
* ``llmgine+stall``  the same app, plus one client in the middle of the hub that stopped reading and
                     whose outbound queue is full (filled with ``POST /flood`` first)
* ``bare``           ``benchmarks.bare_fanout:app``: ``POST /broadcast`` loops ``await ws.send_text``

Each round triggers one broadcast on each (rotating the order) and times it from just before the
HTTP request is written to the arrival of the frame at the last of the N clients. Medians over the
rounds; ratios: ``llmgine+stall / llmgine`` (stall isolation: ~1.0 means the stalled client costs
the others nothing) and ``llmgine / bare`` (fan-out overhead vs the bare loop). Finally the bare app
gets a stalled client too, once, with a timeout: its loop blocks at the stalled socket, so the
clients after it never get the message (reported as received/N).

The clients are bare asyncio protocols in this process (``benchmarks._rawws``), so the times include
the client side handling N frames — the same work for every server, which pulls ratios toward 1.
``server ms`` is the time spent inside the broadcast call on the server (for llmgine_ws: queueing
to every connection; the writers then drain in parallel; for bare: writing to every socket).

Each level is repeated ``--server-rounds`` times with fresh servers and clients; the table shows the
median of the per-server-round medians and the min-max of the per-server-round llmgine/bare ratios.

    .venv/bin/python benchmarks/fanout.py --clients 1000 3000 --rounds 7 --server-rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

from benchmarks._harness import _versions, cpu_split
from benchmarks._loadgen import loop_factory
from benchmarks._rawws import RawWS, open_ws, raise_fd_limit
from benchmarks._server import ServerProcess, UvicornSettings

ENV = {
    "LLMGINE_API_RATE_LIMIT": "0",
    "LLMGINE_API_BROADCAST_RATE_LIMIT": "0",
    "LLMGINE_API_MAX_CONNECTIONS": "1000000",
    "LLMGINE_API_MAX_CONNECTIONS_PER_IP": "1000000",
    "LLMGINE_API_PING_INTERVAL": "0",
    # The stalled client must stay stalled (not be closed with 1013) for the whole run.
    "LLMGINE_API_SEND_GRACE": "3600",
    # Like the bare apps, no INFO line per connection (two log records cost ~260k instructions per
    # connection: docs/performance.md measures it).
    "LLMGINE_API_LOG_LEVEL": "warning",
}
HOST = "127.0.0.1"
PATH = "/api/ws"


@dataclass
class Round:
    expected: int
    done: asyncio.Future[None]
    arrived: int = 0
    last: float = 0.0


@dataclass
class Side:
    name: str
    server: ServerProcess
    stalled: bool = False
    clients: list[RawWS] = field(default_factory=list)
    stalled_client: RawWS | None = None
    rounds: dict[int, Round] = field(default_factory=dict)
    fanout_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    http: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def on_message(self, ws: RawWS, message: Any) -> None:
        if message.get("type") != "fanout":
            return
        record = self.rounds.get(message["data"]["seq"])
        if record is None:
            return
        record.arrived += 1
        if record.arrived == record.expected:
            record.last = time.perf_counter()
            record.done.set_result(None)

    async def post(self, path: str, body: Any, timeout: float = 30.0) -> Any:
        """A minimal HTTP/1.1 POST on a kept-alive connection (no client library in the timed path)."""
        if self.http is not None and (self.http[0].at_eof() or self.http[1].is_closing()):
            # uvicorn closes a kept-alive connection idle for 5 s: on a busy machine that happens
            # between two broadcasts, and a request written to it is never answered.
            self.http[1].close()
            self.http = None
        if self.http is None:
            assert self.server.port is not None
            self.http = await asyncio.open_connection(HOST, self.server.port)
        reader, writer = self.http
        payload = msgspec.json.encode(body)
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            return msgspec.json.decode(await reader.readexactly(length))


async def add_clients(side: Side, count: int, *, stall_at: int | None = None, batch: int = 100) -> None:
    """Open ``count`` reading clients (in concurrent batches); with ``stall_at``, open the stalled
    client after that many, so it sits in the middle of the server's registry."""
    assert side.server.port is not None
    port = side.server.port

    async def one() -> RawWS:
        return await open_ws(HOST, port, PATH, on_message=side.on_message)

    opened = 0
    while opened < count:
        size = min(batch, count - opened)
        if stall_at is not None and opened <= stall_at < opened + size:
            size = stall_at - opened
            side.clients += await asyncio.gather(*(one() for _ in range(size)))
            side.stalled_client = await open_ws(HOST, port, PATH, rcvbuf=4096)
            side.stalled_client.stall()
            stall_at = None
        else:
            side.clients += await asyncio.gather(*(one() for _ in range(size)))
        opened += size


async def broadcast_once(side: Side, seq: int, pad: int, timeout: float) -> tuple[float | None, int, Any]:
    """Trigger one broadcast; (fan-out seconds or None on timeout, clients reached, server reply)."""
    record = Round(expected=len(side.clients), done=asyncio.get_running_loop().create_future())
    side.rounds[seq] = record
    started = time.perf_counter()
    request = asyncio.ensure_future(side.post("/broadcast", {"seq": seq, "pad": pad}, timeout=timeout))
    try:
        # The request failing (e.g. its connection closed under it) ends the wait too: it raises below.
        await asyncio.wait_for(asyncio.wait({record.done, request}, return_when=asyncio.FIRST_EXCEPTION), timeout)
        if request.done() and request.exception() is not None:
            raise RuntimeError(f"{side.name}: POST /broadcast failed: {request.exception()!r}")
        await asyncio.wait_for(asyncio.shield(record.done), timeout)
    except TimeoutError:
        request.cancel()
        return None, record.arrived, None
    reply = await request
    return record.last - started, record.arrived, reply


async def level_round(args: argparse.Namespace, n: int, server_round: int,
                      cpus: frozenset[int] | None) -> dict[str, Any]:
    """One server round at one level: fresh servers, N clients each, ``args.rounds`` broadcasts each."""
    settings = UvicornSettings(ws=args.ws, loop=args.loop, http=args.http, lifespan="on")
    raise_fd_limit(4 * n + 1000)
    servers = {
        "llmgine": ServerProcess(args.target, settings, label="llmgine", ready_path=PATH, cpus=cpus),
        "llmgine+stall": ServerProcess(args.target, settings, label="llmgine+stall", ready_path=PATH, cpus=cpus),
        "bare": ServerProcess(args.baseline, settings, label="bare", ready_path=PATH, cpus=cpus),
    }
    for server in servers.values():
        server.__enter__()
    try:
        sides = [Side(name, server, stalled=name.endswith("+stall")) for name, server in servers.items()]
        for side in sides:
            await add_clients(side, n, stall_at=n // 2 if side.stalled else None)
            if side.stalled:
                assert side.stalled_client is not None
                flooded = await side.post("/flood", {"app_id": side.stalled_client.app_id, "size": 16384,
                                                     "seconds": 10})
                log(f"  n={n} {side.name}: stalled client at position {n // 2}, flooded with "
                    f"{flooded['frames']} frames of 16 KiB until its queue stayed full")
        seq = 0
        for _ in range(2):  # unmeasured
            for side in sides:
                seq += 1
                await broadcast_once(side, seq, args.pad, args.timeout)
        for i in range(args.rounds):
            order = sides[i % 3:] + sides[: i % 3]
            for side in order:
                seq += 1
                elapsed, arrived, reply = await broadcast_once(side, seq, args.pad, args.timeout)
                if elapsed is None:
                    raise RuntimeError(f"{side.name}: only {arrived}/{n} clients got broadcast {seq}")
                side.fanout_ms.append(elapsed * 1000)
                side.server_ms.append(reply["seconds"] * 1000)
                expected_reach = n + (1 if side.stalled else 0)
                if reply["reached"] != expected_reach:
                    raise RuntimeError(f"{side.name}: broadcast reached {reply['reached']}, not {expected_reach}")
                for server in servers.values():
                    server.check_alive()
            log(f"  n={n} server round {server_round + 1}/{args.server_rounds} broadcast {i + 1}/{args.rounds}: "
                + "  ".join(f"{s.name} {s.fanout_ms[-1]:.1f} ms" for s in sides))
        level: dict[str, Any] = {"clients": n}
        for side in sides:
            level[side.name] = {"fanout_ms": side.fanout_ms, "median_ms": statistics.median(side.fanout_ms),
                                "server_ms_median": statistics.median(side.server_ms)}
        med = {side.name: statistics.median(side.fanout_ms) for side in sides}
        level["stall_ratio"] = med["llmgine+stall"] / med["llmgine"]
        level["stall_round_ratios"] = [s / t for s, t in zip(sides[1].fanout_ms, sides[0].fanout_ms, strict=True)]
        level["llmgine_vs_bare"] = med["llmgine"] / med["bare"]
        # Last, the bare loop with a stalled client: its broadcast blocks at the stalled socket.
        bare = sides[2]
        # In the middle of the bare app's registry: the second half reconnects after it.
        await asyncio.gather(*(ws.close() for ws in bare.clients[n // 2:]))
        del bare.clients[n // 2:]
        await add_clients(bare, n - n // 2, stall_at=0)
        # The bare app's flood blocks at the stalled socket until its deadline (and holds up the
        # server's exit as long): long enough to fill the socket's buffers, no longer than needed.
        flood_seconds = min(10.0, max(1.0, 2 * args.stalled_bare_timeout))
        flooded = await bare.post("/flood", {"app_id": bare.stalled_client.app_id, "size": 16384,
                                             "seconds": flood_seconds})
        seq += 1
        elapsed, arrived, _ = await broadcast_once(bare, seq, args.pad, args.stalled_bare_timeout)
        level["bare+stall"] = {"completed": elapsed is not None, "received": arrived, "of": n,
                               "waited_s": args.stalled_bare_timeout, "flood_frames": flooded["frames"]}
        for side in sides:
            for ws in [*side.clients, *([side.stalled_client] if side.stalled_client else [])]:
                ws.abort()
            if side.http is not None:
                side.http[1].close()
    finally:
        for server in servers.values():
            server.__exit__(None, None, None)
    return level


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every level, ``args.server_rounds`` times with fresh servers; medians of the per-round medians."""
    cpus: frozenset[int] | None = None
    if args.pin:
        cpus, client_cpus = cpu_split()
        os.sched_setaffinity(0, client_cpus)
    results: dict[str, Any] = {"levels": []}
    for n in args.clients:
        per_round = [await level_round(args, n, r, cpus) for r in range(args.server_rounds)]
        level: dict[str, Any] = {"clients": n, "server_rounds": per_round}
        for name in ("llmgine", "llmgine+stall", "bare"):
            level[name] = {
                "median_ms": statistics.median(r[name]["median_ms"] for r in per_round),
                "server_ms_median": statistics.median(r[name]["server_ms_median"] for r in per_round),
            }
        level["stall_ratio"] = level["llmgine+stall"]["median_ms"] / level["llmgine"]["median_ms"]
        level["stall_round_ratios"] = [x for r in per_round for x in r["stall_round_ratios"]]
        level["llmgine_vs_bare"] = level["llmgine"]["median_ms"] / level["bare"]["median_ms"]
        level["llmgine_vs_bare_rounds"] = [r["llmgine_vs_bare"] for r in per_round]
        level["bare+stall"] = per_round[-1]["bare+stall"]
        results["levels"].append(level)
    return results


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def table(results: dict[str, Any], rounds: int, pad: int, server_rounds: int) -> str:
    lines = [
        f"broadcast fan-out: time until the last client has the message (median over {server_rounds} fresh-server "
        f"rounds of the median of {rounds} broadcasts each, payload pad {pad} B)",
        "  llmgine       = benchmarks.fanout_app:app (MessagingAPI.broadcast)",
        "  llmgine+stall = the same, with one client (mid-hub) that stopped reading, its queue full",
        "  bare          = benchmarks.bare_fanout:app (loop: await ws.send_text)",
        "  server ms     = time inside the broadcast call on the server",
        "",
        f"{'clients':>7}  {'llmgine ms':>10}  {'+stall ms':>9}  {'stall ratio':>11}  {'(rounds)':>11}  "
        f"{'bare ms':>8}  {'llmgine/bare':>12}  {'(server rounds)':>15}  {'server ms L/S/B':>17}  bare+stall",
    ]
    for level in results["levels"]:
        lo, hi = min(level["stall_round_ratios"]), max(level["stall_round_ratios"])
        bs = level["bare+stall"]
        stalled_bare = ("completed" if bs["completed"] else
                        f"blocked: {bs['received']}/{bs['of']} got it in {bs['waited_s']:g} s")
        server = "/".join(f"{level[k]['server_ms_median']:.1f}" for k in ("llmgine", "llmgine+stall", "bare"))
        vs = level["llmgine_vs_bare_rounds"]
        vs_range = f"{min(vs):.2f}-{max(vs):.2f}"
        lines.append(
            f"{level['clients']:>7}  {level['llmgine']['median_ms']:>10.1f}"
            f"  {level['llmgine+stall']['median_ms']:>9.1f}"
            f"  {level['stall_ratio']:>11.2f}  {f'{lo:.2f}-{hi:.2f}':>11}  {level['bare']['median_ms']:>8.1f}"
            f"  {level['llmgine_vs_bare']:>12.2f}  {vs_range:>15}  {server:>17}  {stalled_bare}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1000, 3000], help="client counts (1000 3000)")
    p.add_argument("--rounds", type=int, default=7, help="measured broadcasts per server and level (7)")
    p.add_argument("--server-rounds", type=int, default=3,
                   help="repetitions of each level, each with fresh servers and clients (3)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin the servers to the last CPU and this process (the clients) to the others")
    p.add_argument("--pad", type=int, default=64, help="payload padding in bytes (64)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-broadcast deadline, s (30)")
    p.add_argument("--stalled-bare-timeout", type=float, default=5.0,
                   help="how long to wait for the bare app's stalled broadcast, s (5)")
    p.add_argument("--target", default="benchmarks.fanout_app:app")
    p.add_argument("--baseline", default="benchmarks.bare_fanout:app")
    p.add_argument("--ws", default="auto")
    p.add_argument("--loop", default="auto")
    p.add_argument("--http", default="auto")
    p.add_argument("--client-loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    p.add_argument("--json", type=Path, default=None, metavar="PATH")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for key, value in ENV.items():
        os.environ.setdefault(key, value)  # inherited by the server processes
    factory = loop_factory(args.client_loop)
    runner = asyncio.Runner(loop_factory=factory) if factory else asyncio.Runner()
    with runner:
        results = runner.run(run(args))
    print(table(results, args.rounds, args.pad, args.server_rounds))
    if args.json:
        results.update({"argv": list(argv or sys.argv[1:]), "versions": _versions(), "env": ENV,
                        "cpu_count": os.cpu_count()})
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
