"""Resume across nodes: a socket on one node serving an app that lives on another.

The node holding the socket (the *proxy*) asks the node owning the app (the *owner*) to resume it
(:class:`~llmgine_ws.backplane.wire.ResumeAsk`). The owner checks the resume exactly as for a socket
of its own (:meth:`~llmgine_ws.resumption.Resumer.check`), takes the app over
(:meth:`~llmgine_ws.resumption.Resumer.take_over`: the token rotates, the app's epoch moves on, an
older socket is superseded with 4000) and serves it on a :class:`RemoteLink`: a writer task that
publishes the app's frames (``resume_res``, the replay, then live traffic, all sequenced by the
owner) to the proxy's inbox, tagged with the link's *generation* (the app's epoch at the take-over).
The proxy writes them to its socket as they are, and publishes what its client sends
(:class:`~llmgine_ws.backplane.wire.LinkInput`) to the owner, which dispatches it into the app as if
it had read it itself. Every message of a link carries its generation: the owner drops input from a
link that is no longer the app's, the proxy drops frames for a link it does not hold (and says so,
:class:`~llmgine_ws.backplane.wire.LinkLost`, so that the owner detaches the app).

:class:`~llmgine_ws.backplane.links.LinkTable` is the bookkeeping, sans I/O; this module does the I/O:
:class:`RemoteLink` (the owner's writer) and :class:`RemoteResume` (asking, proxying, serving). The
protocol and its failure cases are described in ``docs/scaling.md`` ("Resume across nodes").
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ..connection import (
    WS_GOING_AWAY,
    WS_INTERNAL_ERROR,
    WS_SERVICE_RESTART,
    CloseRequest,
    Connection,
    DetachRequest,
    Link,
    Unsequenced,
    keep_alive,
)
from ..dispatch import Dispatcher
from ..errors import AppDisconnected, MessagingError
from ..hub import Hub
from ..outbox import OutboxClosed
from ..protocol import FrameEncoder, ResumeData
from ..resumption import Resumer
from .links import BATCH_BYTES, BATCH_FRAMES, DETACHING_CODES, WINDOW, Asking, LinkTable, Proxied
from .wire import (
    LinkClose,
    LinkCredit,
    LinkFrames,
    LinkInput,
    LinkLost,
    LinkOpen,
    NodeMessage,
    ResumeAsk,
    ResumeRefused,
)

logger = logging.getLogger("llmgine_ws.cluster")

class RemoteLink(Link):
    """An app's link whose socket is on another node: a writer task here publishes the app's frames."""

    __slots__ = ("_credit_event", "credit", "gen", "inputs", "link_id", "node", "notified", "on_closed", "peer_gone",
                 "scope", "sent", "writer_done")

    remote = True

    def __init__(self, app: Connection, node: str, link_id: str, on_closed: Callable[[RemoteLink], None]) -> None:
        super().__init__(app)
        self.node = node
        self.link_id = link_id
        self.gen = 0
        self.scope = anyio.CancelScope()
        self.writer_done = False
        self.peer_gone = False
        """The serving node said the socket is gone (nothing to tell it)."""
        self.notified = False
        self.on_closed = on_closed
        self.sent = 0
        """The ``n`` of the last LinkFrames published."""
        self.credit = 0
        """The ``n`` the serving node credited last."""
        self._credit_event = anyio.Event()
        self.inputs = 0
        """The ``n`` of the last client frame taken (LinkInput)."""

    def credited(self, n: int) -> None:
        """The serving node took every message up to ``n``."""
        if n > self.credit:
            self.credit = n
            self._credit_event.set()
            self._credit_event = anyio.Event()

    async def wait_for_window(self) -> None:
        """Wait until another message may be in flight (at most :data:`WINDOW`)."""
        while self.sent - self.credit >= WINDOW:
            await self._credit_event.wait()

    def close(self, code: int, reason: str, *, lost: bool = False) -> None:
        """Stop the writer; the serving node is told to close its socket with ``code``."""
        super().close(code, reason, lost=lost)
        self.scope.cancel()
        if self.writer_done:
            self.on_closed(self)


class _Proxy:
    """The :class:`~llmgine_ws.connection.Proxy` of a socket here serving an app of another node."""

    __slots__ = ("_remote", "entry")

    def __init__(self, remote: RemoteResume, entry: Proxied) -> None:
        self._remote = remote
        self.entry = entry

    async def forward(self, text: str) -> None:
        """Publish one client frame to the app's node (in order: the reader awaits each)."""
        entry = self.entry
        entry.inputs += 1
        try:
            await self._remote.publish(entry.owner, LinkInput(node=self._remote.node_id, app_id=entry.app_id,
                                                              gen=entry.gen, n=entry.inputs, text=text))
        except MessagingError as exc:
            logger.warning("cluster node %s: client frame for %s not forwarded (%s); the client must resume",
                           self._remote.node_id, entry.app_id, exc)
            if entry.connection is not None:
                entry.connection.close(WS_INTERNAL_ERROR, "backplane unavailable")


