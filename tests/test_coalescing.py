"""Coalesced token streams (``engine_event_coalesce_ms``): the sans-I/O coalescer, a command's line to
its connection and the flush scheduler (under asyncio and trio), then end to end over real sockets
with the Python client: exact text, order, ``seq``/``coalesced``, flush on end, cancel and error,
and a stalled client that gets bigger batches while the engine never waits for it.
"""

from __future__ import annotations

import json
import random
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

from llmgine_ws import EngineContext, Extensions, Session
from llmgine_ws.client import EngineEvent, connect
from llmgine_ws.connection import Connection
from llmgine_ws.engines.coalescing import CoalescingLine, FlushScheduler, TokenCoalescer, token_text
from llmgine_ws.errors import AppDisconnected
from llmgine_ws.protocol import EngineEventData, FrameEncoder

from .rawws import raw_connect
from .support import serve, small_send_buffer_socket

pytestmark = pytest.mark.anyio

ENCODER = FrameEncoder()


def encode(data: EngineEventData) -> str:
    return ENCODER.event("engine_event", data)


def decoded(frames: Any) -> list[dict[str, Any]]:
    """The ``data`` of each engine_event frame."""
    return [msgspec.json.decode(frame)["data"] for frame in frames]


def text_and_count(events: list[dict[str, Any]]) -> tuple[str, int]:
    tokens = [event for event in events if event["event_type"] == "token"]
    return "".join(event["payload"]["text"] for event in tokens), sum(event.get("coalesced", 1) for event in tokens)


# ------------------------------------------------------------------ sans-I/O: TokenCoalescer


def test_only_plain_text_tokens_are_coalescable() -> None:
    assert token_text("token", {"text": "hi"}) == "hi"
    assert token_text("token", {"text": ""}) == ""
    assert token_text("token", {"text": "hi", "logprob": -1.0}) is None  # more than the text: kept whole
    assert token_text("token", {"text": 3}) is None
    assert token_text("token", "hi") is None
    assert token_text("delta", {"text": "hi"}) is None


def test_deltas_are_merged_exactly_and_in_order() -> None:
    rng = random.Random(14)
    alphabet = "ab c\n\"\\é😀\u2028"
    deltas = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 7))) for _ in range(2000)]
    coalescer = TokenCoalescer("s", "c", encode, max_chars=64 * 1024)
    frames: list[str] = []
    for delta in deltas:
        frames.extend(coalescer.add(delta))
        if rng.random() < 0.05:  # a flush interval ends now and then
            frame = coalescer.flush()
            if frame is not None:
                frames.append(frame)
    frame = coalescer.flush()
    assert frame is not None and coalescer.flush() is None
    frames.append(frame)
    events = decoded(frames)
    assert text_and_count(events) == ("".join(deltas), len(deltas))
    assert [event["seq"] for event in events] == list(range(len(events)))
    assert coalescer.deltas == len(deltas) and coalescer.seq == len(events)
    assert {event["command_id"] for event in events} == {"c"}
    assert all(event["coalesced"] > 1 for event in events if "coalesced" in event)
    assert any(event.get("coalesced", 1) > 50 for event in events)


def test_a_single_delta_goes_out_like_an_uncoalesced_event() -> None:
    coalescer = TokenCoalescer("s", "c", encode, max_chars=100)
    coalescer.add("only")
    [event] = decoded([coalescer.flush()])
    assert event == {"session_id": "s", "command_id": "c", "seq": 0, "event_type": "token",
                     "payload": {"text": "only"}}  # no "coalesced": exactly today's frame


def test_a_batch_never_exceeds_the_byte_cap() -> None:
    coalescer = TokenCoalescer("s", "c", encode, max_chars=10)
    frames: list[str] = []
    for delta in ["abcd", "efgh", "ijkl", "m", "nopqrstuvwxyz0123", "45"]:
        frames.extend(coalescer.add(delta))
    frames.append(coalescer.flush())
    events = decoded(frames)
    texts = [event["payload"]["text"] for event in events]
    assert texts == ["abcdefgh", "ijklm", "nopqrstuvwxyz0123", "45"]  # a delta over the cap goes alone
    assert [event.get("coalesced", 1) for event in events] == [2, 2, 1, 1]
    assert [event["seq"] for event in events] == [0, 1, 2, 3]


