"""Engines over a real socket: streaming, user round trips, cancellation, ordering, errors, cleanup."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from llmgine_ws import EngineContext, Extensions, Session
from llmgine_ws.client import Client, Message, RequestError, connect

from .support import LiveServer, serve, wait_cleaned

pytestmark = pytest.mark.anyio


class Probe:
    """What the test engines report back to the test."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.command_started: dict[str, anyio.Event] = {}
        self.release: dict[str, anyio.Event] = {}
        self.order: list[str] = []
        self.cancelled: list[str] = []

    def started_event(self, tag: str) -> anyio.Event:
        return self.command_started.setdefault(tag, anyio.Event())

    def release_event(self, tag: str) -> anyio.Event:
        return self.release.setdefault(tag, anyio.Event())


class ScriptedEngine:
    """Does what each command says, so tests can drive every path."""

    def __init__(self, session: Session, config: dict[str, Any], probe: Probe) -> None:
        self.session = session
        self.config = config
        self.probe = probe

    async def start(self) -> None:
        if self.config.get("fail_start"):
            raise RuntimeError("start failed: secret-token-123")
        self.probe.started.append(self.session.session_id)

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        kind = command["kind"]
        tag = command.get("tag", kind)
        self.probe.order.append(tag)
        self.probe.started_event(tag).set()
        try:
            if kind == "stream":
                for i in range(command["n"]):
                    await ctx.emit("token", {"text": f"t{i}"})
                return {"tokens": command["n"]}
            if kind == "ask":
                name = await ctx.ask_user("What is your name?", placeholder="name")
                choice = await ctx.confirm(f"Greet {name}?", ["yes", "no"])
                return {"name": name, "choice": choice}
            if kind == "wait":
                await self.probe.release_event(tag).wait()
                return {"released": tag}
            if kind == "stream_forever":
                i = 0
                while True:
                    await ctx.emit("token", {"i": i})
                    i += 1
                    await anyio.sleep(0.001)
            if kind == "fail":
                raise RuntimeError("engine exploded: secret-token-456")
            if kind == "notify":
                await ctx.notify("tool_call", "calling a tool", tool="search")
                return None
            if kind == "unserialisable":
                return {"value": object()}
        except anyio.get_cancelled_exc_class():
            self.probe.cancelled.append(tag)
            raise
        raise ValueError(kind)

    async def stop(self) -> None:
        self.probe.stopped.append(self.session.session_id)
        if self.config.get("fail_stop"):
            raise RuntimeError("stop failed")
        if self.config.get("hang_stop"):
            await anyio.sleep_forever()


def engine_app(make_app: Any, probe: Probe, **config: Any) -> Any:
    extensions = Extensions()
    extensions.register_engine("scripted", lambda session, cfg: ScriptedEngine(session, cfg, probe))

    async def async_factory(session: Session, cfg: dict[str, Any]) -> ScriptedEngine:
        return ScriptedEngine(session, cfg, probe)

    def broken_factory(session: Session, cfg: dict[str, Any]) -> ScriptedEngine:
        raise ImportError("no module named secret_llm_sdk")

    extensions.register_engine("scripted_async", async_factory)
    extensions.register_engine("broken", broken_factory)
    return make_app(extensions, **config)


async def new_engine(client: Client, engine_type: str = "scripted", **config: Any) -> tuple[str, str]:
    session_id = await client.create_session()
    response = await client.request("create_engine", {"session_id": session_id, "engine_type": engine_type,
                                                      "config": config})
    return session_id, response.data["engine_id"]


async def collect_command(client: Client, message_id: str) -> tuple[list[Message], Message]:
    """Everything a command produced: its events (in order), then its final response."""
    events: list[Message] = []
    with anyio.fail_after(10):
        while True:
            message = await client.receive()
            if message.type == "engine_event":
                assert message.data["command_id"] == message_id
                events.append(message)
            elif message.type == "engine_command_res" and message.message_id == message_id:
                return events, message


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def engine_server(make_app: Any, probe: Probe) -> Any:
    # One frame per event: these tests pin the per-event protocol (seq, payloads) down;
    # tests/test_coalescing.py covers coalesced token streams.
    async with serve(engine_app(make_app, probe, engine_event_coalesce_ms=0)) as live:
        yield live


