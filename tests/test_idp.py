"""proxy/idp.py against a hostile or broken token endpoint: redirects, huge or dripping bodies, expiries
that cannot be used as they are, secrets echoed back or cut in half, error classification, Retry-After,
and a revocation endpoint that hangs or answers garbage.

Every token endpoint is a small aiohttp app (or a raw TCP server) on 127.0.0.1 started here; where a
TokenManager drives the provider, its schedule runs on fake time (tests.fakes.clock).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web

from proxy import idp as idp_module
from proxy import state
from proxy.config import AuthConfig, InjectConfig
from proxy.errors import NoToken, TokenRejected, TokenUnavailable
from proxy.idp import IdentityProvider
from proxy.observability import TextFormatter
from proxy.state import Phase, Token
from tests.fakes.clock import FakeClock, VirtualTime

PASSWORD = "Pw-9f3kq71xLmZ2vB8s"
CLIENT_SECRET = "Cs-4h7Jw2nQ8pXr5tE1"
CODE = "Code-77aa11bb22cc33dd"
CONFIGURED_RT = "Rt0-configured-offline-5e6f7a8b"
FAST = {"transient_backoff": lambda attempt, rand, retry_after=None: 0.05}


Handler = Callable[[web.Request, dict[str, str]], Any]


async def _token_server(aiohttp_server: Any, handler: Handler) -> tuple[str, list[dict[str, str]]]:
    """A token endpoint at /token (and a revocation endpoint at /revoke) answering with ``handler``;
    returns its base URL and every form it received."""
    seen: list[dict[str, str]] = []

    async def endpoint(request: web.Request) -> web.StreamResponse:
        form = {k: str(v) for k, v in (await request.post()).items()}
        form["_path"] = request.path
        seen.append(form)
        return await handler(request, form)

    app = web.Application()
    app.router.add_post("/token", endpoint)
    app.router.add_post("/revoke", endpoint)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), seen


def _auth(base: str, **options: Any) -> AuthConfig:
    values: dict[str, Any] = {
        "provider": "oauth2",
        "token_url": base + "/token",
        "client_id": "cid",
        "client_secret": CLIENT_SECRET,
        "username": "alice",
        "password": PASSWORD,
    }
    values.update(options)
    return AuthConfig(**values)


def _ok(expires_in: Any = 300, **extra: Any) -> dict[str, Any]:
    return {"access_token": "at-ok", "token_type": "Bearer", "expires_in": expires_in, **extra}


def _raw(body: bytes | str, status: int = 200, content_type: str = "application/json") -> web.Response:
    return web.Response(body=body.encode() if isinstance(body, str) else body, status=status, content_type=content_type)


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


def _prefixes(secret: str, n: int = 8) -> list[str]:
    return [secret[:n], secret[-n:]]


# ==================================================================================================
# Findings: these fail on the current code
# ==================================================================================================


async def test_redirect_from_token_endpoint_does_not_resend_credentials_to_another_origin(aiohttp_server, session):
    """A token endpoint answering 307 to another origin gets the password and client secret re-POSTed there
    (over plain http, past config's https-only rule); a user sees nothing, the credentials are gone."""
    stolen: list[dict[str, str]] = []

    async def steal(request: web.Request) -> web.Response:
        stolen.append({k: str(v) for k, v in (await request.post()).items()})
        return web.json_response(_ok())

    evil = web.Application()
    evil.router.add_post("/steal", steal)
    evil_url = str((await aiohttp_server(evil)).make_url("/steal"))

    async def redirect(request: web.Request, form: dict[str, str]) -> web.Response:
        raise web.HTTPTemporaryRedirect(evil_url)

    base, _ = await _token_server(aiohttp_server, redirect)
    provider = IdentityProvider(session, _auth(base), InjectConfig())
    outcome: Any
    try:
        outcome = await provider.login()
    except (TokenUnavailable, TokenRejected) as exc:
        outcome = exc
    leaked = json.dumps(stolen)
    assert PASSWORD not in leaked and CLIENT_SECRET not in leaked, f"re-POSTed to {evil_url}: {stolen}"
    # A 3xx is "not a token endpoint" (idp._error_from_response), never a token from wherever it points.
    assert not isinstance(outcome, Token)


async def test_huge_token_response_body_is_not_read_whole(aiohttp_server, session):
    """A 200 whose body is 24 MiB (or endless, until auth.timeout_s) is read whole into memory and even
    accepted: a hostile provider can make the sidecar hold any amount of memory (OOM-kill)."""
    total = 24 * 1024 * 1024
    sent = {"bytes": 0}

    async def huge(request: web.Request, form: dict[str, str]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        head = b'{"access_token":"at-ok","token_type":"Bearer","expires_in":300,"pad":"'
        chunk = b"a" * 65536
        try:
            await resp.write(head)
            sent["bytes"] += len(head)
            while sent["bytes"] < total:
                await resp.write(chunk)
                sent["bytes"] += len(chunk)
            await resp.write(b'"}')
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return resp

    base, _ = await _token_server(aiohttp_server, huge)
    provider = IdentityProvider(session, _auth(base, timeout_s=5.0), InjectConfig())
    outcome: Any
    try:
        outcome = await provider.login()
    except TokenUnavailable as exc:
        outcome = exc
    assert not isinstance(outcome, Token), f"a {total >> 20} MiB token response was read whole and accepted"
    assert sent["bytes"] < 8 * 1024 * 1024


async def test_huge_integer_expires_in_is_capped_not_a_crash(aiohttp_server, session):
    """expires_in as a 400-digit JSON integer (a 'never expires') raises OverflowError out of the parser:
    the login the provider granted is thrown away and clients get 503 "internal error" forever."""

    async def answer(request: web.Request, form: dict[str, str]) -> web.Response:
        return _raw('{"access_token":"at-ok","token_type":"Bearer","expires_in":1' + "0" * 400 + "}")

    base, _ = await _token_server(aiohttp_server, answer)
    provider = IdentityProvider(session, _auth(base), InjectConfig())
    token = await provider.login()  # like expires_in 1e300: cut to MAX_LIFETIME_S
    assert token.lifetime <= idp_module.MAX_LIFETIME_S


@pytest.mark.parametrize(
    ("body", "granted"),
    [
        # OverflowError; since the huge-integer fix (test above) a token, capped, and the code is spent by it
        ('{"access_token":"at-ok","token_type":"Bearer","expires_in":1' + "0" * 400 + "}", True),
        ("[" * 50000, False),  # RecursionError in json.loads
    ],
    ids=["400-digit-expires_in", "deeply-nested-json"],
)
async def test_unparseable_200_does_not_resend_the_authorization_code(aiohttp_server, session, managers, body, granted):
    """A 200 to the code exchange that crashes the parser (not a ValueError) counts as internal_error, not
    invalid_response, so the one-time code (and code_verifier) is sent again on the next attempt."""

    async def answer(request: web.Request, form: dict[str, str]) -> web.Response:
        return _raw(body)

    base, seen = await _token_server(aiohttp_server, answer)
    auth = _auth(
        base, grant_type="authorization_code", code=CODE, code_verifier="v" * 43, redirect_uri="http://127.0.0.1/cb"
    )
    clock = FakeClock()
    provider = IdentityProvider(session, auth, InjectConfig(), clock=clock)
    tm = managers(provider, clock=clock, **FAST)
    for _ in range(3):
        if granted:
            assert isinstance(await tm.get(), Token)
        else:
            with pytest.raises(NoToken):
                await tm.get()
        clock.advance(30.0)
    codes = [form for form in seen if form.get("code") == CODE]
    assert len(codes) == 1, f"the authorization code was sent {len(codes)} times"


async def test_secret_cut_by_description_truncation_is_not_leaked(aiohttp_server, session, managers):
    """A provider echoing the password at character 190 of error_description: the 200-character cut happens
    before redaction, so /-/status, /-/ready and every 503 body show the first 10 characters of the password."""

    async def refuse(request: web.Request, form: dict[str, str]) -> web.Response:
        text = "x" * 190 + form.get("password", "")
        return web.json_response({"error": "invalid_grant", "error_description": text}, status=400)

    base, _ = await _token_server(aiohttp_server, refuse)
    clock = FakeClock()
    provider = IdentityProvider(session, _auth(base), InjectConfig(), clock=clock)
    tm = managers(provider, clock=clock)
    with pytest.raises(NoToken) as caught:
        await tm.get()
    shown = json.dumps(tm.status()) + caught.value.detail + tm.reason()
    for part in _prefixes(PASSWORD):
        assert part not in shown, f"{part!r} of the password is shown: {caught.value.detail}"


async def test_rotated_away_configured_refresh_token_is_never_presented_again(aiohttp_server, session, managers):
    """grant_type refresh_token: after the first exchange rotated auth.refresh_token away, a refused refresh
    makes the 'login' present the spent configured token again (refresh-token reuse: Keycloak's Stale token,
    reuse detection that revokes the family); the user sees a refusal blaming auth.refresh_token."""

    async def answer(request: web.Request, form: dict[str, str]) -> web.Response:
        if form.get("refresh_token") == CONFIGURED_RT and len(seen) == 1:
            return web.json_response(_ok(100, refresh_token="rt-1"))
        return web.json_response({"error": "invalid_grant", "error_description": "Stale token"}, status=400)

    base, seen = await _token_server(aiohttp_server, answer)
    clock = FakeClock()
    auth = _auth(base, grant_type="refresh_token", refresh_token=CONFIGURED_RT, username="", password="")
    provider = IdentityProvider(session, auth, InjectConfig(), clock=clock)
    tm = managers(provider, clock=clock)
    await tm.get()
    clock.advance(100.0)
    with pytest.raises(NoToken):
        await tm.get()
    presented = [form.get("refresh_token") for form in seen]
    assert presented[:2] == [CONFIGURED_RT, "rt-1"]
    assert presented.count(CONFIGURED_RT) == 1, presented


@pytest.mark.parametrize("expires_in", [0, -5, "-3600"])
async def test_nonpositive_expires_in_is_not_stretched_to_the_default_lifetime(aiohttp_server, session, expires_in):
    """expires_in 0 or negative (the token is already dead) is taken as 'no expires_in': the token is sent for
    default_lifetime_s (10 h); the contract uses the default only when neither expires_in nor exp is given."""

    async def answer(request: web.Request, form: dict[str, str]) -> web.Response:
        return web.json_response(_ok(expires_in))

    base, _ = await _token_server(aiohttp_server, answer)
    provider = IdentityProvider(session, _auth(base), InjectConfig())
    try:
        token = await provider.login()
    except TokenUnavailable:
        return  # refused as unusable: fine
    assert token.lifetime < 60, f"a token the provider says is dead was kept {token.lifetime:g}s"


async def test_jwt_exp_in_the_past_is_not_stretched_to_the_default_lifetime(aiohttp_server, session):
    """A JWT access token (no expires_in, no iat) whose exp passed a minute ago is sent upstream for 10 hours."""
    access = jwt.encode({"sub": "alice", "exp": int(time.time()) - 60}, "k" * 32, "HS256")

    async def answer(request: web.Request, form: dict[str, str]) -> web.Response:
        return web.json_response({"access_token": access, "token_type": "Bearer"})

    base, _ = await _token_server(aiohttp_server, answer)
    provider = IdentityProvider(session, _auth(base), InjectConfig())
    try:
        token = await provider.login()
    except TokenUnavailable:
        return
    assert token.lifetime < 60, f"an expired JWT was kept {token.lifetime:g}s"


async def test_old_jwt_without_expires_in_is_not_sent_past_its_exp(aiohttp_server, session):
    """A cached JWT (iat 50 min ago, exp in 10 min, no expires_in: a gateway's token cache) is taken to live
    exp - iat = 60 min from now: for 50 minutes every request carries an expired token."""
    now = int(time.time())
    access = jwt.encode({"sub": "alice", "iat": now - 3000, "exp": now + 600}, "k" * 32, "HS256")

    async def answer(request: web.Request, form: dict[str, str]) -> web.Response:
        return web.json_response({"access_token": access, "token_type": "Bearer"})

    base, _ = await _token_server(aiohttp_server, answer)
    provider = IdentityProvider(session, _auth(base), InjectConfig())
    token = await provider.login()
    assert token.lifetime <= 600 + 5, f"kept {token.lifetime:g}s; the JWT's exp is 600 s away"


async def test_hostile_json_from_revoke_endpoint_does_not_break_shutdown(aiohttp_server, session, managers):
    """revoke_on_shutdown against a revocation endpoint answering 64 KiB of '[': RecursionError escapes
    try_end_session and close(), so shutdown fails with a traceback (and skips closing the pools)."""

    async def answer(request: web.Request, form: dict[str, str]) -> web.Response:
        if request.path == "/revoke":
            return _raw("[" * 60000, status=400)
        return web.json_response(_ok(300, refresh_token="rt-1"))

    base, _ = await _token_server(aiohttp_server, answer)
    clock = FakeClock()
    provider = IdentityProvider(session, _auth(base, revoke_url=base + "/revoke"), InjectConfig(), clock=clock)
    tm = managers(provider, clock=clock)
    await tm.get()
    await tm.close(revoke=True)  # must log token.session_end_failed, never raise
    assert tm.phase is Phase.STOPPED


async def test_subject_with_a_newline_cannot_forge_log_lines(aiohttp_server, session, managers, caplog):
    """A JWT whose preferred_username holds a newline (and no space) is logged raw by the text formatter:
    the provider writes arbitrary lines into the sidecar's log (token.obtained subject=...)."""
    forged = "alice\n2026-12-01T00:00:00Z\terror\ttoken.login_rejected\tforged=yes"
    access = jwt.encode({"preferred_username": forged, "exp": int(time.time()) + 300}, "k" * 32, "HS256")

    async def answer(request: web.Request, form: dict[str, str]) -> web.Response:
        return web.json_response({"access_token": access, "token_type": "Bearer", "expires_in": 300})

    base, _ = await _token_server(aiohttp_server, answer)
    clock = FakeClock()
    provider = IdentityProvider(session, _auth(base), InjectConfig(), clock=clock)
    tm = managers(provider, clock=clock)
    await tm.get()
    lines = [TextFormatter().format(r) for r in caplog.records if r.getMessage() == "token.obtained"]
    assert lines
    for line in lines:
        assert "\n" not in line, line


# ==================================================================================================
# Attacks resisted: regression tests
# ==================================================================================================


@pytest.mark.parametrize(
    "access",
    ["at\r\nX-Injected: 1", "at ok", "at\tok", "at\x00ok", "at-é", "at\u2028ok"],
    ids=["crlf", "space", "tab", "nul", "non-ascii", "line-separator"],
)
async def test_access_token_with_control_or_space_is_never_injected(aiohttp_server, session, access):
    """An access_token carrying CR/LF, spaces or non-ASCII is refused as invalid_response, never put in a header."""

    async def answer(request: web.Request, form: dict[str, str]) -> web.Response:
        return web.json_response({"access_token": access, "token_type": "Bearer", "expires_in": 300})

    base, _ = await _token_server(aiohttp_server, answer)
    provider = IdentityProvider(session, _auth(base), InjectConfig())
    with pytest.raises(TokenUnavailable) as caught:
        await provider.login()
    assert caught.value.reason == "invalid_response"
    assert access not in caught.value.detail


@pytest.mark.parametrize(
    "reply",
    [
        _raw("<html><body>Welcome to nginx!</body></html>", content_type="text/html"),
        _raw("[1, 2, 3]"),
        _raw(b"\xff\xfe\x00garbage\x80"),
        _raw(""),
        _raw('"just a string"'),
        _raw(json.dumps(_ok(True))),
        _raw(json.dumps(_ok("NaN"))),
        _raw(json.dumps(_ok("Infinity"))),
        _raw(json.dumps(_ok([300]))),
        _raw('{"access_token": "at-ok", "expires_in": NaN}'),
        _raw(json.dumps({"access_token": ["at-ok"], "expires_in": 300})),
        _raw(json.dumps(_ok(300, token_type="mac"))),
    ],
    ids=[
        "html",
        "json-array",
        "non-utf8",
        "empty",
        "json-string",
        "expires_in-bool",
        "expires_in-NaN-string",
        "expires_in-Infinity",
        "expires_in-list",
        "expires_in-NaN-literal",
        "access_token-list",
        "token_type-mac",
    ],
)
async def test_garbage_200_is_a_transient_invalid_response_without_secrets(aiohttp_server, session, reply):
    """Garbage 200 answers are TokenUnavailable(invalid_response); the message names no credential."""

    async def answer(request: web.Request, form: dict[str, str]) -> web.Response:
        return web.Response(body=reply.body, status=reply.status, content_type=reply.content_type)

    base, _ = await _token_server(aiohttp_server, answer)
    provider = IdentityProvider(session, _auth(base), InjectConfig())
    with pytest.raises(TokenUnavailable) as caught:
        await provider.login()
    assert caught.value.reason == "invalid_response"
    assert PASSWORD not in str(caught.value) and CLIENT_SECRET not in str(caught.value)


async def test_provider_echoing_secrets_in_full_is_redacted(aiohttp_server, session):
    """A 400 whose error and description echo the whole form: password, secret and code never reach the message."""

    async def echo(request: web.Request, form: dict[str, str]) -> web.Response:
        text = " ".join(f"{k}={v}" for k, v in form.items())[:150]
        return web.json_response({"error": f"bad:{PASSWORD}", "error_description": text}, status=400)

    base, _ = await _token_server(aiohttp_server, echo)
    provider = IdentityProvider(session, _auth(base), InjectConfig())
    with pytest.raises(TokenRejected) as caught:
        await provider.login()
    shown = f"{caught.value} {caught.value.error} {caught.value.description}"
    assert PASSWORD not in shown and CLIENT_SECRET not in shown


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (200, {"error": "invalid_grant", "error_description": "Invalid user credentials"}, TokenRejected),
        (400, {"error": "temporarily_unavailable"}, TokenUnavailable),
        (200, {"error": "temporarily_unavailable"}, TokenUnavailable),
        (400, {"error": "invalid_grant"}, TokenRejected),
        (503, "<html>busy</html>", TokenUnavailable),
        (404, "<html>no</html>", TokenUnavailable),
    ],
)
async def test_oauth_errors_are_classified(aiohttp_server, session, status, body, kind):
    """200 with an OAuth refusal is a refusal (no tight retry); temporarily_unavailable at any status is transient."""

    async def answer(request: web.Request, form: dict[str, str]) -> web.Response:
        if isinstance(body, dict):
            return web.json_response(body, status=status)
        return _raw(body, status=status, content_type="text/html")

    base, _ = await _token_server(aiohttp_server, answer)
    provider = IdentityProvider(session, _auth(base), InjectConfig())
    with pytest.raises(kind):
        await provider.login()


