"""Forwarding: what arrives upstream, and what comes back to the client.

Three kinds of upstream: the demo API (it echoes what it received), tiny aiohttp apps, and raw asyncio
servers on 127.0.0.1 that answer exactly the bytes a test chooses (framing, pipelining, keep-alive,
hang-ups; clients there are raw sockets parsed with httptools, or aiohttp). The last section is about when
the token is taken: for a slow upload or a request queued for a busy pool, the token leaves with the bytes.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import httptools
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from proxy.app import FORWARDER, TOKENS, make_app
from proxy.demo import Fault
from proxy.upstream import Pool
from tests.fakes.servers import (
    FAST_BACKOFF,
    QUICK_LOGINS,
    keycloak_config,
    start_api,
    start_app,
    start_idp,
    start_proxy,
)
from tests.faults.conftest import wait_for


async def _proxy_to_echo(aiohttp_server, aiohttp_client, manager_options=None, **sections):
    idp = await start_idp(aiohttp_server)
    api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url, **sections), **(manager_options or {}))
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
    await client.get("/x", skip_auto_headers=["Accept-Encoding", "User-Agent"])
    assert "host" in seen  # the request arrived, its header names in lower case
    assert "accept-encoding" not in seen
    assert "user-agent" not in seen


async def test_hop_by_hop_response_headers_dropped(aiohttp_server, aiohttp_client):
    """Headers named in the upstream's Connection header, and hop-by-hop ones, stop at the proxy (an
    X-Request-Id named there too: the client gets the proxy's)."""
    idp = await start_idp(aiohttp_server)

    async def hop(request):
        return web.Response(
            text="ok",
            headers={
                "Connection": "X-Private, X-Request-Id",
                "X-Request-Id": "the-upstreams-own",
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
    assert resp.headers.getall("X-Request-Id") == [resp.headers["X-Request-Id"]] != ["the-upstreams-own"]


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
    idp, _api, client = await _proxy_to_echo(aiohttp_server, aiohttp_client, QUICK_LOGINS)
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


# --- against raw upstreams: framing, pipelining, keep-alive, hang-ups ------------------------------

READ_S = 5.0  # every read from a socket is bounded by this
RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Upstream = Callable[[RawHandler], Awaitable[str]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
def upstream(raw_server: Upstream) -> Upstream:
    """A raw TCP upstream on 127.0.0.1 running ``handler`` per connection (tests/conftest.py)."""
    return raw_server


async def _proxy(aiohttp_server, aiohttp_client, url: str, manager: dict | None = None, **sections) -> TestClient:
    idp = await start_idp(aiohttp_server)
    return await start_proxy(aiohttp_client, keycloak_config(idp, url, **sections), **(manager or {}))


def _pool(client: TestClient) -> Pool:
    return client.server.app[FORWARDER].pool


async def _head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_S)


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


class _Responses:
    """Every response on one raw client connection, in order: status, header lines, body."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[tuple[int, list[tuple[bytes, bytes]], bytes]] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self._headers, b"".join(self._body)))
        self._headers, self._body = [], []


async def _raw(port: int, data: bytes, count: int = 1) -> list[tuple[int, list[tuple[bytes, bytes]], bytes]]:
    """Send ``data`` as-is on one connection; the first ``count`` complete responses (fewer if it closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    responses = _Responses()
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(READ_S):
            while len(responses.done) < count and (chunk := await reader.read(65536)):
                responses.parser.feed_data(chunk)
    finally:
        writer.close()
    return responses.done


def _get(target: bytes) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % target


async def _renewal_failed(client: TestClient) -> None:
    """Wait, bounded, until /-/status shows a failed token request."""
    for _ in range(int(READ_S / 0.02)):
        if (await (await client.get("/-/status")).json())["last_error"] is not None:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the renewal did not end")


async def test_client_giving_up_during_a_401_renewal_does_not_use_up_the_pool(aiohttp_server, aiohttp_client, upstream):
    """A client that hangs up while the proxy renews a token after a 401 leaves no upstream connection busy:
    with pool_size = 1 the next requests are answered, not 504 "all 1 upstream connections stayed busy"."""
    requests = 0

    async def first_is_401(reader, writer):
        nonlocal requests
        while True:
            await _head(reader)
            requests += 1
            writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n" if requests == 1 else OK)
            await writer.drain()

    idp = await start_idp(aiohttp_server)
    config = keycloak_config(idp, await upstream(first_is_401), upstream={"pool_size": 1, "timeout_s": 2})
    client = await start_proxy(aiohttp_client, config)
    await client.server.app[TOKENS].get()  # the first login is done
    idp.fail_next(Fault(status=503, delay_s=0.5))  # the renewal outlasts the client's patience (and then fails)
    with pytest.raises(TimeoutError):
        await client.get("/first", timeout=aiohttp.ClientTimeout(total=0.2))
    await _renewal_failed(client)  # the renewal is over
    for path in ("/second", "/third"):
        resp = await client.get(path)
        assert resp.status == 200, await resp.text()
    assert _pool(client).open_connections == 1  # the one kept-alive connection; none leaked


async def test_trailer_fields_do_not_become_headers(aiohttp_server, aiohttp_client, upstream):
    """A chunked response's trailer fields are not merged into the header section (RFC 9110 §6.5.1), whether
    they arrive with the head or later; the body is whole and the connection goes on."""

    async def with_trailer(reader, writer):
        for split in (False, True):
            await _head(reader)
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n5\r\nhello\r\n"
            writer.write(head)
            if split:
                await writer.drain()
                await asyncio.sleep(0.05)
            writer.write(b"0\r\nX-Checksum: abc\r\n\r\n")
            await writer.drain()
        await reader.read()

    client = await _proxy(aiohttp_server, aiohttp_client, await upstream(with_trailer))
    responses = await _raw(client.port, _get(b"/one") + _get(b"/two"), count=2)
    assert len(responses) == 2
    for status, headers, body in responses:
        assert (status, body) == (200, b"hello")
        assert b"x-checksum" not in dict(headers)


async def test_upload_still_arriving_when_the_upstream_starts_a_2xx_is_sent_whole(
    aiohttp_server, aiohttp_client, upstream
):
    """An upstream that answers while it reads (full duplex) gets the whole upload and the client the whole
    answer; the proxy does not cut the upload because the response head came first."""
    received: list[int] = []

    async def duplex(reader, writer):
        head = await _head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\nreceived\r\n")
        await writer.drain()
        received.append(len(await asyncio.wait_for(reader.readexactly(_length(head)), READ_S)))
        writer.write(b"%x\r\n %d\r\n0\r\n\r\n" % (len(str(received[0])) + 1, received[0]))
        await writer.drain()
        await reader.read()

    client = await _proxy(aiohttp_server, aiohttp_client, await upstream(duplex), upstream={"replay_limit_bytes": 10})

    async def slow_upload():
        for _ in range(10):
            yield b"u" * 30_000
            await asyncio.sleep(0.02)

    resp = await client.post("/transcode", data=slow_upload(), headers={"Content-Length": "300000"})
    assert resp.status == 200
    assert await asyncio.wait_for(resp.read(), READ_S) == b"received 300000"
    assert received == [300_000]


async def test_early_error_answer_cut_mid_body_is_not_presented_whole(aiohttp_server, aiohttp_client, upstream):
    """The upstream refuses a large upload early (413) and dies mid-way through its chunked answer: the client's
    connection is cut (an error), never a short 413 body that looks complete."""

    async def refuse_then_die(reader, writer):
        await _head(reader)
        writer.write(b"HTTP/1.1 413 Content Too Large\r\nTransfer-Encoding: chunked\r\n\r\n7\r\ntoo big\r\n")
        writer.write_eof()  # its side ends here, without the last chunk
        await asyncio.wait_for(reader.read(), READ_S)  # reads (and drops) the upload until the proxy closes

    client = await _proxy(
        aiohttp_server, aiohttp_client, await upstream(refuse_then_die), upstream={"replay_limit_bytes": 10}
    )
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        resp = await client.post("/upload", data=io.BytesIO(b"x" * 2_000_000))
        await asyncio.wait_for(resp.read(), READ_S)


async def test_401_to_an_upload_it_did_not_read_reaches_the_client(aiohttp_server, aiohttp_client, upstream):
    """An upstream that answers 401 without reading a large upload: the 401 reaches the client, sent once. A body
    exactly at replay_limit_bytes is replayed after the renewal; one byte more is not."""
    seen: list[int] = []

    async def reject(reader, writer):
        while True:
            head = await _head(reader)
            seen.append(_length(head))
            if _length(head) > 1025:  # answered before reading; then drops the rest until the proxy closes
                writer.write(b"HTTP/1.1 401 Unauthorized\r\nConnection: close\r\nContent-Length: 6\r\n\r\ndenied")
                await writer.drain()
                await asyncio.wait_for(reader.read(), READ_S)
                return
            await reader.readexactly(_length(head))
            writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\n\r\ndenied")
            await writer.drain()

    client = await _proxy(
        aiohttp_server,
        aiohttp_client,
        await upstream(reject),
        manager={"rejection_renewal_interval_s": 0.0},  # every 401 may renew: only the body size decides
        upstream={"replay_limit_bytes": 1024},
    )
    resp = await client.post("/upload", data=io.BytesIO(b"x" * 2_000_000))
    assert (resp.status, await resp.read()) == (401, b"denied")
    assert seen == [2_000_000]
    seen.clear()
    resp = await client.post("/upload", data=b"x" * 1024)
    assert resp.status == 401
    assert seen == [1024, 1024]  # renewed and replayed once
    seen.clear()
    resp = await client.post("/upload", data=b"x" * 1025)
    assert resp.status == 401
    assert seen == [1025]


async def test_pipelined_requests_are_answered_in_order(aiohttp_server, aiohttp_client, upstream):
    """Several requests in one write (HTTP/1.1 pipelining), one of them a POST with a body: answers in order."""

    async def echo_target(reader, writer):
        while True:
            head = await _head(reader)
            body = await reader.readexactly(_length(head))
            answer = head.split(b" ")[1] + body
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
            await writer.drain()

    client = await _proxy(aiohttp_server, aiohttp_client, await upstream(echo_target))
    data = _get(b"/r1") + _get(b"/r2")
    data += b"POST /p HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\n+body"
    data += _get(b"/r3") + _get(b"/r4")
    responses = await _raw(client.port, data, count=5)
    assert [(status, body) for status, _, body in responses] == [
        (200, b"/r1"),
        (200, b"/r2"),
        (200, b"/p+body"),
        (200, b"/r3"),
        (200, b"/r4"),
    ]


@pytest.mark.parametrize("size", [5, 200_000], ids=["buffered", "streamed"])
async def test_expect_100_continue_upload(aiohttp_server, aiohttp_client, upstream, size):
    """A client sending Expect: 100-continue gets 100 Continue, then sends the body, which arrives whole."""

    async def count_body(reader, writer):
        head = await _head(reader)
        assert b"expect" not in head.lower()  # the proxy answers the expectation itself
        answer = b"%d" % len(await reader.readexactly(_length(head)))
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
        await writer.drain()
        await reader.read()

    client = await _proxy(
        aiohttp_server, aiohttp_client, await upstream(count_body), upstream={"replay_limit_bytes": 1024}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n" % size
        )
        await writer.drain()
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_S) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"b" * size)
        await writer.drain()
        head = await _head(reader)
        assert head.startswith(b"HTTP/1.1 201")
        assert await asyncio.wait_for(reader.readexactly(_length(head)), READ_S) == b"%d" % size
    finally:
        writer.close()


async def test_repeated_response_headers_stay_separate_and_in_order(aiohttp_server, aiohttp_client, upstream):
    """Two Set-Cookie and two Vary lines reach the client as four lines, in the upstream's order."""

    async def repeated(reader, writer):
        await _head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Path=/\r\nVary: Accept\r\nSet-Cookie: b=2, c=3\r\n"
            b"Vary: Accept-Encoding\r\nContent-Length: 2\r\n\r\nok"
        )
        await writer.drain()
        await reader.read()

    client = await _proxy(aiohttp_server, aiohttp_client, await upstream(repeated))
    [(status, headers, _)] = await _raw(client.port, _get(b"/x"))
    assert status == 200
    assert [(k, v) for k, v in headers if k in (b"set-cookie", b"vary")] == [
        (b"set-cookie", b"a=1; Path=/"),
        (b"vary", b"Accept"),
        (b"set-cookie", b"b=2, c=3"),
        (b"vary", b"Accept-Encoding"),
    ]


