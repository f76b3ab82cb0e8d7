"""Every benchmark script, run tiny (a few seconds each): benchmarks are code and rot like code.

These check that each script runs to its table against the real servers (subprocesses, loopback),
not what it measures: the figures of a run this short mean nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.brokers import nats_server_binary, redis_server_binary

ROOT = Path(__file__).resolve().parent.parent
PIN = [] if len(os.sched_getaffinity(0)) >= 2 else ["--no-pin"]
AB = ["--duration", "0.2", "--warmup", "0.05", "--rounds", "1", *PIN]


def run_script(script: str, *args: str, timeout: float = 90, env: dict[str, str] | None = None) -> str:
    """Run ``benchmarks/<script>`` with ``args``; its stdout (the table), after checking it succeeded."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{script} exited {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


def test_roundtrip() -> None:
    out = run_script("roundtrip.py", *AB, "--concurrency", "1", "4")
    assert "ratio" in out and "us/op" in out


def test_roundtrip_reusing_servers() -> None:
    assert "ratio" in run_script("roundtrip.py", *AB, "--concurrency", "2", "--reuse-servers")


def test_server_request_roundtrip() -> None:
    out = run_script("ask.py", *AB, "--concurrency", "1", "4")
    assert "server-request" in out


def test_engine_stream() -> None:
    assert "events/s" in run_script("engine_stream.py", *AB, "--concurrency", "2", "--events", "10")


def test_llm_answers(tmp_path: Path) -> None:
    """W6, tiny: a few half-second answers per side. The latencies of a run this short mean nothing,
    but a lost token or a failed answer is a bug."""
    record = tmp_path / "w6.json"
    out = run_script("llm_answers.py", "--sessions", "4", "--reps", "1", "--seconds", "0.5",
                     "--start-delay", "0.3", "--grace", "20", "--no-early-stop", "--retries", "0",
                     "--json", str(record), *PIN)
    assert "largest N held" in out
    runs = json.loads(record.read_text())["runs"]
    assert {(run["side"], run["sessions"]) for run in runs} >= {
        (side, 4) for side in ("coalesced", "per-token", "bare", "source")}
    assert all(run["lost"] == 0 and run["failed"] == 0 for run in runs), runs
    coalesced = [run for run in runs if run["side"] == "coalesced"]
    assert all(run["frames"] < run["tokens"] for run in coalesced)  # bursts of 5 share a frame


def test_fanout() -> None:
    # Its stalled-client servers never exit by themselves (plain uvicorn waits for the stalled socket).
    out = run_script("fanout.py", "--clients", "20", "--rounds", "1", "--server-rounds", "1",
                     "--stalled-bare-timeout", "0.5", *PIN, env={"BENCH_STOP_TIMEOUT": "1"})
    assert "llmgine/bare" in out


def test_memory() -> None:
    out = run_script("memory.py", "--clients", "20", "--rounds", "1", "--churn-rounds", "2", "--churn-cycles", "10")
    assert "B/conn" in out


def test_connect_rate() -> None:
    out = run_script("connect_rate.py", "--connections", "30", "--warm", "5", "--rounds", "1", *PIN)
    assert "conn/s" in out


@pytest.mark.parametrize("kind", ["nats", "redis"])
def test_cluster(kind: str) -> None:
    if (nats_server_binary if kind == "nats" else redis_server_binary)() is None:
        pytest.skip(f"no {kind} broker binary")
    # More broadcasts than the default broadcast burst (100): the run that once crashed at this step.
    out = run_script("cluster.py", "--backplane", kind, "--rounds", "1", "--duration", "0.2",
                     "--concurrency", "1", "--clients", "2", "--broadcasts", "150")
    assert f"{kind} backplane" in out


def test_icount() -> None:
    if shutil.which("valgrind") is None:
        pytest.skip("no valgrind (apt-get install valgrind)")
    # The baseline figure given: only the target's two runs under callgrind (~10 s each).
    out = run_script("icount.py", "--workloads", "ping", "--ops", "20", "--baseline-per-op", "100000", timeout=300)
    assert "instructions per operation" in out


def test_resume(tmp_path: Path) -> None:
    """Resume on vs off (W1 and engine streaming, from acking clients) and 20 detached apps resuming."""
    record = tmp_path / "resume.json"
    out = run_script("resume.py", *AB, "--concurrency", "2", "--events", "10", "--apps", "20",
                     "--json", str(record))
    assert "resume latency, 20 detached apps" in out
    result = json.loads(record.read_text())
    assert [entry["workload"] for entry in result["throughput"]] == ["ping+ack", "engine-stream+ack"]
    assert result["latency"]["apps"] == 20
