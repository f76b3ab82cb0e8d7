"""Target apps for ``resume.py``: the same llmgine_ws app with resume on (``on``) and off (``off``).

Both have the ``stream`` engine of ``engine_app.py``; neither has a rate limit or server pings.
"""

from __future__ import annotations

from benchmarks.engine_app import StreamEngine
from llmgine_ws import APIConfig, Extensions, create_app


def _app(resume_window: float) -> object:
    extensions = Extensions()
    extensions.register_engine("stream", StreamEngine)
    return create_app(APIConfig.from_env(rate_limit=0, ping_interval=0, resume_window=resume_window,
                                         max_connections_per_ip=100_000, max_sessions=100_000,
                                         max_sessions_per_ip=100_000, max_sessions_per_connection=100,
                                         engine_event_coalesce_ms=0),
                      extensions)


on = _app(120.0)
"""Resume on: an acking client's frames are kept until acked."""
off = _app(0.0)
"""Resume off: the same acks change nothing."""
