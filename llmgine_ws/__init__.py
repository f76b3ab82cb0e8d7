"""llmgine_ws: a bidirectional WebSocket messaging layer for LLM applications.

Start with :func:`create_app`; extend with :class:`Extensions`; reach clients from your backend with
the :class:`MessagingAPI` (``extensions.get_messaging_api()`` or :func:`get_messaging_api`).
"""

from .app import create_app, get_messaging_api, lifespan, mount
from .config import APIConfig, ConfigError, ConfigWarning
from .context import NO_REPLY, HandlerContext
from .engines import Engine, EngineContext
from .errors import (
    AppDisconnected,
    AppNotConnected,
    BackplaneUnavailable,
    ErrorCode,
    MessageTooLarge,
    MessagingError,
    PendingRequestLimit,
    ProtocolError,
    ServerRequestFailed,
    ServerRequestTimeout,
    ServerShuttingDown,
    SessionNotFound,
)
from .extensions import Extensions
from .messaging import BlockingMessagingAPI, MessagingAPI, ServerResponse
from .runtime import Runtime, get_runtime
from .sessions import Session

__version__ = "0.1.0"

__all__ = [
    "NO_REPLY",
    "APIConfig",
    "AppDisconnected",
    "AppNotConnected",
    "BackplaneUnavailable",
    "BlockingMessagingAPI",
    "ConfigError",
    "ConfigWarning",
    "Engine",
    "EngineContext",
    "ErrorCode",
    "Extensions",
    "HandlerContext",
    "MessageTooLarge",
    "MessagingAPI",
    "MessagingError",
    "PendingRequestLimit",
    "ProtocolError",
    "Runtime",
    "ServerRequestFailed",
    "ServerRequestTimeout",
    "ServerResponse",
    "ServerShuttingDown",
    "Session",
    "SessionNotFound",
    "create_app",
    "get_messaging_api",
    "get_runtime",
    "lifespan",
    "mount",
]
