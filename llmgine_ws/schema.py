"""The protocol as data: JSON Schema, AsyncAPI 3.0 and TypeScript definitions, from the msgspec structs.

Everything here is generated from the same structs the server decodes and encodes with, so the
documents cannot drift from the code:

* :func:`build_json_schema` — one JSON Schema (draft 2020-12) document. Its ``$defs`` hold the
  envelope of every client message (``PingMessage``...), of every server message
  (``PingResMessage``...), their payload structs, the unions ``ClientMessage`` and ``ServerMessage``
  (tagged by ``type``) and the shapes of the core server requests (``UserInputRequest``...). The
  root validates any frame of the protocol. The ``x-llmgine`` key indexes it by message type.
* :func:`build_asyncapi` — an AsyncAPI 3.0 document of the WebSocket channel, from the server's
  point of view (``receive`` = a client message, ``send`` = a server message; replies attached).
* :func:`llmgine_ws.typescript.render_dts` — TypeScript declarations from the JSON Schema.

Custom messages need no extra work: a type registered with ``Extensions.register_handler`` appears
as a client message (its reply typed from the handler's return annotation when it has one) and a
type declared with ``Extensions.register_server_message`` as a server message.

The app serves ``GET /api/schema`` (the JSON Schema) and ``GET /api/schema/asyncapi``; the
command line is :mod:`llmgine_ws.schemagen` (``llmgine-ws-schema``).
"""

from __future__ import annotations

import collections.abc
import copy
import inspect
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Union

import msgspec

from .extensions import HandlerSpec
from .gate import SUBPROTOCOL
from .protocol import (
    ANSWERS,
    CORE_CLIENT_MESSAGES,
    CORE_SERVER_MESSAGES,
    NotificationData,
    ServerRequestData,
    ServerRequestError,
    UserConfirmationRequest,
    UserConfirmationResponse,
    UserInputRequest,
    UserInputResponse,
    envelope_for,
)
from .protocol import SERVER_REQUESTS as _SERVER_REQUEST_SPECS
from .runtime import Runtime, get_runtime

__all__ = [
    "SERVER_INITIATED",
    "SERVER_MESSAGES",
    "SERVER_REQUESTS",
    "SUBPROTOCOL",
    "ProtocolSchema",
    "ServerRequestError",
    "UserConfirmationRequest",
    "UserConfirmationResponse",
    "UserInputRequest",
    "UserInputResponse",
    "build_asyncapi",
    "build_json_schema",
    "server_message_types",
]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

SERVER_MESSAGES: Mapping[str, Any] = MappingProxyType(
    {name: spec.data_type for name, spec in CORE_SERVER_MESSAGES.items()})
"""Payload type of every message the core server (engines included) sends, by ``type``."""

SERVER_INITIATED = frozenset(name for name, spec in CORE_SERVER_MESSAGES.items() if spec.server_initiated)
"""Core server messages that carry ``"server_initiated": true`` (the others are responses)."""

SERVER_REQUESTS: Mapping[str, tuple[Any, Any]] = MappingProxyType(
    {name: (spec.request, spec.response) for name, spec in _SERVER_REQUEST_SPECS.items()})
"""``request_type`` → (request data, response data) of the server requests the core sends."""

_DESCRIPTIONS: Mapping[str, str] = MappingProxyType({
    **{name: spec.description for name, spec in CORE_CLIENT_MESSAGES.items()},
    **{name: spec.description for name, spec in CORE_SERVER_MESSAGES.items()},
})

_OPEN_OBJECTS = (ServerRequestData, NotificationData, UserInputRequest, UserConfirmationRequest)
"""Payloads that may carry fields beyond those declared (``additionalProperties: true``)."""


# --------------------------------------------------------------------------------------------
# Collecting the message types of an app
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ServerMessage:
    message_type: str
    data_type: Any
    server_initiated: bool
    description: str


def core_specs() -> list[HandlerSpec]:
    """The core client messages as the schema sees them: from the registry (no handlers needed)."""
    return [HandlerSpec(name, spec.data_type, _no_handler, spec.reply or f"{name}_res", True)
            for name, spec in CORE_CLIENT_MESSAGES.items()]


