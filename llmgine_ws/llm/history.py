"""A session's conversation, bounded in messages and in estimated tokens.

History is kept as whole turns (a user message, then the assistant's tool calls, the tool results
and the final answer) and trimmed oldest turn first, so a tool result is never sent without the
assistant message that asked for it (providers reject such a conversation).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from .messages import ChatMessage

CHARS_PER_TOKEN = 4
"""A rough, provider-independent estimate (English text averages about 4 characters a token)."""
MESSAGE_OVERHEAD_TOKENS = 4
"""Role markers and separators a provider adds around each message."""


def estimate_tokens(message: ChatMessage) -> int:
    """The tokens ``message`` costs in a prompt, estimated from its length."""
    chars = len(message.content) + sum(len(call.name) + len(call.arguments) for call in message.tool_calls)
    return MESSAGE_OVERHEAD_TOKENS + -(-chars // CHARS_PER_TOKEN)


class History:
    """Completed turns of one conversation, within ``max_messages`` and ``max_tokens`` (``None``: no bound)."""

    def __init__(self, max_messages: int | None, max_tokens: int | None) -> None:
        self.max_messages = max_messages
        self.max_tokens = max_tokens
        self._turns: deque[tuple[ChatMessage, ...]] = deque()
        self._messages = 0
        self._tokens = 0

    @property
    def messages(self) -> list[ChatMessage]:
        """The kept messages, oldest first."""
        return [message for turn in self._turns for message in turn]

    def context(self, current: Sequence[ChatMessage]) -> list[ChatMessage]:
        """The history to send with ``current`` (the system prompt and the turn in progress): the
        newest turns that fit ``max_messages`` and, together with ``current``, ``max_tokens``.

        ``current`` itself always goes out whole, even alone over the token bound: the provider
        then answers with a context-length error rather than the engine cutting the user's text.
        """
        token_budget = None if self.max_tokens is None else self.max_tokens - sum(map(estimate_tokens, current))
        kept: list[tuple[ChatMessage, ...]] = []
        messages = tokens = 0
        for turn in reversed(self._turns):
            messages += len(turn)
            tokens += sum(map(estimate_tokens, turn))
            if (self.max_messages is not None and messages > self.max_messages) or (
                    token_budget is not None and tokens > token_budget):
                break
            kept.append(turn)
        return [message for turn in reversed(kept) for message in turn]

    def append(self, turn: Sequence[ChatMessage]) -> None:
        """Keep a completed turn, dropping the oldest turns beyond the bounds (the newest always stays)."""
        self._turns.append(tuple(turn))
        self._messages += len(turn)
        self._tokens += sum(map(estimate_tokens, turn))
        while len(self._turns) > 1 and self._over_bounds():
            dropped = self._turns.popleft()
            self._messages -= len(dropped)
            self._tokens -= sum(map(estimate_tokens, dropped))

    def _over_bounds(self) -> bool:
        return (self.max_messages is not None and self._messages > self.max_messages) or (
            self.max_tokens is not None and self._tokens > self.max_tokens)

    def __len__(self) -> int:
        return self._messages
