"""``python -m llmgine_ws.schemagen`` / ``llmgine-ws-schema``: write the protocol's schema documents.

::

    llmgine-ws-schema                                   # JSON Schema of the core protocol to stdout
    llmgine-ws-schema --app myapp:app --asyncapi asyncapi.json --json schema.json
    llmgine-ws-schema --app myapp:build_app --factory --dts src/protocol.d.ts --protocol-only
    llmgine-ws-schema --dts llmgine_ws/static/llmgine-ws.d.ts           # regenerate the checked-in copy
    llmgine-ws-schema --dts llmgine_ws/static/llmgine-ws.d.ts --check   # exit 1 when it is stale
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .app import mounted_apps
from .schema import ProtocolSchema, build_asyncapi
from .typescript import render_dts


def _load_app_schema(target: str, factory: bool, app_dir: str) -> ProtocolSchema:
    from uvicorn.importer import import_from_string

    path = os.path.abspath(app_dir)
    if path not in sys.path:
        sys.path.insert(0, path)
    app = import_from_string(target)
    if factory:
        app = app()
    apps = mounted_apps(app)  # an app made by create_app, or a host with one mounted in it
    if not apps:
        raise SystemExit(f"llmgine-ws-schema: {target} is not an llmgine_ws app and has none mounted in it")
    return ProtocolSchema.of_runtime(apps[0][1])


def _emit(path: str, text: str, check: bool) -> bool:
    """Write ``text`` to ``path`` (``-`` = stdout); with ``check``, only compare. True when current."""
    if path == "-":
        if not check:
            sys.stdout.write(text)
        return True
    target = Path(path)
    if check:
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current != text:
            print(f"{path} is stale: regenerate it with python -m llmgine_ws.schemagen", file=sys.stderr)
            return False
        return True
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, write (or ``--check``) the requested documents; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="llmgine-ws-schema",
        description="Generate the llmgine_ws protocol's JSON Schema, AsyncAPI document and TypeScript types. "
                    "With no output option, prints the JSON Schema.")
    parser.add_argument("--app", default=None, help="describe this app (module:attr) with its custom messages "
                        "instead of the core protocol")
    parser.add_argument("--factory", action="store_true", help="--app names a function returning the app")
    parser.add_argument("--app-dir", default=".", help="import --app from this directory (default: the current "
                        "directory, like uvicorn)")
    parser.add_argument("--json", metavar="PATH", help="write the JSON Schema here ('-' for stdout)")
    parser.add_argument("--asyncapi", metavar="PATH", help="write the AsyncAPI 3.0 document here")
    parser.add_argument("--dts", metavar="PATH", help="write TypeScript declarations here")
    parser.add_argument("--protocol-only", action="store_true",
                        help="--dts: only the message types, without the browser client's API")
    parser.add_argument("--check", action="store_true", help="compare with the files instead of writing them; "
                        "exit 1 when one is stale")
    args = parser.parse_args(argv)

    protocol = _load_app_schema(args.app, args.factory, args.app_dir) if args.app else ProtocolSchema.core()
    schema = protocol.json_schema()
    outputs: list[tuple[str, str]] = []
    if args.json:
        outputs.append((args.json, _dump(schema)))
    if args.asyncapi:
        outputs.append((args.asyncapi, _dump(build_asyncapi(schema))))
    if args.dts:
        outputs.append((args.dts, render_dts(schema, client_api=not args.protocol_only)))
    if not outputs:
        outputs.append(("-", _dump(schema)))
    current = [_emit(path, text, args.check) for path, text in outputs]
    return 0 if all(current) else 1


def _dump(document: Any) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.exit(main())
