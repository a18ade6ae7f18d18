"""The token lifecycle end to end: fake identity providers, an API, and the proxy in front, all on 127.0.0.1.

Most tests run DemoIdP and DemoAPI; grants that cannot simply be repeated (rotating refresh tokens, one-time
codes) run FakeOAuth2 (tests/fakes/vendors.py); expiry runs SlowIdP (tests/fakes/endpoints.py), a token
endpoint that takes its time and an API that refuses tokens past their real expiry. Persistent 401s,
concurrent 401s and a 401 after refresh and access were both revoked are in test_forward.py.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest

from proxy.app import METRICS
from proxy.config import config_from_mapping
from proxy.demo import Fault
from proxy.observability import TextFormatter
from proxy.state import Phase
from tests.fakes.endpoints import HeldIdP, SlowIdP
from tests.fakes.servers import (
    QUICK_LOGINS,
    keycloak_config,
    proxy_config,
    serve_idp,
    start_api,
    start_app,
    start_idp,
    start_proxy,
)
from tests.fakes.vendors import FakeOAuth2, start_fake
from tests.faults.conftest import events, manager, wait_for

WRONG_PASSWORD = "wrong-Pw-7731-not-real"


async def steady_traffic(client, seconds: float, workers: int = 4, pause: float = 0.05, during=None) -> Counter:
    """``workers`` clients each calling /v1/hello in a loop for ``seconds``; the statuses seen.

    ``during`` (optional) is awaited alongside, e.g. to revoke tokens part-way.
    """
    statuses: Counter = Counter()
    deadline = time.monotonic() + seconds
    max_calls = int(seconds / pause) + 1  # bounded in count as well as in time

    async def worker() -> None:
        for _ in range(max_calls):
            if time.monotonic() >= deadline:
                return
            resp = await client.get("/v1/hello")
            await resp.read()
            statuses[resp.status] += 1
            await asyncio.sleep(pause)

    await asyncio.gather(*(worker() for _ in range(workers)), *([during] if during else []))
    return statuses


async def test_burst_of_200_requests_causes_one_login(aiohttp_server, aiohttp_client):
    """200 requests arriving while the first login is still in flight all succeed on that one login."""
    idp = await serve_idp(aiohttp_server, HeldIdP())
    api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url))
    # A session without the default limit of 100 connections, so all 200 are at the proxy together.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def hello() -> tuple[int, str]:
            async with session.get(client.make_url("/v1/hello")) as resp:
                return resp.status, (await resp.json())["subject"]

        burst = [asyncio.create_task(hello()) for _ in range(200)]
        metrics = client.server.app[METRICS]
        deadline = time.monotonic() + 10
        while metrics.in_flight_count < 200:  # the whole burst has reached the proxy and waits for the login
            assert time.monotonic() < deadline, f"{metrics.in_flight_count} of 200 requests reached the proxy"
            await asyncio.sleep(0.01)
        assert not any(task.done() for task in burst)
        assert idp.waiting == 1 and idp.token_requests == 0  # the one login is still held at the gate
        idp.gate.set()
        responses = await asyncio.wait_for(asyncio.gather(*burst), 60)
    assert responses == [(200, "demo")] * 200
    assert idp.waiting == 1
    assert idp.token_requests == 1
    assert api.rejected == []


@pytest.mark.slow
async def test_steady_traffic_over_short_tokens(aiohttp_server, aiohttp_client):
    """8 s of traffic over 4 s tokens: no client error, no expired token upstream, renewed by refresh."""
    idp = await start_idp(aiohttp_server, access_lifetime_s=4.0)
    api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url))
    statuses = await steady_traffic(client, 8.0)
    assert set(statuses) == {200}, statuses
    assert statuses[200] > 60  # traffic really flowed the whole time
    assert api.rejected == []  # no expired (or unknown) token ever reached the upstream
    assert idp.hits["grant:password"] == 1
    assert idp.hits["grant:refresh_token"] >= 3  # about one refresh every 2 s
    status = await (await client.get("/-/status")).json()
    assert status["counters"]["refreshes"] == idp.hits["grant:refresh_token"]
    assert status["counters"]["failures"] == status["counters"]["rejections"] == 0


@pytest.mark.slow
async def test_refresh_rejected_mid_run_logs_in_again(aiohttp_server, aiohttp_client):
    """Refresh tokens revoked part-way: the next refresh is refused, a new login follows, clients see no error."""
    idp = await start_idp(aiohttp_server, access_lifetime_s=4.0)
    api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url))

    async def revoke_part_way() -> None:
        await asyncio.sleep(1.0)
        idp.revoke_all_refresh()

    statuses = await steady_traffic(client, 6.0, during=revoke_part_way())
    assert set(statuses) == {200}, statuses
    assert api.rejected == []
    assert idp.hits["grant:password"] == 2  # the first login, and the one after the refused refresh
    assert idp.requests[1]["grant_type"] == "refresh_token"  # the refused refresh came first
    status = await (await client.get("/-/status")).json()
    assert status["counters"]["rejections"] == 1
    assert status["last_error"]["kind"] == "refresh"


async def test_upstream_401_renews_by_refresh_and_retries(aiohttp_server, aiohttp_client):
    """Access tokens revoked at the IdP: the upstream's 401 causes one refresh and a retry the client never sees."""
    idp = await start_idp(aiohttp_server)
    api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url))
    assert (await client.get("/v1/hello")).status == 200
    idp.revoke_all_access()
    resp = await client.get("/v1/hello")
    assert resp.status == 200
    assert (await resp.json())["subject"] == "demo"
    assert idp.hits["grant:password"] == 1
    assert idp.hits["grant:refresh_token"] == 1
    assert api.rejected == ["unknown"]  # exactly one request carried the revoked token