def test_other_events_flush_the_pending_deltas_first_and_are_never_merged() -> None:
    coalescer = TokenCoalescer("s", "c", encode, max_chars=1000)
    frames: list[str] = []
    frames.extend(coalescer.event("status", {"text": "not a token"}))  # nothing pending: just the event
    for delta in ["a", "b"]:
        frames.extend(coalescer.add(delta))
    frames.extend(coalescer.event("tool_call", {"tool": "t"}))
    frames.extend(coalescer.event("token", {"text": "c", "extra": 1}))  # not plain text: an event of its own
    frames.extend(coalescer.add("d"))
    frames.append(coalescer.flush())
    events = decoded(frames)
    assert [(e["seq"], e["event_type"], e["payload"], e.get("coalesced", 1)) for e in events] == [
        (0, "status", {"text": "not a token"}, 1),
        (1, "token", {"text": "ab"}, 2),
        (2, "tool_call", {"tool": "t"}, 1),
        (3, "token", {"text": "c", "extra": 1}, 1),
        (4, "token", {"text": "d"}, 1),
    ]


def test_an_unserialisable_event_changes_nothing() -> None:
    coalescer = TokenCoalescer("s", "c", encode, max_chars=1000)
    coalescer.add("a")
    with pytest.raises(TypeError):
        coalescer.event("bad", object())
    assert coalescer.pending == 1 and coalescer.seq == 0
    [event] = decoded([coalescer.flush()])
    assert event["payload"] == {"text": "a"} and event["seq"] == 0


def test_an_uncommitted_batch_keeps_growing() -> None:
    coalescer = TokenCoalescer("s", "c", encode, max_chars=1000)
    coalescer.add("a")
    assert decoded([coalescer.batch()])[0]["payload"] == {"text": "a"}  # offered, not sent
    coalescer.add("b")
    frame = coalescer.batch()
    coalescer.commit()
    assert decoded([frame])[0] == {"session_id": "s", "command_id": "c", "seq": 0, "event_type": "token",
                                   "payload": {"text": "ab"}, "coalesced": 2}
    assert coalescer.pending == 0 and coalescer.batch() is None and coalescer.seq == 1


# ------------------------------------------------------------------ a command's line, under asyncio and trio


both_backends = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])


def make_line(connection: Connection, *, batch_chars: int = 1000, max_frames: int = 4, interval: float = 0.01,
              ) -> tuple[FlushScheduler, CoalescingLine]:
    scheduler = FlushScheduler(interval, batch_chars=batch_chars, max_frames=max_frames, max_chars=10**6)
    coalescer = TokenCoalescer("s", "c", encode, max_chars=batch_chars)
    return scheduler, CoalescingLine(connection, coalescer, scheduler, max_frames=max_frames, max_chars=10**6)


def outbox_frames(connection: Connection) -> list[str]:
    return [item for item in connection.outbox.queued() if isinstance(item, str)]


@both_backends
async def test_the_scheduler_flushes_a_line_once_its_interval_is_up(anyio_backend: str) -> None:
    connection = Connection("app", queue_size=8, send_grace=1.0)
    scheduler = FlushScheduler(0.01, batch_chars=1000, max_frames=8, max_chars=10**6)
    assert scheduler.line(connection, "s", "c", encode) is None  # not running: no coalescing
    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        line = scheduler.line(connection, "s", "c", encode)
        assert line is not None
        for delta in ["to", "ken", "s"]:
            line.token(delta)
        with anyio.fail_after(5):
            first = await connection.outbox.get()
        line.token("!")
        with anyio.fail_after(5):
            second = await connection.outbox.get()
        tg.cancel_scope.cancel()
    assert decoded([first, second]) == [
        {"session_id": "s", "command_id": "c", "seq": 0, "event_type": "token", "payload": {"text": "tokens"},
         "coalesced": 3},
        {"session_id": "s", "command_id": "c", "seq": 1, "event_type": "token", "payload": {"text": "!"}},
    ]
    assert not scheduler.running and len(scheduler) == 0


@both_backends
async def test_a_full_outbox_makes_the_batch_grow_instead_of_waiting(anyio_backend: str) -> None:
    connection = Connection("app", queue_size=1, send_grace=1.0)
    scheduler, line = make_line(connection)
    assert connection.send_nowait("someone else's frame")
    for delta in "abc":
        line.token(delta)  # never waits
    line.flush_due()  # the interval is up, but there is no room: nothing is sent, the batch stays open
    assert outbox_frames(connection) == ["someone else's frame"] and line.coalescer.pending == 3
    assert len(scheduler) == 2  # scheduled again
    line.token("d")
    assert await connection.outbox.get() == "someone else's frame"
    line.flush_due()
    [event] = decoded(outbox_frames(connection))
    assert (event["payload"], event["coalesced"], event["seq"]) == ({"text": "abcd"}, 4, 0)


