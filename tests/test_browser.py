"""The browser client and the chat demo, in headless Chromium (Debian's /usr/bin/chromium) via Playwright.

Every test runs a real uvicorn server in the test's own event loop and a real page. Nothing sleeps to
synchronise: the tests wait on page conditions and server events, each bounded by a timeout.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import msgspec
import pytest
from starlette.applications import Starlette

from llmgine_ws import APIConfig, Extensions, HandlerContext, ServerRequestFailed, create_app

from .support import LiveServer, listening_socket, serve
from .test_examples import load_example

CHROMIUM = Path(os.environ.get("LLMGINE_WS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
NO_BROWSER = (
    f"!!! BROWSER TESTS SKIPPED: no Chromium at {CHROMIUM}. Install Debian's package "
    "(apt-get install -y chromium; .ci/run does it) to run them !!!"
)

pytestmark = [pytest.mark.anyio, pytest.mark.skipif(not CHROMIUM.exists(), reason=NO_BROWSER)]

playwright_api = pytest.importorskip("playwright.async_api", reason="!!! BROWSER TESTS SKIPPED: playwright is not "
                                     "installed (pip install -e '.[test]') !!!")
Browser = playwright_api.Browser
Page = playwright_api.Page

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WAIT = 10_000  # ms: the bound on every page condition


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """One event loop for the module, so one browser serves every test."""
    return "asyncio"


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    context = await browser.new_context(viewport={"width": 1000, "height": 720})
    page = await context.new_page()
    page.set_default_timeout(WAIT)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
    finally:
        await context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return load_example("custom_engine_example")


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    return load_example("chat/app")


class WaitForever(msgspec.Struct, frozen=True):
    label: str = ""


class Probe:
    """A test app's handle on what its handlers saw."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.cancelled = anyio.Event()


def client_app(example: ModuleType, probe: Probe | None = None, **config: Any) -> Starlette:
    """An app with the example chat engine and a ``wait_forever`` message (whose handler never answers)."""
    probe = probe or Probe()

    async def wait_forever(data: WaitForever, ctx: HandlerContext) -> dict[str, Any]:
        probe.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            probe.cancelled.set()
        return {}

    extensions = Extensions()
    extensions.register_engine("chat", example.ChatEngine)
    extensions.register_handler("wait_forever", WaitForever, wait_forever)
    config.setdefault("ping_interval", 0)
    return create_app(APIConfig(**config), extensions)


async def open_client(page: Any, server: LiveServer, options: dict[str, Any] | None = None) -> str:
    """Load the client module in a page of the server's origin; ``window.client`` connected. Returns the app_id."""
    await page.goto(f"{server.http_url}/health")
    app_id: str = await page.evaluate(
        """async (options) => {
            window.L = await import('/api/client/llmgine-ws.js');
            window.log = [];
            window.client = new L.LlmgineClient('/api/ws', options);
            window.client.on('protocolerror', (e) => window.log.push(['protocolerror', e.detail.error.code]));
            return await window.client.connect({ timeout: 5000 });
        }""",
        options or {},
    )
    return app_id


# ------------------------------------------------------------------ the client module


async def test_connect_session_ping_status_and_error_envelopes(page: Any, example: ModuleType) -> None:
    async with serve(client_app(example)) as server:
        app_id = await open_client(page, server)
        messaging = server.runtime.messaging
        assert messaging.is_app_connected(app_id)
        result = await page.evaluate("""async () => {
            const c = window.client;
            const sessionId = await c.createSession();
            const rtt = await c.ping();
            const status = await c.status(sessionId);
            const errors = [];
            for (const attempt of [() => c.request('no_such_type', {}), () => c.status('not-a-session')]) {
                try { await attempt(); errors.push('resolved'); }
                catch (e) { errors.push({ name: e.name, code: e.code, server: e instanceof L.ServerError,
                                          base: e instanceof L.LlmgineError, details: e.details }); }
            }
            return { sessionId, rtt, status, errors, protocol: c._ws.protocol, state: c.state, appId: c.appId };
        }""")
        assert result["appId"] == app_id and result["state"] == "open"
        assert result["protocol"] == "llmgine.v1"
        assert messaging.get_app_sessions(app_id) == [result["sessionId"]]
        assert result["rtt"] >= 0
        assert result["status"]["session_id"] == result["sessionId"]
        unknown, missing = result["errors"]
        assert unknown["code"] == "INVALID_MESSAGE_TYPE" and unknown["server"] and unknown["base"]
        assert unknown["name"] == "ServerError" and "wait_forever" in unknown["details"]["known_types"]
        assert missing["code"] == "SESSION_NOT_FOUND"
        assert await page.evaluate("window.log") == []


