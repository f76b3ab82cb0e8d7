"""JavaScript clients in Node against a real server: the seed document's own TypeScript frontend
example, and the browser client ``llmgine-ws.js``.

``tests/seed/frontend_example.ts`` is the "Frontend Integration" example of the seed document
(``seed-llmgine-api-module.md``), byte for byte. The test strips its types (and nothing else) and
runs it in Node against the example app. The seed's snippet is a fragment of a page: it never opens
its ``websocket``, calls a ``handleNotification`` it does not show, and leaves ``showInputDialog`` /
``showNotification`` to the page. The harness supplies exactly those, between the class and the
usage code, and reports what happens as JSON lines on stdout; the test drives the backend side
(an HTTP route that calls ``send_to_app_and_wait``, a notification) and checks the outcome.

Node 20 has ``WebSocket`` behind ``--experimental-websocket``; without node the tests are skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from anyio.streams.text import TextReceiveStream

from llmgine_ws import APIConfig, Extensions, HandlerContext, create_app

from .support import serve
from .test_examples import load_example

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: the seed frontend example and "
                       "the browser client cannot be run (apt-get install nodejs)"),
]

ROOT = Path(__file__).resolve().parent.parent
SEED_EXAMPLE = Path(__file__).resolve().parent / "seed" / "frontend_example.ts"
SEED_SPEC = Path("/work/shared/spec/seed-llmgine-api-module.md")
BROWSER_CLIENT = ROOT / "llmgine_ws" / "static" / "llmgine-ws.js"
NODE = ["node", "--experimental-websocket", "--no-warnings", "--input-type=module", "-"]


# ------------------------------------------------------------------------------------- type stripping


def _split_params(params: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in params:
        if char in "(<[{":
            depth += 1
        elif char in ")>]}" and not (char == ">" and current.endswith("=")):
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current] if current.strip() else parts


def strip_types(source: str) -> str:
    """The seed's TypeScript as JavaScript: interfaces, ``private``, generics on ``new Map``, parameter
    and return annotations removed; every other character kept."""
    source = re.sub(r"^interface \w+ \{\n.*?^\}\n", "", source, flags=re.MULTILINE | re.DOTALL)
    lines = []
    for line in source.splitlines():
        line = re.sub(r"^(\s*)private ", r"\1", line)
        line = re.sub(r"new Map<.*>\(\)", "new Map()", line)
        method = re.match(r"^(\s*)(async )?(\w+)\((.*)\)(: .+)? \{$", line)
        if method and method.group(3) not in ("if", "for", "while", "switch", "catch"):
            indent, is_async, name, params = method.group(1), method.group(2) or "", method.group(3), method.group(4)
            names = [param.split(":", 1)[0].strip() for param in _split_params(params)]
            line = f"{indent}{is_async}{name}({', '.join(names)}) {{"
        lines.append(line)
    javascript = "\n".join(lines) + "\n"
    leftovers = re.findall(r"\binterface\b|\bprivate\b|: (?:string|any|void|boolean)\b|Promise<", javascript)
    assert not leftovers, f"types left after stripping: {leftovers}"
    return javascript


def test_the_seed_example_is_the_seeds_own_code() -> None:
    if not SEED_SPEC.exists():
        pytest.skip(f"the seed document is not at {SEED_SPEC}")
    section = SEED_SPEC.read_text().split("## 📱 Frontend Integration", 1)[1]
    block = section.split("```typescript\n", 1)[1].split("\n```", 1)[0] + "\n"
    assert SEED_EXAMPLE.read_text() == block


def test_type_stripping_keeps_the_code() -> None:
    javascript = strip_types(SEED_EXAMPLE.read_text())
    assert "async sendMessage(type, data) {" in javascript
    assert "registerServerMessageHandler(type, handler) {" in javascript
    assert "pendingRequests = new Map();" in javascript
    assert 'client.sendServerResponse(message.message_id, "user_input", {' in javascript
    assert 'app_id: "my-frontend-app"' in javascript


# ------------------------------------------------------------------------------------- running node


class NodeScript:
    """A node process running a module from stdin, reporting JSON lines on stdout."""

    def __init__(self, process: anyio.abc.Process) -> None:
        self.process = process
        assert process.stdout is not None
        self._lines = TextReceiveStream(process.stdout)
        self._buffer = ""
        self.reports: list[dict[str, Any]] = []

    async def next_report(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next report of kind ``event`` (earlier ones of other kinds are kept in ``reports``)."""
        with anyio.fail_after(timeout):
            while True:
                while "\n" in self._buffer:
                    line, self._buffer = self._buffer.split("\n", 1)
                    if line.strip():
                        report = json.loads(line)
                        self.reports.append(report)
                        if report["event"] == "error":
                            raise AssertionError(f"the node script failed: {report['error']}")
                        if report["event"] == event:
                            return report
                try:
                    self._buffer += await self._lines.receive()
                except anyio.EndOfStream:
                    raise AssertionError(f"node exited before reporting {event!r}; reports: {self.reports}") from None

    def reported(self, event: str) -> list[dict[str, Any]]:
        return [report for report in self.reports if report["event"] == event]


