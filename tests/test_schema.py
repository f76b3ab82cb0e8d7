"""The protocol schema: JSON Schema, AsyncAPI and .d.ts are complete, valid and current; samples round-trip."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
import httpx
import jsonschema
import msgspec
import pytest
from starlette.applications import Starlette
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from llmgine_ws import APIConfig, Extensions, create_app, get_runtime
from llmgine_ws.protocol import CORE_CLIENT_MESSAGES, CORE_SERVER_MESSAGES
from llmgine_ws.schema import SERVER_INITIATED, SERVER_MESSAGES, ProtocolSchema, build_asyncapi, server_message_types
from llmgine_ws.schemagen import main as schemagen
from llmgine_ws.typescript import render_dts

from .support import serve
from .test_examples import load_example

if TYPE_CHECKING:
    from llmgine_ws import HandlerContext

pytestmark = pytest.mark.anyio

STATIC = Path(__file__).resolve().parent.parent / "llmgine_ws" / "static"
DTS = STATIC / "llmgine-ws.d.ts"
JS = STATIC / "llmgine-ws.js"


# ------------------------------------------------------------------ a custom protocol to describe


class Item(msgspec.Struct, frozen=True):
    """One line of an order."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=40)]
    quantity: Annotated[int, msgspec.Meta(ge=1, le=99)] = 1
    tags: list[str] = msgspec.field(default_factory=list)


class PlaceOrder(msgspec.Struct, frozen=True, kw_only=True):
    """A custom message with nested structs, literals, optionals, maps, tuples, uuids and aware datetimes."""

    items: list[Item]
    priority: Literal["low", "high"] = "low"
    note: str | None = None
    limits: dict[str, float] = msgspec.field(default_factory=dict)
    window: tuple[int, int] | None = None
    customer: uuid.UUID | None = None
    deliver_at: Annotated[datetime, msgspec.Meta(tz=True)] | None = None


class OrderPlaced(msgspec.Struct, frozen=True):
    """The reply to place_order."""

    order_id: str
    total_items: int


class Progress(msgspec.Struct, frozen=True):
    """A custom server-initiated message."""

    percent: float
    stage: str


async def place_order(data: PlaceOrder, ctx: HandlerContext) -> OrderPlaced:
    """Place an order (a handler whose context annotation only exists under TYPE_CHECKING)."""
    return OrderPlaced(order_id="o-1", total_items=sum(item.quantity for item in data.items))


async def untyped(data: dict[str, Any], ctx: Any):  # type: ignore[no-untyped-def]
    return {"anything": True}


async def returns_nothing(data: dict[str, Any], ctx: Any) -> None:
    return None


def custom_extensions() -> Extensions:
    extensions = Extensions()
    extensions.register_handler("place_order", PlaceOrder, place_order)
    extensions.register_handler("untyped", dict[str, Any], untyped, response_type="untyped_done")
    extensions.register_handler("fire", dict[str, Any], returns_nothing)
    extensions.register_server_message("progress", Progress)
    return extensions


@pytest.fixture
def custom_app() -> Starlette:
    return create_app(APIConfig(ping_interval=0, title="Orders", version="2.3.4"), custom_extensions())


@pytest.fixture(scope="module")
def core_schema() -> dict[str, Any]:
    return ProtocolSchema.core().json_schema()


