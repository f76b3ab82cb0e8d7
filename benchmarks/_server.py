"""Server processes under test: start uvicorn in a child process, wait until it answers, measure, stop.

The parent binds ``127.0.0.1:0`` and listens *before* spawning, passes the descriptor to
``benchmarks._serve`` and closes its own copy, so the port is known up front and never raced for.
Readiness is a WebSocket handshake retried until a bounded deadline (never a fixed sleep): a
connection to the pre-bound socket simply waits in the backlog until uvicorn starts accepting, and
if the child dies the socket goes away and the next attempt fails fast.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import connect as sync_connect

from benchmarks._cpu import ProcessCpu

#: Repository root: the child's working directory, so ``benchmarks.*`` and ``llmgine_ws.*`` import.
REPO_ROOT = Path(__file__).resolve().parent.parent


class ServerError(RuntimeError):
    """A server process failed to start, died, or did not become ready in time."""


@dataclass(frozen=True)
class UvicornSettings:
    """uvicorn options shared by *every* server of a comparison (target and baseline alike).

    ``--ws-per-message-deflate false``, ``--no-access-log`` are always applied by ``_serve``.
    """

    ws: str = "auto"
    loop: str = "auto"
    http: str = "auto"
    lifespan: str = "auto"
    log_level: str = "warning"

    def argv(self) -> list[str]:
        """Command-line options for ``benchmarks._serve``."""
        return [
            "--ws", self.ws,
            "--loop", self.loop,
            "--http", self.http,
            "--lifespan", self.lifespan,
            "--log-level", self.log_level,
        ]  # fmt: skip

    def describe(self) -> dict[str, str]:
        """The settings, plus what ``auto`` resolves to in this environment (for the JSON report)."""
        info = {k: str(v) for k, v in asdict(self).items()}
        info["ws_per_message_deflate"] = "false"
        info["access_log"] = "false"
        if self.ws == "auto":
            with contextlib.suppress(Exception):
                from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

                info["ws_resolved"] = getattr(AutoWebSocketsProtocol, "__name__", str(AutoWebSocketsProtocol))
        if self.loop == "auto":
            try:
                import uvloop  # noqa: F401
            except ImportError:
                info["loop_resolved"] = "asyncio"
            else:
                info["loop_resolved"] = "uvloop"
        return info


class ServerProcess:
    """One uvicorn server running ``app`` (an import string) in a child process on 127.0.0.1.

    Use as a context manager; ``__enter__`` returns once the server completes WebSocket handshakes on
    ``ready_path``, or raises :class:`ServerError` (with the tail of the child's stderr).
    """

    def __init__(
        self,
        app: str,
        settings: UvicornSettings,
        *,
        label: str,
        ready_path: str = "/api/ws",
        ready_timeout: float = 30.0,
        cpus: frozenset[int] | None = None,
        wrapper: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.wrapper = wrapper
        """A command the server runs under (e.g. ``valgrind --tool=callgrind``), empty for none."""
        self.cpus = cpus
        self.settings = settings
        self.label = label
        self.ready_path = ready_path
        self.ready_timeout = ready_timeout
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._stderr_reported = False

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> ServerProcess:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Bind a listening socket, spawn the child with it, and close the parent's copy."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            sock.listen(2048)
            self.port = sock.getsockname()[1]
            fd = sock.fileno()
            os.set_inheritable(fd, True)
            # Append mode: the child shares this file offset, and stderr_tail() seeks it.
            self._stderr = tempfile.TemporaryFile(mode="a+b", prefix="bench-server-")  # noqa: SIM115 - closed in stop()
            self._proc = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "benchmarks._serve", self.app, "--fd", str(fd),
                 *self._extra_argv()],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=self._stderr,
                stderr=self._stderr,
                pass_fds=(fd,),
                # Own session: a terminal Ctrl-C reaches only the benchmark, which then stops the
                # server with SIGTERM (and _serve's parent-death signal covers a killed benchmark).
                start_new_session=True,
            )
        finally:
            sock.close()

    def _extra_argv(self) -> list[str]:
        pin = ["--cpus", ",".join(map(str, sorted(self.cpus)))] if self.cpus else []
        return [*self.settings.argv(), "--parent-pid", str(os.getpid()), *pin]

    def wait_ready(self) -> None:
        """Retry a WebSocket handshake on ``ready_path`` until it succeeds or the deadline passes."""
        deadline = time.monotonic() + self.ready_timeout
        last_error: BaseException | None = None
        while True:
            self.check_alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._failure(f"not ready after {self.ready_timeout:.0f}s: {last_error!r}")
            try:
                with sync_connect(
                    self.url(self.ready_path),
                    open_timeout=min(remaining, 2.0),
                    close_timeout=1.0,
                    compression=None,
                    proxy=None,
                ):
                    return
            except InvalidURI:
                raise
            except InvalidStatus as exc:
                # An HTTP answer: the server is up, but refuses WebSocket connections on this path.
                raise self._failure(
                    f"is up but rejected the WebSocket handshake on {self.ready_path!r} with HTTP "
                    f"{exc.response.status_code} (wrong --path, or the app is not ready)"
                ) from None
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                last_error = exc
                # Back-off between attempts, bounded by the deadline; not used as synchronisation.
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def stop(self) -> None:
        """SIGTERM the child (SIGKILL after ``BENCH_STOP_TIMEOUT`` s, 10 by default) and report anything
        it wrote to stderr. Plain uvicorn (no graceful-shutdown timeout) waits for a client that stopped
        reading, so a server of a stalled-client run always takes the whole wait."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=float(os.environ.get("BENCH_STOP_TIMEOUT", "10")))
            except subprocess.TimeoutExpired:
                pass
            finally:  # timed out, or interrupted (a second Ctrl-C): never leave the child behind
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        tail = "" if self._stderr_reported else self.stderr_tail()
        if tail:
            print(f"--- {self.label} server ({self.app}) stderr ---\n{tail}", file=sys.stderr)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    # -- queries -----------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The child's process id (the uvicorn process itself: no shell, no reloader, one worker)."""
        if self._proc is None:
            raise ServerError(f"{self.label} server is not running")
        return self._proc.pid

    def url(self, path: str) -> str:
        """``ws://127.0.0.1:PORT`` + ``path``."""
        if self.port is None:
            raise ServerError(f"{self.label} server has not been started")
        return f"ws://127.0.0.1:{self.port}{path}"

    def cpu_probe(self) -> ProcessCpu:
        """A picklable probe of the server process's cumulative CPU seconds."""
        return ProcessCpu(self.pid)

    def check_alive(self) -> None:
        """Raise :class:`ServerError` if the child has exited."""
        if self._proc is None:
            raise ServerError(f"{self.label} server is not running")
        code = self._proc.poll()
        if code is not None:
            raise self._failure(f"exited with code {code}")

    def _failure(self, what: str) -> ServerError:
        """A :class:`ServerError` carrying the child's stderr tail (then not repeated by ``stop``)."""
        self._stderr_reported = True
        return ServerError(f"{self.label} server ({self.app}) {what}\n{self.stderr_tail()}")

    def stderr_tail(self, max_chars: int = 4000) -> str:
        """The last ``max_chars`` characters the child wrote to stdout/stderr."""
        if self._stderr is None:
            return ""
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - max_chars))
        return self._stderr.read().decode(errors="replace").strip()