@pytest.mark.parametrize(
    "value",
    [
        "99999999999",
        "-5",
        "nan",
        "inf",
        "1e400",
        "soon",
        # An id of its own: the date changes every second, and xdist's workers must collect the same test ids.
        pytest.param(email.utils.formatdate(time.time() + 10**8, usegmt=True), id="http-date-years-away"),
    ],
)
def test_retry_after_is_capped_and_floored(value):
    """Any Retry-After (huge, negative, NaN, an HTTP-date years away) gives a retry between the floor and 10 min."""
    parsed = idp_module.retry_after_s(value)
    lc = state.Lifecycle(phase=Phase.LOGGING_IN)
    failed = state.on_failed(lc, "login", 1000.0, 0.5, retry_after=parsed)
    delay = failed.retry_at - 1000.0
    assert state.RETRY_FLOOR_S <= delay <= state.RETRY_AFTER_CAP_S, (value, parsed, delay)


async def test_429_with_negative_retry_after_keeps_logins_spaced(aiohttp_server, session, managers):
    """429 with Retry-After -5 on every login: attempts never come closer than a second (the login spacing)."""

    async def answer(request: web.Request, form: dict[str, str]) -> web.Response:
        return web.json_response({"error": "slow_down"}, status=429, headers={"Retry-After": "-5"})

    base, seen = await _token_server(aiohttp_server, answer)
    vt = VirtualTime()
    provider = IdentityProvider(session, _auth(base, timeout_s=2.0), InjectConfig(), clock=vt)
    tm = managers(provider, clock=vt, sleep=vt.sleep, transient_backoff=lambda a, r, ra=None: 0.0)
    with pytest.raises(NoToken):
        await tm.get()
    for _ in range(3):  # each get past the backoff starts one attempt; login_wait sleeps on virtual time
        vt.advance(0.01)
        task = asyncio.ensure_future(tm.get())
        await vt.run_for(2.0)
        with pytest.raises(NoToken):
            await task
    assert len(seen) == 4
    assert tm.last_error is not None and tm.last_error.reason == "rate_limited"


