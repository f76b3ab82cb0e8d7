"""Extension points: custom messages, callbacks, engine types, routes.

Build an :class:`Extensions`, register what you need, and pass it to
:func:`llmgine_ws.create_app`. Registration closes when the app is created (the message decoder is
built once from everything registered), and one ``Extensions`` serves exactly one app.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from starlette.routing import BaseRoute

from .context import HandlerContext
from .engines import EngineFactory
from .messaging import MessagingAPI
from .protocol import RESERVED_MESSAGE_TYPES
from .sessions import Session

Handler = Callable[[Any, HandlerContext], Awaitable[Any]] | Callable[[Any, HandlerContext], Any]
"""``handler(data, ctx)``: ``data`` is the decoded payload struct; the return value is the reply's data.

An ``async def`` handler runs in its own task, concurrently with the connection's other messages.
A plain ``def`` handler runs inline in the reader and must never block: keep it for trivial work.
"""

ConnectionCallback = Callable[[str], Awaitable[None]]
SessionCallback = Callable[[Session], Awaitable[None]]

_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_.:-]{0,63}$")

@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """One registered message type: its payload type, handler, and reply type."""

    message_type: str
    data_type: Any
    handler: Handler
    response_type: str
    inline: bool
    prepare: Callable[[Any, HandlerContext], Any] | None = None
    """Runs inline when the message is dispatched, before an async handler's task starts (e.g. to take
    a slot that messages right behind it must see); its result is ``ctx.prepared``; raising
    ``ProtocolError`` answers instead."""


class Extensions:
    """What you add to the server: custom messages, callbacks, engine types and routes."""

    def __init__(self) -> None:
        self.handlers: dict[str, HandlerSpec] = {}
        self.server_messages: dict[str, Any] = {}
        self.engine_factories: dict[str, EngineFactory] = {}
        self.connection_callbacks: dict[str, list[ConnectionCallback]] = {
            "connect": [], "disconnect": [], "detached": [], "resumed": []}
        self.session_callbacks: dict[str, list[SessionCallback]] = {"session_created": [], "session_destroyed": []}
        self.routes: list[BaseRoute] = []
        self._messaging: MessagingAPI | None = None

    def register_handler(
        self,
        message_type: str,
        data_type: Any,
        handler: Handler,
        *,
        response_type: str | None = None,
        forbid_unknown_fields: bool = True,
    ) -> None:
        """Handle client messages of ``message_type`` whose ``data`` decodes as ``data_type``.

        ``data_type`` is a msgspec ``Struct`` (or any type msgspec can decode, e.g.
        ``dict[str, Any]``). The handler's return value (a struct, a mapping or ``None`` for ``{}``)
        is sent back as ``response_type`` (default ``<message_type>_res``) with the request's
        ``message_id``; any other value (a list, a string...) is a bug in the handler: logged, and the
        client gets ``INTERNAL_ERROR``. Raise :class:`~llmgine_ws.errors.ProtocolError` to answer
        with an error.

        With ``forbid_unknown_fields`` (the default), a field the struct does not declare (a typo
        like ``max_wrds``) is a ``VALIDATION_ERROR`` naming it, as if the struct were declared with
        ``forbid_unknown_fields=True``; pass ``False`` to ignore unknown fields (e.g. while clients
        move to a new version). Structs nested inside it keep their own setting.

        Raises ``TypeError`` at once when ``handler`` is not a callable taking ``(data, ctx)`` or
        ``data_type`` is not something msgspec can decode.
        """
        self._check_open()
        if not _TYPE_NAME.match(message_type):
            raise ValueError(f"message type {message_type!r} must match {_TYPE_NAME.pattern}")
        if message_type in RESERVED_MESSAGE_TYPES:
            raise ValueError(f"message type {message_type!r} is reserved by the core protocol")
        if message_type in self.handlers:
            raise ValueError(f"a handler for {message_type!r} is already registered")
        _check_callable(handler, 2, f"the handler of {message_type!r}", "handler(data, ctx)")
        decoded_as = _strict(_check_data_type(message_type, data_type), forbid_unknown_fields)
        spec = make_spec(message_type, decoded_as, _checked_replies(message_type, handler), response_type)
        self.handlers[message_type] = spec

    def register_server_message(self, message_type: str, data_type: Any) -> None:
        """Declare a custom server-initiated message type and its payload struct.

        Sending works without declaring; declared types are listed in ``/api/info`` and the schema.
        """
        self._check_open()
        if message_type in RESERVED_MESSAGE_TYPES:
            raise ValueError(f"message type {message_type!r} is reserved by the core protocol")
        self.server_messages[message_type] = data_type

    def register_engine(self, engine_type: str, factory: EngineFactory) -> None:
        """Make ``engine_type`` creatable with ``create_engine``.

        ``factory(session, config)`` (sync or async) returns an :class:`~llmgine_ws.engines.Engine`;
        an engine class is a factory too. ``config`` is ``create_engine``'s ``config``: it comes from
        the client, so treat it as untrusted input. Raises ``TypeError`` at once when ``factory`` is
        not a callable taking ``(session, config)``, or is a class without ``start``,
        ``handle_command`` and ``stop``.
        """
        self._check_open()
        if not isinstance(engine_type, str) or not engine_type:
            raise ValueError(f"engine type {engine_type!r} must be a non-empty string")
        _check_callable(factory, 2, f"the factory of engine type {engine_type!r}", "factory(session, config)")
        if isinstance(factory, type):
            missing = [name for name in ("start", "handle_command", "stop")
                       if not inspect.iscoroutinefunction(getattr(factory, name, None))]
            if missing:
                raise TypeError(f"engine class {factory.__qualname__} (engine type {engine_type!r}) needs async "
                                f"methods start(), handle_command(command, ctx) and stop(); missing or not async: "
                                f"{', '.join(missing)}")
        if engine_type in self.engine_factories:
            raise ValueError(f"engine type {engine_type!r} is already registered")
        self.engine_factories[engine_type] = factory

    def register_connection_callback(
        self, event: Literal["connect", "disconnect", "detached", "resumed"], callback: ConnectionCallback
    ) -> None:
        """Call ``await callback(app_id)`` when an app connects or (after cleanup) disconnects.

        ``detached``: a resumable app's socket dropped (it keeps its sessions for ``resume_window``);
        ``resumed``: it was resumed on a new socket. An app that is never resumed gets ``disconnect``
        once its window has passed and it was cleaned up (see docs/resume.md).
        """
        self._check_open()
        if event not in self.connection_callbacks:
            raise ValueError(f"unknown connection event {event!r}; use 'connect', 'disconnect', 'detached' or "
                             "'resumed'")
        self.connection_callbacks[event].append(_require_async(callback))

    def register_session_callback(
        self, event: Literal["session_created", "session_destroyed"], callback: SessionCallback
    ) -> None:
        """Call ``await callback(session)`` when a session is created or destroyed (any reason)."""
        self._check_open()
        if event not in self.session_callbacks:
            raise ValueError(f"unknown session event {event!r}; use 'session_created' or 'session_destroyed'")
        self.session_callbacks[event].append(_require_async(callback))

    def add_route(self, route: BaseRoute) -> None:
        """Serve an extra Starlette route from the app (e.g. your own HTTP endpoints)."""
        self._check_open()
        self.routes.append(route)

    def get_messaging_api(self) -> MessagingAPI:
        """The messaging API of the app these extensions were given to."""
        if self._messaging is None:
            raise RuntimeError("create the app with create_app(extensions=...) before asking for its messaging API")
        return self._messaging

    def _bind(self, messaging: MessagingAPI) -> None:
        if self._messaging is not None:
            raise RuntimeError("these Extensions already belong to an app; build one Extensions per app")
        self._messaging = messaging

    def _check_open(self) -> None:
        if self._messaging is not None:
            raise RuntimeError("registration is closed: the app has already been created")


def make_spec(message_type: str, data_type: Any, handler: Handler, response_type: str | None,
              prepare: Callable[[Any, HandlerContext], Any] | None = None) -> HandlerSpec:
    """Describe one message type for the dispatcher."""
    return HandlerSpec(
        message_type=message_type,
        data_type=data_type,
        handler=handler,
        response_type=response_type or f"{message_type}_res",
        inline=not inspect.iscoroutinefunction(handler),
        prepare=prepare,
    )


def _check_callable(func: Any, arity: int, what: str, shape: str) -> None:
    """Raise ``TypeError`` unless ``func`` can be called with ``arity`` positional arguments."""
    if not callable(func):
        raise TypeError(f"{what} must be a callable {shape}, not {func!r}")
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        return
    try:
        signature.bind(*([None] * arity))
    except TypeError as exc:
        raise TypeError(f"{what} must be callable as {shape}; {getattr(func, '__qualname__', func)!r}{signature} "
                        f"cannot be: {exc}") from None


def _check_data_type(message_type: str, data_type: Any) -> Any:
    """``data_type`` if msgspec can decode it (the decoder is built only when the app is created)."""
    if data_type is None:
        raise TypeError(f"the data type of {message_type!r} is None: give a msgspec Struct (or e.g. dict[str, Any])")
    try:
        # The schema, not a Decoder: a Decoder accepts any class (as a "custom type" it then never decodes).
        msgspec.json.schema(data_type)
    except (TypeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise TypeError(f"the data type of {message_type!r} cannot be decoded by msgspec ({reason}): use a msgspec "
                        "Struct, a dataclass, a TypedDict or e.g. dict[str, Any] (pydantic models: see "
                        "docs/fastapi.md)") from None
    return data_type


def _strict(data_type: Any, forbid_unknown_fields: bool) -> Any:
    """``data_type``, refusing unknown fields when asked: a subclass with ``forbid_unknown_fields=True``
    (so handlers still get instances of their own struct)."""
    if not (forbid_unknown_fields and isinstance(data_type, type) and issubclass(data_type, msgspec.Struct)):
        return data_type
    if data_type.__struct_config__.forbid_unknown_fields:
        return data_type
    namespace = {"__module__": data_type.__module__, "__qualname__": data_type.__qualname__,
                 "__doc__": data_type.__doc__}
    return type(data_type.__name__, (data_type,), namespace, forbid_unknown_fields=True)


_NOT_A_REPLY = (list, tuple, set, frozenset, str, bytes, int, float, bool)


def _check_reply(message_type: str, result: Any) -> Any:
    if isinstance(result, _NOT_A_REPLY):
        raise TypeError(f"the handler of {message_type!r} returned a {type(result).__name__}: a reply's data is an "
                        "object. Return a struct, a mapping or None (e.g. {'items': [...]} for a list)")
    return result


def _checked_replies(message_type: str, handler: Handler) -> Handler:
    """``handler``, refusing replies that are not objects (what the protocol and both clients expect)."""
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(getattr(handler, "__call__", None)):  # noqa: B004
        async def checked_async(data: Any, ctx: HandlerContext) -> Any:
            return _check_reply(message_type, await handler(data, ctx))

        return _wraps(handler, checked_async)

    def checked(data: Any, ctx: HandlerContext) -> Any:
        return _check_reply(message_type, handler(data, ctx))

    return _wraps(handler, checked)


def _wraps(handler: Any, wrapper: Handler) -> Handler:
    """``wrapper`` standing in for ``handler``: ``inspect.unwrap`` finds the handler (the schema reads its
    return annotation)."""
    if inspect.isfunction(handler):
        return functools.wraps(handler)(wrapper)
    wrapper.__wrapped__ = handler  # type: ignore[union-attr]
    return wrapper


def _require_async(callback: Any) -> Any:
    if not inspect.iscoroutinefunction(callback) and not inspect.iscoroutinefunction(
        getattr(callback, "__call__", None)  # noqa: B004 - async callable objects are fine too
    ):
        raise TypeError(f"{callback!r} must be an async function")
    return callback
