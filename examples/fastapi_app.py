"""A FastAPI app hosting llmgine_ws: what a FastAPI developer builds on the first day.

- The FastAPI app keeps its own lifespan, state (a pretend database pool on ``app.state.db``) and
  auth dependency (``current_user``); llmgine_ws's authenticator shares the same token check, so a
  WebSocket is the same user as an HTTP request with the same token.
- llmgine_ws is mounted at ``/ws`` with one line (``llmgine_ws.mount``): the WebSocket endpoint is
  ``/ws/api/ws``, and llmgine_ws's lifespan runs inside the host's.
- A custom msgspec message (``add_note``) whose handler uses the host's state (``ctx.state.db``) and
  the authenticated user (``ctx.principal``).
- A streaming engine (``notes``) that reads the same database for the session's user, asks the user
  for input (``ctx.ask_user``) and for a confirmation (``ctx.confirm``).
- An HTTP route (``POST /ask-color``) that asks the user's open frontend a question of its own type
  (``ask_color``) with ``send_to_app_and_wait`` and returns the answer.

Run it, then drive it with the Python client (tests/test_fastapi_example.py does exactly that)::

    python examples/fastapi_app.py            # http://127.0.0.1:8000, ws://127.0.0.1:8000/ws/api/ws
    curl -H "Authorization: Bearer alice-token" http://127.0.0.1:8000/notes
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
import msgspec
import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException

import llmgine_ws
from llmgine_ws import APIConfig, EngineContext, Extensions, HandlerContext, ProtocolError, Session
from llmgine_ws.auth import Handshake, Principal

# ------------------------------------------------------------------ the host's own pieces

TOKENS = {"alice-token": "alice", "bob-token": "bob"}
"""A stand-in for real credentials (a JWT, a session cookie): token → user."""


def user_for_token(token: str) -> str | None:
    """The one credential check, shared by HTTP routes and WebSocket handshakes."""
    return TOKENS.get(token)


async def current_user(authorization: Annotated[str, Header()] = "") -> str:
    """FastAPI auth dependency: ``Authorization: Bearer <token>``."""
    scheme, _, token = authorization.partition(" ")
    user = user_for_token(token) if scheme.lower() == "bearer" else None
    if user is None:
        raise HTTPException(status_code=401, detail="a valid bearer token is required")
    return user


async def authenticate(handshake: Handshake) -> Principal | None:
    """llmgine_ws's authenticator: the same check, at the WebSocket handshake (``None`` refuses: 403)."""
    user = user_for_token(handshake.credential or "")
    return Principal(user_id=user, method="bearer") if user is not None else None


class NotesDB:
    """Pretends to be a database pool: opened by the host's lifespan, closed after llmgine_ws drained."""

    def __init__(self) -> None:
        self.is_open = False
        self._notes: dict[str, list[tuple[int, str, str]]] = {}
        self._ids = itertools.count(1)

    async def open(self) -> None:
        self.is_open = True

    async def close(self) -> None:
        self.is_open = False

    async def add(self, user: str, text: str, tag: str) -> int:
        assert self.is_open, "the pool is closed"
        note_id = next(self._ids)
        self._notes.setdefault(user, []).append((note_id, text, tag))
        return note_id

    async def list(self, user: str) -> list[tuple[int, str, str]]:
        assert self.is_open, "the pool is closed"
        return list(self._notes.get(user, []))

    async def clear(self, user: str) -> int:
        assert self.is_open, "the pool is closed"
        return len(self._notes.pop(user, []))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The host's lifespan. ``llmgine_ws.mount`` runs llmgine_ws's inside it."""
    app.state.db = NotesDB()
    app.state.apps_by_user = {}  # user → app_ids with a session: whom /ask-color can ask
    await app.state.db.open()
    try:
        yield
    finally:
        await app.state.db.close()


# ------------------------------------------------------------------ the messages llmgine_ws speaks


class AddNote(msgspec.Struct, frozen=True):
    """``add_note``: store a note for the connection's user (an unknown field is a VALIDATION_ERROR)."""

    text: str
    tag: str = "misc"


class NoteAdded(msgspec.Struct, frozen=True):
    """``add_note_res``."""

    note_id: int
    user: str


