"""The Python client's resume, against a scripted fake server (``client_resume_support``) behind a TCP
proxy the test severs or black-holes: real sockets, no sleeps as synchronisation.

The sans-I/O bookkeeping (``llmgine_ws.client.resume``) is tested directly at the end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from llmgine_ws.client import (
    Client,
    ConnectionClosed,
    Message,
    Reconnect,
    ResumeOutcome,
    StateLost,
    UserInputRequest,
    connect,
)
from llmgine_ws.client.resume import ResumeState, reconnect_after_rejection

from .client_resume_support import WAIT, FakeResumeServer, TcpProxy, tcp_proxy
from .test_client_unit import serve_in_loop

pytestmark = pytest.mark.anyio

FAST = Reconnect(initial_delay=0.01, max_delay=0.2, max_time=10)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeResumeServer, TcpProxy]]:
    server = FakeResumeServer()
    async with serve_in_loop(server.app) as base, tcp_proxy(int(base.rsplit(":", 1)[1])) as proxy:
        try:
            yield server, proxy
        finally:
            server.stop()


class Watch:
    """The client's resume callbacks, as events."""

    def __init__(self, client: Client) -> None:
        self.resumed: list[ResumeOutcome] = []
        self.lost: list[StateLost] = []
        self.changed = anyio.Event()
        client.on_resumed(self._on_resumed)
        client.on_state_lost(self._on_lost)

    def _on_resumed(self, outcome: ResumeOutcome) -> None:
        self.resumed.append(outcome)
        self._wake()

    def _on_lost(self, error: StateLost) -> None:
        self.lost.append(error)
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def until(self, resumed: int = 0, lost: int = 0) -> None:
        with anyio.fail_after(WAIT):
            while len(self.resumed) < resumed or len(self.lost) < lost:
                await self.changed.wait()


async def test_opts_in_with_ack_zero_and_acks_every_64_frames(fake: tuple[FakeResumeServer, TcpProxy]) -> None:
    server, proxy = fake
    async with connect(f"{proxy.url}/ws", ack_interval=3600, reconnect=FAST) as client:
        app = server.only_app()
        await app.wait(lambda: app.acks == [0])
        assert client.resumable and client.state == "open" and client.resumed is None
        await client.request("emit", {"n": 200})  # 200 notifications (seq 1..200) then emit_res (201)
        await app.wait(lambda: app.acks == [0, 64, 128, 192])
        assert client.last_seq == 201
        assert [m.data["message"] for m in [await client.receive(1) for _ in range(200)]][-1] == "n199"


async def test_acks_periodically(fake: tuple[FakeResumeServer, TcpProxy]) -> None:
    server, proxy = fake
    async with connect(f"{proxy.url}/ws", ack_interval=0.02) as client:
        await client.request("emit", {"n": 3})
        app = server.only_app()
        await app.wait(lambda: bool(app.acks) and app.acks[-1] == 4)


async def test_drop_mid_command_every_event_once_in_order(fake: tuple[FakeResumeServer, TcpProxy]) -> None:
    server, proxy = fake
    async with connect(f"{proxy.url}/ws", reconnect=FAST) as client:
        watch = Watch(client)
        app_id = client.app_id
        command = client.command("s1", {"n": 10, "first": 5})
        seen = [(await command.__anext__()).seq for _ in range(5)]
        app = server.only_app()
        await proxy.sever()
        app.open("rest")  # the last 5 events and the result are sent while the app is detached
        async for event in command:
            seen.append(event.seq)
        assert seen == list(range(10))
        assert command.result is not None and command.result.result == {"events": 10}
        await watch.until(resumed=1)
        outcome = watch.resumed[0]
        assert outcome.resumed and outcome.app_id == outcome.previous_app_id == app_id == client.app_id
        assert client.resumed is True and client.last_resume == outcome
        assert outcome.sessions == [{"session_id": "s1", "status": "active", "engine": None}]
        assert app.executions == {command.message_id: 1}  # resent after resume_res, executed once
        assert server.resumes[0]["resumed"] is True and proxy.accepted == 2
        assert (await client.request("ping")).type == "ping_res"


async def test_request_in_flight_is_resent_and_answered_once(fake: tuple[FakeResumeServer, TcpProxy]) -> None:
    server, proxy = fake
    async with connect(f"{proxy.url}/ws", reconnect=FAST) as client:
        watch = Watch(client)
        async with anyio.create_task_group() as tg:
            results: list[Message] = []

            async def gated() -> None:
                results.append(await client.request("gated", {"gate": "g"}, message_id="req-1"))

            tg.start_soon(gated)
            app = server.only_app()
            await app.wait(lambda: "req-1" in app.executions)
            await proxy.sever()
            await watch.until(resumed=1)
            await app.wait(lambda: sum(m["message_id"] == "req-1" for m in app.received) == 2)  # resent
            app.open("g")
        assert [r.data for r in results] == [{"gate": "g"}]
        assert app.executions["req-1"] == 1


