"""Faults in user code never leave the hub inconsistent: handler, engine and callback exceptions of
every kind, raised at any point (including while the connection is closing), and disconnects in the
middle of a server request, a streaming command, or cleanup itself.

"Every kind" means every ``Exception`` (including ``ExceptionGroup``, ``TimeoutError``, errors that
the server itself meets while encoding a reply) and cancellation that does not come from the server:
a ``CancelledError`` raised by user code on its own (typically by awaiting a task or future that
something else cancelled). Other ``BaseException``\\ s (``KeyboardInterrupt``, ``SystemExit``,
``GeneratorExit``) are out of scope: they mean the process is going down, and they propagate.

After each scenario: the connection is gone from the hub, its sessions, engines, pending server
requests and in-flight requests are gone, ``connection.closed`` is set, the connection counter is
back to zero, and nothing unexpected was logged at ERROR (the faults a test provokes are expected).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
import msgspec
import pytest

from llmgine_ws import (
    AppDisconnected,
    AppNotConnected,
    EngineContext,
    Extensions,
    HandlerContext,
    ProtocolError,
    Session,
)
from llmgine_ws.client import Client, Message, RequestError, connect
from llmgine_ws.connection import Connection
from llmgine_ws.usercode import run_callbacks

from .rawws import raw_connect, send_raw
from .reliability_support import EMPTY, error_trap, registries, wait_registries_empty
from .support import LiveServer, serve, small_send_buffer_socket, wait_cleaned

pytestmark = pytest.mark.anyio


async def stray_cancellation() -> None:
    """Raise CancelledError the way user code meets it: awaiting a future someone else cancelled."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.cancel()
    await future


class Unserialisable:
    pass


class BoomGroup(ExceptionGroup):
    pass


async def raise_kind(kind: str) -> Any:
    """Fail in the way ``kind`` names."""
    if kind == "runtime":
        raise RuntimeError("handler bug: secret")
    if kind == "group":
        raise BoomGroup("several", [ValueError("a"), KeyError("b")])
    if kind == "timeout":
        with anyio.fail_after(0.001):
            await anyio.sleep_forever()
    if kind == "cancelled":
        await stray_cancellation()
    if kind == "bad_result":
        return {"value": Unserialisable()}
    if kind == "deep_result":
        return deep(5000)
    if kind == "bad_details":
        raise ProtocolError("CUSTOM", "details nobody can encode", {"obj": Unserialisable()})
    if kind == "ok":
        return {"fine": True}
    raise AssertionError(kind)


def deep(depth: int) -> dict[str, Any]:
    """A result nested too deeply to encode."""
    value: Any = []
    for _ in range(depth):
        value = [value]
    return {"deep": value}


def raise_kind_sync(kind: str) -> Any:
    if kind == "runtime":
        raise RuntimeError("inline bug")
    if kind == "group":
        raise BoomGroup("several", [ValueError("a")])
    if kind == "cancelled":
        raise asyncio.CancelledError()
    if kind == "bad_result":
        return {"value": Unserialisable()}
    if kind == "deep_result":
        return deep(5000)
    if kind == "bad_details":
        raise ProtocolError("CUSTOM", "details nobody can encode", {"obj": Unserialisable()})
    if kind == "ok":
        return {"fine": True}
    raise AssertionError(kind)


class Kind(msgspec.Struct):
    kind: str


HANDLER_KINDS = ["runtime", "group", "timeout", "cancelled", "bad_result", "deep_result", "bad_details"]
INLINE_KINDS = ["runtime", "group", "cancelled", "bad_result", "deep_result", "bad_details"]


def fault_app(make_app: Any, extensions: Extensions | None = None, **config: Any) -> Any:
    extensions = extensions or Extensions()

    async def fail(data: Kind, ctx: HandlerContext) -> Any:
        return await raise_kind(data.kind)

    def fail_inline(data: Kind, ctx: HandlerContext) -> Any:
        return raise_kind_sync(data.kind)

    extensions.register_handler("fail", Kind, fail)
    extensions.register_handler("fail_inline", Kind, fail_inline)
    return make_app(extensions, **config)


