"""The Python client resuming against the real server (issue 12), behind a TCP proxy the test severs
or black-holes: a drop mid engine stream, with a question pending, during a request; window expiry;
a seed-style client; a half-open connection; under trio too.

The engine and handlers here wait on the test's events (no sleeps): what the server does while the
client is away is decided by the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest
from starlette.applications import Starlette

from llmgine_ws import APIConfig, EngineContext, Extensions, HandlerContext, Session, create_app
from llmgine_ws.client import Client, Reconnect, ResumeOutcome, StateLost, UserInputRequest, connect

from .client_resume_support import WAIT, TcpProxy, tcp_proxy
from .client_support import serve_any
from .reliability_support import registries
from .support import LiveServer

pytestmark = pytest.mark.anyio

FAST = Reconnect(initial_delay=0.01, max_delay=0.2, max_time=10)


class Probe:
    """What the test app's engine and handlers do, driven by the test."""

    def __init__(self) -> None:
        self.release = anyio.Event()  # the engine emits its second half once set
        self.first_half = anyio.Event()
        self.executions: dict[str, int] = {}
        self.gate = anyio.Event()
        self.started = anyio.Event()


class Gated(msgspec.Struct, frozen=True):
    label: str = ""


def build_app(probe: Probe, **config: Any) -> Starlette:
    class GatedEngine:
        def __init__(self, session: Session, config: dict[str, Any]) -> None:
            self.session = session

        async def start(self) -> None:
            pass

        async def handle_command(self, command: Any, ctx: EngineContext) -> dict[str, Any]:
            n, first = int(command["n"]), int(command.get("first", command["n"]))
            answer = None
            if command.get("ask"):
                answer = await ctx.ask_user("well?")
            for i in range(n):
                if i == first:
                    probe.first_half.set()
                    await probe.release.wait()
                await ctx.emit("step", {"i": i})  # not a token: never coalesced
            return {"events": n, "answer": answer}

        async def stop(self) -> None:
            pass

    async def gated(data: Gated, ctx: HandlerContext) -> dict[str, Any]:
        probe.executions[ctx.message_id] = probe.executions.get(ctx.message_id, 0) + 1
        probe.started.set()
        await probe.gate.wait()
        return {"label": data.label}

    extensions = Extensions()
    extensions.register_engine("gated", GatedEngine)
    extensions.register_handler("gated", Gated, gated)
    config.setdefault("ping_interval", 0)
    return create_app(APIConfig(**config), extensions)


@asynccontextmanager
async def served(probe: Probe, **config: Any) -> AsyncIterator[tuple[LiveServer, TcpProxy]]:
    async with serve_any(build_app(probe, **config)) as server, tcp_proxy(server.port) as proxy:
        yield server, proxy


def url(proxy: TcpProxy) -> str:
    return f"{proxy.url}/api/ws"


class Outcomes:
    def __init__(self, client: Client) -> None:
        self.resumed: list[ResumeOutcome] = []
        self.lost: list[StateLost] = []
        self.changed = anyio.Event()
        client.on_resumed(lambda outcome: self._add(self.resumed, outcome))
        client.on_state_lost(lambda error: self._add(self.lost, error))

    def _add(self, items: list[Any], item: Any) -> None:
        items.append(item)
        self.changed.set()
        self.changed = anyio.Event()

    async def until(self, predicate: Callable[[], bool]) -> None:
        with anyio.fail_after(WAIT):
            while not predicate():
                await self.changed.wait()


async def opted_in(client: Client) -> None:
    """The server has read our first ack (queued as `connected` arrived): a ping behind it came back."""
    assert client.resumable
    await client.request("ping", {})


async def start_engine(client: Client) -> str:
    session_id = await client.create_session()
    await client.create_engine(session_id, "gated")
    return session_id


async def test_drop_mid_engine_stream_every_event_once_in_order_and_the_result() -> None:
    probe = Probe()
    async with served(probe) as (server, proxy), connect(url(proxy), reconnect=FAST) as client:
        outcomes = Outcomes(client)
        session_id = await start_engine(client)
        await opted_in(client)
        command = client.command(session_id, {"n": 40, "first": 20})
        seen = [(await command.__anext__()).seq for _ in range(20)]
        await proxy.sever()
        probe.release.set()  # the second half is emitted while the app is detached
        async for event in command:
            seen.append(event.seq)
        assert seen == list(range(40))
        assert command.result is not None and command.result.result == {"events": 40, "answer": None}
        await outcomes.until(lambda: bool(outcomes.resumed))
        outcome = outcomes.resumed[0]
        assert outcome.resumed and outcome.app_id == client.app_id
        assert [s["session_id"] for s in outcome.sessions] == [session_id]
        assert client.resumed is True and proxy.accepted == 2
        status = await client.request("status", {"session_id": session_id})  # the session survived
        assert status.data["session_id"] == session_id
        # The new socket's throwaway app (the one its `connected` named) is cleaned up: one app left.
        await server.eventually(lambda: len(server.runtime.hub) == 1, timeout=WAIT)


