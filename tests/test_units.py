"""Hub, sessions, connections and routing as units, under asyncio and trio alike."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest
from starlette.testclient import TestClient

from llmgine_ws import APIConfig, AppDisconnected, AppNotConnected, Extensions, HandlerContext, create_app
from llmgine_ws.connection import WS_TRY_AGAIN_LATER, Connection, Link
from llmgine_ws.endpoint import _WriterTask
from llmgine_ws.errors import ProtocolError
from llmgine_ws.hub import Hub
from llmgine_ws.keepalive import KeepAlive
from llmgine_ws.pending import PendingRequest
from llmgine_ws.protocol import FrameEncoder
from llmgine_ws.routing import LocalRouter
from llmgine_ws.sessions import SessionStore

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_connection(app_id: str, *, queue_size: int = 4, send_grace: float = 0.05,
                    queue_bytes: int = 1 << 20) -> Connection:
    return Connection(app_id, queue_size=queue_size, send_grace=send_grace, queue_bytes=queue_bytes)


async def test_session_store_limit_ownership_and_expiry() -> None:
    store = SessionStore(max_sessions=2)
    mine = store.create("app-a")
    store.create("app-b")
    with pytest.raises(ProtocolError) as full:
        store.create("app-a")
    assert full.value.code == "SESSION_LIMIT_REACHED"
    assert store.get_owned(mine.session_id, "app-a") is mine
    with pytest.raises(ProtocolError) as foreign:
        store.get_owned(mine.session_id, "app-b")
    with pytest.raises(ProtocolError) as missing:
        store.get_owned("nope", "app-b")
    assert (foreign.value.code, foreign.value.message) == (missing.value.code, missing.value.message)
    assert store.expired(timeout=3600) == []
    assert {s.session_id for s in store.expired(timeout=-1)} == {s.session_id for s in store}
    assert store.remove(mine.session_id) is mine
    assert store.remove(mine.session_id) is None
    store.create("app-a")  # room again


async def test_pending_request_first_outcome_wins() -> None:
    resolved = PendingRequest("app", "m1")
    resolved.resolve({"ok": True})
    resolved.fail(AppDisconnected("app", "m1"))
    assert await resolved.wait() == {"ok": True}

    failed = PendingRequest("app", "m2")
    failed.fail(AppDisconnected("app", "m2"))
    failed.resolve({"late": True})
    with pytest.raises(AppDisconnected):
        await failed.wait()


async def test_pending_request_times_out_wakes_and_cancels() -> None:
    """The waiter (a bare future and a loop timer on asyncio, an anyio Event elsewhere): a timeout is
    a TimeoutError, an answer from another task wakes it, a cancel scope cancels it."""
    with pytest.raises(TimeoutError):
        await PendingRequest("app", "t").wait(0.01)

    answered = PendingRequest("app", "a")
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: _resolve_soon(answered))
        assert await answered.wait(30) == {"ok": 1}

    waiting = PendingRequest("app", "c")
    with anyio.move_on_after(0.01) as scope:
        await waiting.wait(30)
    assert scope.cancelled_caught
    waiting.resolve({"late": True})  # nobody waits any more: harmless


async def _resolve_soon(pending: PendingRequest) -> None:
    await anyio.lowlevel.checkpoint()
    pending.resolve({"ok": 1})


async def test_hub_tracks_connections_and_signals_empty() -> None:
    hub = Hub()
    first, second = make_connection("a"), make_connection("b")
    hub.add(first)
    hub.add(second)
    with pytest.raises(RuntimeError):
        hub.add(make_connection("a"))
    assert sorted(hub.app_ids()) == ["a", "b"]
    async with anyio.create_task_group() as tg:
        tg.start_soon(hub.wait_empty)
        hub.remove(first)
        hub.remove(first)  # idempotent
        hub.remove(second)
    assert len(hub) == 0


async def test_router_request_resolves_and_fails_promptly_on_disconnect() -> None:
    hub, store = Hub(), SessionStore(10)
    router = LocalRouter(hub, store, max_pending_requests=4)
    connection = make_connection("app")
    hub.add(connection)
    with pytest.raises(AppNotConnected):
        await router.send_to_app("other", "{}")

    async def answer_when_sent() -> None:
        frame = await connection.outbox.get()
        assert frame == "request-frame"
        connection.pending["m1"].resolve({"response_type": "x", "value": 1})

    async with anyio.create_task_group() as tg:
        tg.start_soon(answer_when_sent)
        assert await router.request("app", "m1", "request-frame", timeout=5) == {"response_type": "x", "value": 1}
    assert connection.pending == {}

    async def disconnect_when_sent() -> None:
        await connection.outbox.get()
        connection.fail_pending(AppDisconnected)

    async with anyio.create_task_group() as tg:
        tg.start_soon(disconnect_when_sent)
        with anyio.fail_after(1), pytest.raises(AppDisconnected):
            await router.request("app", "m2", "frame", timeout=30)

    with pytest.raises(TimeoutError):
        await router.request("app", "m3", "frame", timeout=0.01)
    assert connection.pending == {}


async def test_broadcast_never_waits_on_a_full_queue_and_closes_the_slow_connection() -> None:
    hub, store = Hub(), SessionStore(10)
    router = LocalRouter(hub, store, max_pending_requests=4)
    fast, stalled = make_connection("fast", queue_size=8), make_connection("stalled", queue_size=1)
    hub.add(fast)
    hub.add(stalled)
    async with anyio.create_task_group() as tg:
        stalled.attach(tg)  # its late sends run in "its" task group, as in the endpoint
        fast.attach(tg)
        assert await router.broadcast("one", exclude_apps=()) == 2
        with anyio.fail_after(1):  # the broadcaster does not wait for the stalled client
            assert await router.broadcast("two", exclude_apps=()) == 2
        assert [await fast.outbox.get(), await fast.outbox.get()] == ["one", "two"]
        # Nobody reads "stalled": after its grace it is closed with 1013 (its task group cancelled).
    assert stalled.closing
    assert stalled.close_code == WS_TRY_AGAIN_LATER


async def test_send_waits_for_room_within_the_grace() -> None:
    connection = make_connection("app", queue_size=1, send_grace=5)
    connection.send_nowait("first")
    async with anyio.create_task_group() as tg:
        tg.start_soon(connection.send, "second")
        assert await connection.outbox.get() == "first"
        with anyio.fail_after(5):
            assert await connection.outbox.get() == "second"
    assert not connection.closing


async def test_close_with_flush_queues_behind_earlier_frames() -> None:
    connection = make_connection("app")
    connection.send_nowait("last words")
    connection.close(1001, "bye", flush=True)
    assert connection.closing
    assert connection.send_nowait("too late") is False
    assert await connection.outbox.get() == "last words"
    close = await connection.outbox.get()
    assert (close.code, close.reason) == (1001, "bye")  # type: ignore[union-attr]


def test_full_stack_under_each_backend(anyio_backend: str) -> None:
    """The whole endpoint (reader, writer, handlers, server requests) on the backend under test."""

    async def greet(data: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
        answer = await ctx.ask(data={"request_type": "user_input", "prompt": "name?"}, timeout=5)
        return {"hello": answer.data["user_input"]}

    extensions = Extensions()
    extensions.register_handler("greet", dict[str, Any], greet)
    app = create_app(APIConfig(ping_interval=0), extensions)
    with TestClient(app, backend=anyio_backend) as http, http.websocket_connect("/api/ws") as ws:
        connected = ws.receive_json()
        app_id = connected["data"]["app_id"]
        ws.send_json({"type": "create_session", "message_id": "c1", "data": {"app_id": app_id}})
        session_id = ws.receive_json()["data"]["session_id"]
        ws.send_json({"type": "greet", "message_id": "g1", "data": {}})
        request = ws.receive_json()
        assert (request["type"], request["data"]["request_type"]) == ("server_request", "user_input")
        ws.send_json({"type": "server_response", "message_id": request["message_id"],
                      "data": {"response_type": "user_input", "user_input": anyio_backend}})
        reply = ws.receive_json()
        assert isinstance(reply.pop("seq"), int)  # every frame after connected carries one (resume)
        assert reply == {"type": "greet_res", "message_id": "g1", "data": {"hello": anyio_backend}}
        ws.send_json({"type": "status", "message_id": "s1", "data": {"session_id": session_id}})
        assert ws.receive_json()["data"]["session_id"] == session_id
        ws.send_text("not json")
        assert ws.receive_json()["data"]["code"] == "INVALID_JSON"
    runtime = app.state.llmgine
    assert len(runtime.hub) == 0
    assert len(runtime.sessions) == 0


async def test_outbox_is_fifo_across_waiting_producers() -> None:
    from llmgine_ws.outbox import Outbox

    outbox: Outbox[str] = Outbox(2, 1 << 20)
    assert outbox.put_nowait("a")
    assert outbox.put_nowait("b")
    assert not outbox.put_nowait("c")
    async with anyio.create_task_group() as tg:
        for item in ("c", "d", "e"):
            tg.start_soon(outbox.put, item)
            await anyio.wait_all_tasks_blocked()
        assert not outbox.put_nowait("x")  # nobody jumps the producers already waiting
        received = [await outbox.get() for _ in range(5)]
    assert received == ["a", "b", "c", "d", "e"]
    assert outbox.put_nowait("f")


async def test_outbox_close_wakes_everyone() -> None:
    from llmgine_ws.outbox import Outbox, OutboxClosed

    outbox: Outbox[str] = Outbox(1, 1 << 20)
    outbox.put_nowait("a")
    outcomes: list[str] = []

    async def producer() -> None:
        try:
            await outbox.put("b")
        except OutboxClosed:
            outcomes.append("producer refused")

    async with anyio.create_task_group() as tg:
        tg.start_soon(producer)
        await anyio.wait_all_tasks_blocked()
        outbox.close()
    assert outcomes == ["producer refused"]
    with pytest.raises(OutboxClosed):
        await outbox.get()
    assert outbox.put_nowait("c") is False


async def test_outbox_cancelled_producer_leaves_nothing_behind() -> None:
    from llmgine_ws.outbox import Outbox

    outbox: Outbox[str] = Outbox(1, 1 << 20)
    outbox.put_nowait("a")
    with anyio.move_on_after(0.01):
        await outbox.put("never")
    assert len(outbox) == 1
    assert await outbox.get() == "a"
    assert outbox.put_nowait("b")


async def test_send_soon_keeps_order_behind_a_backlog() -> None:
    """Frames that do not fit wait in one ordered backlog (on trio too, which does not start tasks FIFO)."""
    connection = make_connection("app", queue_size=32, send_grace=5)
    frames = [f"f{i}" for i in range(60)]  # 32 fit the outbox, the rest wait in the backlog
    async with anyio.create_task_group() as tg:
        connection.attach(tg)
        assert all(connection.send_soon(frame) for frame in frames)
        assert connection.send_nowait("late") is False  # nothing jumps the backlog
        received = [await connection.outbox.get() for _ in frames]
        await anyio.wait_all_tasks_blocked()  # the drain task has finished with the backlog
        assert connection.send_nowait("after")
    assert received == frames


async def test_a_backlog_past_its_bounds_closes_the_connection() -> None:
    """The backlog holds at most queue_size frames and queue_bytes bytes: past that the client is stalled."""
    connection = make_connection("app", queue_size=4, send_grace=5)
    async with anyio.create_task_group() as tg:
        connection.attach(tg)
        assert all(connection.send_soon(f"f{i}") for i in range(8))  # 4 in the outbox, 4 in the backlog
        assert connection.send_soon("one too many") is False
        assert connection.closing and connection.close_code == 1013
    bytes_bound = make_connection("app", queue_size=100, send_grace=5, queue_bytes=10)
    async with anyio.create_task_group() as tg:
        bytes_bound.attach(tg)
        assert bytes_bound.send_soon("x" * 10) and bytes_bound.send_soon("y" * 10)  # outbox, then backlog
        assert bytes_bound.send_soon("z") is False
        assert bytes_bound.close_code == 1013


def test_the_blocking_messaging_api_mirrors_the_async_one() -> None:
    """Every public method of MessagingAPI has a blocking twin with the same parameters and result."""
    import inspect
    import typing

    from llmgine_ws import BlockingMessagingAPI, MessagingAPI

    def public(cls: type) -> dict[str, Any]:
        return {name: member for name, member in vars(cls).items()
                if not name.startswith("_") and callable(member) and name != "blocking"}

    asynchronous, blocking = public(MessagingAPI), public(BlockingMessagingAPI)
    assert asynchronous.keys() == blocking.keys()
    for name, method in asynchronous.items():
        twin = blocking[name]
        assert list(inspect.signature(method).parameters) == list(inspect.signature(twin).parameters), name
        assert typing.get_type_hints(method) == typing.get_type_hints(twin), name


async def test_an_app_task_group_starts_with_its_first_task() -> None:
    """No task group until a task needs one; tasks spawned while it starts run in it; an app
    closed meanwhile gets its group cancelled at once (its tasks unwind, none outlives it)."""
    ran: list[str] = []

    async def task(name: str) -> None:
        ran.append(name)
        await anyio.sleep_forever()

    async with anyio.create_task_group() as apps:
        connection = make_connection("app")
        assert connection.spawn(task, "orphan") is False  # nowhere to run: refused, not dropped silently
        started: list[Connection] = []
        connection.start_task_group = started.append
        assert connection.spawn(task, "a") and connection.spawn(task, "b")
        assert len(started) == 1  # one group, however many tasks wait for it
        connection.attach(apps)
        await anyio.wait_all_tasks_blocked()
        assert sorted(ran) == ["a", "b"]  # (trio does not start tasks in FIFO order)
        closing = make_connection("closing")
        closing.start_task_group = started.append
        assert closing.spawn(task, "c")
        closing.close(1000, "bye")
        assert closing.spawn(task, "d") is False
        async with anyio.create_task_group() as own:
            closing.attach(own)  # cancelled at once: "c" ends at its first checkpoint
        apps.cancel_scope.cancel()


async def test_one_keepalive_task_pings_every_link_and_drops_the_silent_ones() -> None:
    """The app-wide pinger: each link is pinged every interval; after ``allowed_misses`` unanswered
    pings it is dropped (1011 for an app that cannot be detached); a discarded link is not pinged."""
    keepalive = KeepAlive(0.01, 2, FrameEncoder())
    dropped = anyio.Event()
    silent = Connection("silent", queue_size=4, send_grace=0.05,
                        on_change=lambda: dropped.set() if silent.closing else None)
    gone = make_connection("gone")
    links = {name: Link(connection) for name, connection in (("silent", silent), ("gone", gone))}
    for connection, link in ((silent, links["silent"]), (gone, links["gone"])):
        connection.link = link
        keepalive.add(link)
    keepalive.discard(links["gone"])
    async with anyio.create_task_group() as tg:
        await tg.start(keepalive.run)
        with anyio.fail_after(5):
            await dropped.wait()
        tg.cancel_scope.cancel()
    assert silent.close_code == 1011 and len(silent.unanswered_pings) == 2
    assert '"server_ping"' in str(await silent.outbox.get())
    assert not gone.unanswered_pings and len(keepalive) == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_asyncio_link_task_group_keeps_a_task_groups_rules(anyio_backend: str) -> None:
    """The endpoint's lean task group on asyncio: cancelling it stops the body and the writer; on
    exit it waits for the writer (cancelled first when the body failed); nothing outlives it."""
    ended: list[str] = []

    async def writer() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            ended.append("writer")

    async with _WriterTask() as tasks:
        tasks.start_soon(writer)
        await anyio.wait_all_tasks_blocked()
        tasks.cancel_scope.cancel()
        await anyio.sleep_forever()  # cancelled by the scope, like a task group's host
    assert ended == ["writer"]
    async def failing_body() -> None:
        async with _WriterTask() as tasks:
            tasks.start_soon(writer)
            await anyio.wait_all_tasks_blocked()
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await failing_body()
    assert ended == ["writer", "writer"]