async def test_answer_sent_while_detached_comes_in_the_replay(fake: tuple[FakeResumeServer, TcpProxy]) -> None:
    server, proxy = fake
    async with connect(f"{proxy.url}/ws", reconnect=FAST) as client:
        async with anyio.create_task_group() as tg:
            results: list[Message] = []

            async def gated() -> None:
                results.append(await client.request("gated", {"gate": "g"}, message_id="req-2"))

            tg.start_soon(gated)
            app = server.only_app()
            await app.wait(lambda: "req-2" in app.executions)
            await proxy.sever()
            app.open("g")
        assert [r.type for r in results] == ["gated_res"]
        assert app.executions["req-2"] == 1 and client.resumed is True


async def test_pending_server_request_redelivered_handler_called_once(
        fake: tuple[FakeResumeServer, TcpProxy]) -> None:
    server, proxy = fake
    async with connect(f"{proxy.url}/ws", reconnect=FAST) as client:
        watch = Watch(client)
        asked: list[str] = []
        asked_event = anyio.Event()
        release = anyio.Event()
        marker = anyio.Event()

        @client.on_user_input
        async def answer(request: UserInputRequest) -> str:
            asked.append(request.raw.message_id)
            asked_event.set()
            await release.wait()
            return "blue"

        @client.on_notification
        def on_marker(message: Message) -> None:
            if message.data["notification_type"] == "resumed_marker":
                marker.set()

        async with anyio.create_task_group() as tg:
            results: list[Message] = []

            async def ask() -> None:
                results.append(await client.request("ask"))

            tg.start_soon(ask)
            with anyio.fail_after(WAIT):
                await asked_event.wait()
            app = server.only_app()
            await proxy.sever()
            await watch.until(resumed=1)
            with anyio.fail_after(WAIT):
                await marker.wait()  # the re-sent request was delivered before it: ignored, still running
            release.set()
        (mid,) = app.responses
        assert results[0].data["answer"] == {"user_input": "blue", "response_type": "user_input"}
        assert asked == [mid] and len(app.responses[mid]) == 1


async def test_answer_lost_with_the_socket_is_sent_again_not_recomputed(
        fake: tuple[FakeResumeServer, TcpProxy]) -> None:
    _, proxy = fake
    async with connect(f"{proxy.url}/ws", reconnect=FAST) as client:
        watch = Watch(client)
        calls: list[str] = []
        asked = anyio.Event()
        release = anyio.Event()
        handled = anyio.Event()

        @client.on_user_input
        async def answer(request: UserInputRequest) -> str:
            calls.append(request.prompt)
            asked.set()
            await release.wait()
            handled.set()
            return "green"

        async with anyio.create_task_group() as tg:
            results: list[Message] = []

            async def ask() -> None:
                results.append(await client.request("ask"))

            tg.start_soon(ask)
            with anyio.fail_after(WAIT):
                await asked.wait()
            proxy.refuse()
            await proxy.sever()
            await proxy.wait_attempts(2)  # the client is reconnecting: its connection is down
            assert client.state == "reconnecting"
            release.set()  # answered while the connection is down: the answer cannot go out now
            with anyio.fail_after(WAIT):
                await handled.wait()
            proxy.refuse(False)
            await watch.until(resumed=1)
        assert results[0].data["answer"]["user_input"] == "green"
        assert calls == ["well?"]  # the re-sent request got the remembered answer


async def test_state_lost_fails_waits_and_goes_on_as_a_new_app(fake: tuple[FakeResumeServer, TcpProxy]) -> None:
    server, proxy = fake
    async with connect(f"{proxy.url}/ws", reconnect=FAST) as client:
        watch = Watch(client)
        old = client.app_id
        command = client.command("s1", {"n": 4, "first": 2})
        assert [(await command.__anext__()).seq for _ in range(2)] == [0, 1]
        errors: list[BaseException] = []
        async with anyio.create_task_group() as tg:

            async def gated() -> None:
                try:
                    await client.request("gated", {"gate": "never"})
                except StateLost as exc:
                    errors.append(exc)

            tg.start_soon(gated)
            app = server.only_app()
            await app.wait(lambda: len(app.executions) == 2)
            server.fail_next_resume = "expired"
            await proxy.sever()
        assert len(errors) == 1 and errors[0].reason == "expired"  # type: ignore[attr-defined]
        with pytest.raises(StateLost) as lost:
            async for _ in command:
                pass
        assert lost.value.previous_app_id == old and lost.value.app_id == client.app_id != old
        await watch.until(lost=1)
        assert watch.lost[0].reason == "expired" and client.resumed is False
        assert client.last_resume is not None and client.last_resume.reason == "expired"
        assert (await client.request("ping")).type == "ping_res"  # the client goes on, as the new app
        new_app = server.apps[client.app_id]
        await new_app.wait(lambda: 0 in new_app.acks)  # the new app is resumable too