async def test_rejected_login_gives_503_with_reason_and_backs_off(aiohttp_server, aiohttp_client, caplog):
    """Wrong password: 503 JSON saying why, with Retry-After; logins spaced out; no secret logged."""
    idp = await start_idp(aiohttp_server)
    api, api_url = await start_api(aiohttp_server, idp)
    config = keycloak_config(idp, api_url, auth={"password": WRONG_PASSWORD})
    client = await start_proxy(aiohttp_client, config, rejected_backoff=lambda attempt, rand: 0.5)
    started = time.monotonic()
    statuses: Counter = Counter()
    body: dict = {}
    for _ in range(200):  # about a second of requests, bounded in count
        resp = await client.get("/v1/hello")
        statuses[resp.status] += 1
        if resp.status == 503:
            body = await resp.json()
            assert int(resp.headers["Retry-After"]) >= 1
        else:
            await resp.read()
        if time.monotonic() - started > 1.0:
            break
        await asyncio.sleep(0.005)
    elapsed = time.monotonic() - started
    assert set(statuses) == {503}, statuses
    assert body["error"] == "no_token"
    assert "Invalid user credentials" in body["detail"]
    assert sum(api.hits.values()) == 0  # nothing went upstream without a token
    assert 1 <= idp.hits["grant:password"] <= elapsed / 0.5 + 2
    ready = await client.get("/-/ready")
    assert ready.status == 503
    assert "Invalid user credentials" in (await ready.json())["reason"]
    logs = "\n".join(TextFormatter().format(r) for r in caplog.records)
    assert "token.login_rejected" in logs
    assert WRONG_PASSWORD not in logs
    assert WRONG_PASSWORD not in repr(body)


@pytest.mark.slow(reason="3 s of traffic on real time over a 4 s token")
async def test_identity_provider_outage_keeps_serving_with_the_held_token(aiohttp_server, aiohttp_client):
    """The IdP answers 503 to refreshes: requests keep succeeding on the held token until it comes back."""
    idp = await start_idp(aiohttp_server, access_lifetime_s=4.0)
    api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url))
    assert (await client.get("/v1/hello")).status == 200
    idp.fail_next(Fault(503, "<html>maintenance</html>"), Fault(503, "<html>maintenance</html>"))
    statuses = await steady_traffic(client, 3.0, workers=2)
    assert set(statuses) == {200}, statuses
    assert api.rejected == []
    assert idp.hits["grant:refresh_token"] + idp.hits["grant:password"] >= 3  # two failures, then success
    status = await (await client.get("/-/status")).json()
    assert status["counters"]["failures"] == 2
    assert status["last_error"]["reason"] == "server_error"


