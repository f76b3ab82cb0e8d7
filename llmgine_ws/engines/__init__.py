"""Engines: the per-session workers (LLM agents) that clients drive with ``engine_command``.

An engine is plain async Python implementing :class:`Engine` (:mod:`.api`). Each session has at most
one; its commands run one at a time, in arrival order, in a worker task that belongs to the owning
connection (:mod:`.worker`), so nothing an engine does can outlive the connection. While a command
runs, the engine talks to its client through :class:`EngineContext`: stream events, ask the user,
ask for a confirmation, notify. :class:`EngineManager` (:mod:`.manager`) owns every engine of an app.
"""

from .api import Engine, EngineContext, EngineFactory
from .manager import EngineManager
from .worker import EngineHandle, EngineStatus

__all__ = ["Engine", "EngineContext", "EngineFactory", "EngineHandle", "EngineManager", "EngineStatus"]