def _no_handler(data: Any, ctx: Any) -> None:
    """Stands in for the core handlers, which the schema does not need."""


def server_message_types(
    handlers: Iterable[HandlerSpec], server_messages: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Payload type of every server message of an app: core, custom handlers' replies, declared ones.

    A custom handler's reply is typed from the handler's return annotation (``Any`` without one).
    """
    return {m.message_type: m.data_type for m in _server_messages(list(handlers), server_messages or {})}


def _server_messages(handlers: Sequence[HandlerSpec], declared: Mapping[str, Any]) -> list[_ServerMessage]:
    found: dict[str, _ServerMessage] = {
        name: _ServerMessage(name, data_type, name in SERVER_INITIATED, _DESCRIPTIONS.get(name, ""))
        for name, data_type in SERVER_MESSAGES.items()
    }
    replies: set[str] = set()
    for spec in handlers:
        if spec.message_type in ANSWERS:
            continue
        replies.add(spec.response_type)
        if spec.response_type not in found:
            found[spec.response_type] = _ServerMessage(
                spec.response_type, _reply_type(spec.handler), False,
                f"Answer to {spec.message_type}." + _first_line(inspect.unwrap(spec.handler), " "))
    for name, data_type in declared.items():  # declared types are never core ones (those are reserved)
        found[name] = _ServerMessage(name, _schemable_or_any(data_type), name not in replies,
                                     _first_line(data_type, ""))
    return list(found.values())


def _clean_doc(text: str) -> str:
    """A docstring as plain text: dedented, with reST ````literals```` as Markdown `literals`."""
    return inspect.cleandoc(text).replace("``", "`")


def _first_line(obj: Any, prefix: str) -> str:
    doc = inspect.getdoc(obj) if obj is not None else None
    if not doc or (isinstance(obj, type) and obj.__doc__ is None):
        return ""
    return prefix + _clean_doc(doc).splitlines()[0]


def _reply_type(handler: Any) -> Any:
    """The type a handler's return annotation promises (``Any`` when unknown or not encodable)."""
    target = handler = inspect.unwrap(handler)
    if not inspect.isfunction(target) and not inspect.ismethod(target):
        target = getattr(handler, "__call__", None)  # noqa: B004 - an async callable object
    if target is None:
        return Any
    try:
        annotation: Any = typing.get_type_hints(target).get("return", Any)
    except Exception:  # e.g. a parameter annotated with a name imported only under TYPE_CHECKING
        try:
            annotation = inspect.get_annotations(target).get("return", Any)
            if isinstance(annotation, str):
                annotation = eval(annotation, getattr(target, "__globals__", {}))  # the handler's own annotation
        except Exception:
            return Any
    if annotation is None or annotation is type(None):
        return dict[str, Any]  # a handler returning None replies {}
    origin = typing.get_origin(annotation)
    if origin in (collections.abc.Awaitable, collections.abc.Coroutine):
        annotation = typing.get_args(annotation)[-1]
    return _schemable_or_any(annotation)


def _schemable_or_any(data_type: Any) -> Any:
    try:
        msgspec.json.schema(data_type)
    except (TypeError, ValueError):
        return Any
    return data_type


# --------------------------------------------------------------------------------------------
# JSON Schema
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProtocolSchema:
    """What the schema documents are built from: an app's message types and identity."""

    handlers: tuple[HandlerSpec, ...]
    server_messages: Mapping[str, Any]
    title: str = "LLMgine API"
    version: str = "1.0.0"
    ws_path: str = "/api/ws"

    @classmethod
    def core(cls) -> ProtocolSchema:
        """The core protocol alone (no custom messages), as the checked-in ``.d.ts`` describes it."""
        return cls(tuple(core_specs()), {})

    @classmethod
    def of_app(cls, app: Any) -> ProtocolSchema:
        """Everything an app made by :func:`llmgine_ws.create_app` speaks, custom messages included."""
        return cls.of_runtime(get_runtime(app))

    @classmethod
    def of_runtime(cls, runtime: Runtime) -> ProtocolSchema:
        """Like :meth:`of_app`, from the app's :class:`~llmgine_ws.Runtime`."""
        config = runtime.config
        return cls(tuple(runtime.dispatcher.specs.values()), dict(runtime.extensions.server_messages),
                   title=config.title, version=config.version, ws_path=config.ws_path)

    def json_schema(self) -> dict[str, Any]:
        """See :func:`build_json_schema`."""
        return build_json_schema(self.handlers, self.server_messages, title=self.title, version=self.version,
                                 ws_path=self.ws_path)

    def asyncapi(self, server_url: str | None = None) -> dict[str, Any]:
        """See :func:`build_asyncapi`."""
        return build_asyncapi(self.json_schema(), server_url=server_url)


def build_json_schema(
    handlers: Iterable[HandlerSpec],
    server_messages: Mapping[str, Any] | None = None,
    *,
    title: str = "LLMgine API",
    version: str = "1.0.0",
    ws_path: str = "/api/ws",
) -> dict[str, Any]:
    """The JSON Schema (2020-12) of every client and server message of the protocol.

    ``handlers`` are the registered client message types (core and custom: ``runtime.dispatcher.specs``),
    ``server_messages`` the declared custom server messages (``extensions.server_messages``).
    """
    specs = list(handlers)
    client_envelopes = {spec.message_type: envelope_for(spec.message_type, _schemable_or_any(spec.data_type))
                        for spec in specs}
    outgoing = _server_messages(specs, server_messages or {})
    server_envelopes = {m.message_type: _server_envelope(m) for m in outgoing}

    client_union: Any = Union[tuple(client_envelopes.values())]  # noqa: UP007 - a runtime-built union
    server_union: Any = Union[tuple(server_envelopes.values())]  # noqa: UP007
    request_types = [t for pair in SERVER_REQUESTS.values() for t in pair] + [ServerRequestError]
    (client_schema, server_schema, *_), components = msgspec.json.schema_components(
        [client_union, server_union, *request_types], ref_template="#/$defs/{name}")

    for open_type in _OPEN_OBJECTS:
        name = _component_name(open_type, components)
        if name is not None:
            components[name]["additionalProperties"] = True
    for component in components.values():
        if isinstance(component.get("description"), str):
            component["description"] = _clean_doc(component["description"])

    client_name = "ClientMessage" if "ClientMessage" not in components else "llmgine_ws.ClientMessage"
    server_name = "ServerMessage" if "ServerMessage" not in components else "llmgine_ws.ServerMessage"
    defs = {name: components[name] for name in sorted(components)}
    defs[client_name] = {"title": "ClientMessage", "description": "Any message a client sends.", **client_schema}
    defs[server_name] = {"title": "ServerMessage", "description": "Any message the server sends.", **server_schema}

    descriptions = {spec.message_type: _DESCRIPTIONS.get(spec.message_type) or _first_line(spec.handler, "")
                    for spec in specs}
    client_index = {}
    for spec in specs:
        envelope = _component_name(client_envelopes[spec.message_type], components)
        if envelope is not None and descriptions[spec.message_type]:
            defs[envelope]["description"] = f"`{spec.message_type}`: {descriptions[spec.message_type]}"
        responses = ["error"] if spec.message_type in ANSWERS else [spec.response_type, "error"]
        entry: dict[str, Any] = {"$ref": f"#/$defs/{envelope}", "description": descriptions[spec.message_type],
                                 "responses": responses, "core": spec.message_type in _DESCRIPTIONS}
        core = CORE_CLIENT_MESSAGES.get(spec.message_type)
        if core is not None and core.streams:
            entry["streams"] = list(core.streams)
        client_index[spec.message_type] = entry
    for m in outgoing:
        envelope = _component_name(server_envelopes[m.message_type], components)
        if envelope is not None and m.description:
            defs[envelope]["description"] = f"`{m.message_type}`: {m.description}"
    server_index = {
        m.message_type: {"$ref": f"#/$defs/{_component_name(server_envelopes[m.message_type], components)}",
                         "description": m.description, "server_initiated": m.server_initiated,
                         "core": m.message_type in SERVER_MESSAGES}
        for m in outgoing
    }
    request_index = {
        request_type: {"request": {"$ref": f"#/$defs/{_component_name(request, components)}"},
                       "response": {"$ref": f"#/$defs/{_component_name(response, components)}"}}
        for request_type, (request, response) in SERVER_REQUESTS.items()
    }
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": f"{title} {version} WebSocket protocol",
        "description": (
            "Every JSON text frame of the llmgine_ws protocol. Client messages are "
            "{type, message_id, data}; server messages repeat the request's message_id, or carry "
            "server_initiated: true when the server starts them. $defs/ClientMessage and "
            "$defs/ServerMessage are the two directions; x-llmgine indexes them by type."
        ),
        "anyOf": [{"$ref": f"#/$defs/{client_name}"}, {"$ref": f"#/$defs/{server_name}"}],
        "$defs": defs,
        "x-llmgine": {
            "title": title,
            "version": version,
            "websocket_path": ws_path,
            "subprotocol": SUBPROTOCOL,
            "auth_subprotocol_prefix": "llmgine.auth.",
            "client_messages": client_index,
            "server_messages": server_index,
            "server_requests": request_index,
            "server_request_error": {"$ref": f"#/$defs/{_component_name(ServerRequestError, components)}"},
        },
    }


