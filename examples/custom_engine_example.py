"""The seed's ``custom_engine_example.py``, done right.

A custom ``translate`` message with its own structs, a custom server request (``pick_theme`` asks
the client back with a message type of its own, ``ask_theme``), a chat engine that streams its reply
token by token (no external LLM needed), asks for confirmation before a (pretend) tool call and asks
the user for more input when it needs it, a backend that notifies apps and asks them questions, and
connect/disconnect callbacks.

Run it::

    python examples/custom_engine_example.py          # ws://127.0.0.1:8000/api/ws

then drive it with ``python examples/chat_client.py`` (or any client speaking the protocol).
"""

from __future__ import annotations

import hmac
import logging
import math
import os
from typing import Any

import anyio
import msgspec
import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from llmgine_ws import (
    APIConfig,
    AppNotConnected,
    EngineContext,
    Extensions,
    HandlerContext,
    MessagingAPI,
    Session,
    create_app,
)

logger = logging.getLogger("examples.custom_engine")


# ------------------------------------------------------------------ a custom message: translate


class TranslateRequest(msgspec.Struct, frozen=True):
    """``{"type": "translate", "data": {"text": ..., "target_language": "fr"}}``"""

    text: str
    target_language: str = "fr"


class TranslateResult(msgspec.Struct, frozen=True):
    """Sent back as ``translate_res``."""

    text: str
    translated_text: str
    target_language: str


GLOSSARY: dict[str, dict[str, str]] = {
    "fr": {"hello": "bonjour", "world": "monde", "thank": "merci", "you": "vous", "good": "bon", "night": "nuit"},
    "de": {"hello": "hallo", "world": "welt", "thank": "danke", "you": "dir", "good": "gute", "night": "nacht"},
}


async def translate(data: TranslateRequest, ctx: HandlerContext) -> TranslateResult:
    """A toy word-by-word translator: the point is the message plumbing, not the linguistics."""
    words = GLOSSARY.get(data.target_language)
    if words is None:
        from llmgine_ws import ProtocolError

        raise ProtocolError("UNSUPPORTED_LANGUAGE", f"no glossary for {data.target_language!r}",
                            {"supported": sorted(GLOSSARY)})
    translated = " ".join(words.get(word.lower(), word) for word in data.text.split())
    return TranslateResult(text=data.text, translated_text=translated, target_language=data.target_language)


# ------------------------------------------------------------------ a custom server request: ask_theme


class ThemeQuestion(msgspec.Struct, frozen=True):
    """``ask_theme``: the server asks the client to pick one of ``options`` (answer ``{"theme": ...}``)."""

    options: list[str]


class PickTheme(msgspec.Struct, frozen=True):
    """``{"type": "pick_theme", "data": {"options": [...]}}``"""

    options: list[str] = msgspec.field(default_factory=lambda: ["light", "dark"])


async def pick_theme(data: PickTheme, ctx: HandlerContext) -> dict[str, Any]:
    """Asks the client back with a server request of its own message type, ``ask_theme``.

    ``send_to_app_and_wait(app_id, "ask_theme", data)`` sends a frame of type ``ask_theme`` and waits
    for the ``server_response`` with the same ``message_id``: the clients answer it with the handler
    registered for that type (``client.on_server_request("ask_theme")``, ``onServerRequest("ask_theme", ...)``).
    """
    answer = await ctx.messaging.send_to_app_and_wait(ctx.app_id, "ask_theme", ThemeQuestion(options=data.options),
                                                      timeout=30)
    theme = answer.data.get("theme")
    if theme not in data.options:
        from llmgine_ws import ProtocolError

        raise ProtocolError("INVALID_THEME", f"the client picked {theme!r}", {"options": data.options})
    return {"theme": theme}


# ------------------------------------------------------------------ an engine: a chat agent


