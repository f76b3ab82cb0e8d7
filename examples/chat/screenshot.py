"""Take the documentation's screenshot of the chat demo, mid-conversation, in headless Chromium.

    python examples/chat/screenshot.py docs/chat-demo.png

Serves the demo on a free loopback port, holds a short conversation (a greeting, then a weather
question whose confirmation dialog is accepted) and captures the page while the reply streams.
Needs Playwright for Python and Debian's ``/usr/bin/chromium`` (or ``CHROMIUM=/path``).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import uvicorn

HERE = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _demo_module() -> Any:
    spec = importlib.util.spec_from_file_location("chat_demo_app", HERE / "app.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@asynccontextmanager
async def serve_demo() -> AsyncIterator[str]:
    """Serve the demo app on a free loopback port; yields its base URL."""
    from llmgine_ws import APIConfig

    app = _demo_module().build_demo_app(APIConfig(ping_interval=0, title="LLMgine chat demo"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True


async def take_screenshot(path: Path, *, executable: str = CHROMIUM) -> None:
    """Hold the scripted conversation and save a PNG of the page while the second reply streams."""
    from playwright.async_api import async_playwright

    async with serve_demo() as url, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1000, "height": 720})
            page.set_default_timeout(15_000)
            await page.goto(f"{url}/?token_delay=0.12")
            await page.wait_for_function("window.chatDemo && window.chatDemo.sessionId !== null")
            await page.click("button.chip[data-text='Hello there!']")
            await page.wait_for_selector("[data-testid=message-assistant][data-status=completed]")
            await page.click("button.chip[data-text=\"What's the weather in Paris?\"]")
            await page.click("dialog[open] button[data-option=yes]")
            await page.wait_for_function(
                "[...document.querySelectorAll('[data-testid=message-assistant]')].at(-1)"
                ".querySelector('.bubble').textContent.includes('it is 21')")
            path.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(path))
        finally:
            await browser.close()


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/chat-demo.png")
    anyio.run(take_screenshot, target)
    print(f"saved {target}")
