"""A/B orchestration: run a workload against a target and a baseline server, alternately, and compare.

Both servers are started once, up front, with identical uvicorn settings, and stay up for the whole
run; only one is ever under load at a time. For each concurrency level there are ``rounds`` rounds;
each round measures both servers back to back (target first in even rounds, baseline first in odd
rounds, so neither systematically gets the "first" or "second" slot). A measurement opens fresh
connections (not timed), warms up, then counts operations for ``duration`` seconds.

Reported per level: the median rate of each side, the ratio of the medians (target / baseline), and
the range of the per-round ratios (each computed from the two measurements of the same round, which
share the machine's conditions most closely).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._cpu import SystemCpu
from benchmarks._loadgen import LoadError, LoadGenerator, Measurement, Workload
from benchmarks._server import ServerError, ServerProcess, UvicornSettings

#: Above this CPU fraction (of one core, median over rounds) the busiest load-generator process is
#: probably the bottleneck for that side, which compresses the ratio toward 1.
LOADGEN_SATURATED = 0.90
#: Above this CPU fraction (of one core) used by *other* processes during a window, the machine was
#: busy with something else and that level's numbers deserve a re-run.
OTHER_NOISY = 0.25

Log = Callable[[str], None]


def _stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Config:
    """Everything that defines one comparison run."""

    target: str
    baseline: str
    concurrency: tuple[int, ...] = (1, 64)
    rounds: int = 5
    duration: float = 3.0
    warmup: float = 0.5
    clients_procs: int = 1
    client_loop: str = "auto"
    path: str | None = None
    """WebSocket path; ``None`` means the workload's own ``path``."""
    uvicorn: UvicornSettings = field(default_factory=UvicornSettings)
    ready_timeout: float = 30.0
    pin: bool = True
    """Pin servers to the last allowed CPU and the load generator(s) to the others."""
    fresh: bool = True
    """Start a fresh server process for every measurement (no state carried from earlier rounds)."""


@dataclass(frozen=True)
class Round:
    """Both measurements of one round at one concurrency level."""

    index: int
    order: tuple[str, str]
    target: Measurement
    baseline: Measurement

    @property
    def ratio(self) -> float:
        """target rate / baseline rate for this round."""
        return self.target.rate / self.baseline.rate if self.baseline.rate else math.nan


@dataclass(frozen=True)
class LevelResult:
    """All rounds at one concurrency level, and their summary."""

    concurrency: int
    rounds: tuple[Round, ...]

    @property
    def target_median(self) -> float:
        return statistics.median(r.target.rate for r in self.rounds)

    @property
    def baseline_median(self) -> float:
        return statistics.median(r.baseline.rate for r in self.rounds)

    @property
    def ratio(self) -> float:
        """Ratio of the medians: the headline number."""
        return self.target_median / self.baseline_median if self.baseline_median else math.nan

    @property
    def ratio_range(self) -> tuple[float, float]:
        """(min, max) of the per-round ratios."""
        ratios = [r.ratio for r in self.rounds]
        return min(ratios), max(ratios)

    @property
    def round_ratio_median(self) -> float:
        """Median of the per-round ratios (a paired estimate; reported in the JSON)."""
        return statistics.median(r.ratio for r in self.rounds)

    def measurements(self, side: str | None = None) -> list[Measurement]:
        """All measurements of ``side`` (``"target"``/``"baseline"``), or of both."""
        sides = (side,) if side else ("target", "baseline")
        return [getattr(r, s) for r in self.rounds for s in sides]

    def server_us_per_op(self, side: str) -> float:
        """Median server CPU microseconds per operation of ``side`` (server CPU in the window / ops)."""
        return _median_finite(
            m.probe_cpu.get("server", math.nan) / m.rate * 1e6 if m.rate else math.nan for m in self.measurements(side)
        )

    @property
    def cpu_ratio(self) -> float:
        """baseline µs/op / target µs/op: the ratio in server CPU per operation (>1: target cheaper).

        Unlike the rate ratio it does not need the server to be the bottleneck."""
        target = self.server_us_per_op("target")
        return self.server_us_per_op("baseline") / target if target else math.nan

    def server_cpu(self, side: str) -> float:
        """Median CPU use of ``side``'s server process during its windows (fraction of a core)."""
        return _median_finite(m.probe_cpu.get("server", math.nan) for m in self.measurements(side))

    def loadgen_cpu(self, side: str) -> float:
        """Median (over rounds) CPU use of the busiest load-generator process while driving ``side``."""
        return _median_finite(m.loadgen_cpu for m in self.measurements(side))

    @property
    def other_cpu(self) -> float:
        """Highest CPU use by processes outside the benchmark during any window of this level."""
        return _max_finite(other_cpu(m) for m in self.measurements())