class ChatEngine:
    """A deterministic chat agent.

    Plug in a real LLM by replacing :meth:`compose` with a call to your provider's streaming API and
    forwarding each chunk with ``await ctx.emit("token", {"text": chunk})`` — the engine is plain
    async Python, and a ``cancel`` from the client interrupts it at its next ``await``.
    """

    MAX_TOKEN_DELAY = 30.0
    """The client's config is the client's word: every value from it is bounded (a ``token_delay`` of
    ``1e308`` would hold the command, and its engine, forever)."""

    def __init__(self, session: Session, config: dict[str, Any]) -> None:
        self.session = session
        self.name = str(config.get("name", "Ada"))[:64]
        self.token_delay = _bounded(config.get("token_delay"), default=0.03, high=self.MAX_TOKEN_DELAY)
        self.history: list[tuple[str, str]] = []

    async def start(self) -> None:
        logger.info("chat engine started for session %s", self.session.session_id)

    async def handle_command(self, command: Any, ctx: EngineContext) -> dict[str, Any]:
        text = str(command.get("text", "") if isinstance(command, dict) else command or "").strip()
        if not text:
            text = (await ctx.ask_user("What would you like to talk about?")).strip() or "nothing in particular"
        tool_result: str | None = None
        if "weather" in text.lower():
            city = text.rstrip("?!. ").split()[-1].capitalize()
            choice = await ctx.confirm(f"Look up the weather in {city} with the weather tool?", ["yes", "no"])
            if choice == "yes":
                await ctx.emit("tool_call", {"tool": "weather", "args": {"city": city}})
                tool_result = f"it is 21°C and sunny in {city}"
                await ctx.emit("tool_result", {"tool": "weather", "result": tool_result})
        reply = self.compose(text, tool_result)
        for token in reply.split(" "):
            await ctx.emit("token", {"text": token + " "})
            await anyio.sleep(self.token_delay)
        self.history.append((text, reply))
        return {"reply": reply, "turn": len(self.history)}

    def compose(self, text: str, tool_result: str | None) -> str:
        """The 'model': a canned but context-aware answer."""
        if tool_result is not None:
            return f"I checked for you: {tool_result}."
        if "weather" in text.lower():
            return "Alright, I will not look it up. Anything else?"
        return f"Hello, I am {self.name}. You said: {text}"

    async def stop(self) -> None:
        logger.info("chat engine for session %s stopped after %d turn(s)", self.session.session_id,
                    len(self.history))


def _bounded(value: Any, *, default: float, high: float) -> float:
    """``value`` as a number in ``[0, high]``; ``default`` if it is not a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return min(max(number, 0.0), high) if math.isfinite(number) else default


# ------------------------------------------------------------------ a backend using the messaging API


class MyCustomBackend:
    """The seed's backend: notify a frontend, ask it for input."""

    def __init__(self, messaging: MessagingAPI) -> None:
        self.messaging = messaging

    async def send_user_notification(self, app_id: str, message: str) -> None:
        """Fire-and-forget notification to one frontend app."""
        await self.messaging.send_to_app(app_id, "notification", {"notification_type": "info", "message": message})

    async def request_user_input(self, app_id: str, prompt: str, timeout: float = 30.0) -> str:
        """Ask the user and wait for the answer (raises if they disconnect or time out)."""
        response = await self.messaging.send_to_app_and_wait(
            app_id, "server_request", {"request_type": "user_input", "prompt": prompt}, timeout=timeout)
        return str(response.data.get("user_input", ""))


def build_app(config: APIConfig | None = None) -> Any:
    """Wire everything into an app (a factory, so tests and ``--factory`` can build fresh ones)."""
    extensions = Extensions()
    extensions.register_handler("translate", TranslateRequest, translate)
    extensions.register_handler("pick_theme", PickTheme, pick_theme)
    extensions.register_server_message("ask_theme", ThemeQuestion)
    extensions.register_engine("chat", ChatEngine)

    async def on_connected(app_id: str) -> None:
        await backend.send_user_notification(app_id, "Welcome! Create a session and a 'chat' engine to start.")

    async def on_disconnected(app_id: str) -> None:
        logger.info("app %s left; its sessions and engines are already cleaned up", app_id)

    extensions.register_connection_callback("connect", on_connected)
    extensions.register_connection_callback("disconnect", on_disconnected)

    async def ask(request: Request) -> JSONResponse:
        """``POST /demo/ask/{app_id}`` with ``{"prompt": ...}``: a backend asking a user from HTTP.

        Only for whoever holds the admin token (``LLMGINE_API_ADMIN_TOKEN``, as ``Authorization: Bearer``):
        an open route would let anyone put questions to any connected user. Without an admin token
        configured the route is closed.
        """
        expected = app_config.admin_token
        presented = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not expected or not hmac.compare_digest(presented.encode(), expected.encode()):
            return JSONResponse({"error": "this route needs the admin token"}, status_code=403)
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return JSONResponse({"error": "expected a JSON object"}, status_code=400)
        try:
            prompt = str(body.get("prompt", "?"))[:1000]
            answer = await backend.request_user_input(request.path_params["app_id"], prompt,
                                                      timeout=_bounded(body.get("timeout"), default=30, high=300))
        except AppNotConnected:
            return JSONResponse({"error": "app not connected"}, status_code=404)
        except TimeoutError:
            return JSONResponse({"error": "the user did not answer in time"}, status_code=504)
        return JSONResponse({"answer": answer})

    extensions.add_route(Route("/demo/ask/{app_id}", ask, methods=["POST"]))
    app_config = config or APIConfig.from_env(title="LLMgine chat example")
    app = create_app(app_config, extensions)
    backend = MyCustomBackend(extensions.get_messaging_api())
    app.state.custom_backend = backend
    return app


app = build_app()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    uvicorn.run(app, host=os.environ.get("LLMGINE_API_HOST", "127.0.0.1"),
                port=int(os.environ.get("LLMGINE_API_PORT", "8000")))
