"""The wire protocol over a real uvicorn socket: every core message and every core error code."""

from __future__ import annotations

import json
import uuid
from typing import Any

import anyio
import msgspec
import pytest

from llmgine_ws import Extensions, HandlerContext, ProtocolError
from llmgine_ws.client import Message, RequestError, connect

from .rawws import send_raw, send_raw_text_bytes
from .support import LiveServer, serve, wait_cleaned

pytestmark = pytest.mark.anyio


async def raw_exchange(client: Any, payload: str | bytes) -> Message:
    """Send a raw frame and return the next message that is not server-initiated."""
    await send_raw(client, payload)
    with anyio.fail_after(5):
        while True:
            message: Message = await client.receive()
            if not message.server_initiated:
                return message


async def test_connected_message_carries_a_fresh_uuid4_app_id(server: LiveServer) -> None:
    async with connect(server.ws_url) as a, connect(server.ws_url) as b:
        assert uuid.UUID(a.app_id).version == 4
        assert a.app_id != b.app_id
        assert set(server.runtime.hub.app_ids()) == {a.app_id, b.app_id}


async def test_connected_message_shape(server: LiveServer) -> None:
    async with connect(server.ws_url, wait_connected=False) as client:
        first = await client.receive(timeout=5)
    assert first.type == "connected"
    assert first.server_initiated is True
    assert first.data["status"] == "connected"
    assert uuid.UUID(first.data["app_id"]).version == 4


