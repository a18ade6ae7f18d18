"""Bounded soaks: traffic through short-lived tokens while the identity provider fails token requests.

The first runs the token manager on virtual time (the schedule is the point: 40 s of it in well under a
second); the second is a compressed real run through the whole proxy, with real sockets and real faults.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
from collections import Counter

import pytest
from aiohttp import web

from proxy.demo import DemoAPI, DemoIdP
from proxy.errors import NoToken
from proxy.tokens import TokenManager
from tests.fakes.clock import VirtualTime
from tests.fakes.idp import FakeIdP
from tests.fakes.servers import keycloak_config, start_proxy
from tests.faults.conftest import manager

VIRTUAL_SOAK_S = 40.0
CLIENTS = 4
CLIENT_PAUSE_S = 0.05  # each client: a request, then this pause (about 3,200 requests in all)
UPSTREAM_LATENCY_S = 0.02  # between taking the token and the upstream checking it
TOKEN_LATENCY_S = 0.05
SEEDS = range(5)


@pytest.mark.parametrize("seed", SEEDS)
async def test_short_tokens_and_a_flaky_provider_on_virtual_time(seed):
    """3 s tokens, refresh_margin_s = 1.5, 20 % of token requests answered 503, 4 clients for 40 s (issue #12):
    no client ever sees an error, no expired token reaches the upstream, at most ~60 token requests."""
    vt = VirtualTime()
    idp = FakeIdP(vt, lifetime=3.0, sleep=vt.sleep, delay=TOKEN_LATENCY_S, fail_rate=0.2, rng=random.Random(seed))
    tm = TokenManager(idp, refresh_margin_s=1.5, clock=vt, sleep=vt.sleep, rand=random.Random(seed + 100).random)
    tm.start()
    await vt.run_until(lambda: tm.usable() is not None, within=30.0)  # clients come once /-/ready says 200
    statuses: Counter[str] = Counter()
    end = vt.now + VIRTUAL_SOAK_S

    async def client() -> None:
        for _ in range(int(VIRTUAL_SOAK_S / CLIENT_PAUSE_S) + 1):
            if vt.now >= end:
                return
            try:
                token = await tm.get()
            except NoToken:
                statuses["503"] += 1
            else:
                await vt.sleep(UPSTREAM_LATENCY_S)
                statuses["200" if vt.now < idp.expiry[token.access_token] else "expired"] += 1
                tm.accepted(token)
            await vt.sleep(CLIENT_PAUSE_S)

    requests_before = len(idp.calls)
    clients = [asyncio.ensure_future(client()) for _ in range(CLIENTS)]
    await vt.run_for(VIRTUAL_SOAK_S + 1.0)
    await asyncio.gather(*clients)
    await tm.close()
    assert statuses["200"] > 2000, statuses
    assert statuses["503"] == 0, statuses
    assert statuses["expired"] == 0, statuses
    assert len(idp.calls) - requests_before <= 60, idp.kinds
    assert "login" not in idp.kinds[requests_before:]  # every renewal a refresh: no new session for a 503
    assert idp.most_in_flight == 1


SOAK_S = 12.0
TOKEN_LIFETIME_S = 3.0  # renewed every 1.5 s: about eight renewals in the soak
AUTH_TIMEOUT_S = 0.5  # the hanging token request is given up after this long
FAIL_EVERY = 3  # one token request in three: every kind of fault within the compressed run
FAULT_KINDS = ("server_error", "timeout", "reset")
MAX_ITERATIONS = 10_000  # per worker, on top of the time bound
REPORT_ROWS = 20_000


class FlakyIdP(DemoIdP):
    """The demo identity provider, failing every FAIL_EVERY-th token request: 500, hang, reset, in turn."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.seen = 0
        self.injected: Counter[str] = Counter()

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.seen += 1
        if self.seen % FAIL_EVERY:
            return await super()._token(request)
        kind = FAULT_KINDS[(self.seen // FAIL_EVERY) % len(FAULT_KINDS)]
        self.injected[kind] += 1
        if kind == "server_error":
            return web.json_response({"error": "unknown_error"}, status=500)
        if kind == "reset" and request.transport is not None:
            request.transport.abort()
        await asyncio.sleep(AUTH_TIMEOUT_S * 4)  # cancelled when the proxy hangs up
        return web.Response(status=500)


@pytest.mark.slow
async def test_soak_mixed_traffic_with_a_flaky_identity_provider(aiohttp_server, aiohttp_client):
    """12 s of GETs, small POSTs and streamed reports with 3 s tokens and a flaky provider: zero client errors,
    and the upstream never sees an expired or unknown token."""
    idp = FlakyIdP(access_lifetime_s=TOKEN_LIFETIME_S)
    idp_server = await aiohttp_server(idp.app())
    idp.base_url = str(idp_server.make_url("")).rstrip("/")
    api = DemoAPI(idp)
    api_url = str((await aiohttp_server(api.app())).make_url("")).rstrip("/")
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url, auth={"timeout_s": AUTH_TIMEOUT_S}))

    errors: list[str] = []
    done: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SOAK_S

    async def run(name, one) -> None:
        for _ in range(MAX_ITERATIONS):
            if loop.time() >= deadline:
                return
            try:
                problem = await one()
            except Exception as exc:  # a client error of any kind is a failure of the soak
                problem = f"{type(exc).__name__}: {exc}"
            if problem:
                errors.append(f"{name}: {problem}")
            else:
                done[name] += 1
            await asyncio.sleep(0.01)

    async def get() -> str | None:
        resp = await client.get("/v1/hello")
        if resp.status != 200:
            return f"{resp.status} {await resp.text()}"
        return None if (await resp.json())["subject"] == "demo" else "wrong subject"

    async def post() -> str | None:
        body = os.urandom(1 + int.from_bytes(os.urandom(2), "big") % 8192)
        resp = await client.post("/v1/echo/items", data=body, headers={"Content-Type": "application/octet-stream"})
        if resp.status != 200:
            return f"{resp.status} {await resp.text()}"
        echoed = await resp.json()
        return None if echoed["body_sha256"] == hashlib.sha256(body).hexdigest() else "body changed"

    async def report() -> str | None:
        resp = await client.get(f"/v1/report?rows={REPORT_ROWS}")
        if resp.status != 200:
            return f"{resp.status} {await resp.text()}"
        lines = (await resp.read()).count(b"\n")
        return None if lines == REPORT_ROWS + 1 else f"{lines} lines"

    started = time.monotonic()
    await asyncio.gather(run("get", get), run("get2", get), run("post", post), run("report", report))
    assert time.monotonic() - started < SOAK_S + 10

    tokens = manager(client)
    assert errors == []
    assert api.rejected == []  # no expired (or unknown) token ever reached the upstream
    assert all(done[name] > 10 for name in ("get", "get2", "post", "report")), done
    assert set(idp.injected) == set(FAULT_KINDS), idp.injected  # every kind of fault happened
    assert tokens.counts["failures"] >= sum(idp.injected.values()) - 1
    assert tokens.counts["logins"] + tokens.counts["refreshes"] >= SOAK_S / TOKEN_LIFETIME_S
