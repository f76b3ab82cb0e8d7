"""Async Python client for the llmgine_ws WebSocket protocol.

The client is backend-agnostic: it runs under asyncio and trio alike, because it is built on
:mod:`anyio` byte streams and the sans-IO WebSocket implementation :mod:`wsproto`. Typical use::

    async with connect("ws://127.0.0.1:8000/api/ws") as client:
        @client.on_user_input
        async def answer(request: UserInputRequest) -> str:
            return "Paris"

        session_id = await client.create_session()
        await client.create_engine(session_id, "chat")
        async for event in client.command(session_id, {"text": "hello"}):
            print(event.event_type, event.payload)

Messages reach your code in wire order: when ``await client.request(...)`` returns, the handlers of
every message the server sent before the response have run. See ``docs/python-client.md``.

Modules, bottom up: :mod:`.errors`, :mod:`.messages` (the envelope), :mod:`.transport` (one
WebSocket over anyio + wsproto), :mod:`.handshake` (TCP/TLS and the HTTP upgrade), :mod:`.backoff`
(``RATE_LIMITED``), :mod:`.resume` (seq, acks, the resume handshake, the reconnect policy; sans
I/O), :mod:`.inbox`, :mod:`.handlers` (server requests), :mod:`.engines` (commands,
``ask_user``/``confirm`` answers), :mod:`.delivery` (where each incoming message goes, in order),
:mod:`.session` (the connection under a client: reader, delivery task, reconnect and resume, acks,
heartbeat), :mod:`.connection` (:class:`Client`, the public face), :mod:`.connecting` (:func:`connect`).
"""

from .connecting import connect
from .connection import Client
from .engines import Command, CommandResult, ConfirmationRequest, CreatedEngine, EngineEvent, UserInputRequest
from .errors import ClientError, ConnectionClosed, HandshakeRejected, RequestError, RequestTimeout, StateLost
from .handlers import MessageHandler, ServerRequestHandler
from .messages import RAW_MESSAGE_TYPE, Message
from .resume import Reconnect, ResumeOutcome
from .transport import Transport

__all__ = (
    "RAW_MESSAGE_TYPE",
    "Client",
    "ClientError",
    "Command",
    "CommandResult",
    "ConfirmationRequest",
    "ConnectionClosed",
    "CreatedEngine",
    "EngineEvent",
    "HandshakeRejected",
    "Message",
    "MessageHandler",
    "Reconnect",
    "RequestError",
    "RequestTimeout",
    "ResumeOutcome",
    "ServerRequestHandler",
    "StateLost",
    "Transport",
    "UserInputRequest",
    "connect",
)
