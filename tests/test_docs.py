"""The README and docs/ stay in step with the code.

- Every fenced ```` ```python ```` block runs. The blocks of a page run top to bottom in one
  namespace (like a notebook): a block with top-level ``await`` runs on the test's event loop, any
  other block in a worker thread (so ``anyio.run`` works there). A block that mentions
  ``127.0.0.1:8000`` runs against a live server: the page's current ``app`` (or the default app when
  the page has defined none), served on a free port that replaces ``8000``. Blocks marked
  ```` ```python illustrative ```` are only compiled.
- Reference pages are complete: every core message type and error code is in docs/protocol.md,
  docs/configuration.md is generated from the current ``APIConfig`` docstrings, every
  ``LLMGINE_API_*`` variable mentioned exists, every link between pages (and its ``#anchor``) resolves.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
import tomllib
import traceback
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from inspect import CO_COROUTINE
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest

from llmgine_ws import APIConfig, ErrorCode, create_app
from llmgine_ws.config import env_variable
from llmgine_ws.protocol import RESERVED_MESSAGE_TYPES
from llmgine_ws.schema import server_message_types

from .support import LiveServer, serve

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
DEFAULT_ADDRESS = "127.0.0.1:8000"
WRITTEN_ELSEWHERE: set[str] = set()
"""Pages other branches add: links to them may dangle until those branches are merged (then empty this)."""
RUN_ELSEWHERE = {"python-client.md": "tests/test_client_docs.py (against the example chat app)",
                 "llm-engines.md": "tests/test_llm_docs.py (against a local OpenAI-compatible server)"}
"""Pages whose Python blocks need a particular server: their own test runs them."""

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
                   re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    options: tuple[str, ...]
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        language, *options = match["info"].split() or [""]
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(page, line, language, tuple(options), match["body"]))
    return found


def python_blocks(page: Path) -> list[Block]:
    return [block for block in blocks(page) if block.language == "python"]


def prose(page: Path) -> str:
    """The page without its fenced blocks (links and headings live here)."""
    return FENCE.sub("", page.read_text())


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "_generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- runnable blocks


def compile_block(block: Block, code: str) -> Any:
    # Padded so that tracebacks point at the page's own line numbers.
    return compile("\n" * block.line + code, str(block.page), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
                   dont_inherit=True)


def failing_line(block: Block, exc: BaseException) -> str:
    """Where in the page a block failed (the innermost frame in the page's own code)."""
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if frame.filename == str(block.page)]
    if not frames:
        return block.where
    line = frames[-1].lineno or block.line
    return f"{page_id(block.page)}:{line}: {block.page.read_text().splitlines()[line - 1].strip()}"


class PageRunner:
    """Runs a page's blocks in order, serving the page's app to the blocks that talk to a server."""

    def __init__(self, page: Path, stack: AsyncExitStack) -> None:
        self.namespace: dict[str, Any] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
        self.stack = stack
        self.served: tuple[Any, LiveServer] | None = None
        self.server_stack: AsyncExitStack | None = None

    async def server_for(self, app: Any) -> LiveServer:
        if self.served is not None and self.served[0] is app:
            return self.served[1]
        if self.server_stack is not None:
            await self.server_stack.aclose()
        self.server_stack = AsyncExitStack()
        await self.stack.enter_async_context(self.server_stack)
        live = await self.server_stack.enter_async_context(serve(app))
        self.served = (app, live)
        return live

    async def run(self, block: Block) -> None:
        code = block.code
        if DEFAULT_ADDRESS in code:
            app = self.namespace.get("app")
            live = await self.server_for(app if app is not None else create_app(APIConfig()))
            code = code.replace(DEFAULT_ADDRESS, f"127.0.0.1:{live.port}")
        compiled = compile_block(block, code)
        with anyio.fail_after(60):
            if compiled.co_flags & CO_COROUTINE:
                await eval(compiled, self.namespace)
            else:
                await anyio.to_thread.run_sync(partial(exec, compiled, self.namespace), abandon_on_cancel=True)


@pytest.mark.anyio
@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p) and p.name not in RUN_ELSEWHERE],
                         ids=page_id)
