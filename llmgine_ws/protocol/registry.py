"""The one registry of the core protocol: every message type, its payload struct and its role.

Everything that needs the list of core messages derives it from here: the dispatch table (joined
with the handlers in :mod:`llmgine_ws.handlers`), the names reserved from custom registration, the
JSON Schema / AsyncAPI / TypeScript generators, and the engine context's server requests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from . import messages as m


@dataclass(frozen=True, slots=True)
class ClientMessageSpec:
    """One core client message type."""

    message_type: str
    data_type: Any
    description: str
    reply: str | None
    """The response's type; None for the client's answers to the server's own requests (only an
    ``error`` ever comes back for those)."""
    streams: tuple[str, ...] = ()
    """Server messages streamed before the reply (``engine_command`` → ``engine_event``)."""
    while_draining: bool = False
    """Still served while the server drains: what lets running work finish, and harmless reads."""


@dataclass(frozen=True, slots=True)
class ServerMessageSpec:
    """One core server message type."""

    message_type: str
    data_type: Any
    description: str
    server_initiated: bool
    """True when the server starts it (``server_initiated: true`` on the wire); False for responses."""


@dataclass(frozen=True, slots=True)
class ServerRequestSpec:
    """A core ``server_request`` kind (its ``request_type``), with the answer it expects."""

    request_type: str
    request: Any
    response: Any


def _table(*specs: Any) -> Mapping[str, Any]:
    return MappingProxyType({spec.message_type: spec for spec in specs})


CORE_CLIENT_MESSAGES: Mapping[str, ClientMessageSpec] = _table(
    ClientMessageSpec("ping", m.PingData, "Round trip check; the reply echoes the timestamp.", "ping_res",
                      while_draining=True),
    ClientMessageSpec("create_session", m.CreateSessionData, "Create a session owned by this connection.",
                      "create_session_res"),
    ClientMessageSpec("status", m.SessionRef, "Status of one of this connection's sessions (and of its engine).",
                      "status_res", while_draining=True),
    ClientMessageSpec("close_session", m.SessionRef, "Close a session; its engine is stopped.", "close_session_res"),
    ClientMessageSpec("server_response", m.ServerResponseData, "The answer to a server_request (same message_id).",
                      None, while_draining=True),
    ClientMessageSpec("server_pong", m.ServerResponseData, "The answer to a server_ping (same message_id).", None,
                      while_draining=True),
    ClientMessageSpec("cancel", m.CancelData,
                      "Cancel one of this connection's requests still running (e.g. an engine_command).",
                      "cancel_res", while_draining=True),
    ClientMessageSpec("create_engine", m.CreateEngineData, "Create the session's engine (one per session).",
                      "create_engine_res"),
    ClientMessageSpec("engine_command", m.EngineCommandData,
                      "Run a command on the session's engine: engine_event* then engine_command_res.",
                      "engine_command_res", streams=("engine_event",)),
    ClientMessageSpec("delete_engine", m.SessionRef, "Stop and delete the session's engine; the session stays.",
                      "delete_engine_res"),
    ClientMessageSpec("ack", m.AckData, "The client has every server frame up to data.seq (opts in to resume).",
                      None, while_draining=True),
    ClientMessageSpec("resume", m.ResumeData,
                      "First message on a new connection: take over a dropped app and replay what it missed.",
                      "resume_res", while_draining=True),
)
"""Every core client message, by ``type``."""

CORE_SERVER_MESSAGES: Mapping[str, ServerMessageSpec] = _table(
    ServerMessageSpec("connected", m.ConnectedData,
                      "First message of every connection: the app_id the server assigned to it.", True),
    ServerMessageSpec("ping_res", m.PingResData, "Answer to ping.", False),
    ServerMessageSpec("create_session_res", m.CreateSessionResData, "Answer to create_session.", False),
    ServerMessageSpec("status_res", m.StatusResData, "Answer to status.", False),
    ServerMessageSpec("close_session_res", m.CloseSessionResData, "Answer to close_session.", False),
    ServerMessageSpec("error", m.ErrorData,
                      "A request failed (same message_id as the request, or a new one when it was unreadable).",
                      False),
    ServerMessageSpec("server_ping", m.ServerPingData,
                      "Liveness check: answer with server_pong echoing the timestamp.", True),
    ServerMessageSpec("server_request", m.ServerRequestData,
                      "The server asks the client something; answer with server_response (same message_id).", True),
    ServerMessageSpec("server_request_cancelled", m.ServerRequestCancelledData,
                      "The server withdrew a server_request: close its dialog, stop its handler.", True),
    ServerMessageSpec("notification", m.NotificationData, "Fire-and-forget information for the client.", True),
    ServerMessageSpec("create_engine_res", m.CreateEngineResData, "Answer to create_engine.", False),
    ServerMessageSpec("engine_event", m.EngineEventData,
                      "One streamed event of a running engine_command (seq counts from 0, no gaps).", True),
    ServerMessageSpec("engine_command_res", m.EngineCommandResData,
                      "Final answer to engine_command, after all of its events.", False),
    ServerMessageSpec("cancel_res", m.CancelResData,
                      "Answer to cancel: whether the target was still running and got cancelled.", False),
    ServerMessageSpec("delete_engine_res", m.DeleteEngineResData, "Answer to delete_engine.", False),
    ServerMessageSpec("resume_res", m.ResumeResData,
                      "Answer to resume (no seq): resumed, or why not; the replay follows a success.", False),
)
"""Every core server message, by ``type``."""

SERVER_REQUESTS: Mapping[str, ServerRequestSpec] = MappingProxyType({
    "user_input": ServerRequestSpec("user_input", m.UserInputRequest, m.UserInputResponse),
    "user_confirmation": ServerRequestSpec("user_confirmation", m.UserConfirmationRequest,
                                           m.UserConfirmationResponse),
})
"""``request_type`` → the request and response payloads of the server requests the core sends."""

RESERVED_MESSAGE_TYPES = frozenset(CORE_CLIENT_MESSAGES) | frozenset(CORE_SERVER_MESSAGES)
"""Names a custom message may not take."""

ANSWERS = frozenset(name for name, spec in CORE_CLIENT_MESSAGES.items() if spec.reply is None)
"""Client messages that get no reply (only an ``error`` may come back): the answers to the server's own
requests (``server_response``, ``server_pong``) and ``ack``."""
