"""The server-side messaging API: what your backend code uses to reach connected apps."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, TypeVar

import anyio
import msgspec
from anyio.from_thread import BlockingPortal

from .audit import AuditLog
from .errors import (
    AppDisconnected,
    MessagingError,
    RateLimited,
    ServerRequestFailed,
    ServerRequestTimeout,
    ServerShuttingDown,
    SessionNotFound,
)
from .protocol import FrameEncoder, new_message_id
from .routing import AppPresence, MessageRouter
from .security import TokenBucket

logger = logging.getLogger("llmgine_ws.messaging")

T = TypeVar("T")


class ServerResponse(msgspec.Struct, frozen=True):
    """A client's answer to a server request: ``data`` is the ``server_response`` payload."""

    type: str
    message_id: str
    app_id: str
    data: dict[str, Any]


class MessagingAPI:
    """Send to apps, sessions and everyone; ask an app and await its answer.

    Every method is a coroutine on the server's event loop. From a worker thread use
    :attr:`blocking` (a blocking twin of this API) or ``anyio.from_thread.run(api.send_to_app, ...)``
    from a thread started by ``anyio.to_thread.run_sync``.

    Payloads (``data``) may be msgspec structs or mappings; they are encoded once per call.
    """

    def __init__(self, router: MessageRouter, encoder: FrameEncoder, *, default_timeout: float,
                 broadcast_limit: TokenBucket | None = None,
                 user_of: Callable[[str], str | None] = lambda app_id: None,
                 audit: AuditLog | None = None) -> None:
        self._router = router
        self._encoder = encoder
        self._default_timeout = default_timeout
        self._broadcast_limit = broadcast_limit
        self._user_of = user_of
        self._audit = audit or AuditLog()
        self._portal: BlockingPortal | None = None

    async def send_to_app(self, app_id: str, message_type: str, data: Any = None) -> None:
        """Send a server-initiated message (``server_initiated: true``) to one app.

        Raises ``AppNotConnected`` when the app is not connected.
        """
        frame = self._encoder.frame(message_type, new_message_id(), _payload(data), server_initiated=True)
        await self._router.send_to_app(app_id, frame)

    async def send_to_session(self, session_id: str, message_type: str, data: Any = None) -> None:
        """Send a message to the app that owns ``session_id``.

        A mapping payload gains ``session_id`` (unless it has one) so the frontend knows which session
        it concerns. Raises ``SessionNotFound`` for an unknown session.
        """
        app_id = self._router.session_owner(session_id)
        if app_id is None:
            raise SessionNotFound(session_id)
        payload = _payload(data)
        if isinstance(payload, Mapping) and "session_id" not in payload:
            payload = {**payload, "session_id": session_id}
        await self.send_to_app(app_id, message_type, payload)

    async def send_to_app_and_wait(
        self,
        app_id: str,
        message_type: str = "server_request",
        data: Any = None,
        timeout: float | None = None,
    ) -> ServerResponse:
        """Send a request to an app and wait for its ``server_response``.

        Raises ``ServerRequestTimeout`` (a ``TimeoutError``) after ``timeout`` seconds (default:
        ``server_request_timeout``),
        ``AppNotConnected`` if the app is not connected, ``AppDisconnected`` as soon as it
        disconnects while the request is pending, and ``ServerRequestFailed`` when the client
        answers with an ``error`` field.

        ``message_type`` is the frame's ``type``. The default, ``server_request``, needs
        ``data["request_type"]`` (``ValueError`` without it): clients answer it by that request type,
        and the core ones (``user_input``, ``user_confirmation``) have their answers checked (an answer
        that does not fit is refused to the client, and the question stays open). Any other
        ``message_type`` (e.g. ``"ask_color"``) is a custom request: clients answer it with a handler
        registered for that type (``on_server_request("ask_color")`` / ``onServerRequest("ask_color",
        ...)``); without one it is an ordinary message to them, and this call waits for its timeout.
        """
        payload = _payload(data)
        request_type = payload.get("request_type") if isinstance(payload, Mapping) else getattr(
            payload, "request_type", None)
        if message_type == "server_request" and not (isinstance(request_type, str) and request_type):
            raise ValueError("a server_request's data needs a request_type: the name the client answers it by "
                             "(on_server_request(t) / onServerRequest(t)). Or send a message type of your own: "
                             "send_to_app_and_wait(app_id, 'ask_color', data)")
        message_id = new_message_id()
        frame = self._encoder.frame(message_type, message_id, payload, server_initiated=True)
        audit = self._audit
        logged = audit.logs()  # else only the outcome is counted (metrics): no record to build
        if logged:
            record: dict[str, Any] = {"app_id": app_id, "user_id": self._user_of(app_id),
                                      "message_type": message_type, "message_id": message_id,
                                      "request_type": request_type}
            audit("server_request", outcome="sent", **record)
        started = time.monotonic()
        limit = self._default_timeout if timeout is None else timeout
        outcome = "cancelled"  # what happened, for the audit log and (when unanswered) for the client
        try:
            answer = await self._router.request(app_id, message_id, frame, limit)
            outcome = "failed" if answer.get("error") is not None else "answered"
        except TimeoutError:
            outcome = "timed_out"
            raise ServerRequestTimeout(app_id, message_id, limit) from None
        except AppDisconnected:
            outcome = "disconnected"
            raise
        except ServerShuttingDown:
            outcome = "shutting_down"
            raise
        except MessagingError as exc:
            outcome = f"not_sent:{type(exc).__name__}"
            raise
        finally:
            if outcome in ("timed_out", "cancelled", "shutting_down"):
                await self._withdraw(app_id, message_id, "timeout" if outcome == "timed_out" else "cancelled")
            if logged:
                audit("server_request", outcome=outcome, duration=round(time.monotonic() - started, 4), **record)
            else:
                audit.observe("server_request", {"outcome": outcome, "duration": time.monotonic() - started})
        if answer.get("error") is not None:
            raise ServerRequestFailed(app_id, message_id, answer["error"], answer)
        return ServerResponse(type="server_response", message_id=message_id, app_id=app_id, data=answer)

    async def _withdraw(self, app_id: str, message_id: str, reason: str) -> None:
        """Tell the client to drop a server request nobody waits for any more (e.g. close its dialog).

        Best effort and brief: runs even while the caller is being cancelled.
        """
        frame = self._encoder.frame("server_request_cancelled", new_message_id(),
                                    {"message_id": message_id, "reason": reason}, server_initiated=True)
        with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
            try:
                await self._router.send_to_app(app_id, frame)
            except MessagingError:
                pass  # gone already: nothing to withdraw

    async def broadcast(self, message_type: str, data: Any = None, exclude_apps: Collection[str] | None = None) -> int:
        """Send a message to every connected app except ``exclude_apps``; returns how many it reached.

        With a backplane the count is cluster-wide (each node acknowledges what it delivered).

        Never waits on a slow client: one that cannot keep up is closed (1013) rather than allowed
        to hold the others up. Raises ``RateLimited`` past ``broadcast_rate_limit``.
        """
        limit = self._broadcast_limit
        if limit is not None and not limit.take():
            self._audit("limit_hit", level=logging.WARNING, limit="broadcast", message_type=message_type)
            raise RateLimited("broadcast", limit.retry_after())
        frame = self._encoder.frame(message_type, new_message_id(), _payload(data), server_initiated=True)
        return await self._router.broadcast(frame, frozenset(exclude_apps or ()))

    async def send_to_user(self, user_id: str, message_type: str, data: Any = None) -> int:
        """Send a message to every connection authenticated as ``user_id``; returns how many it reached."""
        frame = self._encoder.frame(message_type, new_message_id(), _payload(data), server_initiated=True)
        return await self._router.send_to_user(user_id, frame)

    async def join_group(self, app_id: str, group: str) -> None:
        """Add an app to ``group`` (e.g. every tab showing one document) until it leaves or disconnects.

        Works for an app connected to any node of the cluster. Raises ``AppNotConnected``.
        """
        await self._router.join_group(app_id, group)

    async def leave_group(self, app_id: str, group: str) -> bool:
        """Remove an app from ``group``; returns False if it was not a member (or is not connected)."""
        return await self._router.leave_group(app_id, group)

    async def send_to_group(
        self, group: str, message_type: str, data: Any = None, exclude_apps: Collection[str] | None = None
    ) -> int:
        """Send a message to every member of ``group`` except ``exclude_apps``; returns how many it reached.

        Like :meth:`broadcast`, never waits on a slow client. An empty or unknown group reaches 0.
        """
        frame = self._encoder.frame(message_type, new_message_id(), _payload(data), server_initiated=True)
        return await self._router.send_to_group(group, frame, frozenset(exclude_apps or ()))

    def get_connected_apps(self) -> list[str]:
        """Every connected app_id (cluster-wide when the app runs on a backplane)."""
        return self._router.connected_apps()

    def get_presence(self) -> list[AppPresence]:
        """Every connected app with the node serving it and its sessions (cluster-wide)."""
        return self._router.presence()

    def is_app_connected(self, app_id: str) -> bool:
        """Whether ``app_id`` is connected."""
        return self._router.is_app_connected(app_id)

    def get_app_sessions(self, app_id: str) -> list[str]:
        """Session ids owned by ``app_id`` (empty if it is not connected)."""
        return self._router.app_sessions(app_id)

    @property
    def blocking(self) -> BlockingMessagingAPI:
        """This API for code running in a worker thread (any thread but the event loop's).

        Available while the app's lifespan is running. Each call blocks its thread until done.
        """
        if self._portal is None:
            raise RuntimeError("the blocking messaging API needs the app's lifespan to be running")
        return BlockingMessagingAPI(self, self._portal)

    def _bind_portal(self, portal: BlockingPortal | None) -> None:
        self._portal = portal


