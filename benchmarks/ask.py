"""Server→client awaited round trips (W2): ``send_to_app_and_wait`` → ``server_response``, llmgine_ws
vs the same exchange hand-written on bare Starlette + msgspec, side by side.

Each connection asks the server to start a closed loop of server requests on it; the client answers
each at once. One operation = one answered request. See benchmarks/README.md.

    .venv/bin/python benchmarks/ask.py --duration 3 --rounds 3 --concurrency 1 16
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import main
from benchmarks.workloads import ServerRequestWorkload

if __name__ == "__main__":
    os.environ.setdefault("LLMGINE_API_RATE_LIMIT", "0")
    os.environ.setdefault("LLMGINE_API_LOG_LEVEL", "warning")  # no INFO line per connection, like the bare apps
    os.environ.setdefault("LLMGINE_API_MAX_CONNECTIONS_PER_IP", "100000")  # 256 connections from 127.0.0.1
    os.environ.setdefault("LLMGINE_API_PING_INTERVAL", "0")
    sys.exit(main(ServerRequestWorkload(), description=__doc__ or "",
                  default_target="benchmarks.ask_app:app", default_baseline="benchmarks.bare_ask:app"))
