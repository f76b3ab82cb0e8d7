"""The wire envelope as the client sees it: every frame is a JSON text frame
``{"type", "message_id", "data"}``, plus ``"server_initiated": true`` on frames the server sent on
its own initiative. A response repeats its request's ``message_id``; a failed request is answered
with a ``type == "error"`` envelope whose ``data`` holds ``code``, ``message`` and ``details``."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

__all__ = ["RAW_MESSAGE_TYPE", "Message", "MessageCodec", "new_message_id"]

#: ``Message.type`` given to frames that could not be decoded as a protocol message.
RAW_MESSAGE_TYPE = "<raw>"


class Message(msgspec.Struct, frozen=True):
    """One protocol message, as received from the server.

    Attributes:
        type: the message type (``"ping_res"``, ``"notification"``, ``"error"``...). Frames that
            could not be decoded as a message get :data:`RAW_MESSAGE_TYPE` (``"<raw>"``).
        message_id: the message id (a response repeats its request's id); ``""`` for raw frames.
        data: the decoded JSON payload (usually a dict); for raw frames the frame's text (``str``)
            or, for a binary frame, its ``bytes``.
        server_initiated: ``True`` for messages the server sent on its own initiative.
        seq: the frame's position in the app's stream (1, 2, 3…; every frame after ``connected``
            of a server with resume), ``None`` when absent.
    """

    type: str
    message_id: str
    data: Any = None
    server_initiated: bool = False
    seq: int | None = None


class _Envelope(msgspec.Struct):
    type: str
    message_id: str
    data: Any


class MessageCodec:
    """Encodes outgoing envelopes and decodes incoming frames (one decoder, built once)."""

    def __init__(self) -> None:
        self._decoder = msgspec.json.Decoder(Message)
        self._encoder = msgspec.json.Encoder()

    def encode(self, type: str, message_id: str, data: Any) -> bytes:
        """The JSON text of one message (``data`` ``None`` is sent as ``{}``; Structs are welcome)."""
        return self._encoder.encode(_Envelope(type=type, message_id=message_id, data={} if data is None else data))

    def decode(self, frame: str | bytes) -> Message:
        """A text frame as a :class:`Message`; anything else (binary, not JSON) as a raw message."""
        if isinstance(frame, str):
            try:
                return self._decoder.decode(frame)
            except msgspec.DecodeError:
                pass
        return Message(type=RAW_MESSAGE_TYPE, message_id="", data=frame)


def new_message_id() -> str:
    """A fresh message id (a UUID4 in hex)."""
    return uuid.uuid4().hex