async def test_every_python_block_runs(page: Path) -> None:
    async with AsyncExitStack() as stack:
        runner = PageRunner(page, stack)
        for block in python_blocks(page):
            if "illustrative" in block.options:
                compile_block(block, block.code)
                continue
            try:
                await runner.run(block)
            except Exception as exc:
                where = failing_line(block, exc)
                raise AssertionError(f"the block at {block.where} failed at {where}: {exc!r}") from exc


def test_illustrative_blocks_stay_few() -> None:
    marked = [block.where for page in PAGES for block in python_blocks(page) if "illustrative" in block.options]
    total = sum(len(python_blocks(page)) for page in PAGES)
    assert len(marked) * 4 <= total, f"most Python blocks should run; illustrative only: {marked}"


def test_the_fence_parser_sees_every_block() -> None:
    for page in PAGES:
        text = page.read_text()
        opened = len(re.findall(r"^ *(?:```|~~~)", text, re.MULTILINE))
        assert opened == 2 * len(blocks(page)), f"{page_id(page)}: an unbalanced code fence"


# ----------------------------------------------------------------------------- reference pages


def test_every_message_type_is_in_the_protocol_page() -> None:
    protocol = (DOCS / "protocol.md").read_text()
    runtime = create_app(APIConfig()).state.llmgine
    types = (set(RESERVED_MESSAGE_TYPES) | set(runtime.dispatcher.specs)
             | set(server_message_types(runtime.dispatcher.specs.values())))
    missing = sorted(t for t in types if f"`{t}`" not in protocol)
    assert not missing, f"message types missing from docs/protocol.md: {missing}"


@pytest.mark.parametrize("code", [code.value for code in ErrorCode])
def test_every_error_code_is_in_the_protocol_page(code: str) -> None:
    assert f"| `{code}` |" in (DOCS / "protocol.md").read_text()


def test_the_configuration_page_is_generated_from_the_current_config() -> None:
    generator = load_generator()
    assert generator.main(["--check"]) == 0, "docs/configuration.md is stale: run `python docs/_generate.py`"


@pytest.mark.parametrize("field", list(APIConfig.__struct_fields__))
def test_every_setting_has_a_row_with_a_description(field: str) -> None:
    rows = [line for line in (DOCS / "configuration.md").read_text().splitlines()
            if line.startswith(f"| `{field}`")]
    assert len(rows) == 1, f"{field}: {len(rows)} rows in docs/configuration.md"
    cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", rows[0])[1:-1]]
    assert cells[1] == f"`{env_variable(field)}`"
    assert len(cells[4]) > 10, f"{field} has no description: give it a docstring in llmgine_ws/config.py"


def test_a_field_docstring_replaces_its_stand_in() -> None:
    generator = load_generator()
    documented = {name for name, (_, doc) in generator.field_docs(
        (ROOT / "llmgine_ws" / "config.py").read_text()).items() if doc}
    stale = sorted(set(generator.UNDOCUMENTED_FIELDS) & documented)
    assert not stale, f"delete these from UNDOCUMENTED_FIELDS in docs/_generate.py (config.py documents them): {stale}"
    unknown = sorted(set(generator.UNDOCUMENTED_FIELDS) - set(APIConfig.__struct_fields__))
    assert not unknown, f"UNDOCUMENTED_FIELDS names fields APIConfig does not have: {unknown}"


def test_the_generator_notices_a_stale_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    generator = load_generator()
    page = tmp_path / "configuration.md"
    monkeypatch.setattr(generator, "PAGE", page)
    assert generator.main(["--check"]) == 1  # missing is stale
    assert generator.main([]) == 0
    assert generator.main(["--check"]) == 0
    page.write_text(page.read_text().replace("LLMGINE_API_MAX_SESSIONS", "LLMGINE_API_MAX_SESSION", 1))
    assert generator.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err


def test_every_variable_mentioned_exists() -> None:
    known = {env_variable(field) for field in APIConfig.__struct_fields__}
    unknown = {}
    for page in PAGES:
        for name in re.findall(r"LLMGINE_API_[A-Z0-9_]*[A-Z0-9]", page.read_text()):
            if name not in known:
                unknown.setdefault(name, page_id(page))
    assert not unknown, f"variables that do not exist: {unknown}"


# ----------------------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", prose(page), re.MULTILINE):
        base = slug(heading)
        anchor, n = base, 0
        while anchor in found:
            n += 1
            anchor = f"{base}-{n}"
        found.add(anchor)
    return found


