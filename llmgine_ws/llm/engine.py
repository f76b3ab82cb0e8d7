"""The LLM engine: one conversation per session, streamed token by token, with approved tool calls.

Register it with a server-side :class:`~llmgine_ws.llm.LLMConfig`::

    extensions.register_engine("llm", LLMEngineFactory(LLMConfig.from_env(), tools=tools))

A command is ``{"text": "..."}``. The engine streams ``token`` events (``{"text": <delta>}``),
runs the tools the model calls (asking the user first for those that need approval), and answers
with ``{"reply", "finish_reason", "usage"}``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import msgspec

from ..engines import EngineContext
from ..errors import ServerRequestFailed
from .config import LLMConfig, apply_client_config, check_client_fields
from .errors import LLMError, LLMErrorCode
from .history import History
from .messages import ChatMessage, ChatProvider, ChatRequest, StreamEnd, TextDelta, ToolCall, ToolCallDelta, Usage
from .tools import InvalidArguments, Tool, ToolError, Tools

if TYPE_CHECKING:
    from ..sessions import Session

logger = logging.getLogger("llmgine_ws.llm")

CLOSE_TIMEOUT = 5.0
"""Seconds a provider gets to release an abandoned stream."""

ProviderFactory = Callable[[LLMConfig], ChatProvider]


class LLMCommand(msgspec.Struct, frozen=True):
    """``engine_command.command``: the user's message."""

    text: Annotated[str, msgspec.Meta(min_length=1)]


class _PartialToolCall:
    __slots__ = ("arguments", "id", "name")

    def __init__(self) -> None:
        self.id: str | None = None
        self.name: str | None = None
        self.arguments: list[str] = []


class _ModelReply:
    """What one model call produced (so far: a failed attempt leaves it partial)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.size = 0
        """Characters buffered: the text plus every tool call's arguments (bounded by ``max_reply_chars``)."""
        self.tool_calls: dict[int, _PartialToolCall] = {}
        self.end: StreamEnd | None = None

    @property
    def streamed(self) -> bool:
        """Whether the client has seen part of this reply (a retry would then show it twice)."""
        return bool(self.text)

    def finished_tool_calls(self) -> tuple[ToolCall, ...]:
        return tuple(ToolCall(call.id or f"call_{index}", call.name or "", "".join(call.arguments))
                     for index, call in sorted(self.tool_calls.items()))