def other_cpu(m: Measurement) -> float:
    """CPU used during the window by everything except the server and the load generator(s):
    machine-wide busy time minus theirs (fraction of one core; NaN when unavailable)."""
    system, server = m.probe_cpu.get("system", math.nan), m.probe_cpu.get("server", math.nan)
    other = system - server - m.loadgen_cpu_total
    return other if math.isnan(other) else max(0.0, other)


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def _median_finite(values: Iterable[float]) -> float:
    finite = _finite(values)
    return statistics.median(finite) if finite else math.nan


def _max_finite(values: Iterable[float]) -> float:
    finite = _finite(values)
    return max(finite) if finite else math.nan


# -- running ---------------------------------------------------------------------------------------


def cpu_split() -> tuple[frozenset[int], frozenset[int]]:
    """For ``--pin``: (server CPUs, load-generator CPUs) = (the last allowed CPU, all the others)."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise ServerError(f"--pin needs at least 2 CPUs, this process may use {allowed}")
    return frozenset(allowed[-1:]), frozenset(allowed[:-1])


def compare(workload: Workload, config: Config, log: Log = _stderr_log) -> list[LevelResult]:
    """Run ``workload`` against ``config.target`` and ``config.baseline``, alternating, per level.

    With ``config.fresh`` every measurement gets a new server process (started before, stopped after
    it); otherwise both servers stay up for the whole run.
    """
    path = config.path or workload.path
    server_cpus, loadgen_cpus = cpu_split() if config.pin else (None, None)
    apps = {"target": config.target, "baseline": config.baseline}

    def make(side: str) -> ServerProcess:
        return ServerProcess(apps[side], config.uvicorn, label=side, ready_path=path,
                             ready_timeout=config.ready_timeout, cpus=server_cpus)

    results: list[LevelResult] = []
    with contextlib.ExitStack() as stack:
        loadgen = stack.enter_context(LoadGenerator(config.clients_procs, config.client_loop, loadgen_cpus))
        shared = {} if config.fresh else {side: stack.enter_context(make(side)) for side in apps}
        for conc in config.concurrency:
            rounds: list[Round] = []
            for i in range(config.rounds):
                order = ("target", "baseline") if i % 2 == 0 else ("baseline", "target")
                got: dict[str, Measurement] = {}
                for side in order:
                    with contextlib.ExitStack() as per_round:
                        server = shared[side] if side in shared else per_round.enter_context(make(side))
                        server.check_alive()
                        try:
                            m = loadgen.measure(
                                server.url(path),
                                workload,
                                conc,
                                warmup=config.warmup,
                                duration=config.duration,
                                probes={"server": server.cpu_probe(), "system": SystemCpu()},
                            )
                        except LoadError:
                            server.check_alive()  # a dead server is the better explanation, with its stderr
                            raise
                        server.check_alive()
                    got[side] = m
                    us = m.probe_cpu["server"] / m.rate * 1e6 if m.rate else math.nan
                    log(
                        f"  c={conc:<4} round {i + 1}/{config.rounds} {side:<8} "
                        f"{m.rate:>11,.1f} {workload.unit}  CPU: server {_pct(m.probe_cpu['server']):>4} "
                        f"({us:,.1f} us/op) loadgen {_pct(m.loadgen_cpu):>4} other {_pct(other_cpu(m)):>4}"
                    )
                rounds.append(Round(i, order, got["target"], got["baseline"]))
            level = LevelResult(conc, tuple(rounds))
            lo, hi = level.ratio_range
            log(f"  c={conc:<4} ratio of medians {level.ratio:.3f} (rounds {lo:.3f}-{hi:.3f}), "
                f"server us/op {level.server_us_per_op('target'):.1f}/{level.server_us_per_op('baseline'):.1f}")
            results.append(level)
    return results


# -- reporting -------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x * 100:.0f}%"


def format_table(workload: Workload, config: Config, results: Sequence[LevelResult]) -> str:
    """The human-readable summary table (CPU figures are fractions of one core)."""
    unit = workload.unit
    header = (
        "conc",
        f"target {unit}",
        f"baseline {unit}",
        "ratio",
        "round ratios",
        "server CPU T/B",
        "server us/op T/B",
        "cpu ratio",
        "loadgen CPU T/B",
        "other CPU",
        "",
    )
    rows: list[tuple[str, ...]] = [header]
    notes: dict[str, str] = {}
    for lv in results:
        lo, hi = lv.ratio_range
        flags = ""
        gen_t, gen_b = lv.loadgen_cpu("target"), lv.loadgen_cpu("baseline")
        if max(gen_t, gen_b) >= LOADGEN_SATURATED:
            flags += "!"
            notes["!"] = (
                f"! a load generator used >= {LOADGEN_SATURATED:.0%} of a core (median): that side may be "
                "client-bound, i.e. its rate is a lower bound, which pulls the ratio toward 1 (see README)."
            )
        if lv.other_cpu >= OTHER_NOISY:
            flags += "~"
            notes["~"] = (
                f"~ other processes used >= {OTHER_NOISY:.0%} of a core during some window at this level: "
                "the machine was busy; compare the round ratios, or re-run."
            )
        rows.append(
            (
                str(lv.concurrency),
                f"{lv.target_median:,.1f}",
                f"{lv.baseline_median:,.1f}",
                f"{lv.ratio:.3f}",
                f"{lo:.3f}-{hi:.3f}",
                f"{_pct(lv.server_cpu('target'))}/{_pct(lv.server_cpu('baseline'))}",
                f"{lv.server_us_per_op('target'):.1f}/{lv.server_us_per_op('baseline'):.1f}",
                f"{lv.cpu_ratio:.3f}",
                f"{_pct(gen_t)}/{_pct(gen_b)}",
                _pct(lv.other_cpu),
                flags,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    table = [
        "  ".join([*(c.rjust(w) for c, w in zip(row[:-1], widths, strict=False)), row[-1]]).rstrip() for row in rows
    ]
    lines = [
        f"{workload.name}: {unit}, median of {config.rounds} rounds x {config.duration:g} s "
        f"(warmup {config.warmup:g} s), {config.clients_procs} load-generator process(es)",
        f"  target   = {config.target}",
        f"  baseline = {config.baseline}",
        "  ratio    = target median / baseline median (>1: target faster); round ratios = min-max per round",
        "  CPU      = % of one core in the windows: server & busiest loadgen process (medians), other processes (max)",
        "  us/op    = server CPU microseconds per operation (medians); cpu ratio = baseline us/op / target us/op",
        f"  servers  = {'fresh per measurement' if config.fresh else 'one per side for the whole run'}, "
        f"{'pinned to one CPU, load generator on the others' if config.pin else 'not pinned'}",
        "",
        *table,
    ]
    if notes:
        lines += ["", *notes.values()]
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in (
        "llmgine-ws",
        "uvicorn",
        "starlette",
        "websockets",
        "msgspec",
        "anyio",
        "uvloop",
        "httptools",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def to_json(workload: Workload, config: Config, results: Sequence[LevelResult], argv: Sequence[str]) -> dict[str, Any]:
    """A JSON-serialisable record of the run: environment, settings, summary and every round."""

    def num(x: float) -> float | None:
        return None if math.isnan(x) else x

    def meas(m: Measurement) -> dict[str, Any]:
        return {
            "ops": m.ops,
            "rate": m.rate,
            "server_cpu": num(m.probe_cpu.get("server", math.nan)),
            "loadgen_cpu_max": m.loadgen_cpu,
            "loadgen_cpu_total": m.loadgen_cpu_total,
            "other_cpu": num(other_cpu(m)),
        }

    return {
        "benchmark": workload.name,
        "unit": workload.unit,
        "argv": list(argv),
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": _versions(),
        "uvicorn": config.uvicorn.describe(),
        "config": {
            "target": config.target,
            "baseline": config.baseline,
            "path": config.path or workload.path,
            "concurrency": list(config.concurrency),
            "rounds": config.rounds,
            "duration": config.duration,
            "warmup": config.warmup,
            "clients_procs": config.clients_procs,
            "client_loop": config.client_loop,
            "pin": config.pin,
            "fresh": config.fresh,
            "servers": ("a fresh server per measurement" if config.fresh
                        else "both up for the whole run, measured alternately (one under load at a time)"),
            "order": "target first in even rounds, baseline first in odd rounds",
        },
        "levels": [
            {
                "concurrency": lv.concurrency,
                "target_median": lv.target_median,
                "baseline_median": lv.baseline_median,
                "ratio": lv.ratio,
                "ratio_min": lv.ratio_range[0],
                "ratio_max": lv.ratio_range[1],
                "round_ratio_median": lv.round_ratio_median,
                "server_us_per_op": {s: num(lv.server_us_per_op(s)) for s in ("target", "baseline")},
                "cpu_ratio": num(lv.cpu_ratio),
                "server_cpu_median": {s: num(lv.server_cpu(s)) for s in ("target", "baseline")},
                "loadgen_cpu_median": {s: num(lv.loadgen_cpu(s)) for s in ("target", "baseline")},
                "other_cpu_max": num(lv.other_cpu),
                "rounds": [
                    {
                        "round": r.index,
                        "order": list(r.order),
                        "ratio": r.ratio,
                        "target": meas(r.target),
                        "baseline": meas(r.baseline),
                    }
                    for r in lv.rounds
                ],
            }
            for lv in results
        ],
    }


# -- command line ----------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser(
    description: str,
    *,
    default_target: str = "llmgine_ws.main:app",
    default_baseline: str = "benchmarks.bare_echo:app",
) -> argparse.ArgumentParser:
    """The options every A/B benchmark script shares."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=default_target, help="system under test, ASGI import string (%(default)s)")
    p.add_argument("--baseline", default=default_baseline, help="baseline ASGI import string (%(default)s)")
    p.add_argument("--concurrency", type=_positive_int, nargs="+", default=[1, 64], help="connection counts (1 64)")
    p.add_argument("--rounds", type=_positive_int, default=5, help="A/B rounds per level (5)")
    p.add_argument("--duration", type=_positive_float, default=3.0, help="measured seconds per run (3)")
    p.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each window (0.5)")
    p.add_argument(
        "--clients-procs",
        type=_positive_int,
        default=1,
        help="load-generator processes sharing the connections; counts are summed (1)",
    )
    p.add_argument(
        "--client-loop",
        choices=["auto", "asyncio", "uvloop"],
        default="auto",
        help="load-generator event loop",
    )
    p.add_argument("--path", default=None, help="WebSocket path (default: the workload's, /api/ws)")
    p.add_argument("--ws", default="auto", help="uvicorn --ws for both servers (auto)")
    p.add_argument("--loop", default="auto", help="uvicorn --loop for both servers (auto)")
    p.add_argument("--http", default="auto", help="uvicorn --http for both servers (auto)")
    p.add_argument("--lifespan", default="auto", choices=["auto", "on", "off"], help="uvicorn --lifespan (auto)")
    p.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin each server to the last CPU and the load generator(s) to the others (pinned by default)",
    )
    p.add_argument("--pin", dest="pin", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--reuse-servers",
        dest="fresh",
        action="store_false",
        help="one server per side for the whole run instead of a fresh one per measurement",
    )
    p.add_argument("--ready-timeout", type=_positive_float, default=30.0, help="server start deadline, s (30)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write results as JSON here")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """Build a :class:`Config` from :func:`build_parser`'s namespace."""
    return Config(
        target=args.target,
        baseline=args.baseline,
        concurrency=tuple(args.concurrency),
        rounds=args.rounds,
        duration=args.duration,
        warmup=max(0.0, args.warmup),
        clients_procs=args.clients_procs,
        client_loop=args.client_loop,
        path=args.path,
        uvicorn=UvicornSettings(ws=args.ws, loop=args.loop, http=args.http, lifespan=args.lifespan),
        ready_timeout=args.ready_timeout,
        pin=args.pin,
        fresh=args.fresh,
    )


def main(
    workload: Workload,
    description: str,
    argv: Sequence[str] | None = None,
    *,
    default_target: str = "llmgine_ws.main:app",
    default_baseline: str = "benchmarks.bare_echo:app",
) -> int:
    """Entry point for a benchmark script: parse options, compare, print the table, write JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(description, default_target=default_target, default_baseline=default_baseline)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    try:
        results = compare(workload, config)
    except (ServerError, LoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(format_table(workload, config, results))
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(workload, config, results, argv), indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0
