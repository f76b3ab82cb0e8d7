"""Who is on the other end of a connection."""

from __future__ import annotations

from typing import Any

import msgspec


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """The identity an authenticator established at the handshake.

    ``user_id`` groups connections (``send_to_user`` reaches all of them); ``claims`` carries what the
    credential said (token claims, key name...); ``method`` names how it was established.
    """

    user_id: str
    claims: dict[str, Any] = msgspec.field(default_factory=dict)
    method: str = "anonymous"
