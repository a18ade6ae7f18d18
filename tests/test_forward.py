"""Forwarding: what arrives upstream, and what comes back to the client."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os

from aiohttp import web
from yarl import URL

from tests.fakes.servers import keycloak_config, start_api, start_app, start_idp, start_proxy


async def _proxy_to_echo(aiohttp_server, aiohttp_client, **sections):
    idp = await start_idp(aiohttp_server)
    api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url, **sections))
    return idp, api, client


async def test_path_and_query_arrive_byte_exact(aiohttp_server, aiohttp_client):
    """Encoded slashes, spaces, plus signs, repeated and empty parameters reach the upstream unchanged."""
    _, _, client = await _proxy_to_echo(aiohttp_server, aiohttp_client)
    raw = "/v1/echo/a%2Fb/%7Euser/caf%C3%A9;p=1?q=a+b%20c&q=&empty&x=%2F%3F%26&%E2%9C%93=1"
    resp = await client.session.get(URL(f"http://{client.host}:{client.port}{raw}", encoded=True))
    assert resp.status == 200
    assert (await resp.json())["raw_path"] == raw


async def test_body_and_headers_arrive_intact(aiohttp_server, aiohttp_client):
    """The body arrives byte for byte; end-to-end headers keep their values; the client's credentials do not."""
    idp = await start_idp(aiohttp_server)
    _api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url))
    body = os.urandom(300_000)
    resp = await client.put(
        "/v1/echo/upload",
        data=body,
        headers={
            "Content-Type": "application/octet-stream",
            "X-Custom": "  spaced value ",
            "Authorization": "Bearer client-supplied-should-vanish",
            "Cookie": "a=1",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "must not pass",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        },
    )
    assert resp.status == 200
    echoed = await resp.json()
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echoed["body_bytes"] == len(body)
    assert echoed["method"] == "PUT"
    headers = {k.lower(): v for k, v in echoed["headers"]}
    assert headers["x-custom"] == "spaced value"  # HTTP strips surrounding whitespace; the value is kept
    assert headers["cookie"] == "a=1"
    assert headers["content-type"] == "application/octet-stream"
    for gone in ("x-hop", "keep-alive", "te", "proxy-authorization"):
        assert gone not in headers
    assert headers["host"] == api_url.removeprefix("http://")  # Host is the upstream's
    assert echoed["subject"] == "demo"  # the injected token, not the client's, authenticated it


async def test_client_authorization_is_replaced_not_added(aiohttp_server, aiohttp_client):
    """The upstream sees exactly one Authorization header, the injected token, never the client's own."""
    idp = await start_idp(aiohttp_server)
    seen = []

    async def record(request):
        seen.append(request.headers.getall("Authorization", []))
        return web.json_response({})

    url = await _upstream_app(aiohttp_server, record)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, url))
    resp = await client.get("/x", headers={"Authorization": "Bearer client-supplied-should-vanish"})
    assert resp.status == 200
    [arrived] = seen
    assert len(arrived) == 1 and arrived[0].startswith("Bearer ")
    issued = idp.valid(arrived[0].removeprefix("Bearer "))
    assert issued is not None and issued.subject == "demo"


async def test_client_values_of_the_injected_header_are_dropped_in_either_spelling(aiohttp_server, aiohttp_client):
    """With an injected access_token header (WebCommander), a client's access_token or Access-Token never
    reaches the upstream: servers that read headers CGI-style fold "-" and "_" into one variable."""
    idp = await start_idp(aiohttp_server)
    seen = []

    async def record(request):
        seen.append(
            [(k.lower(), v) for k, v in request.raw_headers if k.lower().replace(b"-", b"_") == b"access_token"]
        )
        return web.json_response({})

    url = await _upstream_app(aiohttp_server, record)
    config = keycloak_config(idp, url, inject={"header": "access_token", "value": "{token}"})
    client = await start_proxy(aiohttp_client, config)
    resp = await client.get("/x", headers={"access_token": "client-one", "Access-Token": "client-two"})
    assert resp.status == 200
    [arrived] = seen
    assert len(arrived) == 1 and arrived[0][0] == b"access_token"
    assert idp.valid(arrived[0][1].decode()) is not None  # the injected token, alone


async def test_host_is_the_upstreams(aiohttp_server, aiohttp_client):
    """The upstream sees its own host and port in Host, whatever the client sent."""
    idp = await start_idp(aiohttp_server)
    _api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url))
    resp = await client.get("/v1/echo", headers={"Host": "localhost:8360"})
    headers = {k.lower(): v for k, v in (await resp.json())["headers"]}
    assert headers["host"] == api_url.removeprefix("http://")


