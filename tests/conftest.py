"""Shared fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from starlette.applications import Starlette

from llmgine_ws import APIConfig, Extensions, create_app

from .brokers import Broker
from .support import LiveServer, serve


@pytest.fixture
def anyio_backend() -> str:
    """uvicorn runs on asyncio; modules that also run under trio override this fixture."""
    return "asyncio"


@pytest.fixture
def make_app() -> Callable[..., Starlette]:
    """Build an app with test-friendly defaults (no server pings unless asked)."""

    def factory(extensions: Extensions | None = None, **config: Any) -> Starlette:
        config.setdefault("ping_interval", 0)
        # No resume unless a test asks for it: the Python client acks by default, which would leave the
        # app of a client that vanishes detached for the window, and most tests check the seed's
        # cleanup at disconnect (tests/test_resume.py turns it on).
        config.setdefault("resume_window", 0)
        return create_app(APIConfig(**config), extensions)

    return factory


@pytest.fixture
async def server(make_app: Callable[..., Starlette]) -> AsyncIterator[LiveServer]:
    """The default app, served."""
    async with serve(make_app()) as live:
        yield live


@pytest.fixture(scope="session")
def nats_broker() -> Iterator[Broker]:
    """A nats-server of our own on a free port, shared by the tests that only need a broker."""
    broker = Broker("nats")
    broker.start()
    yield broker
    broker.kill()


@pytest.fixture(scope="session")
def redis_broker() -> Iterator[Broker]:
    """A redis-server of our own on a free port, shared by the tests that only need a broker."""
    broker = Broker("redis")
    broker.start()
    yield broker
    broker.kill()