async def server_noticed(server: LiveServer, connection: Connection) -> None:
    """Wait until the server has seen the connection go (its cleanup has begun)."""
    await server.eventually(lambda: connection.closing)


async def assert_clean(server: LiveServer, connection: Connection | None) -> None:
    if connection is not None:
        await wait_cleaned(connection)
    await wait_registries_empty(server.runtime)


def own_connection(server: LiveServer, client: Client) -> Connection:
    connection = server.runtime.hub.get(client.app_id)
    assert connection is not None
    return connection


# ------------------------------------------------------------------------ handlers


@pytest.mark.parametrize("message_type", ["fail", "fail_inline"])
async def test_handler_failures_of_every_kind_are_answered_and_the_connection_lives(
    make_app: Any, message_type: str
) -> None:
    kinds = HANDLER_KINDS if message_type == "fail" else INLINE_KINDS
    with error_trap("raised", "failed to handle") as trap:
        async with serve(fault_app(make_app)) as server:
            async with connect(server.ws_url) as client:
                connection = own_connection(server, client)
                for kind in kinds:
                    with pytest.raises(RequestError) as error:
                        await client.request(message_type, {"kind": kind}, message_id=f"{message_type}-{kind}",
                                             timeout=5)
                    assert error.value.code == "INTERNAL_ERROR", (kind, error.value)
                    assert error.value.message_id == f"{message_type}-{kind}"
                    assert "secret" not in error.value.message
                    assert (await client.request("ping", timeout=5)).type == "ping_res"
                assert (await client.request(message_type, {"kind": "ok"})).data == {"fine": True}
                assert not client.closed
            await assert_clean(server, connection)
    assert len(trap.records) == len(kinds)  # each fault logged once, with its traceback
    assert all(record.exc_info for record in trap.records)


async def test_handler_whose_request_to_another_app_is_cut_off(make_app: Any) -> None:
    """A handler relays a question to another app, which disconnects: the handler did not expect
    AppDisconnected, so its own client gets INTERNAL_ERROR (not silence)."""
    asked = anyio.Event()
    extensions = Extensions()

    async def relay(data: dict[str, Any], ctx: HandlerContext) -> Any:
        answer = await ctx.messaging.send_to_app_and_wait(data["to"], data={"request_type": "question"}, timeout=30)
        return answer.data

    extensions.register_handler("relay", dict[str, Any], relay)
    with error_trap("raised"):
        async with serve(make_app(extensions)) as server:
            async with connect(server.ws_url, resume=False) as asker, connect(server.ws_url, resume=False) as target:

                @target.on_server_request("question")
                async def never(message: Message) -> dict[str, Any]:
                    asked.set()
                    await anyio.sleep_forever()
                    raise AssertionError

                async with anyio.create_task_group() as tg:
                    outcome: list[RequestError] = []

                    async def ask() -> None:
                        with pytest.raises(RequestError) as error:
                            await asker.request("relay", {"to": target.app_id}, timeout=5)
                        outcome.append(error.value)

                    tg.start_soon(ask)
                    with anyio.fail_after(5):
                        await asked.wait()
                    await target.abort()
                assert outcome[0].code == "INTERNAL_ERROR"
                assert (await asker.request("ping")).type == "ping_res"
            await wait_registries_empty(server.runtime)


