"""Support for the cluster tests: one broker handle per backplane kind, and in-process nodes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from llmgine_ws import APIConfig, Extensions, create_app
from llmgine_ws.auth import Handshake, Principal
from llmgine_ws.backplane import Backplane
from llmgine_ws.backplane.cluster import ClusterRouter
from llmgine_ws.backplane.memory import MemoryBackplane, MemoryBroker
from llmgine_ws.backplane.nats import NatsBackplane
from llmgine_ws.backplane.redis import RedisBackplane

from .brokers import Broker
from .support import LiveServer, serve

HEARTBEAT = 0.5
"""Heartbeat interval of the test clusters (seconds): a silent node expires within 1 s."""


class BrokerHandle:
    """A broker of one kind for one test: makes backplanes, and can simulate an outage."""

    def __init__(self, kind: str, process: Broker | None = None) -> None:
        self.kind = kind
        self.process = process
        self.memory = MemoryBroker() if kind == "memory" else None

    def backplane(self) -> Backplane:
        """A new node's connection to this broker."""
        if self.memory is not None:
            return MemoryBackplane(self.memory)
        assert self.process is not None
        if self.kind == "nats":
            return NatsBackplane(self.process.url, reconnect_wait=0.1, connect_timeout=1.0)
        return RedisBackplane(self.process.url, reconnect_wait=0.1, connect_timeout=1.0)

    def outage(self) -> None:
        """The broker goes away (killed, for a real one)."""
        if self.memory is not None:
            self.memory.set_available(False)
        else:
            assert self.process is not None
            self.process.kill()

    def restore(self) -> None:
        """The broker comes back (on the same port, for a real one)."""
        if self.memory is not None:
            self.memory.set_available(True)
        else:
            assert self.process is not None
            self.process.restart()


ADMIN_TOKEN = "cluster-test-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
"""Headers for the admin-only endpoints (``/api/connections``) of the test nodes."""


async def user_from_query(handshake: Handshake) -> Principal:
    """Test authenticator: ``...?user=NAME`` connects as user NAME; without it, as a user of its own."""
    user = handshake.query_params.get("user")
    return Principal(user_id=user or f"anonymous-{uuid.uuid4()}", method="test")


def router_of(node: LiveServer) -> ClusterRouter:
    """The cluster router of an in-process node."""
    router = node.runtime.message_router
    assert isinstance(router, ClusterRouter)
    return router


@asynccontextmanager
async def cluster_node(broker: BrokerHandle, cluster: str, extensions: Extensions | None = None,
                       **config: Any) -> AsyncIterator[LiveServer]:
    """One node, served by uvicorn in this event loop, ready (connected, own hello looped back)."""
    config.setdefault("ping_interval", 0)
    config.setdefault("heartbeat_interval", HEARTBEAT)
    config.setdefault("admin_token", ADMIN_TOKEN)
    # These nodes end an app with its socket, as the conformance tests expect (the Python client acks,
    # which makes apps resumable); tests/test_resume_cluster.py turns resume on.
    config.setdefault("resume_window", 0)
    app = create_app(APIConfig(cluster_name=cluster, **config), extensions, backplane=broker.backplane(),
                     authenticator=user_from_query)
    async with serve(app) as live:
        router = router_of(live)
        await router.wait_for(lambda: router.ready, 15)
        yield live


@asynccontextmanager
async def cluster(broker: BrokerHandle, size: int, **config: Any) -> AsyncIterator[list[LiveServer]]:
    """``size`` nodes that all know each other."""
    name = "t" + uuid.uuid4().hex[:12]
    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(cluster_node(broker, name, **config)) for _ in range(size)]
        for node in nodes:
            router = router_of(node)
            await router.wait_for(lambda router=router: len(router.nodes()) == size, 10)  # type: ignore[misc]
        yield nodes


async def wait_visible(node: LiveServer, app_id: str, timeout: float = 5.0) -> None:
    """Wait until ``node`` sees ``app_id`` in its presence view."""
    router = router_of(node)
    await router.wait_for(lambda: router.is_app_connected(app_id), timeout)
