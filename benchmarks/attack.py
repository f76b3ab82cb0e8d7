"""Attacks on a default server: does one anonymous client still take a node down? (issue 10)

Each attack runs for ``--duration`` seconds against a fresh server process — the CLI (``python -m
llmgine_ws``) with its default limits, serving ``benchmarks.attack_app`` (the default app plus one engine
whose commands wait for the user). The attacker connects from 127.0.0.2; a well-behaved neighbour on
127.0.0.1 does a ``ping`` round trip every 0.2 s throughout. Reported per attack: the server's peak RSS
(sampled every 50 ms from ``/proc``), its RSS before the attack, the bytes it logged, the neighbour's
worst round trip (or how many it missed), and what the attack saw.

* ``answers``    — unsolicited ``server_response`` frames as fast as the socket takes them, reading ~1 MB/s
  (before the fix: 818 MiB, no ``RATE_LIMITED``);
* ``closed``     — ``ping`` frames past the rate limit, and on after the 1008 (before: 110 MB of log);
* ``queued``     — 1 MiB ``engine_command`` frames of ``[[],[],…]`` queued behind a command waiting for
  the user (before: 1,562 MiB);
* ``pingstorm``  — WebSocket PING frames from a client that never reads (before: 771 MiB);
* ``slowloris``  — up to 300 connections trickling their request headers one byte a second (before: all
  300 held for the whole attack despite a per-address cap).

    .venv/bin/python benchmarks/attack.py                        # 20 s each
    .venv/bin/python benchmarks/attack.py --duration 1 --only pingstorm slowloris
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

from benchmarks._rawws import open_ws, rss_bytes
from tests.rawws import OP_PING, OP_TEXT, build_frame

REPO_ROOT = Path(__file__).resolve().parent.parent
ATTACKER = "127.0.0.2"
MiB = 1024 * 1024


@dataclass
class Report:
    attack: str
    seconds: float
    rss_before_mib: float = 0.0
    rss_peak_mib: float = 0.0
    log_bytes: int = 0
    neighbour_worst_ms: float = 0.0
    neighbour_failures: int = 0
    seen: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        seen = " ".join(f"{key}={value}" for key, value in sorted(self.seen.items()))
        return (f"{self.attack:<10} {self.seconds:5.1f}s  peak RSS {self.rss_peak_mib:7.1f} MiB "
                f"(before {self.rss_before_mib:5.1f})  log {self.log_bytes / 1024:8.1f} KiB  neighbour worst "
                f"{self.neighbour_worst_ms:6.1f} ms, {self.neighbour_failures} failed  {seen}")


def _die_with_parent() -> None:
    """In the child: SIGKILL when this script dies, so a killed run leaves no server behind (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


class Server:
    """``python -m llmgine_ws --app benchmarks.attack_app:app`` on a socket bound here."""

    def __init__(self, env: dict[str, str]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port: int = self.sock.getsockname()[1]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llmgine_ws", "--app", "benchmarks.attack_app:app", "--fd",
             str(self.sock.fileno()), "--log-level", "info"],
            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}, pass_fds=(self.sock.fileno(),),
            stdout=self.log, stderr=self.log, preexec_fn=_die_with_parent)
        self.sock.close()

    async def ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}): {self.log_text()[-2000:]}")
            try:
                ws = await asyncio.wait_for(open_ws("127.0.0.1", self.port, "/api/ws"), 2)
            except (OSError, TimeoutError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
                continue
            ws.abort()
            return

    def rss(self) -> int:
        return rss_bytes(self.process.pid)

    def log_size(self) -> int:
        self.log.flush()
        return os.fstat(self.log.fileno()).st_size

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:  # what is measured is over: no need for a graceful drain
            self.process.kill()
            self.process.wait()
        self.log.close()


# ------------------------------------------------------------------------------------------ the attacker


async def attacker_connect(port: int, *, rcvbuf: int | None = None
                           ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection from 127.0.0.2, upgraded to a WebSocket (the response headers read)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((ATTACKER, 0))
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(upgrade_request(port))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        writer.close()
        raise ConnectionRefusedError(head.split(b"\r\n", 1)[0].decode())
    return reader, writer


def upgrade_request(port: int) -> bytes:
    return (f"GET /api/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def text(message: Any) -> bytes:
    return build_frame(OP_TEXT, msgspec.json.encode(message))


async def read_slowly(reader: asyncio.StreamReader, seen: dict[str, int], rate: float = 1 * MiB) -> None:
    """Read about ``rate`` bytes a second, counting error codes and close frames seen on the way."""
    chunk = 64 * 1024
    while True:
        data = await reader.read(chunk)
        if not data:
            return
        for code in (b"RATE_LIMITED", b"TOO_MANY_REQUESTS", b"UNKNOWN_REQUEST"):
            if code in data:
                seen[code.decode()] = seen.get(code.decode(), 0) + data.count(code)
        await asyncio.sleep(len(data) / rate)


async def flood(port: int, seen: dict[str, int], frames: Callable[[int], bytes], *, read: bool = True,
                rcvbuf: int | None = None, setup: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                            Awaitable[None]] | None = None) -> None:
    """Connect, send ``frames(n)`` batches as fast as the socket takes them; reconnect when closed."""
    n = 0
    while True:
        try:
            reader, writer = await attacker_connect(port, rcvbuf=rcvbuf)
        except (OSError, ConnectionError, TimeoutError, asyncio.IncompleteReadError) as exc:
            seen["refused"] = seen.get("refused", 0) + 1
            await asyncio.sleep(0.1 if isinstance(exc, ConnectionRefusedError) else 0.01)
            continue
        seen["connections"] = seen.get("connections", 0) + 1
        reading = None
        try:
            if setup is not None:
                await setup(reader, writer)
            if read:
                reading = asyncio.create_task(read_slowly(reader, seen))
            while True:
                writer.write(frames(n))
                n += 1
                await writer.drain()
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            seen["closed"] = seen.get("closed", 0) + 1
        finally:
            if reading is not None:
                reading.cancel()
            writer.transport.abort()


async def answers(port: int, seen: dict[str, int]) -> None:
    batch = b"".join(text({"type": "server_response", "message_id": str(uuid.uuid4()),
                           "data": {"response_type": "x", "padding": "y" * 200}}) for _ in range(500))
    await flood(port, seen, lambda n: batch)


async def closed(port: int, seen: dict[str, int]) -> None:
    batch = b"".join(text({"type": "ping", "message_id": f"p{i}", "data": {"timestamp": i}}) for i in range(200))
    await flood(port, seen, lambda n: batch)


async def queued(port: int, seen: dict[str, int]) -> None:
    nested = b"[" + b",".join([b"[]"] * ((MiB - 512) // 3)) + b"]"

    async def setup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(text({"type": "create_session", "message_id": "s", "data": {}}))
        while True:
            line = await reader.readuntil(b'"session_id":"')
            if b"create_session_res" in line:
                break
        session_id = (await reader.readuntil(b'"'))[:-1].decode()
        writer.write(text({"type": "create_engine", "message_id": "e",
                           "data": {"session_id": session_id, "engine_type": "asking"}}))
        writer.write(text({"type": "engine_command", "message_id": "ask",
                           "data": {"session_id": session_id, "command": {}}}))
        setup.session_id = session_id  # type: ignore[attr-defined]

    def frames(n: int) -> bytes:
        session_id: str = setup.session_id  # type: ignore[attr-defined]
        return build_frame(OP_TEXT, b'{"type":"engine_command","message_id":"q%d","data":{"session_id":"%s",'
                                    b'"command":%s}}' % (n, session_id.encode(), nested))

    await flood(port, seen, frames, setup=setup)


async def pingstorm(port: int, seen: dict[str, int]) -> None:
    batch = build_frame(OP_PING, b"p" * 125) * 500
    await flood(port, seen, lambda n: batch, read=False, rcvbuf=4096)


async def slowloris(port: int, seen: dict[str, int], connections: int = 300) -> None:
    request = upgrade_request(port)
    held: set[int] = set()
    seen["held_at_once"] = 0

    async def one(slot: int) -> None:
        while True:
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind((ATTACKER, 0))
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
                reader, writer = await asyncio.open_connection(sock=sock)
            except OSError:
                seen["connect_failed"] = seen.get("connect_failed", 0) + 1
                await asyncio.sleep(1)
                continue
            opened = time.monotonic()
            try:
                for byte in request[:-2]:  # never the final CRLF
                    writer.write(bytes((byte,)))
                    await writer.drain()
                    try:
                        answer = await asyncio.wait_for(reader.read(64), 1.0)
                    except TimeoutError:
                        held.add(slot)  # still open after a second: held
                        seen["held_at_once"] = max(seen["held_at_once"], len(held))
                        seen["longest_held_s"] = max(seen.get("longest_held_s", 0), int(time.monotonic() - opened))
                        continue
                    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "eof"
                    seen[f"answered_{status}"] = seen.get(f"answered_{status}", 0) + 1
                    break
            except (OSError, ConnectionError):
                seen["reset"] = seen.get("reset", 0) + 1
            finally:
                held.discard(slot)
                writer.transport.abort()
            await asyncio.sleep(1)  # then try again

    await asyncio.gather(*(one(slot) for slot in range(connections)))


ATTACKS: dict[str, Callable[[int, dict[str, int]], Awaitable[None]]] = {
    "answers": answers, "closed": closed, "queued": queued, "pingstorm": pingstorm, "slowloris": slowloris,
}


# ------------------------------------------------------------------------------------------ measuring


async def neighbour(port: int, report: Report, stop: threading.Event) -> None:
    """A well-behaved client: a ping round trip every 0.2 s (reconnecting if it has to)."""
    ws = None
    n = 0
    while not stop.is_set():
        try:
            if ws is None or ws.closed.done():
                ws = await asyncio.wait_for(open_ws("127.0.0.1", port, "/api/ws"), 5)
            started = time.monotonic()
            await asyncio.wait_for(ws.request("ping", {"timestamp": n}, f"n{n}"), 5)
            report.neighbour_worst_ms = max(report.neighbour_worst_ms, (time.monotonic() - started) * 1000)
        except (OSError, ConnectionError, TimeoutError, RuntimeError):
            report.neighbour_failures += 1
            if ws is not None:
                ws.abort()
            ws = None
        n += 1
        await asyncio.sleep(0.2)


async def sample_rss(server: Server, report: Report) -> None:
    while True:
        with contextlib.suppress(OSError, RuntimeError):
            report.rss_peak_mib = max(report.rss_peak_mib, server.rss() / MiB)
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(*coroutines: Awaitable[None]) -> AsyncIterator[None]:
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_attack(name: str, duration: float, env: dict[str, str]) -> Report:
    server = Server(env)
    report = Report(attack=name, seconds=duration)
    try:
        await server.ready()
        report.rss_before_mib = report.rss_peak_mib = server.rss() / MiB
        log_before = server.log_size()
        seen: dict[str, int] = {}
        stop = threading.Event()
        # In its own thread and event loop: the attacker's busy loop must not delay the neighbour's reads.
        thread = threading.Thread(target=lambda: asyncio.run(neighbour(server.port, report, stop)), daemon=True)
        thread.start()
        try:
            async with running(sample_rss(server, report)):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ATTACKS[name](server.port, seen), duration)
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 10)
        report.log_bytes = server.log_size() - log_before
        report.seen = seen
        if server.process.poll() is not None:
            report.seen["server_died"] = 1
    finally:
        server.stop()
    return report


async def main_async(args: argparse.Namespace) -> list[Report]:
    env = {"LLMGINE_API_PING_INTERVAL": "20"}
    reports = []
    for name in args.only or list(ATTACKS):
        report = await run_attack(name, args.duration, env)
        print(report.line(), flush=True)
        reports.append(report)
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per attack (default 20)")
    parser.add_argument("--only", nargs="*", choices=list(ATTACKS), help="run only these attacks")
    parser.add_argument("--json", type=Path, help="also write the reports to this file")
    args = parser.parse_args(argv)
    reports = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in reports], indent=2))
    return 1 if any(r.seen.get("server_died") for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