async def _upstream_app(aiohttp_server, handler, path="/{tail:.*}"):
    app = web.Application()
    app.router.add_route("*", path, handler)
    return await start_app(aiohttp_server, app)


async def test_redirects_pass_through_unfollowed(aiohttp_server, aiohttp_client):
    """A 302 from the upstream reaches the client as a 302 with its Location."""
    idp = await start_idp(aiohttp_server)

    async def redirect(request):
        return web.Response(status=302, headers={"Location": "https://elsewhere.example/x"})

    url = await _upstream_app(aiohttp_server, redirect)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, url))
    resp = await client.get("/anything", allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "https://elsewhere.example/x"


async def test_content_encoding_passes_untouched(aiohttp_server, aiohttp_client):
    """A gzip body is relayed compressed, with its Content-Encoding and length, not decompressed."""
    idp = await start_idp(aiohttp_server)
    payload = gzip.compress(json.dumps({"rows": list(range(1000))}).encode())
    seen = {}

    async def gz(request):
        seen["accept-encoding"] = request.headers.get("Accept-Encoding")
        return web.Response(body=payload, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    url = await _upstream_app(aiohttp_server, gz)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, url))
    resp = await client.get("/report", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert resp.status == 200
    assert resp.headers["Content-Encoding"] == "gzip"
    assert await resp.read() == payload
    assert seen["accept-encoding"] == "gzip"


async def test_no_accept_encoding_is_added(aiohttp_server, aiohttp_client):
    """A client that asks for no compression gets none: the proxy adds no Accept-Encoding of its own."""
    idp = await start_idp(aiohttp_server)
    seen = {}

    async def record(request):
        seen.update((name.lower(), value) for name, value in request.headers.items())
        return web.json_response({})

    url = await _upstream_app(aiohttp_server, record)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, url))
    client.session._default_headers.pop("Accept-Encoding", None)
    await client.get("/x", skip_auto_headers=["Accept-Encoding", "User-Agent"])
    assert "host" in seen  # the request arrived, its header names in lower case
    assert "accept-encoding" not in seen
    assert "user-agent" not in seen


async def test_hop_by_hop_response_headers_dropped(aiohttp_server, aiohttp_client):
    """Headers named in the upstream's Connection header, and hop-by-hop ones, stop at the proxy."""
    idp = await start_idp(aiohttp_server)

    async def hop(request):
        return web.Response(
            text="ok",
            headers={
                "Connection": "X-Private",
                "X-Private": "secret-ish",
                "X-Public": "yes",
                "Proxy-Authenticate": "Basic",
                "Set-Cookie": "s=1",
            },
        )

    url = await _upstream_app(aiohttp_server, hop)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, url))
    resp = await client.get("/x")
    assert resp.headers["X-Public"] == "yes"
    assert resp.headers["Set-Cookie"] == "s=1"
    assert "X-Private" not in resp.headers
    assert "Proxy-Authenticate" not in resp.headers


async def test_upstream_cookies_are_not_replayed(aiohttp_server, aiohttp_client):
    """A cookie the upstream sets for one client is never sent upstream on another request."""
    idp = await start_idp(aiohttp_server)
    seen = []

    async def cookie(request):
        seen.append(request.headers.get("Cookie"))
        return web.Response(text="ok", headers={"Set-Cookie": "session=abc; Path=/"})

    url = await _upstream_app(aiohttp_server, cookie)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, url))
    client.session.cookie_jar.clear()
    await client.get("/a")
    client.session.cookie_jar.clear()
    await client.get("/b")
    assert seen == [None, None]


async def test_upstream_base_path_is_kept(aiohttp_server, aiohttp_client):
    """With upstream.url = http://host/api, /v1/x goes to /api/v1/x."""
    idp = await start_idp(aiohttp_server)
    seen = []

    async def record(request):
        seen.append(request.raw_path)
        return web.json_response({})

    url = await _upstream_app(aiohttp_server, record)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, url + "/api/"))
    await client.get("/v1/x?y=1")
    assert seen == ["/api/v1/x?y=1"]


async def test_upstream_401_renews_once_and_retries(aiohttp_server, aiohttp_client):
    """When the upstream stops accepting the token, the proxy logs in again and the client sees 200."""
    idp, _api, client = await _proxy_to_echo(aiohttp_server, aiohttp_client)
    assert (await client.get("/v1/hello")).status == 200
    idp.revoke_all_access()
    idp.revoke_all_refresh()
    resp = await client.get("/v1/hello")
    assert resp.status == 200
    assert idp.hits["grant:password"] == 2  # one renewal: refresh refused, then a fresh login
    assert idp.hits["grant:refresh_token"] == 1


