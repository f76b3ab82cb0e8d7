"""W6 "concurrent LLM answers": how many answers streaming at 50 tokens/s one server core carries.

N sessions on one server process (pinned to one CPU), each with an engine answering one command:
tokens of 4–6 characters at 50 tokens/s for ``--seconds`` (10), in provider-like bursts (5 tokens
every 100 ms, jittered ±20 ms; ``benchmarks/_tokens.py``). This process is the load generator (pinned
to the other CPUs): N raw WebSocket connections on bare asyncio protocols, which note for every token
its *added latency* — receipt time minus the time the provider delivered it (the burst's scheduled
time, carried in the token's text; ``CLOCK_MONOTONIC`` is shared by both processes) — and count the
tokens, so a lost one shows.

Sides, measured one after the other for each N and repetition (order rotating), each on a fresh
server:

* ``coalesced`` ``benchmarks.llm_answers_app:app`` — llmgine_ws, ``engine_event_coalesce_ms`` 25
* ``per-token`` ``benchmarks.llm_answers_app:per_token_app`` — llmgine_ws, one frame per token
* ``bare``      ``benchmarks.bare_llm_answers:app`` — Starlette + msgspec push loop, one frame per token
* ``source``    the ``coalesced`` app with engines that read their token source and emit nothing:
                what the token source itself costs (server CPU), not a contender

A side *holds* N when the median over ``--reps`` of its p99 added latency is below ``--threshold-ms``
(100) and no token was lost in any repetition. On a shared machine, a repetition during which other
processes used more than ``--max-other`` cores (1) is repeated, at most ``--retries`` (2) times.
The table reports, per N and side, the medians of
p50 / p99 / max latency and of server CPU, tokens lost, and frames per token; then the largest N
each side holds. A side that fails at some N is not run at larger N (``--no-early-stop`` to run it).

    .venv/bin/python benchmarks/llm_answers.py --sessions 500 1000 2000 3000 4000 --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import random
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

from benchmarks._cpu import ProcessCpu, SystemCpu
from benchmarks._harness import _versions, cpu_split
from benchmarks._loadgen import loop_factory
from benchmarks._rawws import raise_fd_limit, text_frame
from benchmarks._server import ServerProcess, UvicornSettings
from benchmarks._tokens import BURST, GC_THRESHOLD_ENV, INTERVAL, WRAP, unstamp

HOST = "127.0.0.1"
PATH = "/api/ws"
SIDES = {
    "coalesced": "benchmarks.llm_answers_app:app",
    "per-token": "benchmarks.llm_answers_app:per_token_app",
    "bare": "benchmarks.bare_llm_answers:app",
    "source": "benchmarks.llm_answers_app:app",
}
CONTENDERS = ("coalesced", "per-token", "bare")
HIST_MS = 60_000
"""Latencies are counted in 1 ms buckets up to this; longer ones land in the last bucket."""


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- the load generator's connections ---------------------------------------------------------------


class Frame(msgspec.Struct):
    type: str
    message_id: str = ""
    data: msgspec.Raw = msgspec.Raw(b"null")


class Payload(msgspec.Struct):
    text: str = ""


class EventData(msgspec.Struct):
    event_type: str
    payload: Payload | None = None
    coalesced: int = 1


class ResultData(msgspec.Struct):
    status: str
    result: Any = None


_frame = msgspec.json.Decoder(Frame).decode
_event = msgspec.json.Decoder(EventData).decode
_result = msgspec.json.Decoder(ResultData).decode
_encode = msgspec.json.Encoder().encode


@dataclass
class Tally:
    """What every connection of one run received."""

    hist: list[int] = field(default_factory=lambda: [0] * (HIST_MS + 1))
    frames: int = 0
    answered: int = 0
    failed: list[str] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    expected_answers: int = 0
    silent: bool = False
    """The engines read their token source and emit nothing (the ``source`` side)."""


class Answerer(asyncio.Protocol):
    """One client: handshake, a few requests, then one streaming answer counted into the tally."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.handshake = loop.create_future()
        self.replies: dict[str, asyncio.Future[Frame]] = {}
        self.greeted = loop.create_future()
        self.tokens = 0
        self._buffer = bytearray()
        self._upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        for future in (self.handshake, self.greeted, *self.replies.values()):
            if not future.done():
                future.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if not self._upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buffer[: buffer.find(b"\r\n")])
            del buffer[: end + 4]
            if b" 101 " not in status:
                self.handshake.set_exception(ConnectionError(f"handshake refused: {status!r}"))
                return
            self._upgraded = True
            self.handshake.set_result(None)
        now = int(time.monotonic() * 1000)
        tally = self.tally
        hist = tally.hist
        while len(buffer) >= 2:
            opcode, length, offset = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length, offset = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length, offset = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < offset + length:
                return
            payload = bytes(buffer[offset: offset + length])
            del buffer[: offset + length]
            if opcode != 0x1:
                if opcode == 0x8 and self.transport is not None:
                    self.transport.close()
                continue
            frame = _frame(payload)
            if frame.type == "engine_event":
                event = _event(frame.data)
                text = event.payload.text if event.payload is not None else ""
                tally.frames += 1
                for token in text.split("~")[1:]:
                    latency = (now - unstamp(token)) % WRAP
                    hist[latency if latency < HIST_MS else HIST_MS] += 1
                    self.tokens += 1
            elif frame.type == "engine_command_res":
                result = _result(frame.data)
                expected = result.result.get("tokens") if isinstance(result.result, dict) else None
                if result.status != "completed" or (expected != self.tokens and not tally.silent):
                    tally.failed.append(f"{result.status}: {self.tokens} tokens received of {expected}")
                tally.answered += 1
                if tally.answered >= tally.expected_answers:
                    tally.done.set()
            elif frame.type == "connected":
                if not self.greeted.done():
                    self.greeted.set_result(None)
            else:
                future = self.replies.pop(frame.message_id, None)
                if future is not None and not future.done():
                    future.set_result(frame)

    def send(self, message_type: str, message_id: str, data: Any) -> None:
        assert self.transport is not None
        self.transport.write(text_frame(_encode({"type": message_type, "message_id": message_id, "data": data})))

    def request(self, message_type: str, message_id: str, data: Any) -> asyncio.Future[Frame]:
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.replies[message_id] = future
        self.send(message_type, message_id, data)
        return future


