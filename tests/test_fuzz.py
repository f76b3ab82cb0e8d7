"""Hostile input over a real socket: random and mutated frames never crash the server, never make it
log an error, and are each answered with one structured reply or a documented policy close, while
the well-formed messages mixed in with them are all answered correctly.

How it runs
-----------
One uvicorn server (``tests.support.serve``) and one client connection are shared by every example
of a test (module-scoped fixtures). Hypothesis drives *sync* test functions; each example hands its
frames to the event loop through an anyio ``BlockingPortal`` (``portal.call``) running in a helper
thread, where the server, the client and all the checks live. This keeps hypothesis (which does not
run coroutines) and pytest's anyio plugin (which this module does not use) out of each other's way.

Profiles
--------
``ci`` (the default) runs ~150 examples per property and keeps the whole file well under 30 s.
The long run is the same suite with far more examples and no time pressure::

    LLMGINE_FUZZ_PROFILE=long .venv/bin/python -m pytest tests/test_fuzz.py -q -p no:cacheprovider

(``long``: 5,000 examples per property; ``LLMGINE_FUZZ_EXAMPLES=N`` overrides the count of either
profile.) Failing examples are shrunk and stored in ``.hypothesis/`` so they replay first next time.

What "answered" means (checked for every example)
-------------------------------------------------
* exactly one reply that is not ``server_initiated`` per frame sent;
* a reply carries the frame's ``message_id`` when the frame has a readable one (a string of 1-128
  characters), else a fresh UUID;
* an ``error`` reply has ``data == {code, message, details}`` with ``code`` in :class:`ErrorCode`;
  a frame the protocol refuses gets a decoding code (``INVALID_JSON``, ``VALIDATION_ERROR``,
  ``INVALID_MESSAGE_TYPE``, ``WEBSOCKET_ERROR``), a well-formed one gets its ``*_res`` reply or a
  semantic error (``SESSION_NOT_FOUND``...), never ``INTERNAL_ERROR``;
* the well-formed control messages interleaved with the garbage get exactly the right answer;
* nothing at ERROR level is logged by ``llmgine_ws.*`` and uvicorn never sees an exception.
Floods (issue 10): answers to nothing the server asked (mixed with the one it waits for), frames of
every kind after a forced close, and commands of every shape queued behind a command waiting for the
user — each is answered or refused within its bound, and everything is cleaned up.
Policy closes: invalid UTF-8 → 1007, a frame over ``max_message_size`` bytes → 1009, sustained
rate-limit abuse → 1008; WebSocket protocol violations (reserved bits, bad opcodes...) are closed
by the protocol layer with 1002/1007.
"""

from __future__ import annotations

import math
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import anyio
import anyio.lowlevel
import msgspec
import msgspec.inspect as mi
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmgine_ws import APIConfig, AppDisconnected, EngineContext, ErrorCode, Extensions, HandlerContext, create_app
from llmgine_ws.client import Client, ConnectionClosed, Message, connect
from llmgine_ws.runtime import Runtime

from .rawws import OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_TEXT, raw_connect, send_raw, send_raw_text_bytes
from .reliability_support import error_trap, registries, wait_registries_empty
from .support import LiveServer, serve

# ------------------------------------------------------------------------------------------ profiles

settings.register_profile(
    "ci", max_examples=150, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
settings.register_profile(
    "long", max_examples=5000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
PROFILE = os.environ.get("LLMGINE_FUZZ_PROFILE", "ci")
FUZZ = settings(settings.get_profile(PROFILE))
if os.environ.get("LLMGINE_FUZZ_EXAMPLES"):
    FUZZ = settings(FUZZ, max_examples=int(os.environ["LLMGINE_FUZZ_EXAMPLES"]))
FEW = settings(FUZZ, max_examples=max(10, FUZZ.max_examples // 3))
"""For properties whose examples each open a connection."""

DECODE_CODES = frozenset({ErrorCode.INVALID_JSON, ErrorCode.VALIDATION_ERROR, ErrorCode.INVALID_MESSAGE_TYPE,
                          ErrorCode.WEBSOCKET_ERROR})
ALL_CODES = frozenset(code.value for code in ErrorCode)
MAX_MESSAGE_SIZE = 256 * 1024

# --------------------------------------------------------------------------------------- the fuzz app


class Inner(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=16)]
    weight: float = 0.0


class Knobs(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A custom message with one field of every kind, so wrong types reach every decoder path."""

    count: int
    ratio: float = 1.0
    enabled: bool = False
    tags: list[str] = []
    mode: Literal["fast", "slow"] = "fast"
    level: Annotated[int, msgspec.Meta(ge=0, le=10)] = 5
    inner: Inner | None = None


def knobs(data: Knobs, ctx: HandlerContext) -> Knobs:
    return data


async def echo(data: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
    await anyio.lowlevel.checkpoint()
    return data


class SlowData(msgspec.Struct, forbid_unknown_fields=True):
    ms: Annotated[int, msgspec.Meta(ge=0, le=20)] = 5


async def slow(data: SlowData, ctx: HandlerContext) -> dict[str, Any]:
    """A handler that takes a moment, so duplicate ids and cancels find it still in flight."""
    await anyio.sleep(data.ms / 1000)
    return {"slept": data.ms}


class EchoEngine:
    async def start(self) -> None:
        pass

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        await ctx.emit("echo")
        return {"echo": command}

    async def stop(self) -> None:
        pass


def fuzz_app(engines: dict[str, Any] | None = None, **config: Any) -> Any:
    extensions = Extensions()
    for name, factory in (engines or {}).items():
        extensions.register_engine(name, factory)
    extensions.register_handler("knobs", Knobs, knobs)
    extensions.register_handler("echo", dict[str, Any], echo)
    extensions.register_handler("slow", SlowData, slow)
    extensions.register_engine("echo", lambda session, cfg: EchoEngine())
    config = {"ping_interval": 0, "rate_limit": 0, "max_message_size": MAX_MESSAGE_SIZE, "max_sessions": 1000,
              **config}
    return create_app(APIConfig(**config), extensions)


# ----------------------------------------------------------------------- JSON and catalogue strategies

CATALOGUE: dict[str, Any] = {
    name: mi.type_info(envelope) for name, envelope in fuzz_app().state.llmgine.dispatcher.envelopes.items()
}
"""The same catalogue, built at import time for the strategies (an app with the same extensions)."""

NO_REPLY = frozenset({"ack"})
"""Valid messages that get no reply at all (``ack``): not drawn as the base of a mutated frame."""

PLAY = "@@PLAY-SESSION@@"
"""Stands for the id of a session the garbage may touch (replaced when the frame is sent)."""
APP = "@@APP-ID@@"
"""Stands for the connection's own app_id."""
ID_POOL = ("dup-a", "dup-b", "dup-c")
"""message_ids the garbage shares, so duplicates (and cancels of in-flight garbage) happen."""

BIG_NUMBERS = st.sampled_from([
    "1e999", "-1e999", "1e-999", "1E+308", "-0", "0.0000000000000000000000001", "2.2250738585072014e-308",
    "18446744073709551616", "-9223372036854775809", "1" * 4300, "1" * 4301, "9" * 20000, "1.5e308",
    "123456789012345678901234567890.5e10", "0e0", "-0.0e-0",
]).map(lambda text: msgspec.Raw(text.encode()))
NESTING = st.sampled_from([2, 10, 100, 500, 2000, 20_000]).flatmap(
    lambda depth: st.sampled_from([
        msgspec.Raw(("[" * depth + "]" * depth).encode()),
        msgspec.Raw(('{"a":' * depth + "1" + "}" * depth).encode()),
        msgspec.Raw(("[" * depth + "{}" + "]" * depth).encode()),
    ]))
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=10)
HOSTILE_JSON = JSON | BIG_NUMBERS | NESTING
IDS = (st.sampled_from(ID_POOL) | st.just("") | st.just("x" * 128) | st.just("x" * 129) | st.text(max_size=3)
       | st.text(min_size=120, max_size=140) | st.integers() | st.none() | st.lists(st.integers(), max_size=2)
       | st.just({"id": "dup-a"}))
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "session_id": st.sampled_from([PLAY, PLAY, str(uuid.uuid4()), "s"]),
    "engine_type": st.sampled_from(["echo", "echo", "nope"]),
    "app_id": st.sampled_from([APP, APP, None, "someone-else"]),
    "target_message_id": st.sampled_from(ID_POOL),
}


def valid_values(t: Any, name: str = "") -> st.SearchStrategy[Any]:
    """Values a msgspec type (as described by ``msgspec.inspect``) accepts."""
    if name in FIELD_VALUES:
        return FIELD_VALUES[name]
    if isinstance(t, mi.StructType):
        required = {f.encode_name: valid_values(f.type, f.name) for f in t.fields if f.required}
        optional = {f.encode_name: valid_values(f.type, f.name) for f in t.fields if not f.required}
        return st.fixed_dictionaries(required, optional=optional)
    if isinstance(t, mi.UnionType):
        return st.one_of([valid_values(member) for member in t.types])
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, mi.StrType):
        return st.text(min_size=t.min_length or 0, max_size=min(t.max_length or 24, 24))
    if isinstance(t, mi.IntType):
        return st.integers(min_value=t.ge, max_value=t.le)
    if isinstance(t, mi.FloatType):
        return st.floats(allow_nan=False, allow_infinity=False)
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.ListType):
        return st.lists(valid_values(t.item_type), max_size=3)
    if isinstance(t, mi.DictType):
        return st.dictionaries(TEXT, valid_values(t.value_type), max_size=3)
    if isinstance(t, mi.AnyType):
        return JSON
    raise NotImplementedError(t)