async def test_create_command_stream_complete(engine_server: LiveServer, probe: Probe) -> None:
    async with connect(engine_server.ws_url) as client:
        session_id = await client.create_session()
        created = await client.request("create_engine", {"session_id": session_id, "engine_type": "scripted"})
        assert created.type == "create_engine_res"
        assert created.data["session_id"] == session_id
        assert created.data["engine_type"] == "scripted"
        assert probe.started == [session_id]

        await client.send("engine_command", {"session_id": session_id, "command": {"kind": "stream", "n": 5}},
                          message_id="cmd-1")
        events, final = await collect_command(client, "cmd-1")
        assert [e.data["seq"] for e in events] == [0, 1, 2, 3, 4]
        assert [e.data["payload"]["text"] for e in events] == ["t0", "t1", "t2", "t3", "t4"]
        assert all(e.server_initiated and e.data["session_id"] == session_id for e in events)
        assert {e.data["event_type"] for e in events} == {"token"}
        assert final.data == {"session_id": session_id, "status": "completed", "result": {"tokens": 5}}

        status = await client.request("status", {"session_id": session_id})
        assert status.data["engine"]["engine_id"] == created.data["engine_id"]
        assert status.data["engine"]["status"] == "idle"


async def test_async_factory_and_seq_restarts_per_command(engine_server: LiveServer) -> None:
    async with connect(engine_server.ws_url) as client:
        session_id, _ = await new_engine(client, "scripted_async")
        for message_id in ("a", "b"):
            await client.send("engine_command", {"session_id": session_id, "command": {"kind": "stream", "n": 2}},
                              message_id=message_id)
            events, final = await collect_command(client, message_id)
            assert [e.data["seq"] for e in events] == [0, 1]
            assert final.data["status"] == "completed"


async def test_ask_user_and_confirm_inside_a_command(engine_server: LiveServer) -> None:
    async with connect(engine_server.ws_url) as client:
        session_id, _ = await new_engine(client)
        asked: list[Message] = []

        @client.on_server_request("user_input")
        def user_input(message: Message) -> dict[str, Any]:
            asked.append(message)
            return {"user_input": "Grace"}

        @client.on_server_request("user_confirmation")
        def user_confirmation(message: Message) -> dict[str, Any]:
            asked.append(message)
            return {"selection": "yes"}

        await client.send("engine_command", {"session_id": session_id, "command": {"kind": "ask"}}, message_id="q")
        _, final = await collect_command(client, "q")
        assert final.data["result"] == {"name": "Grace", "choice": "yes"}
        assert asked[0].data == {"request_type": "user_input", "prompt": "What is your name?", "placeholder": "name",
                                 "session_id": session_id, "command_id": "q"}
        assert asked[1].data == {"request_type": "user_confirmation", "message": "Greet Grace?",
                                 "options": ["yes", "no"], "session_id": session_id, "command_id": "q"}


async def test_confirm_refuses_an_option_that_was_not_offered(engine_server: LiveServer) -> None:
    # The answer is refused to the client and the question stays open (tests/test_answers.py): here the
    # client never answers properly, so the command fails when the question times out.
    async with connect(engine_server.ws_url) as client:
        session_id, _ = await new_engine(client)
        refused: list[Message] = []
        got_refused = anyio.Event()

        @client.on_message("error")
        def on_error(message: Message) -> None:
            refused.append(message)
            got_refused.set()

        client.on_server_request("user_input")(lambda message: {"user_input": "Eve"})
        client.on_server_request("user_confirmation")(lambda message: {"selection": "rm -rf /"})
        await client.send("engine_command", {"session_id": session_id, "command": {"kind": "ask"}}, message_id="q")
        with anyio.fail_after(5):
            await got_refused.wait()
        assert refused[0].data["code"] == "VALIDATION_ERROR"
        [question] = engine_server.runtime.hub.get(client.app_id).pending  # type: ignore[union-attr]
        await client.send("server_response", {"response_type": "user_confirmation", "error": "gave up"},
                          message_id=question)
        _, final = await collect_command(client, "q")
        assert final.data["status"] == "failed"


