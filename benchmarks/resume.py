"""Resume: what it costs while nothing drops, and how fast 1,000 detached apps come back.

1. Throughput with resume on vs off, side by side (the harness of ``roundtrip.py``, server pinned to
   one core, load on the others): W1 ping round trips and engine streaming (100-event commands),
   both from a client that acks every 64 frames like the Python client. *target* is the app with
   resume on (every frame kept until acked), *baseline* the same app with resume off (the acks change
   nothing). The headline is the ratio of medians (goal: >= 0.9).
2. Resume latency: ``--apps`` connections (1,000) each ack, get one frame they do not ack, and drop
   (TCP abort, no close frame); once the server shows them all detached, all reconnect at once and
   send ``resume``. Per app: from the start of its reconnect to its first replayed frame; the table
   gives median, p90, p99 and max, and the wall time until every app had its replay.

    .venv/bin/python benchmarks/resume.py --duration 3 --rounds 3 --concurrency 1 64 --apps 1000
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from websockets.asyncio.client import ClientConnection, connect

from benchmarks._harness import build_parser, compare, config_from_args, cpu_split, format_table
from benchmarks._loadgen import LoadError
from benchmarks._rawws import raise_fd_limit
from benchmarks._server import ServerError, ServerProcess
from benchmarks.workloads import AckingEngineStreamWorkload, AckingPingWorkload

ON = "benchmarks.resume_app:on"
OFF = "benchmarks.resume_app:off"


async def _open(url: str) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(url, max_size=None, compression=None, open_timeout=60, ping_interval=None)
    connected = json.loads(await ws.recv())
    assert connected["type"] == "connected", connected
    return ws, connected["data"]


async def _prepare(url: str, index: int) -> tuple[str, str]:
    """One app: ack 0, get one frame (seq 1, not acked), then drop. Returns (app_id, token)."""
    ws, data = await _open(url)
    await ws.send(json.dumps({"type": "ack", "message_id": "a", "data": {"seq": 0}}))
    await ws.send(json.dumps({"type": "ping", "message_id": f"p{index}", "data": {}}))
    reply = json.loads(await ws.recv())
    assert reply.get("seq") == 1, reply
    ws.transport.abort()  # a drop: no close frame
    return data["app_id"], data["resume_token"]


async def _resume(url: str, app_id: str, token: str, start: asyncio.Event) -> float:
    """Reconnect and resume; seconds from the start of the reconnect to the first replayed frame."""
    await start.wait()
    began = time.perf_counter()
    ws, _ = await _open(url)
    try:
        await ws.send(json.dumps({"type": "resume", "message_id": "r",
                                  "data": {"app_id": app_id, "resume_token": token, "last_seq": 0}}))
        answer = json.loads(await ws.recv())
        if answer["type"] != "resume_res" or not answer["data"]["resumed"]:
            raise LoadError(f"resume refused: {answer}")
        first = json.loads(await ws.recv())
        if first.get("seq") != 1:
            raise LoadError(f"expected the replayed frame seq 1, got {first}")
        return time.perf_counter() - began
    finally:
        await ws.close()


async def _detached(http_port: int, count: int, timeout: float) -> None:
    """Wait until the server reports ``count`` detached apps (its /health/ready counts)."""
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as http:
        while True:
            detached = (await http.get("/health/ready")).json().get("detached_apps", 0)
            if detached >= count:
                return
            if time.monotonic() > deadline:
                raise LoadError(f"only {detached} of {count} apps detached")
            await asyncio.sleep(0.05)  # polling an external process: there is no event to wait on


async def _latency_run(port: int, apps: int) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{port}/api/ws"
    limit = asyncio.Semaphore(200)  # handshakes in flight while preparing (the kernel backlog is finite)

    async def prepare(index: int) -> tuple[str, str]:
        async with limit:
            return await _prepare(url, index)

    prepared = await asyncio.gather(*(prepare(i) for i in range(apps)))
    await _detached(port, apps, timeout=60)
    start = asyncio.Event()
    tasks = [asyncio.ensure_future(_resume(url, app_id, token, start)) for app_id, token in prepared]
    await asyncio.sleep(0)
    began = time.perf_counter()
    start.set()
    latencies = sorted(await asyncio.gather(*tasks))
    wall = time.perf_counter() - began

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, math.ceil(p * len(latencies)) - 1)] * 1000

    return {"apps": apps, "median_ms": statistics.median(latencies) * 1000, "p90_ms": pct(0.90),
            "p99_ms": pct(0.99), "max_ms": latencies[-1] * 1000, "wall_s": wall}


def resume_latency(apps: int, pin: bool, uvicorn: Any) -> dict[str, Any]:
    """Part 2 against a fresh server with resume on (pinned like the throughput part)."""
    raise_fd_limit(4 * apps + 256)
    server_cpus, _ = cpu_split() if pin else (None, None)
    if pin:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpu_split()[1])
    with ServerProcess(ON, uvicorn, label="resume-on", cpus=server_cpus) as server:
        assert server.port is not None
        return asyncio.run(_latency_run(server.port, apps))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("LLMGINE_API_LOG_LEVEL", "warning")
    os.environ.setdefault("LLMGINE_API_MAX_CONNECTIONS", "100000")
    parser = build_parser(__doc__ or "", default_target=ON, default_baseline=OFF)
    parser.set_defaults(rounds=3)
    parser.add_argument("--events", type=int, default=100, help="events per engine command (100)")
    parser.add_argument("--apps", type=int, default=1000, help="detached apps resuming at once (1000)")
    parser.add_argument("--skip-throughput", action="store_true", help="only the resume latency part")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    record: dict[str, Any] = {"throughput": [], "latency": None}
    try:
        if not args.skip_throughput:
            for workload in (AckingPingWorkload(), AckingEngineStreamWorkload(args.events)):
                results = compare(workload, config)
                print(format_table(workload, config, results))
                print()
                record["throughput"].append({"workload": workload.name, "levels": [
                    {"concurrency": level.concurrency, "ratio": level.ratio, "range": list(level.ratio_range)}
                    for level in results]})
        if args.apps > 0:
            latency = resume_latency(args.apps, config.pin, config.uvicorn)
            record["latency"] = latency
            print(f"resume latency, {latency['apps']} detached apps resuming at once (reconnect -> first "
                  f"replayed frame): median {latency['median_ms']:.1f} ms, p90 {latency['p90_ms']:.1f} ms, "
                  f"p99 {latency['p99_ms']:.1f} ms, max {latency['max_ms']:.1f} ms; all resumed in "
                  f"{latency['wall_s']:.2f} s")
    except (ServerError, LoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

