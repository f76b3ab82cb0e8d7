"""CPU probes: cumulative CPU-seconds counters sampled at a measurement window's edges (Linux ``/proc``).

A probe is a picklable zero-argument callable returning cumulative CPU seconds; the load generator
samples it at the start and end of the window and reports ``delta / wall`` (a fraction of one core).
Probes return ``nan`` when the figure is unavailable (non-Linux, process gone).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcessCpu:
    """User + system CPU seconds consumed by process ``pid`` (all its threads)."""

    pid: int

    def __call__(self) -> float:
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return float("nan")
        # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@dataclass(frozen=True)
class SystemCpu:
    """Busy CPU seconds of the whole machine, summed over cores (everything but idle and iowait;
    steal counts as busy, since it is capacity taken from us)."""

    def __call__(self) -> float:
        try:
            with open("/proc/stat") as f:
                line = f.readline()
        except OSError:
            return float("nan")
        # cpu user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
        # already included in user/nice.
        values = [int(v) for v in line.split()[1:9]]
        return (sum(values) - values[3] - values[4]) / _CLK_TCK
