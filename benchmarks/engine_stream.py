"""Engine event streaming: llmgine_ws engine_event throughput vs a bare Starlette push loop.

Each connection runs commands that stream ``--events`` events each (default 100), back to back; the
table shows events received per second for llmgine_ws (an engine emitting through ``ctx.emit``) and
for a bare Starlette + msgspec loop pushing the same frames, side by side. See benchmarks/README.md.

    .venv/bin/python benchmarks/engine_stream.py --duration 3 --rounds 5 --concurrency 1 64
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import main
from benchmarks.workloads import EngineStreamWorkload

if __name__ == "__main__":
    os.environ.setdefault("LLMGINE_API_RATE_LIMIT", "0")
    os.environ.setdefault("LLMGINE_API_LOG_LEVEL", "warning")  # no INFO line per connection, like the bare apps
    # One frame per event, as the bare loop sends: this measures the per-event cost (coalesced token
    # streams are W6, llm_answers.py).
    os.environ.setdefault("LLMGINE_API_ENGINE_EVENT_COALESCE_MS", "0")
    os.environ.setdefault("LLMGINE_API_MAX_CONNECTIONS_PER_IP", "100000")  # 256 connections from 127.0.0.1
    events = 100
    if "--events" in sys.argv:
        position = sys.argv.index("--events")
        events = int(sys.argv[position + 1])
        del sys.argv[position : position + 2]
    sys.exit(main(EngineStreamWorkload(events), description=__doc__ or "",
                  default_target="benchmarks.engine_app:app", default_baseline="benchmarks.bare_stream:app"))
