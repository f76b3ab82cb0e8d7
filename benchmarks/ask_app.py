"""The llmgine_ws side of the server→client round-trip benchmark (W2, ``benchmarks/ask.py``).

The default app plus one custom message: ``bench_ask`` starts, on the connection that sent it, a
closed loop of ``MessagingAPI.send_to_app_and_wait(app_id, "server_request", {"request_type":
"bench"})`` — the call a backend makes to ask the user something — until the app disconnects.
Configured from ``LLMGINE_API_*`` like ``llmgine_ws.main:app``.
"""

from __future__ import annotations

from typing import Any

from llmgine_ws import Extensions, HandlerContext, MessagingError, create_app

_REQUEST = {"request_type": "bench"}


async def bench_ask(data: dict[str, Any], ctx: HandlerContext) -> None:
    """Ask this app again and again, each time waiting for its answer, until it is gone."""
    api, app_id = ctx.messaging, ctx.app_id
    try:
        while True:
            await api.send_to_app_and_wait(app_id, "server_request", _REQUEST, timeout=30)
    except MessagingError:
        return  # the app disconnected (the benchmark's window is over)


extensions = Extensions()
extensions.register_handler("bench_ask", dict[str, Any], bench_ask)
app = create_app(extensions=extensions)