def resolve(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


# ------------------------------------------------------------------ completeness


def test_every_core_message_type_is_described(core_schema: dict[str, Any]) -> None:
    index = core_schema["x-llmgine"]
    served = set(get_runtime(create_app(APIConfig())).dispatcher.specs)  # the registry joined with the handlers
    assert set(index["client_messages"]) == set(CORE_CLIENT_MESSAGES) == served
    assert set(index["server_messages"]) == set(CORE_SERVER_MESSAGES) == set(SERVER_MESSAGES)
    core_client_types, core_server_types = set(CORE_CLIENT_MESSAGES), set(CORE_SERVER_MESSAGES)
    assert {t for t, e in index["server_messages"].items() if e["server_initiated"]} == SERVER_INITIATED
    defs = core_schema["$defs"]
    assert set(defs["ClientMessage"]["discriminator"]["mapping"]) == core_client_types
    assert set(defs["ServerMessage"]["discriminator"]["mapping"]) == core_server_types
    for ref in refs(core_schema):
        resolve(core_schema, ref)  # every reference resolves
    assert index["client_messages"]["engine_command"]["streams"] == ["engine_event"]
    assert index["client_messages"]["server_response"]["responses"] == ["error"]
    assert set(index["server_requests"]) == {"user_input", "user_confirmation"}
    jsonschema.Draft202012Validator.check_schema(core_schema)


def test_custom_messages_appear_with_no_extra_work(custom_app: Starlette) -> None:
    schema = ProtocolSchema.of_app(custom_app).json_schema()
    index = schema["x-llmgine"]
    assert index["title"] == "Orders" and index["version"] == "2.3.4"
    assert {"place_order", "untyped", "fire"} <= set(index["client_messages"])
    assert index["client_messages"]["place_order"]["responses"] == ["place_order_res", "error"]
    assert index["client_messages"]["place_order"]["core"] is False
    assert index["client_messages"]["place_order"]["description"] == "Place an order (a handler whose context " \
        "annotation only exists under TYPE_CHECKING)."
    server = index["server_messages"]
    assert server["progress"]["server_initiated"] is True
    assert server["place_order_res"]["server_initiated"] is False
    defs = schema["$defs"]
    # The reply is typed from the handler's return annotation, even with a TYPE_CHECKING-only import.
    assert resolve(schema, server["place_order_res"]["$ref"])["properties"]["data"] == {"$ref": "#/$defs/OrderPlaced"}
    assert resolve(schema, server["untyped_done"]["$ref"])["properties"]["data"] == {}
    assert resolve(schema, server["fire_res"]["$ref"])["properties"]["data"] == {"type": "object"}
    assert resolve(schema, server["progress"]["$ref"])["properties"]["data"] == {"$ref": "#/$defs/Progress"}
    assert {"Item", "PlaceOrder", "OrderPlaced", "Progress"} <= set(defs)
    assert defs["Item"]["description"] == "One line of an order."
    assert set(defs["ClientMessage"]["discriminator"]["mapping"]) == set(index["client_messages"])
    assert set(defs["ServerMessage"]["discriminator"]["mapping"]) == set(server)
    jsonschema.Draft202012Validator.check_schema(schema)
    # /api/info lists the same server message types.
    runtime = get_runtime(custom_app)
    assert sorted(server) == sorted(server_message_types(runtime.dispatcher.specs.values(),
                                                         runtime.extensions.server_messages))


def test_the_example_apps_translate_message_is_described() -> None:
    example = load_example("custom_engine_example")
    schema = ProtocolSchema.of_app(example.build_app(APIConfig(ping_interval=0))).json_schema()
    server = schema["x-llmgine"]["server_messages"]
    assert "translate" in schema["x-llmgine"]["client_messages"]
    data = resolve(schema, server["translate_res"]["$ref"])["properties"]["data"]
    assert resolve(schema, data["$ref"])["required"] == ["text", "translated_text", "target_language"]


def test_colliding_struct_names_stay_apart() -> None:
    # A user struct named like a core one (PingData) must not replace it.
    user_ping = msgspec.defstruct("PingData", [("loud", bool)], module="user.module")
    extensions = Extensions()
    extensions.register_handler("shout", user_ping, returns_nothing)
    schema = ProtocolSchema.of_app(create_app(APIConfig(ping_interval=0), extensions)).json_schema()
    defs = schema["$defs"]
    shout = resolve(schema, schema["x-llmgine"]["client_messages"]["shout"]["$ref"])
    ping = resolve(schema, schema["x-llmgine"]["client_messages"]["ping"]["$ref"])
    assert resolve(schema, shout["properties"]["data"]["$ref"])["properties"] == {"loud": {"type": "boolean"}}
    assert "timestamp" in resolve(schema, ping["properties"]["data"]["$ref"])["properties"]
    assert sorted(name for name in defs if name.split(".")[-1] == "PingData") == [
        "llmgine_ws.protocol.messages.PingData", "user.module.PingData"]
    assert "user_module_PingData" in render_dts(schema, client_api=False)


# ------------------------------------------------------------------ samples round-trip through the decoder


def sample(node: Any, defs: dict[str, Any], full: bool) -> Any:
    """A value valid for ``node``: with ``full`` every optional part is filled in, else only what is required."""
    if node is True or not {"$ref", "const", "enum", "anyOf", "oneOf", "type"} & set(node):  # any value
        return {"free": [1, "two", None]} if full else None
    if "$ref" in node:
        return sample(defs[node["$ref"].removeprefix("#/$defs/")], defs, full)
    if "const" in node:
        return node["const"]
    if "enum" in node:
        return node["enum"][-1 if full else 0]
    for keyword in ("anyOf", "oneOf"):
        if keyword in node:
            options = [o for o in node[keyword] if o.get("type") != "null"] if full else node[keyword]
            return sample(options[0], defs, full)
    kind = node.get("type")
    if kind == "string":
        formats = {"uuid": "6f1c1a8e-52c7-4a4e-9f51-7d8b5b1f2a10", "date-time": "2024-05-06T07:08:09Z"}
        if node.get("format") in formats:
            return formats[node["format"]]
        return "s" * max(node.get("minLength", 1), min(node.get("maxLength", 3), 3))
    if kind == "integer":
        return node.get("minimum", 0) + (1 if full and node.get("maximum", 10**9) > node.get("minimum", 0) else 0)
    if kind == "number":
        return 2.5
    if kind == "boolean":
        return full
    if kind == "null":
        return None
    if kind == "array":
        if "prefixItems" in node:
            return [sample(item, defs, full) for item in node["prefixItems"]]
        return [sample(node.get("items", {}), defs, full)] if full or node.get("minItems") else []
    if kind == "object":
        required = set(node.get("required", ()))
        value = {name: sample(schema, defs, full) for name, schema in node.get("properties", {}).items()
                 if full or name in required}
        extra = node.get("additionalProperties")
        if full and not node.get("properties"):
            value["key"] = sample(extra if isinstance(extra, dict) else {}, defs, full)
        return value
    raise AssertionError(f"no sample for {node}")


def contains(outer: Any, inner: Any) -> bool:
    if isinstance(inner, dict):
        return isinstance(outer, dict) and all(k in outer and contains(outer[k], v) for k, v in inner.items())
    if isinstance(inner, list):
        return isinstance(outer, list) and len(outer) == len(inner) and all(map(contains, outer, inner))
    return bool(outer == inner)


def client_samples(app: Starlette) -> Iterator[tuple[str, bool, dict[str, Any], jsonschema.Draft202012Validator]]:
    schema = ProtocolSchema.of_app(app).json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    for message_type, entry in schema["x-llmgine"]["client_messages"].items():
        envelope = jsonschema.Draft202012Validator({"$defs": schema["$defs"], "$ref": entry["$ref"]})
        for full in (False, True):
            message = sample(resolve(schema, entry["$ref"]), schema["$defs"], full)
            message["message_id"] = f"{message_type}-{int(full)}"
            yield message_type, full, message, envelope


@pytest.mark.parametrize("which", ["core", "custom"])
def test_schema_valid_samples_round_trip_through_the_decoder(which: str, custom_app: Starlette) -> None:
    app = create_app(APIConfig(ping_interval=0)) if which == "core" else custom_app
    decoder = get_runtime(app).dispatcher.decoder
    seen = set()
    for message_type, full, message, envelope in client_samples(app):
        envelope.validate(message)
        decoded = decoder.decode(json.dumps(message))
        assert type(decoded).__struct_config__.tag == message_type
        again = json.loads(msgspec.json.encode(decoded))
        if full:
            assert again == message, message_type  # nothing lost, nothing added
        else:
            assert contains(again, message), message_type  # defaults filled in
        seen.add(message_type)
    assert seen == set(get_runtime(app).dispatcher.specs)


def test_schema_invalid_samples_are_refused_by_the_decoder_too(custom_app: Starlette) -> None:
    decoder = get_runtime(custom_app).dispatcher.decoder
    checked = 0
    for _message_type, full, message, envelope in client_samples(custom_app):
        data = message.get("data")
        if full or not isinstance(data, dict):
            continue
        for field in list(data):  # the minimal sample holds only required fields: drop each one
            broken = {**message, "data": {k: v for k, v in data.items() if k != field}}
            with pytest.raises(jsonschema.ValidationError):
                envelope.validate(broken)
            with pytest.raises(msgspec.ValidationError):
                decoder.decode(json.dumps(broken))
            checked += 1
        wrong_type = {**message, "type": "nonexistent"}
        with pytest.raises(jsonschema.ValidationError):
            envelope.validate(wrong_type)
    assert checked >= 8


# ------------------------------------------------------------------ what the server really sends matches


async def test_every_server_frame_of_a_real_session_matches_the_schema() -> None:
    example = load_example("custom_engine_example")
    app = example.build_app(APIConfig(ping_interval=0.05, missed_pongs=50))
    schema = ProtocolSchema.of_app(app).json_schema()
    any_server_message = jsonschema.Draft202012Validator({"$defs": schema["$defs"], "$ref": "#/$defs/ServerMessage"})
    index = schema["x-llmgine"]["server_messages"]
    by_type = {t: jsonschema.Draft202012Validator({"$defs": schema["$defs"], "$ref": e["$ref"]})
               for t, e in index.items()}
    seen: dict[str, int] = {}

    async def receive(ws: ClientConnection, until: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        with anyio.fail_after(10):
            while True:
                frame = json.loads(await ws.recv())
                any_server_message.validate(frame)
                by_type[frame["type"]].validate(frame)
                seen[frame["type"]] = seen.get(frame["type"], 0) + 1
                if frame["type"] == "server_ping":
                    await ws.send(json.dumps({"type": "server_pong", "message_id": frame["message_id"],
                                              "data": {"timestamp": frame["data"]["timestamp"]}}))
                if until(frame):
                    return frame

    async def call(ws: ClientConnection, message_type: str, data: Any) -> dict[str, Any]:
        message_id = str(uuid.uuid4())
        await ws.send(json.dumps({"type": message_type, "message_id": message_id, "data": data}))
        return await receive(ws, lambda f: f["message_id"] == message_id and not f.get("server_initiated"))

    async with serve(app) as server, ws_connect(server.ws_url) as ws:
        await receive(ws, lambda f: f["type"] == "connected")
        assert (await call(ws, "ping", {"timestamp": 1}))["type"] == "ping_res"
        session_id = (await call(ws, "create_session", {}))["data"]["session_id"]
        assert (await call(ws, "status", {"session_id": session_id}))["type"] == "status_res"
        assert (await call(ws, "create_engine", {"session_id": session_id, "engine_type": "chat",
                                                 "config": {"token_delay": 0}}))["type"] == "create_engine_res"
        assert (await call(ws, "status", {"session_id": session_id}))["data"]["engine"]["status"] == "idle"
        # A command with a confirmation round trip, a tool call and a streamed reply.
        command_id = "weather-1"
        await ws.send(json.dumps({"type": "engine_command", "message_id": command_id,
                                  "data": {"session_id": session_id, "command": {"text": "weather in Oslo"}}}))
        request = await receive(ws, lambda f: f["type"] == "server_request")
        await ws.send(json.dumps({"type": "server_response", "message_id": request["message_id"],
                                  "data": {"response_type": "user_confirmation", "selection": "yes"}}))
        done = await receive(ws, lambda f: f["message_id"] == command_id)
        assert done["data"]["status"] == "completed"
        # A command waiting for the user, cancelled: the server withdraws its request.
        await ws.send(json.dumps({"type": "engine_command", "message_id": "empty-1",
                                  "data": {"session_id": session_id, "command": {"text": ""}}}))
        asked = await receive(ws, lambda f: f["type"] == "server_request")
        assert asked["data"]["request_type"] == "user_input"
        assert (await call(ws, "cancel", {"target_message_id": "empty-1"}))["data"]["cancelled"] is True
        await receive(ws, lambda f: f["type"] == "server_request_cancelled")
        await receive(ws, lambda f: f["message_id"] == "empty-1")
        assert (await call(ws, "translate", {"text": "hello"}))["type"] == "translate_res"
        assert (await call(ws, "delete_engine", {"session_id": session_id}))["type"] == "delete_engine_res"
        assert (await call(ws, "close_session", {"session_id": session_id}))["type"] == "close_session_res"
        assert (await call(ws, "status", {"session_id": session_id}))["type"] == "error"
        await receive(ws, lambda f: f["type"] == "server_ping")
        resume = await call(ws, "resume", {"app_id": "none", "resume_token": "none", "last_seq": 0})
        assert resume["data"]["reason"] == "unknown"
    assert set(seen) == set(SERVER_MESSAGES) | {"translate_res"}, set(SERVER_MESSAGES) - set(seen)


# ------------------------------------------------------------------ served over HTTP


async def test_schema_asyncapi_and_client_files_are_served(custom_app: Starlette) -> None:
    async with serve(custom_app) as server, httpx.AsyncClient(base_url=server.http_url) as http:
        response = await http.get("/api/schema")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/schema+json"
        assert response.json() == json.loads(json.dumps(ProtocolSchema.of_app(custom_app).json_schema()))

        asyncapi = (await http.get("/api/schema/asyncapi")).json()
        assert asyncapi["servers"]["default"] == {"host": f"127.0.0.1:{server.port}", "protocol": "ws"}
        assert "place_order" in asyncapi["channels"]["llmgine"]["messages"]
        assert "send_progress" in asyncapi["operations"]

        info = (await http.get("/api/info")).json()
        assert "server_request_cancelled" in info["message_types"]["server"]
        assert {"progress", "place_order_res", "untyped_done"} <= set(info["message_types"]["server"])

        js = await http.get("/api/client/llmgine-ws.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert js.text == JS.read_text(encoding="utf-8")
        dts = await http.get("/api/client/llmgine-ws.d.ts")
        assert dts.status_code == 200 and dts.text == DTS.read_text(encoding="utf-8")
        assert (await http.head("/api/client/llmgine-ws.js")).status_code == 200
        assert (await http.get("/api/client/llmgine-ws.api.d.ts.in")).status_code == 404
        assert (await http.get("/api/client/..%2Fschema.py")).status_code == 404


def test_asyncapi_document_is_consistent(custom_app: Starlette) -> None:
    schema = ProtocolSchema.of_app(custom_app).json_schema()
    document = build_asyncapi(schema, server_url="wss://chat.example/app")
    assert document["asyncapi"] == "3.0.0"
    assert document["servers"]["default"] == {"host": "chat.example", "protocol": "wss", "pathname": "/app"}
    channel = document["channels"]["llmgine"]
    assert channel["address"] == "/api/ws"
    assert "#/$defs/" not in json.dumps(document)
    for ref in refs(document):
        resolve(document, ref)
    index = schema["x-llmgine"]
    assert {m["name"] for m in channel["messages"].values()} == set(index["client_messages"]) | set(
        index["server_messages"])
    operations = document["operations"]
    assert operations["receive_ping"]["action"] == "receive"
    replies = [resolve(document, r["$ref"])["name"] for r in operations["receive_ping"]["reply"]["messages"]]
    assert replies == ["ping_res", "error"]
    assert resolve(document, operations["send_server_request"]["reply"]["messages"][0]["$ref"])["name"] == \
        "server_response"
    assert {op["action"] for op in operations.values()} == {"send", "receive"}
    assert all(name.startswith("send_") for name, op in operations.items() if op["action"] == "send")
    assert "discriminator" not in json.dumps(document["components"])


# ------------------------------------------------------------------ the TypeScript declarations


def test_checked_in_dts_is_current(core_schema: dict[str, Any]) -> None:
    expected = render_dts(core_schema)
    assert DTS.read_text(encoding="utf-8") == expected, (
        "llmgine_ws/static/llmgine-ws.d.ts is stale: regenerate it with "
        "python -m llmgine_ws.schemagen --dts llmgine_ws/static/llmgine-ws.d.ts")
    assert schemagen(["--dts", str(DTS), "--check"]) == 0


def test_the_generator_command_writes_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "out" / "protocol.d.ts"
    assert schemagen(["--dts", str(target), "--check"]) == 1  # missing = stale
    assert "stale" in capsys.readouterr().err
    assert schemagen(["--dts", str(target), "--protocol-only", "--json", str(tmp_path / "s.json"),
                      "--asyncapi", str(tmp_path / "a.json")]) == 0
    assert schemagen(["--dts", str(target), "--protocol-only", "--check"]) == 0
    assert "class LlmgineClient" not in target.read_text() and "export interface PingData" in target.read_text()
    target.write_text(target.read_text() + "// edited\n")
    assert schemagen(["--dts", str(target), "--protocol-only", "--check"]) == 1
    assert json.loads((tmp_path / "a.json").read_text())["asyncapi"] == "3.0.0"
    assert schemagen([]) == 0
    assert json.loads(capsys.readouterr().out)["$defs"]["PingMessage"]["properties"]["type"] == {"enum": ["ping"]}
    examples = str(Path(__file__).resolve().parent.parent / "examples")
    sys.path.insert(0, examples)
    try:
        assert schemagen(["--app", "custom_engine_example:build_app", "--factory",
                          "--json", str(tmp_path / "e.json")]) == 0
    finally:
        sys.path.remove(examples)
    assert "translate" in json.loads((tmp_path / "e.json").read_text())["x-llmgine"]["client_messages"]


def test_dts_declares_every_message_and_definition(core_schema: dict[str, Any]) -> None:
    text = DTS.read_text(encoding="utf-8")
    for name in core_schema["$defs"]:
        assert f"export interface {name} " in text or f"export type {name} = " in text, name

    def block(title: str) -> str:
        start = text.index(f"export interface {title} {{")
        return text[start:text.index("\n}", start)]

    index = core_schema["x-llmgine"]
    for message_type in index["client_messages"]:
        assert f"\n  {message_type}: " in block("ClientMessageData")
        assert f"\n  {message_type}: " in block("ResponseTypes")
    for message_type in index["server_messages"]:
        assert f"\n  {message_type}: " in block("ServerMessageData")
    assert '  engine_command: "engine_command_res";' in block("ResponseTypes")
    assert "export declare class LlmgineClient extends EventTarget" in text
    assert "  user_confirmation: { request: UserConfirmationRequest; response: UserConfirmationResponse };" in text
