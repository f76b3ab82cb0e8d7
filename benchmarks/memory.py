"""Server memory: resident set size (RSS) per idle connection, llmgine_ws vs bare Starlette, and RSS
across rounds of connection churn.

**Idle connections.** For each round, fresh server processes (target and baseline, the order
alternating between rounds) get 0, then N1, then N2 idle clients (each connects and reads the
``connected`` greeting, then does nothing). RSS is read from ``/proc/<pid>/status`` at each step.
Per-connection cost = RSS growth / connections; reported as the median over rounds, with the ratio
target/baseline. RSS is user-space memory only: the kernel's socket buffers are not in it.

**Churn rounds.** One target server; each round runs C cycles (connect → create_session →
create_engine → engine_command, wait for its result → disconnect, alternately vanishing without a
close frame and closing), 50 at a time, then waits until ``/health/ready`` reports no connection and
no session, and reads RSS. Python's allocator keeps freed memory for reuse, so RSS rises over the
first rounds and then should stay flat: the growth per round over the second half of the rounds is
the figure to watch (a leak shows as a steady slope).

    .venv/bin/python benchmarks/memory.py --clients 1000 3000 --rounds 3 --churn-rounds 10 --churn-cycles 500
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

from benchmarks._harness import _versions
from benchmarks._loadgen import loop_factory
from benchmarks._rawws import RawWS, open_ws, raise_fd_limit, rss_bytes
from benchmarks._server import ServerProcess, UvicornSettings
from benchmarks.fanout import ENV, HOST, PATH

MiB = 1024 * 1024


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def http_get(port: int, path: str) -> Any:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
    finally:
        writer.close()
    return msgspec.json.decode(data.split(b"\r\n\r\n", 1)[1])


async def open_many(port: int, count: int, batch: int = 100) -> list[RawWS]:
    clients: list[RawWS] = []
    while len(clients) < count:
        size = min(batch, count - len(clients))
        clients += await asyncio.gather(*(open_ws(HOST, port, PATH) for _ in range(size)))
    return clients


async def settle(pid: int, timeout: float = 3.0) -> int:
    """RSS once it stops moving (two reads 100 ms apart within 64 KiB), or after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = rss_bytes(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)  # a sampling interval, not synchronisation
        now = rss_bytes(pid)
        if abs(now - last) < 64 * 1024:
            return now
        last = now
    return last


async def idle_round(app: str, settings: UvicornSettings, levels: Sequence[int], label: str) -> list[int]:
    """RSS of a fresh server with 0 and then each level of idle clients."""
    with ServerProcess(app, settings, label=label, ready_path=PATH) as server:
        assert server.port is not None
        warm = await open_many(server.port, 20)  # imports and first-connection caches, not per-connection cost
        for ws in warm:
            await ws.close()
        rss = [await settle(server.pid)]
        clients: list[RawWS] = []
        for level in levels:
            clients += await open_many(server.port, level - len(clients))
            rss.append(await settle(server.pid))
            server.check_alive()
        for ws in clients:
            ws.abort()
    return rss


async def cycle(port: int, index: int) -> None:
    ws = await open_ws(HOST, port, PATH)
    session = await ws.request("create_session", {}, "s")
    session_id = session["data"]["session_id"]
    await ws.request("create_engine", {"session_id": session_id, "engine_type": "echo"}, "e")
    result = await ws.request("engine_command", {"session_id": session_id, "command": {"n": index}}, "c")
    assert result["data"]["status"] == "completed", result
    if index % 2:
        ws.abort()
    else:
        await ws.close()


