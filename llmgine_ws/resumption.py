"""Resume, the I/O half: detaching an app whose socket dropped, ending it when its window passes,
and moving a new socket over to it when the client sends ``resume``.

The bookkeeping (seq, replay buffer, acks, token, resent requests) is the sans-I/O
:class:`~llmgine_ws.replay.ResumeState` of each app. Finding the app a ``resume`` names goes through
an :class:`AppDirectory`: this node's hub by default; a cluster router may answer for an app owned by
another node (see docs/resume.md, "Across nodes").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import anyio
import msgspec

from .audit import AuditLog
from .config import APIConfig
from .connection import WS_GOING_AWAY, WS_NORMAL, WS_SUPERSEDED, Connection, Link, Unsequenced
from .context import NO_REPLY, HandlerContext
from .engines import EngineManager
from .hub import Hub
from .lifecycle import Lifecycle
from .metrics import Metrics
from .protocol import FrameEncoder, ResumeData, ResumedSession, ResumeEngineInfo, ResumeResData
from .replay import NodeBudget, ResumeFailure, ResumeState, Tombstones
from .usercode import run_callbacks

logger = logging.getLogger("llmgine_ws.resume")

AppCallback = Callable[[str], Any]


class AppDirectory(Protocol):
    """Finds the app a ``resume`` names (the seam a cluster router plugs into).

    The local directory answers from this node's hub. A cluster directory may return a stand-in for
    an app owned by another node; it must fence it with :attr:`ResumeState.epoch` so that a node
    that lost the app can no longer write into it.
    """

    def find(self, app_id: str) -> Connection | None:
        """The live (connected or detached) app ``app_id``, or None."""


class RemoteResumes(Protocol):
    """Resumes across the nodes of a cluster (implemented by the cluster router, docs/scaling.md)."""

    def ask(self, new: Connection, data: ResumeData, message_id: str) -> bool:
        """Ask the node owning ``data.app_id`` to resume it onto ``new``'s socket; False if no node
        is known to own it. The answer (``resume_res``) reaches ``new`` later, in any case."""

    def drain(self) -> None:
        """This node drains: close the sockets serving other nodes' apps (1012), keeping those apps."""

    def proxy_closed(self, connection: Connection) -> None:
        """A socket of this node that served another node's app is gone (that node is told)."""

    def counts(self) -> dict[str, int]:
        """``remote_links_served`` and ``remote_links_proxied`` (gauges)."""


