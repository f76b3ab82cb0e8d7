"""The messages nodes exchange over a backplane: one msgpack-encoded tagged union.

Every message names its sender (``node``); the tag field ``k`` says which message it is. What the
messages mean and where they go is described in ``docs/scaling.md`` ("Cluster protocol").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import msgspec


class NodeMessage(msgspec.Struct, tag_field="k", frozen=True, kw_only=True):
    """Base of every message between nodes (:data:`WireMessage` is their union)."""

    node: str
    """The sending node."""


# ------------------------------------------------------------------------------------- presence


class Hello(NodeMessage, tag="hello", frozen=True):
    """A node (re)joined: answer with a snapshot."""

    name: str
    seq: int


class Heartbeat(NodeMessage, tag="hb", frozen=True):
    """A node is alive; ``seq`` is its latest presence change."""

    name: str
    seq: int


class Goodbye(NodeMessage, tag="bye", frozen=True):
    """A node is leaving cleanly."""


class Delta(NodeMessage, tag="delta", frozen=True):
    """One presence change: ``op`` is ``app+``, ``app-``, ``session+`` or ``session-``."""

    seq: int
    op: str
    app_id: str
    session_id: str = ""
    user_id: str | None = None
    connected_at: float = 0.0


class SyncRequest(NodeMessage, tag="sync", frozen=True):
    """Send me your snapshot."""


class AppEntry(msgspec.Struct, array_like=True, frozen=True):
    """One app in a snapshot."""

    app_id: str
    user_id: str | None
    connected_at: float
    sessions: list[str]


class Snapshot(NodeMessage, tag="snap", frozen=True):
    """Part ``part`` of ``parts`` of a node's presence as of ``seq``."""

    name: str
    seq: int
    part: int
    parts: int
    apps: list[AppEntry]


# ------------------------------------------------------------------------------ delivery & requests


class Deliver(NodeMessage, tag="send", frozen=True):
    """Deliver ``frame`` to ``app_id``."""

    app_id: str
    frame: str


class Request(NodeMessage, tag="req", frozen=True):
    """A server request for ``app_id``; the outcome goes back to the sender's inbox."""

    app_id: str
    message_id: str
    frame: str
    timeout: float


class Withdraw(NodeMessage, tag="withdraw", frozen=True):
    """The waiter gave up on a request (timeout or cancellation)."""

    app_id: str
    message_id: str


class Reply(NodeMessage, tag="reply", frozen=True):
    """The outcome of a request: the client's answer, or an error code.

    ``error`` is ``not_connected``, ``disconnected``, ``shutting_down``, ``pending_limit`` (with
    ``limit``) or ``too_large`` (with ``size`` and ``limit``).
    """

    message_id: str
    data: dict[str, Any] | None = None
    error: str | None = None
    limit: int = 0
    size: int = 0


class Fanout(NodeMessage, tag="fanout", frozen=True):
    """Deliver ``frame`` to every app here in ``scope`` (``all``, ``user`` or ``group``) and ack."""

    ack: str
    scope: str
    target: str
    frame: str
    exclude: list[str] = msgspec.field(default_factory=list)


class GroupOp(NodeMessage, tag="group", frozen=True):
    """Add ``app_id`` to (or remove it from) ``group`` and ack."""

    ack: str
    app_id: str
    group: str
    join: bool


class Ack(NodeMessage, tag="ack", frozen=True):
    """Acknowledges a fan-out (``count`` apps reached) or a group operation."""

    ack: str
    count: int = 0
    error: str | None = None


# ------------------------------------------------------------------------------ resume across nodes


class ResumeAsk(NodeMessage, tag="rs.ask", frozen=True):
    """Resume ``app_id`` (owned by the receiver) onto a socket of the sender, known there as ``link``.

    ``principal`` is the user id the new socket authenticated as (None: unauthenticated);
    ``message_id`` is the client's ``resume`` (its ``resume_res`` answers it).
    """

    link: str
    app_id: str
    token: str
    last_seq: int
    principal: str | None
    message_id: str


class ResumeRefused(NodeMessage, tag="rs.no", frozen=True):
    """The owner refused the resume asked for on ``link``: ``reason`` as in ``resume_res``."""

    link: str
    reason: str


class LinkOpen(NodeMessage, tag="ln.open", frozen=True):
    """The owner resumed the app onto ``link`` as generation ``gen``; ``frames`` start with ``resume_res``."""

    link: str
    app_id: str
    gen: int
    frames: list[str]


class LinkFrames(NodeMessage, tag="ln.out", frozen=True):
    """Frames of the app for the socket of ``link`` (already sequenced), in order; ``n`` counts the
    link's messages (1, 2, 3…: :class:`LinkOpen` is 0), so that a lost one is noticed."""

    link: str
    gen: int
    n: int
    frames: list[str]


class LinkCredit(NodeMessage, tag="ln.credit", frozen=True):
    """The serving node took every :class:`LinkFrames` up to ``n``: the owner may send more."""

    app_id: str
    link: str
    gen: int
    n: int


class LinkClose(NodeMessage, tag="ln.close", frozen=True):
    """The owner is done with ``link``: close its socket with ``code`` (4000 superseded, 1001 app ended...)."""

    link: str
    gen: int
    code: int
    reason: str


class LinkInput(NodeMessage, tag="ln.in", frozen=True):
    """A frame the client sent on the sender's socket for ``app_id`` (generation ``gen``); ``n``
    counts them (1, 2, 3…), so that a lost one is noticed."""

    app_id: str
    gen: int
    n: int
    text: str


class LinkLost(NodeMessage, tag="ln.lost", frozen=True):
    """The sender's socket for ``app_id`` (generation ``gen``) is gone: with ``goodbye`` the client
    closed with 1000 (the app ends), else it dropped (the app is detached)."""

    app_id: str
    gen: int
    code: int
    goodbye: bool = False


WireMessage = Union[  # noqa: UP007 - a runtime union for msgspec
    Hello, Heartbeat, Goodbye, Delta, SyncRequest, Snapshot, Deliver, Request, Withdraw, Reply, Fanout, GroupOp, Ack,
    ResumeAsk, ResumeRefused, LinkOpen, LinkFrames, LinkCredit, LinkClose, LinkInput, LinkLost,
]
"""Every message a node may receive."""

# The codec's own methods, not wrappers: decode runs for every message a node receives.
encode: Callable[[NodeMessage], bytes] = msgspec.msgpack.Encoder().encode
"""The bytes to publish for a message."""
decode: Callable[[bytes], WireMessage] = msgspec.msgpack.Decoder(WireMessage).decode
"""The message in a payload; raises ``msgspec.DecodeError`` (``ValidationError`` included) if it is not one."""


__all__ = [
    "Ack", "AppEntry", "Deliver", "Delta", "Fanout", "Goodbye", "GroupOp", "Heartbeat", "Hello", "LinkClose",
    "LinkCredit", "LinkFrames", "LinkInput", "LinkLost", "LinkOpen", "NodeMessage", "Reply", "Request", "ResumeAsk",
    "ResumeRefused", "Snapshot", "SyncRequest", "WireMessage", "Withdraw", "decode", "encode",
]