async def test_notify_carries_the_session(engine_server: LiveServer) -> None:
    async with connect(engine_server.ws_url) as client:
        session_id, _ = await new_engine(client)
        await client.send("engine_command", {"session_id": session_id, "command": {"kind": "notify"}},
                          message_id="n")
        note = await client.receive(timeout=5)
        assert note.type == "notification"
        assert note.data == {"notification_type": "tool_call", "message": "calling a tool", "session_id": session_id,
                             "command_id": "n", "additional_data": {"tool": "search"}}
        _, final = await collect_command(client, "n")
        assert final.data["status"] == "completed"


async def test_cancel_while_streaming(engine_server: LiveServer, probe: Probe) -> None:
    async with connect(engine_server.ws_url) as client:
        session_id, _ = await new_engine(client)
        await client.send("engine_command", {"session_id": session_id, "command": {"kind": "stream_forever"}},
                          message_id="long")
        first = await client.receive(timeout=5)
        assert first.type == "engine_event"
        cancel = await client.request("cancel", {"target_message_id": "long"})
        assert cancel.data == {"target_message_id": "long", "cancelled": True}
        events, final = await collect_command(client, "long")
        seqs = [first.data["seq"]] + [e.data["seq"] for e in events]
        assert seqs == list(range(len(seqs)))  # no gap, even when cut short
        assert final.data == {"session_id": session_id, "status": "cancelled", "result": None}
        assert probe.cancelled == ["stream_forever"]
        # The engine takes the next command.
        await client.send("engine_command", {"session_id": session_id, "command": {"kind": "stream", "n": 1}},
                          message_id="next")
        _, final = await collect_command(client, "next")
        assert final.data["status"] == "completed"


async def test_cancel_while_waiting_for_the_user(engine_server: LiveServer, probe: Probe) -> None:
    async with connect(engine_server.ws_url) as client:
        session_id, _ = await new_engine(client)
        dialog_open = anyio.Event()
        dialog_closed = anyio.Event()

        @client.on_server_request("user_input")
        async def slow_user(message: Message) -> dict[str, Any]:
            dialog_open.set()
            try:
                await anyio.sleep_forever()
            finally:
                dialog_closed.set()
            raise AssertionError

        await client.send("engine_command", {"session_id": session_id, "command": {"kind": "ask"}}, message_id="q")
        with anyio.fail_after(5):
            await dialog_open.wait()
        assert (await client.request("cancel", {"target_message_id": "q"})).data["cancelled"] is True
        _, final = await collect_command(client, "q")
        assert final.data["status"] == "cancelled"
        with anyio.fail_after(5):
            await dialog_closed.wait()  # the server withdrew its question
        assert engine_server.runtime.hub.pending_request_count() == 0


async def test_cancel_a_queued_command_before_it_starts(engine_server: LiveServer, probe: Probe) -> None:
    async with connect(engine_server.ws_url) as client:
        session_id, _ = await new_engine(client)
        await client.send("engine_command", {"session_id": session_id, "command": {"kind": "wait", "tag": "first"}},
                          message_id="first")
        await client.send("engine_command", {"session_id": session_id, "command": {"kind": "wait", "tag": "second"}},
                          message_id="second")
        with anyio.fail_after(5):
            await probe.started_event("first").wait()
        assert (await client.request("cancel", {"target_message_id": "second"})).data["cancelled"] is True
        probe.release_event("first").set()
        _, first = await collect_command(client, "first")
        _, second = await collect_command(client, "second")
        assert (first.data["status"], second.data["status"]) == ("completed", "cancelled")
        assert probe.order == ["first"]  # the cancelled command never ran


async def test_commands_to_one_engine_run_one_at_a_time_in_order(engine_server: LiveServer, probe: Probe) -> None:
    async with connect(engine_server.ws_url) as client:
        session_id, _ = await new_engine(client)
        tags = [f"c{i}" for i in range(5)]
        for tag in tags:
            await client.send("engine_command", {"session_id": session_id, "command": {"kind": "wait", "tag": tag}},
                              message_id=tag)
        for i, tag in enumerate(tags):
            with anyio.fail_after(5):
                await probe.started_event(tag).wait()
            assert probe.order == tags[: i + 1], "the next command must not start before this one ends"
            status = await client.request("status", {"session_id": session_id})
            assert status.data["engine"]["status"] == "running"
            probe.release_event(tag).set()
            _, final = await collect_command(client, tag)
            assert final.data["result"] == {"released": tag}


