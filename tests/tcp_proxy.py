"""A TCP proxy between a test client and the server, that the test can sever or black-hole.

``sever()`` cuts every connection through the proxy at once (both ends see the TCP connection end,
no WebSocket close frame: a phone switching networks); ``blackhole()`` silently drops every byte of
the connections open now, in both directions, while their sockets stay open (a half-open
connection: neither end notices until it times out). Connections opened later go through normally.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc


class _Pair:
    __slots__ = ("client", "holed", "server")

    def __init__(self, client: anyio.abc.SocketStream, server: anyio.abc.SocketStream) -> None:
        self.client = client
        self.server = server
        self.holed = False


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to the target port (see the module docstring)."""

    def __init__(self, listener: anyio.abc.SocketListener, target_port: int) -> None:
        self._listener = listener
        self._target_port = target_port
        self._pairs: list[_Pair] = []
        self.connections = 0
        """Connections accepted so far."""

    @property
    def port(self) -> int:
        """The port clients connect to."""
        port: int = self._listener.extra(anyio.abc.SocketAttribute.local_port)
        return port

    def ws_url(self, path: str = "/api/ws") -> str:
        """The WebSocket URL through the proxy."""
        return f"ws://127.0.0.1:{self.port}{path}"

    async def sever(self) -> None:
        """Cut every connection open now (both sides see the TCP connection end)."""
        pairs, self._pairs = self._pairs, []
        for pair in pairs:
            await anyio.aclose_forcefully(pair.client)
            await anyio.aclose_forcefully(pair.server)

    def retarget(self, port: int) -> None:
        """Send the connections opened from now on to ``port`` (a load balancer picking another node)."""
        self._target_port = port

    def blackhole(self) -> None:
        """Drop every byte of the connections open now, both ways; their sockets stay open."""
        for pair in self._pairs:
            pair.holed = True

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        self.connections += 1
        try:
            server = await anyio.connect_tcp("127.0.0.1", self._target_port)
        except OSError:
            await anyio.aclose_forcefully(client)
            return
        pair = _Pair(client, server)
        self._pairs.append(pair)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._pump, pair, client, server, tg)
            tg.start_soon(self._pump, pair, server, client, tg)

    @staticmethod
    async def _pump(pair: _Pair, source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream,
                    tg: anyio.abc.TaskGroup) -> None:
        try:
            async for chunk in source:
                if not pair.holed:
                    await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        if pair.holed:
            return  # a black hole never tells the other side
        with anyio.CancelScope(shield=True):  # one side ended: end the other (before the pumps are cancelled)
            await anyio.aclose_forcefully(pair.client)
            await anyio.aclose_forcefully(pair.server)
        tg.cancel_scope.cancel()


@asynccontextmanager
async def tcp_proxy(target_port: int) -> AsyncIterator[TcpProxy]:
    """Run a :class:`TcpProxy` to ``127.0.0.1:target_port`` for the duration of the block."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    proxy = TcpProxy(listener, target_port)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, proxy._handle)
            try:
                yield proxy
            finally:
                tg.cancel_scope.cancel()
    finally:
        await proxy.sever()
        await listener.aclose()