async def test_handler_that_fails_while_its_connection_closes(make_app: Any) -> None:
    """Handlers cancelled by the disconnect that raise instead (or await and fail) are contained."""
    started: list[str] = []
    all_started = anyio.Event()
    kinds = ["raise_on_cancel", "await_then_raise", "swallow_cancel", "stray_cancel_on_cancel", "send_on_cancel",
             "ask_on_cancel"]

    async def stubborn(data: Kind, ctx: HandlerContext) -> Any:
        started.append(data.kind)
        if len(started) == len(kinds):
            all_started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            if data.kind == "raise_on_cancel":
                raise RuntimeError("cleanup in the handler failed") from None
            if data.kind == "await_then_raise":
                with anyio.CancelScope(shield=True):
                    await anyio.lowlevel.checkpoint()
                raise ValueError("after a shielded await") from None
            if data.kind == "swallow_cancel":
                return {"swallowed": True}
            if data.kind == "stray_cancel_on_cancel":
                with anyio.CancelScope(shield=True):
                    await stray_cancellation()
            if data.kind == "send_on_cancel":
                await ctx.send("notification", {"too": "late"})
            if data.kind == "ask_on_cancel":
                await ctx.ask(data={"request_type": "too_late"})
            raise
        raise AssertionError

    extensions = Extensions()
    extensions.register_handler("stubborn", Kind, stubborn)
    with error_trap("raised"):
        async with serve(make_app(extensions)) as server:
            for close in ("abort", "close"):
                started.clear()
                all_started = anyio.Event()
                async with connect(server.ws_url, resume=False) as client:
                    connection = own_connection(server, client)
                    await client.create_session()
                    for kind in kinds:
                        await client.send("stubborn", {"kind": kind})
                    with anyio.fail_after(5):
                        await all_started.wait()
                    await (client.abort() if close == "abort" else client.close())
                await assert_clean(server, connection)


# ------------------------------------------------------------------------ callbacks


CALLBACK_KINDS = ["runtime", "group", "timeout", "cancelled"]


@pytest.mark.parametrize("kind", CALLBACK_KINDS)
async def test_failing_callbacks_of_every_kind_never_stop_cleanup(make_app: Any, kind: str) -> None:
    calls: list[str] = []
    extensions = Extensions()

    def make(name: str) -> Any:
        async def callback(arg: Any) -> None:
            calls.append(name)
            await raise_kind(kind)

        return callback

    async def after_disconnect(app_id: str) -> None:
        calls.append("after_disconnect")

    async def after_destroyed(session: Session) -> None:
        calls.append("after_destroyed")

    extensions.register_connection_callback("connect", make("connect"))
    extensions.register_connection_callback("disconnect", make("disconnect"))
    extensions.register_connection_callback("disconnect", after_disconnect)
    extensions.register_session_callback("session_created", make("created"))
    extensions.register_session_callback("session_destroyed", make("destroyed"))
    extensions.register_session_callback("session_destroyed", after_destroyed)
    with error_trap("callback"):
        async with serve(fault_app(make_app, extensions)) as server:
            async with connect(server.ws_url) as client:
                connection = own_connection(server, client)
                closed = await client.create_session()
                await client.create_session()
                await client.request("close_session", {"session_id": closed})
                assert (await client.request("ping")).type == "ping_res"
            await assert_clean(server, connection)
    assert calls.count("destroyed") == calls.count("after_destroyed") == 2
    assert calls.count("connect") == calls.count("disconnect") == calls.count("after_disconnect") == 1


# ------------------------------------------------------------------------ engines


class FaultyEngine:
    """An engine whose start, commands and stop fail as configured."""

    def __init__(self, config: dict[str, Any], probe: dict[str, Any]) -> None:
        self.config = config
        self.probe = probe

    async def start(self) -> None:
        if self.config.get("start"):
            await raise_kind(self.config["start"])
        gate = self.probe.get("start_gate")
        if gate is not None:
            self.probe["starting"].set()
            await gate.wait()

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        if command.get("stream"):
            i = 0
            while True:
                await ctx.emit("token", i)
                i += 1
        if command.get("ask"):
            return await ctx.ask_user("name?")
        if command.get("fail_on_cancel"):
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                raise RuntimeError("engine cleanup failed") from None
        return await raise_kind(command["kind"])

    async def stop(self) -> None:
        self.probe.setdefault("stopped", []).append(self.config.get("name"))
        gate = self.probe.get("stop_gate")
        if gate is not None and self.config.get("slow_stop"):
            self.probe["stopping"].set()
            await gate.wait()
        if self.config.get("stop"):
            await raise_kind(self.config["stop"])