@both_backends
async def test_full_batches_wait_in_order_and_a_client_past_the_bounds_is_closed(anyio_backend: str) -> None:
    connection = Connection("app", queue_size=1, send_grace=1.0)
    _, line = make_line(connection, batch_chars=2, max_frames=2)
    assert connection.send_nowait("blocker")
    line.token("ab")  # a full batch, no room: it waits in the line
    line.token("cd")
    assert not connection.closing
    with pytest.raises(AppDisconnected):
        line.token("ef")  # a third full batch: past max_frames
    assert connection.closing and connection.close_code == 1013
    with pytest.raises(AppDisconnected):
        line.token("gh")


@both_backends
async def test_flush_sends_waiting_batches_then_pending_deltas_then_events(anyio_backend: str) -> None:
    connection = Connection("app", queue_size=1, send_grace=5.0)
    _, line = make_line(connection, batch_chars=4)
    assert connection.send_nowait("blocker")
    for delta in ["ab", "cd", "ef"]:  # "abcd" is full and waits; "ef" is pending
        line.token(delta)
    received: list[str] = []

    async def read(count: int) -> None:
        for _ in range(count):
            received.append(await connection.outbox.get())

    async with anyio.create_task_group() as tg:
        tg.start_soon(read, 4)
        with anyio.fail_after(5):
            await line.event("tool_call", {"tool": "t"})
            line.token("gh")
            await line.flush()
    line.close()
    assert received[0] == "blocker"
    events = decoded(received[1:])
    assert [(e["seq"], e["event_type"], e["payload"]) for e in events] == [
        (0, "token", {"text": "abcd"}), (1, "token", {"text": "ef"}), (2, "tool_call", {"tool": "t"})]
    [last] = decoded(outbox_frames(connection))
    assert (last["seq"], last["payload"]) == (3, {"text": "gh"})
    line.flush_due()  # a closed line is left alone by the scheduler
    assert line.coalescer.pending == 0


# ------------------------------------------------------------------ end to end: the Python client


class Burster:
    """Streams numbered tokens in bursts, with a marker event between bursts, then ends as told."""

    def __init__(self, session: Session, config: dict[str, Any], probe: dict[str, Any]) -> None:
        self.probe = probe

    async def start(self) -> None:
        pass

    async def handle_command(self, command: dict[str, Any], ctx: EngineContext) -> Any:
        n, burst = command["n"], command.get("burst", 5)
        for i in range(n):
            await ctx.emit("token", {"text": f"<{i}>"})
            if i % burst == burst - 1:
                if command.get("marks"):
                    await ctx.emit("mark", {"after": i})
                await anyio.sleep(command.get("gap", 0))
        self.probe["emitted"].set()
        end = command.get("end", "return")
        if end == "raise":
            raise RuntimeError("the model fell over")
        if end == "wait":
            await anyio.sleep_forever()
        return {"n": n}

    async def stop(self) -> None:
        pass


def burster_app(make_app: Any, probe: dict[str, Any], **config: Any) -> Any:
    extensions = Extensions()
    extensions.register_engine("burster", lambda session, cfg: Burster(session, cfg, probe))
    return make_app(extensions, **config)


def expected(n: int) -> str:
    return "".join(f"<{i}>" for i in range(n))


def check_stream(events: list[EngineEvent], n: int) -> None:
    """Exact text, every delta counted, seq without gaps, each marker after the tokens before it."""
    assert [event.seq for event in events] == list(range(len(events)))
    text = ""
    deltas = 0
    for event in events:
        if event.event_type == "token":
            text += event.payload["text"]
            deltas += event.coalesced
        else:
            assert event.event_type == "mark" and event.coalesced == 1
            assert text == expected(event.payload["after"] + 1)  # never overtaken, never overtaking
    assert (text, deltas) == (expected(n), n)


