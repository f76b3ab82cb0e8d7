"""A chat server on a real model: the ``llm`` engine on any OpenAI-compatible endpoint.

Configured from the environment (the ``openai`` extra must be installed)::

    OPENAI_BASE_URL=http://localhost:11434/v1   # Ollama here; or vLLM, llama.cpp, LM Studio, OpenAI...
    OPENAI_API_KEY=...                          # anything for keyless local servers
    LLMGINE_LLM_MODEL=llama3.1:8b

    python -m llmgine_ws --app examples.llm_chat:app      # from the repository root

A client creates a session and an engine of type ``"llm"``, then sends commands ``{"text": "..."}``:
the reply streams as ``engine_event``s of type ``token`` (``{"text": <delta>}``) and the command's
result is ``{"reply", "finish_reason", "usage"}``. The model may call ``get_weather(city)``; each
call first asks the user through a ``user_confirmation`` server request (options ``yes`` / ``no``).
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.applications import Starlette

from llmgine_ws import APIConfig, Extensions, create_app
from llmgine_ws.llm import LLMConfig, LLMEngineFactory, Tools

FORECASTS = {"paris": "18°C and cloudy", "oslo": "4°C with light snow", "rome": "24°C and sunny"}


async def get_weather(city: str) -> str:
    """The current weather in a city."""
    # A stand-in for a weather API: the point is the approval round trip, not meteorology.
    return f"{FORECASTS.get(city.strip().lower(), '21°C and sunny')} in {city}"


def build_tools() -> Tools:
    """The engine's tools: ``get_weather``, which the user must approve each time."""
    tools = Tools()
    tools.register(get_weather, needs_approval=True)
    return tools


def build_app(config: APIConfig | None = None, *, llm: LLMConfig | None = None,
              environ: Mapping[str, str] | None = None, engine_types: tuple[str, ...] = ("llm",)) -> Starlette:
    """The app: the LLM engine registered under ``engine_types`` (the chat demo also uses ``"chat"``)."""
    extensions = Extensions()
    factory = LLMEngineFactory(llm or LLMConfig.from_env(environ), tools=build_tools())
    for engine_type in engine_types:
        extensions.register_engine(engine_type, factory)
    return create_app(config or APIConfig.from_env(environ, title="LLMgine LLM chat"), extensions)


app = build_app()