def engine_extensions(probe: dict[str, Any]) -> Extensions:
    extensions = Extensions()
    extensions.register_engine("faulty", lambda session, config: FaultyEngine(config, probe))
    return extensions


@pytest.mark.parametrize("kind", ["runtime", "group", "timeout", "cancelled", "bad_result", "deep_result",
                                  "bad_details"])
async def test_engine_command_failures_of_every_kind(make_app: Any, kind: str) -> None:
    probe: dict[str, Any] = {}
    with error_trap("failed on command", "not JSON-serialisable"):
        async with serve(fault_app(make_app, engine_extensions(probe))) as server:
            async with connect(server.ws_url) as client:
                connection = own_connection(server, client)
                session_id = await client.create_session()
                await client.request("create_engine", {"session_id": session_id, "engine_type": "faulty"})
                await client.send("engine_command", {"session_id": session_id, "command": {"kind": kind}},
                                  message_id="cmd")
                final = await next_final(client, "cmd")
                assert final.data["status"] == "failed", final
                assert "secret" not in final.data["error"]
                await client.send("engine_command", {"session_id": session_id, "command": {"kind": "ok"}},
                                  message_id="again")
                assert (await next_final(client, "again")).data["result"] == {"fine": True}
            await assert_clean(server, connection)


@pytest.mark.parametrize("where", ["start", "stop"])
@pytest.mark.parametrize("kind", ["runtime", "group", "timeout", "cancelled"])
async def test_engine_start_and_stop_failures_of_every_kind(make_app: Any, where: str, kind: str) -> None:
    probe: dict[str, Any] = {}
    with error_trap("failed to start", "failed to stop", "did not stop"):
        async with serve(fault_app(make_app, engine_extensions(probe))) as server:
            async with connect(server.ws_url) as client:
                connection = own_connection(server, client)
                sessions = [await client.create_session() for _ in range(3)]
                for i, session_id in enumerate(sessions):
                    config = {"name": i, where: kind} if i == 1 else {"name": i}
                    if where == "start" and i == 1:
                        with pytest.raises(RequestError) as error:
                            await client.request("create_engine", {"session_id": session_id,
                                                                   "engine_type": "faulty", "config": config})
                        assert error.value.code == "ENGINE_CREATION_FAILED"
                    else:
                        await client.request("create_engine", {"session_id": session_id, "engine_type": "faulty",
                                                               "config": config})
                if where == "stop":
                    await client.request("delete_engine", {"session_id": sessions[1]})
                    await client.request("create_engine", {"session_id": sessions[1], "engine_type": "faulty",
                                                           "config": {"name": 1, "stop": kind}})
                assert (await client.request("ping")).type == "ping_res"
            await assert_clean(server, connection)
    # Every engine the factory made gets its stop() once, even one whose start() failed.
    assert set(probe["stopped"]) == {0, 1, 2}
    assert probe["stopped"].count(1) == (2 if where == "stop" else 1)  # stop: the deleted one and its replacement


async def next_final(client: Client, message_id: str) -> Message:
    with anyio.fail_after(5):
        while True:
            message = await client.receive()
            if message.type == "engine_command_res" and message.message_id == message_id:
                return message


# ------------------------------------------------------------------------ disconnect mid-flight


async def test_disconnect_during_a_server_request_from_a_streaming_command(make_app: Any) -> None:
    """An engine asks the user while its command streams; the client vanishes before answering."""
    probe: dict[str, Any] = {}
    with error_trap():
        async with serve(fault_app(make_app, engine_extensions(probe))) as server:
            asked = anyio.Event()
            async with connect(server.ws_url, resume=False) as client:

                @client.on_server_request("user_input")
                async def never(message: Message) -> dict[str, Any]:
                    asked.set()
                    await anyio.sleep_forever()
                    raise AssertionError

                connection = own_connection(server, client)
                session_id = await client.create_session()
                await client.request("create_engine", {"session_id": session_id, "engine_type": "faulty"})
                await client.send("engine_command", {"session_id": session_id, "command": {"ask": True}})
                with anyio.fail_after(5):
                    await asked.wait()
                assert server.runtime.hub.pending_request_count() == 1
                await client.abort()
            await assert_clean(server, connection)


