"""Shared fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from starlette.applications import Starlette

from llmgine_ws import APIConfig, Extensions, create_app

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
        return create_app(APIConfig(**config), extensions)

    return factory


@pytest.fixture
async def server(make_app: Callable[..., Starlette]) -> AsyncIterator[LiveServer]:
    """The default app, served."""
    async with serve(make_app()) as live:
        yield live
