"""Identity provider faults: serve on while a token is valid, answer 503 fast without one, never hammer the provider."""

from __future__ import annotations

import asyncio
import email.utils
import io
import logging
import time

import pytest
from aiohttp import web

from proxy import state
from proxy.demo import DemoIdP, Fault
from proxy.observability import LOGGER_NAME, TextFormatter
from tests.fakes.servers import (
    QUICK_LOGINS,
    keycloak_config,
    proxy_config,
    start_api,
    start_app,
    start_idp,
    start_proxy,
)
from tests.faults.conftest import PASSWORD, app_with, events, manager, wait_for

TOKEN_PATH = "/realms/demo/protocol/openid-connect/token"
# "Quickly": a request without a usable token is answered well within this, whatever the provider does.
FAST_ANSWER_S = 1.0
# A rejected login is retried after minutes; this long a window must see exactly one attempt.
REJECTED_WINDOW_S = 1.0
# Faults that a provider answers immediately, each with the failure reason it must be reported as.
IMMEDIATE_FAULTS = {
    "server_error": Fault(503, body={"error": "temporarily_unavailable", "error_description": "maintenance"}),
    "rate_limited": Fault(429, body="slow down"),
    "invalid_response": Fault(200, body="<html><body>Welcome to nginx!</body></html>"),
}
# Long enough to outlast any test here: the provider keeps failing.
MANY = 500


def _real_transient_backoff(attempt: int, rand: float, retry_after: float | None = None) -> float:
    return state.transient_backoff(attempt, rand, retry_after)


async def _assert_fast_503(client, *reason_parts: str, within: float = FAST_ANSWER_S) -> dict:
    """A forwarded request gets 503 with Retry-After and a JSON reason, in less than ``within`` seconds."""
    started = time.monotonic()
    resp = await client.get("/v1/hello")
    elapsed = time.monotonic() - started
    assert resp.status == 503
    assert elapsed < within, f"503 took {elapsed:.2f}s"
    assert int(resp.headers["Retry-After"]) >= 1
    body = await resp.json()
    assert body["error"] == "no_token"
    for part in reason_parts:
        assert part in body["detail"]
    return {"body": body, "retry_after": int(resp.headers["Retry-After"])}


async def _assert_not_ready(client, *reason_parts: str) -> dict:
    resp = await client.get("/-/ready")
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) >= 1
    body = await resp.json()
    assert body["ready"] is False
    for part in reason_parts:
        assert part in body["detail"]
    return body


# --- no token held ---------------------------------------------------------------------------------


async def test_unreachable_provider_gives_fast_503_and_not_ready(aiohttp_server, aiohttp_client, dead_url, caplog):
    """Token endpoint refusing connections: 503 with Retry-After and 'unreachable' at once; /-/ready 503 says why."""
    idp = await start_idp(aiohttp_server)
    api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, proxy_config(dead_url + TOKEN_PATH, api_url))
    await wait_for(lambda: manager(client).last_error is not None)

    await _assert_fast_503(client, "unreachable")
    await _assert_not_ready(client, "unreachable")
    status = await (await client.get("/-/status")).json()
    assert status["ready"] is False
    assert status["last_error"]["reason"] == "unreachable"
    assert sum(api.hits.values()) == 0
    logged = events(caplog, "token.unavailable")
    assert logged and all(r.levelno == logging.WARNING for r in logged)
    assert logged[0].fields["reason"] == "unreachable"
    assert logged[0].fields["token_held"] is False


@pytest.mark.parametrize("reason", list(IMMEDIATE_FAULTS))
async def test_failing_provider_gives_fast_503_with_reason(aiohttp_server, aiohttp_client, caplog, reason):
    """5xx, 429 and a garbage 200 body: no token, so requests get a quick 503 naming the failure."""
    idp = await start_idp(aiohttp_server)
    idp.fail_next(*[IMMEDIATE_FAULTS[reason]] * MANY)
    api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url))
    await wait_for(lambda: manager(client).last_error is not None)

    answer = await _assert_fast_503(client)
    ready = await _assert_not_ready(client)
    status = await (await client.get("/-/status")).json()
    assert status["last_error"]["reason"] == reason
    assert status["last_error"]["kind"] == "login"
    assert status["last_error"]["detail"] in answer["body"]["detail"]
    assert status["last_error"]["detail"] in ready["detail"]
    assert {r.fields["reason"] for r in events(caplog, "token.unavailable")} == {reason}
    assert sum(api.hits.values()) == 0