async def test_commands_on_different_sessions_run_concurrently(engine_server: LiveServer, probe: Probe) -> None:
    async with connect(engine_server.ws_url) as client:
        first, _ = await new_engine(client)
        second, _ = await new_engine(client)
        await client.send("engine_command", {"session_id": first, "command": {"kind": "wait", "tag": "x"}},
                          message_id="x")
        await client.send("engine_command", {"session_id": second, "command": {"kind": "wait", "tag": "y"}},
                          message_id="y")
        with anyio.fail_after(5):
            await probe.started_event("x").wait()
            await probe.started_event("y").wait()  # both running at once
        probe.release_event("y").set()
        _, y = await collect_command(client, "y")
        probe.release_event("x").set()
        _, x = await collect_command(client, "x")
        assert x.data["status"] == y.data["status"] == "completed"


async def test_engine_error_codes(engine_server: LiveServer) -> None:
    async with connect(engine_server.ws_url) as client:
        session_id = await client.create_session()

        with pytest.raises(RequestError) as error:
            await client.request("engine_command", {"session_id": session_id, "command": {}})
        assert error.value.code == "ENGINE_NOT_FOUND"

        with pytest.raises(RequestError) as error:
            await client.request("create_engine", {"session_id": session_id, "engine_type": "gpt-9"})
        assert error.value.code == "INVALID_ENGINE_TYPE"
        assert error.value.details["registered_types"] == ["broken", "scripted", "scripted_async"]

        for engine_type, config in (("broken", {}), ("scripted", {"fail_start": True})):
            with pytest.raises(RequestError) as error:
                await client.request("create_engine", {"session_id": session_id, "engine_type": engine_type,
                                                       "config": config})
            assert error.value.code == "ENGINE_CREATION_FAILED"
            assert "secret" not in str(error.value.response.data)

        await client.request("create_engine", {"session_id": session_id, "engine_type": "scripted"})
        with pytest.raises(RequestError) as error:
            await client.request("create_engine", {"session_id": session_id, "engine_type": "scripted"})
        assert error.value.code == "ENGINE_EXISTS"

        with pytest.raises(RequestError) as error:
            await client.request("create_engine", {"session_id": "not-mine", "engine_type": "scripted"})
        assert error.value.code == "SESSION_NOT_FOUND"


async def test_failing_command_reports_failed_without_internals(engine_server: LiveServer) -> None:
    async with connect(engine_server.ws_url) as client:
        session_id, _ = await new_engine(client)
        for kind in ("fail", "unserialisable"):
            await client.send("engine_command", {"session_id": session_id, "command": {"kind": kind}},
                              message_id=kind)
            _, final = await collect_command(client, kind)
            assert final.data["status"] == "failed"
            assert "secret" not in final.data["error"]
        status = await client.request("status", {"session_id": session_id})
        assert status.data["engine"]["status"] in {"failed", "idle"}
        await client.send("engine_command", {"session_id": session_id, "command": {"kind": "stream", "n": 1}},
                          message_id="ok")
        _, final = await collect_command(client, "ok")
        assert final.data["status"] == "completed"


async def test_delete_engine_keeps_the_session(engine_server: LiveServer, probe: Probe) -> None:
    async with connect(engine_server.ws_url) as client:
        session_id, engine_id = await new_engine(client)
        await client.send("engine_command", {"session_id": session_id, "command": {"kind": "wait", "tag": "w"}},
                          message_id="w")
        with anyio.fail_after(5):
            await probe.started_event("w").wait()
        deleted = await client.request("delete_engine", {"session_id": session_id})
        assert deleted.type == "delete_engine_res"
        assert deleted.data == {"session_id": session_id, "engine_id": engine_id, "deleted": True}
        _, final = await collect_command(client, "w")
        assert final.data["status"] == "cancelled"
        assert probe.stopped == [session_id]
        status = await client.request("status", {"session_id": session_id})
        assert status.data["engine"] is None
        with pytest.raises(RequestError) as error:
            await client.request("delete_engine", {"session_id": session_id})
        assert error.value.code == "ENGINE_NOT_FOUND"
        # A new engine can take its place.
        await client.request("create_engine", {"session_id": session_id, "engine_type": "scripted"})


