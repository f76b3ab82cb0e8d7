"""Authentication at the handshake: who is on the other end of a connection.

An *authenticator* is an async callable ``authenticate(handshake) -> Principal | None`` run before
the WebSocket is accepted. Returning ``None`` (or raising :class:`AuthenticationFailed`) refuses the
connection with HTTP 403: no ``connected`` message is sent and nothing is registered.

Credentials reach the server through one of three carriers, looked up in this order:

* ``Authorization: Bearer <credential>`` — for programs that can set headers;
* a ``Sec-WebSocket-Protocol`` entry ``llmgine.auth.<credential>`` offered next to ``llmgine.v1`` —
  browsers cannot set headers on a WebSocket; the server selects ``llmgine.v1`` and never echoes
  the credential;
* a ``token`` query parameter — only when ``allow_query_token`` is on (URLs end up in logs).

Built in: static API keys (:class:`APIKeyAuthenticator`), signed expiring tokens made with an HMAC
secret (:class:`TokenAuthenticator`, :func:`mint_token`), and JWT (:class:`JWTAuthenticator`, needs
the ``jwt`` extra). :func:`any_of` tries several in turn.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import msgspec
from starlette.datastructures import Headers, QueryParams
from starlette.types import Scope

from .config import APIConfig, MissingExtra, env_variable

AUTH_SUBPROTOCOL_PREFIX = "llmgine.auth."


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """The identity an authenticator established at the handshake.

    ``user_id`` groups connections (``send_to_user`` reaches all of them); ``claims`` carries what the
    credential said (token claims, key name...); ``method`` names how it was established.
    """

    user_id: str
    claims: dict[str, Any] = msgspec.field(default_factory=dict)
    method: str = "anonymous"


class AuthenticationFailed(Exception):
    """Raise from an authenticator to refuse a handshake; ``reason`` goes to the audit log only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Handshake:
    """What an authenticator sees: the connection scope and the credential, if one was presented."""

    __slots__ = ("carrier", "client_ip", "credential", "headers", "query_params", "scope", "subprotocols")

    def __init__(self, scope: Scope, *, client_ip: str | None, allow_query_token: bool) -> None:
        self.scope = scope
        self.headers = Headers(scope=scope)
        self.query_params = QueryParams(scope.get("query_string", b""))
        self.client_ip = client_ip
        """The client's address (after trusted-proxy resolution)."""
        self.subprotocols: list[str] = list(scope.get("subprotocols") or [])
        self.credential: str | None = None
        """The presented credential (never log it)."""
        self.carrier: str | None = None
        """Where the credential came from: ``header``, ``subprotocol`` or ``query``."""
        authorization = self.headers.get("authorization", "")
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            self.credential, self.carrier = value.strip(), "header"
            return
        for protocol in self.subprotocols:
            if protocol.startswith(AUTH_SUBPROTOCOL_PREFIX) and len(protocol) > len(AUTH_SUBPROTOCOL_PREFIX):
                self.credential, self.carrier = protocol[len(AUTH_SUBPROTOCOL_PREFIX):], "subprotocol"
                return
        if allow_query_token and self.query_params.get("token"):
            self.credential, self.carrier = self.query_params["token"], "query"


Authenticator = Callable[[Handshake], Awaitable[Principal | None]]
"""``async def authenticate(handshake) -> Principal | None``: None (or AuthenticationFailed) refuses."""


class APIKeyAuthenticator:
    """Static API keys, compared in constant time.

    ``keys`` is a list of keys, or a mapping ``{name: key}``; the principal's ``user_id`` is
    ``api-key:<name>`` (a list's keys are named by a short hash, never by the key itself).
    """

    def __init__(self, keys: Sequence[str] | Mapping[str, str]) -> None:
        named = dict(keys) if isinstance(keys, Mapping) else {_fingerprint(key): key for key in keys}
        if not named or any(not key for key in named.values()):
            raise ValueError("APIKeyAuthenticator needs at least one non-empty key")
        self._keys = [(name, key.encode()) for name, key in named.items()]

    async def __call__(self, handshake: Handshake) -> Principal | None:
        """Accept a presented key that matches one of the configured keys."""
        if handshake.credential is None:
            raise AuthenticationFailed("no credential presented")
        presented = handshake.credential.encode()
        matched: str | None = None
        for name, key in self._keys:  # no early exit: the time taken does not reveal which key matched
            if hmac.compare_digest(presented, key):
                matched = name
        if matched is None:
            raise AuthenticationFailed("unknown API key")
        return Principal(user_id=f"api-key:{matched}", claims={"key": matched}, method="api_key")


