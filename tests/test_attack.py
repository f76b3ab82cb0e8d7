"""Smoke test of ``benchmarks/attack.py``: every attack runs (about a second each) against a real server
process, the server survives, and its RSS stays far from what the attacks reached before issue 10."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import pytest

pytestmark = pytest.mark.anyio

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "attack.py"


@pytest.mark.timeout(240)
async def test_the_attack_script_runs_every_attack_and_the_server_holds(tmp_path: Path) -> None:
    report = tmp_path / "attack.json"
    with anyio.fail_after(200):  # ~10 s on an idle machine; five server processes start on a busy one
        result = await anyio.run_process([sys.executable, str(SCRIPT), "--duration", "1", "--json", str(report)],
                                         check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    reports = {entry["attack"]: entry for entry in json.loads(report.read_text())}
    assert set(reports) == {"answers", "closed", "queued", "pingstorm", "slowloris"}
    for name, entry in reports.items():
        assert entry["rss_peak_mib"] < entry["rss_before_mib"] + 150, (name, entry)  # before: +700 MiB and more
        assert "server_died" not in entry["seen"], name
    assert reports["slowloris"]["seen"]["held_at_once"] <= 100  # max_connections_per_ip
