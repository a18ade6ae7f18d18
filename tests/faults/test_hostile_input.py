"""Hostile or odd input: not an open proxy, no escape from the base path, bounded parsing, access rules that hold.

Requests go over raw sockets where an HTTP client library would tidy them up. Every case also checks
that the upstream heard nothing it should not have, and that the proxy still answers afterwards.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from urllib.parse import unquote

import pytest
from aiohttp import web

import proxy.access
from proxy.cli import serve, warn_if_exposed
from tests.fakes.servers import keycloak_config, start_app, start_idp, start_proxy
from tests.faults.conftest import API_KEY, app_with, body_of, events, raw_request, status_of

BASE_PATH = "/api/v1"


@pytest.fixture
async def proxied(aiohttp_server, aiohttp_client):
    """A proxy in front of a recording upstream at http://127.0.0.1:port/api/v1; returns (client, arrived)."""

    async def make(**sections):
        arrived: list[dict] = []

        async def record(request: web.Request) -> web.Response:
            arrived.append({"method": request.method, "raw_path": request.raw_path, "headers": dict(request.headers)})
            return web.json_response({"ok": True})

        idp = await start_idp(aiohttp_server)
        url = await start_app(aiohttp_server, app_with(record))
        client = await start_proxy(aiohttp_client, keycloak_config(idp, url + BASE_PATH, **sections))
        return client, arrived

    return make


def _request(target: str | bytes, method: bytes = b"GET", headers: bytes = b"") -> bytes:
    target = target.encode("latin-1") if isinstance(target, str) else target
    return b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%sConnection: close\r\n\r\n" % (method, target, headers)


async def _still_serving(client) -> None:
    resp = await client.get("/still/here")
    assert resp.status == 200


def _json_error(response: bytes) -> dict:
    body = json.loads(body_of(response))
    assert set(body) == {"error", "detail"}
    return body


# --- not an open proxy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET http://evil.example/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 400),
        (b"GET https://evil.example:443/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 400),
        (b"GET http://evil.example/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n", 403),
        (b"GET http://127.0.0.1.evil.example/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 400),
        (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 400),
        (b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 400),
        (b"CONNECT /v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 400),
        (b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 400),
    ],
    ids=[
        "absolute",
        "absolute-https",
        "absolute-and-host",
        "absolute-lookalike",
        "connect",
        "connect-loopback",
        "connect-path",
        "asterisk",
    ],
)
async def test_not_an_open_proxy(proxied, request_bytes, status):
    """Absolute-form targets for other hosts and CONNECT are refused with a JSON error; nothing is forwarded."""
    client, arrived = await proxied()
    response = await raw_request(client.port, request_bytes)
    assert status_of(response) == status
    assert _json_error(response)["error"] in ("bad_request", "forbidden")
    assert arrived == []
    await _still_serving(client)


async def test_absolute_form_naming_the_listener_is_forwarded(proxied, caplog):
    """An absolute-form target naming the proxy itself (what an HTTP proxy client, curl -x, sends) is an
    ordinary request, under the base path; its access line shows the path alone, as for any request."""
    caplog.set_level(logging.INFO, logger="oauth_sidecar.access")
    client, arrived = await proxied()
    response = await raw_request(client.port, _request(f"http://127.0.0.1:{client.port}/v1/x?q=1"))
    assert status_of(response) == 200
    assert [a["raw_path"] for a in arrived] == [f"{BASE_PATH}/v1/x?q=1"]
    assert [r.fields["path"] for r in events(caplog, "request")] == ["/v1/x"]  # type: ignore[attr-defined]


# --- the base path cannot be escaped -------------------------------------------------------------


ESCAPES = [
    "/../secret",
    "/v1/../../secret",
    "/%2e%2e/secret",
    "/%2E%2E/secret",
    "/.%2e/secret",
    "/%2e%2e%2fsecret",
    "/..%2f..%2fsecret",
    "/..%5csecret",
    "/..\\secret",
    "/..;/secret",
    "/v1/..;jsessionid=1/../secret",
    "/./secret",
    "//evil.example/secret",
    "/%2f%2fevil.example/secret",
    "/%252e%252e/secret",
]


def _segments(path: str) -> list[str]:
    """The segments a server could act on: decoded once, backslashes as slashes, ;parameters dropped."""
    return [s.partition(";")[0] for s in unquote(path).replace("\\", "/").split("/")]


@pytest.mark.parametrize("target", ESCAPES)
async def test_base_path_cannot_be_escaped(proxied, target):
    """Dot segments, encoded or not, and '//host' either get 400 or arrive under the base path with no dot segment."""
    client, arrived = await proxied()
    response = await raw_request(client.port, _request(target))
    status = status_of(response)
    if status == 400:
        assert _json_error(response)["error"] == "bad_request"
        assert arrived == []
    else:
        assert status == 200
        [seen] = arrived
        assert seen["raw_path"] == BASE_PATH + target  # byte for byte, under the base path
        assert not {".", ".."} & set(_segments(seen["raw_path"])), seen["raw_path"]
    await _still_serving(client)


# --- bounded parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        _request("/x", headers=b"X-Big: " + b"a" * 20_000 + b"\r\n"),
        _request("/x", headers=b"".join(b"X-H%d: v\r\n" % i for i in range(300))),
        _request("/" + "a" * 20_000),
        b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: " + b"c=" * 40_000 + b"\r\n\r\n",
    ],
    ids=["one-huge-header", "300-headers", "huge-request-line", "huge-cookie"],
)
async def test_oversized_requests_are_refused(proxied, request_bytes):
    """Oversized header lines, too many headers, a huge request line: 4xx before anything is forwarded."""
    client, arrived = await proxied()
    response = await raw_request(client.port, request_bytes)
    assert status_of(response) in (400, 413, 414, 431)
    assert arrived == []
    await _still_serving(client)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /x HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /x\x00y HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"G@T /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header Name: v\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(64),  # a TLS ClientHello on the plain port
    ],
    ids=["garbage", "bad-version", "nul-in-path", "bad-method", "bad-header-name", "two-lengths", "te-and-cl", "tls"],
)
async def test_malformed_requests_get_400(proxied, request_bytes):
    """Malformed request lines and ambiguous framing: 400, nothing forwarded, and the next request is served."""
    client, arrived = await proxied()
    response = await raw_request(client.port, request_bytes)
    assert status_of(response) == 400
    assert arrived == []
    await _still_serving(client)


