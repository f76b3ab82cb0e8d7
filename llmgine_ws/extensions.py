"""Extension points: custom messages, callbacks, engine types, routes.

Build an :class:`Extensions`, register what you need, and pass it to
:func:`llmgine_ws.create_app`. Registration closes when the app is created (the message decoder is
built once from everything registered), and one ``Extensions`` serves exactly one app.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

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
    ) -> None:
        """Handle client messages of ``message_type`` whose ``data`` decodes as ``data_type``.

        ``data_type`` is a msgspec ``Struct`` (or any type msgspec can decode, e.g.
        ``dict[str, Any]``). The handler's return value (a struct, a mapping or ``None`` for ``{}``)
        is sent back as ``response_type`` (default ``<message_type>_res``) with the request's
        ``message_id``. Raise :class:`~llmgine_ws.errors.ProtocolError` to answer with an error.
        """
        self._check_open()
        if not _TYPE_NAME.match(message_type):
            raise ValueError(f"message type {message_type!r} must match {_TYPE_NAME.pattern}")
        if message_type in RESERVED_MESSAGE_TYPES:
            raise ValueError(f"message type {message_type!r} is reserved by the core protocol")
        if message_type in self.handlers:
            raise ValueError(f"a handler for {message_type!r} is already registered")
        self.handlers[message_type] = make_spec(message_type, data_type, handler, response_type)

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

        ``factory(session, config)`` (sync or async) returns an :class:`~llmgine_ws.engines.Engine`.
        """
        self._check_open()
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


def _require_async(callback: Any) -> Any:
    if not inspect.iscoroutinefunction(callback) and not inspect.iscoroutinefunction(
        getattr(callback, "__call__", None)  # noqa: B004 - async callable objects are fine too
    ):
        raise TypeError(f"{callback!r} must be an async function")
    return callback