async def test_token_rejected_upstream_is_dropped_when_the_credentials_are_refused_too(aiohttp_server, aiohttp_client):
    """The upstream refuses the token, the refresh token is dead and the password was changed: the proxy
    must stop calling itself ready, and say why."""
    idp = await start_idp(aiohttp_server)
    _api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url), **QUICK_LOGINS)
    assert (await client.get("/v1/hello")).status == 200

    idp.revoke_all_access()
    idp.revoke_all_refresh()
    idp.users["demo"] = WRONG_PASSWORD  # the account's password changed under us
    resp = await client.get("/v1/hello")
    assert resp.status == 401  # the upstream's answer: nothing to retry with

    ready = await client.get("/-/ready")
    assert ready.status == 503
    assert "invalid_grant" in (await ready.json())["detail"]
    resp = await client.get("/v1/hello")
    assert resp.status == 503
    assert "invalid_grant" in (await resp.json())["detail"]


async def test_a_second_revocation_right_after_the_first_is_absorbed(aiohttp_server, aiohttp_client):
    """Sessions killed, a GET renews and gets 200, sessions killed again at once: the next POST is renewed and
    retried too (the upstream had accepted the renewed token), so no client sees a 401 (issue #12)."""
    idp = await start_idp(aiohttp_server)
    api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url), **QUICK_LOGINS)
    assert (await client.get("/v1/hello")).status == 200
    for _ in range(2):
        idp.revoke_all_access()
        idp.revoke_all_refresh()
        assert (await client.get("/v1/hello")).status == 200
        idp.revoke_all_access()
        idp.revoke_all_refresh()
        resp = await client.post("/v1/items", data=b"{}")
        assert resp.status == 200, await resp.text()
    assert api.rejected == ["unknown"] * 4


async def test_revoke_soon_after_another_is_hidden_once_the_token_was_refreshed(aiohttp_server, aiohttp_client):
    """Revoke, scheduled refresh, revoke again a second later: the GET after each revoke gets 200."""
    idp = await start_idp(aiohttp_server, access_lifetime_s=2.0)  # refreshed 1 s after it is obtained
    api, url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, url))
    tokens = manager(client)
    await wait_for(lambda: tokens.usable() is not None, within=3.0)
    idp.revoke_all_access()
    assert (await client.get("/v1/hello")).status == 200  # a 401, one renewal, one retry
    renewed = tokens.usable()
    await wait_for(lambda: tokens.usable() is not renewed, within=3.0)  # the scheduler refreshed it
    idp.revoke_all_access()
    resp = await client.get("/v1/hello")
    assert resp.status == 200, await resp.text()
    assert api.rejected == ["unknown", "unknown"]


O2_CLIENT, O2_SECRET = "review-client", "review-cs-never-logged-41"
O2_USER, O2_PASSWORD = "jsmith", "review-pw-never-logged-77"
TEMPORARILY_UNAVAILABLE = Fault(503, {"error": "temporarily_unavailable", "error_description": "maintenance"})
# A rejected login must not be retried for minutes; the window in which these tests see exactly one attempt.
REJECTED_WINDOW_S = 1.0
MINUTES = {"rejected_backoff": lambda attempt, rand: 60.0}


def _o2_fake(**options: Any) -> FakeOAuth2:
    return FakeOAuth2(clients={O2_CLIENT: O2_SECRET}, users={O2_USER: O2_PASSWORD}, **options)


async def _o2_proxy(aiohttp_client: Any, fake: FakeOAuth2, manager_options: dict[str, Any] | None = None, **auth: Any):
    mapping = {
        "listen": {"port": 0},
        "upstream": {"url": fake.base_url},
        "auth": {"provider": "oauth2", "token_url": fake.token_url, "client_id": O2_CLIENT, "client_secret": O2_SECRET}
        | auth,
    }
    return await start_proxy(aiohttp_client, config_from_mapping(mapping, source="test"), **(manager_options or {}))


def _assert_not_logged(caplog: pytest.LogCaptureFixture, *secret_values: str) -> None:
    text = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    for value in secret_values:
        assert value not in text


