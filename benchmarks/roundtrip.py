"""Ping round trips per second: llmgine_ws vs a bare Starlette echo, side by side.

Each connection runs a closed loop (send ``ping`` -> wait for its ``ping_res`` -> repeat); the table
shows, per concurrency level, the median req/s of target and baseline over alternating rounds, the
ratio of the medians and the range of per-round ratios. See benchmarks/README.md.

    .venv/bin/python benchmarks/roundtrip.py --duration 3 --rounds 5 --concurrency 1 64
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import main
from benchmarks.workloads import PingWorkload

if __name__ == "__main__":
    # The per-connection rate limit (a security default) would turn a load test into a rate-limit
    # test; liveness pings are irrelevant here. Both are inherited by the server processes.
    os.environ.setdefault("LLMGINE_API_RATE_LIMIT", "0")
    os.environ.setdefault("LLMGINE_API_LOG_LEVEL", "warning")  # no INFO line per connection, like the bare apps
    os.environ.setdefault("LLMGINE_API_MAX_CONNECTIONS_PER_IP", "100000")  # 256 connections from 127.0.0.1
    sys.exit(main(PingWorkload(), description=__doc__ or ""))
