"""A web page cannot use the proxy: Host (DNS rebinding) and browser-origin rules."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.fakes.servers import keycloak_config, start_api, start_idp, start_proxy


@pytest.fixture
async def setup(aiohttp_server, aiohttp_client):
    async def make(**sections):
        idp = await start_idp(aiohttp_server)
        api, api_url = await start_api(aiohttp_server, idp)
        client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url, **sections))
        return api, client

    return make


def _upstream_requests(api) -> int:
    return sum(api.hits.values())


async def test_rebinding_host_is_refused_and_nothing_reaches_upstream(setup):
    """Host: attacker.example gets 403 with a JSON reason, and the upstream never hears of it."""
    api, client = await setup()
    resp = await client.get("/v1/hello", headers={"Host": "attacker.example"})
    assert resp.status == 403
    body = await resp.json()
    assert body["error"] == "forbidden"
    assert "allowed_hosts" in body["detail"]
    assert _upstream_requests(api) == 0


@pytest.mark.parametrize("host", ["127.0.0.1:8360", "localhost:8360", "[::1]:8360", "LOCALHOST", "127.0.0.1"])
async def test_curl_like_requests_are_forwarded(setup, host):
    """A request naming the listener by loopback address or localhost, without Origin, is forwarded."""
    _api, client = await setup()
    resp = await client.get("/v1/hello", headers={"Host": host})
    assert resp.status == 200
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_allowed_hosts_opens_a_service_name(setup):
    """listen.allowed_hosts lets a Docker service name through; other names stay refused."""
    _api, client = await setup(listen={"allowed_hosts": ["sidecar"]})
    assert (await client.get("/v1/hello", headers={"Host": "sidecar:8360"})).status == 200
    assert (await client.get("/v1/hello", headers={"Host": "sidecar.evil.example"})).status == 403


async def test_reserved_paths_follow_the_host_rule(setup):
    """/-/status and the other reserved paths refuse a foreign Host too."""
    _api, client = await setup()
    for path in ("/-/healthy", "/-/ready", "/-/status", "/-/metrics"):
        resp = await client.get(path, headers={"Host": "attacker.example"})
        assert resp.status == 403, path
        assert (await resp.json())["error"] == "forbidden"


async def test_origin_header_is_refused(setup):
    """A fetch from https://evil.example (Origin header) gets 403 and no CORS headers."""
    api, client = await setup()
    resp = await client.get("/v1/hello", headers={"Origin": "https://evil.example"})
    assert resp.status == 403
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert _upstream_requests(api) == 0


async def test_cross_site_form_post_is_refused(setup):
    """A form-encoded cross-site POST (what an HTML form on another site sends) gets 403."""
    api, client = await setup()
    resp = await client.post(
        "/v1/echo/transfer",
        data="amount=1000",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Origin": "https://evil.example",
            "Sec-Fetch-Site": "cross-site",
            "Sec-Fetch-Mode": "navigate",
        },
    )
    assert resp.status == 403
    assert _upstream_requests(api) == 0


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
async def test_sec_fetch_site_without_origin_is_refused(setup, site):
    """An <img> or link from another site (Sec-Fetch-Site, no Origin) gets 403."""
    _api, client = await setup()
    resp = await client.get("/v1/hello", headers={"Sec-Fetch-Site": site})
    assert resp.status == 403


async def test_user_typed_navigation_is_allowed(setup):
    """Sec-Fetch-Site: none (the user typed the URL) is not a cross-site request."""
    _api, client = await setup()
    resp = await client.get("/v1/hello", headers={"Sec-Fetch-Site": "none"})
    assert resp.status == 200


async def test_null_origin_is_refused(setup):
    """Origin: null (sandboxed iframe, file://) is refused like any unlisted origin."""
    _api, client = await setup(access={"allow_origins": ["https://app.example"]})
    resp = await client.get("/v1/hello", headers={"Origin": "null"})
    assert resp.status == 403


async def test_allowed_origin_gets_exactly_that_origin(setup):
    """An allowed origin is forwarded and gets Access-Control-Allow-Origin with exactly that origin."""
    _api, client = await setup(access={"allow_origins": ["https://app.example"]})
    resp = await client.get("/v1/hello", headers={"Origin": "https://app.example", "Sec-Fetch-Site": "cross-site"})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Origin" in resp.headers.get("Vary", "")
    other = await client.get("/v1/hello", headers={"Origin": "https://other.example"})
    assert other.status == 403


async def test_preflight_for_allowed_origin(setup):
    """A CORS preflight from an allowed origin is answered by the proxy, never with '*'."""
    api, client = await setup(access={"allow_origins": ["https://app.example"]})
    resp = await client.options(
        "/v1/hello",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert resp.headers["Access-Control-Allow-Headers"] == "content-type"
    assert _upstream_requests(api) == 0


async def test_wildcard_origin_is_a_config_error():
    """allow_origins = ['*'] is refused at configuration time, naming the key."""
    from proxy.config import config_from_mapping
    from proxy.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        config_from_mapping(
            {
                "upstream": {"url": "http://127.0.0.1:1"},
                "auth": {
                    "provider": "keycloak",
                    "token_url": "http://127.0.0.1:2/token",
                    "username": "u",
                    "password": "p",
                },
                "access": {"allow_origins": ["*"]},
            }
        )
    assert "access.allow_origins" in str(err.value)


async def test_api_key_required_when_set(setup):
    """With access.api_key set, a missing or wrong X-Api-Key gets 401; the right one is forwarded, not leaked."""
    _api, client = await setup(access={"api_key": "k3y-for-clients"})
    resp = await client.get("/v1/hello")
    assert resp.status == 401
    assert (await resp.json())["error"] == "unauthenticated"
    assert (await client.get("/v1/hello", headers={"X-Api-Key": "wrong"})).status == 401
    resp = await client.get("/v1/echo", headers={"X-Api-Key": "k3y-for-clients"})
    assert resp.status == 200
    headers = {k.lower() for k, _ in (await resp.json())["headers"]}
    assert "x-api-key" not in headers
    # Health stays open for orchestrators; status needs the key.
    assert (await client.get("/-/healthy")).status == 200
    assert (await client.get("/-/status")).status == 401
    assert (await client.get("/-/status", headers={"X-Api-Key": "k3y-for-clients"})).status == 200


async def test_methods_and_paths_outside_access_are_403(setup):
    """allow_methods and allow_paths refuse what is not listed, with 403 and a JSON reason."""
    _api, client = await setup(access={"allow_methods": ["GET"], "allow_paths": ["/v1/hello", "/v1/echo/"]})
    assert (await client.get("/v1/hello")).status == 200
    assert (await client.get("/v1/echo/x")).status == 200
    resp = await client.post("/v1/hello")
    assert resp.status == 403
    assert "allow_methods" in (await resp.json())["detail"]
    assert (await client.get("/v1/hellox")).status == 403
    assert (await client.get("/v2/other")).status == 403
    assert (await client.get("/v1/echo%2F..%2F..%2Fadmin")).status in (400, 403)


async def test_trace_and_connect_are_not_forwarded(setup):
    """TRACE (which would echo the injected token) and CONNECT get 400 without reaching the upstream."""
    api, client = await setup()
    resp = await client.request("TRACE", "/v1/echo")
    assert resp.status == 400
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(1 << 16), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "bad_request"
    assert _upstream_requests(api) == 0