async def test_token_travels_as_a_subprotocol_and_is_never_echoed(page: Any, example: ModuleType) -> None:
    inner = client_app(example)
    offered: list[list[str]] = []

    async def recorder(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            offered.append(list(scope.get("subprotocols") or []))
        await inner(scope, receive, send)

    async with serve(recorder) as server:
        await open_client(page, server, {"token": "eyJhbGci.payload-1_x"})
        selected = await page.evaluate("window.client._ws.protocol")
        await page.evaluate("""async () => {
            window.second = new L.LlmgineClient('/api/ws', { token: async () => 'fresh-token', autoConnect: false });
            await window.second.connect({ timeout: 5000 });
        }""")
        bad = await page.evaluate("""() => {
            try { new L.LlmgineClient('/api/ws', { token: 'not a token!', autoConnect: false }); return 'accepted'; }
            catch (e) { return e.code; }
        }""")
    assert offered == [["llmgine.v1", "llmgine.auth.eyJhbGci.payload-1_x"], ["llmgine.v1", "llmgine.auth.fresh-token"]]
    assert selected == "llmgine.v1"
    assert bad == "INVALID_TOKEN"


async def test_token_authenticates_a_browser_against_a_secured_server(page: Any, example: ModuleType) -> None:
    from llmgine_ws.auth import mint_token

    secret = "browser-test-secret"
    async with serve(client_app(example, token_secret=secret)) as server:
        app_id = await open_client(page, server, {"token": mint_token(secret, "browser-user")})
        assert server.runtime.hub.get(app_id).user_id == "browser-user"  # type: ignore[union-attr]
        outcome = await page.evaluate("""async (token) => {
            const intruder = new L.LlmgineClient('/api/ws', { token, autoConnect: false, reconnect: false });
            try { await intruder.connect({ timeout: 5000 }); return 'connected'; }
            catch (e) { return e.name; }
        }""", mint_token("a-guessed-secret", "mallory"))
        assert outcome != "connected"
        assert len(server.runtime.hub) == 1  # the refused handshake left nothing behind


async def test_server_request_answered_by_a_page_handler(page: Any, example: ModuleType) -> None:
    async with serve(client_app(example)) as server:
        app_id = await open_client(page, server)
        await page.evaluate("""() => {
            client.onServerRequest('user_input', async (data, ctx) => ({ user_input: 'page says: ' + data.prompt,
                                                                          aborted: ctx.signal.aborted }));
            client.onServerRequest('explode', () => { throw new Error('no can do'); });
        }""")
        messaging = server.runtime.messaging
        answer = await messaging.send_to_app_and_wait(
            app_id, "server_request", {"request_type": "user_input", "prompt": "your name?"}, timeout=5)
        assert answer.data == {"response_type": "user_input", "user_input": "page says: your name?", "aborted": False}
        with pytest.raises(ServerRequestFailed) as failure:
            await messaging.send_to_app_and_wait(app_id, "server_request", {"request_type": "explode"}, timeout=5)
        assert failure.value.data["error"] == "no can do"
        assert failure.value.data["response_type"] == "explode"


async def test_a_request_type_without_handler_is_refused_at_once(page: Any, example: ModuleType) -> None:
    async with serve(client_app(example)) as server:
        app_id = await open_client(page, server)
        started = anyio.current_time()
        with pytest.raises(ServerRequestFailed) as failure:
            await server.runtime.messaging.send_to_app_and_wait(
                app_id, "server_request", {"request_type": "mystery", "prompt": "?"}, timeout=30)
        assert anyio.current_time() - started < 2.0  # not the 30 s timeout
        assert "no handler for request type 'mystery'" in failure.value.data["error"]
        assert server.runtime.hub.pending_request_count() == 0


async def test_a_withdrawn_server_request_aborts_its_handler(page: Any, example: ModuleType) -> None:
    async with serve(client_app(example)) as server:
        app_id = await open_client(page, server)
        await page.evaluate("""() => {
            client.on('requestcancelled', (e) => log.push(['event', e.detail.reason]));
            client.onServerRequest('user_input', (data, { signal }) => new Promise((resolve, reject) => {
                signal.addEventListener('abort', () => {
                    log.push(['aborted', signal.reason.code, signal.reason.details.reason]);
                    resolve({ user_input: 'too late' });   // must not be sent: nobody waits for it
                });
            }));
        }""")
        with pytest.raises(TimeoutError):
            await server.runtime.messaging.send_to_app_and_wait(
                app_id, "server_request", {"request_type": "user_input", "prompt": "quick!"}, timeout=0.2)
        await page.wait_for_function("log.length === 2")
        await page.evaluate("client.ping()")  # a late server_response would have drawn an error before this
        assert await page.evaluate("log") == [["aborted", "REQUEST_WITHDRAWN", "timeout"], ["event", "timeout"]]
        assert server.runtime.hub.pending_request_count() == 0


async def test_notifications_and_custom_server_messages_reach_the_page(page: Any, example: ModuleType) -> None:
    async with serve(client_app(example)) as server:
        app_id = await open_client(page, server)
        await page.evaluate("""() => {
            client.onNotification((d) => log.push(['all', d.notification_type, d.message]));
            client.onNotification('build', (d) => log.push(['build', d.message]));
            client.onMessage('progress', (d, m) => log.push(['progress', d.percent, m.server_initiated]));
        }""")
        messaging = server.runtime.messaging
        await messaging.send_to_app(app_id, "notification", {"notification_type": "build", "message": "done"})
        await messaging.send_to_app(app_id, "progress", {"percent": 50})
        await page.wait_for_function("log.length === 3")
        assert await page.evaluate("log") == [["build", "done"], ["all", "build", "done"], ["progress", 50, True]]


async def test_engine_commands_stream_complete_and_cancel(page: Any, example: ModuleType) -> None:
    async with serve(client_app(example)) as server:
        await open_client(page, server)
        done = await page.evaluate("""async () => {
            const sessionId = await client.createSession();
            const engine = await client.createEngine(sessionId, 'chat', { token_delay: 0 });
            const seqs = [], text = [];
            let deltas = 0;
            const result = await client.command(sessionId, { text: 'Hello' }, {
                onEvent: (e) => {
                    seqs.push(e.seq);
                    if (e.event_type === 'token') { text.push(e.payload.text); deltas += e.coalesced ?? 1; }
                } });
            return { engine, result, seqs, deltas, text: text.join('') };
        }""")
        assert done["engine"]["engine_type"] == "chat"
        assert done["result"] == {"reply": "Hello, I am Ada. You said: Hello", "turn": 1}
        # Streamed with no delay, the 7 tokens arrive coalesced (engine_event_coalesce_ms): seq counts
        # the frames with no gap, ``coalesced`` the deltas each frame carries.
        assert done["seqs"] == list(range(len(done["seqs"]))) and done["deltas"] == 7
        assert len(done["seqs"]) < 7
        assert done["text"].strip() == done["result"]["reply"]

        cancelled = await page.evaluate("""async () => {
            const sessionId = await client.createSession();
            await client.createEngine(sessionId, 'chat', { token_delay: 30 });
            const outcome = (p) => p.then((r) => ['resolved', r], (e) => [e.name, e.code, e.status ?? null]);
            // 1. through an AbortSignal, once the stream has started
            const controller = new AbortController();
            const first = client.command(sessionId, { text: 'a b c d e f' }, {
                signal: controller.signal, onEvent: () => controller.abort() });
            const viaSignal = await outcome(first);
            // 2. through cancel(messageId)
            let started;
            const streaming = new Promise((resolve) => { started = resolve; });
            const second = client.command(sessionId, { text: 'g h i' }, { onEvent: started });
            await streaming;
            const cancelRes = await client.cancel(second.messageId);
            const viaCancel = await outcome(second);
            // 3. a command for a session without an engine
            const bare = await client.createSession();
            const noEngine = await outcome(client.command(bare, { text: 'x' }));
            // 4. an already aborted signal sends nothing
            const aborted = await outcome(client.command(bare, 'x', { signal: AbortSignal.abort() }));
            return { viaSignal, cancelRes, viaCancel, noEngine, aborted, messageId: typeof second.messageId };
        }""")
        assert cancelled["viaSignal"] == ["CommandError", "COMMAND_CANCELLED", "cancelled"]
        assert cancelled["cancelRes"]["cancelled"] is True
        assert cancelled["viaCancel"] == ["CommandError", "COMMAND_CANCELLED", "cancelled"]
        assert cancelled["noEngine"] == ["ServerError", "ENGINE_NOT_FOUND", None]
        assert cancelled["aborted"] == ["AbortedError", "ABORTED", None]
        assert cancelled["messageId"] == "string"
        assert await page.evaluate("log") == []


async def test_server_pings_are_answered_automatically(page: Any, example: ModuleType) -> None:
    # Two unanswered pings close a connection: surviving five proves the client answers them.
    async with serve(client_app(example, ping_interval=0.05, missed_pongs=2)) as server:
        app_id = await open_client(page, server)
        await page.evaluate("""() => {
            window.pings = 0;
            client.onMessage('server_ping', () => { window.pings += 1; });
        }""")
        await page.wait_for_function("window.pings >= 5")
        assert await page.evaluate("client.state") == "open"
        assert server.runtime.messaging.is_app_connected(app_id)


async def test_timeouts_aborts_and_close_reject_pending_promises(page: Any, example: ModuleType) -> None:
    probe = Probe()
    async with serve(client_app(example, probe)) as server:
        await open_client(page, server)
        timed_out = await page.evaluate("""async () => {
            try { await client.request('wait_forever', {}, { timeout: 100 }); return 'resolved'; }
            catch (e) { return [e.name, e.code, e instanceof L.RequestTimeoutError]; }
        }""")
        assert timed_out == ["RequestTimeoutError", "TIMEOUT", True]
        with anyio.fail_after(5):
            await probe.cancelled.wait()  # the client told the server to stop the work it gave up on
        results = await page.evaluate("""async () => {
            const outcome = (p) => p.then(() => 'resolved', (e) => [e.name, e.code]);
            const controller = new AbortController();
            const aborted = client.request('wait_forever', {}, { signal: controller.signal, timeout: 0 });
            controller.abort('enough');
            const pending = outcome(client.request('wait_forever', { label: 'pending' }, { timeout: 0 }));
            client.close();
            const afterClose = await outcome(client.request('ping', {}));
            return { aborted: await outcome(aborted), pending: await pending, afterClose, state: client.state };
        }""")
        assert results == {"aborted": ["AbortedError", "ABORTED"], "pending": ["DisconnectedError", "CLOSED"],
                           "afterClose": ["DisconnectedError", "NOT_CONNECTED"], "state": "closed"}
        assert await page.evaluate("log") == []


async def test_backoff_grows_exponentially_with_jitter_and_gives_up(page: Any, example: ModuleType) -> None:
    async with serve(client_app(example)) as server:
        await open_client(page, server)
        result = await page.evaluate("""async () => {
            // A WebSocket that always fails, and one that opens but never says `connected`.
            class Refused extends EventTarget {
                constructor() { super(); this.readyState = 0; setTimeout(() => { this.readyState = 3;
                    this.onclose?.({ code: 1006, reason: '', wasClean: false }); }, 0); }
                close() {}
            }
            class Silent extends EventTarget { constructor() { super(); this.readyState = 1; } close() {} send() {} }
            const random = Math.random;
            Math.random = () => 0.5;  // jitter removes 0.5 × 0.5 = 25 % of each delay
            try {
                const events = [];
                const c = new L.LlmgineClient('/api/ws', { WebSocket: Refused, autoConnect: false,
                    reconnect: { initialDelay: 8, factor: 2, maxDelay: 40, jitter: 0.5, maxRetries: 4 } });
                for (const name of ['connecting', 'reconnecting', 'closed']) {
                    c.on(name, (e) => events.push([name, e.detail]));
                }
                const outcome = await c.connect().then(() => 'open', (e) => [e.name, e.code]);
                const silent = new L.LlmgineClient('/api/ws',
                                                   { WebSocket: Silent, connectTimeout: 20, reconnect: false });
                const lost = await new Promise((resolve) => silent.on('disconnect', (e) => resolve(e.detail)));
                return { outcome, events, lost, state: silent.state };
            } finally { Math.random = random; }
        }""")
    delays = [detail["delay"] for name, detail in result["events"] if name == "reconnecting"]
    assert delays == [6, 12, 24, 30]  # 8, 16, 32, 40 (capped at maxDelay) minus 25 % jitter
    assert [name for name, _ in result["events"]].count("connecting") == 5
    assert result["events"][-1] == ["closed", {"code": 1006, "reason": ""}]
    assert result["outcome"] == ["DisconnectedError", "CLOSED"]
    assert result["lost"]["code"] == 4008 and "connected" in result["lost"]["reason"]
    assert result["state"] == "closed"


async def test_server_restart_rejects_pending_promises_and_the_client_reconnects(
        page: Any, example: ModuleType) -> None:
    sock = listening_socket()
    probe = Probe()
    try:
        async with serve(client_app(example, probe), sock=sock) as first:
            # Without resume: what waited fails at the drop (with resume it waits for the resume, and a
            # restarted server cannot resume it: see test_browser_client_resume.py).
            first_id = await open_client(page, first, {"reconnect": {"initialDelay": 50, "maxDelay": 200},
                                                       "resume": False})
            await page.evaluate("""() => {
                window.states = [];
                client.on('statechange', (e) => states.push(e.detail.state));
                client.on('open', (e) => log.push(['open', e.detail.reconnected]));
                window.outcome = client.request('wait_forever', {}, { timeout: 0 })
                    .then(() => 'resolved', (e) => [e.name, e.code, e instanceof L.DisconnectedError]);
            }""")
            with anyio.fail_after(5):
                await probe.started.wait()
        # The server is gone (the socket still listens: reconnect attempts wait in its backlog).
        assert await page.evaluate("window.outcome") == ["DisconnectedError", "DISCONNECTED", True]
        await page.wait_for_function("client.state === 'reconnecting' || client.state === 'connecting'")
        async with serve(client_app(example), sock=sock) as second:
            await page.wait_for_function("client.state === 'open'")
            second_id = await page.evaluate("client.appId")
            assert second_id != first_id
            assert second.runtime.messaging.is_app_connected(second_id)
            session_id = await page.evaluate("client.createSession()")
            assert second.runtime.messaging.get_app_sessions(second_id) == [session_id]
            states = await page.evaluate("states")
            assert states[0] == "reconnecting" and states[-1] == "open" and "connecting" in states
            assert await page.evaluate("log") == [["open", True]]
    finally:
        sock.close()


async def test_server_restart_with_resume_waits_then_state_lost(page: Any, example: ModuleType) -> None:
    """With resume (the default), a pending request waits for the new connection; the restarted server
    does not know the app, so it rejects with StateLostError and ``statelost`` fires."""
    sock = listening_socket()
    probe = Probe()
    try:
        # A short drain: the server would wait its default 10 s for the request that never ends.
        async with serve(client_app(example, probe, drain_timeout=0.2), sock=sock) as first:
            first_id = await open_client(page, first, {"reconnect": {"initialDelay": 50, "maxDelay": 200}})
            assert await page.evaluate("client.resumable")
            await page.evaluate("""() => {
                client.on('statelost', (e) => log.push(['statelost', e.detail.reason, e.detail.previousAppId]));
                client.on('open', (e) => log.push(['open', e.detail.reconnected, e.detail.resumed]));
                window.outcome = client.request('wait_forever', {}, { timeout: 0 })
                    .then(() => 'resolved', (e) => [e.name, e.code, e.reason, e instanceof L.StateLostError]);
            }""")
            with anyio.fail_after(5):
                await probe.started.wait()
        await page.wait_for_function("client.state === 'reconnecting' || client.state === 'connecting'")
        async with serve(client_app(example), sock=sock) as second:
            await page.wait_for_function("client.state === 'open'")
            assert await page.evaluate("window.outcome") == ["StateLostError", "STATE_LOST", "unknown", True]
            second_id = await page.evaluate("client.appId")
            assert second_id != first_id and second.runtime.messaging.is_app_connected(second_id)
            assert await page.evaluate("log") == [["statelost", "unknown", first_id], ["open", True, False]]
            assert await page.evaluate("client.resumed") is False
    finally:
        sock.close()


# ------------------------------------------------------------------ the demo page


async def demo_page(page: Any, server: LiveServer, query: str = "token_delay=0") -> None:
    await page.goto(f"{server.http_url}/?{query}")
    await page.wait_for_selector("[data-testid=conn-state][data-state=open]")
    await page.wait_for_function("window.chatDemo.sessionId !== null")


def last_reply(page: Any) -> Any:
    return page.locator("[data-testid=message-assistant]").last


async def test_demo_streams_the_reply_and_asks_before_the_tool_call(page: Any, demo: ModuleType) -> None:
    async with serve(demo.build_demo_app(APIConfig(ping_interval=0))) as server:
        await demo_page(page, server, "token_delay=0.02")
        # Record every text the reply bubble shows while it streams.
        await page.evaluate("""() => {
            window.frames_seen = [];
            new MutationObserver(() => {
                const bubble = [...document.querySelectorAll('[data-testid=message-assistant] .bubble')].at(-1);
                if (bubble && frames_seen.at(-1) !== bubble.textContent) frames_seen.push(bubble.textContent);
            }).observe(document.querySelector('[data-testid=transcript]'),
                       { subtree: true, childList: true, characterData: true });
        }""")
        await page.fill("[data-testid=input]", "What's the weather in Paris?")
        await page.press("[data-testid=input]", "Enter")
        dialog = page.locator("dialog[open]")
        await dialog.wait_for()
        question = await dialog.locator(".dialog-text").text_content()
        assert question == "Look up the weather in Paris with the weather tool?"
        await dialog.locator("button[data-option=yes]").click()
        await page.wait_for_selector("[data-testid=message-assistant][data-status=completed]")
        reply = last_reply(page)
        assert await reply.locator(".bubble").text_content() == "I checked for you: it is 21°C and sunny in Paris."
        assert await reply.locator(".event").all_text_contents() == ["⚙ weather(Paris)",
                                                                     "✓ it is 21°C and sunny in Paris"]
        frames = [f for f in await page.evaluate("frames_seen") if f]
        # Progressively: many partial renderings, each extending the previous one (tokens 20 ms
        # apart, coalesced within 25 ms: a rendering may show one token or two more).
        assert len(frames) >= 5, frames
        assert all(later.startswith(earlier.rstrip()) for earlier, later in itertools.pairwise(frames))
        assert await page.locator("dialog").count() == 0
        assert await page.locator("[data-testid=message-user]").text_content() == "YouWhat's the weather in Paris?"


async def test_demo_renders_a_coalesced_stream(page: Any, demo: ModuleType) -> None:
    """Tokens streamed with no delay reach the page coalesced (fewer frames than tokens, each frame's
    ``coalesced`` counting its deltas); the demo renders the exact reply."""
    engine_events: list[dict[str, Any]] = []

    def on_frame(payload: str | bytes) -> None:
        message = msgspec.json.decode(payload)
        if message.get("type") == "engine_event":
            engine_events.append(message["data"])

    page.on("websocket", lambda ws: ws.on("framereceived", on_frame))
    async with serve(demo.build_demo_app(APIConfig(ping_interval=0))) as server:
        await demo_page(page, server)  # token_delay=0
        await page.fill("[data-testid=input]", "tell me a story")
        await page.press("[data-testid=input]", "Enter")
        await page.wait_for_selector("[data-testid=message-assistant][data-status=completed]")
        reply = "Hello, I am Ada. You said: tell me a story"
        assert (await last_reply(page).locator(".bubble").text_content() or "").strip() == reply
    tokens = [event for event in engine_events if event["event_type"] == "token"]
    assert "".join(event["payload"]["text"] for event in tokens).strip() == reply
    assert sum(event.get("coalesced", 1) for event in tokens) == len(reply.split(" "))
    assert len(tokens) < len(reply.split(" "))
    assert [event["seq"] for event in engine_events] == list(range(len(engine_events)))


async def test_demo_asks_the_user_and_declines_the_tool(page: Any, demo: ModuleType) -> None:
    async with serve(demo.build_demo_app(APIConfig(ping_interval=0))) as server:
        await demo_page(page, server)
        await page.click("button.chip[data-text='']")  # an empty message: the engine asks
        dialog = page.locator("dialog[open]")
        assert await dialog.locator(".dialog-text").text_content() == "What would you like to talk about?"
        await dialog.locator("[data-testid=dialog-input]").fill("the weather in Rome")
        await dialog.locator("button[type=submit]").click()
        await page.locator("dialog[open] button[data-option=no]").click()  # then it asks about the tool
        await page.wait_for_selector("[data-testid=message-assistant][data-status=completed]")
        assert await last_reply(page).locator(".bubble").text_content() == \
            "Alright, I will not look it up. Anything else?"


async def test_demo_stop_cancels_the_command_and_closes_its_dialog(page: Any, demo: ModuleType) -> None:
    async with serve(demo.build_demo_app(APIConfig(ping_interval=0))) as server:
        await demo_page(page, server, "token_delay=30")
        # Stop while streaming.
        await page.click("button.chip[data-text='Hello there!']")
        await page.wait_for_function(
            "document.querySelector('[data-testid=message-assistant] .bubble').textContent.length > 0")
        await page.click("[data-testid=stop]")
        await page.wait_for_selector("[data-testid=message-assistant][data-status=cancelled]")
        assert await last_reply(page).locator(".status-note").text_content() == "Stopped"
        assert await page.locator("[data-testid=send]").is_visible()
        # Stop while the engine waits for the user: the server withdraws its question, the dialog closes.
        await page.click("button.chip[data-text='']")
        await page.locator("dialog[open]").wait_for()
        await page.evaluate("chatDemo.stop()")  # the modal makes the Stop button unreachable by clicks
        await page.locator("dialog").wait_for(state="detached")
        await page.wait_for_function(
            "document.querySelectorAll('[data-testid=message-assistant][data-status=cancelled]').length === 2")
        toast = page.locator("[data-testid=toast]", has_text="Request withdrawn")
        assert "(cancelled)" in await toast.text_content()


async def test_demo_closes_a_dialog_the_server_stops_waiting_for(page: Any, demo: ModuleType) -> None:
    async with serve(demo.build_demo_app(APIConfig(ping_interval=0))) as server:
        await demo_page(page, server)
        app_id = await page.evaluate("chatDemo.client.appId")
        async with anyio.create_task_group() as tg:
            failures: list[BaseException] = []

            async def ask() -> None:
                try:
                    await server.runtime.messaging.send_to_app_and_wait(
                        app_id, "server_request", {"request_type": "user_input", "prompt": "Still there?"},
                        timeout=0.5)
                except TimeoutError as exc:
                    failures.append(exc)

            tg.start_soon(ask)
            await page.locator("dialog[open]", has_text="Still there?").wait_for()
            await page.locator("dialog").wait_for(state="detached")
        assert len(failures) == 1
        assert "(timeout)" in await page.locator("[data-testid=toast]", has_text="Request withdrawn").text_content()


async def test_demo_shows_notifications_as_toasts(page: Any, demo: ModuleType) -> None:
    async with serve(demo.build_demo_app(APIConfig(ping_interval=0))) as server:
        await demo_page(page, server)
        welcome = page.locator("[data-testid=toast]", has_text="Welcome!")
        await welcome.wait_for()
        app_id = await page.evaluate("chatDemo.client.appId")
        await server.runtime.messaging.send_to_app(
            app_id, "notification", {"notification_type": "deploy_finished", "message": "Version 2 is live"})
        toast = page.locator("[data-testid=toast]", has_text="Version 2 is live")
        await toast.wait_for()
        assert "deploy finished" in (await toast.text_content()).lower()
        await toast.click()  # click to dismiss
        await toast.wait_for(state="detached")


async def test_demo_shows_the_connection_state_and_reconnects_by_itself(page: Any, demo: ModuleType) -> None:
    sock = listening_socket()
    try:
        async with serve(demo.build_demo_app(APIConfig(ping_interval=0)), sock=sock) as first:
            await demo_page(page, first, "token_delay=0&reconnect_delay=50")
            first_session = await page.evaluate("chatDemo.sessionId")
            assert await page.locator("[data-testid=app-id]").text_content() != "—"
        pill = page.locator("[data-testid=conn-state]")
        await page.wait_for_function(
            "['reconnecting', 'connecting'].includes(document.querySelector('[data-testid=conn-state]').dataset.state)")
        await page.locator(".system", has_text="Connection lost").wait_for()
        async with serve(demo.build_demo_app(APIConfig(ping_interval=0)), sock=sock) as second:
            await page.wait_for_selector("[data-testid=conn-state][data-state=open]")
            await page.locator(".system", has_text="Reconnected").wait_for()
            assert await pill.locator(".label").text_content() == "connected"
            session_id = await page.evaluate("chatDemo.sessionId")
            assert session_id != first_session and len(second.runtime.sessions) == 1
            await page.click("button.chip[data-text='Hello there!']")
            await page.wait_for_selector("[data-testid=message-assistant][data-status=completed]")
    finally:
        sock.close()


async def test_demo_reload_mid_answer_the_answer_goes_on(page: Any, demo: ModuleType) -> None:
    """Resume (issue 12): a reload while the reply streams resumes the app; the page draws its saved
    transcript again and follows the running command, so the reply ends exactly once, complete."""
    async with serve(demo.build_demo_app(APIConfig(ping_interval=0))) as server:
        await demo_page(page, server, "token_delay=0.15")
        app_id = await page.evaluate("chatDemo.client.appId")
        session_id = await page.evaluate("chatDemo.sessionId")
        await page.fill("[data-testid=input]", "tell me a story")
        await page.press("[data-testid=input]", "Enter")
        await page.wait_for_function(  # a few tokens in: the reload comes mid-answer
            "(document.querySelector('[data-testid=message-assistant] .bubble')?.textContent ?? '')"
            ".split(' ').length > 2")
        await page.reload()
        await page.locator(".system", has_text="Resumed").wait_for()
        assert await page.evaluate("chatDemo.client.appId") == app_id
        assert await page.evaluate("chatDemo.sessionId") == session_id
        await page.wait_for_selector("[data-testid=message-assistant][data-status=completed]")
        assert await page.locator("[data-testid=message-assistant]").count() == 1
        assert await page.locator("[data-testid=message-user]").text_content() == "Youtell me a story"
        assert await last_reply(page).locator(".bubble").text_content() == "Hello, I am Ada. You said: tell me a story"
        assert len(server.runtime.sessions) == 1  # the same session: nothing was created again
        await page.click("button.chip[data-text='Hello there!']")  # and the conversation goes on
        await page.wait_for_function(
            "document.querySelectorAll('[data-testid=message-assistant][data-status=completed]').length === 2")


async def test_demo_reload_with_the_confirm_dialog_open_brings_it_back(page: Any, demo: ModuleType) -> None:
    async with serve(demo.build_demo_app(APIConfig(ping_interval=0))) as server:
        await demo_page(page, server)
        app_id = await page.evaluate("chatDemo.client.appId")
        await page.fill("[data-testid=input]", "What's the weather in Paris?")
        await page.press("[data-testid=input]", "Enter")
        await page.locator("dialog[open]").wait_for()
        await page.reload()
        dialog = page.locator("dialog[open]")
        await dialog.wait_for()  # asked again by the server after the resume: the dialog is back
        assert await dialog.locator(".dialog-text").text_content() == \
            "Look up the weather in Paris with the weather tool?"
        assert await page.evaluate("chatDemo.client.appId") == app_id
        await dialog.locator("button[data-option=yes]").click()
        await page.wait_for_selector("[data-testid=message-assistant][data-status=completed]")
        reply = last_reply(page)
        assert await reply.locator(".bubble").text_content() == "I checked for you: it is 21°C and sunny in Paris."
        assert await reply.locator(".event").all_text_contents() == ["⚙ weather(Paris)",
                                                                     "✓ it is 21°C and sunny in Paris"]
        assert await page.locator("dialog").count() == 0
        assert len(server.runtime.sessions) == 1


async def test_the_screenshot_script_captures_the_demo(tmp_path: Path) -> None:
    script = load_example("chat/screenshot")
    target = tmp_path / "demo.png"
    await script.take_screenshot(target, executable=str(CHROMIUM))
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000