async def test_slow_drip_token_body_is_cut_at_auth_timeout(raw_server, session):
    """A 200 whose body drips a byte every 100 ms forever: the login fails after auth.timeout_s, not never."""

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
        for _ in range(100):  # bounded: 10 s at most
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.1)

    url = await raw_server(drip)
    provider = IdentityProvider(session, _auth(url, timeout_s=0.5), InjectConfig())
    started = time.monotonic()
    with pytest.raises(TokenUnavailable) as caught:
        await provider.login()
    assert time.monotonic() - started < 2.0
    assert caught.value.reason == "timeout"


async def test_hanging_revoke_endpoint_keeps_shutdown_bounded(raw_server, session, managers, monkeypatch):
    """revoke_on_shutdown against an endpoint that never answers: close() returns after END_SESSION_TIMEOUT_S."""
    monkeypatch.setattr(idp_module, "END_SESSION_TIMEOUT_S", 0.3)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b"/revoke" in head:
            await asyncio.sleep(10)  # never answers within the test
            return
        body = json.dumps(_ok(300, refresh_token="rt-1")).encode()
        length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        writer.write(body)
        await writer.drain()

    url = await raw_server(handler)
    clock = FakeClock()
    provider = IdentityProvider(
        session, _auth(url, revoke_url=url + "/revoke", timeout_s=30), InjectConfig(), clock=clock
    )
    tm = managers(provider, clock=clock)
    await tm.get()
    started = time.monotonic()
    await tm.close(revoke=True)
    assert time.monotonic() - started < 1.5


async def test_refresh_expires_in_zero_is_no_expiry_and_the_token_is_refreshed(aiohttp_server, session, managers):
    """refresh_expires_in 0 (Keycloak's offline token) keeps refreshing: not a dead refresh token forcing logins."""

    async def answer(request: web.Request, form: dict[str, str]) -> web.Response:
        n = len(seen)
        return web.json_response(_ok(100, refresh_token=f"rt-{n}", refresh_expires_in=0, access_token=f"at-{n}"))

    base, seen = await _token_server(aiohttp_server, answer)
    clock = FakeClock()
    provider = IdentityProvider(session, _auth(base), InjectConfig(), clock=clock)
    tm = managers(provider, clock=clock)
    for _ in range(3):
        await tm.get()
        clock.advance(100.0)
    assert [form["grant_type"] for form in seen] == ["password", "refresh_token", "refresh_token"]
    assert [form.get("refresh_token") for form in seen] == [None, "rt-1", "rt-2"]