async def _slow_proxy(aiohttp_server: Any, aiohttp_client: Any, idp: SlowIdP, **manager_options: Any):
    base = await start_app(aiohttp_server, idp.app())
    return await start_proxy(aiohttp_client, proxy_config(base + "/token", base), **manager_options)


# --- grants that cannot simply be repeated ---------------------------------------------------------


@pytest.mark.parametrize("grant", ["refresh_token", "authorization_code"])
async def test_transient_refresh_failures_do_not_spend_the_configured_credential(
    aiohttp_server, aiohttp_client, caplog, grant
):
    """Two 503s on refresh, then the fallback "login" refreshes with the newest refresh token: the rotated-away
    configured token (or the spent code) is never sent again, and the proxy serves on instead of being stuck."""
    fake = await start_fake(aiohttp_server, _o2_fake(expires_in=2))  # refresh due after 1 s; rotating
    if grant == "refresh_token":
        credential = fake.add_refresh_token(O2_USER)
        client = await _o2_proxy(aiohttp_client, fake, grant_type=grant, refresh_token=credential)
    else:
        credential = fake.add_code(O2_USER)
        client = await _o2_proxy(aiohttp_client, fake, grant_type=grant, code=credential)
    assert (await client.get("/v1/hello")).status == 200
    fake.fail_next(TEMPORARILY_UNAVAILABLE, TEMPORARILY_UNAVAILABLE)
    tokens = manager(client)
    await wait_for(lambda: len(fake.seen) >= 4 and tokens.phase in (Phase.HOLDING, Phase.REJECTED), within=6.0)

    assert (await client.get("/v1/hello")).status == 200
    assert (await client.get("/-/ready")).status == 200
    status = await (await client.get("/-/status")).json()
    assert status["state"] == "holding"
    assert status["counters"]["rejections"] == 0
    assert [s.grant for s in fake.seen[:3]] == [grant, "refresh_token", "refresh_token"]
    assert all(s.grant == "refresh_token" for s in fake.seen[1:])
    assert [s.fields.get("refresh_token", s.fields.get("code")) for s in fake.seen].count(credential) == 1
    assert events(caplog, "token.login_rejected") == []
    _assert_not_logged(caplog, credential, O2_SECRET, *fake.handed_out)


# --- how the provider's errors are read ------------------------------------------------------------


async def test_wrong_password_answered_with_200_is_not_retried_soon(aiohttp_server, aiohttp_client, caplog):
    """A provider that answers a wrong password with 200 and an OAuth error: a rejected login (minutes of
    backoff, "check the credentials"), not a transient failure retried every few seconds into a lockout."""
    fake = await start_fake(aiohttp_server, _o2_fake())
    fake.fail_always(Fault(200, {"error": "invalid_grant", "error_description": "Invalid username or password"}))
    client = await _o2_proxy(
        aiohttp_client, fake, MINUTES, grant_type="password", username=O2_USER, password=O2_PASSWORD
    )
    await wait_for(lambda: manager(client).last_error is not None)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + REJECTED_WINDOW_S
    while loop.time() < deadline:
        resp = await client.get("/v1/hello")
        body = await resp.json()
        assert resp.status == 503
        assert "invalid_grant: Invalid username or password" in body["detail"]
        assert "check the credentials" in body["detail"]
        assert int(resp.headers["Retry-After"]) >= 50
        await asyncio.sleep(0.05)
    assert len(fake.seen) == 1
    status = await (await client.get("/-/status")).json()
    assert status["state"] == "rejected"
    assert status["last_error"]["reason"] == "invalid_grant"
    assert len(events(caplog, "token.login_rejected")) == 1
    _assert_not_logged(caplog, O2_PASSWORD, O2_SECRET)


async def test_temporarily_unavailable_with_a_400_is_retried_soon(aiohttp_server, aiohttp_client, caplog):
    """A 400 carrying ``temporarily_unavailable`` means "later", not "wrong credentials": retried after the
    transient backoff, not minutes later with advice to check the credentials."""
    fake = await start_fake(aiohttp_server, _o2_fake())
    fake.fail_next(Fault(400, {"error": "temporarily_unavailable", "error_description": "maintenance"}))
    client = await _o2_proxy(
        aiohttp_client,
        fake,
        {**MINUTES, **QUICK_LOGINS},
        grant_type="password",
        username=O2_USER,
        password=O2_PASSWORD,
    )
    await wait_for(lambda: manager(client).usable() is not None, within=3.0)
    assert (await client.get("/v1/hello")).status == 200
    assert len(fake.seen) == 2
    assert events(caplog, "token.login_rejected") == []
    assert [r.fields["reason"] for r in events(caplog, "token.unavailable")] == ["server_error"]