def _server_envelope(message: _ServerMessage) -> Any:
    """A struct describing one server frame: ``{"type", "message_id", "data", "server_initiated"?}``."""
    name = "".join(part.capitalize() for part in message.message_type.replace(".", "_").replace(":", "_")
                   .replace("-", "_").split("_")) or "Server"
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = [("message_id", str), ("data", message.data_type)]
    if message.server_initiated:
        fields.append(("server_initiated", Literal[True]))
    return msgspec.defstruct(f"{name}Message", fields, tag_field="type", tag=message.message_type, kw_only=True,
                             module="llmgine_ws.server_messages")


def _component_name(struct_type: Any, components: Mapping[str, Any]) -> str | None:
    """The key msgspec gave a struct in ``components`` (qualified only when two names clash)."""
    qualified = f"{struct_type.__module__}.{struct_type.__qualname__}"
    if qualified in components:
        return qualified
    return struct_type.__name__ if struct_type.__name__ in components else None


# --------------------------------------------------------------------------------------------
# AsyncAPI 3.0
# --------------------------------------------------------------------------------------------


def build_asyncapi(json_schema: Mapping[str, Any], *, server_url: str | None = None) -> dict[str, Any]:
    """An AsyncAPI 3.0 document of the protocol's one channel, from :func:`build_json_schema`'s output.

    Written from the server's point of view: a client message is an operation the server
    ``receive``s (with the reply it sends), a server-initiated message one it ``send``s.
    ``server_url`` (``ws://host:port`` or ``wss://...``) fills ``servers``.
    """
    index = json_schema["x-llmgine"]
    schemas = _asyncapi_schemas(json_schema["$defs"])
    client: Mapping[str, Any] = index["client_messages"]
    server: Mapping[str, Any] = index["server_messages"]

    keys: dict[tuple[str, str], str] = {}
    messages: dict[str, Any] = {}
    for direction, entries in (("client", client), ("server", server)):
        for message_type, entry in entries.items():
            key = _asyncapi_key(message_type, direction, messages)
            keys[(direction, message_type)] = key
            messages[key] = {
                "name": message_type,
                "title": message_type,
                "summary": entry["description"] or f"{direction} message {message_type}",
                "contentType": "application/json",
                "payload": {"$ref": entry["$ref"].replace("#/$defs/", "#/components/schemas/")},
                "x-direction": "client_to_server" if direction == "client" else "server_to_client",
            }

    def ref(direction: str, message_type: str) -> dict[str, str]:
        return {"$ref": f"#/channels/llmgine/messages/{keys[(direction, message_type)]}"}

    channel_ref = {"$ref": "#/channels/llmgine"}
    operations: dict[str, Any] = {}
    for message_type, entry in client.items():
        if message_type in ANSWERS:
            continue  # replies to the server's own operations below
        operation: dict[str, Any] = {
            "action": "receive",
            "channel": channel_ref,
            "summary": entry["description"],
            "messages": [ref("client", message_type)],
            "reply": {"channel": channel_ref,
                      "messages": [ref("server", r) for r in entry["responses"] if ("server", r) in keys]},
        }
        if entry.get("streams"):
            operation["description"] = "Before the reply the server streams " + ", ".join(entry["streams"]) + "."
        operations[f"receive_{_op_name(message_type)}"] = operation
    for message_type, entry in server.items():
        if not entry["server_initiated"]:
            continue
        operation = {"action": "send", "channel": channel_ref, "summary": entry["description"],
                     "messages": [ref("server", message_type)]}
        answer = {"server_request": "server_response", "server_ping": "server_pong"}.get(message_type)
        if answer is not None and ("client", answer) in keys:
            operation["reply"] = {"channel": channel_ref, "messages": [ref("client", answer)]}
        operations[f"send_{_op_name(message_type)}"] = operation

    document: dict[str, Any] = {
        "asyncapi": "3.0.0",
        "info": {
            "title": index["title"],
            "version": index["version"],
            "description": (
                "llmgine_ws WebSocket protocol: JSON text frames {type, message_id, data}. Responses repeat "
                "the request's message_id; server-initiated messages carry server_initiated: true. "
                f"Offer the subprotocol {index['subprotocol']!r} (and, with authentication on, "
                f"'{index['auth_subprotocol_prefix']}<token>' next to it). This document describes the "
                "server: 'receive' operations are client messages, 'send' operations server messages."
            ),
        },
        "defaultContentType": "application/json",
        "channels": {
            "llmgine": {
                "address": index["websocket_path"],
                "title": "llmgine_ws",
                "description": "The one WebSocket endpoint; every message type travels on it.",
                "messages": messages,
                "bindings": {"ws": {"bindingVersion": "0.1.0", "method": "GET", "headers": {
                    "type": "object",
                    "properties": {"Sec-WebSocket-Protocol": {
                        "type": "string",
                        "description": f"Offer {index['subprotocol']}; the server selects it. With "
                                       f"authentication on, also offer {index['auth_subprotocol_prefix']}<token>.",
                    }},
                }}},
            }
        },
        "operations": operations,
        "components": {"schemas": schemas},
    }
    if server_url is not None:
        scheme, _, rest = server_url.partition("://")
        host, _, pathname = rest.partition("/")
        server_object: dict[str, Any] = {"host": host, "protocol": "wss" if scheme in ("wss", "https") else "ws"}
        if pathname:
            server_object["pathname"] = "/" + pathname
        document["servers"] = {"default": server_object}
        document["channels"]["llmgine"]["servers"] = [{"$ref": "#/servers/default"}]
    return document


def _asyncapi_key(message_type: str, direction: str, taken: Mapping[str, Any]) -> str:
    key = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in message_type)
    return key if key not in taken else f"{key}.{direction}"


def _op_name(message_type: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in message_type)


def _asyncapi_schemas(defs: Mapping[str, Any]) -> dict[str, Any]:
    """JSON Schema ``$defs`` as AsyncAPI components: refs rewritten, OpenAPI-style discriminators dropped."""

    def convert(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "discriminator" and isinstance(value, dict):
                    continue  # AsyncAPI's discriminator is a bare property name and means inheritance
                if key == "$ref" and isinstance(value, str):
                    out[key] = value.replace("#/$defs/", "#/components/schemas/")
                else:
                    out[key] = convert(value)
            return out
        if isinstance(node, list):
            return [convert(item) for item in node]
        return node

    return {name: convert(copy.deepcopy(schema)) for name, schema in defs.items()}