class AskColor(msgspec.Struct, frozen=True):
    """``ask_color``: a server request of its own type, sent by ``POST /ask-color``."""

    question: str


async def add_note(data: AddNote, ctx: HandlerContext) -> NoteAdded:
    """The host's state is ``ctx.state``; the user is ``ctx.principal`` (set at the handshake)."""
    if not data.text.strip():
        raise ProtocolError("EMPTY_NOTE", "a note needs some text")
    note_id = await ctx.state.db.add(ctx.principal.user_id, data.text, data.tag)
    return NoteAdded(note_id=note_id, user=ctx.principal.user_id)


class NotesEngine:
    """One per session. ``session.principal`` is who opened it: the engine only ever sees that user's notes
    (``config`` comes from the client and is not trusted with anything)."""

    def __init__(self, session: Session, config: dict[str, Any]) -> None:
        self.user: str = session.principal.user_id
        self.delay = min(float(config.get("delay", 0.0)), 0.1)  # client input: bounded

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def handle_command(self, command: Any, ctx: EngineContext) -> Any:
        db: NotesDB = ctx.state.db
        action = command.get("action") if isinstance(command, dict) else None
        if action == "read":
            notes = await db.list(self.user)
            if not notes:
                text = await ctx.ask_user("You have no notes yet. What should I write down?")
                await db.add(self.user, text, "asked")
                notes = await db.list(self.user)
            for note_id, text, tag in notes:  # streamed: one engine_event per note
                await ctx.emit("note", {"note_id": note_id, "text": text, "tag": tag})
                await anyio.sleep(self.delay)
            return {"user": self.user, "count": len(notes)}
        if action == "clear":
            count = len(await db.list(self.user))
            if await ctx.confirm(f"Delete your {count} notes?", ["delete", "keep"]) == "keep":
                return {"deleted": 0}
            return {"deleted": await db.clear(self.user)}
        raise ProtocolError("UNKNOWN_ACTION", "action must be 'read' or 'clear'")


# ------------------------------------------------------------------ wiring


async def remember_app(session: Session) -> None:
    app.state.apps_by_user.setdefault(session.principal.user_id, []).append(session.app_id)


async def forget_app(session: Session) -> None:
    apps = app.state.apps_by_user.get(session.principal.user_id, [])
    if session.app_id in apps:
        apps.remove(session.app_id)


extensions = Extensions()
extensions.register_handler("add_note", AddNote, add_note)
extensions.register_server_message("ask_color", AskColor)
extensions.register_engine("notes", NotesEngine)
extensions.register_session_callback("session_created", remember_app)
extensions.register_session_callback("session_destroyed", forget_app)

app = FastAPI(title="Notes", lifespan=lifespan)
llm = llmgine_ws.mount(app, "/ws", extensions=extensions, authenticator=authenticate, config=APIConfig.from_env())
messaging = llmgine_ws.get_messaging_api(llm)


@dataclass
class ColorQuestion:
    """The body of ``POST /ask-color`` (a dataclass: FastAPI validates it, llmgine_ws could decode it too)."""

    question: str = "Which color should your notes be?"


@app.get("/notes")
async def list_notes(user: Annotated[str, Depends(current_user)]) -> dict[str, Any]:
    notes = await app.state.db.list(user)
    return {"user": user, "notes": [{"note_id": i, "text": text, "tag": tag} for i, text, tag in notes]}


@app.post("/ask-color")
async def ask_color(body: ColorQuestion, user: Annotated[str, Depends(current_user)]) -> dict[str, Any]:
    """Ask the user's frontend (one of their connections with a session) and wait for the answer."""
    apps = app.state.apps_by_user.get(user) or []
    if not apps:
        raise HTTPException(status_code=409, detail="open the app first: no connection of yours has a session")
    try:
        response = await messaging.send_to_app_and_wait(apps[-1], "ask_color", AskColor(question=body.question),
                                                        timeout=30)
    except TimeoutError:
        raise HTTPException(status_code=504, detail="the user did not answer in time") from None
    except llmgine_ws.MessagingError as exc:
        raise HTTPException(status_code=409, detail=f"could not ask: {type(exc).__name__}") from None
    return {"user": user, "color": response.data.get("color")}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=8000)
