"""The browser client's resume (``llmgine-ws.js``), run in Node against the scripted fake resume server
(``client_resume_support``) behind a TCP proxy the test severs: a drop mid-command, a page "reload"
(a second client on the same ``sessionStorage`` after the first one's socket went away), a pending
question coming back, and a resume the server refuses. Chromium tests against the real server are in
``test_browser.py``.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator

import pytest

from .client_resume_support import FakeResumeServer, TcpProxy, tcp_proxy
from .test_client_unit import serve_in_loop
from .test_node_clients import BROWSER_CLIENT, ON_ERROR, REPORT, node

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (apt-get install nodejs)"),
]

STORAGE = """
// sessionStorage as a page has it (Node has none).
const items = new Map();
globalThis.sessionStorage = {
  getItem: (k) => (items.has(k) ? items.get(k) : null),
  setItem: (k, v) => { items.set(k, String(v)); },
  removeItem: (k) => { items.delete(k); },
};
const { LlmgineClient, StateLostError, connect } = await import(process.argv[3]);
const url = process.argv[2];
const options = { reconnect: { initialDelay: 10, maxDelay: 200 }, requestTimeout: 10000 };
"""


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeResumeServer, TcpProxy]]:
    server = FakeResumeServer()
    async with serve_in_loop(server.app) as base, tcp_proxy(int(base.rsplit(":", 1)[1])) as proxy:
        try:
            yield server, proxy
        finally:
            server.stop()


DROP_MID_COMMAND = """
const client = await connect(url, options);
const events = [];
let resumed = null;
client.on("resumed", (e) => { resumed = e.detail; });
const opens = [];
client.on("open", (e) => opens.push(e.detail));
const result = await client.command("s1", { n: 10, first: 5 }, {
  onEvent(event) {
    events.push(event.seq);
    if (events.length === 5) report("five", { appId: client.appId });
  },
});
report("done", { events, result, resumed, opens, state: client.state, resumedFlag: client.resumed,
                 appId: client.appId, stored: JSON.parse(sessionStorage.getItem("llmgine-ws:resume:" + url)) });
client.close();
report("closed", { stored: sessionStorage.getItem("llmgine-ws:resume:" + url) });
"""


async def test_drop_mid_command_every_event_once(fake: tuple[FakeResumeServer, TcpProxy]) -> None:
    server, proxy = fake
    url = f"{proxy.url}/ws"
    async with node(REPORT + ON_ERROR + STORAGE + DROP_MID_COMMAND, url, BROWSER_CLIENT.as_uri()) as script:
        five = await script.next_report("five")
        app = server.only_app()
        await app.wait(lambda: 0 in app.acks)  # opted in
        await proxy.sever()
        app.open("rest")
        done = await script.next_report("done")
        assert done["events"] == list(range(10)) and done["result"] == {"events": 10}
        assert done["resumed"]["appId"] == five["appId"] == done["appId"] == app.app_id
        assert done["resumedFlag"] is True and done["state"] == "open"
        assert [o["resumed"] for o in done["opens"]] == [True]  # the first open came before the listener
        assert done["stored"]["appId"] == app.app_id and done["stored"]["lastSeq"] >= 11
        assert done["stored"]["token"] == app.token  # rotated by the resume, kept for a reload
        assert len(app.executions) == 1  # the command was sent again after resume_res, run once
        assert (await script.next_report("closed"))["stored"] is None  # close(1000) forgets it
    await server.wait(lambda: app.ended)


async def test_reload_resumes_command_and_brings_the_question_back(fake: tuple[FakeResumeServer, TcpProxy]) -> None:
    server, proxy = fake
    # The reload happens in the script once both the third event and the question arrived.
    script = REPORT + ON_ERROR + STORAGE + """