async def test_response_with_both_transfer_encoding_and_content_length_is_refused(
    aiohttp_server, aiohttp_client, upstream
):
    """Both framings at once (RFC 9112 §6.3: a smuggling sign, to be handled as an error, as nginx does): 502 with
    the reason; the connection is dropped and the next request is answered."""
    connections = 0

    async def both(reader, writer):
        nonlocal connections
        connections += 1
        await _head(reader)
        if connections == 1:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            )
        else:
            writer.write(OK)
        await writer.drain()
        await reader.read()

    client = await _proxy(aiohttp_server, aiohttp_client, await upstream(both))
    resp = await client.get("/both")
    assert resp.status == 502
    body = await resp.json()
    assert body["error"] == "upstream_unreachable"
    assert "Content-Length" in body["detail"]
    assert (await client.get("/next")).status == 200
    assert connections == 2


async def test_close_delimited_answers_on_one_client_connection(aiohttp_server, aiohttp_client, upstream):
    """An upstream that closes after every answer, some framed only by the close (no length): twenty requests on
    one client keep-alive connection each get their whole body, and no upstream connection is left open."""
    connections = 0

    async def one_and_close(reader, writer):
        nonlocal connections
        connections += 1
        await _head(reader)
        if connections % 2:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"%d" % connections * 1000)
        else:
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")

    client = await _proxy(aiohttp_server, aiohttp_client, await upstream(one_and_close))
    data = b"".join(_get(b"/r%d" % i) for i in range(20))
    responses = await _raw(client.port, data, count=20)
    assert len(responses) == 20
    for number, (status, headers, body) in enumerate(responses, 1):
        assert status == 200
        assert body == (b"%d" % number * 1000 if number % 2 else b"ok")
        assert b"connection" not in dict(headers)  # the upstream's close is not the client's
    assert connections == 20
    assert _pool(client).open_connections == 0


