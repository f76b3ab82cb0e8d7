"""The load generator: workloads, measurement windows, and in-process / multi-process drivers.

A :class:`Workload` says what *one* WebSocket connection does; :meth:`Workload.run` is the coroutine
factory called once per connection, and returns how many operations that connection completed inside
the measurement window. A :class:`LoadGenerator` opens the connections (not timed), starts every
connection at the same instant, lets them warm up, counts operations during ``duration`` seconds, and
reports the sum as a :class:`Measurement`.

Timing uses ``time.monotonic()``, which on Linux is a system-wide clock (``CLOCK_MONOTONIC``), so the
window a parent process hands to its load-generator subprocesses means the same interval in all of
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar

from websockets.asyncio.client import ClientConnection, connect

#: A zero-argument callable returning a cumulative CPU-seconds figure (see ``benchmarks._cpu``).
#: Must be picklable to be used with ``--clients-procs`` > 1.
Probe = Callable[[], float]


class LoadError(RuntimeError):
    """A measurement could not be completed (connection failure, workload error, timeout)."""


# -- workload API -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """The measured interval ``[start, end)`` in ``time.monotonic()`` seconds (after the warm-up)."""

    start: float
    end: float

    @property
    def duration(self) -> float:
        """Length of the measured interval in seconds."""
        return self.end - self.start

    def measuring(self, now: float | None = None) -> bool:
        """True while inside the measured interval: operations completing now should be counted."""
        t = time.monotonic() if now is None else now
        return self.start <= t < self.end

    def over(self, now: float | None = None) -> bool:
        """True once the measured interval has ended: closed loops should stop issuing operations."""
        return (time.monotonic() if now is None else now) >= self.end


@dataclass(frozen=True)
class ConnContext:
    """What a connection's coroutine knows about its place in the measurement."""

    index: int
    """Global connection index, ``0 <= index < total``, unique across load-generator processes."""
    total: int
    """Total number of connections in this measurement (all processes)."""
    window: Window


async def recv_in_window(ws: ClientConnection, window: Window) -> bytes | None:
    """Receive one message (undecoded bytes), or ``None`` once the window has ended.

    For workloads whose connections only *receive* (e.g. broadcast fan-out): a receiver blocked in
    ``recv()`` when the sender stops would otherwise wait for a message that never comes. Cancelling
    ``recv()`` is safe in ``websockets.asyncio``: no message is lost.
    """
    remaining = window.end - time.monotonic()
    if remaining <= 0:
        return None
    try:
        async with asyncio.timeout(remaining):
            data = await ws.recv(decode=False)
    except TimeoutError:
        return None
    return data if isinstance(data, bytes) else data.encode()


class Workload(ABC):
    """What every connection of a measurement does. Subclass and implement :meth:`run`.

    Instances are pickled to load-generator subprocesses, so keep them small and picklable and define
    them in an importable module (not ``__main__``). Keep per-connection state local to :meth:`run`.
    """

    name: ClassVar[str] = "workload"
    unit: ClassVar[str] = "ops/s"
    path: ClassVar[str] = "/api/ws"

    async def on_connect(self, ws: ClientConnection, index: int) -> None:  # noqa: B027 - optional hook
        """Called once per connection right after the handshake, before timing starts (e.g. to read
        a greeting). Default: nothing."""

    @abstractmethod
    async def run(self, ws: ClientConnection, ctx: ConnContext) -> int:
        """Drive one connection until ``ctx.window.over()``; return the number of operations that
        completed while ``ctx.window.measuring()``."""


# -- one measurement, inside one process -------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One load-generator process's share of a measurement."""

    url: str
    workload: Workload
    connections: int
    first_index: int
    total: int
    warmup: float
    duration: float
    probes: Mapping[str, Probe] = field(default_factory=dict)
    """Named probes sampled at the window's edges (only one process of a measurement gets them)."""
    open_timeout: float = 15.0
    grace: float = 10.0
    """Seconds after the window's end allowed for in-flight operations before the job fails."""


@dataclass(frozen=True)
class JobResult:
    """What one load-generator process measured."""

    ops: int
    cpu: float
    """This process's CPU use over the window, as a fraction of one core."""
    probe_cpu: dict[str, float]
    """Each probe's CPU use over the window, as a fraction of one core."""


#: Called once all of a job's connections are open; returns the monotonic start time (t0).
SyncPoint = Callable[[], Awaitable[float]]


async def _start_now() -> float:
    return time.monotonic()