const a = new LlmgineClient(url, { ...options, autoConnect: false });
let commandId = null;
let asked = false, three = false;
let unload = null;
const unloaded = new Promise((resolve) => { unload = resolve; });
const check = () => { if (asked && three) unload(); };
a.onServerRequest("user_input", () => { asked = true; report("asked_a"); check(); return new Promise(() => {}); });
await a.connect();
const onEvent = (event) => { if (event.seq === 2) { three = true; check(); } };
const running = a.command("s1", { n: 6, first: 3 }, { onEvent });
running.catch(() => {});
commandId = running.messageId;
a.request("ask").catch(() => {});
await unloaded;
// The page goes away: its socket closes as a navigation closes it (1001), its objects are gone.
const ws = a._ws;
a._detach(ws);
a._clearTimers();
ws.close(3001, "page unloaded");
report("unloaded", { appId: a.appId, commandId });

// The reloaded page: same sessionStorage, a new client.
const b = new LlmgineClient(url, options);
const events = [];
let result = null;
b.on("resumed", (e) => {
  report("resumed", e.detail);
  b.attach(commandId, { onEvent(event) { events.push(event.seq); } }).then((r) => { result = r; finish(); });
});
b.on("open", (e) => report("open", e.detail));
let answered = false;
b.onServerRequest("user_input", (data, { messageId }) => {
  report("asked_b", { prompt: data.prompt, messageId });
  answered = true;
  finish();
  return { user_input: "from the reloaded page" };
});
function finish() { if (answered && result) report("done", { events, result, appId: b.appId, resumed: b.resumed }); }
"""
    async with node(script, f"{proxy.url}/ws", BROWSER_CLIENT.as_uri()) as page:
        await page.next_report("asked_a")
        app = server.only_app()
        unloaded = await page.next_report("unloaded")
        assert unloaded["appId"] == app.app_id
        resumed = await page.next_report("resumed")
        assert resumed["appId"] == app.app_id
        opened = await page.next_report("open")
        assert opened["resumed"] is True and opened["reconnected"] is False
        asked = await page.next_report("asked_b")  # the question the first page had open comes back
        assert asked["prompt"] == "well?"
        app.open("rest")
        done = await page.next_report("done")
        assert done["events"] == [3, 4, 5] and done["result"] == {"events": 6}
        assert done["appId"] == app.app_id and done["resumed"] is True
        (mid,) = app.responses
        assert mid == asked["messageId"]
        assert [r["data"]["user_input"] for r in app.responses[mid]] == ["from the reloaded page"]
    assert 3001 in server.close_codes


STATE_LOST = """
const client = await connect(url, options);
const lost = [];
client.on("statelost", (e) => lost.push(
  { reason: e.detail.reason, previous: e.detail.previousAppId, app: e.detail.appId }));
const first = client.appId;
const waiting = client.request("gated", { gate: "never" });
report("sent", { appId: first });
try {
  await waiting;
  report("error", { error: "the request was answered" });
} catch (error) {
  report("rejected",
    { name: error.name, code: error.code, reason: error.reason, isStateLost: error instanceof StateLostError });
}
const pong = await client.request("ping");
report("done", { lost, first, now: client.appId, resumed: client.resumed, pong: pong.type });
client.close();
"""


async def test_state_lost(fake: tuple[FakeResumeServer, TcpProxy]) -> None:
    server, proxy = fake
    async with node(REPORT + ON_ERROR + STORAGE + STATE_LOST, f"{proxy.url}/ws", BROWSER_CLIENT.as_uri()) as script:
        sent = await script.next_report("sent")
        app = server.only_app()
        await app.wait(lambda: len(app.executions) == 1 and 0 in app.acks)
        server.fail_next_resume = "expired"
        await proxy.sever()
        rejected = await script.next_report("rejected")
        assert rejected == {"event": "rejected", "name": "StateLostError", "code": "STATE_LOST", "reason": "expired",
                            "isStateLost": True}
        done = await script.next_report("done")
        assert done["lost"] == [{"reason": "expired", "previous": sent["appId"], "app": done["now"]}]
        assert done["now"] != done["first"] and done["resumed"] is False and done["pong"] == "ping_res"