async def test_post_after_the_upstreams_idle_timeout_is_sent_once(aiohttp_server, aiohttp_client, upstream):
    """The upstream closes idle keep-alive connections sooner than the proxy's pool would: the next GET and POST
    succeed on a fresh connection, and the POST reaches the upstream exactly once."""
    seen: list[bytes] = []
    closed = asyncio.Event()

    async def idle_close(reader, writer):
        while True:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.1)
            except TimeoutError:
                closed.set()
                return  # idle for 0.1 s: close
            seen.append(head.split(b" ", 1)[0])
            await reader.readexactly(_length(head))
            writer.write(OK)
            await writer.drain()

    client = await _proxy(aiohttp_server, aiohttp_client, await upstream(idle_close))
    for method in ("GET", "GET", "POST"):
        closed.clear()
        resp = await client.request(method, "/x", data=b"payload" if method == "POST" else None)
        assert (resp.status, await resp.read()) == (200, b"ok")
        await asyncio.wait_for(closed.wait(), READ_S)  # the upstream closed the idle connection...
        await asyncio.sleep(0.05)  # ...and its close has reached the proxy's pool
    assert seen == [b"GET", b"GET", b"POST"]


async def test_client_hanging_up_mid_upload_or_download_frees_its_connection(aiohttp_server, aiohttp_client, upstream):
    """With pool_size = 1, a client that hangs up mid-upload and another mid-download leave the proxy
    answering the next request at once: the upstream connection went back or was closed, no upload task is left."""

    async def serve(reader, writer):
        while True:
            head = await _head(reader)
            if head.startswith(b"GET /down"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50000000\r\n\r\n")
                for _ in range(500):  # bounded; the proxy stops reading long before
                    writer.write(b"d" * 100_000)
                    await writer.drain()
            else:
                await reader.readexactly(_length(head))
                writer.write(OK)
                await writer.drain()

    client = await _proxy(
        aiohttp_server,
        aiohttp_client,
        await upstream(serve),
        upstream={"pool_size": 1, "timeout_s": 3, "replay_limit_bytes": 10},
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n\r\n" + b"a" * 100_000)
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.transport.abort()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(_get(b"/down"))
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(300_000), READ_S)
    writer.transport.abort()
    resp = await client.post("/after", data=b"abc", timeout=aiohttp.ClientTimeout(total=2))
    assert (resp.status, await resp.read()) == (200, b"ok")
    assert not [task for task in asyncio.all_tasks() if "_send_stream" in repr(task.get_coro())]  # no upload left


async def test_odd_queries_and_long_urls_arrive_byte_exact(aiohttp_server, aiohttp_client, upstream):
    """A bare '?', non-UTF-8 and NUL escapes, '+' and a 12 KB query string reach the upstream unchanged."""
    targets: list[bytes] = []

    async def record(reader, writer):
        while True:
            head = await _head(reader)
            targets.append(head.split(b" ")[1])
            writer.write(OK)
            await writer.drain()

    client = await _proxy(aiohttp_server, aiohttp_client, await upstream(record))
    sent = [b"/a?", b"/a?x=%FF%FE&y=%00&z=a+b+%2B&&=", b"/report?filter=" + b"col%3D1%26" * 1200]
    for target in sent:
        [(status, _, _)] = await _raw(client.port, _get(target))
        assert status == 200
    assert targets == sent


async def test_an_unasked_101_is_a_502_with_its_reason(aiohttp_server, aiohttp_client, upstream, caplog):
    """An upstream switching protocols on a plain request (the proxy drops Upgrade): 502 naming the 101, and no
    asyncio "Fatal error" traceback in the log."""

    async def switch(reader, writer):
        await _head(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00")
        await writer.drain()
        await reader.read()

    client = await _proxy(aiohttp_server, aiohttp_client, await upstream(switch))
    # Not a WebSocket handshake (those are tunnelled: tests/test_websocket.py): an upgrade the proxy does not do.
    resp = await client.get("/socket", headers={"Upgrade": "h2c", "Connection": "Upgrade"})
    assert resp.status == 502
    assert "switched protocols (101)" in (await resp.json())["detail"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- when the token is taken: once the body is read, once a connection is free ----------------------

SETTLE_S = 3.0  # the longest wait for the proxy to hold a token or a connection


@pytest.mark.slow(reason="about 1.7 s: a 1 s token expires on real time during a 1.6 s upload")
async def test_slow_replayable_upload_goes_upstream_with_a_live_token(aiohttp_server, aiohttp_client):
    """A small (replayable) body that takes longer to arrive than the token has left is sent with a live token:
    the token is taken once the body is read, not when the head arrived (the API never sees an expired one)."""
    idp = await start_idp(aiohttp_server, access_lifetime_s=1.0)
    api, url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, url))
    body = bytes(range(256)) * 16

    async def slowly() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 512):  # 8 pieces over 1.6 s
            await asyncio.sleep(0.2)
            yield body[i : i + 512]

    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(body))}
    resp = await client.post("/v1/echo/upload", data=slowly(), headers=headers)
    assert resp.status == 200
    assert (await resp.json())["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert api.rejected == []


QUEUED_BODY = bytes(range(256)) * 64
QUEUED_HEADERS = {"Content-Type": "application/octet-stream", "Content-Length": str(len(QUEUED_BODY))}


async def _hold_the_only_connection(client: Any) -> asyncio.Task[Any]:
    """A slow upload (8 pieces over 1.6 s) that holds a pool_size = 1 proxy's only upstream connection."""

    async def slowly() -> AsyncIterator[bytes]:
        for i in range(0, len(QUEUED_BODY), 2048):
            await asyncio.sleep(0.2)
            yield QUEUED_BODY[i : i + 2048]

    holder = asyncio.create_task(client.post("/v1/echo/slow", data=slowly(), headers=QUEUED_HEADERS))
    await wait_for(lambda: _pool(client).open_connections == 1, within=SETTLE_S)
    return holder


@pytest.mark.slow(reason="about 1.7 s: a 1 s token expires on real time while an upload waits for the pool")
async def test_upload_queued_for_a_busy_pool_leaves_with_a_live_token(aiohttp_server, aiohttp_client):
    """A large (not replayable) upload that waits longer for an upstream connection than its token has left is
    sent with the token renewed meanwhile: 200, not the upstream's 401 for a token that expired in the queue."""
    idp = await start_idp(aiohttp_server, access_lifetime_s=1.0)
    api, url = await start_api(aiohttp_server, idp)
    config = keycloak_config(idp, url, upstream={"pool_size": 1, "replay_limit_bytes": 1024})
    client = await start_proxy(aiohttp_client, config)
    await wait_for(lambda: client.server.app[TOKENS].usable() is not None, within=SETTLE_S)
    body, headers = QUEUED_BODY, QUEUED_HEADERS
    holder = await _hold_the_only_connection(client)
    queued = await client.post("/v1/echo/queued", data=body, headers=headers)
    assert queued.status == 200, api.rejected
    assert (await queued.json())["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert (await holder).status == 200
    assert api.rejected == []


@pytest.mark.slow(reason="about 2 s: a 1 s token expires on real time while a request waits for the pool")
async def test_request_queued_past_its_token_without_a_renewal_gets_503(aiohttp_server, aiohttp_client):
    """A request that waited for an upstream connection until its token expired, while the provider fails, is
    answered 503 (no usable token): the proxy never sends the expired token upstream."""
    idp = await start_idp(aiohttp_server, access_lifetime_s=1.0)
    api, url = await start_api(aiohttp_server, idp)
    upstream = {"pool_size": 1, "replay_limit_bytes": 1024, "timeout_s": 5.0}  # a lost connection: 504, no hang
    config = keycloak_config(idp, url, upstream=upstream)
    client = await start_proxy(aiohttp_client, config)
    await wait_for(lambda: client.server.app[TOKENS].usable() is not None, within=SETTLE_S)
    idp.fail_next(*(Fault(503, "down") for _ in range(100)))  # every renewal fails from now on
    holder = await _hold_the_only_connection(client)
    queued = await client.get("/v1/hello")
    assert queued.status == 503, api.rejected
    assert (await queued.json())["error"] == "no_token"
    assert queued.headers["Retry-After"]
    assert (await holder).status == 200
    assert api.rejected == []
    idp.faults.clear()  # the provider recovers: the connection the 503 did not use is back in the pool
    await wait_for(lambda: client.server.app[TOKENS].usable() is not None, within=SETTLE_S)
    assert (await client.get("/v1/hello")).status == 200
    pool = _pool(client)
    assert pool.open_connections == pool.idle_connections == 1


async def test_an_applications_response_hooks_see_relayed_answers(aiohttp_server, aiohttp_client):
    """Served as an Application, on_response_prepare runs for a whole answer and for a streamed one alike."""
    idp = await start_idp(aiohttp_server)
    _api, api_url = await start_api(aiohttp_server, idp)
    app = make_app(keycloak_config(idp, api_url), **FAST_BACKOFF)
    seen: list[int] = []

    async def hook(request: web.Request, response: web.StreamResponse) -> None:
        seen.append(response.status)

    app.on_response_prepare.append(hook)
    client = await aiohttp_client(app)
    hello = await client.get("/v1/hello")
    assert hello.status == 200 and (await hello.json())
    report = await client.get("/v1/report", params={"rows": "20000"})
    assert report.status == 200 and len(await report.read()) > 100_000
    assert seen == [200, 200]