async def test_server_without_resume_drop_ends_the_client() -> None:
    server = FakeResumeServer(resume=False)
    async with serve_in_loop(server.app) as base, tcp_proxy(int(base.rsplit(":", 1)[1])) as proxy:
        async with connect(f"{proxy.url}/ws", reconnect=FAST) as client:
            assert not client.resumable
            await proxy.sever()
            assert await client.wait_closed(WAIT) == 1006
            with pytest.raises(ConnectionClosed):
                await client.request("ping")
        assert proxy.accepted == 1 and all(not app.acks for app in server.apps.values())


async def test_resume_false_never_acks_and_does_not_reconnect(fake: tuple[FakeResumeServer, TcpProxy]) -> None:
    server, proxy = fake
    async with connect(f"{proxy.url}/ws", resume=False) as client:
        assert not client.resumable
        await client.request("emit", {"n": 100})
        app = server.only_app()
        await proxy.sever()
        assert await client.wait_closed(WAIT) == 1006
    assert app.acks == [] and proxy.accepted == 1


async def test_close_codes_decide_whether_to_resume(fake: tuple[FakeResumeServer, TcpProxy]) -> None:
    server, proxy = fake
    async with connect(f"{proxy.url}/ws", reconnect=FAST) as client:
        watch = Watch(client)
        app = server.only_app()
        await app.wait(lambda: app.acks == [0])
        assert app.websocket is not None
        await app.websocket.close(code=1001, reason="going away")  # a restarting server: resume
        await watch.until(resumed=1)
        assert app.websocket is not None
        await app.websocket.close(code=4000, reason="superseded")  # resumed elsewhere: stop
        assert await client.wait_closed(WAIT) == 4000
    assert proxy.accepted == 2


async def test_deliberate_close_is_1000_and_ends_the_app(fake: tuple[FakeResumeServer, TcpProxy]) -> None:
    server, proxy = fake
    async with connect(f"{proxy.url}/ws") as client:
        app = server.only_app()
        await app.wait(lambda: app.acks == [0])
    await server.wait(lambda: app.ended)
    assert server.close_codes == [1000] and client.close_code == 1000


async def test_heartbeat_detects_a_half_open_connection(fake: tuple[FakeResumeServer, TcpProxy]) -> None:
    server, proxy = fake
    async with connect(f"{proxy.url}/ws", reconnect=FAST, ping_interval=0.05, ping_timeout=0.2) as client:
        watch = Watch(client)
        app = server.only_app()
        await app.wait(lambda: app.acks == [0])
        proxy.blackhole()  # the connection stays open and carries nothing: only a heartbeat notices
        await watch.until(resumed=1)
        assert client.app_id == app.app_id and (await client.request("ping")).type == "ping_res"


async def test_requests_made_while_reconnecting_go_out_after_the_resume(
        fake: tuple[FakeResumeServer, TcpProxy]) -> None:
    server, proxy = fake
    async with connect(f"{proxy.url}/ws", reconnect=FAST) as client:
        app = server.only_app()
        await app.wait(lambda: app.acks == [0])
        proxy.refuse()
        await proxy.sever()
        await proxy.wait_attempts(2)
        replies: list[Message] = []
        sent: list[str] = []
        async with anyio.create_task_group() as tg:

            async def request() -> None:
                replies.append(await client.request("ping", message_id="late"))

            async def send() -> None:
                sent.append(await client.send("ping", message_id="fire-and-forget"))

            tg.start_soon(request)
            tg.start_soon(send)
            proxy.refuse(False)
        assert replies[0].type == "ping_res" and client.resumed is True and sent == ["fire-and-forget"]
        await app.wait(lambda: app.executions.get("late") == 1 and "fire-and-forget" in app.executions)


async def test_gives_up_after_max_attempts() -> None:
    server = FakeResumeServer()
    async with serve_in_loop(server.app) as base:
        proxy_cm = tcp_proxy(int(base.rsplit(":", 1)[1]))
        async with proxy_cm as proxy:
            async with connect(f"{proxy.url}/ws", reconnect=Reconnect(initial_delay=0.01, max_attempts=3)) as client:
                app = server.only_app()
                await app.wait(lambda: app.acks == [0])
                proxy.upstream_port = 1  # nothing listens there: every attempt fails
                await proxy.sever()
                assert await client.wait_closed(WAIT) == 1006
                assert client.state == "closed"
            assert proxy.accepted == 1


