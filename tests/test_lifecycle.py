"""The token lifecycle end to end: DemoIdP, DemoAPI and the proxy in front, all on 127.0.0.1.

Persistent 401s, concurrent 401s and a 401 after refresh and access were both revoked are in test_forward.py.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp
import pytest
from aiohttp import web

from proxy.app import METRICS
from proxy.demo import DemoIdP
from proxy.observability import TextFormatter
from tests.fakes.servers import keycloak_config, start_api, start_idp, start_proxy

WRONG_PASSWORD = "wrong-Pw-7731-not-real"


class HeldIdP(DemoIdP):
    """A DemoIdP whose token endpoint waits until the test opens ``gate``."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.gate = asyncio.Event()
        self.waiting = 0

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.waiting += 1
        await self.gate.wait()
        return await super()._token(request)


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
    idp = HeldIdP()
    server = await aiohttp_server(idp.app())
    idp.base_url = str(server.make_url("")).rstrip("/")
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


async def test_identity_provider_outage_keeps_serving_with_the_held_token(aiohttp_server, aiohttp_client):
    """The IdP answers 503 to refreshes: requests keep succeeding on the held token until it comes back."""
    from proxy.demo import Fault

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
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url))
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
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url))
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