async def test_disconnect_while_a_stream_waits_for_room_in_a_full_outbox(make_app: Any) -> None:
    """The client stops reading mid-stream: the engine blocks on a full outbox; then the client vanishes."""
    probe: dict[str, Any] = {}
    app = fault_app(make_app, engine_extensions(probe), outbound_queue_size=4, send_grace=30)
    with error_trap():
        async with serve(app, sock=small_send_buffer_socket()) as server:
            async with raw_connect(server.ws_url) as raw:  # it never reads
                connection = next(iter(server.runtime.hub))
                await raw.send_json({"type": "create_session", "message_id": "c", "data": {}})
                await server.eventually(lambda: bool(connection.session_ids))
                session_id = next(iter(connection.session_ids))
                await raw.send_json({"type": "create_engine", "message_id": "e",
                                     "data": {"session_id": session_id, "engine_type": "faulty"}})
                await raw.send_json({"type": "engine_command", "message_id": "run",
                                     "data": {"session_id": session_id, "command": {"stream": True}}})
                await server.eventually(lambda: connection.outbox.waiting > 0, timeout=10)
                await raw.abort()
            await assert_clean(server, connection)


async def test_disconnect_while_an_engine_starts(make_app: Any) -> None:
    probe: dict[str, Any] = {"start_gate": anyio.Event(), "starting": anyio.Event()}
    with error_trap():
        async with serve(fault_app(make_app, engine_extensions(probe))) as server:
            async with connect(server.ws_url, resume=False) as client:
                connection = own_connection(server, client)
                session_id = await client.create_session()
                await client.send("create_engine", {"session_id": session_id, "engine_type": "faulty"})
                with anyio.fail_after(5):
                    await probe["starting"].wait()
                await client.abort()
            await assert_clean(server, connection)


# ------------------------------------------------------------------------ disconnect during cleanup


async def test_slow_disconnect_callback_does_not_hold_up_other_disconnects(make_app: Any) -> None:
    release = anyio.Event()
    entered: list[str] = []
    first_entered = anyio.Event()
    extensions = Extensions()

    async def slow_goodbye(app_id: str) -> None:
        entered.append(app_id)
        if len(entered) == 1:
            first_entered.set()
            await release.wait()

    extensions.register_connection_callback("disconnect", slow_goodbye)
    with error_trap():
        async with serve(fault_app(make_app, extensions)) as server:
            async with connect(server.ws_url, resume=False) as slow, connect(server.ws_url, resume=False) as fast:
                slow_connection, fast_connection = own_connection(server, slow), own_connection(server, fast)
                await slow.create_session()
                await fast.create_session()
                await slow.abort()
                with anyio.fail_after(5):
                    await first_entered.wait()
                # The first cleanup is stuck in its callback; a second disconnect goes straight through.
                assert slow_connection.app_id not in server.runtime.hub
                await fast.close()
                await wait_cleaned(fast_connection)
                assert not slow_connection.closed.is_set()
                assert registries(server.runtime) == EMPTY
                release.set()
            await assert_clean(server, slow_connection)