async def test_ping_echoes_timestamp_and_message_id(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        for timestamp in ["2024-01-01T12:00:00.000Z", 1704110400, None]:
            response = await client.request("ping", {"timestamp": timestamp}, message_id=f"ping-{timestamp}")
            assert response.type == "ping_res"
            assert response.message_id == f"ping-{timestamp}"
            assert response.data == {"timestamp": timestamp}
            assert response.server_initiated is False


async def test_data_may_be_omitted_when_it_has_no_required_fields(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        response = await raw_exchange(client, json.dumps({"type": "ping", "message_id": "p1"}))
        assert (response.type, response.message_id, response.data) == ("ping_res", "p1", {"timestamp": None})


async def test_session_lifecycle_create_status_close(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        created = await client.request("create_session", {"app_id": client.app_id})
        session_id = created.data["session_id"]
        assert uuid.UUID(session_id)
        assert server.runtime.messaging.get_app_sessions(client.app_id) == [session_id]

        status = await client.request("status", {"session_id": session_id})
        assert status.type == "status_res"
        assert status.data["session_id"] == session_id
        assert status.data["status"] == "active"
        assert status.data["created_at"].endswith("Z")
        assert status.data["last_interaction_at"] >= status.data["created_at"]
        assert status.data["engine"] is None

        closed = await client.request("close_session", {"session_id": session_id})
        assert closed.type == "close_session_res"
        assert closed.data == {"session_id": session_id, "closed": True}
        assert len(server.runtime.sessions) == 0

        with pytest.raises(RequestError) as missing:
            await client.request("status", {"session_id": session_id})
        assert missing.value.code == "SESSION_NOT_FOUND"


async def test_create_session_without_app_id_uses_the_connection(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        response = await client.request("create_session", {})
        assert server.runtime.sessions.get(response.data["session_id"]).app_id == client.app_id  # type: ignore[union-attr]


async def test_create_session_app_id_never_reaches_another_app(server: LiveServer) -> None:
    """Whatever ``app_id`` says (another app's, a seed frontend's own name, nonsense), the session is
    the caller's: no other app gains one, and the answer does not tell whether that app exists."""
    async with connect(server.ws_url) as a, connect(server.ws_url) as b:
        answers = []
        for claimed in (b.app_id, "my-frontend-app", str(uuid.uuid4())):
            response = await a.request("create_session", {"app_id": claimed}, message_id=f"as-{claimed}")
            session = server.runtime.sessions.get(response.data["session_id"])
            assert session is not None and session.app_id == a.app_id
            answers.append((response.type, sorted(response.data)))
        assert answers == [("create_session_res", ["session_id"])] * 3
        assert server.runtime.messaging.get_app_sessions(b.app_id) == []
        with pytest.raises(RequestError) as error:
            await b.request("status", {"session_id": response.data["session_id"]})
        assert error.value.code == "SESSION_NOT_FOUND"


async def test_another_apps_session_is_indistinguishable_from_a_missing_one(server: LiveServer) -> None:
    async with connect(server.ws_url) as owner, connect(server.ws_url) as other:
        session_id = await owner.create_session()
        answers = []
        for target in (session_id, str(uuid.uuid4())):
            for message_type in ("status", "close_session"):
                with pytest.raises(RequestError) as error:
                    await other.request(message_type, {"session_id": target}, message_id="probe")
                answers.append(msgspec.json.encode(error.value.response.data).replace(target.encode(), b"X"))
        assert answers[0] == answers[2] and answers[1] == answers[3]
        assert b"SESSION_NOT_FOUND" in answers[0]
        # The owner still has it.
        assert (await owner.request("status", {"session_id": session_id})).data["session_id"] == session_id


async def test_session_limit_reached(make_app: Any) -> None:
    async with serve(make_app(max_sessions=2)) as server, connect(server.ws_url) as client:
        await client.create_session()
        await client.create_session()
        with pytest.raises(RequestError) as error:
            await client.create_session()
        assert error.value.code == "SESSION_LIMIT_REACHED"
        assert error.value.details == {"max_sessions": 2}
        # The connection keeps working and closing one frees a slot.
        session_id = server.runtime.messaging.get_app_sessions(client.app_id)[0]
        await client.request("close_session", {"session_id": session_id})
        await client.create_session()


@pytest.mark.parametrize(
    ("frame", "code", "message_id", "path"),
    [
        ("{not json", "INVALID_JSON", None, None),
        ('{"type": "ping", "message_id": "x1", "data": {', "INVALID_JSON", None, None),
        ("[1, 2", "INVALID_JSON", None, None),  # truncated: not well-formed, whatever its top-level type
        ("[1] x", "INVALID_JSON", None, None),
        ("[" * 100_000 + "]" * 100_000, "VALIDATION_ERROR", None, "$"),
        ('{"type": "ping", "message_id": "deep", "data": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}",
         "INVALID_JSON", None, None),
        ("42", "VALIDATION_ERROR", None, "$"),
        ('["ping"]', "VALIDATION_ERROR", None, "$"),
        ('{"message_id": "m-notype", "data": {}}', "VALIDATION_ERROR", "m-notype", "$.type"),
        ('{"type": "teleport", "message_id": "m-unknown", "data": {}}', "INVALID_MESSAGE_TYPE", "m-unknown", None),
        ('{"type": 7, "message_id": "m-typeint"}', "INVALID_MESSAGE_TYPE", "m-typeint", None),
        ('{"type": "status", "message_id": "m-int", "data": {"session_id": 5}}', "VALIDATION_ERROR", "m-int",
         "$.data.session_id"),
        ('{"type": "status", "message_id": "m-missing", "data": {}}', "VALIDATION_ERROR", "m-missing", "$.data"),
        ('{"type": "status", "message_id": "m-null", "data": null}', "VALIDATION_ERROR", "m-null", "$.data"),
        ('{"type": "ping", "data": {}}', "VALIDATION_ERROR", None, "$"),
        ('{"type": "ping", "message_id": "", "data": {}}', "VALIDATION_ERROR", None, "$.message_id"),
        ('{"type": "ping", "message_id": 12, "data": {}}', "VALIDATION_ERROR", None, "$.message_id"),
        ('{"type": "ping", "message_id": "' + "x" * 129 + '", "data": {}}', "VALIDATION_ERROR", None,
         "$.message_id"),
        ('{"type": "ping", "message_id": "m-big", "data": {"timestamp": 1e999}}', "VALIDATION_ERROR", "m-big",
         "$.data.timestamp"),
    ],
)
async def test_bad_frames_get_structured_errors_and_the_connection_survives(
    server: LiveServer, frame: str, code: str, message_id: str | None, path: str | None
) -> None:
    async with connect(server.ws_url) as client:
        error = await raw_exchange(client, frame)
        assert error.type == "error"
        assert error.data["code"] == code
        assert isinstance(error.data["message"], str) and error.data["message"]
        assert "details" in error.data
        if message_id is None:
            assert uuid.UUID(error.message_id)  # a fresh id when the request's could not be read
        else:
            assert error.message_id == message_id
        if path is not None:
            assert error.data["details"]["path"] == path
        assert (await client.request("ping", {"timestamp": "still-alive"})).data == {"timestamp": "still-alive"}


async def test_binary_frame_gets_a_clear_error(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        error = await raw_exchange(client, b'{"type": "ping", "message_id": "b", "data": {}}')
        assert error.data["code"] == "WEBSOCKET_ERROR"
        assert "text frame" in error.data["message"]
        assert (await client.request("ping")).type == "ping_res"


async def test_invalid_utf8_text_frame_is_refused_by_the_protocol_layer(server: LiveServer) -> None:
    async with connect(server.ws_url, resume=False) as client:
        await send_raw_text_bytes(client, b'{"type": "ping", "message_id": "\xff\xfe", "data": {}}')
        code = await client.wait_closed(timeout=5)
    assert code == 1007  # RFC 6455: invalid frame payload data, closed by uvicorn before the app sees it
    with anyio.fail_after(5):
        await server.runtime.hub.wait_empty()


async def test_unknown_server_response_and_pong(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        for message_type in ("server_response", "server_pong"):
            with pytest.raises(RequestError) as error:
                await client.request(message_type, {"response_type": "user_input"},
                                     message_id=f"nothing-{message_type}")
            assert error.value.code == "UNKNOWN_REQUEST"
            assert error.value.message_id == f"nothing-{message_type}"


async def test_duplicate_in_flight_message_id_is_refused(make_app: Any) -> None:
    release = anyio.Event()

    async def slow(data: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
        await release.wait()
        return {"done": True}

    extensions = Extensions()
    extensions.register_handler("slow", dict[str, Any], slow)
    async with serve(make_app(extensions)) as server, connect(server.ws_url) as client:
        await client.send("slow", {}, message_id="same")
        with pytest.raises(RequestError) as error:
            await client.request("slow", {}, message_id="same")
        assert error.value.code == "DUPLICATE_MESSAGE_ID"
        release.set()
        assert (await client.receive(timeout=5)).data == {"done": True}
        # Once the first finished, the id may be reused.
        assert (await client.request("slow", {}, message_id="same")).data == {"done": True}


async def test_too_many_requests_in_flight(make_app: Any) -> None:
    release = anyio.Event()

    async def slow(data: dict[str, Any], ctx: HandlerContext) -> None:
        await release.wait()

    extensions = Extensions()
    extensions.register_handler("slow", dict[str, Any], slow)
    async with serve(make_app(extensions, max_inflight_requests=3)) as server, connect(server.ws_url) as client:
        for i in range(3):
            await client.send("slow", {}, message_id=f"s{i}")
        with pytest.raises(RequestError) as error:
            await client.request("slow", {}, message_id="s3")
        assert error.value.code == "TOO_MANY_REQUESTS"
        # Inline messages (ping) are never held back by busy handlers.
        assert (await client.request("ping")).type == "ping_res"
        release.set()
        replies = {(await client.receive(timeout=5)).message_id for _ in range(3)}
        assert replies == {"s0", "s1", "s2"}


async def test_handler_exception_is_internal_error_without_traceback(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def explode(data: dict[str, Any], ctx: HandlerContext) -> None:
        raise RuntimeError("secret database password is hunter2")

    def explode_inline(data: dict[str, Any], ctx: HandlerContext) -> None:
        raise KeyError("inline secret")

    extensions = Extensions()
    extensions.register_handler("explode", dict[str, Any], explode)
    extensions.register_handler("explode_inline", dict[str, Any], explode_inline)
    async with serve(make_app(extensions)) as server, connect(server.ws_url) as client:
        for message_type in ("explode", "explode_inline"):
            with pytest.raises(RequestError) as error:
                await client.request(message_type, {}, message_id=f"boom-{message_type}")
            assert error.value.code == "INTERNAL_ERROR"
            assert error.value.message_id == f"boom-{message_type}"
            wire = msgspec.json.encode(error.value.response.data).decode()
            assert "hunter2" not in wire and "secret" not in wire and "Traceback" not in wire
        assert (await client.request("ping")).type == "ping_res"
    logged = [r for r in caplog.records if r.name == "llmgine_ws.dispatch" and r.exc_info]
    assert {type(r.exc_info[1]) for r in logged if r.exc_info} == {RuntimeError, KeyError}
    # The log records carry the context (the JSON log format writes these attributes out).
    assert {(r.app_id, r.message_id) for r in logged} == {  # type: ignore[attr-defined]
        (client.app_id, "boom-explode"), (client.app_id, "boom-explode_inline")}


async def test_protocol_error_from_a_custom_handler(make_app: Any) -> None:
    async def refuse(data: dict[str, Any], ctx: HandlerContext) -> None:
        raise ProtocolError("QUOTA_EXCEEDED", "you are out of tokens", {"limit": 10})

    extensions = Extensions()
    extensions.register_handler("refuse", dict[str, Any], refuse)
    async with serve(make_app(extensions)) as server, connect(server.ws_url) as client:
        with pytest.raises(RequestError) as error:
            await client.request("refuse", {})
        assert (error.value.code, error.value.message, error.value.details) == (
            "QUOTA_EXCEEDED", "you are out of tokens", {"limit": 10})


async def test_error_envelope_shape_matches_the_seed(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        error = await raw_exchange(client, '{"type": "status", "message_id": "m", "data": {"session_id": "nope"}}')
        # The seed envelope, plus the top-level `seq` of the resume protocol (issue 12).
        assert set(msgspec.structs.asdict(error)) == {"type", "message_id", "data", "server_initiated", "seq"}
        assert error.server_initiated is False
        assert set(error.data) == {"code", "message", "details"}


async def test_cancel_of_unknown_request(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        response = await client.request("cancel", {"target_message_id": "never-sent"})
        assert response.type == "cancel_res"
        assert response.data == {"target_message_id": "never-sent", "cancelled": False}


async def test_cancel_a_running_custom_request(make_app: Any) -> None:
    started = anyio.Event()
    cancelled = anyio.Event()

    async def forever(data: dict[str, Any], ctx: HandlerContext) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    extensions = Extensions()
    extensions.register_handler("forever", dict[str, Any], forever)
    async with serve(make_app(extensions)) as server, connect(server.ws_url) as client:
        await client.send("forever", {}, message_id="long")
        with anyio.fail_after(5):
            await started.wait()
        response = await client.request("cancel", {"target_message_id": "long"})
        assert response.data == {"target_message_id": "long", "cancelled": True}
        with anyio.fail_after(5):
            await cancelled.wait()
        error = await client.receive(timeout=5)
        assert (error.type, error.message_id, error.data["code"]) == ("error", "long", "CANCELLED")


async def test_a_connection_cannot_cancel_another_connections_request(make_app: Any) -> None:
    started = anyio.Event()
    release = anyio.Event()

    async def wait(data: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
        started.set()
        await release.wait()
        return {"finished": True}

    extensions = Extensions()
    extensions.register_handler("wait", dict[str, Any], wait)
    async with serve(make_app(extensions)) as server, connect(server.ws_url) as owner, \
            connect(server.ws_url) as attacker:
        await owner.send("wait", {}, message_id="victim")
        with anyio.fail_after(5):
            await started.wait()
        response = await attacker.request("cancel", {"target_message_id": "victim"})
        assert response.data["cancelled"] is False
        release.set()
        assert (await owner.receive(timeout=5)).data == {"finished": True}


async def test_connection_is_cleaned_up_after_client_close(server: LiveServer) -> None:
    async with connect(server.ws_url) as client:
        await client.create_session()
        await client.create_session()
        app_id = client.app_id
        connection = server.runtime.hub.get(app_id)
        assert connection is not None
    await wait_cleaned(connection)
    assert app_id not in server.runtime.hub
    assert len(server.runtime.sessions) == 0
    assert server.runtime.hub.pending_request_count() == 0


async def test_abrupt_disconnect_is_cleaned_up(server: LiveServer) -> None:
    async with connect(server.ws_url, resume=False) as client:
        await client.create_session()
        connection = server.runtime.hub.get(client.app_id)
        assert connection is not None
        await client.abort()
    await wait_cleaned(connection)
    assert len(server.runtime.hub) == 0
    assert len(server.runtime.sessions) == 0


async def test_oversized_frame_closes_with_1009(make_app: Any) -> None:
    async with serve(make_app(max_message_size=1024)) as server, connect(server.ws_url) as client:
        assert (await client.request("ping", {"timestamp": "x" * 900})).type == "ping_res"
        await send_raw(client, json.dumps({"type": "ping", "message_id": "big", "data": {"timestamp": "x" * 2000}}))
        assert await client.wait_closed(timeout=5) == 1009
