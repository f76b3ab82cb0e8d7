"""The chat demo: a single-page chat UI in the browser for the example chat engine.

The page (``examples/chat/static/``) uses the browser client the app serves at
``/api/client/llmgine-ws.js``; the engine, the ``translate`` message and the backend are those of
``examples/custom_engine_example.py`` (imported, not copied). Run it and open the page::

    python examples/chat/app.py            # http://127.0.0.1:8000/

With ``OPENAI_BASE_URL`` set, the page talks to a real model instead: the ``llm`` engine of
``examples/llm_chat.py`` (same ``OPENAI_API_KEY`` / ``LLMGINE_LLM_MODEL`` variables) serves the
page's ``chat`` engine type. Unset, the canned engine answers.

The page survives a dropped connection and a reload (with the server's resume on, the default): the
client resumes the app, and the page keeps its transcript and the command in progress in
``sessionStorage`` — reload mid-answer and the answer goes on; reload with the confirm dialog open
and the dialog comes back.

Query parameters of the page: ``?token_delay=0.03`` (seconds between streamed tokens) and
``?name=Ada`` (the engine's name) go to ``create_engine``'s config; ``?reconnect_delay=500`` is the
first reconnect delay in ms.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from llmgine_ws import APIConfig, get_runtime

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module (the examples folder is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE.parent / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_engine_example() -> ModuleType:
    """``examples/custom_engine_example.py``: the canned chat engine."""
    return load_example("custom_engine_example")


def build_demo_app(config: APIConfig | None = None, environ: Mapping[str, str] | None = None) -> Starlette:
    """The example app with the chat page in front of it: ``/`` is the page, the rest is the example app.

    The engine behind the page is a real model when ``OPENAI_BASE_URL`` is set (in ``environ``,
    default ``os.environ``), else the canned one.
    """
    env = os.environ if environ is None else environ
    inner: Any
    if env.get("OPENAI_BASE_URL"):
        inner = load_example("llm_chat").build_app(config, environ=env, engine_types=("chat", "llm"))
    else:
        inner = load_engine_example().build_app(config)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Mount("/chat", StaticFiles(directory=STATIC), name="chat"),
            Mount("/", app=inner),
        ],
        lifespan=inner.router.lifespan_context,  # a mounted app's lifespan runs only if the host runs it
    )
    app.state.llmgine = get_runtime(inner)
    return app


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    uvicorn.run(build_demo_app(), host=os.environ.get("LLMGINE_API_HOST", "127.0.0.1"),
                port=int(os.environ.get("LLMGINE_API_PORT", "8000")))
