"""A Python frontend for ``custom_engine_example.py``: a chat session with the example engine.

Run the server first, then::

    python examples/chat_client.py                      # a scripted conversation
    python examples/chat_client.py --interactive        # type your own messages

It creates a session and a ``chat`` engine, streams each reply token by token (``client.command``),
answers the engine's confirmation and input requests (``on_confirmation``, ``on_user_input``), and
shows notifications and the ``translate`` message.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.to_thread
import msgspec

from llmgine_ws.client import Client, ConfirmationRequest, Message, UserInputRequest, connect

SCRIPT = ["Hello there!", "What's the weather in Paris?", ""]


async def chat_turn(client: Client, session_id: str, text: str, out: Callable[[str], None]) -> dict[str, Any]:
    """Send one message to the engine and print the streamed reply; returns the command's result."""
    out(f"you   > {text}" if text else "you   > (an empty message: the engine will ask)")
    tokens: list[str] = []
    command = client.command(session_id, {"text": text})
    async for event in command:  # the command's events, in order, until its result
        if event.event_type == "token":
            tokens.append(event.payload["text"])
        else:
            out(f"engine * {event.event_type}: {event.payload}")
    out(f"engine< {''.join(tokens).strip()}")
    return msgspec.structs.asdict(command.result) if command.result is not None else {}


async def run(url: str, messages: Sequence[str], *, answers: Callable[[Message], str] | None = None,
              out: Callable[[str], None] = print, token_delay: float = 0.03) -> list[dict[str, Any]]:
    """Hold a scripted conversation; returns each turn's ``engine_command_res`` data."""
    async with connect(url) as client:

        @client.on_confirmation
        def confirm(request: ConfirmationRequest) -> str:
            choice = answers(request.raw) if answers else "yes"
            out(f"engine? {request.message} {request.options} -> {choice}")
            return choice

        @client.on_user_input
        def user_input(request: UserInputRequest) -> str:
            text = answers(request.raw) if answers else "the weather in Oslo"
            out(f"engine? {request.prompt} -> {text}")
            return text

        @client.on_notification
        def notified(message: Message) -> None:
            out(f"notice! {message.data.get('message')}")

        out(f"connected as app {client.app_id}")
        session_id = await client.create_session()
        await client.create_engine(session_id, "chat", {"token_delay": token_delay})
        translated = await client.request("translate", {"text": "hello world", "target_language": "fr"})
        out(f"translate: hello world -> {translated.data['translated_text']}")
        results = [await chat_turn(client, session_id, text, out) for text in messages]
        await client.request("close_session", {"session_id": session_id})
        return results


async def interactive(url: str) -> None:
    """Chat from the terminal."""
    async def ask(prompt: str) -> str:
        return await anyio.to_thread.run_sync(input, prompt)

    async with connect(url) as client:

        @client.on_confirmation
        async def confirm(request: ConfirmationRequest) -> str:
            while (choice := await ask(f"{request.message} {request.options}: ")) not in request.options:
                print(f"please answer one of {request.options}")
            return choice

        @client.on_user_input
        async def user_input(request: UserInputRequest) -> str:
            return await ask(f"{request.prompt} ")

        @client.on_notification
        def notified(message: Message) -> None:
            print(f"notice! {message.data.get('message')}")

        session_id = await client.create_session()
        await client.create_engine(session_id, "chat")
        while True:
            try:
                text = await ask("you> ")
            except EOFError:
                return
            await chat_turn(client, session_id, text, print)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000/api/ws")
    parser.add_argument("--interactive", "-i", action="store_true")
    args = parser.parse_args(argv)
    if args.interactive:
        anyio.run(interactive, args.url)
    else:
        anyio.run(lambda: run(args.url, SCRIPT))


if __name__ == "__main__":
    sys.exit(main())