async def _sample_cpu(window: Window, probes: Mapping[str, Probe]) -> tuple[float, dict[str, float]]:
    """Sample this process's CPU time and each probe at the window's edges; return core fractions."""
    await asyncio.sleep(max(0.0, window.start - time.monotonic()))
    w0, c0, p0 = time.monotonic(), time.process_time(), {k: p() for k, p in probes.items()}
    await asyncio.sleep(max(0.0, window.end - time.monotonic()))
    w1, c1, p1 = time.monotonic(), time.process_time(), {k: p() for k, p in probes.items()}
    wall = max(w1 - w0, 1e-9)
    return (c1 - c0) / wall, {k: (p1[k] - p0[k]) / wall for k in probes}


async def drive(job: Job, sync: SyncPoint = _start_now) -> JobResult:
    """Open ``job.connections`` connections, wait for ``sync()``, run the workload, close them."""
    workload = job.workload
    conns: list[ClientConnection] = []

    async def open_one(index: int) -> None:
        ws = await connect(
            job.url,
            compression=None,
            proxy=None,
            ping_interval=None,
            open_timeout=job.open_timeout,
            close_timeout=2.0,
            max_size=None,
        )
        conns.append(ws)
        await workload.on_connect(ws, index)

    try:
        try:
            async with asyncio.timeout(job.open_timeout * 2), asyncio.TaskGroup() as tg:
                for i in range(job.connections):
                    tg.create_task(open_one(job.first_index + i))
        except TimeoutError:
            raise LoadError(f"timed out opening {job.connections} connections to {job.url}") from None
        except ExceptionGroup as eg:
            raise LoadError(f"could not open {job.connections} connections to {job.url}: {eg.exceptions[0]!r}") from eg

        t0 = await sync()
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        window = Window(t0 + job.warmup, t0 + job.warmup + job.duration)
        budget = window.end - time.monotonic() + job.grace
        try:
            async with asyncio.timeout(budget), asyncio.TaskGroup() as tg:
                sampler = tg.create_task(_sample_cpu(window, job.probes))
                runs = [
                    tg.create_task(workload.run(ws, ConnContext(job.first_index + i, job.total, window)))
                    for i, ws in enumerate(conns)
                ]
        except TimeoutError:
            raise LoadError(
                f"{workload.name}: connections still busy {job.grace:.0f}s after the window closed"
            ) from None
        except ExceptionGroup as eg:
            raise LoadError(f"{workload.name}: a connection failed: {eg.exceptions[0]!r}") from eg
        cpu, probe_cpu = sampler.result()
        return JobResult(ops=sum(t.result() for t in runs), cpu=cpu, probe_cpu=probe_cpu)
    finally:
        await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)