def test_under_trio() -> None:
    import trio  # noqa: F401  (the trio backend must be installed)

    from .test_client_unit import serve_in_thread

    server = FakeResumeServer()
    with serve_in_thread(server.app) as base:

        async def main() -> None:
            async with tcp_proxy(int(base.rsplit(":", 1)[1])) as proxy, \
                    connect(f"{proxy.url}/ws", reconnect=FAST) as client:
                    watch = Watch(client)
                    command = client.command("s1", {"n": 6, "first": 6})
                    seen = [(await command.__anext__()).seq for _ in range(6)]
                    await proxy.sever()
                    await watch.until(resumed=1)
                    assert (await command.wait()).status == "completed"
                    assert seen == list(range(6)) and client.resumed is True

        anyio.run(main, backend="trio")


# ============================================================================================ sans I/O


def test_resume_state_dedupes_and_acks() -> None:
    state = ResumeState(enabled=True, ack_frames=3)
    assert state.ack_due(periodic=True) is None  # no token yet: not resumable
    state.connected({"app_id": "a", "resume_token": "t", "resume_window": 120})
    assert state.resumable and state.window == 120.0 and state.ack_due(periodic=False) == 0
    state.acked(0)
    assert [state.accept(s) for s in (1, 2, 2, 1, 3)] == [True, True, False, False, True]
    assert state.duplicates == 2 and state.last_seq == 3
    assert state.accept(None)  # connected / resume_res carry no seq
    assert state.ack_due(periodic=False) == 3
    state.acked(3)
    state.accept(4)
    assert state.ack_due(periodic=False) is None and state.ack_due(periodic=True) == 4


def test_resume_state_handshake() -> None:
    state = ResumeState(enabled=True, ack_frames=64)
    state.connected({"app_id": "old", "resume_token": "t1", "resume_window": 60})
    state.accept(1)
    state.accept(2)
    payload = state.resume_request({"app_id": "new", "resume_token": "t2", "resume_window": 60}, "r1")
    assert payload == {"app_id": "old", "resume_token": "t1", "last_seq": 2}
    stray = Message(type="notification", message_id="x", server_initiated=True, seq=1)
    state.hold(stray)
    assert not state.is_answer(Message(type="error", message_id="other"))
    answer = Message(type="resume_res", message_id="r1",
                     data={"resumed": True, "app_id": "old", "resume_token": "t3", "replayed": 4, "sessions": []})
    assert state.is_answer(answer)
    outcome, held = state.finish(answer)
    assert outcome.resumed and outcome.replayed == 4 and held == [] and state.token == "t3" and state.last_seq == 2

    state.resume_request({"app_id": "new2", "resume_token": "t4", "resume_window": 30}, "r2")
    state.hold(stray)
    failed = Message(type="resume_res", message_id="r2",
                     data={"resumed": False, "reason": "gap", "app_id": "new2", "resume_token": "t4"})
    outcome, held = state.finish(failed)
    assert (outcome.resumed, outcome.reason, outcome.app_id, outcome.previous_app_id) == (False, "gap", "new2", "old")
    assert held == [stray] and state.last_seq == 0 and state.acked_seq == -1 and state.window == 30

    state.resume_request({"app_id": "new3"}, "r3")  # a server that does not know `resume`
    outcome, _ = state.finish(Message(type="error", message_id="r3", data={"code": "INVALID_MESSAGE_TYPE"}))
    assert outcome.reason == "disabled" and not state.resumable


def test_disabled_resume_state_accepts_everything() -> None:
    state = ResumeState(enabled=False, ack_frames=64)
    state.connected({"app_id": "a", "resume_token": "t"})
    assert not state.resumable and state.accept(1) and state.accept(1) and state.ack_due(periodic=True) is None


def test_reconnect_policy() -> None:
    policy = Reconnect(initial_delay=0.1, max_delay=1.0, factor=2, jitter=0.5, max_attempts=5)
    assert [policy.delay(n, 0.0) for n in (1, 2, 3, 4, 5, 6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert policy.delay(2, 0.999999) == pytest.approx(0.1, rel=1e-3)  # jitter removes up to half
    assert not policy.gives_up(5, 1.0, 120) and policy.gives_up(6, 1.0, 120)
    assert Reconnect().gives_up(1, 121, 120) and not Reconnect(max_time=200).gives_up(1, 121, 120)
    assert [reconnect_after_rejection(s) for s in (403, 404, 408, 429, 503)] == [False, False, True, True, True]

