"""Churn: thousands of short-lived clients that connect, open a session, start an engine, send it a
command and disconnect in every rude way (vanishing without a close frame, closing mid-stream,
leaving a server request unanswered), many at once. Afterwards nothing is left: no connection,
session, engine, pending or in-flight request, no task, and no Connection/Session/engine object
still reachable. Memory growth across rounds is measured by ``benchmarks/memory.py``, not here.
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections import Counter
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from llmgine_ws import EngineContext, Extensions, Session
from llmgine_ws.client import Client, Message, connect
from llmgine_ws.connection import Connection
from llmgine_ws.engines import EngineHandle
from llmgine_ws.runtime import Runtime

from .reliability_support import error_trap, wait_registries_empty
from .support import serve

pytestmark = pytest.mark.anyio

CYCLES = 2000
BATCH = 50
MODES = ("session_then_abort", "engine_then_abort", "complete_then_close", "mid_stream_abort", "mid_stream_close",
         "pending_request_abort", "complete_then_abort", "mid_stream_leave")
"""How each cycle ends (cycle i uses MODES[i % len(MODES)])."""


class ChurnEngine:
    def __init__(self, alive: weakref.WeakSet[Any], counts: Counter[str]) -> None:
        alive.add(self)
        self.counts = counts
        counts["engines"] += 1

    async def start(self) -> None:
        pass

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        if command == "quick":
            await ctx.emit("token", 0)
            return {"done": True}
        if command == "ask":
            return await ctx.ask_user("still there?")
        i = 0
        while True:  # stream until cancelled
            await ctx.emit("token", i)
            i += 1
            await anyio.lowlevel.checkpoint()

    async def stop(self) -> None:
        self.counts["stopped"] += 1


class Tracker:
    """Weak references to everything the server creates, to prove it can all be collected."""

    def __init__(self, runtime: Runtime) -> None:
        self.connections: weakref.WeakSet[Connection] = weakref.WeakSet()
        self.closed: list[anyio.Event] = []
        self.created = Counter[str]()
        add, create = runtime.hub.add, runtime.sessions.create

        def tracked_add(connection: Connection) -> None:
            self.connections.add(connection)
            self.closed.append(connection.closed)
            self.created["connections"] += 1
            add(connection)

        def tracked_create(app_id: str, principal: Any = None) -> Session:
            session = create(app_id, principal)
            self.created["sessions"] += 1
            return session

        runtime.hub.add = tracked_add  # type: ignore[method-assign]
        runtime.sessions.create = tracked_create  # type: ignore[method-assign]


async def wait_for(message_type: str, client: Client) -> Message:
    with anyio.fail_after(10):
        while True:
            message = await client.receive()
            if message.type == message_type:
                return message


async def cycle(url: str, index: int, outcomes: Counter[str]) -> None:
    mode = MODES[index % len(MODES)]
    asked = anyio.Event()
    async with connect(url, request_timeout=10, resume=False) as client:

        @client.on_server_request("user_input")
        async def never_answer(message: Message) -> dict[str, Any]:
            asked.set()
            await anyio.sleep_forever()
            raise AssertionError

        session_id = await client.create_session()
        if mode == "session_then_abort":
            await client.abort()
            outcomes[mode] += 1
            return
        await client.request("create_engine", {"session_id": session_id, "engine_type": "churn"})
        if mode == "engine_then_abort":
            await client.abort()
        elif mode in ("complete_then_close", "complete_then_abort"):
            await client.send("engine_command", {"session_id": session_id, "command": "quick"})
            result = await wait_for("engine_command_res", client)
            assert result.data["status"] == "completed", result
            await (client.close() if mode == "complete_then_close" else client.abort())
        elif mode == "pending_request_abort":
            await client.send("engine_command", {"session_id": session_id, "command": "ask"})
            with anyio.fail_after(10):
                await asked.wait()
            await client.abort()
        else:
            await client.send("engine_command", {"session_id": session_id, "command": "stream"})
            await wait_for("engine_event", client)
            if mode == "mid_stream_abort":
                await client.abort()
            elif mode == "mid_stream_close":
                await client.close()
            # mid_stream_leave: just leave the block (the client's own close handshake, mid-stream)
    outcomes[mode] += 1


def other_tasks(baseline: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t not in baseline and t is not asyncio.current_task() and not t.done()}


async def test_churn_leaves_nothing_behind(make_app: Any) -> None:
    alive_engines: weakref.WeakSet[Any] = weakref.WeakSet()
    engine_counts: Counter[str] = Counter()
    extensions = Extensions()
    extensions.register_engine("churn", lambda session, config: ChurnEngine(alive_engines, engine_counts))
    app = make_app(extensions, max_connections_per_ip=100_000, max_sessions=100_000, max_sessions_per_ip=100_000,
                   rate_limit=0, outbound_queue_size=64)
    outcomes: Counter[str] = Counter()
    with error_trap():
        async with serve(app) as server:
            runtime = server.runtime
            async with connect(server.ws_url):  # the server is up (lifespan and all) once this connects
                pass
            await wait_registries_empty(runtime)
            tracker = Tracker(runtime)
            baseline = set(asyncio.all_tasks())
            started = time.monotonic()
            for first in range(0, CYCLES, BATCH):
                async with anyio.create_task_group() as tg:
                    for index in range(first, min(first + BATCH, CYCLES)):
                        tg.start_soon(cycle, server.ws_url, index, outcomes)
            churn_seconds = time.monotonic() - started  # reported, not asserted: speed is for benchmarks/
            await wait_registries_empty(runtime, timeout=20)
            for _ in range(3):  # uvicorn's per-connection tasks finish just after the app's part
                if other_tasks(baseline):
                    await asyncio.wait(other_tasks(baseline), timeout=10)
            left = other_tasks(baseline)
            assert not left, f"{len(left)} tasks left, e.g. {[repr(t.get_coro()) for t in list(left)[:5]]}"
            gc.collect()
            assert len(tracker.connections) == 0, f"{len(tracker.connections)} Connection objects still reachable"
            leftovers = Counter(type(o).__name__ for o in gc.get_objects() if type(o) in (Session, EngineHandle))
            assert not leftovers, f"still reachable: {dict(leftovers)}"  # (slotted: no weak references)
            assert len(alive_engines) == 0, f"{len(alive_engines)} engines still reachable"
    assert sum(outcomes.values()) == CYCLES
    assert tracker.created["connections"] == CYCLES
    assert tracker.created["sessions"] == CYCLES
    assert all(event.is_set() for event in tracker.closed)
    assert engine_counts["engines"] == engine_counts["stopped"] == CYCLES - outcomes["session_then_abort"]
    print(f"\nchurn: {CYCLES} cycles in {churn_seconds:.1f}s ({CYCLES / churn_seconds:.0f}/s), {dict(outcomes)}")
