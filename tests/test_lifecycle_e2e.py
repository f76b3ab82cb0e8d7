"""Liveness, expiry, callbacks and shutdown over a real socket."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from llmgine_ws import Extensions, Session
from llmgine_ws.client import RequestError, connect
from llmgine_ws.lifecycle import State

from .support import serve, wait_cleaned

pytestmark = pytest.mark.anyio


async def test_missed_pongs_close_the_connection_and_clean_up(make_app: Any) -> None:
    app = make_app(ping_interval=0.05, missed_pongs=2)
    async with serve(app) as server, connect(server.ws_url, resume=False) as alive, \
            connect(server.ws_url, auto_pong=False, resume=False) as silent:
        await silent.create_session()
        connection = server.runtime.hub.get(silent.app_id)
        assert await silent.wait_closed(timeout=5) == 1011
        await wait_cleaned(connection)
        assert silent.app_id not in server.runtime.hub
        assert server.runtime.sessions.expired(0) == []
        # The client that answers its pings lived through the same intervals and is still served.
        assert (await alive.request("ping")).type == "ping_res"
        assert alive.app_id in server.runtime.hub


async def test_server_ping_shape(make_app: Any) -> None:
    async with serve(make_app(ping_interval=0.05)) as server, \
            connect(server.ws_url, auto_pong=False) as client:
        ping = await client.receive(timeout=5)
        assert ping.type == "server_ping"
        assert ping.server_initiated is True
        assert ping.data["timestamp"].endswith("Z")
        await client.send("server_pong", {"timestamp": ping.data["timestamp"], "server_timestamp": "now"},
                          message_id=ping.message_id)
        connection = server.runtime.hub.get(client.app_id)
        assert connection is not None
        await server.eventually(lambda: ping.message_id not in connection.unanswered_pings)


async def test_idle_sessions_expire_and_the_client_is_told(make_app: Any) -> None:
    destroyed: list[str] = []
    extensions = Extensions()

    async def on_destroyed(session: Session) -> None:
        destroyed.append(session.session_id)

    extensions.register_session_callback("session_destroyed", on_destroyed)
    app = make_app(extensions, session_timeout=0.2, session_reap_interval=0.05)
    async with serve(app) as server, connect(server.ws_url) as client:
        session_id = await client.create_session()
        notice = await client.receive(timeout=5)
        assert notice.type == "notification"
        assert notice.data["notification_type"] == "session_expired"
        assert notice.data["session_id"] == session_id
        with pytest.raises(RequestError) as error:
            await client.request("status", {"session_id": session_id})
        assert error.value.code == "SESSION_NOT_FOUND"
        assert destroyed == [session_id]
        assert server.runtime.messaging.get_app_sessions(client.app_id) == []


async def test_session_callbacks_for_every_path(make_app: Any) -> None:
    events: list[tuple[str, str]] = []
    extensions = Extensions()

    async def created(session: Session) -> None:
        events.append(("created", session.session_id))

    async def destroyed(session: Session) -> None:
        events.append(("destroyed", session.session_id))

    extensions.register_session_callback("session_created", created)
    extensions.register_session_callback("session_destroyed", destroyed)
    async with serve(make_app(extensions)) as server:
        async with connect(server.ws_url) as client:
            closed = await client.create_session()
            dropped = await client.create_session()
            await client.request("close_session", {"session_id": closed})
            connection = server.runtime.hub.get(client.app_id)
        await wait_cleaned(connection)
    assert events == [("created", closed), ("created", dropped), ("destroyed", closed), ("destroyed", dropped)]


async def test_failing_callbacks_never_stop_cleanup(make_app: Any) -> None:
    extensions = Extensions()
    later: list[str] = []

    async def broken(arg: Any) -> None:
        raise RuntimeError("callback bug")

    async def after(app_id: str) -> None:
        later.append(app_id)

    extensions.register_session_callback("session_destroyed", broken)
    extensions.register_connection_callback("disconnect", broken)
    extensions.register_connection_callback("disconnect", after)
    async with serve(make_app(extensions)) as server:
        async with connect(server.ws_url) as client:
            await client.create_session()
            connection = server.runtime.hub.get(client.app_id)
        await wait_cleaned(connection)
        assert later == [client.app_id]
        assert len(server.runtime.sessions) == 0
        assert len(server.runtime.hub) == 0


async def test_readiness_follows_the_lifespan(make_app: Any) -> None:
    app = make_app()
    runtime = app.state.llmgine
    assert runtime.readiness() == (False, ["not started (lifespan not running)"])
    async with serve(app) as server, httpx.AsyncClient(base_url=server.http_url) as http:
        ready = await http.get("/health/ready")
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "ready"
        assert body["checks"]["background_tasks"] == "running"
        async with connect(server.ws_url) as client:
            await client.create_session()
            body = (await http.get("/health/ready")).json()
            assert (body["connections"], body["sessions"], body["pending_server_requests"]) == (1, 1, 0)
    assert runtime.readiness()[0] is False
    assert runtime.lifecycle.state is State.STOPPED


async def test_shutdown_closes_connections_and_fails_pending_requests(make_app: Any) -> None:
    """The runtime's own shutdown (used when the host server does not close sockets first)."""
    from llmgine_ws import ServerShuttingDown

    app = make_app()
    runtime = app.state.llmgine
    async with serve(app) as server, connect(server.ws_url, resume=False) as client:
        request_seen = anyio.Event()

        @client.on_server_request("wait")
        async def wait(message: Any) -> dict[str, Any]:
            request_seen.set()
            await anyio.sleep_forever()
            raise AssertionError

        outcome: list[BaseException] = []

        async def ask() -> None:
            try:
                await runtime.messaging.send_to_app_and_wait(client.app_id, data={"request_type": "wait"}, timeout=30)
            except Exception as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            with anyio.fail_after(5):
                await request_seen.wait()
            await runtime.shutdown()
        assert isinstance(outcome[0], ServerShuttingDown)
        assert await client.wait_closed(timeout=5) == 1001
        assert len(runtime.hub) == 0
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            assert (await http.get("/health/ready")).status_code == 503
