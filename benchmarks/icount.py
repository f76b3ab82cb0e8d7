"""CPU instructions per operation on the server, counted by valgrind's callgrind: a low-noise measure
for a shared, loaded machine, where wall-clock rates move by ±10% from one minute to the next.

For each workload and side (target, baseline) the server runs under ``valgrind --tool=callgrind``
twice, once doing ``--ops`` operations and once ``2 × --ops``; each run's total instruction count
includes start-up, warm-up and shutdown, which are the same in both, so
``(I(2n) − I(n)) / n`` is the server's instructions per operation. Reported with the cost ratio
target/baseline (``T/B``: 2.0 means the target executes twice the baseline's instructions per
operation). The client runs natively, outside valgrind.

Workloads (each with its own target and baseline app, as in the timed benchmarks):

* ``ping``    W1: ``ping`` → ``ping_res`` round trips, ``--conns`` connections in parallel
* ``ask``     W2: ``send_to_app_and_wait`` → ``server_response`` round trips (``benchmarks.ask_app``)
* ``connect`` W5: connection set-up to ``connected`` (an operation = one connection)
* ``fanout``  W3: one broadcast to ``--fanout-clients`` connections (an operation = one delivery)

    .venv/bin/python benchmarks/icount.py --workloads ping ask connect fanout --ops 2000

It is slow (everything on the server runs ~50× slower under callgrind): minutes, not seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._rawws import RawWS, open_ws, raise_fd_limit
from benchmarks._server import ServerProcess, UvicornSettings
from benchmarks.fanout import ENV, HOST, PATH

APPS: dict[str, tuple[str, str]] = {
    "ping": ("llmgine_ws.main:app", "benchmarks.bare_echo:app"),
    "ask": ("benchmarks.ask_app:app", "benchmarks.bare_ask:app"),
    "connect": ("llmgine_ws.main:app", "benchmarks.bare_echo:app"),
    "fanout": ("benchmarks.fanout_app:app", "benchmarks.bare_fanout:app"),
}


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- workloads: (port, ops, args) -> None; the server does `ops` operations -----------------------


async def _ping(port: int, ops: int, args: argparse.Namespace) -> None:
    clients = [await open_ws(HOST, port, PATH) for _ in range(args.conns)]

    async def loop(ws: RawWS, count: int) -> None:
        for i in range(count):
            ws.send({"type": "ping", "message_id": str(i), "data": {"timestamp": "2024-01-01T00:00:00Z"}})
            while (await ws.receive()).get("type") != "ping_res":
                pass

    await asyncio.gather(*(loop(ws, ops // len(clients)) for ws in clients))
    await asyncio.gather(*(ws.close() for ws in clients))


async def _ask(port: int, ops: int, args: argparse.Namespace) -> None:
    clients = [await open_ws(HOST, port, PATH) for _ in range(args.conns)]

    async def loop(ws: RawWS, count: int) -> None:
        ws.send({"type": "bench_ask", "message_id": "go", "data": {}})
        answered = 0
        while answered < count:
            message = await ws.receive()
            if message.get("type") == "server_request":
                answered += 1
                if answered < count:  # the last one stays unanswered: the server waits, then sees us go
                    ws.send({"type": "server_response", "message_id": message["message_id"],
                             "data": {"response_type": "bench"}})

    await asyncio.gather(*(loop(ws, ops // len(clients)) for ws in clients))
    await asyncio.gather(*(ws.close() for ws in clients))


async def _connect(port: int, ops: int, args: argparse.Namespace) -> None:
    clients: list[RawWS] = []
    remaining = ops

    async def opener() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            clients.append(await open_ws(HOST, port, PATH))

    await asyncio.gather(*(opener() for _ in range(16)))
    for ws in clients:
        ws.abort()


async def _fanout(port: int, ops: int, args: argparse.Namespace) -> None:
    n = args.fanout_clients
    got = 0
    done: asyncio.Future[None] | None = None
    target = 0

    def on_message(ws: RawWS, message: Any) -> None:
        nonlocal got
        if message.get("type") == "fanout":
            got += 1
            if done is not None and got >= target and not done.done():
                done.set_result(None)

    clients = [await open_ws(HOST, port, PATH, on_message=on_message) for _ in range(n)]
    reader, writer = await asyncio.open_connection(HOST, port)
    for seq in range(max(1, ops // n)):
        target = (seq + 1) * n
        done = asyncio.get_running_loop().create_future()
        body = json.dumps({"seq": seq, "pad": 64}).encode()
        writer.write(f"POST /broadcast HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        await asyncio.wait_for(done, 600)
    writer.close()
    for ws in clients:
        ws.abort()


WORKLOADS: dict[str, Callable[[int, int, argparse.Namespace], Awaitable[None]]] = {
    "ping": _ping, "ask": _ask, "connect": _connect, "fanout": _fanout,
}


def _instructions(path: Path) -> int:
    """The ``totals:`` (or ``summary:``) line of a callgrind output file."""
    text = path.read_text(errors="replace")
    match = re.search(r"^(?:totals|summary):\s+(\d+)", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no instruction total in {path}")
    return int(match.group(1))


def run_once(app: str, workload: str, ops: int, args: argparse.Namespace, label: str) -> int:
    """Instructions of a whole server run (start, ``ops`` operations, stop) under callgrind."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("icount: valgrind is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="icount-") as tmp:
        out = Path(tmp) / "callgrind.out"
        wrapper = (valgrind, "-q", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-line=no",
                   "--compress-strings=no")
        settings = UvicornSettings(ws=args.ws, loop=args.loop, http=args.http, lifespan="on")
        with ServerProcess(app, settings, label=label, ready_path=PATH, ready_timeout=300, wrapper=wrapper) as server:
            assert server.port is not None
            asyncio.run(WORKLOADS[workload](server.port, ops, args))
            server.check_alive()
        return _instructions(out)