Path = tuple[str | int, ...]


def node_paths(value: Any, prefix: Path = ()) -> list[Path]:
    """Every location inside a decoded JSON value (the root included)."""
    paths = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += node_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += node_paths(item, (*prefix, index))
    return paths


def replaced(value: Any, path: Path, new: Any, *, delete: bool = False) -> Any:
    """A copy of ``value`` with the node at ``path`` replaced (or deleted from its container)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        copy = dict(value)
        if delete and not rest:
            copy.pop(head, None)
        else:
            copy[head] = replaced(value[head], rest, new, delete=delete) if rest else new
        return copy
    copy_list = list(value)
    if delete and not rest:
        del copy_list[int(head)]
    else:
        copy_list[int(head)] = replaced(value[int(head)], rest, new, delete=delete) if rest else new
    return copy_list


@dataclass
class Frame:
    payload: str | bytes
    kind: str
    """``garbage`` or a control kind (its answer is known exactly)."""
    expect_type: str | None = None
    expect_data: Any = None

    def __post_init__(self) -> None:
        if len(self.payload) * 4 > MAX_MESSAGE_SIZE:  # over the limit is a policy close, tested on its own
            self.payload = self.payload[: MAX_MESSAGE_SIZE // 4]

    def __repr__(self) -> str:
        shown = self.payload if len(self.payload) <= 300 else f"{self.payload[:150]!r}...{self.payload[-150:]!r}"
        return f"Frame({self.kind}, {len(self.payload)} chars: {shown!r})"


@st.composite
def mutated(draw: st.DrawFn) -> Frame:
    """A valid message of a random registered type, then mutated (or not) structurally and textually."""
    catalogue = CATALOGUE
    message_type = draw(st.sampled_from(sorted(set(catalogue) - NO_REPLY)))
    message: dict[str, Any] = {"type": message_type, "message_id": draw(st.sampled_from(ID_POOL))}
    data_field = next(f for f in catalogue[message_type].fields if f.name == "data")
    if data_field.required or draw(st.booleans()):
        message["data"] = draw(valid_values(data_field.type))
    for _ in range(draw(st.integers(0, 3))):
        operation = draw(st.sampled_from(["replace", "delete", "add", "message_id", "type"]))
        paths = node_paths(message)
        if operation == "replace":
            message = replaced(message, draw(st.sampled_from(paths)), draw(HOSTILE_JSON))
        elif operation == "delete" and len(paths) > 1:
            message = replaced(message, draw(st.sampled_from(paths[1:])), None, delete=True)
        elif operation == "add":
            containers = [p for p in paths if isinstance(_at(message, p), dict)]
            if containers:
                path = draw(st.sampled_from(containers))
                message = replaced(message, (*path, draw(TEXT)), draw(HOSTILE_JSON))
        elif operation == "message_id":
            if draw(st.booleans()) and isinstance(message, dict):
                message = {k: v for k, v in message.items() if k != "message_id"}
            else:
                message = replaced(message, ("message_id",), draw(IDS)) if isinstance(message, dict) else message
        elif operation == "type" and isinstance(message, dict):
            new_type = draw(st.sampled_from(sorted(catalogue)) | TEXT | st.integers() | st.none())
            message = replaced(message, ("type",), new_type)
    text = msgspec.json.encode(message).decode()
    text_mutation = draw(st.sampled_from(["none"] * 6 + ["truncate", "insert", "double", "wrap"]))
    if text_mutation == "truncate" and text:
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif text_mutation == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=3)) + text[at:]
    elif text_mutation == "double":
        text = text + text
    elif text_mutation == "wrap":
        text = draw(st.sampled_from(["[{}]", '{{"x": {}}}', " {} ", "\ufeff{}"])).format(text)
    return Frame(text, "garbage")


def _at(value: Any, path: Path) -> Any:
    for key in path:
        value = value[key]
    return value


@st.composite
def duplicate_burst(draw: st.DrawFn) -> list[Frame]:
    """The same in-flight request id several times (and maybe a cancel of it)."""
    mid = draw(st.sampled_from(ID_POOL))
    frame = Frame(msgspec.json.encode({"type": "slow", "message_id": mid, "data": {"ms": 20}}).decode(), "garbage")
    frames = [frame] * draw(st.integers(2, 3))
    if draw(st.booleans()):
        frames.append(Frame(msgspec.json.encode({"type": "cancel", "message_id": str(uuid.uuid4()),
                                                 "data": {"target_message_id": mid}}).decode(), "garbage"))
    return frames


def batches(*, max_size: int = 8) -> st.SearchStrategy[list[Frame]]:
    """Garbage and controls mixed, with the odd burst of duplicates."""
    items = st.one_of(garbage().map(lambda f: [f]), garbage().map(lambda f: [f]), controls().map(lambda f: [f]),
                      duplicate_burst())
    return st.lists(items, min_size=1, max_size=max_size).map(lambda groups: [f for g in groups for f in g])


def garbage() -> st.SearchStrategy[Frame]:
    return st.one_of(
        mutated(),
        mutated(),
        mutated(),
        st.text(st.characters(exclude_categories=("Cs",)), max_size=40).map(lambda text: Frame(text, "garbage")),
        HOSTILE_JSON.map(lambda value: Frame(msgspec.json.encode(value).decode(), "garbage")),
        st.binary(max_size=40).map(lambda data: Frame(data, "garbage")),
        st.sampled_from(["", " ", "null", "{}", "[]", '""', "0", "true", "{", "}", '{"type":', "\x00"])
        .map(lambda text: Frame(text, "garbage")),
    )


def _expect_ping(timestamp: Any) -> Frame:
    mid = str(uuid.uuid4())
    return Frame(msgspec.json.encode({"type": "ping", "message_id": mid, "data": {"timestamp": timestamp}}).decode(),
                 "ping", "ping_res", {"timestamp": timestamp})


def _expect_echo(data: dict[str, Any]) -> Frame:
    mid = str(uuid.uuid4())
    return Frame(msgspec.json.encode({"type": "echo", "message_id": mid, "data": data}).decode(), "echo",
                 "echo_res", data)


def _expect_knobs(data: dict[str, Any]) -> Frame:
    mid = str(uuid.uuid4())
    canonical = msgspec.to_builtins(msgspec.convert(data, Knobs))
    return Frame(msgspec.json.encode({"type": "knobs", "message_id": mid, "data": data}).decode(), "knobs",
                 "knobs_res", canonical)


CONTROL_SESSION = "@@CONTROL-SESSION@@"


def controls() -> st.SearchStrategy[Frame]:
    """Well-formed messages whose answers are known exactly."""
    knobs_type = next(f for f in CATALOGUE["knobs"].fields if f.name == "data").type
    return st.one_of(
        (st.none() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT).map(_expect_ping),
        st.dictionaries(TEXT, JSON, max_size=4).map(_expect_echo),
        valid_values(knobs_type).map(_expect_knobs),
        JSON.map(lambda command: Frame(msgspec.json.encode({
            "type": "engine_command", "message_id": str(uuid.uuid4()),
            "data": {"session_id": CONTROL_SESSION, "command": command}}).decode(), "engine_command",
            "engine_command_res", {"session_id": CONTROL_SESSION, "status": "completed", "result": {"echo": command}})),
        st.just(None).map(lambda _: Frame(msgspec.json.encode({
            "type": "status", "message_id": str(uuid.uuid4()), "data": {"session_id": CONTROL_SESSION}}).decode(),
            "status", "status_res")),
        st.sampled_from(["close_session", "status", "delete_engine"]).map(lambda message_type: Frame(
            msgspec.json.encode({"type": message_type, "message_id": str(uuid.uuid4()),
                                 "data": {"session_id": str(uuid.uuid4())}}).decode(),
            "unknown_session", "error", {"code": "SESSION_NOT_FOUND"})),
    )


# ------------------------------------------------------------------------------------------- the rig


def _is_fresh_id(message_id: str) -> bool:
    try:
        return uuid.UUID(message_id).version == 4
    except ValueError:
        return False


class _Lenient(msgspec.Struct):
    type: Any = None
    message_id: Any = None


def readable_id(payload: str | bytes) -> str | None:
    """The message_id a reply must carry: a 1-128 character string at the top of a JSON object."""
    if isinstance(payload, bytes):
        return None
    try:
        value = msgspec.json.decode(payload, type=_Lenient).message_id
    except (msgspec.DecodeError, RecursionError):
        return None
    return value if isinstance(value, str) and 0 < len(value) <= 128 else None


@dataclass
class Rig:
    """The shared server and connection, and the state the garbage is allowed to touch."""

    portal: BlockingPortal
    live: LiveServer
    client: Client | None = None
    control_session: str = ""
    play_session: str = ""
    examples: int = 0
    frames: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    _client_cm: Any = None

    @property
    def runtime(self) -> Runtime:
        return self.live.runtime

    def connect(self) -> None:
        self._client_cm = self.portal.wrap_async_context_manager(connect(self.live.ws_url, resume=False))
        self.client = self._client_cm.__enter__()
        self.portal.call(self._setup_sessions)

    def disconnect(self) -> None:
        if self._client_cm is not None:
            cm, self._client_cm, self.client = self._client_cm, None, None
            cm.__exit__(None, None, None)

    async def _setup_sessions(self) -> None:
        client = self.c
        self.control_session = await client.create_session()
        await client.request("create_engine", {"session_id": self.control_session, "engine_type": "echo"})
        self.play_session = ""
        await self._restore()

    @property
    def c(self) -> Client:
        assert self.client is not None
        return self.client

    async def _restore(self) -> None:
        """Put the state the garbage may have changed back: one play session with an engine, and no
        other session but the control one."""
        client = self.c
        own = set(self.runtime.messaging.get_app_sessions(client.app_id))
        for session_id in own - {self.control_session, self.play_session}:
            await client.request("close_session", {"session_id": session_id})
        if self.play_session not in own:
            self.play_session = await client.create_session()
        engine = self.runtime.engines.get(self.play_session)
        if engine is None or engine.stopped:
            await client.request("create_engine", {"session_id": self.play_session, "engine_type": "echo"})
        assert self.control_session in own, "the garbage must never reach the control session"

    def run(self, frames: list[Frame]) -> None:
        """Play one example; on failure, start over on a fresh connection (and fail the example)."""
        try:
            self.portal.call(self._exchange, frames)
        except BaseException:
            self.disconnect()
            self.connect()
            raise

    def _render(self, frame: Frame) -> str | bytes:
        if isinstance(frame.payload, bytes):
            return frame.payload
        return (frame.payload.replace(PLAY, self.play_session).replace(APP, self.c.app_id)
                .replace(CONTROL_SESSION, self.control_session))

    async def _exchange(self, frames: list[Frame]) -> None:
        client = self.c
        errors_before = len(self.trap.records)
        rendered = [self._render(frame) for frame in frames]
        for payload in rendered:
            await send_raw(client, payload)
        replies: list[Message] = []
        initiated: list[Message] = []
        with anyio.fail_after(10):
            while len(replies) < len(frames):
                message = await client.receive()
                (initiated if message.server_initiated else replies).append(message)
            # A sentinel behind everything: nothing but server-initiated messages may come before its reply.
            sentinel = str(uuid.uuid4())
            await client.send("echo", {"sentinel": True}, message_id=sentinel)
            while True:
                message = await client.receive()
                if message.message_id == sentinel:
                    break
                assert message.server_initiated, f"an extra reply: {message}"
                initiated.append(message)
        self._check(frames, rendered, replies, initiated)
        new_errors = self.trap.records[errors_before:]
        assert not new_errors, [r.getMessage() for r in new_errors]
        await self._restore()
        self.examples += 1
        self.frames += len(frames)

    def _check(self, frames: list[Frame], rendered: list[str | bytes], replies: list[Message],
               initiated: list[Message]) -> None:
        for message in initiated:
            assert message.type == "engine_event", message
            assert set(message.data) == {"session_id", "command_id", "seq", "event_type", "payload"}
        frames_by_id: dict[str | None, list[tuple[Frame, str | bytes]]] = {}
        for frame, payload in zip(frames, rendered, strict=True):
            frames_by_id.setdefault(readable_id(payload), []).append((frame, payload))
        replies_by_id: dict[str | None, list[Message]] = {}
        for reply in replies:
            self._check_shape(reply)
            key: str | None = reply.message_id
            if key not in frames_by_id:
                assert reply.type == "error" and _is_fresh_id(reply.message_id), \
                    f"a reply to no frame sent: {reply}"
                key = None
            replies_by_id.setdefault(key, []).append(reply)
        sizes = {key: len(group) for key, group in frames_by_id.items()}
        assert {key: len(group) for key, group in replies_by_id.items()} == sizes, \
            f"not one reply per frame: frames {frames_by_id}, replies {replies}"
        decoder = self.runtime.dispatcher.decoder
        for key, group in replies_by_id.items():
            sent = frames_by_id[key]
            for reply in group:
                allowed = [self._explain(frame, payload, reply, decoder) for frame, payload in sent]
                assert any(reason is None for reason in allowed), f"{reply} fits none of {sent}: {allowed}"

    def _check_shape(self, reply: Message) -> None:
        if reply.type == "error":
            assert set(reply.data) == {"code", "message", "details"}, reply
            assert reply.data["code"] in ALL_CODES, reply
            assert isinstance(reply.data["message"], str) and reply.data["message"], reply
            self.codes[reply.data["code"]] += 1
        else:
            self.codes[reply.type] += 1

    def _explain(self, frame: Frame, payload: str | bytes, reply: Message, decoder: Any) -> str | None:
        """Why ``reply`` cannot be the answer to ``frame`` (None: it can)."""
        code = reply.data.get("code") if reply.type == "error" else None
        if frame.kind != "garbage":
            if reply.type != frame.expect_type:
                return f"control {frame.kind} answered with {reply.type} {reply.data}"
            expected = frame.expect_data
            if frame.kind == "engine_command":
                expected = {**expected, "session_id": self.control_session}
            if frame.kind == "unknown_session":
                return None if reply.data["code"] == "SESSION_NOT_FOUND" else f"not SESSION_NOT_FOUND: {reply.data}"
            if frame.kind == "status":
                if reply.data["session_id"] != self.control_session or reply.data["engine"]["engine_type"] != "echo":
                    return f"wrong status {reply.data}"
                return None
            return None if reply.data == expected else f"wrong data {reply.data} != {expected}"
        if isinstance(payload, bytes):
            return None if code == ErrorCode.WEBSOCKET_ERROR else f"binary frame answered with {reply}"
        try:
            message = decoder.decode(payload)
        except (msgspec.DecodeError, RecursionError):
            return None if code in DECODE_CODES else f"invalid frame answered with {reply}"
        message_type = type(message).__struct_config__.tag
        spec = self.runtime.dispatcher.specs[message_type]
        if reply.type == spec.response_type:
            return None
        if code is not None and code not in DECODE_CODES and code != ErrorCode.INTERNAL_ERROR:
            return None
        return f"valid {message_type} answered with {reply}"

    trap: Any = None


@pytest.fixture(scope="module")
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal("asyncio") as portal:
        yield portal


@pytest.fixture(scope="module")
def rig(portal: BlockingPortal) -> Iterator[Rig]:
    # No protocol-level keepalive pings: uvicorn draws their payloads from the global `random`, which
    # hypothesis (drawing in another thread meanwhile) would take for a strategy using it.
    with error_trap() as trap, portal.wrap_async_context_manager(serve(fuzz_app(), ws_ping_interval=None)) as live:
        rig = Rig(portal, live)
        rig.trap = trap
        rig.connect()
        yield rig
        rig.disconnect()
        portal.call(wait_registries_empty, live.runtime)


@pytest.fixture(scope="module")
def catalogue(rig: Rig) -> dict[str, Any]:
    """Every message type the server decodes, from the server itself: type → envelope type info."""
    return {name: mi.type_info(envelope) for name, envelope in rig.runtime.dispatcher.envelopes.items()}




# ------------------------------------------------------------------------------------------ properties


def test_catalogue_covers_every_registered_type(catalogue: dict[str, Any]) -> None:
    assert catalogue.keys() == CATALOGUE.keys()
    assert {"ping", "create_session", "status", "close_session", "server_response", "server_pong", "cancel",
            "create_engine", "engine_command", "delete_engine", "knobs", "echo", "slow", "ack", "resume"} \
        == set(catalogue)


@FUZZ
@given(batches())
def test_every_frame_is_answered_and_well_formed_messages_correctly(rig: Rig, frames: list[Frame]) -> None:
    rig.run(frames)


@FUZZ
@given(batches(max_size=5), st.lists(controls(), min_size=1, max_size=4),
       st.randoms(use_true_random=False))
def test_controls_shuffled_into_garbage(rig: Rig, junk: list[Frame], good: list[Frame], random: Any) -> None:
    frames = junk + good
    random.shuffle(frames)
    rig.run(frames)


def test_fuzz_reaches_every_decoding_path(rig: Rig) -> None:
    """The properties above are only worth something if the garbage reaches every decoding path: a
    derandomized run of the same strategies (self-contained, so it does not depend on which tests ran
    before it) must see every answer below."""
    before = Counter(rig.codes)

    @settings(FUZZ, derandomize=True, database=None, max_examples=150)
    @given(batches())
    def play(frames: list[Frame]) -> None:
        rig.run(frames)

    play()
    seen = rig.codes - before
    for code in ("INVALID_JSON", "VALIDATION_ERROR", "INVALID_MESSAGE_TYPE", "WEBSOCKET_ERROR",
                 "SESSION_NOT_FOUND", "DUPLICATE_MESSAGE_ID", "ping_res", "echo_res", "knobs_res", "slow_res"):
        assert seen[code] > 0, (code, seen)


# --------------------------------------------------------------------- wrong types, field by field

KIND_SAMPLES: dict[str, Any] = {"null": None, "bool": True, "int": 7, "float": 1.5, "str": "text", "list": [1],
                                "object": {"k": 1}}


def accepted_kinds(t: Any) -> set[str]:
    if isinstance(t, mi.AnyType):
        return set(KIND_SAMPLES)
    if isinstance(t, mi.UnionType):
        return set().union(*(accepted_kinds(member) for member in t.types))
    if isinstance(t, mi.LiteralType):
        return {"str" if isinstance(v, str) else "int" for v in t.values}
    return {
        mi.NoneType: {"null"}, mi.BoolType: {"bool"}, mi.IntType: {"int"}, mi.FloatType: {"int", "float"},
        mi.StrType: {"str"}, mi.ListType: {"list"}, mi.DictType: {"object"}, mi.StructType: {"object"},
    }[type(t)]


def minimal(t: Any) -> Any:
    """The smallest valid value of a type (required fields only)."""
    if isinstance(t, mi.StructType):
        return {f.encode_name: minimal(f.type) for f in t.fields if f.required}
    if isinstance(t, mi.UnionType):
        return minimal(t.types[0])
    if isinstance(t, mi.LiteralType):
        return t.values[0]
    if isinstance(t, mi.StrType):
        return "x" * max(1, t.min_length or 0)
    if isinstance(t, mi.IntType):
        return t.ge if t.ge is not None else 1
    if isinstance(t, mi.FloatType):
        return 1.0
    return {mi.BoolType: True, mi.NoneType: None, mi.ListType: [], mi.DictType: {}, mi.AnyType: None}[type(t)]


def wrong_values(t: Any) -> list[tuple[str, Any]]:
    """(what, value) pairs a type refuses: every JSON kind it does not take, and its constraints broken."""
    out = [(kind, sample) for kind, sample in KIND_SAMPLES.items() if kind not in accepted_kinds(t)]
    members = t.types if isinstance(t, mi.UnionType) else (t,)
    for member in members:
        if isinstance(member, mi.StrType) and member.min_length:
            out.append(("too short", ""))
        if isinstance(member, mi.StrType) and member.max_length:
            out.append(("too long", "x" * (member.max_length + 1)))
        if isinstance(member, mi.IntType) and member.le is not None:
            out.append(("too big", member.le + 1))
        if isinstance(member, mi.IntType) and member.ge is not None:
            out.append(("too small", member.ge - 1))
        if isinstance(member, mi.LiteralType):
            out.append(("not a choice", "not-one-of-them"))
    return out


def field_cases(t: Any, value: Any, path: str) -> Iterator[tuple[str, Any, str]]:
    """(description, a whole value with one wrong spot, msgspec's path of that spot) for every field
    of ``t``, recursively (structs, optional structs, list items)."""
    for what, wrong in wrong_values(t):
        yield f"{path}: {what}", wrong, path
    members = t.types if isinstance(t, mi.UnionType) else (t,)
    for member in members:
        if isinstance(member, mi.StructType):
            base = minimal(member)
            for f in member.fields:
                start = base.get(f.encode_name, minimal(f.type))
                for what, inner, inner_path in field_cases(f.type, start, f"{path}.{f.encode_name}"):
                    yield what, {**base, f.encode_name: inner}, inner_path
            if member.forbid_unknown_fields:
                yield f"{path}: unknown field", {**base, "surprise": 1}, path
        if isinstance(member, mi.ListType):
            item = minimal(member.item_type)
            for what, inner, inner_path in field_cases(member.item_type, item, f"{path}[0]"):
                yield what, [inner], inner_path


def wrong_type_cases() -> list[tuple[str, str, dict[str, Any], str]]:
    cases = []
    for name, info in sorted(CATALOGUE.items()):
        data_type = next(f for f in info.fields if f.name == "data").type
        base = {"type": name, "message_id": f"wt-{len(cases)}", "data": minimal(data_type)}
        if name not in NO_REPLY:
            cases.append((name, "valid", base, ""))
        for what, data, path in field_cases(data_type, base["data"], "$.data"):
            cases.append((name, what, {**base, "message_id": f"wt-{len(cases)}", "data": data}, path))
        for what, wrong in wrong_values(next(f for f in info.fields if f.name == "message_id").type):
            cases.append((name, f"$.message_id: {what}", {**base, "message_id": wrong}, "$.message_id"))
        cases.append((name, "$.message_id: missing", {k: v for k, v in base.items() if k != "message_id"}, "$"))
        cases.append((name, "$.type: wrong", {**base, "message_id": f"wt-{len(cases)}", "type": name.upper()}, "type"))
    return cases


def test_wrong_types_in_every_field_of_every_message(rig: Rig) -> None:
    """Deterministic sweep: each field of each registered message, given each JSON kind it refuses
    (and its constraints broken), is answered with VALIDATION_ERROR naming that exact field."""
    cases = wrong_type_cases()
    assert len(cases) > 150

    async def sweep() -> list[str]:
        client = rig.c
        failures = []
        for message_type, what, message, path in cases:
            text = msgspec.json.encode(message).decode().replace(PLAY, rig.play_session)
            await send_raw(client, text)
            with anyio.fail_after(5):
                reply = await client.receive()
                while reply.server_initiated:
                    reply = await client.receive()
            readable = readable_id(text)
            expected_id_ok = reply.message_id == readable if readable else _is_fresh_id(reply.message_id)
            code = reply.data.get("code") if reply.type == "error" else None
            if what == "valid":
                ok = code not in DECODE_CODES and code != ErrorCode.INTERNAL_ERROR
            elif path == "type":
                ok = code == ErrorCode.INVALID_MESSAGE_TYPE
            else:
                ok = code == ErrorCode.VALIDATION_ERROR and reply.data["details"]["path"] == path
            if not (ok and expected_id_ok):
                failures.append(f"{message_type} {what}: {reply.type} {reply.message_id} {reply.data}")
        await rig._restore()
        return failures

    failures = rig.portal.call(sweep)
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------ policy closes


@st.composite
def invalid_utf8(draw: st.DrawFn) -> bytes:
    """A text payload that is not UTF-8: a valid message with a bad sequence spliced in somewhere."""
    text = msgspec.json.encode({"type": "ping", "message_id": draw(st.sampled_from(ID_POOL)),
                                "data": {"timestamp": draw(TEXT)}})
    bad = draw(st.sampled_from([b"\xff", b"\xfe\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82",
                                b"\x80", b"\xf8\x88\x80\x80\x80"]))
    at = draw(st.integers(0, len(text)))
    return text[:at] + bad + text[at:]


@FEW
@given(st.lists(controls().filter(lambda f: f.kind in ("ping", "echo", "knobs")), max_size=3),
       invalid_utf8())
def test_invalid_utf8_closes_1007(rig: Rig, before: list[Frame], payload: bytes) -> None:
    """The WebSocket layer closes with 1007 as soon as it parses the bad frame, so replies to the frames
    just before it may be lost with the connection; those that do arrive are right."""

    async def play() -> None:
        async with connect(rig.live.ws_url, resume=False) as client:
            connection = rig.runtime.hub.get(client.app_id)
            assert connection is not None
            for frame in before:
                await send_raw(client, frame.payload)
            await send_raw_text_bytes(client, payload)
            answered = []
            with anyio.fail_after(5):
                while True:
                    try:
                        answered.append(await client.receive())
                    except ConnectionClosed:
                        break
            assert client.close_code == 1007
            expected = {readable_id(f.payload): (f.expect_type, f.expect_data) for f in before}
            for message in answered:
                assert (message.type, message.data) == expected[message.message_id]
            with anyio.fail_after(5):
                await connection.closed.wait()

    rig.portal.call(play)


@pytest.mark.parametrize("char", ["a", "é", "€", "𝄞"])
@pytest.mark.parametrize("delta", [-1, 0, 1, 2])
def test_frames_over_max_message_size_bytes_close_1009(rig: Rig, delta: int, char: str) -> None:
    """The limit is in bytes (UTF-8), whatever the characters; at the limit the frame is served."""
    envelope = '{"type":"echo","message_id":"big","data":{"pad":"%s"}}'
    width = len(char.encode())
    room = MAX_MESSAGE_SIZE - len(envelope.encode()) + 2  # bytes left for the padding
    text = envelope % (char * ((room + delta * width) // width))
    size = len(text.encode())

    async def play() -> None:
        async with connect(rig.live.ws_url, resume=False) as client:
            connection = rig.runtime.hub.get(client.app_id)
            assert connection is not None
            await send_raw(client, text)
            if size > MAX_MESSAGE_SIZE:
                assert await client.wait_closed(timeout=5) == 1009, (size, client.close_reason)
                with anyio.fail_after(5):
                    await connection.closed.wait()
            else:
                reply = await client.receive(timeout=5)
                assert (reply.type, reply.message_id) == ("echo_res", "big"), (size, reply)

    rig.portal.call(play)


def test_rate_limit_answers_then_closes_1008(portal: BlockingPortal) -> None:
    """Over the rate limit every frame (garbage included) still gets a structured RATE_LIMITED error
    with its readable message_id, until the strikes run out: then 1008, and everything is cleaned up."""
    burst, strikes = 5, 4
    frames = [*(f'{{"type":"ping","message_id":"ok-{i}"}}' for i in range(burst)),
              *(f'{{"type":"nope","message_id":"limited-{i}"}}' for i in range(strikes)),
              "{not json", *(f'{{"type":"ping","message_id":"late-{i}"}}' for i in range(20))]

    async def play() -> None:
        app = fuzz_app(rate_limit=0.001, rate_burst=burst, rate_limit_strikes=strikes)
        with error_trap():
            async with serve(app) as live, connect(live.ws_url, resume=False) as client:
                for payload in frames:
                    try:
                        await send_raw(client, payload)
                    except ConnectionClosed:
                        break
                replies = []
                with anyio.fail_after(5):
                    while True:
                        try:
                            replies.append(await client.receive())
                        except ConnectionClosed:
                            break
                assert client.close_code == 1008
                assert [(m.type, m.message_id) for m in replies[:burst]] == [
                    ("ping_res", f"ok-{i}") for i in range(burst)]
                limited = replies[burst:]
                assert all(m.type == "error" and m.data["code"] == "RATE_LIMITED" for m in limited), limited
                assert [m.message_id for m in limited[:strikes]] == [f"limited-{i}" for i in range(strikes)]
                assert all(m.data["details"]["retry_after"] > 0 for m in limited)
                assert strikes <= len(limited) <= strikes + 2  # the strike bucket refills at 1/s
                await wait_registries_empty(live.runtime)

    portal.call(play)


# ----------------------------------------------------------------- below the protocol: raw frames


RAW_CLOSE_CODES = {"close_bad_code": 1002, "reserved_bit": 1002, "bad_opcode": 1002, "big_control": 1002,
                   "continuation_alone": 1002, "invalid_utf8": 1007, "oversize": 1009}
"""How the server answers each way of ending a raw connection (otherwise it echoes our 1000)."""
RAW_ACTIONS = st.sampled_from([
    "text", "text", "binary", "ping", "pong", "fragmented", "close", "close_bad_code", "data_after_close",
    "reserved_bit", "bad_opcode", "big_control", "abort", "invalid_utf8", "continuation_alone", "oversize",
])


@FEW
@given(st.lists(RAW_ACTIONS, min_size=1, max_size=6), st.lists(controls().filter(
    lambda f: f.kind in ("ping", "echo", "knobs")), min_size=1, max_size=3), st.booleans())
def test_raw_frames_and_frames_between_close_and_cleanup(rig: Rig, actions: list[str], good: list[Frame],
                                                         then_more: bool) -> None:
    """Frames the WebSocket layer must police (fragments, control frames, reserved bits, data after a
    close frame, a vanishing peer) and frames that keep coming after either side closed: the server
    either answers, or closes with a documented code, and always cleans up without logging an error."""

    async def play() -> None:
        runtime = rig.runtime
        async with raw_connect(rig.live.ws_url) as raw:
            greeting = await raw.receive_json()
            connection = runtime.hub.get(greeting["data"]["app_id"])
            assert connection is not None
            ended = ""
            answers_due = 0
            for action in actions:
                if action == "text":
                    for frame in good:
                        await raw.send_text(frame.payload)
                    answers_due += len(good)
                elif action == "binary":
                    await raw.send_frame(OP_BINARY, b'{"type":"ping","message_id":"bin"}')
                    answers_due += 1
                elif action == "ping":
                    await raw.send_frame(OP_PING, b"are you there")
                elif action == "pong":
                    await raw.send_frame(0xA, b"unsolicited")
                elif action == "fragmented":
                    payload = good[0].payload.encode() if isinstance(good[0].payload, str) else good[0].payload
                    await raw.send_frame(OP_TEXT, payload[:3], fin=False)
                    await raw.send_frame(OP_PING, b"in between")
                    await raw.send_frame(OP_CONTINUATION, payload[3:])
                    answers_due += 1
                else:
                    ended = action
                    if action in ("close", "data_after_close"):
                        await raw.send_close(1000, "bye")
                        if action == "data_after_close":
                            for frame in good:
                                await raw.send_text(frame.payload)
                    elif action == "close_bad_code":
                        await raw.send_frame(OP_CLOSE, (999).to_bytes(2, "big"))
                    elif action == "reserved_bit":
                        await raw.send_frame(OP_TEXT, b'{"type":"ping","message_id":"rsv"}', rsv=4)
                    elif action == "bad_opcode":
                        await raw.send_frame(0x3, b"?")
                    elif action == "big_control":
                        await raw.send_frame(OP_PING, b"x" * 200)
                    elif action == "continuation_alone":
                        await raw.send_frame(OP_CONTINUATION, b"orphan")
                    elif action == "invalid_utf8":
                        await raw.send_frame(OP_TEXT, b'{"type":"ping","message_id":"\xff"}')
                    elif action == "oversize":
                        await raw.send_text('{"type":"echo","message_id":"big","data":{"pad":"%s"}}'
                                            % ("x" * MAX_MESSAGE_SIZE))
                    elif action == "abort":
                        await raw.abort()
                    if then_more and action != "abort":  # frames between the close and the cleanup
                        for frame in good:
                            await raw.send_text(frame.payload)
                        await raw.send_close(1000)
                    break
            if not ended:
                await raw.send_close(1000)
            if ended != "abort":
                messages = await raw.messages_until_close()
                replies = [m for m in messages if not m.get("server_initiated")]
                assert len(replies) <= answers_due
                for reply in replies:
                    assert reply["type"] in ("ping_res", "echo_res", "knobs_res", "error"), reply
                    if reply["type"] == "error":  # a binary frame, or the same control frame sent twice
                        assert reply["data"]["code"] in ("WEBSOCKET_ERROR", "DUPLICATE_MESSAGE_ID"), reply
                # Data after our close frame sits unread when the server closes the socket, so the
                # kernel resets the connection and its close frame may be lost on the way.
                unread = ended == "data_after_close" or (then_more and ended)
                allowed = {RAW_CLOSE_CODES.get(ended, 1000)} | ({None} if unread else set())
                if then_more and ended == "oversize":
                    allowed.add(1000)  # our close frame, right behind, may be seen before the app reads the frame
                assert raw.close_code in allowed, (ended, raw.close_code)
            with anyio.fail_after(5):
                await connection.closed.wait()
        assert connection.app_id not in runtime.hub

    rig.portal.call(play)


# ----------------------------------------------------------------- floods (issue 10)

FLOODS = settings(FUZZ, max_examples=max(5, FUZZ.max_examples // 15))


class AskingEngine:
    """Commands with ``{"ask": ...}`` wait for the user; others answer at once."""

    async def start(self) -> None:
        pass

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        if isinstance(command, dict) and "ask" in command:
            return {"answer": await ctx.ask_user("?", timeout=30)}
        return {"done": True}

    async def stop(self) -> None:
        pass


def flood_app(**config: Any) -> Any:
    return fuzz_app(engines={"asking": lambda session, cfg: AskingEngine()}, **config)


ANSWER_FRAMES = st.one_of(
    st.builds(lambda kind, mid, data: {"type": kind, "message_id": mid, "data": data},
              st.sampled_from(["server_response", "server_pong"]),
              st.one_of(st.uuids().map(str), st.text(min_size=1, max_size=20)),
              st.one_of(st.just({"response_type": "x"}), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                          max_size=3))),
    st.just({"type": "server_response", "message_id": "REAL", "data": {"response_type": "question"}}),
)


@FLOODS
@given(st.lists(ANSWER_FRAMES, min_size=50, max_size=400), st.integers(min_value=5, max_value=40))
def test_answer_floods(portal: BlockingPortal, frames: list[dict[str, Any]], burst: int) -> None:
    """Answers to nothing the server asked, mixed with the one answer it waits for, as fast as the
    socket takes them: the real answer resolves the server's request, every unsolicited one costs the
    rate limit (UNKNOWN_REQUEST, then RATE_LIMITED, then 1008), the backlog stays bounded, and all is
    cleaned up without an error logged."""

    async def play() -> None:
        app = flood_app(rate_limit=0.001, rate_burst=burst, rate_limit_strikes=burst, outbound_queue_size=64,
                        outbound_queue_bytes=64 * 1024)
        with error_trap():
            async with serve(app, ws_ping_interval=None) as live, raw_connect(live.ws_url) as raw:
                greeting = await raw.receive_json()
                connection = live.runtime.hub.get(greeting["data"]["app_id"])
                assert connection is not None
                asked: dict[str, Any] = {}

                async def ask() -> None:
                    try:
                        asked["answer"] = await live.runtime.messaging.send_to_app_and_wait(
                            connection.app_id, "server_request", {"request_type": "question"}, 10)
                    except AppDisconnected:  # closed (1008) before the real answer came
                        asked["closed"] = True

                async with anyio.create_task_group() as tg:
                    tg.start_soon(ask)
                    question = await raw.receive_json()
                    real = question["message_id"]
                    for frame in frames:
                        if frame["message_id"] == "REAL":
                            frame = {**frame, "message_id": real}
                        await raw.send_json(frame)
                        if raw.broken:
                            break
                    if not any(f["message_id"] == "REAL" for f in frames):
                        await raw.send_json({"type": "server_response", "message_id": real,
                                             "data": {"response_type": "question"}})
                    messages = await raw.messages_until_close(timeout=1) if connection.closing else []
                    if not connection.closing:
                        await raw.send_close(1000)
                        messages = await raw.messages_until_close()
                    tg.cancel_scope.cancel()
                assert asked.get("closed") or asked["answer"].data["response_type"] == "question", asked
                codes = Counter(m["data"]["code"] for m in messages if m["type"] == "error")
                assert set(codes) <= {"UNKNOWN_REQUEST", "RATE_LIMITED", "VALIDATION_ERROR"}, codes
                assert codes["UNKNOWN_REQUEST"] + codes["VALIDATION_ERROR"] <= burst
                assert raw.close_code in (1000, 1008, None)
                with anyio.fail_after(5):
                    await connection.closed.wait()
                await wait_registries_empty(live.runtime)

    portal.call(play)


@FLOODS
@given(st.lists(st.sampled_from(["ping", "garbage", "control_ping", "engine_command", "answer"]), min_size=20,
                max_size=300), st.sampled_from([1008, 1009, 1013, 1011]))
def test_post_close_floods(portal: BlockingPortal, kinds: list[str], code: int) -> None:
    """After a forced close the client goes on sending whatever it likes: nothing more is read or
    dispatched, the close is audited once, and the connection is cleaned up."""

    async def play() -> None:
        app = flood_app()
        with error_trap():
            async with serve(app, ws_ping_interval=None) as live, raw_connect(live.ws_url) as raw:
                greeting = await raw.receive_json()
                connection = live.runtime.hub.get(greeting["data"]["app_id"])
                assert connection is not None
                connection.force_close(code, "fuzz")
                frames = {
                    "ping": lambda n: raw.send_json({"type": "ping", "message_id": f"p{n}", "data": {}}),
                    "garbage": lambda n: raw.send_text(b"{not json" * n),
                    "control_ping": lambda n: raw.send_frame(OP_PING, b"x"),
                    "engine_command": lambda n: raw.send_json({"type": "engine_command", "message_id": f"e{n}",
                                                               "data": {"session_id": "s", "command": n}}),
                    "answer": lambda n: raw.send_json({"type": "server_pong", "message_id": f"a{n}", "data": {}}),
                }
                for n, kind in enumerate(kinds):
                    await frames[kind](n)
                    if raw.broken:
                        break
                messages = await raw.messages_until_close()
                assert raw.close_code in (code, None)
                assert not [m for m in messages if not m.get("server_initiated")], messages
                with anyio.fail_after(5):
                    await connection.closed.wait()
                await wait_registries_empty(live.runtime)

    portal.call(play)


@FLOODS
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=3), st.integers(min_value=1, max_value=20_000)),
                min_size=5, max_size=40))
def test_queue_floods(portal: BlockingPortal, shapes: list[tuple[int, int]]) -> None:
    """Commands of every shape and size queued behind one that waits for the user: each is answered
    (queued, then completed, or TOO_MANY_REQUESTS at once), and what the queue holds never passes
    max_inflight_requests or max_inflight_bytes (plus the one request always admitted)."""
    limit_bytes, limit_requests = 2 * 1024 * 1024, 16

    def payload(shape: int, size: int) -> Any:
        if shape == 0:
            return [[] for _ in range(size)]
        if shape == 1:
            return {f"k{i}": {} for i in range(size // 4)}
        if shape == 2:
            return "x" * size * 4
        return [[[i]] for i in range(size // 2)]

    async def play() -> None:
        app = flood_app(max_inflight_bytes=limit_bytes, max_inflight_requests=limit_requests)
        with error_trap():
            async with serve(app, ws_ping_interval=None) as live, connect(live.ws_url, rate_limit_retries=0) as c:
                connection = live.runtime.hub.get(c.app_id)
                assert connection is not None

                @c.on_user_input
                async def later(message: Any) -> str:
                    await anyio.sleep_forever()
                    raise AssertionError("unreachable")

                session_id = await c.create_session()
                await c.request("create_engine", {"session_id": session_id, "engine_type": "asking"})
                await c.send("engine_command", {"session_id": session_id, "command": {"ask": 1}}, message_id="ask")
                await live.eventually(lambda: "ask" in connection.in_flight)
                biggest = 0
                for n, (shape, size) in enumerate(shapes):
                    body = payload(shape, size)
                    biggest = max(biggest, len(msgspec.json.encode(body)) * 30)
                    await c.send("engine_command", {"session_id": session_id, "command": body}, message_id=f"q{n}")
                    assert len(connection.in_flight) <= limit_requests
                    assert connection.in_flight_bytes <= limit_bytes + biggest
                sent = {f"q{n}" for n in range(len(shapes))}
                answered: set[str] = set()
                await c.send("ping", {"timestamp": 0}, message_id="fence")  # dispatched after every command
                with anyio.fail_after(10):
                    while True:
                        reply = await c.receive()
                        if reply.message_id == "fence":
                            break
                        if reply.type == "error":
                            assert reply.data["code"] == "TOO_MANY_REQUESTS", reply
                            answered.add(reply.message_id or "")
                        elif reply.type == "engine_command_res":
                            pytest.fail(f"a command queued behind the question ran: {reply}")
                queued = set(connection.in_flight) - {"ask"}
                assert answered | queued == sent and not answered & queued
            await wait_registries_empty(live.runtime)

    portal.call(play)


def test_registries_return_to_the_baseline(rig: Rig) -> None:
    """After everything above, the shared connection holds exactly its two sessions and engines."""
    counts = registries(rig.runtime)
    assert (counts["connections"], counts["sessions"], counts["engines"], counts["pending_requests"]) == (1, 2, 2, 0)
    assert math.isfinite(rig.frames)