async def test_slow_engine_stop_while_other_sessions_and_clients_go(make_app: Any) -> None:
    """One engine's stop() hangs (until its deadline) while the same client's other sessions are
    destroyed, a session_destroyed callback raises, and another client disconnects."""
    probe: dict[str, Any] = {"stop_gate": anyio.Event(), "stopping": anyio.Event()}
    extensions = engine_extensions(probe)
    destroyed: list[str] = []

    async def on_destroyed(session: Session) -> None:
        destroyed.append(session.session_id)
        if len(destroyed) == 2:
            raise RuntimeError("session_destroyed callback bug")

    extensions.register_session_callback("session_destroyed", on_destroyed)
    app = fault_app(make_app, extensions, engine_stop_timeout=2)
    with error_trap("callback"):
        async with serve(app) as server:
            async with connect(server.ws_url, resume=False) as owner, connect(server.ws_url, resume=False) as other:
                owner_connection, other_connection = own_connection(server, owner), own_connection(server, other)
                sessions = [await owner.create_session() for _ in range(3)]
                for i, session_id in enumerate(sessions):
                    await owner.request("create_engine", {"session_id": session_id, "engine_type": "faulty",
                                                          "config": {"name": i, "slow_stop": i == 0}})
                other_session = await other.create_session()
                await other.request("create_engine", {"session_id": other_session, "engine_type": "faulty",
                                                      "config": {"name": "other"}})
                await owner.abort()
                with anyio.fail_after(5):
                    await probe["stopping"].wait()
                await other.close()
                await wait_cleaned(other_connection)
                assert not owner_connection.closed.is_set()
                probe["stop_gate"].set()
            await assert_clean(server, owner_connection)
    assert sorted(destroyed) == sorted([*sessions, other_session])


async def test_close_session_in_flight_when_the_client_vanishes(make_app: Any) -> None:
    """close_session is stopping a slow engine when its client disconnects: the session_destroyed
    callback still runs to completion, exactly once."""
    probe: dict[str, Any] = {"stop_gate": anyio.Event(), "stopping": anyio.Event()}
    extensions = engine_extensions(probe)
    destroyed: list[str] = []
    finished: list[str] = []

    async def on_destroyed(session: Session) -> None:
        destroyed.append(session.session_id)
        await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()
        finished.append(session.session_id)

    extensions.register_session_callback("session_destroyed", on_destroyed)
    with error_trap():
        async with serve(fault_app(make_app, extensions)) as server:
            async with connect(server.ws_url, resume=False) as client:
                connection = own_connection(server, client)
                session_id = await client.create_session()
                await client.request("create_engine", {"session_id": session_id, "engine_type": "faulty",
                                                       "config": {"slow_stop": True}})
                await client.send("close_session", {"session_id": session_id})
                with anyio.fail_after(5):
                    await probe["stopping"].wait()
                await client.abort()
                await server_noticed(server, connection)
                probe["stop_gate"].set()
            await assert_clean(server, connection)
    assert destroyed == finished == [session_id]


async def test_session_created_callback_in_flight_when_the_client_vanishes(make_app: Any) -> None:
    entered = anyio.Event()
    events: list[str] = []
    extensions = Extensions()

    async def slow_created(session: Session) -> None:
        events.append("created")
        entered.set()
        await anyio.sleep_forever()

    async def destroyed(session: Session) -> None:
        events.append("destroyed")

    extensions.register_session_callback("session_created", slow_created)
    extensions.register_session_callback("session_destroyed", destroyed)
    with error_trap():
        async with serve(fault_app(make_app, extensions)) as server:
            async with connect(server.ws_url, resume=False) as client:
                connection = own_connection(server, client)
                await client.send("create_session", {})
                with anyio.fail_after(5):
                    await entered.wait()
                await client.abort()
            await assert_clean(server, connection)
    assert events == ["created", "destroyed"]


async def test_reaper_and_disconnect_destroy_the_same_sessions(make_app: Any) -> None:
    """The session reaper expires sessions while their client disconnects: each session is destroyed
    (and its callback run) exactly once, whichever path gets there first."""
    probe: dict[str, Any] = {"stop_gate": anyio.Event(), "stopping": anyio.Event()}
    extensions = engine_extensions(probe)
    destroyed: list[str] = []
    all_destroyed = anyio.Event()

    async def on_destroyed(session: Session) -> None:
        destroyed.append(session.session_id)
        if len(destroyed) == 3:
            all_destroyed.set()

    extensions.register_session_callback("session_destroyed", on_destroyed)
    app = fault_app(make_app, extensions, session_timeout=0.05, session_reap_interval=0.02)
    with error_trap():
        async with serve(app) as server:
            async with connect(server.ws_url, resume=False) as client:
                connection = own_connection(server, client)
                sessions = [await client.create_session() for _ in range(3)]
                await client.request("create_engine", {"session_id": sessions[0], "engine_type": "faulty",
                                                       "config": {"slow_stop": True}})
                with anyio.fail_after(5):
                    await probe["stopping"].wait()  # the reaper is stopping the first session's engine
                await client.abort()
                await wait_cleaned(connection)
                probe["stop_gate"].set()
            with anyio.fail_after(5):
                await all_destroyed.wait()
            await assert_clean(server, connection)
    assert sorted(destroyed) == sorted(sessions)