async def test_the_python_client_yields_coalesced_tokens(make_app: Any) -> None:
    probe = {"emitted": anyio.Event()}
    async with serve(burster_app(make_app, probe)) as server, connect(server.ws_url) as client:
        session_id = await client.create_session()
        await client.create_engine(session_id, "burster")
        command = client.command(session_id, {"n": 200, "burst": 5, "gap": 0.002, "marks": True})
        events = [event async for event in command]
        assert command.result is not None and command.result.status == "completed"
        assert command.result.result == {"n": 200}
        check_stream(events, 200)
        tokens = [event for event in events if event.event_type == "token"]
        assert len(tokens) < 200 and max(event.coalesced for event in tokens) > 1

        # Off (engine_event_coalesce_ms=0): one frame per delta, as before.
        server.runtime.engines._coalescing = None
        session_id = await client.create_session()
        await client.create_engine(session_id, "burster")
        command = client.command(session_id, {"n": 20, "marks": True})
        events = [event async for event in command]
        check_stream(events, 20)
        assert all(event.coalesced == 1 for event in events) and len(events) == 24


@pytest.mark.parametrize("end", ["return", "raise", "wait"])
async def test_pending_tokens_go_out_before_the_result(make_app: Any, end: str) -> None:
    """With an interval nothing reaches (a minute), only the command's end flushes: completed, failed
    or cancelled, the result comes after every token, in one frame."""
    probe = {"emitted": anyio.Event()}
    app = burster_app(make_app, probe, engine_event_coalesce_ms=60_000)
    async with serve(app) as server, connect(server.ws_url) as client:
        session_id = await client.create_session()
        await client.create_engine(session_id, "burster")
        command = client.command(session_id, {"n": 50, "end": end})
        events: list[EngineEvent] = []

        async def collect() -> None:
            events.extend([event async for event in command])

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(collect)
                await probe["emitted"].wait()
                if end == "wait":
                    assert await client.cancel(command.message_id)
        assert command.result is not None
        assert command.result.status == {"return": "completed", "raise": "failed", "wait": "cancelled"}[end]
        [event] = events
        assert (event.seq, event.payload, event.coalesced) == (0, {"text": expected(50)}, 50)


async def reply(raw: Any, message_id: str) -> dict[str, Any]:
    while True:
        message = await raw.receive_json()
        if message["message_id"] == message_id:
            return message


async def test_a_stalled_client_gets_bigger_batches_while_the_engine_never_waits(make_app: Any) -> None:
    """The client reads nothing while its engine streams: once the outbox is full the batch grows
    (across many flush intervals) instead of the engine waiting or the client being closed; then
    the client reads, and every delta arrives, exactly."""
    queue_size, after = 4, 300
    probe: dict[str, Any] = {"emitted": anyio.Event()}
    extensions = Extensions()
    extensions.register_engine("filler", lambda session, cfg: Filler(probe))
    app = make_app(extensions, outbound_queue_size=queue_size, send_grace=0.5, rate_limit=0)
    with small_send_buffer_socket() as sock:
        async with serve(app, sock=sock) as server, raw_connect(server.ws_url) as raw:
            await raw.send_text(json.dumps({"type": "create_session", "message_id": "c", "data": {}}))
            session_id = (await reply(raw, "c"))["data"]["session_id"]
            await raw.send_text(json.dumps({"type": "create_engine", "message_id": "e",
                                            "data": {"session_id": session_id, "engine_type": "filler"}}))
            assert (await reply(raw, "e"))["type"] == "create_engine_res"
            connection = next(iter(server.runtime.hub))
            probe["full"] = lambda: len(connection.outbox) >= queue_size
            await raw.send_text(json.dumps({"type": "engine_command", "message_id": "run", "data": {
                "session_id": session_id, "command": {"after": after}}}))
            with anyio.fail_after(30):
                await probe["emitted"].wait()  # the engine finished while its client read nothing
            assert not connection.closing
            events: list[dict[str, Any]] = []
            with anyio.fail_after(30):
                while True:
                    message = await raw.receive_json(timeout=30)
                    if message["type"] == "engine_command_res":
                        break
                    events.append(message["data"])
    assert message["data"]["status"] == "completed"
    n, before = message["data"]["result"]["n"], message["data"]["result"]["before"]
    assert [event["seq"] for event in events] == list(range(len(events)))
    padded = "".join(f"<{i}>" + "x" * 200 for i in range(before))
    assert text_and_count(events) == (padded + "".join(f"<{i}>" for i in range(before, n)), n)
    # Emitted 10 at a time every 5 ms, a batch of a fast client holds ~50 deltas (25 ms); the last
    # one grew over the whole stall.
    assert events[-1].get("coalesced", 1) >= after