class LocalDirectory:
    """Apps of this node, from its hub."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def find(self, app_id: str) -> Connection | None:
        """See :meth:`AppDirectory.find`."""
        return self._hub.get(app_id)


class Resumer:
    """Detach, expire and resume the apps of one runtime (see the module docstring)."""

    def __init__(self, config: APIConfig, *, hub: Hub, engines: EngineManager, encoder: FrameEncoder,
                 lifecycle: Lifecycle, audit: AuditLog, metrics: Metrics | None,
                 callbacks: Mapping[str, Sequence[Callable[..., Any]]],
                 directory: AppDirectory | None = None) -> None:
        self.window = config.resume_window
        self.enabled = self.window > 0
        self._config = config
        self._engines = engines
        self._encoder = encoder
        self._lifecycle = lifecycle
        self._audit = audit
        self._metrics = metrics
        self._callbacks = callbacks
        self.budget = NodeBudget(config.resume_node_buffer_bytes)
        """Bytes held by every replay buffer of this node."""
        self.tombstones = Tombstones()
        self.directory: AppDirectory = directory if directory is not None else LocalDirectory(hub)
        """Where a ``resume`` looks its app up (replaceable by a cluster router)."""
        self.hosted: set[str] = set()
        """Apps whose task group lives in the lifespan (only those can outlive their socket)."""
        self.detached_count = 0
        self._detached_by_ip: dict[str | None, int] = {}
        self.remote: RemoteResumes | None = None
        """Resumes across nodes (set by a cluster router; None: only this node's apps resume)."""
        self.asking: set[str] = set()
        """Connections (app ids) whose ``resume`` was asked of another node, not answered yet."""

    # ------------------------------------------------------------------ a new app

    def prepare(self, connection: Connection) -> tuple[ResumeState, dict[str, Any]]:
        """A freshly accepted app's :class:`ResumeState` and the fields its ``connected`` gains (the
        caller enables sequencing once ``connected`` is queued: it takes no ``seq``)."""
        state = ResumeState(max_bytes=self._config.resume_buffer_bytes, budget=self.budget,
                            principal_key=connection.user_id, dedupe_entries=self._config.resume_dedupe_entries)
        connection.on_link_lost = self.detach
        connection.on_overflow = self._overflowed
        if not self.enabled:
            return state, {}
        return state, {"resume_token": state.token, "resume_window": self.window}

    def detached_from(self, client_ip: str | None) -> bool:
        """Whether an app of ``client_ip`` is detached (its resume may then pass the per-address cap by one)."""
        return client_ip in self._detached_by_ip

    def _count_detached(self, connection: Connection, change: int) -> None:
        self.detached_count += change
        ip = connection.client_ip
        remaining = self._detached_by_ip.get(ip, 0) + change
        if remaining > 0:
            self._detached_by_ip[ip] = remaining
        else:
            self._detached_by_ip.pop(ip, None)

    def ack(self, connection: Connection, seq: int) -> None:
        """The client acked every frame up to ``seq`` (its first ack makes the app resumable)."""
        state = connection.resume
        if state is not None:
            state.ack_seen = True
            if self.enabled:
                state.ack(seq)

    # ------------------------------------------------------------------ drop

    def detach(self, connection: Connection, code: int, reason: str) -> bool:
        """The app's socket is gone (or failing): keep the app for ``resume_window``; True if it was
        detached, False if it must end as before (not resumable, closing, or the server draining)."""
        state = connection.resume
        if (not self.enabled or state is None or not state.resumable or connection.closing or connection.detached
                or connection.app_id not in self.hosted
                or (not self._lifecycle.accepting and self.remote is None)):
            return False
        link = connection.detach_link()
        state.detach()
        self._count_detached(connection, +1)
        if link is not None:
            link.close(code, reason, lost=True)
        connection.spawn(self._expire, connection, state.epoch)
        connection.spawn(self._run_callbacks, "detached", connection.app_id)
        self._audit("resume", outcome="detached", app_id=connection.app_id, user_id=connection.user_id,
                    code=code, buffered=state.buffered)
        logger.info("app %s detached (code %s); resumable for %.0fs", connection.app_id, code, self.window,
                    extra={"app_id": connection.app_id})
        return True

    async def _expire(self, connection: Connection, epoch: int) -> None:
        await anyio.sleep(self.window)
        state = connection.resume
        if state is not None and state.epoch == epoch and connection.detached:
            self._end(connection, "expired", "resume window passed")

    def _overflowed(self, connection: Connection) -> None:
        self._end(connection, "gap", "resume buffer overflow")

    def _end(self, connection: Connection, reason: ResumeFailure, message: str) -> None:
        """End a resumable app now (cleanup in the seed's order); a resume with its token learns ``reason``."""
        state = connection.resume
        if state is not None and not connection.closing:
            self.tombstones.add(connection.app_id, state, reason, time.monotonic() + max(self.window, 1.0))
            self._audit("resume", outcome="ended", reason=reason, app_id=connection.app_id,
                        user_id=connection.user_id)
        connection.close(WS_GOING_AWAY, message)

    def released(self, connection: Connection) -> None:
        """The app was cleaned up: its buffer's bytes go back to the node budget."""
        self.hosted.discard(connection.app_id)
        self.asking.discard(connection.app_id)
        if connection.proxy is not None and self.remote is not None:
            self.remote.proxy_closed(connection)
        if connection.detached:
            connection.detached = False
            self._count_detached(connection, -1)
        if connection.resume is not None:
            connection.resume.release()

    # ------------------------------------------------------------------ resume

    def resume(self, data: ResumeData, ctx: HandlerContext) -> Any:
        """The ``resume`` handler (inline: nothing can slip between the checks and the take-over)."""
        new = ctx.connection
        link = new.link
        principal = new.user_id
        if not self.enabled:
            return self.refuse(new, ctx.message_id, "disabled")
        state = new.resume
        if (link is None or link.app is not new or state is None or state.resumable or new.session_ids
                or new.in_flight or new.pending or new.proxy is not None or new.app_id in self.asking):
            return self.refuse(new, ctx.message_id, "unknown")  # only the first message of a fresh connection
        target = self.directory.find(data.app_id)
        if target is None or target is new or target.closing or target.resume is None:
            if target is None and self.remote is not None and self.remote.ask(new, data, ctx.message_id):
                self.asking.add(new.app_id)
                return NO_REPLY  # owned by another node: asked there (answered within two heartbeats)
            reason = self.tombstones.reason(data.app_id, data.resume_token, principal)
            return self.refuse(new, ctx.message_id, reason)
        failure = self.check(target, data.resume_token, principal, data.last_seq)
        if failure is not None:
            return self.refuse(new, ctx.message_id, failure, data.app_id)
        # Take over: this socket now serves ``target`` (what its throwaway app queued goes first).
        leftovers = [item for item in new.outbox.take_all() if isinstance(item, str)]
        new.link = None
        link.app = target
        link.add_preamble(leftovers)
        self.take_over(target, link, data.last_seq, ctx.message_id, principal=principal, client_ip=new.client_ip)
        new.outbox.close()  # the writer moves over to the resumed app: preamble, then its outbox
        # The throwaway app is cleaned up (no close frame) by its task group's host, which an app
        # that never ran a task has not started yet (it starts lazily): start it, so that it does.
        new.spawn(_nothing)
        new.close(WS_NORMAL, "resumed another app")
        return NO_REPLY

    def check(self, target: Connection, token: str, principal: str | None, last_seq: int) -> ResumeFailure | None:
        """Why a resume of ``target`` must be refused, or None (a ``gap`` ends ``target``: it cannot go on)."""
        if target.closing or target.resume is None:
            return "unknown"
        failure = target.resume.check(token, principal, last_seq)
        if failure == "gap":  # the rightful owner cannot continue it: it ends now
            target.close(WS_GOING_AWAY, "resume impossible (gap)")
        return failure

    def take_over(self, target: Connection, link: Link, last_seq: int, message_id: str, *, principal: str | None,
                  client_ip: str | None, node: str | None = None) -> int:
        """Serve ``target`` (checked) on ``link`` from now on: the old socket, if any, is superseded (4000);
        ``link.preamble`` gains ``resume_res`` and the replay; the pending server requests are asked again.
        Returns the app's new epoch (the fence of this incarnation)."""
        target_state = target.resume
        assert target_state is not None
        old_link = target.link
        if old_link is not None:
            target.detach_link()
            old_link.close(WS_SUPERSEDED, "superseded")
        elif target.detached:
            self._count_detached(target, -1)
        token, replay = target_state.attach(last_seq, list(target.in_flight))
        answer = Unsequenced(self._encoder.frame("resume_res", message_id, ResumeResData(
            resumed=True, app_id=target.app_id, resume_token=token, replayed=len(replay),
            sessions=self._sessions(target))))
        link.add_preamble((answer, *replay))
        target.attach_link(link)
        for pending in list(target.pending.values()):
            target.send_soon(pending.frame)  # a reloaded page lost its dialog: ask again (same message_id)
        target.spawn(self._run_callbacks, "resumed", target.app_id)
        if self._metrics is not None:
            self._metrics.resume("resumed", len(replay), sum(len(frame) for frame in replay))
        self._audit("resume", outcome="resumed", app_id=target.app_id, user_id=principal, replayed=len(replay),
                    superseded=old_link is not None, client_ip=client_ip, via_node=node)
        logger.info("app %s resumed (%d frame(s) replayed)%s", target.app_id, len(replay),
                    f" through node {node}" if node else "", extra={"app_id": target.app_id})
        return target_state.epoch

    def movable(self, connection: Connection) -> bool:
        """Whether a draining node can send this app's client elsewhere and keep the app (a cluster
        node, a resumable app with a socket here)."""
        state = connection.resume
        return (self.enabled and self.remote is not None and state is not None and state.resumable
                and not connection.closing and not connection.detached and connection.link is not None
                and not connection.link.remote and connection.proxy is None and connection.app_id in self.hosted)

    def remote_counts(self) -> dict[str, int]:
        """Remote links of this node (``remote_links_served`` / ``remote_links_proxied``), for the gauges."""
        if self.remote is None:
            return {"remote_links_served": 0, "remote_links_proxied": 0}
        return self.remote.counts()

    def drain_remote(self) -> None:
        """The node starts draining: sockets serving apps of other nodes are sent elsewhere (1012)."""
        if self.remote is not None:
            self.remote.drain()

    def _sessions(self, app: Connection) -> list[ResumedSession]:
        sessions = []
        for session_id in sorted(app.session_ids):
            handle = self._engines.get(session_id)
            engine = (ResumeEngineInfo(engine_id=handle.engine_id, engine_type=handle.engine_type,
                                       status=handle.status) if handle is not None else None)
            sessions.append(ResumedSession(session_id=session_id, status="active", engine=engine))
        return sessions

    def proxied(self, new: Connection, app_id: str, node: str) -> None:
        """``new``'s socket now serves ``app_id`` of ``node`` (resumed there; its ``resume_res`` came from there)."""
        self.asking.discard(new.app_id)
        self._audit("resume", outcome="proxied", app_id=app_id, user_id=new.user_id, owner_node=node,
                    client_ip=new.client_ip)

    def refused_remotely(self, app_id: str, reason: ResumeFailure, node: str) -> None:
        """A resume of an app of this node, asked by ``node``, was refused for ``reason``."""
        if self._metrics is not None:
            self._metrics.resume(reason)
        self._audit("resume", level=logging.WARNING if reason == "unknown" else logging.INFO, outcome=reason,
                    claimed_app_id=app_id, via_node=node)

    def refuse(self, new: Connection, message_id: str, reason: ResumeFailure, target: str | None = None) -> Any:
        """Answer ``resume_res`` ``{resumed: false, reason}``: ``new`` goes on as the fresh app it is."""
        self.asking.discard(new.app_id)
        state = new.resume
        token: Any = state.token if state is not None and self.enabled else msgspec.UNSET
        frame = self._encoder.frame("resume_res", message_id, ResumeResData(
            resumed=False, reason=reason, app_id=new.app_id, resume_token=token))
        new.send_soon(Unsequenced(frame))
        if self._metrics is not None:
            self._metrics.resume(reason)
        self._audit("resume", level=logging.WARNING if reason == "unknown" else logging.INFO, outcome=reason,
                    app_id=new.app_id, claimed_app_id=target, user_id=new.user_id, client_ip=new.client_ip)
        return NO_REPLY

    async def _run_callbacks(self, event: str, app_id: str) -> None:
        await run_callbacks(list(self._callbacks.get(event, ())), app_id, timeout=self._config.callback_timeout,
                            log=logger)


async def _nothing() -> None:
    """A task that starts an app's task group (whose host cleans the app up once it is closed)."""