async def test_messaging_to_a_connection_being_cleaned_up(make_app: Any) -> None:
    """Server code keeps sending to, asking and broadcasting at an app while its cleanup runs."""
    release = anyio.Event()
    in_callback = anyio.Event()
    extensions = Extensions()

    async def slow_goodbye(app_id: str) -> None:
        in_callback.set()
        await release.wait()

    extensions.register_connection_callback("disconnect", slow_goodbye)
    with error_trap():
        async with serve(fault_app(make_app, extensions)) as server:
            messaging = server.runtime.messaging
            async with connect(server.ws_url) as client:
                connection = own_connection(server, client)
                app_id = client.app_id
                await client.abort()
                with anyio.fail_after(5):
                    await in_callback.wait()
                for attempt in (messaging.send_to_app(app_id, "notification", {}),
                                messaging.send_to_app_and_wait(app_id, data={"request_type": "x"}, timeout=1)):
                    with pytest.raises((AppNotConnected, AppDisconnected)):
                        await attempt
                assert await messaging.broadcast("notification", {}) == 0
                assert not messaging.is_app_connected(app_id)
                release.set()
            await assert_clean(server, connection)


@pytest.mark.parametrize("cause", ["too_big", "rate_limit", "shutdown"])
async def test_a_policy_close_reaches_the_client_before_slow_cleanup(make_app: Any, cause: str) -> None:
    """The server's close code (here 1009, 1008, 1001) is sent when the server decides to close, not
    after the connection's cleanup (engine stops, callbacks) has run, which may take seconds: a
    client must learn why it was closed even if it hangs up first."""
    release = anyio.Event()
    in_cleanup = anyio.Event()
    extensions = Extensions()

    async def slow_goodbye(app_id: str) -> None:
        in_cleanup.set()
        await release.wait()

    extensions.register_connection_callback("disconnect", slow_goodbye)
    app = make_app(extensions, max_message_size=1024, rate_limit=1, rate_burst=2, rate_limit_strikes=1)
    expected = {"too_big": 1009, "rate_limit": 1008, "shutdown": 1001}[cause]
    with error_trap():
        async with serve(app) as server, connect(server.ws_url, rate_limit_retries=0, resume=False) as client:
            connection = own_connection(server, client)
            async with anyio.create_task_group() as tg:
                if cause == "too_big":
                    await send_raw(client, '{"type": "ping", "message_id": "big", "data": {"timestamp": "%s"}}'
                                          % ("x" * 2000))
                elif cause == "rate_limit":
                    for i in range(5):
                        await client.send("ping", message_id=f"p{i}")
                else:
                    tg.start_soon(server.runtime.shutdown)
                code = await client.wait_closed(timeout=5)
                assert code == expected, (code, client.close_reason)
                assert not connection.closed.is_set()  # cleanup is still running (stuck in the callback)
                release.set()
            await wait_cleaned(connection)


async def test_a_native_task_cancel_is_real_even_inside_a_shield(make_app: Any) -> None:
    """uvicorn cancels connection tasks with Task.cancel() when its graceful shutdown times out; that
    must not be taken for a stray cancellation from a callback (and logged as its failure)."""
    entered = anyio.Event()

    async def patient(arg: str) -> None:
        entered.set()
        await anyio.sleep_forever()

    async def cleanup() -> None:
        with anyio.CancelScope(shield=True):  # as close_connection runs
            await run_callbacks([patient], "app", timeout=10, log=logging.getLogger("test"))

    with error_trap():
        task = asyncio.get_running_loop().create_task(cleanup())
        with anyio.fail_after(5):
            await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
