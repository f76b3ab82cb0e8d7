"""Child-process entry point: serve one ASGI app with uvicorn on an inherited, already-listening socket.

Run as ``python -m benchmarks._serve --fd N APP_IMPORT_STRING [uvicorn options]`` by
:class:`benchmarks._server.ServerProcess`. The parent binds and listens on ``127.0.0.1:0`` itself and
passes the descriptor down, so there is no race between choosing a free port and binding it.

The socket is wrapped with ``socket.socket(fileno=fd)`` (family auto-detected) and handed to
``uvicorn.Server.run(sockets=...)``. uvicorn's own ``--fd`` option is deliberately not used: it wraps
the descriptor as ``AF_UNIX``, which makes asyncio skip ``TCP_NODELAY`` on accepted TCP connections and
would distort small-message latency.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence

import uvicorn

_PR_SET_PDEATHSIG = 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the runner's command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("app", help="ASGI app import string, e.g. benchmarks.bare_echo:app")
    parser.add_argument("--fd", type=int, required=True, help="inherited listening socket descriptor")
    parser.add_argument("--ws", default="auto", help="uvicorn --ws implementation")
    parser.add_argument("--loop", default="auto", help="uvicorn --loop implementation")
    parser.add_argument("--http", default="auto", help="uvicorn --http implementation")
    parser.add_argument("--lifespan", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--cpus", default=None, help="pin to these CPUs, comma-separated (e.g. 1)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process dies (Linux)")
    return parser.parse_args(argv)


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux for SIGTERM when the parent dies, so a killed benchmark leaves no server behind."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # it died before prctl took effect
        sys.exit("benchmarks._serve: parent process is gone")


def main(argv: Sequence[str] | None = None) -> None:
    """Serve ``args.app`` until SIGTERM/SIGINT."""
    args = parse_args(argv)
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    if args.cpus:
        # Before uvicorn starts any thread, so every thread inherits the mask.
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    sock = socket.socket(fileno=args.fd)
    config = uvicorn.Config(
        args.app,
        ws=args.ws,
        loop=args.loop,
        http=args.http,
        lifespan=args.lifespan,
        ws_per_message_deflate=False,
        log_level=args.log_level,
        access_log=False,
    )
    server = uvicorn.Server(config)
    profile_dir = os.environ.get("BENCH_CPROFILE_DIR")
    if not profile_dir:
        server.run(sockets=[sock])
        return
    # Profiling aid (docs/performance.md): the whole server run under cProfile, written on exit.
    import cProfile

    def leave(signum: int, frame: object) -> None:  # uvicorn re-raises the signal after its shutdown
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)
    # CPU time, not wall time: a coroutine suspended across the event loop is not charged for waiting.
    profiler = cProfile.Profile(time.process_time)
    try:
        profiler.runcall(server.run, sockets=[sock])
    finally:
        profiler.dump_stats(os.path.join(profile_dir, f"{args.app.replace(':', '.')}-{os.getpid()}.prof"))


if __name__ == "__main__":
    main()