async def test_concurrent_401s_share_one_renewal(aiohttp_server, aiohttp_client):
    """Twenty requests rejected together cause one token renewal, and all of them succeed."""
    idp, _api, client = await _proxy_to_echo(aiohttp_server, aiohttp_client)
    assert (await client.get("/v1/hello")).status == 200
    idp.revoke_all_access()
    before = idp.token_requests
    responses = await asyncio.gather(*(client.get("/v1/hello") for _ in range(20)))
    assert [r.status for r in responses] == [200] * 20
    assert idp.token_requests - before == 1


async def test_persistent_401_is_returned_after_one_retry(aiohttp_server, aiohttp_client):
    """An upstream that always answers 401 gets the request twice, then the client gets the 401."""
    idp = await start_idp(aiohttp_server)
    hits = []

    async def always_401(request):
        hits.append(request.headers.get("Authorization"))
        return web.Response(status=401, text="no", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    url = await _upstream_app(aiohttp_server, always_401)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, url))
    resp = await client.get("/x")
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert len(hits) == 2
    assert hits[0] != hits[1]  # the retry carried the renewed token
    # A second request within the renewal interval does not renew again: one call upstream, 401 back.
    resp = await client.get("/x")
    assert resp.status == 401
    assert len(hits) == 3


async def test_large_body_is_not_replayed_on_401(aiohttp_server, aiohttp_client):
    """A body too large to buffer is streamed once; on 401 the client gets the 401, not a truncated retry."""
    idp = await start_idp(aiohttp_server)
    sizes = []

    async def reject(request):
        sizes.append(len(await request.read()))
        return web.Response(status=401)

    url = await _upstream_app(aiohttp_server, reject)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, url, upstream={"replay_limit_bytes": 1024}))
    resp = await client.post("/upload", data=b"x" * 10_000)
    assert resp.status == 401
    assert sizes == [10_000]
    resp = await client.post("/upload", data=b"x" * 100)
    assert sizes[1:] == [100, 100]  # small bodies are replayed


async def test_head_and_no_content(aiohttp_server, aiohttp_client):
    """HEAD keeps the upstream's Content-Length with no body; 204 and 304 come back empty."""
    idp = await start_idp(aiohttp_server)

    async def various(request):
        if request.path == "/204":
            return web.Response(status=204)
        if request.path == "/304":
            return web.Response(status=304, headers={"ETag": '"v1"'})
        return web.Response(body=b"x" * 1234)

    url = await _upstream_app(aiohttp_server, various)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, url))
    resp = await client.head("/data")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == "1234"
    assert await resp.read() == b""
    assert (await client.get("/204")).status == 204
    resp = await client.get("/304")
    assert resp.status == 304
    assert resp.headers["ETag"] == '"v1"'
    # The connection is still usable afterwards.
    resp = await client.get("/data")
    assert len(await resp.read()) == 1234


async def test_chunked_upload_streams(aiohttp_server, aiohttp_client):
    """A chunked upload of unknown length is streamed to the upstream whole."""
    _, _, client = await _proxy_to_echo(aiohttp_server, aiohttp_client)
    parts = [os.urandom(50_000) for _ in range(10)]

    async def gen():
        for part in parts:
            yield part

    resp = await client.post("/v1/echo/chunked", data=gen())
    echoed = await resp.json()
    assert echoed["body_bytes"] == 500_000
    assert echoed["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()


async def test_request_id_is_sent_upstream_and_back(aiohttp_server, aiohttp_client):
    """Each request gets an X-Request-Id, sent upstream and returned; a client's own id is kept."""
    _, _, client = await _proxy_to_echo(aiohttp_server, aiohttp_client)
    resp = await client.get("/v1/echo")
    generated = resp.headers["X-Request-Id"]
    headers = {k.lower(): v for k, v in (await resp.json())["headers"]}
    assert headers["x-request-id"] == generated
    resp = await client.get("/v1/echo", headers={"X-Request-Id": "abc-123"})
    headers = {k.lower(): v for k, v in (await resp.json())["headers"]}
    assert headers["x-request-id"] == "abc-123"
    assert resp.headers["X-Request-Id"] == "abc-123"


async def test_an_oversized_or_odd_client_request_id_is_replaced(aiohttp_server, aiohttp_client):
    """A client cannot put a huge or control-character id into every log line and upstream request."""
    _, _, client = await _proxy_to_echo(aiohttp_server, aiohttp_client)
    for sent in ("x" * 129, "caf\u00e9"):
        resp = await client.get("/v1/echo", headers={"X-Request-Id": sent})
        assert resp.status == 200
        echoed = [v for k, v in (await resp.json())["headers"] if k.lower() == "x-request-id"]
        returned = resp.headers["X-Request-Id"]
        assert returned != sent and len(returned) == 32
        assert echoed == [returned]  # exactly one id upstream: the one the proxy logs