async def open_answerer(port: int, tally: Tally) -> Answerer:
    """Connect, upgrade, read the greeting, create a session and its ``answer`` engine."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await loop.sock_connect(sock, (HOST, port))
    except BaseException:
        sock.close()
        raise
    client = Answerer(tally)
    await loop.create_connection(lambda: client, sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    assert client.transport is not None
    client.transport.write(f"GET {PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           .encode())
    await client.handshake
    await client.greeted
    created = await client.request("create_session", "s", {})
    session_id = msgspec.json.decode(created.data)["session_id"]
    engine = await client.request("create_engine", "e", {"session_id": session_id, "engine_type": "answer"})
    if engine.type != "create_engine_res":
        raise RuntimeError(f"create_engine failed: {bytes(engine.data)[:200]!r}")
    client.session_id = session_id  # type: ignore[attr-defined]
    return client


# -- one run -------------------------------------------------------------------------------------------


@dataclass
class Run:
    side: str
    sessions: int
    rep: int
    p50: float
    p99: float
    max: float
    lost: int
    tokens: int
    frames: int
    failed: int
    server_cpu: float
    loadgen_cpu: float
    other_cpu: float


def percentile(hist: Sequence[int], total: int, q: float) -> float:
    """The ``q`` quantile (0..1) of the latencies in ``hist`` (1 ms buckets), in ms."""
    if total == 0:
        return math.nan
    rank = max(1, math.ceil(q * total))
    seen = 0
    for ms, count in enumerate(hist):
        seen += count
        if seen >= rank:
            return float(ms)
    return float(len(hist) - 1)


async def run_one(side: str, n: int, rep: int, args: argparse.Namespace, cpus: frozenset[int] | None) -> Run:
    """One side, N sessions, one fresh server: stream, tally, stop."""
    settings = UvicornSettings(ws=args.ws, loop=args.loop, http=args.http, lifespan="on")
    bursts = round(args.seconds / INTERVAL)
    expected = n * bursts * BURST
    with ServerProcess(SIDES[side], settings, label=side, ready_path=PATH, cpus=cpus) as server:
        assert server.port is not None
        silent = side == "source"
        tally = Tally(expected_answers=n, silent=silent)
        clients: list[Answerer] = []
        try:
            for first in range(0, n, args.connect_batch):
                size = min(args.connect_batch, n - first)
                clients += await asyncio.gather(*(open_answerer(server.port, tally) for _ in range(size)))
            rng = random.Random(rep * 100_003 + n)
            start = time.monotonic() + args.start_delay
            for i, client in enumerate(clients):
                client.send("engine_command", "run", {"session_id": client.session_id,  # type: ignore[attr-defined]
                                                      "command": {"bursts": bursts, "silent": silent,
                                                                  "start": start + rng.uniform(0, INTERVAL)}})
                if i % 500 == 499:
                    await asyncio.sleep(0)  # let the writes go out
            # CPU over the streaming window (all answers running).
            window_start, window_end = start + INTERVAL, start + args.seconds
            await asyncio.sleep(max(0.0, window_start - time.monotonic()))
            probes = {"server": ProcessCpu(server.pid), "system": SystemCpu()}
            w0, c0, p0 = time.monotonic(), time.process_time(), {k: p() for k, p in probes.items()}
            await asyncio.sleep(max(0.0, window_end - time.monotonic()))
            w1, c1, p1 = time.monotonic(), time.process_time(), {k: p() for k, p in probes.items()}
            wall = max(w1 - w0, 1e-9)
            loadgen = (c1 - c0) / wall
            server_cpu = (p1["server"] - p0["server"]) / wall
            other = max(0.0, (p1["system"] - p0["system"]) / wall - server_cpu - loadgen)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(args.grace + INTERVAL * 2):
                    await tally.done.wait()
            server.check_alive()
        finally:
            for client in clients:
                if client.transport is not None:
                    client.transport.abort()
    tokens = sum(tally.hist)
    lost = expected - tokens if not silent else 0
    if silent:
        p50 = p99 = worst = math.nan
    else:
        p50, p99 = percentile(tally.hist, tokens, 0.50), percentile(tally.hist, tokens, 0.99)
        worst = percentile(tally.hist, tokens, 1.0)
    return Run(side, n, rep, p50, p99, worst, lost, tokens, tally.frames,
               len(tally.failed) + (n - tally.answered), server_cpu, loadgen, other)


# -- the sweep ----------------------------------------------------------------------------------------


def summarise(runs: list[Run], threshold: float) -> dict[str, Any]:
    """Medians over the repetitions of one side at one N, and whether the side holds."""
    def med(values: list[float]) -> float:
        finite = [v for v in values if not math.isnan(v)]
        return statistics.median(finite) if finite else math.nan

    p99 = med([r.p99 for r in runs])
    lost = max(r.lost for r in runs)
    failed = max(r.failed for r in runs)
    return {
        "p50": med([r.p50 for r in runs]), "p99": p99, "max": med([r.max for r in runs]),
        "p99_range": (min(r.p99 for r in runs), max(r.p99 for r in runs)),
        "lost": lost, "failed": failed,
        "frames_per_token": med([r.frames / r.tokens if r.tokens else math.nan for r in runs]),
        "server_cpu": med([r.server_cpu for r in runs]), "loadgen_cpu": med([r.loadgen_cpu for r in runs]),
        "other_cpu": max(r.other_cpu for r in runs),
        "holds": p99 < threshold and lost == 0 and failed == 0,
    }


def pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x * 100:.0f}%"


def ms(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:,.0f}"


def format_table(summary: dict[int, dict[str, dict[str, Any]]], args: argparse.Namespace) -> str:
    header = ("N", "side", "p50 ms", "p99 ms (range)", "max ms", "lost", "frames/token", "server CPU",
              "loadgen CPU", "other CPU", "holds")
    rows = [header]
    for n in sorted(summary):
        for side, s in summary[n].items():
            lo, hi = s["p99_range"]
            source = side == "source"
            rows.append((str(n), side, ms(s["p50"]), "—" if source else f"{ms(s['p99'])} ({ms(lo)}–{ms(hi)})",
                         ms(s["max"]), "—" if source else str(s["lost"] + 0),
                         "—" if source else f"{s['frames_per_token']:.2f}", pct(s["server_cpu"]),
                         pct(s["loadgen_cpu"]), pct(s["other_cpu"]),
                         "" if source else ("yes" if s["holds"] else "NO")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        f"W6 concurrent LLM answers: {args.seconds:g} s answers, {BURST} tokens every {INTERVAL * 1000:.0f} ms "
        f"(50 tokens/s), median of {args.reps} rep(s); holds = median p99 < {args.threshold_ms:g} ms and no "
        "lost token",
        f"  garbage collector threshold {args.gc_threshold or 'default (700)'}; "
        f"server pinned to one CPU ({'yes' if not args.no_pin else 'no'}), load generator on the others; "
        "CPU = % of one core over the streaming window (other = the rest of the machine, max)",
        "",
        *("  ".join(c.rjust(w) if i not in (1,) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                           strict=True)))
          for row in rows),
        "",
        "largest N held: " + ", ".join(
            f"{side} {max((n for n in summary if side in summary[n] and summary[n][side]['holds']), default=0):,}"
            for side in CONTENDERS if any(side in summary[n] for n in summary)),
    ]
    return "\n".join(lines)


async def sweep(args: argparse.Namespace) -> dict[str, Any]:
    cpus: frozenset[int] | None = None
    if not args.no_pin:
        server_cpus, loadgen_cpus = cpu_split()
        os.sched_setaffinity(0, loadgen_cpus)
        cpus = server_cpus
    raise_fd_limit(4 * max(args.sessions) + 1000)
    sides = [side for side in args.sides if side in SIDES]
    stopped: set[str] = set()
    runs: list[Run] = []
    summary: dict[int, dict[str, dict[str, Any]]] = {}
    for n in sorted(args.sessions):
        active = [side for side in sides if side not in stopped]
        if not [side for side in active if side != "source"]:
            break
        per_side: dict[str, list[Run]] = {side: [] for side in active}
        for rep in range(args.reps):
            order = active[rep % len(active):] + active[: rep % len(active)]
            for side in order:
                if side == "source" and rep > 0:
                    continue  # one measurement of the source is enough
                for attempt in range(args.retries + 1):
                    run = await run_one(side, n, rep, args, cpus)
                    if run.other_cpu <= args.max_other or attempt == args.retries:
                        break
                    log(f"  N={n:<5} rep {rep + 1}/{args.reps} {side:<9} other processes used {pct(run.other_cpu)} "
                        f"(> {pct(args.max_other)}): repeated (p99 was {ms(run.p99)} ms)")
                per_side[side].append(run)
                runs.append(run)
                log(f"  N={n:<5} rep {rep + 1}/{args.reps} {side:<9} p50 {ms(run.p50):>5} ms  p99 {ms(run.p99):>6} ms"
                    f"  max {ms(run.max):>6} ms  lost {run.lost}  failed {run.failed}  frames {run.frames:,}"
                    f"  server {pct(run.server_cpu)} loadgen {pct(run.loadgen_cpu)} other {pct(run.other_cpu)}")
        summary[n] = {side: summarise(per_side[side], args.threshold_ms) for side in active if per_side[side]}
        if not args.no_early_stop:
            stopped |= {side for side, s in summary[n].items() if side != "source" and not s["holds"]}
    return {"summary": summary, "runs": [asdict(r) for r in runs]}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[500, 1000, 1500, 2000, 3000, 4000, 5000])
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each answer")
    parser.add_argument("--threshold-ms", type=float, default=100.0)
    parser.add_argument("--start-delay", type=float, default=1.0,
                        help="seconds between sending the commands and the first bursts")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds allowed after the answers' end")
    parser.add_argument("--connect-batch", type=int, default=200)
    parser.add_argument("--no-early-stop", action="store_true")
    parser.add_argument("--max-other", type=float, default=1.0,
                        help="a repetition during which other processes used more than this many cores is "
                             "repeated (the machine is shared)")
    parser.add_argument("--retries", type=int, default=2, help="at most this many repeats of one repetition")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--client-loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    parser.add_argument("--ws", default="auto")
    parser.add_argument("--loop", default="auto")
    parser.add_argument("--http", default="auto")
    parser.add_argument("--gc-threshold", type=int, default=None,
                        help="every server's garbage-collector generation-0 threshold (Python's default: 700)")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gc_threshold is not None:
        os.environ[GC_THRESHOLD_ENV] = str(args.gc_threshold)  # inherited by every server process
    factory = loop_factory(args.client_loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(sweep(args))
    print(format_table(result["summary"], args))
    if args.json is not None:
        record = {"benchmark": "llm-answers", "argv": sys.argv, "versions": _versions(),
                  "cpu_count": os.cpu_count(), "settings": vars(args) | {"json": str(args.json)}, **result}
        args.json.write_text(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
