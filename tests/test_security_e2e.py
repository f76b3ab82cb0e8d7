"""Security over a real socket: authentication carriers, origins, ownership, limits, audit records."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import time
from typing import Any

import anyio
import httpx
import pytest

from llmgine_ws import APIConfig, Extensions, HandlerContext, create_app
from llmgine_ws.auth import AuthenticationFailed, Handshake, Principal, mint_token
from llmgine_ws.client import ConnectionClosed, HandshakeRejected, RequestError, connect

from .support import LiveServer, serve

pytestmark = pytest.mark.anyio

SECRET = "test-secret-0123456789"
API_KEY = "key-abcdef-123456"


def audit_records(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "llmgine_ws.audit" and getattr(r, "event", None) == event]


def carrier_options(carrier: str, credential: str) -> dict[str, Any]:
    """How a client presents ``credential`` through each carrier."""
    if carrier == "header":
        return {"headers": {"Authorization": f"Bearer {credential}"}}
    if carrier == "subprotocol":
        return {"subprotocols": ["llmgine.v1", f"llmgine.auth.{credential}"]}
    return {"query": f"?token={credential}"}


async def open_with(server: LiveServer, carrier: str, credential: str | None) -> Any:
    options = carrier_options(carrier, credential) if credential is not None else {}
    url = server.ws_url + options.pop("query", "")
    return connect(url, **options)


@pytest.fixture
async def secured(make_app: Any) -> Any:
    async with serve(make_app(api_keys=[API_KEY], token_secret=SECRET, allow_query_token=True,
                              admin_token="admin-token")) as live:
        yield live


@pytest.mark.parametrize("carrier", ["header", "subprotocol", "query"])
async def test_valid_credentials_in_each_carrier(secured: LiveServer, carrier: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "llmgine_ws.audit")
    for credential, user_id, method in ((API_KEY, None, "api_key"), (mint_token(SECRET, "alice"), "alice", "token")):
        async with await open_with(secured, carrier, credential) as client:
            connection = secured.runtime.hub.get(client.app_id)
            assert connection is not None
            assert connection.principal.method == method
            if user_id:
                assert connection.user_id == user_id
            if carrier == "subprotocol":
                assert client.subprotocol == "llmgine.v1"  # selected; the credential is never echoed
            assert (await client.request("ping")).type == "ping_res"
    accepted = audit_records(caplog, "auth")
    assert [(r.outcome, r.carrier, r.method) for r in accepted] == [  # type: ignore[attr-defined]
        ("accepted", carrier, "api_key"), ("accepted", carrier, "token")]
    assert all(API_KEY not in r.getMessage() and SECRET not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("carrier", ["header", "subprotocol", "query"])
@pytest.mark.parametrize(
    ("credential", "reason"),
    [
        (None, "no credential presented"),
        ("not-a-key", "unknown API key"),
        ("v1.e30.AAAA", "bad token signature"),
        ("expired", "token expired"),
        ("forged", "bad token signature"),
    ],
)
async def test_bad_credentials_are_refused_before_accept(
    secured: LiveServer, carrier: str, credential: str | None, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "llmgine_ws.audit")
    if credential == "expired":
        credential = mint_token(SECRET, "alice", ttl=60, now=time.time() - 3600)
    elif credential == "forged":
        credential = mint_token("some-other-secret", "alice")
    with pytest.raises(HandshakeRejected) as refused:
        async with await open_with(secured, carrier, credential):
            raise AssertionError("must not connect")
    assert refused.value.status_code == 403
    assert len(secured.runtime.hub) == 0
    assert secured.runtime.connection_counter.total == 0
    record = audit_records(caplog, "auth")[-1]
    assert record.outcome == "refused"  # type: ignore[attr-defined]
    assert reason in record.reason  # type: ignore[attr-defined]
    if credential is not None:
        assert credential not in record.getMessage()


def _respellings(token: str) -> list[str]:
    """Spellings of ``token`` a lenient base64 decoder reads as the same signature."""
    head, signature = token.rsplit(".", 1)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    decoded = base64.urlsafe_b64decode(signature + "=")
    twins = [c for c in alphabet if c != signature[-1]
             and base64.urlsafe_b64decode(signature[:-1] + c + "=") == decoded]
    assert twins  # 43 characters carry 256 bits: the last one has two unused bits
    return [f"{head}.{signature}=", f"{head}.{signature}==", f"{head}.{signature[:-1]}{twins[0]}",
            f"{head}.{signature}!", f"{head}.{signature[:20]}*{signature[20:]}", f"{head}=.{signature}"]


async def test_a_signed_token_has_exactly_one_valid_spelling(make_app: Any) -> None:
    """Padding, junk or a different last character on the signature (lenient base64 decodes all of them
    to the same bytes) is refused: a token cannot be re-spelt to dodge a deny list or a log search."""
    token = mint_token(SECRET, "alice")
    async with serve(make_app(token_secret=SECRET)) as server:
        async with connect(server.ws_url, headers={"Authorization": f"Bearer {token}"}):
            pass
        for spelling in _respellings(token):
            with pytest.raises(HandshakeRejected):
                async with connect(server.ws_url, subprotocols=["llmgine.v1", f"llmgine.auth.{spelling}"]):
                    raise AssertionError(f"accepted {spelling!r}")
        assert len(server.runtime.hub) == 0


async def test_query_token_is_ignored_unless_enabled(make_app: Any) -> None:
    async with serve(make_app(token_secret=SECRET)) as server:
        with pytest.raises(HandshakeRejected):
            async with connect(server.ws_url + "?token=" + mint_token(SECRET, "bob")):
                pass
        async with connect(server.ws_url, headers={"Authorization": f"Bearer {mint_token(SECRET, 'bob')}"}):
            pass


@pytest.mark.parametrize("algorithm", ["HS256", "RS256"])
async def test_jwt_authentication(make_app: Any, algorithm: str) -> None:
    jwt = pytest.importorskip("jwt")
    if algorithm == "HS256":
        signing_key = verify_key = "jwt-shared-secret-with-enough-length-0123"
    else:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        signing_key = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()).decode()
        verify_key = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    app = make_app(jwt_key=verify_key, jwt_algorithms=[algorithm], jwt_audience="llmgine", jwt_issuer="auth.test")
    now = int(time.time())

    def token(**overrides: Any) -> str:
        claims = {"sub": "carol", "aud": "llmgine", "iss": "auth.test", "exp": now + 300, "role": "admin"}
        claims.update(overrides)
        return str(jwt.encode({k: v for k, v in claims.items() if v is not None}, signing_key, algorithm=algorithm))

    async with serve(app) as server:
        async with connect(server.ws_url, subprotocols=["llmgine.v1", f"llmgine.auth.{token()}"]) as client:
            connection = server.runtime.hub.get(client.app_id)
            assert connection.principal.user_id == "carol"
            assert connection.principal.claims["role"] == "admin"
        for bad in (token(exp=now - 300), token(aud="someone-else"), token(iss="evil"), token(sub=None),
                    token()[:-4] + "AAAA"):
            with pytest.raises(HandshakeRejected):
                async with connect(server.ws_url, headers={"Authorization": f"Bearer {bad}"}):
                    pass
        assert len(server.runtime.hub) == 0


async def test_a_mixed_jwt_algorithm_list_refuses_bad_tokens_without_a_traceback(
        make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    """``RS256,HS256`` with an HMAC secret: an RS256 token makes PyJWT refuse the key (InvalidKeyError);
    that is a refused handshake like any bad token, not an authenticator error with a traceback."""
    jwt = pytest.importorskip("jwt")
    from cryptography.hazmat.primitives.asymmetric import rsa

    secret = "jwt-shared-secret-with-enough-length-0123"
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rs256 = jwt.encode({"sub": "mallory", "exp": int(time.time()) + 300}, private, algorithm="RS256")
    caplog.set_level(logging.INFO)
    async with serve(make_app(jwt_key=secret, jwt_algorithms=["RS256", "HS256"])) as server:
        for bad in (rs256, "not-a-jwt"):
            with pytest.raises(HandshakeRejected):
                async with connect(server.ws_url, headers={"Authorization": f"Bearer {bad}"}):
                    pass
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert "InvalidKeyError" in audit_records(caplog, "auth")[0].reason  # type: ignore[attr-defined]


async def test_custom_authenticator_sees_the_scope_and_sets_the_principal(make_app: Any) -> None:
    seen: list[Handshake] = []

    async def authenticate(handshake: Handshake) -> Principal | None:
        seen.append(handshake)
        if handshake.headers.get("x-team") != "blue":
            raise AuthenticationFailed("wrong team")
        return Principal(user_id=f"team-{handshake.query_params['member']}", method="custom")

    async def whoami(data: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
        return {"user_id": ctx.principal.user_id}

    extensions = Extensions()
    extensions.register_handler("whoami", dict[str, Any], whoami)
    app = create_app(APIConfig(ping_interval=0), extensions, authenticator=authenticate)
    async with serve(app) as server:
        async with connect(server.ws_url + "?member=7", headers={"x-team": "blue"}) as client:
            assert (await client.request("whoami")).data == {"user_id": "team-7"}
        with pytest.raises(HandshakeRejected):
            async with connect(server.ws_url + "?member=8", headers={"x-team": "red"}):
                pass
    assert seen[0].client_ip == "127.0.0.1"


async def test_send_to_user_reaches_every_connection_of_that_user(secured: LiveServer) -> None:
    alice = {"Authorization": f"Bearer {mint_token(SECRET, 'alice')}"}
    bob = {"Authorization": f"Bearer {mint_token(SECRET, 'bob')}"}
    async with connect(secured.ws_url, headers=alice) as tab1, connect(secured.ws_url, headers=alice) as tab2, \
            connect(secured.ws_url, headers=bob) as other:
        assert await secured.runtime.messaging.send_to_user("alice", "notification", {"message": "hi"}) == 2
        for tab in (tab1, tab2):
            assert (await tab.receive(timeout=5)).data == {"message": "hi"}
        await other.request("ping")
        with pytest.raises(TimeoutError):
            await other.receive(timeout=0.05)
        assert await secured.runtime.messaging.send_to_user("nobody", "notification", {}) == 0


async def test_connections_endpoint_needs_the_admin_token(secured: LiveServer) -> None:
    headers = {"Authorization": f"Bearer {mint_token(SECRET, 'dave')}"}
    async with connect(secured.ws_url, headers=headers), httpx.AsyncClient(base_url=secured.http_url) as http:
        assert (await http.get("/api/connections")).status_code == 401
        assert (await http.get("/api/connections", headers={"Authorization": "Bearer wrong"})).status_code == 401
        body = (await http.get("/api/connections", headers={"Authorization": "Bearer admin-token"})).json()
        assert body["connections"][0]["user_id"] == "dave"
        assert body["connections"][0]["auth_method"] == "token"
        info = (await http.get("/api/info")).text
        assert SECRET not in info
        assert API_KEY not in info
        assert "admin-token" not in info


async def test_connections_endpoint_is_closed_on_an_authenticated_server_without_admin_token(make_app: Any) -> None:
    async with serve(make_app(token_secret=SECRET)) as server, httpx.AsyncClient(base_url=server.http_url) as http:
        assert (await http.get("/api/connections")).status_code == 403


@pytest.mark.parametrize(
    ("allowed", "origin", "host_ok"),
    [
        ([], None, True),                                   # not a browser
        ([], "http://127.0.0.1:{port}", True),               # same origin
        ([], "https://evil.example", False),                 # cross-site WebSocket hijacking attempt
        (["https://app.example.com"], "https://app.example.com", True),
        (["https://app.example.com"], "https://app.example.com:443", True),
        (["https://app.example.com"], "http://app.example.com", False),
        (["https://app.example.com"], "https://app.example.com.evil.io", False),
        (["*"], "https://anything.example", True),
        ([], "null", False),
    ],
)
async def test_origin_checks(make_app: Any, allowed: list[str], origin: str | None, host_ok: bool,
                             caplog: pytest.LogCaptureFixture) -> None:
    async with serve(make_app(allowed_origins=allowed)) as server:
        headers = {"Origin": origin.format(port=server.port)} if origin else {}
        if host_ok:
            async with connect(server.ws_url, headers=headers) as client:
                assert (await client.request("ping")).type == "ping_res"
        else:
            with pytest.raises(HandshakeRejected) as refused:
                async with connect(server.ws_url, headers=headers):
                    pass
            assert refused.value.status_code == 403
            assert len(server.runtime.hub) == 0
            assert audit_records(caplog, "handshake_refused")[-1].reason == "origin not allowed"  # type: ignore[attr-defined]


async def test_cross_app_server_response_never_resolves_the_request(server: LiveServer) -> None:
    async with connect(server.ws_url) as victim, connect(server.ws_url) as attacker:
        asked = anyio.Event()
        request_ids: list[str] = []
        release = anyio.Event()

        @victim.on_server_request("user_confirmation")
        async def slow(message: Any) -> dict[str, Any]:
            request_ids.append(message.message_id)
            asked.set()
            await release.wait()
            return {"selection": "no"}

        result: list[Any] = []

        async def ask() -> None:
            response = await server.runtime.messaging.send_to_app_and_wait(
                victim.app_id, data={"request_type": "user_confirmation", "options": ["yes", "no"]}, timeout=10)
            result.append(response.data["selection"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            with anyio.fail_after(5):
                await asked.wait()
            with pytest.raises(RequestError) as error:
                await attacker.request("server_response", {"response_type": "user_confirmation", "selection": "yes"},
                                       message_id=request_ids[0])
            assert error.value.code == "UNKNOWN_REQUEST"
            release.set()
        assert result == ["no"]  # only the victim's own answer counted


async def test_cross_app_cancel_and_engine_attempts_look_like_missing(server: LiveServer) -> None:
    async with connect(server.ws_url) as owner, connect(server.ws_url) as other:
        session_id = await owner.create_session()
        for message_type, data in (("status", {"session_id": session_id}),
                                   ("close_session", {"session_id": session_id}),
                                   ("create_engine", {"session_id": session_id, "engine_type": "x"}),
                                   ("engine_command", {"session_id": session_id, "command": {}}),
                                   ("delete_engine", {"session_id": session_id})):
            with pytest.raises(RequestError) as error:
                await other.request(message_type, data)
            assert error.value.code == "SESSION_NOT_FOUND"
        assert (await owner.request("status", {"session_id": session_id})).type == "status_res"


async def test_rate_limit_then_policy_close_while_a_neighbour_is_unaffected(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "llmgine_ws.audit")
    app = make_app(rate_limit=5, rate_burst=5, rate_limit_strikes=10)
    async with serve(app) as server, connect(server.ws_url, rate_limit_retries=0, resume=False) as abuser, \
            connect(server.ws_url, resume=False) as neighbour:
        for i in range(5):
            assert (await abuser.request("ping", message_id=f"ok{i}")).type == "ping_res"
        with pytest.raises(RequestError) as limited:
            await abuser.request("ping", message_id="too-fast")
        assert limited.value.code == "RATE_LIMITED"
        assert limited.value.details["retry_after"] > 0
        assert limited.value.message_id == "too-fast"
        # Sustained abuse: the strike budget runs out and the connection is closed with 1008.
        with contextlib.suppress(ConnectionClosed):  # the close may land while we are still flooding
            for i in range(100):
                await abuser.send("ping", message_id=f"flood{i}")
        assert await abuser.wait_closed(timeout=5) == 1008
        # The neighbour is served as usual throughout.
        assert (await neighbour.request("ping")).type == "ping_res"
    assert [r.limit for r in audit_records(caplog, "limit_hit")] == ["rate"]  # type: ignore[attr-defined]
    closes = audit_records(caplog, "forced_close")
    assert closes[0].code == 1008  # type: ignore[attr-defined]
    assert closes[0].app_id == abuser.app_id  # type: ignore[attr-defined]


async def test_connection_caps_total_and_per_ip(make_app: Any) -> None:
    async with serve(make_app(max_connections=3, max_connections_per_ip=2)) as server:
        async with connect(server.ws_url), connect(server.ws_url):
            with pytest.raises(HandshakeRejected) as per_ip:
                async with connect(server.ws_url):
                    pass
            assert per_ip.value.status_code == 429
        async with connect(server.ws_url) as again:  # slots are given back on disconnect
            await wait_cleaned_counter(server, expected=1)
            assert (await again.request("ping")).type == "ping_res"


async def wait_cleaned_counter(server: LiveServer, expected: int) -> None:
    await server.eventually(lambda: server.runtime.connection_counter.total == expected)


@pytest.mark.parametrize("trusted", [True, False])
async def test_per_ip_cap_behind_a_trusted_proxy(make_app: Any, trusted: bool) -> None:
    app = make_app(max_connections_per_ip=1, trusted_proxies=["127.0.0.1/32"] if trusted else [])
    async with serve(app) as server:
        first = {"X-Forwarded-For": "203.0.113.7"}
        second = {"X-Forwarded-For": "203.0.113.8"}
        async with connect(server.ws_url, headers=first) as client:
            assert server.runtime.hub.get(client.app_id).client_ip == ("203.0.113.7" if trusted else "127.0.0.1")
            if trusted:  # a different forwarded client gets its own slot...
                async with connect(server.ws_url, headers=second):
                    pass
            with pytest.raises(HandshakeRejected) as refused:  # ...the same one does not
                async with connect(server.ws_url, headers=first):
                    pass
            assert refused.value.status_code == 429


async def test_total_connection_cap(make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    async with serve(make_app(max_connections=2, max_connections_per_ip=10)) as server, \
            connect(server.ws_url), connect(server.ws_url):
        with pytest.raises(HandshakeRejected) as refused:
            async with connect(server.ws_url):
                pass
        assert refused.value.status_code == 503
        assert json.loads(refused.value.body)["error"] == "CONNECTION_LIMIT"
    assert audit_records(caplog, "limit_hit")[-1].limit == "connections"  # type: ignore[attr-defined]


async def test_sessions_per_connection_limit(make_app: Any) -> None:
    async with serve(make_app(max_sessions_per_connection=2)) as server, connect(server.ws_url) as client:
        await client.create_session()
        await client.create_session()
        with pytest.raises(RequestError) as error:
            await client.create_session()
        assert error.value.code == "SESSION_LIMIT_REACHED"
        assert error.value.details == {"max_sessions_per_connection": 2}


async def test_broadcast_rate_limit(make_app: Any) -> None:
    from llmgine_ws.errors import RateLimited

    async with serve(make_app(broadcast_rate_limit=1, broadcast_burst=2)) as server:
        messaging = server.runtime.messaging
        await messaging.broadcast("notification", {})
        await messaging.broadcast("notification", {})
        with pytest.raises(RateLimited) as limited:
            await messaging.broadcast("notification", {})
        assert limited.value.retry_after > 0


async def test_server_request_outcomes_are_audited(server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "llmgine_ws.audit")
    messaging = server.runtime.messaging
    async with connect(server.ws_url) as client:
        client.on_server_request("user_input")(lambda message: {"user_input": "a very private answer"})
        await messaging.send_to_app_and_wait(client.app_id, data={"request_type": "user_input",
                                                                  "prompt": "private question"}, timeout=5)
        hold = anyio.Event()

        @client.on_server_request("slow")
        async def slow(message: Any) -> dict[str, Any]:
            await hold.wait()
            return {}

        with pytest.raises(TimeoutError):
            await messaging.send_to_app_and_wait(client.app_id, data={"request_type": "slow"}, timeout=0.05)
    outcomes = [(r.request_type, r.outcome) for r in audit_records(caplog, "server_request")]  # type: ignore[attr-defined]
    assert outcomes == [("user_input", "sent"), ("user_input", "answered"), ("slow", "sent"), ("slow", "timed_out")]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "private" not in text  # payloads are never logged
    assert all(r.app_id == client.app_id for r in audit_records(caplog, "server_request"))  # type: ignore[attr-defined]


async def test_open_server_warns_once_at_startup(make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    async with serve(make_app()):
        pass
    warnings = [r for r in caplog.records if "no authenticator configured" in r.getMessage()]
    assert len(warnings) == 1
    async with serve(make_app(token_secret=SECRET)):
        pass
    assert len([r for r in caplog.records if "no authenticator configured" in r.getMessage()]) == 1


async def _upgrade_status(port: int, host: str, origin: str, extra: str = "") -> bytes:
    request = (f"GET /api/ws HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\n{extra}Upgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n")
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request.encode())
        with anyio.fail_after(5):
            return (await stream.receive()).split(b"\r\n", 1)[0]


@pytest.mark.parametrize(("host", "authenticated", "accepted"), [
    ("localhost", False, True),
    ("127.0.0.1", False, True),
    ("[::1]", False, True),
    ("evil.example", False, False),  # DNS rebinding: the page is same-origin with itself, not with us
    ("evil.example", True, True),    # an authenticated server: the page has no credential to offer
])
async def test_dns_rebinding_on_a_server_without_authentication(make_app: Any, host: str, authenticated: bool,
                                                                accepted: bool) -> None:
    """Without an authenticator (and no allowed_origins), a same-origin browser is accepted only on a
    loopback host: a rebinding page at ``http://evil.example:P`` sends Origin and Host that match."""
    app = make_app(api_keys=["k"]) if authenticated else make_app()
    async with serve(app) as server:
        status = await _upgrade_status(server.port, f"{host}:{server.port}", f"http://{host}:{server.port}",
                                       "Authorization: Bearer k\r\n" if authenticated else "")
    assert (b"101" if accepted else b"403") in status