# --- expiry -----------------------------------------------------------------------------------------


@pytest.mark.slow(reason="3 s of traffic on real time, 2 s tokens answered in 0.8 s")
async def test_slow_token_endpoint_no_expired_token_reaches_the_upstream(aiohttp_server, aiohttp_client):
    """A token endpoint taking 0.8 s to answer 2 s tokens: the lifetime counts from when the token was asked
    for, so the proxy renews in time and never sends a token the upstream already considers expired."""
    idp = SlowIdP([2.0], [0.8] * 10)
    client = await _slow_proxy(aiohttp_server, aiohttp_client, idp)
    statuses = await steady_traffic(client, 3.0, workers=1, pause=0.03)
    assert set(statuses) == {200}, statuses
    assert idp.api["expired"] == 0, idp.api
    assert idp.api["ok"] > 20


async def test_token_dead_on_arrival_is_a_503_not_a_401(aiohttp_server, aiohttp_client, caplog):
    """A login that takes longer than the token lives: clients get 503 saying so, the dead token is never
    sent upstream, and the provider is asked again only after a backoff."""
    idp = SlowIdP([1.0], [1.3] * 10)
    client = await _slow_proxy(
        aiohttp_server, aiohttp_client, idp, transient_backoff=lambda attempt, rand, retry_after=None: 30.0
    )
    resp = await client.get("/v1/hello")
    body = await resp.json()
    assert resp.status == 503, body
    assert body["error"] == "no_token"
    assert "took" in body["detail"] and "expires after 1s" in body["detail"]
    assert int(resp.headers["Retry-After"]) >= 20
    assert sum(idp.api.values()) == 0
    assert len(idp.grants) == 1
    assert [r.fields["reason"] for r in events(caplog, "token.unavailable")] == ["expired_on_arrival"]


@pytest.mark.slow(reason="2.5 s of traffic on real time over 1.5 s JWTs")
async def test_jwt_exp_earlier_than_expires_in_wins(aiohttp_server, aiohttp_client):
    """expires_in says an hour, the JWT's exp says 1.5 s: the proxy renews by the earlier one, so clients never
    get the upstream's 401 for an expired token."""
    idp = SlowIdP([1.5], expires_in=3600, as_jwt=True)
    client = await _slow_proxy(aiohttp_server, aiohttp_client, idp)
    statuses = await steady_traffic(client, 2.5, workers=1, pause=0.03)
    assert set(statuses) == {200}, statuses
    assert idp.api["expired"] == 0, idp.api
    assert len(idp.grants) >= 3  # renewed about every 0.75 s
    status = await (await client.get("/-/status")).json()
    assert status["token"]["expires_in_s"] <= 1.5


@pytest.mark.slow(reason="about 2.7 s: a 2 s token expires on real time while its 1.6 s refresh is in flight")
async def test_requests_wait_for_the_refresh_in_flight_when_the_token_expires(aiohttp_server, aiohttp_client):
    """The token expires while its refresh is still in flight: 20 requests wait for that refresh and succeed;
    none fails and none causes a second token request."""
    idp = SlowIdP([2.0, 30.0], [0.0, 1.6])  # refresh sent at 1 s, answered at 2.6 s; unusable from 1.8 s
    client = await _slow_proxy(aiohttp_server, aiohttp_client, idp)
    assert (await client.get("/v1/hello")).status == 200
    tokens = manager(client)
    await wait_for(lambda: len(idp.grants) == 2 and tokens.usable() is None, within=4.0)

    responses = await asyncio.wait_for(asyncio.gather(*(client.get("/v1/hello") for _ in range(20))), 10)
    assert [r.status for r in responses] == [200] * 20
    assert idp.grants == ["password", "refresh_token"]
    assert idp.api["expired"] == 0