class LLMEngine:
    """An :class:`~llmgine_ws.Engine` backed by a chat model (see the module docstring)."""

    def __init__(self, config: LLMConfig, tools: Tools, provider_factory: ProviderFactory,
                 session_id: str = "") -> None:
        self.config = config
        self.tools = tools
        self.session_id = session_id
        self.history = History(config.history_max_messages, config.history_max_tokens)
        self._provider_factory = provider_factory
        self._provider: ChatProvider | None = None

    async def start(self) -> None:
        """Create the provider client."""
        self._provider = self._provider_factory(self.config)

    async def stop(self) -> None:
        """Close the provider client."""
        if self._provider is not None:
            provider, self._provider = self._provider, None
            await provider.aclose()

    async def handle_command(self, command: Any, ctx: EngineContext) -> dict[str, Any]:
        """Answer one user message; the turn joins the history only if it completes."""
        try:
            text = msgspec.convert(command, LLMCommand).text
        except msgspec.ValidationError:
            raise LLMError(LLMErrorCode.INVALID_COMMAND, 'the command must be {"text": "<your message>"}') from None
        system = [ChatMessage(role="system", content=self.config.system_prompt)] if self.config.system_prompt else []
        turn = [ChatMessage(role="user", content=text)]
        reply: list[str] = []
        usage: Usage | None = None
        rounds = 0
        while True:
            demand_answer = rounds >= self.config.max_tool_rounds
            request = ChatRequest(
                model=self.config.model,
                messages=[*system, *self.history.context([*system, *turn]), *turn],
                tools=self.tools.specs(),
                tool_choice="none" if demand_answer else "auto",
                temperature=self.config.temperature,
                top_p=self.config.top_p,
                max_output_tokens=self.config.max_output_tokens,
            )
            answer = await self._call_model(request, ctx)
            assert answer.end is not None
            text_part = "".join(answer.text)
            reply.append(text_part)
            if answer.end.usage is not None:
                usage = answer.end.usage if usage is None else usage + answer.end.usage
            calls = answer.finished_tool_calls()
            if not calls:
                turn.append(ChatMessage(role="assistant", content=text_part))
                break
            if demand_answer:
                raise LLMError(LLMErrorCode.TOOL_ROUNDS_EXCEEDED,
                               f"the model kept calling tools after {rounds} round(s)")
            turn.append(ChatMessage(role="assistant", content=text_part, tool_calls=calls))
            for call in calls:
                turn.append(ChatMessage(role="tool", tool_call_id=call.id, content=await self._run_tool(call, ctx)))
            rounds += 1
        self.history.append(turn)
        return {"reply": "".join(reply), "finish_reason": answer.end.finish_reason,
                "usage": None if usage is None else msgspec.structs.asdict(usage)}

    # ---------------------------------------------------------------- the model

    async def _call_model(self, request: ChatRequest, ctx: EngineContext) -> _ModelReply:
        """One model call, retried on retryable failures as long as nothing reached the client."""
        attempt = 0
        while True:
            answer = _ModelReply()
            try:
                await self._stream(request, ctx, answer)
                return answer
            except LLMError as exc:
                if answer.streamed or not exc.retryable or attempt >= self.config.max_retries:
                    raise
                delay = exc.retry_after
                if delay is None:
                    delay = self.config.retry_backoff * 2 ** attempt * (0.5 + random.random() / 2)
                if delay > self.config.max_retry_wait:
                    raise
                attempt += 1
                logger.warning("LLM call failed with %s; retry %d/%d in %.2fs", exc.code, attempt,
                               self.config.max_retries, delay, extra={"session_id": self.session_id})
                await anyio.sleep(delay)

    async def _stream(self, request: ChatRequest, ctx: EngineContext, answer: _ModelReply) -> None:
        assert self._provider is not None, "the engine was not started"
        items = self._provider.stream(request)
        timeout, waiting_for = self.config.first_chunk_timeout, "the first chunk"
        try:
            while True:
                try:
                    with anyio.fail_after(timeout):
                        item = await anext(items)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise LLMError(LLMErrorCode.TIMEOUT, f"the model provider sent nothing for {timeout:g} s "
                                   f"(waiting for {waiting_for})") from None
                timeout, waiting_for = self.config.stall_timeout, "the next chunk"
                if isinstance(item, TextDelta):
                    if not item.text:
                        continue
                    answer.size += len(item.text)
                    self._check_size(answer.size)
                    answer.text.append(item.text)
                    await ctx.emit("token", {"text": item.text})
                elif isinstance(item, ToolCallDelta):
                    answer.size += 1 + len(item.arguments)  # (+1: a stream of empty deltas is bounded too)
                    self._check_size(answer.size)
                    call = answer.tool_calls.setdefault(item.index, _PartialToolCall())
                    call.id = call.id or item.id
                    call.name = call.name or item.name
                    if item.arguments:
                        call.arguments.append(item.arguments)
                elif isinstance(item, StreamEnd):
                    answer.end = item
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:  # stopped early (error, cancel): the provider releases its response
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                    await aclose()
        if answer.end is None:
            raise LLMError(LLMErrorCode.STREAM_INTERRUPTED, "the model's reply stream ended before the model finished",
                           retryable=True)

    def _check_size(self, size: int) -> None:
        if size > self.config.max_reply_chars:
            raise LLMError(LLMErrorCode.REPLY_TOO_LONG,
                           f"the model's reply (text and tool calls) exceeded {self.config.max_reply_chars} characters")

    # ---------------------------------------------------------------- tools

    async def _run_tool(self, call: ToolCall, ctx: EngineContext) -> str:
        """Run one tool call (after the user's approval if it needs one); returns what the model is told."""
        tool = self.tools.get(call.name)
        if tool is None:
            return f"Error: there is no tool named {call.name!r}."
        try:
            arguments = tool.parse_arguments(call.arguments)
        except InvalidArguments as exc:
            return f"Error: invalid arguments for {tool.name}: {exc}"
        shown = msgspec.to_builtins(arguments)
        if tool.needs_approval and not await self._approved(tool, shown, ctx):
            return f"The user declined this call to {tool.name}; it was not run."
        if self.config.tool_events:
            await ctx.emit("tool_call", {"tool": tool.name, "args": shown, "id": call.id})
        try:
            result = await tool.call(arguments)
        except ToolError as exc:
            content = f"Error: {exc}"
        except Exception as exc:
            logger.exception("tool %s failed", tool.name, extra={"session_id": self.session_id})
            content = f"Error: the tool failed ({type(exc).__name__})."
        else:
            content = result if isinstance(result, str) else msgspec.json.encode(result).decode()
        if len(content) > self.config.max_tool_result_chars:
            content = content[: self.config.max_tool_result_chars] + " [truncated]"
        if self.config.tool_events:
            await ctx.emit("tool_result", {"tool": tool.name, "result": content, "id": call.id})
        return content

    async def _approved(self, tool: Tool, arguments: Any, ctx: EngineContext) -> bool:
        """Ask the user; anything but ``yes`` (an error answer, an option not offered, no answer in time) declines."""
        shown = msgspec.json.encode(arguments).decode()
        try:
            choice = await ctx.confirm(f"Allow the tool {tool.name} to run with {shown}?", ["yes", "no"],
                                       timeout=self.config.approval_timeout, tool=tool.name, arguments=arguments)
        except (TimeoutError, ServerRequestFailed, ValueError) as exc:
            logger.info("tool %s not approved: %s", tool.name, type(exc).__name__,
                        extra={"session_id": self.session_id})
            return False
        return choice == "yes"


class LLMEngineFactory:
    """The engine factory to register: ``extensions.register_engine("llm", LLMEngineFactory(config))``.

    ``client_fields`` lists the :class:`~llmgine_ws.llm.config.ClientOverrides` fields a client may
    set in ``create_engine.config`` (none by default); any other field fails ``create_engine``.
    ``provider`` builds the adapter (default: the OpenAI-compatible one).
    """

    def __init__(self, config: LLMConfig, *, tools: Tools | None = None, client_fields: Iterable[str] = (),
                 provider: ProviderFactory | None = None) -> None:
        self.config = config
        self.tools = tools if tools is not None else Tools()
        self.client_fields = check_client_fields(client_fields)
        if provider is None:
            from .openai_provider import OpenAIChatProvider

            provider = OpenAIChatProvider
        self.provider = provider

    def __call__(self, session: Session, client_config: dict[str, Any]) -> LLMEngine:
        config = apply_client_config(self.config, client_config, self.client_fields)
        return LLMEngine(config, self.tools, self.provider, session.session_id)