class RemoteResume:
    """Resume across nodes, the I/O (see the module docstring); built and fed by the cluster router.

    ``publish(node, message)`` awaits the broker; ``enqueue(node, message)`` queues from code that
    cannot wait; ``owner_of(app_id)`` is the presence view; ``timeout`` bounds an ask (two heartbeats).
    """

    def __init__(self, node_id: str, *, hub: Hub, resumer: Resumer, dispatcher: Dispatcher,
                 publish: Callable[[str, NodeMessage], Awaitable[None]], enqueue: Callable[[str, NodeMessage], None],
                 owner_of: Callable[[str], str | None], max_payload: Callable[[], int], timeout: float,
                 probe_interval: float, ping_interval: float = 0.0, missed_pongs: int = 2,
                 encoder: FrameEncoder | None = None) -> None:
        self.node_id = node_id
        self.table = LinkTable()
        self._hub = hub
        self._resumer = resumer
        self._dispatcher = dispatcher
        self.publish = publish
        self._enqueue = enqueue
        self._owner_of = owner_of
        self._max_payload = max_payload
        self.timeout = timeout
        self._probe_interval = probe_interval
        self._ping_interval = ping_interval
        self._missed_pongs = missed_pongs
        self._encoder = encoder

    # ------------------------------------------------------------------ proxy side: asking

    def ask(self, new: Connection, data: ResumeData, message_id: str) -> bool:
        """See :meth:`~llmgine_ws.resumption.RemoteResumes.ask`."""
        owner = self._owner_of(data.app_id)
        if owner is None or owner == self.node_id:
            return False
        link = uuid.uuid4().hex
        asking = self.table.ask(link, owner, data.app_id, time.monotonic(), self.timeout, new)
        message = ResumeAsk(node=self.node_id, link=link, app_id=data.app_id, token=data.resume_token,
                            last_seq=data.last_seq, principal=new.user_id, message_id=message_id)
        if not new.spawn(self._ask, new, asking, message, message_id):
            self.table.refused(link, "unknown")
            return False
        return True

    async def _ask(self, new: Connection, asking: Asking, message: ResumeAsk, message_id: str) -> None:
        try:
            await self.publish(asking.owner, message)
        except MessagingError as exc:
            logger.warning("cluster node %s: resume of %s not asked of node %s: %s", self.node_id, asking.app_id,
                           asking.owner, exc)
            self.table.refused(asking.link, "unknown")
        with anyio.move_on_after(self.timeout * 1.5):  # (the sweep settles it at the deadline; a backstop)
            await asking.done.wait()
        if not asking.done.is_set():
            self.table.refused(asking.link, "unknown")
        if asking.opened:
            self._resumer.proxied(new, asking.app_id, asking.owner)
            return
        self._resumer.refuse(new, message_id, asking.outcome or "unknown", asking.app_id)

    def _on_refused(self, message: ResumeRefused) -> None:
        self.table.refused(message.link, message.reason)

    def _on_open(self, message: LinkOpen) -> None:
        entry = self.table.opened(message.link, message.node, message.gen)
        connection: Connection | None = entry.connection if entry is not None else None
        if entry is None or connection is None or connection.closing:
            if entry is not None:
                self.table.unproxy(entry.link)
            self._enqueue(message.node, LinkLost(node=self.node_id, app_id=message.app_id, gen=message.gen,
                                                 code=WS_GOING_AWAY))
            return
        # This connection's socket now serves the app over there: its own (throwaway) app is no longer
        # addressable here, and the frames that come are sequenced already.
        connection.proxy = _Proxy(self, entry)
        connection.outbox.set_commit(None)
        self._hub.remove(connection)
        entry.pending.append((0, message.frames, None))
        if not connection.spawn(self._pump, entry):
            self.table.unproxy(entry.link)
            self._enqueue(message.node, LinkLost(node=self.node_id, app_id=message.app_id, gen=message.gen,
                                                 code=WS_GOING_AWAY))

    def _on_frames(self, message: LinkFrames) -> None:
        entry = self.table.frames_for(message.link, message.node, message.gen)
        if entry is None:
            self._enqueue(message.node, LinkLost(node=self.node_id, app_id="", gen=message.gen, code=WS_GOING_AWAY))
            return
        if not entry.take(message.n, message.frames):  # one was lost on the way: never a silent gap in seq
            logger.warning("cluster node %s: frames of %s from node %s lost in transit; the client must resume",
                           self.node_id, entry.app_id, entry.owner)
            entry.connection.close(WS_INTERNAL_ERROR, "frames lost between nodes: resume")

    async def _pump(self, entry: Proxied) -> None:
        """Queue the owner's frames to this socket as it takes them (waiting for room, like any sender:
        a client too slow past ``send_grace`` is dropped with 1013), crediting the owner as it goes."""
        connection: Connection = entry.connection
        try:
            while True:
                while not entry.pending:
                    entry.wake = anyio.Event()
                    await entry.wake.wait()
                n, frames, close = entry.pending.popleft()
                if close is not None:
                    connection.close(close[0], close[1], flush=True)
                    return
                for frame in frames:
                    await connection.send(Unsequenced(frame))
                if n > 0 and entry.queued(n):
                    self._enqueue(entry.owner, LinkCredit(node=self.node_id, app_id=entry.app_id, link=entry.link,
                                                          gen=entry.gen, n=n))
        except AppDisconnected:
            pass  # the socket went (too slow, or closed): the owner is told by proxy_closed

    def _on_credit(self, message: LinkCredit) -> None:
        if not self.table.current(message.app_id, message.node, message.gen):
            return
        app = self._hub.get(message.app_id)
        if app is not None and isinstance(app.link, RemoteLink) and app.link.gen == message.gen:
            app.link.credited(message.n)

    def _app_of(self, node: str, gen: int) -> str:
        """The app served by ``node`` as generation ``gen`` ("" if none)."""
        return next((app for app, (served_by, _, served_gen) in self.table.served.items()
                     if served_by == node and served_gen == gen), "")

    def _on_close(self, message: LinkClose) -> None:
        entry = self.table.frames_for(message.link, message.node, message.gen)
        if entry is None:
            return
        entry.closed_by_owner = True
        self.table.unproxy(entry.link)
        entry.closing(message.code, message.reason)  # after the frames taken before it

    def proxy_closed(self, connection: Connection) -> None:
        """A socket here that served an app elsewhere is gone: tell the app's node (unless it closed it)."""
        proxy = connection.proxy
        if not isinstance(proxy, _Proxy):
            return
        entry = proxy.entry
        if self.table.unproxy(entry.link) is None and entry.closed_by_owner:
            return
        code = connection.close_code or WS_GOING_AWAY
        self._enqueue(entry.owner, LinkLost(node=self.node_id, app_id=entry.app_id, gen=entry.gen, code=code,
                                            goodbye=code not in DETACHING_CODES))

    def drain(self) -> None:
        """See :meth:`~llmgine_ws.resumption.RemoteResumes.drain`."""
        for entry in list(self.table.proxied.values()):
            entry.connection.close(WS_SERVICE_RESTART, "server restarting: resume on another node")

    # ------------------------------------------------------------------ owner side

    def _on_ask(self, message: ResumeAsk) -> None:
        def refuse(reason: str) -> None:
            self._enqueue(message.node, ResumeRefused(node=self.node_id, link=message.link, reason=reason))

        resumer = self._resumer
        if not resumer.enabled:
            refuse("disabled")
            return
        target = self._hub.get(message.app_id)
        if target is None or target.closing or target.resume is None or target.proxy is not None:
            refuse(resumer.tombstones.reason(message.app_id, message.token, message.principal))
            return
        failure = resumer.check(target, message.token, message.principal, message.last_seq)
        if failure is not None:
            refuse(failure)
            resumer.refused_remotely(target.app_id, failure, message.node)
            return
        link = RemoteLink(target, message.node, message.link, self._link_closed)
        link.gen = resumer.take_over(target, link, message.last_seq, message.message_id,
                                     principal=message.principal, client_ip=None, node=message.node)
        self.table.serve(target.app_id, message.node, message.link, link.gen)
        if not target.spawn(self._serve, target, link):
            self.table.unserve(target.app_id, link.gen)
        elif self._ping_interval > 0 and self._encoder is not None:  # the owner pings (its seq): half-open sockets
            target.spawn(keep_alive, link, self._ping_interval, self._missed_pongs, self._encoder)

    async def _serve(self, app: Connection, link: RemoteLink) -> None:
        """Publish the app's frames to the serving node until the link ends."""
        try:
            with link.scope:
                preamble = [str(frame) for frame in link.preamble or ()]  # (plain str: msgpack encodes no subclass)
                link.preamble = None
                await self.publish(link.node, LinkOpen(node=self.node_id, link=link.link_id, app_id=app.app_id,
                                                       gen=link.gen, frames=preamble[:1]))
                await self._send(link, preamble[1:])
                outbox = app.outbox
                while True:
                    item: Any = None
                    with anyio.move_on_after(self._probe_interval):
                        item = await outbox.get()
                    if item is None:
                        await self._send(link, [], probe=True)  # a lost LinkLost would leave the app attached
                        continue
                    batch: list[str] = []
                    size = 0
                    while True:
                        if isinstance(item, CloseRequest):
                            await self._send(link, batch)
                            if isinstance(item, DetachRequest):
                                app.drop_link(item.code, item.reason)
                            else:
                                app.close(item.code, item.reason)
                            return
                        batch.append(item if type(item) is str else str(item))
                        size += len(item)
                        if not len(outbox) or size >= BATCH_BYTES or len(batch) >= BATCH_FRAMES:
                            break
                        item = await outbox.get()
                    await self._send(link, batch)
        except OutboxClosed:
            pass  # detached, or resumed elsewhere: the link's close says what to tell the serving node
        except Exception as exc:  # (MessagingError, or a bug: never into the app's task group)
            log = logger.warning if isinstance(exc, MessagingError) else logger.exception
            log("cluster node %s: frames of %s not delivered to node %s (%s): the app is detached",
                self.node_id, app.app_id, link.node, exc)
            if app.link is link:
                app.drop_link(WS_INTERNAL_ERROR, "backplane unavailable")
        finally:
            link.writer_done = True
            self.table.unserve(app.app_id, link.gen)
            if link.close_code is not None and not link.peer_gone and not link.notified:
                link.notified = True
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    try:
                        await self.publish(link.node, LinkClose(node=self.node_id, link=link.link_id, gen=link.gen,
                                                                code=link.close_code, reason=link.close_reason))
                    except MessagingError:
                        pass  # that node's socket learns it from its own side (the app's node left, or a probe)

    async def _send(self, link: RemoteLink, frames: list[str], *, probe: bool = False) -> None:
        if not frames and not probe:
            return
        limit = self._max_payload() or BATCH_BYTES * 4
        budget = min(BATCH_BYTES, max(limit // 2, 1))
        chunk: list[str] = []
        size = 0
        for frame in frames:
            if chunk and size + len(frame) > budget:
                await self._send_one(link, chunk)
                chunk, size = [], 0
            chunk.append(frame)
            size += len(frame)
        if chunk or probe:
            await self._send_one(link, chunk)

    async def _send_one(self, link: RemoteLink, frames: list[str]) -> None:
        await link.wait_for_window()
        link.sent += 1
        await self.publish(link.node, LinkFrames(node=self.node_id, link=link.link_id, gen=link.gen, n=link.sent,
                                                 frames=frames))

    def _link_closed(self, link: RemoteLink) -> None:
        """A remote link closed after its writer ended: tell the serving node (from a queue)."""
        self.table.unserve(link.app.app_id, link.gen)
        if link.peer_gone or link.notified:
            return
        link.notified = True
        self._enqueue(link.node, LinkClose(node=self.node_id, link=link.link_id, gen=link.gen,
                                           code=link.close_code or WS_GOING_AWAY, reason=link.close_reason))

    def _on_input(self, message: LinkInput) -> None:
        if not self.table.current(message.app_id, message.node, message.gen):
            return  # a stale link (the app resumed elsewhere since, or ended): fenced off
        app = self._hub.get(message.app_id)
        link = app.link if app is not None else None
        if app is None or app.closing or not isinstance(link, RemoteLink) or link.gen != message.gen:
            return
        if message.n != link.inputs + 1:  # a client frame was lost on the way: the client must resume (and resend)
            logger.warning("cluster node %s: client frames of %s from node %s lost in transit; detaching",
                           self.node_id, app.app_id, message.node)
            app.drop_link(WS_INTERNAL_ERROR, "client frames lost between nodes")
            return
        link.inputs = message.n
        app.last_activity = time.monotonic()
        self._dispatcher.dispatch(app, message.text)

    def _on_lost(self, message: LinkLost) -> None:
        app_id = message.app_id
        if not app_id:  # frames for a link the serving node does not hold: find the app by generation
            app_id = self._app_of(message.node, message.gen)
        if not self.table.current(app_id, message.node, message.gen):
            return
        self.table.unserve(app_id, message.gen)
        app = self._hub.get(app_id)
        if app is None or not isinstance(app.link, RemoteLink) or app.link.gen != message.gen:
            return
        app.link.peer_gone = True
        self._link_lost(app, message.code, message.goodbye)

    def _link_lost(self, app: Connection, code: int, goodbye: bool) -> None:
        if goodbye:
            app.lose()
            app.close(code, "connection closed")
        else:
            app.drop_link(code, "connection lost")

    # ------------------------------------------------------------------ both

    def node_gone(self, node: str) -> None:
        """``node`` left or expired: its asks fail, its apps' sockets here close, our apps it served detach."""
        _asks, proxied, apps = self.table.node_gone(node)
        for entry in proxied:
            entry.closed_by_owner = True
            entry.connection.close(WS_GOING_AWAY, "the app's node is gone")
        for app_id in apps:
            app = self._hub.get(app_id)
            if app is not None and isinstance(app.link, RemoteLink) and app.link.node == node:
                app.link.peer_gone = True
                self._link_lost(app, WS_GOING_AWAY, False)

    def counts(self) -> dict[str, int]:
        """See :meth:`~llmgine_ws.resumption.RemoteResumes.counts`."""
        return {"remote_links_served": len(self.table.served), "remote_links_proxied": len(self.table.proxied)}

    def sweep(self, now: float) -> None:
        """Fail the asks not answered in time (called four times a heartbeat interval)."""
        self.table.overdue(now)

    def handle(self, message: NodeMessage) -> bool:
        """Act on a resume/link message; False if ``message`` is not one."""
        handler = _HANDLERS.get(type(message))
        if handler is None:
            return False
        handler(self, message)
        return True


_HANDLERS: dict[type[Any], Callable[[RemoteResume, Any], None]] = {
    ResumeAsk: RemoteResume._on_ask,
    ResumeRefused: RemoteResume._on_refused,
    LinkOpen: RemoteResume._on_open,
    LinkFrames: RemoteResume._on_frames,
    LinkCredit: RemoteResume._on_credit,
    LinkClose: RemoteResume._on_close,
    LinkInput: RemoteResume._on_input,
    LinkLost: RemoteResume._on_lost,
}


__all__ = ["LinkTable", "RemoteLink", "RemoteResume"]
