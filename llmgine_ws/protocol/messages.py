"""The payload structs of every core message, client → server and server → client.

Handlers receive the client payloads already decoded; the server encodes the server payloads. The
tables in :mod:`llmgine_ws.protocol.registry` say which struct belongs to which message type.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

MAX_MESSAGE_ID_LENGTH = 128

MessageId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_MESSAGE_ID_LENGTH)]
"""A request id chosen by its sender: 1 to 128 characters; a UUID4 is conventional."""

SessionId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]

# --------------------------------------------------------------------------------------------
# Client → server
# --------------------------------------------------------------------------------------------


class PingData(msgspec.Struct, frozen=True):
    """``ping``: the timestamp is echoed back untouched."""

    timestamp: str | int | float | None = None


class CreateSessionData(msgspec.Struct, frozen=True):
    """``create_session``. ``app_id`` is accepted for compatibility with seed-era clients and ignored:
    a session always belongs to the connection that creates it."""

    app_id: str | None = None


class SessionRef(msgspec.Struct, frozen=True):
    """Payload of every message that names one session (``status``, ``close_session``, ...)."""

    session_id: SessionId


ServerResponseData = dict[str, Any]
"""``server_response`` / ``server_pong`` payloads are free-form objects (``response_type`` + fields)."""


class CancelData(msgspec.Struct, frozen=True):
    """``cancel``: the message_id of one of this connection's requests still being handled."""

    target_message_id: MessageId


class CreateEngineData(msgspec.Struct, frozen=True, kw_only=True):
    """``create_engine``. ``config`` comes from the client: the engine factory must treat it as untrusted."""

    session_id: SessionId
    engine_type: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    config: dict[str, Any] = msgspec.field(default_factory=dict)


class EngineCommandData(msgspec.Struct, frozen=True, kw_only=True):
    """``engine_command``: ``command`` is handed to the engine as decoded JSON."""

    session_id: SessionId
    command: Any = None


class AckData(msgspec.Struct, frozen=True):
    """``ack``: the client has every server frame up to ``seq`` (cumulative). No answer.

    A client opts in to resume by acking (its first ``ack`` may be ``seq`` 0)."""

    seq: Annotated[int, msgspec.Meta(ge=0)]


class ResumeData(msgspec.Struct, frozen=True, kw_only=True):
    """``resume``, the first message on a new connection: take over the app ``app_id`` whose socket
    dropped, replaying the frames after ``last_seq``."""

    app_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    resume_token: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    last_seq: Annotated[int, msgspec.Meta(ge=0)]


# --------------------------------------------------------------------------------------------
# Server → client
# --------------------------------------------------------------------------------------------


class ConnectedData(msgspec.Struct, frozen=True, kw_only=True):
    """``connected``: the id the server assigned to this connection and, when resume is on, the token
    and window (seconds) to resume it after a drop."""

    app_id: str
    status: Literal["connected"] = "connected"
    resume_token: str | msgspec.UnsetType = msgspec.UNSET
    resume_window: float | msgspec.UnsetType = msgspec.UNSET


class ResumeEngineInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The engine of a resumed session."""

    engine_id: str
    engine_type: str
    status: str


class ResumedSession(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One session of a resumed app (``engine`` only when it has one)."""

    session_id: str
    status: str
    engine: ResumeEngineInfo | None = None


class ResumeResData(msgspec.Struct, frozen=True, kw_only=True):
    """``resume_res`` (no ``seq``): on success the resumed app, its new token, how many frames follow
    (``replayed``) and its sessions; on failure ``reason`` and the new connection's own app."""

    resumed: bool
    app_id: str
    resume_token: str | msgspec.UnsetType = msgspec.UNSET
    """Absent only when resume is off (``reason: disabled``)."""
    replayed: int | msgspec.UnsetType = msgspec.UNSET
    sessions: list[ResumedSession] | msgspec.UnsetType = msgspec.UNSET
    reason: Literal["unknown", "expired", "gap", "disabled"] | msgspec.UnsetType = msgspec.UNSET


class PingResData(msgspec.Struct, frozen=True):
    """``ping_res``."""

    timestamp: str | int | float | None


class CreateSessionResData(msgspec.Struct, frozen=True):
    """``create_session_res``."""

    session_id: str


class EngineInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The engine part of ``status_res`` (``null`` when the session has no engine)."""

    engine_id: str
    engine_type: str
    status: str
    last_activity_at: datetime


class StatusResData(msgspec.Struct, frozen=True, kw_only=True):
    """``status_res``."""

    session_id: str
    status: str
    created_at: datetime
    last_interaction_at: datetime
    engine: EngineInfo | None = None


class CloseSessionResData(msgspec.Struct, frozen=True):
    """``close_session_res``."""

    session_id: str
    closed: bool = True


class ErrorData(msgspec.Struct, frozen=True):
    """``error``: ``details`` is always present (``null`` when there is nothing more to say)."""

    code: str
    message: str
    details: Any = None


class ServerPingData(msgspec.Struct, frozen=True):
    """``server_ping``: the client answers with ``server_pong`` echoing ``timestamp``."""

    timestamp: datetime


class NotificationData(msgspec.Struct, frozen=True, kw_only=True):
    """``notification`` as sent by the server's own code (users may send any mapping)."""

    notification_type: str
    message: str = ""
    additional_data: dict[str, Any] | None = None
    session_id: str | None = None


class ServerRequestData(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """``server_request``: ``request_type`` plus request-specific fields (any mapping works)."""

    request_type: str


class ServerRequestCancelledData(msgspec.Struct, frozen=True, kw_only=True):
    """``server_request_cancelled``: the server withdrew the ``server_request`` with ``message_id``.

    The client should close that request's dialog and stop its handler; an answer is no longer read.
    """

    message_id: str
    reason: Literal["timeout", "cancelled"]


class CancelResData(msgspec.Struct, frozen=True):
    """``cancel_res``: ``cancelled`` is false when the target had already finished (or never existed)."""

    target_message_id: str
    cancelled: bool


class CreateEngineResData(msgspec.Struct, frozen=True, kw_only=True):
    """``create_engine_res``."""

    session_id: str
    engine_id: str
    engine_type: str


class DeleteEngineResData(msgspec.Struct, frozen=True, kw_only=True):
    """``delete_engine_res``."""

    session_id: str
    engine_id: str
    deleted: bool = True


class EngineEventData(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """``engine_event``: one streamed item of a running command."""

    session_id: str
    command_id: str
    seq: int
    """The frame's place among the command's ``engine_event`` frames: 0, 1, 2… with no gaps."""
    event_type: str
    payload: Any
    coalesced: int = 1
    """How many ``token`` deltas this frame carries, their texts concatenated in ``payload.text``
    (present only when more than one: see ``engine_event_coalesce_ms``)."""


class EngineCommandResData(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """``engine_command_res``: exactly one per command, after all of its events."""

    session_id: str
    status: Literal["completed", "cancelled", "failed"]
    result: Any
    """The engine's return value (``null`` unless completed); always present."""
    error: str | None = None
    """Present only when ``status`` is ``failed``."""


# --------------------------------------------------------------------------------------------
# The core server requests (server_request with a known request_type) and their answers
# --------------------------------------------------------------------------------------------


class UserInputRequest(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=False):
    """``server_request`` data with ``request_type: "user_input"``: ask the user for text.

    Sent by ``EngineContext.ask_user`` (with ``session_id`` and ``command_id``) and by backends.
    """

    request_type: Literal["user_input"]
    prompt: str
    session_id: str | msgspec.UnsetType = msgspec.UNSET
    command_id: str | msgspec.UnsetType = msgspec.UNSET


class UserConfirmationRequest(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=False):
    """``server_request`` data with ``request_type: "user_confirmation"``: ask the user to choose an option."""

    request_type: Literal["user_confirmation"]
    message: str
    options: list[str]
    session_id: str | msgspec.UnsetType = msgspec.UNSET
    command_id: str | msgspec.UnsetType = msgspec.UNSET


class UserInputResponse(msgspec.Struct, kw_only=True, frozen=True):
    """``server_response`` data answering ``user_input``."""

    response_type: Literal["user_input"]
    user_input: str


class UserConfirmationResponse(msgspec.Struct, kw_only=True, frozen=True):
    """``server_response`` data answering ``user_confirmation``: one of the offered options."""

    response_type: Literal["user_confirmation"]
    selection: str


class ServerRequestError(msgspec.Struct, kw_only=True, frozen=True):
    """``server_response`` data refusing any server request (the server raises ``ServerRequestFailed``)."""

    response_type: str
    error: str
