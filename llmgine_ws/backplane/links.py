"""Resume across nodes, the bookkeeping: which links this node asked for, proxies and serves.

A socket on one node (the *proxy*) can serve an app that lives on another (the *owner*): the proxy
asks the owner to resume it, the owner serves it on a remote link, frames and input travel over the
backplane tagged with the link's *generation* (the app's epoch at the take-over), and a message of an
older generation is dropped. :class:`LinkTable` keeps both sides' state, sans I/O: fed events (an ask
sent, an answer, a link lost, a node gone, a clock tick), it says which links they concern.
:mod:`llmgine_ws.backplane.remote` does the I/O around it. The protocol and its failure cases are
described in ``docs/scaling.md`` ("Resume across nodes").
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import anyio

from ..connection import WS_INTERNAL_ERROR, WS_TRY_AGAIN_LATER
from ..replay import ResumeFailure

BATCH_FRAMES = 64
"""Frames in one :class:`~llmgine_ws.backplane.wire.LinkFrames` message at most."""
BATCH_BYTES = 64 * 1024
"""Characters of frames in one message at most (a single larger frame goes alone)."""
WINDOW = 16
"""Messages of frames a link may have in flight (published, not yet credited by the serving node):
with :data:`BATCH_BYTES`, at most 1 MiB between two nodes per link."""
CREDIT_EVERY = WINDOW // 2
"""The serving node credits the owner every this many messages."""
DETACHING_CODES = frozenset({1001, 1005, 1006, 1012, 1014, WS_INTERNAL_ERROR, WS_TRY_AGAIN_LATER})
"""Close codes of a proxied socket that detach the app on its node, as they would on one node (the
client's drop codes — ``endpoint.DROP_CODES`` —, and the proxying node's 1011 and 1013); any other
(1000 goodbye, a policy close) ends it."""
REASONS: frozenset[str] = frozenset({"unknown", "expired", "gap", "disabled"})


# ------------------------------------------------------------------------------------ sans I/O


@dataclass
class Asking:
    """A resume this node asked another node for, not answered yet."""

    link: str
    owner: str
    app_id: str
    deadline: float
    connection: Any = None
    """The connection (this node's) whose socket the resume is for."""
    outcome: ResumeFailure | None = None
    opened: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)


@dataclass
class Proxied:
    """A socket of this node serving an app of ``owner`` (generation ``gen``)."""

    link: str
    owner: str
    app_id: str
    gen: int
    connection: Any = None
    closed_by_owner: bool = False
    received: int = 0
    """The last :class:`~llmgine_ws.backplane.wire.LinkFrames` ``n`` taken (LinkOpen is 0)."""
    credited: int = 0
    inputs: int = 0
    """Client frames forwarded so far (the ``n`` of the last LinkInput)."""
    pending: deque[tuple[int, list[str], tuple[int, str] | None]] = field(default_factory=deque)
    """Messages taken, not yet queued to the socket: at most :data:`WINDOW` (the owner waits for credit)."""
    wake: anyio.Event = field(default_factory=anyio.Event)

    def take(self, n: int, frames: list[str]) -> bool:
        """Frames message ``n`` arrived; False if one was lost in between (the socket must go: the
        client resumes, the owner replays)."""
        if n != self.received + 1:
            return False
        self.received = n
        self.pending.append((n, frames, None))
        self.wake.set()
        return True

    def closing(self, code: int, reason: str) -> None:
        """The owner closes the link: after the frames taken before."""
        self.pending.append((-1, [], (code, reason)))
        self.wake.set()

    def queued(self, n: int) -> bool:
        """Message ``n`` is in the socket's queue: True if the owner is to be credited now."""
        if n - self.credited >= CREDIT_EVERY:
            self.credited = n
            return True
        return False


class LinkTable:
    """Every remote link of one node, both sides, sans I/O (see the module docstring).

    Proxy side: :attr:`asking` (resumes asked, by link id) and :attr:`proxied` (sockets here serving
    apps elsewhere, by link id). Owner side: :attr:`served` (apps here served on sockets elsewhere,
    by app id, with the serving node, link id and generation).
    """

    def __init__(self) -> None:
        self.asking: dict[str, Asking] = {}
        self.proxied: dict[str, Proxied] = {}
        self.served: dict[str, tuple[str, str, int]] = {}

    # proxy side
    def ask(self, link: str, owner: str, app_id: str, now: float, timeout: float, connection: Any = None) -> Asking:
        """A resume was asked of ``owner``; it is answered by ``now + timeout`` or fails ``unknown``."""
        asking = self.asking[link] = Asking(link, owner, app_id, now + timeout, connection)
        return asking

    def refused(self, link: str, reason: str) -> Asking | None:
        """The owner refused: the ask it settles (None if it was given up already)."""
        asking = self.asking.pop(link, None)
        if asking is not None:
            asking.outcome = reason if reason in REASONS else "unknown"  # type: ignore[assignment]
            asking.done.set()
        return asking

    def opened(self, link: str, owner: str, gen: int) -> Proxied | None:
        """The owner resumed the app onto ``link``: the new proxied link, or None when the ask was given
        up meanwhile (the owner must then be told the link is lost)."""
        asking = self.asking.get(link)
        if asking is None or asking.owner != owner:
            return None
        del self.asking[link]
        proxied = self.proxied[link] = Proxied(link, owner, asking.app_id, gen, asking.connection)
        asking.opened = True
        asking.done.set()
        return proxied

    def frames_for(self, link: str, owner: str, gen: int) -> Proxied | None:
        """The proxied link frames from ``owner`` are for, if it is still this generation's."""
        proxied = self.proxied.get(link)
        if proxied is None or proxied.owner != owner or proxied.gen != gen:
            return None
        return proxied

    def unproxy(self, link: str) -> Proxied | None:
        """A proxied link ended (socket gone, or closed by the owner)."""
        return self.proxied.pop(link, None)

    def overdue(self, now: float) -> list[Asking]:
        """Asks whose answer did not come in time (they fail ``unknown``)."""
        late = [asking for asking in self.asking.values() if asking.deadline <= now]
        for asking in late:
            self.refused(asking.link, "unknown")
        return late

    # owner side
    def serve(self, app_id: str, node: str, link: str, gen: int) -> None:
        """App ``app_id`` is served by a socket of ``node`` (link ``link``, generation ``gen``)."""
        self.served[app_id] = (node, link, gen)

    def unserve(self, app_id: str, gen: int) -> None:
        """Generation ``gen`` of the app's remote link ended (a later one is left alone)."""
        entry = self.served.get(app_id)
        if entry is not None and entry[2] == gen:
            del self.served[app_id]

    def current(self, app_id: str, node: str, gen: int) -> bool:
        """Whether input from ``node`` for ``app_id`` generation ``gen`` may reach the app (the fence)."""
        entry = self.served.get(app_id)
        return entry is not None and entry[0] == node and entry[2] == gen

    # both
    def node_gone(self, node: str) -> tuple[list[Asking], list[Proxied], list[str]]:
        """``node`` left or expired: the asks to fail, the proxied links to close, the apps to detach."""
        asks = [asking for asking in self.asking.values() if asking.owner == node]
        for asking in asks:
            self.refused(asking.link, "unknown")
        proxied = [entry for entry in self.proxied.values() if entry.owner == node]
        for entry in proxied:
            del self.proxied[entry.link]
        apps = [app_id for app_id, (served_by, _, _) in self.served.items() if served_by == node]
        for app_id in apps:
            del self.served[app_id]
        return asks, proxied, apps
