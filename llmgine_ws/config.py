"""Configuration: :class:`APIConfig`, built in code or read from ``LLMGINE_API_*`` variables."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec

ENV_PREFIX = "LLMGINE_API_"
LIST_FIELDS = frozenset({"api_keys", "jwt_algorithms", "allowed_origins", "trusted_proxies"})
"""Fields read from a comma-separated variable."""
SECRET_FIELDS = frozenset({"api_keys", "token_secret", "jwt_key", "admin_token"})
"""Fields never shown in reprs, errors or ``/api/info``."""
_ENV_NAMES = {"api_keys": "LLMGINE_API_KEYS"}


def env_variable(field: str) -> str:
    """The environment variable of a config field (``max_sessions`` → ``LLMGINE_API_MAX_SESSIONS``)."""
    return _ENV_NAMES.get(field, ENV_PREFIX + field.upper())


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the variable or field."""


class MissingExtra(ConfigError, RuntimeError):
    """A setting needs an optional dependency that is not installed (e.g. ``jwt_key`` without the ``jwt`` extra)."""


class ConfigWarning(UserWarning):
    """A likely configuration mistake that does not stop the app (e.g. a misspelled variable)."""


class APIConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Everything an app is configured with. Every field can be set as ``LLMGINE_API_<FIELD>``.

    Values are checked when the config is built, so a bad value fails at startup, not later.
    """

    title: str = "LLMgine API"
    version: str = "1.0.0"
    host: str = "127.0.0.1"
    """Interface the CLI binds to. Loopback by default; use ``0.0.0.0`` in a container."""
    port: int = 8000
    debug: bool = False

    log_format: Literal["text", "json"] = "text"
    """Log output of the CLI: ``text`` lines or ``json`` lines (see llmgine_ws.logconfig)."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    ws_path: str = "/api/ws"
    """Path of the WebSocket endpoint inside the app."""

    max_sessions: int = 100
    """Sessions alive at once across all connections; past it ``SESSION_LIMIT_REACHED``."""
    session_timeout: float = 3600.0
    """Seconds a session may stay without interaction before the reaper closes it."""
    session_reap_interval: float = 30.0
    """How often the reaper looks for expired sessions (seconds)."""

    server_request_timeout: float = 30.0
    """Default timeout of ``send_to_app_and_wait`` (seconds)."""
    max_pending_requests: int = 32
    """Server requests one app may have waiting for an answer; past it ``PendingRequestLimit``."""
    ping_interval: float = 20.0
    """Seconds between ``server_ping`` messages to each connection; 0 turns liveness checks off."""
    missed_pongs: int = 2
    """Unanswered ``server_ping`` messages after which a connection is closed (1011)."""

    outbound_queue_size: int = 256
    """Frames that may wait for a connection's writer (and again, behind them, frames from code that
    cannot wait: replies, broadcasts, deliveries from other nodes). Past it the client is too slow
    to read: closed with 1013 after ``send_grace``."""
    outbound_queue_bytes: int = 4 * 1024 * 1024
    """Bytes (characters) of frames that may wait for a connection's writer, counted like
    ``outbound_queue_size``. The frames queued for one connection never hold more than
    ``2 × outbound_queue_bytes`` (plus one frame per task waiting to send); one frame larger than
    this still goes out when nothing else is queued."""
    send_grace: float = 5.0
    """How long a send may wait for room in a full outbound queue before the connection is closed
    with 1013 (a client that stopped reading must not hold anyone else up)."""
    max_inflight_requests: int = 64
    """Requests one connection may have being handled at once; past it ``TOO_MANY_REQUESTS``."""
    max_inflight_bytes: int = 16 * 1024 * 1024
    """Estimated decoded size of the requests one connection may have being handled or queued at once
    (engine commands waiting for their engine included); past it ``TOO_MANY_REQUESTS``. Decoded JSON
    takes far more memory than its text (``[[],[],…]``: ~25×), so the estimate counts containers and
    separators, not only characters. One request alone is always admitted."""
    max_message_size: int = 1024 * 1024
    """Largest frame accepted from a client (bytes); a larger one closes the connection with 1009."""
    ws_per_message_deflate: bool = False
    """Negotiate permessage-deflate (compressed frames) with clients that offer it (the CLI's transport).
    Off by default: a 1 KiB compressed frame can inflate to ``max_message_size`` and costs the server
    the CPU to inflate it, so a few connections can saturate a core."""
    handshake_timeout: float = 10.0
    """Seconds a client may take to send the complete headers of each HTTP request (the WebSocket upgrade
    included) before the connection is closed with 408 (the CLI's transport; slowloris protection)."""
    max_header_bytes: int = 16 * 1024
    """Largest request line plus headers of an HTTP request (the WebSocket upgrade included); larger gets
    431 (the CLI's transport)."""

    engine_start_timeout: float = 30.0
    """Deadline for an engine's factory and ``start()`` (seconds); past it ``ENGINE_CREATION_FAILED``."""
    engine_stop_timeout: float = 5.0
    """Deadline for an engine's ``stop()`` on every path that ends it (seconds)."""
    engine_idle_timeout: float = 900.0
    """Seconds an engine may sit with no command before it is stopped."""
    engine_event_coalesce_ms: float = 25.0
    """Coalescing of streamed tokens: the ``token`` deltas (payload ``{"text": …}``) a command emits
    within this many milliseconds go out as one ``engine_event`` carrying their concatenated text and
    ``coalesced``: how many deltas it merged. Other events are never merged or reordered; a client too
    slow to keep up gets bigger batches instead of waiting engines. 0 turns it off (one frame per event)."""
    engine_event_coalesce_bytes: int = 64 * 1024
    """The most characters of token text one coalesced ``engine_event`` carries (a single larger
    delta still goes out, alone)."""
    callback_timeout: float = 10.0
    """Deadline for each connection/session callback (seconds); a slow one is abandoned and logged."""

    resume_window: float = 120.0
    """Seconds an app whose socket dropped stays resumable (sessions, engines, pending questions kept;
    frames buffered) — only for clients that ``ack``; see docs/resume.md. 0 turns resume off."""
    resume_buffer_bytes: int = 1024 * 1024
    """Replay buffer of one resumable app (characters of unacked frames). Past it, while connected, the
    oldest frames are evicted (a resume from before them is ``gap``); while detached the app ends."""
    resume_node_buffer_bytes: int = 256 * 1024 * 1024
    """Replay buffers of all the apps of this node together, bounded like ``resume_buffer_bytes``."""
    resume_dedupe_entries: int = 1024
    """Answered client requests one resumable app remembers, so that one resent after a resume is not
    executed again."""

    drain_timeout: float = 10.0
    """On shutdown, how long running handlers and engine commands may take to finish (seconds)."""
    shutdown_timeout: float = 10.0
    """After the drain, how long shutdown waits for connections to finish closing (seconds)."""
    handle_signals: bool = True
    """Drain on SIGTERM/SIGINT before the server closes its sockets (then pass the signal on)."""

    # ---- security: authentication (see llmgine_ws.auth) ----
    api_keys: list[str] = msgspec.field(default_factory=list)
    """Static API keys clients may present (``LLMGINE_API_KEYS``, comma-separated)."""
    token_secret: str | None = None
    """HMAC secret for signed tokens made with ``llmgine_ws.auth.mint_token``."""
    jwt_key: str | None = None
    """JWT verification key: the shared secret (HS256) or a PEM public key (RS256). Needs the ``jwt`` extra."""
    jwt_algorithms: list[str] = msgspec.field(default_factory=lambda: ["HS256"])
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    allow_query_token: bool = False
    """Also accept the credential as a ``token`` query parameter (URLs end up in logs: off by default)."""
    admin_token: str | None = None
    """Bearer token required by ``/api/connections`` (which reveals app ids)."""

    # ---- security: origins and client addresses ----
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    """Browser origins allowed to connect (``https://app.example.com``), or ``*``. Empty (the default):
    same-origin browsers only. Clients that send no ``Origin`` (programs, not browsers) are not affected."""
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    """Proxy addresses or CIDR ranges whose ``X-Forwarded-For`` is believed."""

    # ---- security: limits (0 turns a rate limit off) ----
    max_connections: int = 10_000
    """Connections at once, in total; more are refused at the handshake (503)."""
    max_connections_per_ip: int = 100
    """Connections at once from one client address; more are refused at the handshake (429)."""
    max_sessions_per_connection: int = 20
    """Sessions one connection may hold; past it ``SESSION_LIMIT_REACHED``."""
    max_sessions_per_ip: int = 20
    """Sessions the connections of one client address may hold together; past it
    ``SESSION_LIMIT_REACHED`` (so one address cannot take the whole ``max_sessions`` pool)."""
    max_sessions_per_user: int = 40
    """Sessions the connections of one authenticated user may hold together, from any address."""
    rate_limit: float = 100.0
    """Messages per second one connection may send (token bucket); past it ``RATE_LIMITED``."""
    rate_burst: int = 200
    """Messages one connection may send at once before ``rate_limit`` applies."""
    rate_limit_strikes: int = 50
    """Rate-limited messages tolerated (refilling at one per second) before the connection is closed (1008)."""
    user_rate_limit: float = 200.0
    """Messages per second all the connections of one authenticated user may send together (token
    bucket, on top of ``rate_limit``); past it ``RATE_LIMITED``. 0 turns it off."""
    user_rate_burst: int = 400
    """Messages one user's connections may send at once before ``user_rate_limit`` applies."""
    broadcast_rate_limit: float = 50.0
    """Broadcasts per second the server may send (token bucket); past it ``broadcast`` raises ``RateLimited``."""
    broadcast_burst: int = 100

    metrics: bool = True
    """Serve Prometheus metrics at ``/metrics`` (when the ``metrics`` extra is installed)."""

    backplane: str = "memory"
    """Where the nodes of a cluster meet: ``memory`` (one process, no cluster), ``nats://host:4222``
    (or ``tls://``; needs the ``nats`` extra) or ``redis://host:6379/0`` (or ``rediss://``; needs the
    ``redis`` extra). See ``docs/scaling.md``."""
    cluster_name: str = "llmgine"
    """Prefix of every backplane subject: deployments sharing one broker are separate clusters."""
    heartbeat_interval: float = 2.0
    """Seconds between a node's heartbeats; a silent node leaves presence within two intervals."""
    node_name: str = ""
    """How this node is labelled in presence output (default ``hostname:pid``)."""

    custom: dict[str, Any] = msgspec.field(default_factory=dict)
    """Free-form settings for your extensions (``LLMGINE_API_CUSTOM`` takes a JSON object)."""

    def __post_init__(self) -> None:
        for name in ("port", "max_sessions", "missed_pongs", "outbound_queue_size", "outbound_queue_bytes",
                     "max_inflight_bytes", "max_sessions_per_ip", "max_sessions_per_user", "user_rate_burst",
                     "max_inflight_requests",
                     "max_message_size", "max_pending_requests", "max_connections", "max_connections_per_ip",
                     "max_sessions_per_connection", "engine_event_coalesce_bytes", "rate_burst",
                     "max_header_bytes", "rate_limit_strikes", "broadcast_burst", "resume_buffer_bytes",
                     "resume_node_buffer_bytes", "resume_dedupe_entries"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.port > 65535:
            raise ValueError("port must be <= 65535")
        for name in ("session_timeout", "session_reap_interval", "server_request_timeout", "send_grace",
                     "shutdown_timeout", "drain_timeout", "engine_start_timeout", "engine_stop_timeout",
                     "engine_idle_timeout", "callback_timeout", "handshake_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("rate_limit", "broadcast_rate_limit", "user_rate_limit"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 (0 turns the limit off)")
        for origin in self.allowed_origins:
            check_origin(origin)
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {proxy!r} is not an IP address or network") from None
        if self.resume_window < 0:
            raise ValueError("resume_window must be >= 0 (0 turns resume off)")
        if not 0 <= self.engine_event_coalesce_ms <= 60_000:
            raise ValueError("engine_event_coalesce_ms must be between 0 (off) and 60000")
        if self.ping_interval < 0:
            raise ValueError("ping_interval must be >= 0 (0 disables server pings)")
        if not self.ws_path.startswith("/"):
            raise ValueError("ws_path must start with '/'")
        backplane_kind(self.backplane)
        check_cluster_name(self.cluster_name)
        check_heartbeat_interval(self.heartbeat_interval)

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={'<secret>' if name in SECRET_FIELDS and getattr(self, name) else getattr(self, name)!r}"
            for name in self.__struct_fields__
        )
        return f"APIConfig({fields})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> APIConfig:
        """Build a config from ``LLMGINE_API_*`` variables (and keyword overrides, which win).

        Raises :class:`ConfigError` naming the variable when a value is invalid.
        """
        environ = os.environ if environ is None else environ
        warn_unknown_variables(environ)
        raw: dict[str, Any] = {}
        for name in cls.__struct_fields__:
            variable = env_variable(name)
            value = environ.get(variable)
            if value is None:
                continue
            if name in LIST_FIELDS:
                raw[name] = [item.strip() for item in value.split(",") if item.strip()]
            elif name == "custom":
                try:
                    raw[name] = msgspec.json.decode(value)
                except msgspec.DecodeError as exc:
                    raise ConfigError(f"{ENV_PREFIX}CUSTOM must be a JSON object: {exc}") from None
            else:
                raw[name] = value
        sources = {name: f"{env_variable(name)}={'<secret>' if name in SECRET_FIELDS else repr(raw[name])}"
                   for name in raw}
        raw.update(overrides)
        sources.update({name: f"{name}={value!r}" for name, value in overrides.items()})
        return cls._build(raw, sources)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> APIConfig:
        """Build a config from a mapping (e.g. parsed from a file); raises :class:`ConfigError`."""
        return cls._build(dict(values), {name: f"{name}={value!r}" for name, value in values.items()})

    @classmethod
    def _build(cls, raw: dict[str, Any], sources: dict[str, str]) -> APIConfig:
        try:
            return msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(_describe(str(exc), sources)) from None


