"""Concrete workloads for :mod:`benchmarks._loadgen`.

Wire protocol (JSON text frames), shared by ``llmgine_ws`` and ``benchmarks.bare_echo``::

    server -> {"type": "connected", "message_id": "...", "server_initiated": true,
               "data": {"app_id": "...", "status": "connected"}}              (once, on connect)
    client -> {"type": "ping", "message_id": "<n>", "data": {"timestamp": "..."}}
    server -> {"type": "ping_res", "message_id": "<n>", "data": {"timestamp": "..."}}
    server -> {"type": "server_ping", "message_id": "...", "data": {"timestamp": "..."}}   (any time)
    client -> {"type": "server_pong", "message_id": "<same>", "data": {"timestamp": "<echo>"}}

To add a workload (e.g. an engine stream measured in events/s, or a broadcast fan-out), subclass
:class:`~benchmarks._loadgen.Workload` here, set ``name``/``unit``/``path``, implement ``run`` so it
loops until ``ctx.window.over()`` and returns what completed while ``ctx.window.measuring()``, and
call :func:`benchmarks._harness.main` with it from a small script (see ``roundtrip.py``).
"""

from __future__ import annotations

import msgspec
from websockets.asyncio.client import ClientConnection

from benchmarks._loadgen import ConnContext, LoadError, Workload


class Incoming(msgspec.Struct):
    """Any server message: only the envelope is decoded; ``data`` stays raw until needed."""

    type: str
    message_id: str | None = None
    data: msgspec.Raw = msgspec.Raw(b"null")
    seq: int = 0
    """The frame's sequence number (resume; 0 for ``connected`` and servers without it)."""


class TimestampData(msgspec.Struct):
    """``data`` of ``ping``, ``ping_res``, ``server_ping`` and ``server_pong``."""

    timestamp: str | None = None


class Outgoing(msgspec.Struct):
    """A client message with a timestamp payload (``ping`` or ``server_pong``)."""

    type: str
    message_id: str
    data: TimestampData


_decode = msgspec.json.Decoder(Incoming).decode
_decode_ts = msgspec.json.Decoder(TimestampData).decode
_encode = msgspec.json.Encoder().encode


async def answer_server_ping(ws: ClientConnection, msg: Incoming) -> None:
    """Reply to a ``server_ping`` with a ``server_pong`` echoing its message_id and timestamp."""
    ts = _decode_ts(msg.data) if bytes(msg.data) != b"null" else TimestampData()
    pong = Outgoing("server_pong", msg.message_id or "", TimestampData(ts.timestamp))
    await ws.send(_encode(pong), text=True)


async def expect_connected(ws: ClientConnection) -> None:
    """Read messages until the server's ``connected`` greeting (answering ``server_ping``s)."""
    while True:
        msg = _decode(await ws.recv(decode=False))
        if msg.type == "connected":
            return
        if msg.type == "server_ping":
            await answer_server_ping(ws, msg)


class PingWorkload(Workload):
    """Closed-loop ping round trips: send a ``ping``, wait for its ``ping_res``, repeat.

    One operation = one completed round trip. Messages other than the matching reply are skipped
    (``server_ping`` is answered). A reply of any other type with our message_id is an error, so a
    server answering with errors is never mistaken for a fast one.
    """

    name = "ping"
    unit = "req/s"
    path = "/api/ws"

    def __init__(self, timestamp: str = "2024-01-01T00:00:00Z") -> None:
        self.timestamp = timestamp

    async def on_connect(self, ws: ClientConnection, index: int) -> None:
        await expect_connected(ws)

    async def run(self, ws: ClientConnection, ctx: ConnContext) -> int:
        window = ctx.window
        data = TimestampData(self.timestamp)
        seq = 0
        completed = 0
        while not window.over():
            seq += 1
            message_id = str(seq)
            await ws.send(_encode(Outgoing("ping", message_id, data)), text=True)
            while True:
                raw = await ws.recv(decode=False)
                msg = _decode(raw)
                if msg.message_id == message_id and msg.type != "server_ping":
                    break
                if msg.type == "server_ping":
                    await answer_server_ping(ws, msg)
            if msg.type != "ping_res":
                raise LoadError(f"unexpected reply to ping {message_id}: {bytes(raw)[:200]!r}")
            if window.measuring():
                completed += 1
        return completed


class Reply(msgspec.Struct):
    """A client request with a free-form payload."""

    type: str
    message_id: str
    data: dict[str, object]


async def request(ws: ClientConnection, message_type: str, message_id: str, data: dict[str, object]) -> Incoming:
    """Send one request and return its reply (skipping anything server-initiated)."""
    await ws.send(_encode(Reply(message_type, message_id, data)), text=True)
    while True:
        msg = _decode(await ws.recv(decode=False))
        if msg.type == "server_ping":
            await answer_server_ping(ws, msg)
        elif msg.message_id == message_id:
            if msg.type == "error":
                raise LoadError(f"{message_type} failed: {bytes(msg.data)[:200]!r}")
            return msg