def measure(workload: str, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"workload": workload, "ops": args.ops}
    unit_ops = args.ops if workload != "fanout" else max(1, args.ops // args.fanout_clients) * args.fanout_clients
    apps = APPS[workload] if not args.target else (args.target, args.baseline)
    for side, app in zip(("target", "baseline"), apps, strict=True):
        if side == "baseline" and args.baseline_per_op is not None:  # known from an earlier run
            result[side] = {"per_op": args.baseline_per_op}
            continue
        small = run_once(app, workload, args.ops, args, f"{side}-{workload}-n")
        large = run_once(app, workload, 2 * args.ops, args, f"{side}-{workload}-2n")
        per_op = (large - small) / unit_ops
        result[side] = {"instructions_n": small, "instructions_2n": large, "per_op": per_op}
        log(f"  {workload:<8} {side:<8} {per_op:>12,.0f} instructions/op  (runs: {small:,} / {large:,})")
    result["ratio"] = result["target"]["per_op"] / result["baseline"]["per_op"]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["ping", "ask", "connect", "fanout"], choices=list(WORKLOADS))
    p.add_argument("--ops", type=int, default=2000, help="operations of the first run; the second does twice (2000)")
    p.add_argument("--conns", type=int, default=1, help="connections for ping/ask (1)")
    p.add_argument("--fanout-clients", type=int, default=200, help="connections receiving each broadcast (200)")
    p.add_argument("--target", default=None, help="override the target app (for every workload)")
    p.add_argument("--baseline", default=None, help="override the baseline app (with --target)")
    p.add_argument("--baseline-per-op", type=float, default=None,
                   help="skip the baseline runs and use this figure (from an earlier run of the same workload)")
    p.add_argument("--ws", default="auto")
    p.add_argument("--loop", default="auto")
    p.add_argument("--http", default="auto")
    p.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = p.parse_args(argv)
    if bool(args.target) != bool(args.baseline):
        p.error("--target and --baseline go together")
    for key, value in {**ENV, "PYTHONHASHSEED": "0"}.items():
        os.environ.setdefault(key, value)
    raise_fd_limit(4 * args.fanout_clients + 1000)
    results = [measure(w, args) for w in args.workloads]
    print(f"server instructions per operation under callgrind (I(2n) - I(n)) / n, n = {args.ops}")
    print(f"{'workload':<9} {'target':>12} {'baseline':>12} {'T/B':>6}")
    for r in results:
        target, baseline = r["target"]["per_op"], r["baseline"]["per_op"]
        print(f"{r['workload']:<9} {target:>12,.0f} {baseline:>12,.0f} {r['ratio']:>6.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