BACKPLANE_SCHEMES = {"nats": "nats", "tls": "nats", "redis": "redis", "rediss": "redis"}
"""Backplane URL scheme → backplane kind."""


def backplane_kind(url: str) -> str:
    """``memory``, ``nats`` or ``redis`` for a backplane setting; ``ValueError`` otherwise."""
    if url == "memory":
        return "memory"
    scheme, separator, _ = url.partition("://")
    kind = BACKPLANE_SCHEMES.get(scheme) if separator else None
    if kind is None:
        raise ValueError("backplane must be 'memory', 'nats://…', 'tls://…', 'redis://…' or 'rediss://…'")
    return kind


def check_origin(origin: str) -> None:
    """Raise ``ValueError`` unless ``origin`` is ``*`` or ``scheme://host[:port]`` (what browsers send)."""
    if origin == "*":
        return
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        example = f"https://{origin}" if "://" not in origin else "https://app.example.com"
        raise ValueError(f"allowed_origins: {origin!r} is not an origin: write it as browsers send it, "
                         f"scheme://host[:port] (e.g. {example!r}), or '*'")


def known_variables() -> dict[str, str]:
    """Every ``LLMGINE_API_*`` variable :meth:`APIConfig.from_env` reads → its field."""
    return {env_variable(name): name for name in APIConfig.__struct_fields__}