class EngineStreamWorkload(Workload):
    """An engine command streaming ``events`` events, back to back; one operation = one event received.

    Each connection has a session with a ``stream`` engine; it sends ``engine_command`` with
    ``{"n": events}``, reads the ``engine_event`` frames and the final ``engine_command_res``, repeats.
    """

    name = "engine-stream"
    unit = "events/s"
    path = "/api/ws"

    def __init__(self, events: int = 100) -> None:
        self.events = events
        self._sessions: dict[int, str] = {}

    async def on_connect(self, ws: ClientConnection, index: int) -> None:
        await expect_connected(ws)
        created = await request(ws, "create_session", f"s{index}", {})
        session_id = msgspec.json.decode(bytes(created.data))["session_id"]
        await request(ws, "create_engine", f"e{index}", {"session_id": session_id, "engine_type": "stream"})
        self._sessions[index] = session_id

    async def run(self, ws: ClientConnection, ctx: ConnContext) -> int:
        window = ctx.window
        session_id = self._sessions[ctx.index]
        received = 0
        command = 0
        while not window.over():
            command += 1
            message_id = f"c{command}"
            data: dict[str, object] = {"session_id": session_id, "command": {"n": self.events}}
            await ws.send(_encode(Reply("engine_command", message_id, data)), text=True)
            while True:
                msg = _decode(await ws.recv(decode=False))
                if msg.type == "engine_event":
                    if window.measuring():
                        received += 1
                elif msg.type == "server_ping":
                    await answer_server_ping(ws, msg)
                elif msg.message_id == message_id:
                    if msg.type != "engine_command_res":
                        raise LoadError(f"unexpected reply to {message_id}: {bytes(msg.data)[:200]!r}")
                    break
        return received


class ServerRequestWorkload(Workload):
    """Server→client awaited round trips (W2): the server asks, the client answers, the server asks again.

    Each connection sends one ``bench_ask`` message; from then on the server runs a closed loop of
    ``send_to_app_and_wait(app_id, "server_request", {"request_type": "bench"})`` on that connection
    (``benchmarks.ask_app``; the bare baseline ``benchmarks.bare_ask`` does the same by hand). The
    client answers every ``server_request`` at once with a ``server_response`` repeating its
    message_id. One operation = one answered request (one awaited round trip, driven by the server).
    When the window is over the client stops answering and closes: the server's pending request fails
    with ``AppDisconnected`` and its loop ends.
    """

    name = "server-request"
    unit = "round trips/s"
    path = "/api/ws"

    async def on_connect(self, ws: ClientConnection, index: int) -> None:
        await expect_connected(ws)

    async def run(self, ws: ClientConnection, ctx: ConnContext) -> int:
        window = ctx.window
        await ws.send(_encode(Reply("bench_ask", "go", {})), text=True)
        answered = 0
        while not window.over():
            raw = await ws.recv(decode=False)
            msg = _decode(raw)
            if msg.type == "server_request":
                await ws.send(_encode(Answer("server_response", msg.message_id or "", _BENCH_ANSWER)), text=True)
                if window.measuring():
                    answered += 1
            elif msg.type == "server_ping":
                await answer_server_ping(ws, msg)
            elif msg.type == "error":
                raise LoadError(f"the server answered bench_ask with an error: {bytes(raw)[:200]!r}")
        return answered


class AnswerData(msgspec.Struct):
    """``data`` of a ``server_response``."""

    response_type: str


class Answer(msgspec.Struct):
    """A ``server_response``."""

    type: str
    message_id: str
    data: AnswerData


_BENCH_ANSWER = AnswerData("bench")


ACK_EVERY = 64
"""How often the acking workloads ack: every this many frames (what the Python client does)."""


class _Acker:
    """Cumulative acks every :data:`ACK_EVERY` frames (the first one, ``seq`` 0, opts in to resume)."""

    __slots__ = ("last", "pending")

    def __init__(self) -> None:
        self.last = 0
        self.pending = 0

    async def start(self, ws: ClientConnection) -> None:
        await ws.send(_encode(Reply("ack", "ack", {"seq": 0})), text=True)

    async def saw(self, ws: ClientConnection, msg: Incoming) -> None:
        if msg.seq:
            self.last = msg.seq
            self.pending += 1
            if self.pending >= ACK_EVERY:
                self.pending = 0
                await ws.send(_encode(Reply("ack", "ack", {"seq": self.last})), text=True)


class AckingPingWorkload(PingWorkload):
    """:class:`PingWorkload` from a client that acks every 64 frames (a resuming client)."""

    name = "ping+ack"

    async def run(self, ws: ClientConnection, ctx: ConnContext) -> int:
        window = ctx.window
        data = TimestampData(self.timestamp)
        acker = _Acker()
        await acker.start(ws)
        seq = 0
        completed = 0
        while not window.over():
            seq += 1
            message_id = str(seq)
            await ws.send(_encode(Outgoing("ping", message_id, data)), text=True)
            while True:
                raw = await ws.recv(decode=False)
                msg = _decode(raw)
                await acker.saw(ws, msg)
                if msg.message_id == message_id and msg.type != "server_ping":
                    break
            if msg.type != "ping_res":
                raise LoadError(f"unexpected reply to ping {message_id}: {bytes(raw)[:200]!r}")
            if window.measuring():
                completed += 1
        return completed


class AckingEngineStreamWorkload(EngineStreamWorkload):
    """:class:`EngineStreamWorkload` from a client that acks every 64 frames (a resuming client)."""

    name = "engine-stream+ack"

    async def run(self, ws: ClientConnection, ctx: ConnContext) -> int:
        window = ctx.window
        session_id = self._sessions[ctx.index]
        acker = _Acker()
        await acker.start(ws)
        received = 0
        command = 0
        while not window.over():
            command += 1
            message_id = f"c{command}"
            data: dict[str, object] = {"session_id": session_id, "command": {"n": self.events}}
            await ws.send(_encode(Reply("engine_command", message_id, data)), text=True)
            while True:
                msg = _decode(await ws.recv(decode=False))
                await acker.saw(ws, msg)
                if msg.type == "engine_event":
                    if window.measuring():
                        received += 1
                elif msg.message_id == message_id:
                    if msg.type != "engine_command_res":
                        raise LoadError(f"unexpected reply to {message_id}: {bytes(msg.data)[:200]!r}")
                    break
        return received