async def test_close_session_stops_its_engine(engine_server: LiveServer, probe: Probe) -> None:
    async with connect(engine_server.ws_url) as client:
        session_id, _ = await new_engine(client)
        await client.request("close_session", {"session_id": session_id})
        assert probe.stopped == [session_id]
        assert engine_server.runtime.engines.running() == 0


async def test_disconnect_mid_command_stops_the_engine(engine_server: LiveServer, probe: Probe) -> None:
    async with connect(engine_server.ws_url, resume=False) as client:
        session_id, _ = await new_engine(client)
        await client.send("engine_command", {"session_id": session_id, "command": {"kind": "stream_forever"}},
                          message_id="long")
        assert (await client.receive(timeout=5)).type == "engine_event"
        connection = engine_server.runtime.hub.get(client.app_id)
        await client.abort()
    await wait_cleaned(connection)
    assert probe.cancelled == ["stream_forever"]
    assert probe.stopped == [session_id]
    runtime = engine_server.runtime
    assert (len(runtime.hub), len(runtime.sessions), runtime.engines.running()) == (0, 0, 0)
    assert runtime.hub.pending_request_count() == 0


async def test_failing_and_hanging_stop_do_not_block_cleanup(make_app: Any, probe: Probe) -> None:
    app = engine_app(make_app, probe, engine_stop_timeout=0.1)
    async with serve(app) as server:
        async with connect(server.ws_url) as client:
            failing, _ = await new_engine(client, fail_stop=True)
            hanging, _ = await new_engine(client, hang_stop=True)
            connection = server.runtime.hub.get(client.app_id)
        await wait_cleaned(connection)
        assert sorted(probe.stopped) == sorted([failing, hanging])
        assert len(server.runtime.sessions) == 0


async def test_idle_engines_are_stopped(make_app: Any, probe: Probe) -> None:
    app = engine_app(make_app, probe, engine_idle_timeout=0.1, session_reap_interval=0.05)
    async with serve(app) as server, connect(server.ws_url) as client:
        session_id, engine_id = await new_engine(client)
        note = await client.receive(timeout=5)
        assert note.data["notification_type"] == "engine_stopped"
        assert note.data["additional_data"] == {"engine_id": engine_id, "reason": "idle"}
        assert probe.stopped == [session_id]
        status = await client.request("status", {"session_id": session_id})
        assert status.data["engine"]["status"] == "stopped"
        with pytest.raises(RequestError) as error:
            await client.request("engine_command", {"session_id": session_id, "command": {}})
        assert error.value.code == "ENGINE_NOT_FOUND"
        assert "idle" in error.value.message
        await client.request("create_engine", {"session_id": session_id, "engine_type": "scripted"})


async def test_engines_visible_in_info_and_readiness(engine_server: LiveServer) -> None:
    async with connect(engine_server.ws_url) as client, httpx.AsyncClient(base_url=engine_server.http_url) as http:
        await new_engine(client)
        info = (await http.get("/api/info")).json()
        ready = (await http.get("/health/ready")).json()
    assert info["engine_types"] == ["broken", "scripted", "scripted_async"]
    assert ready["engines"] == 1


async def test_a_client_cannot_touch_another_apps_engine(engine_server: LiveServer) -> None:
    async with connect(engine_server.ws_url) as owner, connect(engine_server.ws_url) as other:
        session_id, _ = await new_engine(owner)
        for message_type, data in (
            ("engine_command", {"session_id": session_id, "command": {"kind": "stream", "n": 1}}),
            ("delete_engine", {"session_id": session_id}),
            ("create_engine", {"session_id": session_id, "engine_type": "scripted"}),
        ):
            with pytest.raises(RequestError) as error:
                await other.request(message_type, data)
            assert error.value.code == "SESSION_NOT_FOUND"