def links(page: Path) -> Iterator[str]:
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
        if not re.match(r"[a-z]+:", target):
            yield target


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_between_pages_resolve(page: Path) -> None:
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            if resolved.parent == DOCS and resolved.name in WRITTEN_ELSEWHERE:
                continue
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(target)
    assert not broken, f"{page_id(page)}: broken links {broken}"


def test_every_page_is_reachable_from_the_index() -> None:
    index = set(links(DOCS / "index.md"))
    linked = {target.partition("#")[0] for target in index}
    orphans = sorted(page.name for page in DOCS.glob("*.md") if page.name not in linked | {"index.md"})
    assert not orphans, f"pages missing from docs/index.md: {orphans}"


def test_the_slug_rules() -> None:
    assert slug("Compatibility with the llmgineAPI (\"seed\") protocol") == \
        "compatibility-with-the-llmgineapi-seed-protocol"
    assert slug("From worker threads") == "from-worker-threads"
    assert slug("`GET /health`") == "get-health"
    assert slug("Sessions, `create_app` and [links](x.md)") == "sessions-create_app-and-links"


# ----------------------------------------------------------------------------- the README


def test_the_quickstart_has_the_two_commands_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = 'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest'
    assert test_command in ci
    quickstart = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    first = next(block for block in blocks(README) if block.code in quickstart)
    assert first.language == "bash"
    commands = re.findall(r"^python3 -m venv .*$", first.code, re.MULTILINE)
    assert commands == ["python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/llmgine-ws", test_command]


def test_the_readme_stays_an_introduction() -> None:
    readme = README.read_text()
    assert len(readme.splitlines()) <= 150, "move details to a page under docs/"
    assert "(docs/chat-demo.png)" in readme
    assert "(docs/index.md)" in readme
    first_python = python_blocks(README)[0]
    assert "ws://127.0.0.1:8000/api/ws" in first_python.code, "the snippet after the quickstart talks to its server"


def test_the_snippet_after_the_quickstart_needs_only_the_core_install() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {canonical(re.split(r"[<>=!~\[ ;]", dependency, maxsplit=1)[0]) for dependency in project["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    needed = set()
    sources = list((ROOT / "llmgine_ws" / "client").rglob("*.py"))
    assert sources, "the client package moved: point this test at it"
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "llmgine_ws":
                    needed.update(canonical(dist) for dist in distributions.get(top, [top]))
    assert needed <= core, f"the client needs {sorted(needed - core)}, which `pip install -e .` does not install"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


if __name__ == "__main__":  # pragma: no cover - a convenience for docs writers
    sys.exit(pytest.main([__file__, "-q"]))


LIMIT_FIELDS = [
    "max_message_size", "rate_limit", "rate_burst", "rate_limit_strikes", "user_rate_limit", "user_rate_burst",
    "max_connections", "max_connections_per_ip", "handshake_timeout", "max_header_bytes", "ws_per_message_deflate",
    "trusted_proxies", "max_sessions", "max_sessions_per_connection", "max_sessions_per_ip",
    "max_sessions_per_user", "max_inflight_requests", "max_inflight_bytes", "max_pending_requests",
    "outbound_queue_size", "outbound_queue_bytes", "send_grace", "broadcast_rate_limit", "broadcast_burst",
    "callback_timeout", "engine_start_timeout", "engine_stop_timeout", "server_request_timeout", "session_timeout",
    "engine_idle_timeout", "missed_pongs", "ping_interval", "drain_timeout", "shutdown_timeout",
]
"""Settings that bound what a client can make the server hold or do: each has a row in Security → Limits."""


@pytest.mark.parametrize("field", LIMIT_FIELDS)
def test_every_limit_is_in_the_security_limits_table(field: str) -> None:
    page = (DOCS / "security.md").read_text()
    table = page[page.index("## Limits"):page.index("### What one client can cost")]
    variable = env_variable(field).removeprefix("LLMGINE_API_")
    rows = [line for line in table.splitlines() if line.startswith("|") and f"`{variable}`" in line]
    assert field in APIConfig.__struct_fields__
    assert rows, f"{field} ({variable}) has no row in docs/security.md's Limits table"