class BlockingMessagingAPI:
    """A blocking twin of :class:`MessagingAPI` for worker threads, running calls through a portal."""

    def __init__(self, api: MessagingAPI, portal: BlockingPortal) -> None:
        self._api = api
        self._portal = portal

    def _call(self, func: Callable[..., Awaitable[T]], *args: Any) -> T:
        return self._portal.call(func, *args)

    def send_to_app(self, app_id: str, message_type: str, data: Any = None) -> None:
        """Blocking :meth:`MessagingAPI.send_to_app`."""
        self._call(self._api.send_to_app, app_id, message_type, data)

    def send_to_session(self, session_id: str, message_type: str, data: Any = None) -> None:
        """Blocking :meth:`MessagingAPI.send_to_session`."""
        self._call(self._api.send_to_session, session_id, message_type, data)

    def send_to_app_and_wait(
        self, app_id: str, message_type: str = "server_request", data: Any = None, timeout: float | None = None
    ) -> ServerResponse:
        """Blocking :meth:`MessagingAPI.send_to_app_and_wait`."""
        return self._call(self._api.send_to_app_and_wait, app_id, message_type, data, timeout)

    def broadcast(self, message_type: str, data: Any = None, exclude_apps: Collection[str] | None = None) -> int:
        """Blocking :meth:`MessagingAPI.broadcast`."""
        return self._call(self._api.broadcast, message_type, data, exclude_apps)

    def send_to_user(self, user_id: str, message_type: str, data: Any = None) -> int:
        """Blocking :meth:`MessagingAPI.send_to_user`."""
        return self._call(self._api.send_to_user, user_id, message_type, data)

    def join_group(self, app_id: str, group: str) -> None:
        """Blocking :meth:`MessagingAPI.join_group`."""
        self._call(self._api.join_group, app_id, group)

    def leave_group(self, app_id: str, group: str) -> bool:
        """Blocking :meth:`MessagingAPI.leave_group`."""
        return self._call(self._api.leave_group, app_id, group)

    def send_to_group(self, group: str, message_type: str, data: Any = None,
                      exclude_apps: Collection[str] | None = None) -> int:
        """Blocking :meth:`MessagingAPI.send_to_group`."""
        return self._call(self._api.send_to_group, group, message_type, data, exclude_apps)

    def get_connected_apps(self) -> list[str]:
        """Blocking :meth:`MessagingAPI.get_connected_apps` (run on the loop, so it sees a consistent view)."""
        return self._portal.call(self._api.get_connected_apps)

    def is_app_connected(self, app_id: str) -> bool:
        """Blocking :meth:`MessagingAPI.is_app_connected`."""
        return self._portal.call(self._api.is_app_connected, app_id)

    def get_app_sessions(self, app_id: str) -> list[str]:
        """Blocking :meth:`MessagingAPI.get_app_sessions`."""
        return self._portal.call(self._api.get_app_sessions, app_id)

    def get_presence(self) -> list[AppPresence]:
        """Blocking :meth:`MessagingAPI.get_presence`."""
        return self._portal.call(self._api.get_presence)


def _payload(data: Any) -> Any:
    return {} if data is None else data
