"""Upstream faults: 502 and 504 as JSON, a cut connection rather than a short body, bounded pools, TLS verified."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.cli import main as cli_main
from proxy.config import SCHEMA, config_from_mapping
from proxy.errors import ConfigError
from tests.fakes.servers import keycloak_config, start_app, start_idp, start_proxy
from tests.faults.conftest import app_with, events, read_request_head, server_tls, wait_for

CHUNK = b"x" * 65536
# A fault must be answered within this long (the configured timeouts are well below it).
ANSWER_WITHIN_S = 5.0


async def _proxy(aiohttp_server, aiohttp_client, upstream_url: str, **sections):
    idp = await start_idp(aiohttp_server)
    return await start_proxy(aiohttp_client, keycloak_config(idp, upstream_url, **sections))


async def _error(resp: aiohttp.ClientResponse, status: int, code: str) -> str:
    assert resp.status == status
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"] == code
    return body["detail"]


# --- unreachable, timeout, garbage ---------------------------------------------------------------


async def test_unreachable_upstream_is_502_json(aiohttp_server, aiohttp_client, dead_url, caplog):
    """Nothing listens at upstream.url: 502 with a JSON reason, and a request.failed warning."""
    client = await _proxy(aiohttp_server, aiohttp_client, dead_url)
    resp = await client.get("/v1/hello")
    detail = await _error(resp, 502, "upstream_unreachable")
    assert "cannot connect to the upstream" in detail
    assert "X-Request-Id" in resp.headers
    failed = events(caplog, "request.failed")
    assert len(failed) == 1
    assert failed[0].levelno == logging.WARNING
    assert failed[0].fields["status"] == 502
    assert failed[0].fields["error"] == "upstream_unreachable"


async def test_slow_upstream_is_504_json(aiohttp_server, aiohttp_client):
    """An upstream slower than upstream.timeout_s: 504 soon after the timeout, and its request is abandoned."""
    cancelled = asyncio.Event()

    async def sleepy(request: web.Request) -> web.Response:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.Response()

    url = await start_app(aiohttp_server, app_with(sleepy))
    client = await _proxy(aiohttp_server, aiohttp_client, url, upstream={"timeout_s": 0.2})
    started = time.monotonic()
    detail = await _error(await client.get("/slow"), 504, "upstream_timeout")
    assert time.monotonic() - started < ANSWER_WITHIN_S
    assert "upstream.timeout_s" in detail
    await asyncio.wait_for(cancelled.wait(), ANSWER_WITHIN_S)
    assert (await client.get("/-/healthy")).status == 200


async def test_garbage_from_upstream_is_502(aiohttp_server, aiohttp_client, raw_server):
    """An upstream that answers something other than HTTP: 502 JSON, and the proxy keeps serving."""

    async def garbage(reader, writer):
        await read_request_head(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\nnot http at all\r\n")
        await writer.drain()

    url = await raw_server(garbage)
    client = await _proxy(aiohttp_server, aiohttp_client, url)
    await _error(await client.get("/x"), 502, "upstream_unreachable")
    await _error(await client.get("/x"), 502, "upstream_unreachable")


# --- dying mid-body ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/csv\r\nContent-Length: 1000000\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/csv\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_upstream_dying_mid_body_cuts_the_client(aiohttp_server, aiohttp_client, raw_server, caplog, head):
    """The upstream drops the connection mid-body: the client gets a payload error, never a short 'complete' body."""

    async def dies(reader, writer):
        await read_request_head(reader)
        writer.write(head)
        for _ in range(4):
            part = CHUNK if b"Content-Length" in head else b"%x\r\n%b\r\n" % (len(CHUNK), CHUNK)
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.transport.abort()

    url = await raw_server(dies)
    client = await _proxy(aiohttp_server, aiohttp_client, url)
    resp = await client.get("/report.csv")
    assert resp.status == 200  # the head was relayed before the upstream died
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        await asyncio.wait_for(resp.read(), ANSWER_WITHIN_S)
    interrupted = events(caplog, "upstream.body_interrupted")
    assert len(interrupted) == 1
    assert interrupted[0].levelno == logging.WARNING
    assert 0 < interrupted[0].fields["bytes"] < 1_000_000
    assert (await client.get("/-/healthy")).status == 200


async def test_upstream_stalling_mid_body_is_cut_at_the_timeout(aiohttp_server, aiohttp_client):
    """Headers, some bytes, then silence: at upstream.timeout_s the client's connection is cut, not left hanging."""

    async def stalls(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 10 * len(CHUNK)
        await response.prepare(request)
        await response.write(CHUNK)
        await asyncio.sleep(30)
        return response

    url = await start_app(aiohttp_server, app_with(stalls))
    client = await _proxy(aiohttp_server, aiohttp_client, url, upstream={"timeout_s": 0.2})
    resp = await client.get("/stall")
    assert resp.status == 200
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        await asyncio.wait_for(resp.read(), ANSWER_WITHIN_S)


# --- client going away, pool limits --------------------------------------------------------------


async def test_client_disconnect_cancels_the_upstream_request(aiohttp_server, aiohttp_client):
    """A client that hangs up mid-download: the upstream sees its connection closed, within seconds."""
    gone = asyncio.Event()
    sent = []

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        try:
            for _ in range(2000):  # bounded: ~10 s at most
                await response.write(CHUNK)
                sent.append(len(CHUNK))
                await asyncio.sleep(0.005)
        except (ConnectionError, asyncio.CancelledError):
            gone.set()
            raise
        return response

    url = await start_app(aiohttp_server, app_with(endless))
    client = await _proxy(aiohttp_server, aiohttp_client, url)
    resp = await client.get("/download")
    assert resp.status == 200
    assert await resp.content.readany()
    resp.close()  # hang up: closes the connection
    await asyncio.wait_for(gone.wait(), ANSWER_WITHIN_S)
    assert len(sent) < 2000


async def test_client_giving_up_before_the_answer_cancels_the_upstream_request(aiohttp_server, aiohttp_client):
    """A client that times out while the upstream is still thinking: the upstream's request is cancelled too."""
    cancelled = asyncio.Event()

    async def thinking(request: web.Request) -> web.Response:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.Response()

    url = await start_app(aiohttp_server, app_with(thinking))
    client = await _proxy(aiohttp_server, aiohttp_client, url)
    with pytest.raises(TimeoutError):
        await client.get("/slow", timeout=aiohttp.ClientTimeout(total=0.3))
    await asyncio.wait_for(cancelled.wait(), ANSWER_WITHIN_S)
    assert (await client.get("/-/healthy")).status == 200


async def test_pool_size_bounds_upstream_connections(aiohttp_server, aiohttp_client):
    """With upstream.pool_size = 2, eight concurrent requests all succeed, never more than two at the upstream."""
    active, peak = 0, 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await asyncio.sleep(0.05)
        finally:
            active -= 1
        return web.json_response({"path": request.path})

    url = await start_app(aiohttp_server, app_with(slow))
    client = await _proxy(aiohttp_server, aiohttp_client, url, upstream={"pool_size": 2})
    responses = await asyncio.gather(*(client.get(f"/r/{i}") for i in range(8)))
    assert [r.status for r in responses] == [200] * 8
    assert [(await r.json())["path"] for r in responses] == [f"/r/{i}" for i in range(8)]
    assert peak == 2


async def test_waiting_for_a_pooled_connection_is_bounded(aiohttp_server, aiohttp_client):
    """Requests queued behind a full pool get 504 at their own upstream.timeout_s, not one timeout after another."""
    timeout_s = 0.6
    release = asyncio.Event()
    arrived = []

    async def held(request: web.Request) -> web.Response:
        arrived.append(request.path)
        if request.path == "/hold":
            await asyncio.wait_for(release.wait(), 10)
        return web.Response(text="ok")

    url = await start_app(aiohttp_server, app_with(held))
    client = await _proxy(aiohttp_server, aiohttp_client, url, upstream={"pool_size": 1, "timeout_s": timeout_s})
    started = time.monotonic()
    responses = await asyncio.gather(*(client.get("/hold") for _ in range(3)))
    elapsed = time.monotonic() - started
    for resp in responses:
        await _error(resp, 504, "upstream_timeout")
    assert elapsed < 2.5 * timeout_s, f"queued requests waited {elapsed:.1f}s"  # three in a row would be 3 x timeout_s
    release.set()
    assert (await client.get("/quick")).status == 200  # the pool recovered
    assert arrived[-1] == "/quick"


# --- TLS -----------------------------------------------------------------------------------------


async def _tls_upstream(aiohttp_server, tls_files, name: str) -> tuple[str, list[str]]:
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({"ok": True})

    server = await aiohttp_server(app_with(record), ssl=server_tls(tls_files[name], tls_files[f"{name}_key"]))
    return f"https://127.0.0.1:{server.port}", seen


async def test_self_signed_upstream_is_refused(aiohttp_server, aiohttp_client, tls_files):
    """An https upstream with a certificate no trusted CA signed: 502 'TLS certificate verification failed'."""
    url, seen = await _tls_upstream(aiohttp_server, tls_files, "loopback")
    client = await _proxy(aiohttp_server, aiohttp_client, url)
    detail = await _error(await client.get("/v1/x"), 502, "upstream_unreachable")
    assert "TLS certificate verification failed" in detail
    assert seen == []


async def test_ca_file_trusts_a_private_ca(aiohttp_server, aiohttp_client, tls_files):
    """The same upstream with upstream.ca_file pointing at its certificate: forwarded."""
    url, seen = await _tls_upstream(aiohttp_server, tls_files, "loopback")
    client = await _proxy(aiohttp_server, aiohttp_client, url, upstream={"ca_file": tls_files["loopback"]})
    resp = await client.get("/v1/x?y=1")
    assert resp.status == 200
    assert seen == ["/v1/x?y=1"]


async def test_ca_file_does_not_skip_the_hostname_check(aiohttp_server, aiohttp_client, tls_files):
    """A trusted certificate for another name (other.example) is still refused for 127.0.0.1."""
    url, seen = await _tls_upstream(aiohttp_server, tls_files, "other")
    client = await _proxy(aiohttp_server, aiohttp_client, url, upstream={"ca_file": tls_files["other"]})
    detail = await _error(await client.get("/v1/x"), 502, "upstream_unreachable")
    assert "TLS certificate verification failed" in detail
    assert seen == []


async def test_self_signed_token_endpoint_is_refused(aiohttp_server, aiohttp_client, tls_files):
    """A token endpoint with an untrusted certificate: no login, 503 naming the TLS failure; ca_file fixes it."""
    idp = await start_idp(aiohttp_server)
    tls = server_tls(tls_files["loopback"], tls_files["loopback_key"])
    idp_server = await aiohttp_server(idp.app(), ssl=tls)
    idp.base_url = f"https://127.0.0.1:{idp_server.port}"
    url, seen = await _tls_upstream(aiohttp_server, tls_files, "loopback")

    # Trusting the upstream's certificate file for both: same certificate, so the login works.
    trusted = await start_proxy(aiohttp_client, keycloak_config(idp, url, upstream={"ca_file": tls_files["loopback"]}))
    assert (await trusted.get("/v1/x")).status == 200
    assert idp.token_requests == 1

    untrusted = await start_proxy(aiohttp_client, keycloak_config(idp, url))
    await wait_for(lambda: _failed(untrusted))
    resp = await untrusted.get("/v1/x")
    detail = await _error(resp, 503, "no_token")
    assert "TLS certificate verification failed" in detail
    assert idp.token_requests == 1  # the untrusted proxy's requests never reached the handler
    assert seen == ["/v1/x"]


def _failed(client) -> bool:
    from proxy.app import TOKENS

    return client.server.app[TOKENS].last_error is not None


@pytest.mark.parametrize("key", ["verify", "verify_ssl", "insecure", "tls_verify", "ssl"])
def test_no_switch_turns_tls_verification_off(key):
    """No configuration key disables certificate checks; trying one is a configuration error naming it."""
    assert not any(k in SCHEMA[s] for s in SCHEMA for k in ("verify", "verify_ssl", "insecure", "tls_verify", "ssl"))
    with pytest.raises(ConfigError) as err:
        config_from_mapping(
            {
                "upstream": {"url": "https://api.example", key: False},
                "auth": {
                    "provider": "keycloak",
                    "token_url": "https://idp.example/token",
                    "username": "u",
                    "password": "p",
                },
            }
        )
    assert f"upstream.{key}" in str(err.value)


def test_verify_off_exits_2_from_file_and_environment(tmp_path: Path, capsys):
    """`upstream.verify = false` in the file, or OAUTH_SIDECAR_UPSTREAM_VERIFY=0, stops the CLI with exit 2."""
    config = tmp_path / "config.toml"
    base = (
        '[upstream]\nurl = "https://api.example"\n'
        '[auth]\nprovider = "keycloak"\ntoken_url = "https://idp.example/token"\nusername = "u"\npassword = "p"\n'
    )
    config.write_text(base.replace("[auth]", "verify = false\n[auth]"))
    assert cli_main(["--config", str(config)], env={}) == 2
    assert "upstream.verify" in capsys.readouterr().err
    config.write_text(base)
    assert cli_main(["--config", str(config)], env={"OAUTH_SIDECAR_UPSTREAM_VERIFY": "0"}) == 2
    assert "OAUTH_SIDECAR_UPSTREAM_VERIFY" in capsys.readouterr().err


# --- connection reuse ----------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "resent"), [("GET", True), ("PUT", True), ("POST", False), ("PATCH", False)])
async def test_request_lost_on_a_reused_connection(aiohttp_server, aiohttp_client, raw_server, method, resent):
    """The upstream reads a request on a kept-alive connection and closes it unanswered: an idempotent request is
    sent again on a new connection; a POST is not (it may have been acted on): the client gets 502."""
    seen: list[bytes] = []

    async def drops_second(reader, writer):
        for number in range(1, 3):  # at most two requests per connection
            head = await read_request_head(reader)
            length = int(next((v for k, v in _headers(head) if k == b"content-length"), b"0"))
            if length:
                await reader.readexactly(length)
            seen.append(head.split(b" ", 1)[0])
            if number == 2 and len(seen) == 2:  # the second request ever: read it, then hang up
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    url = await raw_server(drops_second)
    client = await _proxy(aiohttp_server, aiohttp_client, url)
    assert (await client.get("/first")).status == 200
    resp = await client.request(method, "/second", data=b"payload")
    if resent:
        assert resp.status == 200
        assert seen == [b"GET", method.encode(), method.encode()]
    else:
        await _error(resp, 502, "upstream_unreachable")
        assert seen == [b"GET", method.encode()]  # sent once: never twice


def _headers(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = head.split(b"\r\n")[1:]
    return [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(b":") for line in lines if line)]
