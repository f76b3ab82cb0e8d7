"""What an answer to a core server request must look like, checked before it reaches the waiter.

A ``user_input`` answer needs a string ``user_input``; a ``user_confirmation`` answer a ``selection``
that is one of the options offered. An answer that does not fit is refused to the client (which may
answer again: the question stays open) instead of reaching the code that asked as an empty or
unexpected value. Answers carrying ``error`` (the client declines) always pass. Custom request types
are not checked: their answers are free-form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

AnswerCheck = Callable[[dict[str, Any]], "str | None"]
"""``check(answer_data)`` → why the answer does not fit the question, or None."""


class _Question(msgspec.Struct):
    request_type: Any = None
    options: Any = None


class _Frame(msgspec.Struct):
    type: str
    data: Any = None


_decode_frame = msgspec.json.Decoder(_Frame).decode


def answer_check(frame: str) -> AnswerCheck | None:
    """The check for answers to the server request in ``frame`` (None when its answers are free-form)."""
    # Cheap tests first (this runs for every server request): FrameEncoder writes the type first, and
    # only the core request types are checked.
    if not frame.startswith('{"type":"server_request"') or '"request_type":"user_' not in frame:
        return None
    try:
        sent = _decode_frame(frame)
    except msgspec.DecodeError:
        return None
    if sent.type != "server_request" or not isinstance(sent.data, dict):
        return None
    request_type = sent.data.get("request_type")
    if request_type == "user_input":
        return _check_user_input
    if request_type == "user_confirmation":
        options = sent.data.get("options")
        if isinstance(options, list):
            return lambda answer: _check_selection(answer, options)
    return None


def _check_user_input(answer: dict[str, Any]) -> str | None:
    if answer.get("error") is not None or isinstance(answer.get("user_input"), str):
        return None
    fields = ", ".join(sorted(key for key in answer if key != "response_type")) or "none"
    return (f"an answer to a user_input request needs a string field 'user_input' (this one has: {fields}); "
            "the question is still open")


def _check_selection(answer: dict[str, Any], options: list[Any]) -> str | None:
    if answer.get("error") is not None:
        return None
    selection = answer.get("selection")
    if selection in options and isinstance(selection, str):
        return None
    if "selection" not in answer:
        return "an answer to a user_confirmation request needs a field 'selection'; the question is still open"
    return f"selection {selection!r} is not one of the options offered ({options}); the question is still open"
