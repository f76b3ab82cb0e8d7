"""Tools the model may call: plain Python functions whose JSON Schema comes from their type hints.

::

    tools = Tools()

    @tools.register(needs_approval=True)
    async def get_weather(city: str) -> str:
        "The current weather in a city."
        ...

The schema is msgspec's for a struct built from the signature, so ``Annotated[int, Meta(ge=1)]``
constraints, defaults, enums, ``Literal`` and nested Structs all carry over, and the model's
arguments are validated against the same struct before the function runs.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import anyio.to_thread
import msgspec

from .messages import ToolSpec

ToolFunction = Callable[..., Any]
F = TypeVar("F", bound=ToolFunction)


class ToolError(Exception):
    """Raise from a tool to tell the model what went wrong (the message is shown to the model).

    Any other exception is reported to the model only by its type name: its text may hold secrets.
    """


class InvalidArguments(Exception):
    """The model's arguments are not valid JSON for the tool's parameters."""


class Tool:
    """One registered function: its name, schema, and whether a user must approve each call."""

    def __init__(self, function: ToolFunction, *, name: str | None = None, description: str | None = None,
                 needs_approval: bool = False) -> None:
        self.function = function
        self.name = name or function.__name__
        self.description = description if description is not None else _summary(function)
        self.needs_approval = needs_approval
        self.arguments_type = _arguments_struct(function, self.name)
        self.spec = ToolSpec(self.name, self.description, _parameters_schema(self.arguments_type))

    def parse_arguments(self, arguments: str) -> dict[str, Any]:
        """The model's JSON arguments, validated and converted (``InvalidArguments`` otherwise)."""
        try:
            parsed = msgspec.json.decode(arguments or "{}", type=self.arguments_type)
        except msgspec.DecodeError as exc:  # ValidationError included
            raise InvalidArguments(str(exc)) from None
        return {field: getattr(parsed, field) for field in parsed.__struct_fields__}

    async def call(self, arguments: dict[str, Any]) -> Any:
        """Run the function: coroutine functions directly, plain ones in a worker thread."""
        if inspect.iscoroutinefunction(self.function):
            return await self.function(**arguments)
        result = await anyio.to_thread.run_sync(functools.partial(self.function, **arguments))
        if inspect.isawaitable(result):
            return await result
        return result


class Tools:
    """The tools of an engine type, by name."""

    def __init__(self, *functions: ToolFunction) -> None:
        self._tools: dict[str, Tool] = {}
        for function in functions:
            self.add(Tool(function))

    def add(self, tool: Tool) -> None:
        """Register a :class:`Tool` (names are unique)."""
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool

    def register(self, function: F | None = None, *, name: str | None = None, description: str | None = None,
                 needs_approval: bool = False) -> Any:
        """Register a function (sync or async); usable as ``@tools.register`` or ``@tools.register(...)``.

        ``description`` defaults to the docstring's first paragraph; ``needs_approval`` makes every
        call wait for the user's ``yes`` through ``ctx.confirm``.
        """

        def decorate(fn: F) -> F:
            self.add(Tool(fn, name=name, description=description, needs_approval=needs_approval))
            return fn

        return decorate if function is None else decorate(function)

    def get(self, name: str) -> Tool | None:
        """The tool called ``name``, if registered."""
        return self._tools.get(name)

    def specs(self) -> list[ToolSpec]:
        """What the model is told about the tools."""
        return [tool.spec for tool in self._tools.values()]

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)


def _summary(function: ToolFunction) -> str:
    doc = inspect.getdoc(function) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ").strip()


def _arguments_struct(function: ToolFunction, name: str) -> type[msgspec.Struct]:
    hints = typing.get_type_hints(function, include_extras=True)
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise TypeError(f"tool {name!r}: *args/**kwargs cannot be described to a model")
        if parameter.name not in hints:
            raise TypeError(f"tool {name!r}: parameter {parameter.name!r} needs a type hint (it becomes the schema)")
        annotation = hints[parameter.name]
        if parameter.default is parameter.empty:
            fields.append((parameter.name, annotation))
        else:
            fields.append((parameter.name, annotation, parameter.default))
    return msgspec.defstruct(name, fields, kw_only=True, forbid_unknown_fields=True)


def _parameters_schema(arguments_type: type[msgspec.Struct]) -> dict[str, Any]:
    (_,), components = msgspec.json.schema_components([arguments_type], ref_template="#/$defs/{name}")
    schema = dict(components.pop(arguments_type.__name__))
    schema.pop("title", None)
    if components:  # nested structs and enums: referenced from the parameters object
        schema["$defs"] = components
    return schema