async def test_slow_client_does_not_block_others(proxied):
    """A client dribbling its headers byte by byte does not delay anyone else; its own request still works."""
    client, arrived = await proxied()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    request = _request("/slow")
    try:
        writer.write(request[:10])
        await writer.drain()
        for i in range(10, 40):  # bounded: 30 bytes dribbled, one at a time, between normal requests
            writer.write(request[i : i + 1])
            await writer.drain()
            started = time.monotonic()
            resp = await client.get(f"/fast/{i}")
            assert resp.status == 200
            assert time.monotonic() - started < 1.0
            await asyncio.sleep(0.01)
        writer.write(request[40:])
        await writer.drain()
        response = await asyncio.wait_for(reader.read(1 << 16), 5)
    finally:
        writer.close()
    assert status_of(response) == 200
    assert [a["raw_path"] for a in arrived][-1] == f"{BASE_PATH}/slow"
    assert len(arrived) == 31


# --- [access] ------------------------------------------------------------------------------------


async def test_api_key_is_compared_in_constant_time(proxied, monkeypatch):
    """X-Api-Key goes through hmac.compare_digest; near misses and undecodable bytes get 401, never 500."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(proxy.access.hmac, "compare_digest", spy)
    client, arrived = await proxied(access={"api_key": API_KEY})
    for wrong in (API_KEY[:-1], API_KEY + "x", API_KEY.upper(), " " + API_KEY + "x", ""):
        resp = await client.get("/v1/x", headers={"X-Api-Key": wrong})
        assert resp.status == 401, wrong
        assert (await resp.json())["error"] == "unauthenticated"
    assert len(calls) == 5
    assert all(stored == API_KEY.encode() for _, stored in calls)

    response = await raw_request(
        client.port, _request("/v1/x", headers=b"X-Api-Key: \xff\xfe" + API_KEY.encode() + b"\r\n")
    )
    assert status_of(response) == 401
    # Two keys: the first one counts, and a wrong first one is not rescued by a right second one.
    response = await raw_request(
        client.port, _request("/v1/x", headers=b"X-Api-Key: wrong\r\nX-Api-Key: " + API_KEY.encode() + b"\r\n")
    )
    assert status_of(response) == 401
    assert arrived == []

    resp = await client.get("/v1/x", headers={"X-Api-Key": API_KEY})
    assert resp.status == 200
    assert [a["raw_path"] for a in arrived] == [f"{BASE_PATH}/v1/x"]
    assert not any(k.lower() == "x-api-key" for k in arrived[0]["headers"])


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("GET", "/v1/reports", 200),
        ("GET", "/v1/reports/daily?d=1", 200),
        ("GET", "/v1/%72eports/daily", 200),  # %72 is 'r': the decoded path is what is matched
        ("HEAD", "/v1/reports/daily", 200),
        ("GET", "/v1/reportsX", 403),
        ("GET", "/v1/Reports/daily", 403),
        ("GET", "//v1/reports/daily", 403),
        ("GET", "/v1/reports%2fdaily", 200),  # decodes to /v1/reports/daily
        ("GET", "/v1/reports/../admin", 400),
        ("GET", "/v1/reports/%2e%2e/admin", 400),
        ("GET", "/v1/reports/..;/admin", 400),
        ("GET", "/v1/reports%2f..%2fadmin", 400),
        ("get", "/v1/reports/daily", 400),  # methods are case-sensitive: 'get' is not GET (the parser refuses it)
        ("DELETE", "/v1/reports/daily", 403),
        ("POST", "/v1/reports/daily", 403),
    ],
)
async def test_allow_methods_and_paths_match_the_normalised_path(proxied, method, target, status):
    """allow_paths is a prefix match on whole segments of the decoded path; allow_methods is exact."""
    client, arrived = await proxied(access={"allow_methods": ["GET", "HEAD"], "allow_paths": ["/v1/reports"]})
    response = await raw_request(client.port, _request(target, method=method.encode()))
    assert status_of(response) == status
    if status == 200:
        assert [a["raw_path"] for a in arrived] == [BASE_PATH + target]
    else:
        assert arrived == []


@pytest.mark.parametrize(
    ("cidrs", "allowed"),
    [
        (["10.0.0.0/8"], False),
        (["::1/128"], False),
        (["192.168.1.0/24", "127.0.0.0/8"], True),
        (["127.0.0.1/32"], True),
    ],
)
async def test_allow_clients_cidrs(proxied, cidrs, allowed):
    """access.allow_clients admits only listed networks, on every path; others get 403 and nothing is forwarded."""
    client, arrived = await proxied(access={"allow_clients": cidrs})
    resp = await client.get("/v1/x")
    ready = await client.get("/-/healthy")
    if allowed:
        assert resp.status == 200
        assert ready.status == 200
        assert len(arrived) == 1
    else:
        assert resp.status == 403
        assert "allow_clients" in (await resp.json())["detail"]
        assert ready.status == 403
        assert arrived == []


# --- exposure warning ----------------------------------------------------------------------------


def _config(host: str, **access):
    from proxy.config import config_from_mapping

    return config_from_mapping(
        {
            "listen": {"host": host, "port": 0},
            "upstream": {"url": "http://127.0.0.1:1"},
            "auth": {"provider": "keycloak", "token_url": "http://127.0.0.1:2/token", "username": "u", "password": "p"},
            "access": access,
        }
    )


@pytest.mark.parametrize(
    ("host", "access", "warned"),
    [
        ("0.0.0.0", {}, True),
        ("::", {}, True),
        ("192.168.1.20", {"allow_methods": ["GET"], "allow_paths": ["/v1/"]}, True),  # limits what, not who
        ("0.0.0.0", {"api_key": API_KEY}, False),
        ("0.0.0.0", {"allow_clients": ["10.0.0.0/8"]}, False),
        ("127.0.0.1", {}, False),
        ("::1", {}, False),
        ("localhost", {}, False),
    ],
)
def test_exposed_listener_warns_loudly(caplog, host, access, warned):
    """Listening beyond loopback with neither api_key nor allow_clients: one WARNING saying who can use it."""
    warn_if_exposed(_config(host, **access))
    exposed = events(caplog, "sidecar.exposed")
    if warned:
        assert len(exposed) == 1
        assert exposed[0].levelno == logging.WARNING
        assert host in exposed[0].fields["detail"]
        assert "anyone" in exposed[0].fields["detail"]
    else:
        assert exposed == []
    assert API_KEY not in caplog.text


async def test_serve_runs_the_exposure_check(monkeypatch):
    """serve() checks for exposure once the listener is up (the check itself is tested above)."""
    checked = []
    monkeypatch.setattr("proxy.cli.warn_if_exposed", lambda config: checked.append(config.listen.host))
    stop = asyncio.Event()
    code = await asyncio.wait_for(serve(_config("127.0.0.1"), on_listening=lambda url: stop.set(), stop=stop), 10)
    assert code == 0
    assert checked == ["127.0.0.1"]


async def test_malformed_requests_are_logged_as_one_line_without_their_bytes(proxied):
    """aiohttp would log each one at ERROR with a traceback quoting the raw request: a log flood, and the
    bytes may hold a header value. One WARNING line naming the error instead."""
    import io

    from proxy.observability import setup_logging

    out = io.StringIO()
    setup_logging("info", "text", (), stream=out)
    client, _ = await proxied()
    malformed = b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Api-Key: sEcReT-marker\r\nBad Header Name: v\r\n\r\n"
    response = await raw_request(client.port, malformed)
    assert status_of(response) == 400
    from tests.faults.conftest import wait_for

    await wait_for(lambda: "request.malformed" in out.getvalue())
    logged = out.getvalue()
    assert "warning request.malformed error=BadHttpMessage status=400" in logged
    assert "Traceback" not in logged
    assert "sEcReT-marker" not in logged and "Bad Header" not in logged