@pytest.mark.slow(reason="about 4 s: a real 2.5 s auth timeout, then requests during the retries")
async def test_hanging_provider_does_not_make_requests_wait(aiohttp_server, aiohttp_client, caplog):
    """A token endpoint that never answers: after the first timeout, requests get 503 well within auth.timeout_s."""
    timeout_s = 2.5
    arrived = []

    async def hang(request: web.Request) -> web.Response:
        arrived.append(time.monotonic())
        await asyncio.sleep(30)  # cancelled when the proxy gives up and disconnects
        return web.Response()

    idp_url = await start_app(aiohttp_server, app_with(hang))
    idp = await start_idp(aiohttp_server)
    _api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(
        aiohttp_client, proxy_config(idp_url + TOKEN_PATH, api_url, auth={"timeout_s": timeout_s})
    )
    await wait_for(lambda: manager(client).last_error is not None, within=timeout_s + 3)
    assert manager(client).last_error.reason == "timeout"

    for _ in range(3):  # whatever the retry schedule, no request waits for the hanging provider
        await _assert_fast_503(client, f"did not answer within {timeout_s:g}s", within=timeout_s / 2)
        await asyncio.sleep(0.1)
    await _assert_not_ready(client, "did not answer")
    assert len(arrived) >= 2  # the requests above met a retry in flight, and did not wait for it
    assert all(r.fields["reason"] == "timeout" for r in events(caplog, "token.unavailable"))


@pytest.mark.parametrize("retry_after", ["30", "date"])
async def test_429_retry_after_is_honoured(aiohttp_server, aiohttp_client, retry_after):
    """429 with Retry-After (seconds or an HTTP date): no token request before it, and clients are told to wait."""
    value = retry_after
    if retry_after == "date":
        value = email.utils.formatdate(time.time() + 30, usegmt=True)
    idp = await start_idp(aiohttp_server)
    idp.fail_next(Fault(429, body={"error": "too_many_requests"}, headers={"Retry-After": value}))
    _api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url), transient_backoff=_real_transient_backoff)
    await wait_for(lambda: manager(client).last_error is not None)

    status = await (await client.get("/-/status")).json()
    assert status["last_error"]["reason"] == "rate_limited"
    assert 25 <= status["retry_in_s"] <= 31
    answer = await _assert_fast_503(client, "rate limiting")
    assert 25 <= answer["retry_after"] <= 31
    await asyncio.sleep(0.5)
    assert idp.token_requests == 1  # the 429 only: nothing sent before Retry-After has passed


# --- a valid token held ----------------------------------------------------------------------------


@pytest.mark.slow(reason="about 2 s of requests on real time, until a 4 s token's refresh has failed twice")
async def test_provider_gone_while_token_valid_keeps_serving(aiohttp_server, aiohttp_client, caplog):
    """The identity provider disappears after login: requests keep succeeding on the held token; ready stays 200."""
    idp = DemoIdP(access_lifetime_s=4)
    idp_server = await aiohttp_server(idp.app())
    idp.base_url = str(idp_server.make_url("")).rstrip("/")
    api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url))
    assert (await client.get("/v1/hello")).status == 200
    await idp_server.close()

    tokens = manager(client)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3.0  # the refresh is due after 2 s; the token stays usable until 3.6 s
    while tokens.counts["failures"] < 2 and loop.time() < deadline:
        assert (await client.get("/v1/hello")).status == 200
        await asyncio.sleep(0.05)
    assert tokens.counts["failures"] >= 2, "the refresh never failed"
    assert (await client.get("/v1/hello")).status == 200
    ready = await client.get("/-/ready")
    assert ready.status == 200
    status = await (await client.get("/-/status")).json()
    assert status["ready"] is True
    assert status["last_error"]["reason"] == "unreachable"
    assert all(r.fields["token_held"] for r in events(caplog, "token.unavailable"))
    assert api.rejected == []


@pytest.mark.slow(reason="about 2.5 s on real time: five failed renewals of a 4 s token, one a real timeout")
async def test_every_transient_fault_while_token_valid(aiohttp_server, aiohttp_client, caplog):
    """5xx, 429, garbage and a timeout in a row during renewal: no client notices, and the next attempt succeeds."""
    idp = await start_idp(aiohttp_server, access_lifetime_s=4)
    api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url, auth={"timeout_s": 0.3}))
    assert (await client.get("/v1/hello")).status == 200
    idp.fail_next(*IMMEDIATE_FAULTS.values(), Fault(200, body={"access_token": "x"}, delay_s=3))

    tokens = manager(client)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 4.0
    statuses = []
    while tokens.counts["logins"] + tokens.counts["refreshes"] < 2 and loop.time() < deadline:
        statuses.append((await client.get("/v1/hello")).status)
        await asyncio.sleep(0.05)
    assert tokens.counts["logins"] + tokens.counts["refreshes"] == 2, "no renewal after the faults"
    assert set(statuses) == {200}
    assert tokens.counts["failures"] == 4
    reasons = [r.fields["reason"] for r in events(caplog, "token.unavailable")]
    assert reasons == [*IMMEDIATE_FAULTS, "timeout"]
    assert (await client.get("/v1/hello")).status == 200
    assert api.rejected == []