async def test_an_engine_whose_start_fails_still_gets_its_stop(engine_server: LiveServer, probe: Probe) -> None:
    async with connect(engine_server.ws_url) as client:
        session_id = await client.create_session()
        with pytest.raises(RequestError) as error:
            await client.request("create_engine", {"session_id": session_id, "engine_type": "scripted",
                                                   "config": {"fail_start": True}})
        assert error.value.code == "ENGINE_CREATION_FAILED"
        assert probe.stopped == [session_id]  # what start() had opened is released
        assert engine_server.runtime.engines.running() == 0


async def test_concurrent_create_engine_runs_one_factory(make_app: Any, probe: Probe) -> None:
    """64 create_engine for one session at once: one factory and one start(), 63 ENGINE_EXISTS (the
    session's engine slot is taken before the factory runs)."""
    made: list[str] = []
    extensions = Extensions()

    async def counting_factory(session: Session, cfg: dict[str, Any]) -> ScriptedEngine:
        made.append(session.session_id)
        await anyio.sleep(0.05)  # a factory that takes a while (say, opening an HTTP client): the race window
        return ScriptedEngine(session, cfg, probe)

    extensions.register_engine("slow", counting_factory)
    async with serve(make_app(extensions)) as server, connect(server.ws_url) as client:
        session_id = await client.create_session()
        outcomes: list[str] = []

        async def create(n: int) -> None:
            try:
                await client.request("create_engine", {"session_id": session_id, "engine_type": "slow"},
                                     message_id=f"create-{n}")
                outcomes.append("created")
            except RequestError as error:
                outcomes.append(error.code)

        async with anyio.create_task_group() as tg:
            for n in range(64):
                tg.start_soon(create, n)
        assert sorted(outcomes) == ["ENGINE_EXISTS"] * 63 + ["created"]
        assert made == [session_id] and probe.started == [session_id]


async def test_a_command_pipelined_behind_create_engine_waits_for_the_engine(engine_server: LiveServer) -> None:
    """create_engine then engine_command without waiting for create_engine_res: the command runs."""
    async with connect(engine_server.ws_url) as client:
        session_id = await client.create_session()
        await client.send("create_engine", {"session_id": session_id, "engine_type": "scripted_async"},
                          message_id="create")
        await client.send("engine_command", {"session_id": session_id, "command": {"kind": "stream", "n": 3}},
                          message_id="run")
        events, result = await collect_command(client, "run")
        assert [e.data["payload"]["text"] for e in events] == ["t0", "t1", "t2"]
        assert result.data["status"] == "completed"


async def test_commands_queued_behind_a_failing_start_are_answered(make_app: Any, probe: Probe) -> None:
    """A command sent while its engine starts waits; when start() then fails, it is answered (failed)."""
    starting, fail_now = anyio.Event(), anyio.Event()

    class FailingStart(ScriptedEngine):
        async def start(self) -> None:
            starting.set()
            await fail_now.wait()
            raise RuntimeError("start failed: secret-token-789")

    extensions = Extensions()
    extensions.register_engine("failing", lambda session, cfg: FailingStart(session, cfg, probe))
    async with serve(make_app(extensions)) as server, connect(server.ws_url) as client:
        session_id = await client.create_session()
        connection = server.runtime.hub.get(client.app_id)
        assert connection is not None
        creation: list[str] = []

        async def create() -> None:
            with pytest.raises(RequestError) as error:
                await client.request("create_engine", {"session_id": session_id, "engine_type": "failing"})
            creation.append(error.value.code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(create)
            with anyio.fail_after(5):
                await starting.wait()
            await client.send("engine_command", {"session_id": session_id, "command": {"kind": "stream", "n": 3}},
                              message_id="run")
            await server.eventually(lambda: "run" in connection.in_flight)
            fail_now.set()
            _, result = await collect_command(client, "run")
        assert creation == ["ENGINE_CREATION_FAILED"]
        assert result.data["status"] == "failed"
        assert "could not be started" in result.data["error"] and "secret" not in result.data["error"]