async def test_drop_with_a_question_pending_answered_once_and_the_command_completes() -> None:
    probe = Probe()
    async with served(probe) as (_, proxy), connect(url(proxy), reconnect=FAST) as client:
        outcomes = Outcomes(client)
        asked: list[str] = []
        asked_event = anyio.Event()
        release = anyio.Event()

        @client.on_user_input
        async def answer(request: UserInputRequest) -> str:
            asked.append(request.raw.message_id)
            asked_event.set()
            await release.wait()
            return "blue"

        session_id = await start_engine(client)
        await opted_in(client)
        command = client.command(session_id, {"n": 3, "ask": True})
        with anyio.fail_after(WAIT):
            await asked_event.wait()
        await proxy.sever()
        await outcomes.until(lambda: bool(outcomes.resumed))
        # The server asks again after the replay; a marker request behind it proves it was delivered.
        await client.request("ping", {})
        release.set()
        result = await command.wait()
        assert result.status == "completed" and result.result["answer"] == "blue"
        assert len(asked) == 1


async def test_drop_during_a_request_answered_once() -> None:
    probe = Probe()
    async with served(probe) as (_, proxy), connect(url(proxy), reconnect=FAST) as client:
        outcomes = Outcomes(client)
        await opted_in(client)
        async with anyio.create_task_group() as tg:
            replies: list[Any] = []

            async def gated() -> None:
                replies.append((await client.request("gated", {"label": "x"}, message_id="g-1")).data)

            tg.start_soon(gated)
            with anyio.fail_after(WAIT):
                await probe.started.wait()
            await proxy.sever()
            await outcomes.until(lambda: bool(outcomes.resumed))
            await client.request("ping", {})  # the resend went out before this
            probe.gate.set()
        assert replies == [{"label": "x"}] and probe.executions == {"g-1": 1}


async def test_window_expiry_state_lost_and_the_client_goes_on() -> None:
    probe = Probe()
    policy = Reconnect(initial_delay=0.01, max_delay=0.1, max_time=10)
    async with served(probe, resume_window=0.2) as (server, proxy), connect(url(proxy), reconnect=policy) as client:
        outcomes = Outcomes(client)
        session_id = await start_engine(client)
        await opted_in(client)
        old = client.app_id
        command = client.command(session_id, {"n": 4, "first": 2})
        assert [(await command.__anext__()).seq for _ in range(2)] == [0, 1]
        proxy.refuse()
        await proxy.sever()
        await proxy.wait_attempts(2)
        await server.eventually(lambda: old not in server.runtime.messaging.get_connected_apps(), timeout=WAIT)
        proxy.refuse(False)
        with pytest.raises(StateLost) as lost:
            await command.wait()
        assert lost.value.reason in ("expired", "unknown") and lost.value.previous_app_id == old
        await outcomes.until(lambda: bool(outcomes.lost))
        assert client.resumed is False and client.app_id != old
        assert (await client.request("ping", {})).type == "ping_res"


async def test_resume_false_is_a_seed_client_cleaned_up_at_disconnect() -> None:
    probe = Probe()
    async with served(probe) as (server, proxy), connect(url(proxy), resume=False) as client:
        await start_engine(client)
        await client.request("ping", {})
        await proxy.sever()
        assert await client.wait_closed(WAIT) == 1006
        await server.eventually(lambda: registries(server.runtime)["connections"] == 0 and
                                registries(server.runtime)["sessions"] == 0, timeout=WAIT)
        assert proxy.accepted == 1


async def test_half_open_connection_is_noticed_by_the_heartbeat_and_resumed() -> None:
    probe = Probe()
    async with served(probe) as (_, proxy), \
            connect(url(proxy), reconnect=FAST, ping_interval=0.1, ping_timeout=0.5) as client:
        outcomes = Outcomes(client)
        session_id = await start_engine(client)
        await opted_in(client)
        proxy.blackhole()
        await outcomes.until(lambda: bool(outcomes.resumed))
        assert (await client.request("status", {"session_id": session_id})).data["session_id"] == session_id


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_resume_under_trio(anyio_backend: str) -> None:
    probe = Probe()
    async with served(probe) as (_, proxy), connect(url(proxy), reconnect=FAST) as client:
        outcomes = Outcomes(client)
        session_id = await start_engine(client)
        await opted_in(client)
        command = client.command(session_id, {"n": 10})
        seen = [(await command.__anext__()).seq for _ in range(3)]
        await proxy.sever()
        async for event in command:
            seen.append(event.seq)
        assert seen == list(range(10))
        await outcomes.until(lambda: bool(outcomes.resumed))
