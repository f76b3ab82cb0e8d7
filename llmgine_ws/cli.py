"""``llmgine-ws`` / ``python -m llmgine_ws``: run a server with uvicorn.

Defaults come from the ``LLMGINE_API_*`` variables (``LLMGINE_API_HOST``, ``LLMGINE_API_PORT``...);
flags override them. ``--app module:attr`` serves your own app (or, with ``--factory``, the app a
function returns) instead of the default ``llmgine_ws.main:app``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
from starlette.types import Message, Receive, Scope, Send
from uvicorn.importer import ImportFromStringError, import_from_string

from .app import lifespan_problems
from .config import APIConfig, ConfigError
from .logconfig import logging_config
from .transport import uvicorn_options

DEFAULT_APP = "llmgine_ws.main:app"


def build_parser(config: APIConfig) -> argparse.ArgumentParser:
    """The command line, with defaults taken from ``config``."""
    parser = argparse.ArgumentParser(prog="llmgine-ws", description="Run an llmgine_ws server with uvicorn.")
    parser.add_argument("--host", default=config.host, help=f"interface to bind (default {config.host})")
    parser.add_argument("--port", type=int, default=config.port, help=f"port to bind (default {config.port})")
    parser.add_argument("--app", default=DEFAULT_APP, help=f"the ASGI app as module:attr (default {DEFAULT_APP})")
    parser.add_argument("--factory", action="store_true", help="--app names a function returning the app")
    parser.add_argument("--app-dir", default=".", help="import --app from this directory (default: the current "
                        "directory, like uvicorn)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (needs a backplane to share "
                        "messaging across them)")
    parser.add_argument("--fd", type=int, default=None, help="serve on this already-bound socket file descriptor")
    parser.add_argument("--log-level", default="debug" if config.debug else config.log_level,
                        choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--log-format", default=config.log_format, choices=["text", "json"],
                        help="log lines as text or JSON (default from LLMGINE_API_LOG_FORMAT)")
    parser.add_argument("--ssl-keyfile", default=None, help="TLS private key (serve wss:// and https://)")
    parser.add_argument("--ssl-certfile", default=None, help="TLS certificate chain")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run uvicorn until it stops; returns the exit status."""
    try:
        config = APIConfig.from_env()
    except ConfigError as exc:
        print(f"llmgine-ws: {exc}", file=sys.stderr)
        return 2
    args = build_parser(config).parse_args(argv)
    add_app_dir(args.app_dir)
    try:
        options = uvicorn_options(config)
        app: Any = args.app
        if not args.workers or args.workers == 1:  # one process: import it here, and check its startup
            app = StartupCheck(import_app(args.app, args.factory))
        uvicorn.run(
            app,
            factory=args.factory and isinstance(app, str),
            host=args.host,
            port=args.port,
            fd=args.fd,
            workers=args.workers,
            log_level=args.log_level,
            log_config=logging_config(args.log_format, args.log_level),
            ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile,
            **options,
        )
    except (ConfigError, ImportFromStringError) as exc:  # importing the app (e.g. llmgine_ws.main reads the env)
        print(f"llmgine-ws: {exc}", file=sys.stderr)
        return 2
    return 0


def add_app_dir(app_dir: str) -> None:
    """Let ``--app`` name a module of ``app_dir`` (the current directory by default), as uvicorn's CLI does."""
    path = os.path.abspath(app_dir)
    if path not in sys.path:
        sys.path.insert(0, path)


def import_app(target: str, factory: bool) -> Any:
    """The app ``module:attr`` names (or, with ``factory``, the app it returns)."""
    app = import_from_string(target)
    return app() if factory else app


class StartupCheck:
    """Fails the server's startup when an llmgine_ws app it serves did not start with it (a mounted app
    whose lifespan the host does not run): at once, not at the first connection."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The wrapped app, watching its ``lifespan.startup.complete``."""
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def checked(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                problems = lifespan_problems(self.app)
                if problems:
                    for problem in problems:
                        logging.getLogger("llmgine_ws.cli").error("%s", problem)
                    message = {"type": "lifespan.startup.failed", "message": "; ".join(problems)}
            await send(message)

        await self.app(scope, receive, checked)
