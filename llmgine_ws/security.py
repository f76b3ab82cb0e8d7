"""Handshake gatekeeping and limits: origins, client addresses, connection caps, rate limits."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import Scope

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``take()`` spends one if there is one."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = time.monotonic()

    def take(self, now: float | None = None) -> bool:
        """Spend a token; False (and nothing spent) when the bucket is empty."""
        now = time.monotonic() if now is None else now
        tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False

    def retry_after(self) -> float:
        """Seconds until the next token (after a failed ``take``)."""
        return max(0.0, (1.0 - self._tokens) / self.rate) if self.rate > 0 else float("inf")


class RateLimiter:
    """A connection's message budget plus its strike budget for sustained abuse."""

    __slots__ = ("messages", "strikes")

    def __init__(self, rate: float, burst: int, strikes: int) -> None:
        self.messages = TokenBucket(rate, burst)
        self.strikes = TokenBucket(1.0, strikes)


class SharedBuckets:
    """One token bucket per key (an authenticated user), shared by all of the key's connections and
    forgotten with the last of them."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[TokenBucket, int]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, key: str) -> TokenBucket:
        """The key's bucket, counting one more holder."""
        bucket, holders = self._buckets.get(key) or (TokenBucket(self.rate, self.burst), 0)
        self._buckets[key] = (bucket, holders + 1)
        return bucket

    def release(self, key: str) -> None:
        """One holder fewer; the bucket goes with its last holder."""
        entry = self._buckets.get(key)
        if entry is None:
            return
        if entry[1] <= 1:
            del self._buckets[key]
        else:
            self._buckets[key] = (entry[0], entry[1] - 1)


UNVERIFIED_FORWARDED = "forwarded-unverified"
"""The client address of every connection whose address the server rewrote from ``X-Forwarded-For``
(uvicorn's default ``--proxy-headers``) while ``trusted_proxies`` is empty: the header was not ours to
believe, and the real peer is lost, so they all share one address's caps (as they would without the
rewrite: they come through the same local proxy)."""


def resolve_client_ip(scope: Scope, trusted_proxies: Sequence[IPNetwork]) -> str | None:
    """The client's address: the peer, or — only when the peer is a trusted proxy — the right-most
    address in ``X-Forwarded-For`` that is not itself a trusted proxy.

    With no trusted proxies, a peer address that is one of the request's own ``X-Forwarded-For`` hops
    was put there by the server (uvicorn's proxy-headers rewrite, on by default under plain
    ``uvicorn``): :data:`UNVERIFIED_FORWARDED`, never the client's claim.
    """
    client = scope.get("client")
    peer: str | None = client[0] if client else None
    if peer is None:
        return peer
    if not trusted_proxies:
        return UNVERIFIED_FORWARDED if peer in {_hop_host(hop) for hop in _forwarded_hops(scope)} else peer
    if not _is_trusted(peer, trusted_proxies):
        return peer
    hops = _forwarded_hops(scope)
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted_proxies):
            return hop if _is_ip(hop) else peer
    return hops[0] if hops else peer


def _forwarded_hops(scope: Scope) -> list[str]:
    hops: list[str] = []
    for name, value in scope.get("headers") or ():
        if name == b"x-forwarded-for":
            hops.extend(hop.strip() for hop in value.decode("latin-1").split(",") if hop.strip())
    return hops


def _hop_host(hop: str) -> str:
    """The host of an ``X-Forwarded-For`` hop written ``host``, ``host:port`` or ``[v6]:port``."""
    if hop.startswith("["):
        return hop[1:].partition("]")[0]
    return hop.partition(":")[0] if hop.count(":") == 1 else hop


def parse_networks(values: Sequence[str]) -> list[IPNetwork]:
    """Parse addresses and CIDR ranges (already validated by the config)."""
    return [ipaddress.ip_network(value, strict=False) for value in values]


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_trusted(address: str, trusted: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def origin_allowed(scope: Scope, allowed_origins: Sequence[str], *, loopback_only: bool = False) -> bool:
    """Whether a handshake's ``Origin`` may connect (cross-site WebSocket hijacking protection).

    No ``Origin`` header: not a browser, allowed (authentication is what guards those). ``*``: any.
    An empty list: same origin only (the Origin's host and port equal the ``Host`` the client
    connected to) and, with ``loopback_only`` (a server without authentication), only when that host
    is a loopback name or address: a DNS-rebinding page (``http://evil.com:P`` resolved to 127.0.0.1)
    is same-origin with itself, so on an open server the Host header proves nothing. Otherwise the
    Origin must be one of the listed ``scheme://host[:port]`` values.
    """
    headers = Headers(scope=scope)
    origin = headers.get("origin")
    if origin is None:
        return True
    if "*" in allowed_origins:
        return True
    normalised = _normalise_origin(origin)
    if normalised is None:
        return False
    if allowed_origins:
        return normalised in {_normalise_origin(allowed) for allowed in allowed_origins}
    host = headers.get("host")
    if host is None:
        return False
    scheme, _, netloc = normalised.partition("://")
    if netloc != _netloc(host.lower(), "https" if scheme == "https" else "http"):
        return False
    return not loopback_only or is_loopback_host(urlsplit(normalised).hostname or "")


def is_loopback_host(hostname: str) -> bool:
    """``localhost`` (and ``*.localhost``), ``127.0.0.0/8`` or ``::1``: names that only reach this machine."""
    if hostname == "localhost" or hostname.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(hostname.strip("[]")).is_loopback
    except ValueError:
        return False


def _normalise_origin(origin: str) -> str | None:
    try:
        parts = urlsplit(origin.strip().lower())
    except ValueError:
        return None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        return None
    return f"{parts.scheme}://{_netloc(parts.netloc, parts.scheme)}"


def _netloc(netloc: str, scheme: str) -> str:
    """``host[:port]`` without the scheme's default port."""
    default = ":443" if scheme == "https" else ":80"
    return netloc[: -len(default)] if netloc.endswith(default) else netloc


class ConnectionCounter:
    """Connections at once, in total and per client address."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self._per_ip: dict[str, int] = {}

    def refusal(self, client_ip: str | None, overdraft: int = 0) -> tuple[int, str] | None:
        """Why a new connection from ``client_ip`` would exceed a cap (HTTP status, reason), or None.

        ``overdraft`` connections past the per-address cap are allowed (one, while the address has a
        detached app: the connection that resumes it must get through; see docs/resume.md)."""
        if self.total >= self.max_total + overdraft:
            return 503, f"the server is at its limit of {self.max_total} connections"
        if client_ip is not None and self._per_ip.get(client_ip, 0) >= self.max_per_ip + overdraft:
            return 429, f"too many connections from this address (limit {self.max_per_ip})"
        return None

    @property
    def addresses(self) -> int:
        """Client addresses with at least one connection counted."""
        return len(self._per_ip)

    def add(self, client_ip: str | None) -> None:
        """Count a connection in."""
        self.total += 1
        if client_ip is not None:
            self._per_ip[client_ip] = self._per_ip.get(client_ip, 0) + 1

    def remove(self, client_ip: str | None) -> None:
        """Count a connection out."""
        self.total -= 1
        if client_ip is not None:
            remaining = self._per_ip.get(client_ip, 0) - 1
            if remaining > 0:
                self._per_ip[client_ip] = remaining
            else:
                self._per_ip.pop(client_ip, None)
