"""Connection setup rate (W5): new WebSocket connections per second, each counted when the server's
``connected`` greeting arrives, llmgine_ws vs the bare Starlette + msgspec app, side by side.

Per round and side: a fresh server process (pinned to one CPU; the client runs on the others),
``--warm`` unmeasured connections first (imports, first-connection caches), then ``--connections``
connections opened by ``--parallel`` concurrent openers, each a TCP connect → HTTP upgrade → read
``connected``; the connections stay open until the round ends (closing them is not measured).
Reported: connections/s (median over rounds, min–max of the per-round ratios) and the server's CPU
microseconds per connection. The client is ``benchmarks._rawws`` (one asyncio protocol per
connection), so the client side costs little next to the server.

    .venv/bin/python benchmarks/connect_rate.py --connections 1000 --parallel 16 --rounds 5
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
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._cpu import ProcessCpu
from benchmarks._harness import _versions, cpu_split
from benchmarks._loadgen import loop_factory
from benchmarks._rawws import RawWS, open_ws, raise_fd_limit
from benchmarks._server import ServerProcess, UvicornSettings
from benchmarks.fanout import ENV, HOST, PATH


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def open_all(port: int, count: int, parallel: int) -> list[RawWS]:
    """Open ``count`` connections with ``parallel`` openers; each returns once ``connected`` arrived."""
    clients: list[RawWS] = []
    remaining = count

    async def opener() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            clients.append(await open_ws(HOST, port, PATH))

    await asyncio.gather(*(opener() for _ in range(parallel)))
    return clients


async def one_round(app: str, settings: UvicornSettings, args: argparse.Namespace, label: str,
                    cpus: frozenset[int] | None) -> tuple[float, float]:
    """(connections per second, server CPU µs per connection) on a fresh server."""
    with ServerProcess(app, settings, label=label, ready_path=PATH, cpus=cpus) as server:
        assert server.port is not None
        warm = await open_all(server.port, args.warm, min(args.parallel, args.warm) or 1)
        cpu = ProcessCpu(server.pid)
        cpu0, t0 = cpu(), time.perf_counter()
        clients = await open_all(server.port, args.connections, args.parallel)
        elapsed, cpu_s = time.perf_counter() - t0, cpu() - cpu0
        server.check_alive()
        for ws in [*warm, *clients]:
            ws.abort()
    return args.connections / elapsed, cpu_s / args.connections * 1e6


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = UvicornSettings(ws=args.ws, loop=args.loop, http=args.http, lifespan="on")
    raise_fd_limit(2 * (args.connections + args.warm) + 1000)
    server_cpus: frozenset[int] | None = None
    if args.pin:
        server_cpus, client_cpus = cpu_split()
        os.sched_setaffinity(0, client_cpus)
    sides: dict[str, dict[str, list[float]]] = {"target": {"rate": [], "us": []}, "baseline": {"rate": [], "us": []}}
    for r in range(args.rounds):
        order = ("target", "baseline") if r % 2 == 0 else ("baseline", "target")
        for side in order:
            rate, us = await one_round(args.target if side == "target" else args.baseline, settings, args, side,
                                       server_cpus)
            sides[side]["rate"].append(rate)
            sides[side]["us"].append(us)
            log(f"  round {r + 1}/{args.rounds} {side:<8} {rate:>9,.0f} connections/s  server {us:,.0f} us/conn")
    ratios = [t / b for t, b in zip(sides["target"]["rate"], sides["baseline"]["rate"], strict=True)]
    return {
        "connections": args.connections, "parallel": args.parallel, "rounds": args.rounds, "sides": sides,
        "target_median": statistics.median(sides["target"]["rate"]),
        "baseline_median": statistics.median(sides["baseline"]["rate"]),
        "ratio": statistics.median(sides["target"]["rate"]) / statistics.median(sides["baseline"]["rate"]),
        "ratio_min": min(ratios), "ratio_max": max(ratios),
        "server_us_per_conn": {s: statistics.median(v["us"]) for s, v in sides.items()},
    }


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    us = results["server_us_per_conn"]
    return "\n".join([
        f"connection setup rate (to `connected`): {results['connections']} connections, {results['parallel']} "
        f"opening at a time; median of {results['rounds']} rounds, a fresh server per round"
        f"{', pinned to one CPU' if args.pin else ''}",
        f"  target   = {args.target}",
        f"  baseline = {args.baseline}",
        "",
        f"{'target conn/s':>13}  {'baseline conn/s':>15}  {'ratio':>5}  {'round ratios':>12}  "
        f"{'server us/conn T/B':>18}",
        f"{results['target_median']:>13,.0f}  {results['baseline_median']:>15,.0f}  {results['ratio']:>5.2f}  "
        f"{results['ratio_min']:>5.2f}-{results['ratio_max']:<6.2f}  {us['target']:>8,.0f}/{us['baseline']:<9,.0f}",
    ])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=1000, help="measured connections per round (1000)")
    p.add_argument("--parallel", type=int, default=16, help="connections being opened at a time (16)")
    p.add_argument("--warm", type=int, default=20, help="unmeasured connections first (20)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per side, each on a fresh server (5)")
    p.add_argument("--target", default="llmgine_ws.main:app")
    p.add_argument("--baseline", default="benchmarks.bare_echo:app")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the server to one CPU")
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
    print(report(results, args))
    if args.json:
        results.update({"argv": list(argv or sys.argv[1:]), "versions": _versions(), "env": ENV})
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