@asynccontextmanager
async def node(script: str, *args: str) -> AsyncIterator[NodeScript]:
    process = await anyio.open_process([*NODE, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE)
    async with process:
        assert process.stdin is not None
        await process.stdin.send(script.encode())
        await process.stdin.aclose()
        try:
            yield NodeScript(process)
        finally:
            if process.returncode is None:
                process.kill()
            with anyio.fail_after(10):
                await process.wait()


REPORT = "const report = (event, fields = {}) => console.log(JSON.stringify({ event, ...fields }));\n"
ON_ERROR = """
const fail = (error) => { report("error", { error: String((error && error.stack) || error) }); process.exit(1); };
process.on("unhandledRejection", fail);
process.on("uncaughtException", fail);
"""


# ------------------------------------------------------------------------------------- the seed's frontend

SEED_GLUE = """
// ---- What the seed's snippet leaves to the page (the harness) ----
const websocket = new WebSocket(process.argv[2]);
const early = [];  // frames that arrive before the seed's client exists (one socket read may hold several)
let onFrame = null;
websocket.onmessage = (event) => {
  const message = JSON.parse(event.data);
  if (onFrame) onFrame(message); else early.push(message);
};
const connected = await new Promise((resolve, reject) => {
  onFrame = (message) => { onFrame = null; resolve(message); };
  websocket.onerror = () => reject(new Error("the WebSocket failed to open"));
});
report("connected", { app_id: connected.data.app_id, type: connected.type });
WebSocketClient.prototype.websocket = websocket;  // the class uses this.websocket, never opened in the seed
WebSocketClient.prototype.handleNotification = async function (message) {  // called, not shown, by the seed
  await this.serverMessageHandlers.get("notification")?.(message);
};
globalThis.showInputDialog = async (prompt) => { report("asked", { prompt }); return `answer to: ${prompt}`; };
globalThis.showNotification = (text) => report("notification", { text });
// The seed's client is created just below; from then on every frame goes to its handleMessage.
queueMicrotask(() => {
  onFrame = (message) => client.handleMessage(message);
  early.splice(0).forEach(onFrame);
});
websocket.onclose = () => { report("closed"); process.exit(0); };
// ---- The seed's usage code, as written ----
"""

SEED_EPILOGUE = """
// ---- The harness again: report, then use the seed's own sendMessage ----
report("create_session", { response: sessionResponse });
const pong = await client.sendMessage("ping", { timestamp: "2024-01-01T12:00:00.000Z" });
report("ping", { response: pong });
report("ready");
"""


def seed_script() -> str:
    javascript = strip_types(SEED_EXAMPLE.read_text())
    cut = javascript.index("// Usage\n")
    return REPORT + ON_ERROR + javascript[:cut] + SEED_GLUE + javascript[cut:] + SEED_EPILOGUE


async def test_the_seeds_own_frontend_runs_against_the_example_app() -> None:
    example = load_example("custom_engine_example")
    app = example.build_app(APIConfig(ping_interval=0, admin_token="admin-secret"))
    async with serve(app) as server, node(seed_script(), server.ws_url) as frontend, \
            httpx.AsyncClient(base_url=server.http_url, headers={"Authorization": "Bearer admin-secret"}) as http:
        connected = await frontend.next_report("connected")
        app_id = connected["app_id"]
        assert connected["type"] == "connected"

        created = (await frontend.next_report("create_session"))["response"]
        assert created["type"] == "create_session_res", created  # was FORBIDDEN for "my-frontend-app"
        session = server.runtime.sessions.get(created["data"]["session_id"])
        assert session is not None and session.app_id == app_id  # the caller's, whatever app_id said
        pong = (await frontend.next_report("ping"))["response"]
        assert (pong["type"], pong["data"]) == ("ping_res", {"timestamp": "2024-01-01T12:00:00.000Z"})
        await frontend.next_report("ready")
        # The example app's connect callback greets every app with a notification.
        assert frontend.reported("notification")[0]["text"].startswith("Welcome!")

        # A backend send_to_app_and_wait (from an HTTP route), answered by the seed's user_input handler.
        answer = await http.post(f"/demo/ask/{app_id}", json={"prompt": "Your name?", "timeout": 5})
        assert answer.json() == {"answer": "answer to: Your name?"}
        assert (await frontend.next_report("asked"))["prompt"] == "Your name?"

        # A backend notification reaches the seed's notification handler.
        await app.state.custom_backend.send_user_notification(app_id, "Your file is ready")
        assert (await frontend.next_report("notification"))["text"] == "Your file is ready"


# ------------------------------------------------------------------------------------- the browser client

BROWSER_SCRIPT = """
const { connect } = await import(process.argv[3]);
const client = await connect(process.argv[2], { reconnect: false });
client.onServerRequest("ask_color", async (data, { message }) => (
  { color: "blue", about: data.question, frame: message.type }));
client.onMessage("fyi", (data) => report("fyi", { data }));
const custom = await client.request("ask_me", { message_type: "ask_color", data: { question: "sky?" } });
report("custom", { data: custom.data });
const classic = await client.request("ask_me", {
  message_type: "server_request", data: { request_type: "ask_color", question: "sea?" } });
report("classic", { data: classic.data });
await client.request("tell_me", {});
client.close();
report("done");
"""


async def ask_me(data: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
    answer = await ctx.ask(data["message_type"], data.get("data"), timeout=5)
    return answer.data


async def tell_me(data: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
    await ctx.send("fyi", {"note": "no answer expected"})
    return {}


async def test_the_browser_client_answers_server_requests_of_a_custom_type() -> None:
    extensions = Extensions()
    extensions.register_handler("ask_me", dict[str, Any], ask_me)
    extensions.register_handler("tell_me", dict[str, Any], tell_me)
    async with serve(create_app(APIConfig(ping_interval=0), extensions)) as server, \
            node(REPORT + ON_ERROR + BROWSER_SCRIPT, server.ws_url, BROWSER_CLIENT.as_uri()) as browser:
        custom = await browser.next_report("custom")
        assert custom["data"] == {"response_type": "ask_color", "color": "blue", "about": "sky?", "frame": "ask_color"}
        classic = await browser.next_report("classic")
        assert classic["data"] == {"response_type": "ask_color", "color": "blue", "about": "sea?",
                                   "frame": "server_request"}
        # A custom type the backend sends with send_to_app (no answer expected) stays an ordinary message.
        assert (await browser.next_report("fyi"))["data"] == {"note": "no answer expected"}
        await browser.next_report("done")