class Filler:
    """Streams until its client's outbox is full, then ``after`` more deltas over ~150 ms."""

    def __init__(self, probe: dict[str, Any]) -> None:
        self.probe = probe

    async def start(self) -> None:
        pass

    async def handle_command(self, command: dict[str, Any], ctx: EngineContext) -> Any:
        n = 0
        while True:
            if self.probe["full"]():
                await anyio.sleep(0.05)  # still full 50 ms later: the socket is saturated (pacing, not sync)
                if self.probe["full"]():
                    break
            for _ in range(100):
                await ctx.emit("token", {"text": f"<{n}>" + "x" * 200})
                n += 1
            await anyio.sleep(0.001)
        before = n
        for _ in range(command["after"] // 10):
            for _ in range(10):
                await ctx.emit("token", {"text": f"<{n}>"})
                n += 1
            await anyio.sleep(0.005)
        self.probe["emitted"].set()
        return {"n": n, "before": before}

    async def stop(self) -> None:
        pass


class Flooder:
    """Streams ``n`` deltas of 200 characters as fast as the line takes them, whoever reads them."""

    def __init__(self, done: anyio.Event) -> None:
        self.done = done

    async def start(self) -> None:
        pass

    async def handle_command(self, command: dict[str, Any], ctx: EngineContext) -> Any:
        for i in range(command["n"]):
            await ctx.emit("token", {"text": f"<{i}>" + "x" * 200})
            if i % 100 == 99:
                await anyio.lowlevel.checkpoint()
        self.done.set()
        return {"n": command["n"]}

    async def stop(self) -> None:
        pass


async def test_a_stalled_resumable_client_is_detached_and_its_resume_gets_every_delta(make_app: Any) -> None:
    """Full batches piling up past the outbox's bounds are a stalled client, as for any frame: a
    resumable app loses its socket (1013) but is detached, not ended; its engine goes on into the
    replay buffer, and a resume gets every delta exactly once, in order, then the result."""
    n = 2000
    done = anyio.Event()
    extensions = Extensions()
    extensions.register_engine("flooder", lambda session, cfg: Flooder(done))
    app = make_app(extensions, outbound_queue_size=4, send_grace=0.5, rate_limit=0, resume_window=30,
                   engine_event_coalesce_bytes=4096)
    with small_send_buffer_socket() as sock:
        async with serve(app, sock=sock) as server:
            async with raw_connect(server.ws_url) as raw:
                connected = await raw.receive_json()
                app_id, token = connected["data"]["app_id"], connected["data"]["resume_token"]
                await raw.send_json({"type": "ack", "message_id": "a0", "data": {"seq": 0}})
                await raw.send_json({"type": "create_session", "message_id": "c", "data": {}})
                session_id = (await reply(raw, "c"))["data"]["session_id"]
                await raw.send_json({"type": "create_engine", "message_id": "e",
                                     "data": {"session_id": session_id, "engine_type": "flooder"}})
                created = await reply(raw, "e")
                assert created["type"] == "create_engine_res"
                last_seq = created["seq"]
                await raw.send_json({"type": "ack", "message_id": "a1", "data": {"seq": last_seq}})
                connection = next(conn for conn in server.runtime.hub if conn.app_id == app_id)
                await raw.send_json({"type": "engine_command", "message_id": "run", "data": {
                    "session_id": session_id, "command": {"n": n}}})
                # The client reads nothing more: its socket is dropped, its app kept.
                await server.eventually(lambda: connection.detached, timeout=30)
                with anyio.fail_after(30):
                    await done.wait()  # the engine never waited for its client: it streamed on into the buffer
                assert connection.detached and not connection.closing
            async with raw_connect(server.ws_url) as raw:
                assert (await raw.receive_json())["type"] == "connected"
                await raw.send_json({"type": "resume", "message_id": "r", "data": {
                    "app_id": app_id, "resume_token": token, "last_seq": last_seq}})
                resumed = await reply(raw, "r")
                assert resumed["data"]["resumed"] is True, resumed
                events: list[dict[str, Any]] = []
                with anyio.fail_after(30):
                    while True:
                        message = await raw.receive_json(timeout=30)
                        assert message["seq"] == last_seq + 1, (message["seq"], last_seq)
                        last_seq = message["seq"]
                        if message["type"] == "engine_command_res":
                            break
                        if message["type"] == "engine_event":
                            events.append(message["data"])
    assert message["data"]["status"] == "completed"
    assert [event["seq"] for event in events] == list(range(len(events)))
    assert text_and_count(events) == ("".join(f"<{i}>" + "x" * 200 for i in range(n)), n)