# -- drivers ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """One measurement of one server: operations counted in the window, and CPU figures."""

    ops: int
    duration: float
    loadgen_cpu: float
    """CPU use of the busiest load-generator process over the window (fraction of one core)."""
    loadgen_cpu_total: float
    """CPU use of all load-generator processes together over the window (fraction of one core)."""
    probe_cpu: dict[str, float] = field(default_factory=dict)
    """CPU use of each named probe over the window (fraction of one core); NaN when unavailable."""

    @property
    def rate(self) -> float:
        """Operations per second."""
        return self.ops / self.duration


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Event loop factory for the load generator: ``asyncio``, ``uvloop`` or ``auto`` (uvloop if
    installed). ``None`` means the default asyncio loop."""
    if name not in {"auto", "asyncio", "uvloop"}:
        raise ValueError(f"unknown client loop {name!r}")
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def split_jobs(
    url: str,
    workload: Workload,
    connections: int,
    procs: int,
    warmup: float,
    duration: float,
    probes: Mapping[str, Probe],
) -> list[Job]:
    """Spread ``connections`` as evenly as possible over at most ``procs`` jobs (probes go to the first)."""
    jobs: list[Job] = []
    first = 0
    for p in range(procs):
        n = connections // procs + (1 if p < connections % procs else 0)
        if n == 0:
            continue
        jobs.append(
            Job(
                url=url,
                workload=workload,
                connections=n,
                first_index=first,
                total=connections,
                warmup=warmup,
                duration=duration,
                probes=dict(probes) if not jobs else {},
            )
        )
        first += n
    return jobs


class LoadGenerator:
    """Runs measurements from this process (``procs == 1``) or from ``procs`` persistent spawned
    subprocesses whose counts are summed. Use as a context manager."""

    def __init__(self, procs: int = 1, client_loop: str = "auto", cpus: frozenset[int] | None = None) -> None:
        if procs < 1:
            raise ValueError("procs must be >= 1")
        self.procs = procs
        self.client_loop = client_loop
        self.cpus = cpus
        self._saved_affinity: set[int] | None = None
        self._runner: asyncio.Runner | None = None
        self._workers: list[tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]]
        self._workers = []

    def __enter__(self) -> LoadGenerator:
        factory = loop_factory(self.client_loop)
        if self.procs == 1:
            if self.cpus:
                self._saved_affinity = os.sched_getaffinity(0)
                os.sched_setaffinity(0, self.cpus)
            self._runner = asyncio.Runner(loop_factory=factory)
        else:
            ctx = multiprocessing.get_context("spawn")
            for i in range(self.procs):
                parent_end, child_end = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker_main,
                    args=(child_end, self.client_loop, self.cpus),
                    name=f"loadgen-{i}",
                    daemon=True,
                )
                proc.start()
                child_end.close()
                self._workers.append((proc, parent_end))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        if self._saved_affinity is not None:
            os.sched_setaffinity(0, self._saved_affinity)
            self._saved_affinity = None
        for _, conn in self._workers:
            with contextlib.suppress(OSError):
                conn.send(None)
        workers, self._workers = self._workers, []
        try:
            for proc, _ in workers:
                proc.join(timeout=5)
        finally:  # also on a second Ctrl-C: never leave a worker behind
            for proc, conn in workers:
                if proc.is_alive():
                    proc.terminate()
                    proc.join()
                conn.close()

    def measure(
        self,
        url: str,
        workload: Workload,
        connections: int,
        *,
        warmup: float,
        duration: float,
        probes: Mapping[str, Probe] | None = None,
    ) -> Measurement:
        """Run one measurement of ``workload`` with ``connections`` connections against ``url``."""
        jobs = split_jobs(url, workload, connections, self.procs, warmup, duration, probes or {})
        if self._runner is not None:
            results = [self._runner.run(drive(jobs[0]))]
        elif self._workers:
            results = self._measure_in_workers(jobs)
        else:
            raise RuntimeError("LoadGenerator used outside its context manager")
        return Measurement(
            ops=sum(r.ops for r in results),
            duration=duration,
            loadgen_cpu=max(r.cpu for r in results),
            loadgen_cpu_total=sum(r.cpu for r in results),
            probe_cpu=results[0].probe_cpu,
        )

    def _measure_in_workers(self, jobs: list[Job]) -> list[JobResult]:
        active = self._workers[: len(jobs)]
        for (_, conn), job in zip(active, jobs, strict=True):
            conn.send(job)
        errors: list[str] = []
        ready = []
        for proc, conn in active:
            msg = _recv(proc, conn, timeout=jobs[0].open_timeout * 2 + 10)
            if msg[0] == "ready":
                ready.append((proc, conn))
            else:
                errors.append(msg[1])
        # Everyone starts at the same instant, slightly in the future so the message arrives first;
        # if any process failed to connect, the others are told to abort (None).
        t0 = time.monotonic() + 0.05 if not errors else None
        for _, conn in ready:
            conn.send(t0)
        job = jobs[0]
        deadline = job.warmup + job.duration + job.grace + 15
        results: list[JobResult] = []
        for proc, conn in ready:
            msg = _recv(proc, conn, timeout=deadline)
            if msg[0] == "done":
                results.append(msg[1])
            elif msg[1] != _ABORTED:
                errors.append(msg[1])
        if errors:
            raise LoadError("load-generator process failed:\n" + "\n".join(errors))
        return results


# -- subprocess side --------------------------------------------------------------------------------

_ABORTED = "aborted: another load-generator process failed"


def _recv(
    proc: multiprocessing.process.BaseProcess, conn: multiprocessing.connection.Connection, timeout: float
) -> tuple[Any, ...]:
    """Receive one message from a worker, failing if it dies or stays silent for ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not conn.poll(min(0.5, max(0.0, deadline - time.monotonic()))):
        if not proc.is_alive():
            raise LoadError(f"{proc.name} died (exit code {proc.exitcode})")
        if time.monotonic() >= deadline:
            raise LoadError(f"{proc.name} did not answer within {timeout:.0f}s")
    msg: tuple[Any, ...] = conn.recv()
    return msg


def _worker_main(conn: multiprocessing.connection.Connection, client_loop: str, cpus: frozenset[int] | None) -> None:
    """Load-generator subprocess: run jobs sent by the parent until it sends ``None``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and shuts us down
    if cpus:
        os.sched_setaffinity(0, cpus)

    async def sync() -> float:
        conn.send(("ready",))
        t0: float | None = await asyncio.to_thread(conn.recv)
        if t0 is None:
            raise LoadError(_ABORTED)
        return t0

    with asyncio.Runner(loop_factory=loop_factory(client_loop)) as runner:
        while True:
            try:
                job: Job | None = conn.recv()
            except EOFError:
                return
            if job is None:
                return
            try:
                result = runner.run(drive(job, sync))
            except LoadError as exc:
                conn.send(("error", str(exc)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
            else:
                conn.send(("done", result))