async def churn(app: str, settings: UvicornSettings, rounds: int, cycles: int) -> list[int]:
    with ServerProcess(app, settings, label="churn", ready_path=PATH) as server:
        assert server.port is not None
        rss = [await settle(server.pid)]
        for r in range(rounds):
            for first in range(0, cycles, 50):
                await asyncio.gather(*(cycle(server.port, i) for i in range(first, min(first + 50, cycles))))
            deadline = time.monotonic() + 30
            while True:
                ready = await http_get(server.port, "/health/ready")
                if (ready["connections"], ready["sessions"]) == (0, 0):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not empty after churn round {r + 1}: {ready}")
                await asyncio.sleep(0.05)  # polling interval (the server has no "empty" event to wait on)
            rss.append(await settle(server.pid))
            server.check_alive()
            log(f"  churn round {r + 1}/{rounds}: RSS {rss[-1] / MiB:.1f} MiB (+{(rss[-1] - rss[-2]) / 1024:.0f} KiB)")
    return rss


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = UvicornSettings(ws=args.ws, loop=args.loop, http=args.http, lifespan="on")
    raise_fd_limit(2 * max(args.clients) + 1000)
    idle: dict[str, list[list[int]]] = {"target": [], "baseline": []}
    for r in range(args.rounds):
        order = ("target", "baseline") if r % 2 == 0 else ("baseline", "target")
        for side in order:
            app = args.target if side == "target" else args.baseline
            rss = await idle_round(app, settings, args.clients, side)
            idle[side].append(rss)
            log(f"  idle round {r + 1}/{args.rounds} {side:<8} RSS " +
                " -> ".join(f"{v / MiB:.1f}" for v in rss) + " MiB")
    churn_rss = await churn(args.target, settings, args.churn_rounds, args.churn_cycles) if args.churn_rounds else []
    return {"clients": list(args.clients), "idle": idle, "churn_rss": churn_rss,
            "churn_cycles_per_round": args.churn_cycles}


def per_connection(rss: list[int], levels: Sequence[int]) -> list[float]:
    """Bytes per connection at each level, relative to the same server with no connection."""
    return [(rss[i + 1] - rss[0]) / level for i, level in enumerate(levels)]


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    levels = results["clients"]
    lines = [
        f"server RSS per idle connection (median of {args.rounds} rounds, fresh servers; RSS excludes kernel socket "
        "buffers)",
        f"  target   = {args.target}",
        f"  baseline = {args.baseline}",
        "",
        f"{'clients':>7}  {'target RSS':>10}  {'baseline RSS':>12}  {'target B/conn':>13}  {'baseline B/conn':>15}  "
        f"{'ratio':>5}",
    ]
    med_rss = {side: [statistics.median(r[i] for r in results["idle"][side]) for i in range(len(levels) + 1)]
               for side in ("target", "baseline")}
    lines.append(f"{0:>7}  {med_rss['target'][0] / MiB:>8.1f}MB  {med_rss['baseline'][0] / MiB:>10.1f}MB")
    for i, level in enumerate(levels):
        per = {side: statistics.median(per_connection(r, levels)[i] for r in results["idle"][side])
               for side in ("target", "baseline")}
        lines.append(f"{level:>7}  {med_rss['target'][i + 1] / MiB:>8.1f}MB"
                     f"  {med_rss['baseline'][i + 1] / MiB:>10.1f}MB  {per['target']:>13,.0f}"
                     f"  {per['baseline']:>15,.0f}  {per['target'] / per['baseline']:>5.2f}")
    churn_rss = results["churn_rss"]
    if churn_rss:
        cycles = results["churn_cycles_per_round"]
        deltas = [b - a for a, b in itertools.pairwise(churn_rss)]
        half = len(deltas) // 2
        late = deltas[half:]
        lines += [
            "",
            f"RSS across churn rounds ({cycles} connect/session/engine/command/disconnect cycles per round, target)",
            "  round:  " + "  ".join(f"{i:>6}" for i in range(len(churn_rss))),
            "  MiB:    " + "  ".join(f"{v / MiB:>6.1f}" for v in churn_rss),
            "  +KiB:   " + "        " + "  ".join(f"{d / 1024:>6.0f}" for d in deltas),
            f"  growth per round: first half {statistics.mean(deltas[:half]) / 1024:,.0f} KiB, second half "
            f"{statistics.mean(late) / 1024:,.0f} KiB (= {statistics.mean(late) / cycles:,.0f} B per cycle); "
            f"total {(churn_rss[-1] - churn_rss[0]) / MiB:.1f} MiB over {len(deltas) * cycles:,} cycles",
        ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1000, 3000], help="idle client levels (1000 3000)")
    p.add_argument("--rounds", type=int, default=3, help="fresh-server rounds per side for idle RSS (3)")
    p.add_argument("--churn-rounds", type=int, default=10, help="churn rounds, 0 to skip (10)")
    p.add_argument("--churn-cycles", type=int, default=500, help="cycles per churn round (500)")
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
    args.clients = sorted(args.clients)
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    factory = loop_factory(args.client_loop)
    runner = asyncio.Runner(loop_factory=factory) if factory else asyncio.Runner()
    with runner:
        results = runner.run(run(args))
    print(report(results, args))
    if args.json:
        results.update({"argv": list(argv or sys.argv[1:]), "versions": _versions(), "env": ENV})
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