# --- credentials rejected --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("idp_options", "error", "description"),
    [
        ({"users": {"demo": "another-password"}}, "invalid_grant", "Invalid user credentials"),
        ({"clients": {"someone-else": None}}, "invalid_client", "Invalid client or Invalid client credentials"),
    ],
)
async def test_rejected_login_is_not_retried_soon(
    aiohttp_server, aiohttp_client, caplog, idp_options, error, description
):
    """Wrong credentials: one login, then minutes of backoff; the reason is in /-/ready, /-/status and the 503."""
    idp = await start_idp(aiohttp_server, **idp_options)
    api, api_url = await start_api(aiohttp_server, idp)
    config = keycloak_config(idp, api_url, auth={"password": PASSWORD})
    client = await start_proxy(aiohttp_client, config, rejected_backoff=state.rejected_backoff)
    await wait_for(lambda: manager(client).last_error is not None)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + REJECTED_WINDOW_S
    seen: list[str] = []
    while loop.time() < deadline:  # clients and probes keep coming; none of them causes a login
        answer = await _assert_fast_503(client, error, description, "check the credentials")
        assert answer["retry_after"] >= 50
        ready = await _assert_not_ready(client, error, description)
        seen.append(ready["detail"])
        await asyncio.sleep(0.1)
    assert idp.token_requests == 1

    status = await (await client.get("/-/status")).json()
    assert status["state"] == "rejected"
    assert status["last_error"]["kind"] == "login"
    assert status["last_error"]["reason"] == error
    assert description in status["last_error"]["detail"]
    assert status["retry_in_s"] >= 50
    rejected = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in rejected] == ["token.login_rejected"]
    assert rejected[0].fields["error"] == error
    assert rejected[0].fields["description"] == description
    assert PASSWORD not in caplog.text and all(PASSWORD not in s for s in seen)
    assert sum(api.hits.values()) == 0


async def test_one_error_line_per_rejected_attempt(aiohttp_server, aiohttp_client):
    """Each rejected login is one ERROR line naming the provider's error and description; the backoff grows."""
    attempts: list[int] = []

    def short_backoff(attempt: int, rand: float) -> float:
        attempts.append(attempt)
        return 0.3

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    handler.setLevel(logging.ERROR)
    logging.getLogger(LOGGER_NAME).addHandler(handler)

    idp = await start_idp(aiohttp_server, users={"demo": "another-password"})
    _api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(
        aiohttp_client, keycloak_config(idp, api_url), rejected_backoff=short_backoff, **QUICK_LOGINS
    )
    await wait_for(lambda: idp.token_requests >= 3, within=3.0)
    await client.close()  # stop the scheduler so the counts below are final

    lines = stream.getvalue().splitlines()
    assert len(lines) == idp.token_requests
    for line in lines:
        assert " error token.login_rejected " in line
        assert "error=invalid_grant" in line
        assert 'description="Invalid user credentials"' in line
    assert attempts == list(range(len(attempts)))  # the backoff sees the attempt count grow
    assert state.rejected_backoff(1, 0.5) == 2 * state.rejected_backoff(0, 0.5)  # ... and doubles with it
    assert state.rejected_backoff(0, 0.0) >= 50


async def test_rejected_then_fixed_recovers(aiohttp_server, aiohttp_client):
    """When the provider accepts the credentials again (account unlocked), the next attempt logs in and serves."""
    idp = await start_idp(aiohttp_server)
    idp.fail_next(Fault(400, body={"error": "invalid_grant", "error_description": "Account is temporarily disabled"}))
    _api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url), **QUICK_LOGINS)
    await wait_for(lambda: manager(client).last_error is not None)
    await wait_for(lambda: manager(client).usable() is not None, within=3.0)
    assert (await client.get("/v1/hello")).status == 200
    assert (await client.get("/-/ready")).status == 200
    assert idp.token_requests == 2
