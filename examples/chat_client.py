"""A Python frontend for ``custom_engine_example.py``: a chat session with the example engine.

Run the server first, then::

    python examples/chat_client.py                      # a scripted conversation
    python examples/chat_client.py --interactive        # type your own messages

It creates a session and a ``chat`` engine, streams each reply token by token, answers the
engine's confirmation and input requests, and shows notifications and the ``translate`` message.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.to_thread

from llmgine_ws.client import Client, Message, connect

SCRIPT = ["Hello there!", "What's the weather in Paris?", ""]


async def chat_turn(client: Client, session_id: str, text: str, out: Callable[[str], None]) -> dict[str, Any]:
    """Send one message to the engine and print the streamed reply; returns the command's result."""
    out(f"you   > {text}" if text else "you   > (an empty message: the engine will ask)")
    message_id = await client.send("engine_command", {"session_id": session_id, "command": {"text": text}})
    tokens: list[str] = []
    while True:
        message = await client.receive(timeout=60)
        if message.type == "engine_event":
            payload = message.data["payload"]
            if message.data["event_type"] == "token":
                tokens.append(payload["text"])
            else:
                out(f"engine * {message.data['event_type']}: {payload}")
        elif message.type == "engine_command_res" and message.message_id == message_id:
            out(f"engine< {''.join(tokens).strip()}")
            result: dict[str, Any] = message.data
            return result
        elif message.type == "notification":
            out(f"notice! {message.data.get('message')}")


async def run(url: str, messages: Sequence[str], *, answers: Callable[[Message], str] | None = None,
              out: Callable[[str], None] = print, token_delay: float = 0.03) -> list[dict[str, Any]]:
    """Hold a scripted conversation; returns each turn's ``engine_command_res`` data."""
    async with connect(url, wait_connected=False) as client:

        @client.on_server_request("user_confirmation")
        def confirm(message: Message) -> dict[str, Any]:
            choice = answers(message) if answers else "yes"
            out(f"engine? {message.data['message']} {message.data['options']} -> {choice}")
            return {"selection": choice}

        @client.on_server_request("user_input")
        def user_input(message: Message) -> dict[str, Any]:
            text = answers(message) if answers else "the weather in Oslo"
            out(f"engine? {message.data['prompt']} -> {text}")
            return {"user_input": text}

        welcome = await client.receive(timeout=10)  # "connected" comes first
        assert welcome.type == "connected"
        out(f"connected as app {client.app_id}")
        session_id = await client.create_session()
        await client.request("create_engine", {"session_id": session_id, "engine_type": "chat",
                                               "config": {"token_delay": token_delay}})
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

        @client.on_server_request("user_confirmation")
        async def confirm(message: Message) -> dict[str, Any]:
            return {"selection": await ask(f"{message.data['message']} {message.data['options']}: ")}

        @client.on_server_request("user_input")
        async def user_input(message: Message) -> dict[str, Any]:
            return {"user_input": await ask(f"{message.data['prompt']} ")}

        session_id = await client.create_session()
        await client.request("create_engine", {"session_id": session_id, "engine_type": "chat"})
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