async def test_plain_uvicorn_proxy_headers_cannot_spread_one_client_over_many_addresses(
        make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Plain ``uvicorn`` believes X-Forwarded-For from 127.0.0.1 and rewrites the client address before
    the app sees it. With no trusted_proxies the app does not believe the rewritten address: such
    connections share one address's cap, whatever each claims."""
    app = make_app(max_connections_per_ip=2)
    async with serve(app, proxy_headers=True, forwarded_allow_ips="127.0.0.1") as server, \
            contextlib.AsyncExitStack() as stack:
        for n in range(2):
            await stack.enter_async_context(connect(server.ws_url, headers={"X-Forwarded-For": f"203.0.113.{n}:80"}))
        with pytest.raises(HandshakeRejected) as refused:
            async with connect(server.ws_url, headers={"X-Forwarded-For": "203.0.113.99"}):
                pass
        assert refused.value.status_code == 429
        assert {c.client_ip for c in server.runtime.hub} == {"forwarded-unverified"}
    assert len([r for r in caplog.records if "X-Forwarded-For" in r.getMessage()]) == 1


async def test_audit_lines_cannot_be_forged_through_a_header(make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A client-supplied value with spaces and '=' is quoted in the text line: an Origin header cannot
    pass for other fields (``outcome=accepted user_id=admin``)."""
    caplog.set_level(logging.INFO, "llmgine_ws.audit")
    async with serve(make_app()) as server:
        status = await _upgrade_status(server.port, f"127.0.0.1:{server.port}", "x outcome=accepted user_id=admin")
    assert b"403" in status
    [record] = audit_records(caplog, "handshake_refused")
    line = record.getMessage()
    assert 'origin="x outcome=accepted user_id=admin"' in line
    fields = re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)
    assert [key for key, _ in fields].count("outcome") == 0 and "user_id" not in dict(fields)