def warn_unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """Warn (:class:`ConfigWarning`) about each ``LLMGINE_API_*`` variable that is no setting, naming the
    closest valid one: a misspelled variable would otherwise be ignored without a word. Returns the
    warnings' texts."""
    known = known_variables()
    texts = []
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or variable in known:
            continue
        close = difflib.get_close_matches(variable, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else " (see docs/configuration.md)"
        texts.append(f"{variable} is not an llmgine_ws setting and is ignored{hint}")
        warnings.warn(texts[-1], ConfigWarning, stacklevel=2)  # one place: shown once per process
    return texts


def check_cluster_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` can prefix backplane subjects (1-64 of ``[A-Za-z0-9_-]``)."""
    if not (0 < len(name) <= 64 and all(ch.isascii() and (ch.isalnum() or ch in "_-") for ch in name)):
        raise ValueError("cluster_name must be 1-64 characters of letters, digits, '_' and '-'")


def check_heartbeat_interval(seconds: float) -> None:
    """Raise ``ValueError`` unless ``seconds`` is a usable heartbeat interval (> 0)."""
    if not seconds > 0:
        raise ValueError("heartbeat_interval must be > 0")


def _describe(error: str, sources: dict[str, str]) -> str:
    """Name the variable behind a validation error (msgspec reports ``$.field`` paths or a message)."""
    for name, source in sources.items():
        if f"`$.{name}`" in error or re.match(rf"{name}\b", error) or f"field `{name}`" in error:
            return f"invalid configuration {source}: {error}"
    return f"invalid configuration: {error}"