def _fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _b64decode(text: str) -> bytes:
    """Strict unpadded base64url: each value has exactly one accepted spelling (no padding, no other
    characters, no unused bits set in the last character), so a token cannot be re-spelt."""
    if len(text) % 4 == 1 or not _B64URL.issuperset(text):
        raise ValueError("not canonical base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64encode(data) != text:
        raise ValueError("not canonical base64url")
    return data


TOKEN_VERSION = "v1"


def mint_token(secret: str, user_id: str, *, ttl: float = 3600.0, claims: Mapping[str, Any] | None = None,
               now: float | None = None) -> str:
    """Make a signed token for :class:`TokenAuthenticator` (HMAC-SHA256 over its payload).

    The token is URL- and subprotocol-safe: ``v1.<payload>.<signature>`` in base64url.
    """
    if not secret:
        raise ValueError("a token secret must not be empty")
    issued = time.time() if now is None else now
    payload = {"sub": user_id, "iat": int(issued), "exp": int(issued + ttl), "claims": dict(claims or {})}
    body = _b64encode(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    signature = hmac.new(secret.encode(), f"{TOKEN_VERSION}.{body}".encode(), hashlib.sha256).digest()
    return f"{TOKEN_VERSION}.{body}.{_b64encode(signature)}"


class TokenAuthenticator:
    """Signed, expiring tokens made by :func:`mint_token` with the same secret."""

    def __init__(self, secret: str, *, leeway: float = 5.0) -> None:
        if not secret:
            raise ValueError("TokenAuthenticator needs a non-empty secret")
        self._secret = secret.encode()
        self._leeway = leeway

    async def __call__(self, handshake: Handshake) -> Principal | None:
        """Accept a token whose signature checks out and that has not expired."""
        token = handshake.credential
        if token is None:
            raise AuthenticationFailed("no credential presented")
        version, _, rest = token.partition(".")
        body, _, signature = rest.partition(".")
        if version != TOKEN_VERSION or not body or not signature:
            raise AuthenticationFailed("malformed token")
        expected = hmac.new(self._secret, f"{version}.{body}".encode(), hashlib.sha256).digest()
        try:
            valid = hmac.compare_digest(_b64decode(signature), expected)
            payload = json.loads(_b64decode(body)) if valid else None
        except (ValueError, TypeError):
            raise AuthenticationFailed("malformed token") from None
        if not valid:
            raise AuthenticationFailed("bad token signature")
        if not isinstance(payload, dict) or not isinstance(payload.get("sub"), str):
            raise AuthenticationFailed("malformed token")
        if not isinstance(payload.get("exp"), int) or payload["exp"] + self._leeway < time.time():
            raise AuthenticationFailed("token expired")
        claims = payload.get("claims")
        claims = dict(claims) if isinstance(claims, dict) else {}
        return Principal(user_id=payload["sub"], claims={**claims, "exp": payload["exp"]}, method="token")


class JWTAuthenticator:
    """JSON Web Tokens (HS256 with a shared secret, RS256 with a public key), via PyJWT.

    Checks the signature, ``exp`` (required), ``nbf``, and ``aud`` / ``iss`` when configured. The
    principal's ``user_id`` is the ``sub`` claim. Needs ``pip install "llmgine-ws[jwt]"``.
    """

    def __init__(self, key: str, *, algorithms: Sequence[str] = ("HS256",), audience: str | None = None,
                 issuer: str | None = None, leeway: float = 5.0) -> None:
        try:
            import jwt
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise MissingExtra('JWT authentication needs the "jwt" extra: pip install "llmgine-ws[jwt]"') from exc
        if not key:
            raise ValueError("JWTAuthenticator needs a key")
        self._jwt = jwt
        self._key = key
        self._algorithms = list(algorithms)
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway

    async def __call__(self, handshake: Handshake) -> Principal | None:
        """Accept a JWT that verifies under the configured key, algorithms, audience and issuer."""
        token = handshake.credential
        if token is None:
            raise AuthenticationFailed("no credential presented")
        try:
            claims = self._jwt.decode(
                token, self._key, algorithms=self._algorithms, audience=self._audience, issuer=self._issuer,
                leeway=self._leeway, options={"require": ["exp", "sub"]},
            )
        except self._jwt.ExpiredSignatureError:
            raise AuthenticationFailed("token expired") from None
        except self._jwt.PyJWTError as exc:  # InvalidKeyError too: an RS256 token against an HMAC secret...
            raise AuthenticationFailed(f"invalid JWT: {type(exc).__name__}") from None
        return Principal(user_id=str(claims["sub"]), claims=claims, method="jwt")


def any_of(*authenticators: Authenticator) -> Authenticator:
    """An authenticator accepting what any of ``authenticators`` accepts (tried in order)."""
    if not authenticators:
        raise ValueError("any_of needs at least one authenticator")

    async def authenticate(handshake: Handshake) -> Principal | None:
        reasons = []
        for authenticator in authenticators:
            try:
                principal = await authenticator(handshake)
            except AuthenticationFailed as exc:
                reasons.append(exc.reason)
                continue
            if principal is not None:
                return principal
        raise AuthenticationFailed("; ".join(dict.fromkeys(reasons)) or "refused")

    return authenticate


def authenticator_from_config(config: APIConfig) -> Authenticator | None:
    """The built-in authenticators the config asks for (any of them may accept), or None."""
    configured: list[Authenticator] = []
    if config.api_keys:
        configured.append(APIKeyAuthenticator(config.api_keys))
    if config.token_secret:
        configured.append(TokenAuthenticator(config.token_secret))
    if config.jwt_key:
        try:
            configured.append(JWTAuthenticator(config.jwt_key, algorithms=config.jwt_algorithms,
                                               audience=config.jwt_audience, issuer=config.jwt_issuer))
        except MissingExtra as exc:
            raise MissingExtra(f"{env_variable('jwt_key')} is set: {exc}") from None
    if not configured:
        return None
    return configured[0] if len(configured) == 1 else any_of(*configured)
