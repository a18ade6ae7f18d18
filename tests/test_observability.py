"""What operators see: /-/healthy, /-/ready, /-/status, /-/metrics, the access log and the token events."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import proxy.observability
from proxy.demo import DemoIdP, Fault
from proxy.observability import (
    EVENTS,
    JsonFormatter,
    Metrics,
    TextFormatter,
    access_log,
    flush_access_log,
    log_request,
    setup_logging,
)
from tests.fakes.endpoints import RecordingIdP
from tests.fakes.servers import QUICK_LOGINS, keycloak_config, serve_idp, start_api, start_app, start_proxy

# A second login waits 50 ms, not 1 s: no test here is about the login spacing.

# Fake secrets, long and distinctive, so that finding one in any output cannot be a coincidence.
PASSWORD = "pw-unit-test-Qx81-never-log"
CLIENT_SECRET = "cs-unit-test-Zr27-never-log"
API_KEY = "ak-unit-test-Lm55-never-log"
KEY = {"X-Api-Key": API_KEY}
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


async def _idp(aiohttp_server: Any, **options: Any) -> RecordingIdP:
    idp = RecordingIdP(users={"demo": PASSWORD}, clients={"demo-client": CLIENT_SECRET}, **options)
    return await serve_idp(aiohttp_server, idp)


def _config(idp: DemoIdP, upstream: str, **sections: dict[str, Any]) -> Any:
    auth = {"password": PASSWORD, "client_secret": CLIENT_SECRET, **sections.pop("auth", {})}
    access = {"api_key": API_KEY, **sections.pop("access", {})}
    return keycloak_config(idp, upstream, auth=auth, access=access, **sections)


def _secrets(idp: RecordingIdP) -> list[str]:
    values = [PASSWORD, CLIENT_SECRET, API_KEY, *idp.issued]
    assert all(len(v) > 8 for v in values)
    return values


async def _eventually(check: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    """Wait, bounded in time and count, until ``check()`` is true."""
    for _ in range(int(seconds / 0.02)):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def _ready(client: Any) -> None:
    async def ready() -> bool:
        return (await client.get("/-/ready")).status == 200

    await _eventually(ready)


def _metrics(text: str) -> dict[str, list[Any]]:
    """Samples by sample name, from the Prometheus text exposition (parsed by prometheus_client)."""
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def _value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    matching = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, f"{name}{labels}: {len(matching)} samples"
    return matching[0]


# --- endpoints -----------------------------------------------------------------------------------


async def test_healthy_answers_while_not_ready(aiohttp_server, aiohttp_client):
    """/-/healthy is liveness: 200 while the process runs, even when the credentials are refused."""
    idp = await _idp(aiohttp_server)
    _, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(
        aiohttp_client, _config(idp, api_url, auth={"password": "wrong-password"}), **QUICK_LOGINS
    )
    await _eventually(lambda: _status_is(client, "rejected"))
    resp = await client.get("/-/healthy")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}
    assert (await client.get("/-/ready")).status == 503


async def _status_is(client: Any, state: str) -> bool:
    resp = await client.get("/-/status", headers=KEY)
    return (await resp.json())["state"] == state


async def test_ready_with_a_token(aiohttp_server, aiohttp_client):
    """/-/ready answers 200 with the state and the token's remaining lifetime once a token is held."""
    idp = await _idp(aiohttp_server)
    _, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, _config(idp, api_url), **QUICK_LOGINS)
    await _ready(client)
    body = await (await client.get("/-/ready")).json()
    assert body["ready"] is True
    assert body["state"] == "holding"
    assert 250 < body["token_expires_in_s"] <= 300


async def test_not_ready_when_login_rejected(aiohttp_server, aiohttp_client):
    """A refused login makes /-/ready 503 with a JSON reason naming the provider's answer, and a Retry-After."""
    idp = await _idp(aiohttp_server)
    _, api_url = await start_api(aiohttp_server, idp)
    config = _config(idp, api_url, auth={"password": "wrong-password"})
    client = await start_proxy(aiohttp_client, config, rejected_backoff=lambda attempt, rand: 120.0, **QUICK_LOGINS)
    await _eventually(lambda: _status_is(client, "rejected"))
    resp = await client.get("/-/ready")
    assert resp.status == 503
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["ready"] is False
    assert body["state"] == "rejected"
    assert "invalid_grant" in body["reason"] and "Invalid user credentials" in body["reason"]
    assert 60 <= int(resp.headers["Retry-After"]) <= 120


async def test_not_ready_when_idp_unreachable(aiohttp_server, aiohttp_client, unused_tcp_port):
    """With the identity provider down, /-/ready is 503 saying it is unreachable, with a Retry-After."""
    idp = await _idp(aiohttp_server)
    _, api_url = await start_api(aiohttp_server, idp)
    config = _config(idp, api_url, auth={"token_url": f"http://127.0.0.1:{unused_tcp_port}/token"})
    client = await start_proxy(
        aiohttp_client, config, transient_backoff=lambda attempt, rand, retry_after=None: 30.0, **QUICK_LOGINS
    )
    await _eventually(lambda: _status_is(client, "backing_off"))
    resp = await client.get("/-/ready")
    assert resp.status == 503
    body = await resp.json()
    assert "unreachable" in body["reason"]
    assert 1 <= int(resp.headers["Retry-After"]) <= 30


async def test_status_shows_state_expiry_last_refresh_last_error_and_counters(aiohttp_server, aiohttp_client):
    """/-/status: state, token expiry, last refresh, the last error with the provider's words, counters."""
    idp = await _idp(aiohttp_server)
    idp.fail_next(Fault(503, {"error": "temporarily_unavailable", "error_description": "Keycloak is starting"}))
    _, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, _config(idp, api_url), **QUICK_LOGINS)
    await _ready(client)
    assert (await client.get("/v1/hello", headers=KEY)).status == 200

    assert (await client.get("/-/status")).status == 401  # status needs the API key when one is set
    resp = await client.get("/-/status", headers=KEY)
    assert resp.status == 200
    text = await resp.text()
    body = json.loads(text)
    assert body["state"] == "holding"
    assert body["ready"] is True
    assert body["provider"] == "keycloak"
    token = body["token"]
    assert token["subject"] == "demo"
    assert 250 < token["expires_in_s"] <= 300
    assert ISO_UTC.match(token["expires_at"])
    assert token["has_refresh_token"] is True
    assert ISO_UTC.match(body["last_refresh"])
    error = body["last_error"]
    assert error["kind"] == "login"
    assert error["reason"] == "server_error"
    assert "temporarily_unavailable: Keycloak is starting" in error["detail"]
    assert ISO_UTC.match(error["at"])
    assert body["counters"] == {"logins": 1, "refreshes": 0, "failures": 1, "rejections": 0}
    for secret in _secrets(idp):
        assert secret not in text


async def test_metrics_exposition(aiohttp_server, aiohttp_client):
    """/-/metrics: token requests and failures by reason, seconds to expiry, requests by method class and
    status, the upstream latency histogram and in-flight requests, parsed as Prometheus text."""
    idp = await _idp(aiohttp_server)
    idp.fail_next(Fault(400, {"error": "invalid_grant", "error_description": "Account is not fully set up"}))
    arrived, release = asyncio.Event(), asyncio.Event()

    async def upstream(request: web.Request) -> web.Response:
        if request.path == "/slow":
            arrived.set()
            await asyncio.wait_for(release.wait(), 10)
        if idp.valid(request.headers.get("Authorization", "").removeprefix("Bearer ")) is None:
            return web.Response(status=401)
        return web.Response(status=404 if request.path == "/missing" else 200, text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream)
    client = await start_proxy(aiohttp_client, _config(idp, await start_app(aiohttp_server, app)), **QUICK_LOGINS)
    await _ready(client)  # after one rejected login and the backoff, the second login succeeds

    assert (await client.get("/ok", headers=KEY)).status == 200
    assert (await client.post("/missing", headers=KEY, data=b"x")).status == 404
    assert (await client.get("/ok")).status == 401  # no API key: the proxy answers itself
    assert (await client.request("PROPFIND", "/ok", headers=KEY)).status == 200
    idp.revoke_all_access()  # the upstream now answers 401: one refresh, one retry
    assert (await client.get("/ok", headers=KEY)).status == 200

    slow = asyncio.create_task(client.get("/slow", headers=KEY))
    try:
        await asyncio.wait_for(arrived.wait(), 5)
        during = _metrics(await (await client.get("/-/metrics", headers=KEY)).text())
        assert _value(during, "oauth_sidecar_requests_in_flight") == 1
    finally:
        release.set()
    assert (await slow).status == 200

    assert (await client.get("/-/metrics")).status == 401
    resp = await client.get("/-/metrics", headers=KEY)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await resp.text()
    m = _metrics(text)
    tokens = "oauth_sidecar_token_requests_total"
    assert _value(m, tokens, kind="login", outcome="rejected") == 1
    assert _value(m, tokens, kind="login", outcome="ok") == 1
    assert _value(m, tokens, kind="refresh", outcome="ok") == 1
    assert _value(m, "oauth_sidecar_token_failures_total", kind="login", reason="invalid_grant") == 1
    assert 250 < _value(m, "oauth_sidecar_token_expiry_seconds") <= 300
    assert _value(m, "oauth_sidecar_token_ready") == 1

    requests = "oauth_sidecar_requests_total"
    assert _value(m, requests, method="GET", status="2xx", code="200", source="upstream") == 3
    assert _value(m, requests, method="POST", status="4xx", code="404", source="upstream") == 1
    assert _value(m, requests, method="GET", status="4xx", code="401", source="proxy") == 1
    assert _value(m, requests, method="OTHER", status="2xx", code="200", source="upstream") == 1
    assert _value(m, "oauth_sidecar_upstream_auth_retries_total") == 1

    # Sent upstream: /ok, /missing, PROPFIND, /ok twice (401 then the retry), /slow.
    histogram = "oauth_sidecar_upstream_duration_seconds"
    assert _value(m, histogram + "_count") == 6
    buckets = [(float(s.labels["le"]), s.value) for s in m[histogram + "_bucket"]]
    assert buckets == sorted(buckets) and buckets[-1] == (float("inf"), 6)
    assert _value(m, histogram + "_sum") > 0
    assert _value(m, "oauth_sidecar_requests_in_flight") == 0
    for secret in _secrets(idp):
        assert secret not in text


def test_per_request_metrics_follow_prometheus_semantics():
    """The per-request figures are plain counters turned into metric families at scrape time: buckets
    are cumulative and "less than or equal" (a value on a bound counts in that bound's bucket)."""
    metrics = Metrics()
    for seconds in (0.0005, 0.001, 0.003, 0.3, 120.0):
        metrics.observe_upstream(seconds)
    metrics.bytes_out_total += 1234
    metrics.count_request("GET", 502, "proxy")
    metrics.count_request("GET", 502, "proxy")
    m = _metrics(metrics.exposition().decode())
    name = "oauth_sidecar_upstream_duration_seconds"
    buckets = {s.labels["le"]: s.value for s in m[name + "_bucket"]}
    assert (buckets["0.001"], buckets["0.005"], buckets["0.5"], buckets["60.0"], buckets["+Inf"]) == (2, 3, 4, 4, 5)
    assert _value(m, name + "_count") == 5
    assert abs(_value(m, name + "_sum") - 120.3045) < 1e-9
    assert _value(m, "oauth_sidecar_response_bytes_total") == 1234
    assert _value(m, "oauth_sidecar_requests_total", method="GET", status="5xx", code="502", source="proxy") == 2


async def test_other_methods_share_one_series(aiohttp_server, aiohttp_client):
    """Methods outside the standard set (WebDAV and the like) are counted as one class, OTHER."""
    idp = await _idp(aiohttp_server)
    _, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, _config(idp, api_url), **QUICK_LOGINS)
    for method in ("PROPFIND", "MKCOL", "LOCK", "UNLOCK", "PURGE"):
        assert (await client.request(method, "/v1/echo", headers=KEY)).status == 200
    m = _metrics(await (await client.get("/-/metrics", headers=KEY)).text())
    methods = {s.labels["method"] for s in m["oauth_sidecar_requests_total"]}
    assert methods == {"OTHER"}
    assert _value(m, "oauth_sidecar_requests_total", method="OTHER", code="200") == 5


# --- logs ----------------------------------------------------------------------------------------


async def _proxy_logging_to(buffer: io.StringIO, fmt: str, aiohttp_server: Any, aiohttp_client: Any) -> Any:
    idp = await _idp(aiohttp_server)
    _, api_url = await start_api(aiohttp_server, idp)
    config = _config(idp, api_url)
    setup_logging("info", fmt, config.secrets(), stream=buffer)
    return await start_proxy(aiohttp_client, config, **QUICK_LOGINS)


async def test_json_access_log_and_request_id(aiohttp_server, aiohttp_client):
    """JSON logs are one object a line; an access line carries method, the path without its query string,
    status, bytes, duration and the request id, which also reached the upstream and came back."""
    buffer = io.StringIO()
    client = await _proxy_logging_to(buffer, "json", aiohttp_server, aiohttp_client)
    await _ready(client)
    mine = await client.get("/v1/echo/a%20b?marker=query-marker-7431&x=1", headers={**KEY, "X-Request-Id": "req-42"})
    generated = await client.get("/v1/echo/c?marker=query-marker-7431", headers=KEY)
    bodies = [await mine.read(), await generated.read()]

    assert mine.headers["X-Request-Id"] == "req-42"
    refused = await client.get("/v1/echo/d?marker=query-marker-7431")  # no API key: the proxy answers
    bodies.append(await refused.read())
    generated_id = generated.headers["X-Request-Id"]
    assert len(generated_id) >= 16 and generated_id != refused.headers["X-Request-Id"]
    for body, request_id in ((bodies[0], "req-42"), (bodies[1], generated_id)):
        upstream_headers = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert upstream_headers["x-request-id"] == request_id

    flush_access_log()
    records = [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]
    ours = [r for r in records if r["logger"].startswith("oauth_sidecar")]
    access = [r for r in ours if r["event"] == "request"]
    assert [(r["method"], r["path"], r["status"], r["request_id"]) for r in access] == [
        ("GET", "/v1/echo/a%20b", 200, "req-42"),
        ("GET", "/v1/echo/c", 200, generated_id),
        ("GET", "/v1/echo/d", 401, refused.headers["X-Request-Id"]),
    ]
    assert [r["bytes"] for r in access] == [len(b) for b in bodies]
    assert all(isinstance(r["duration_ms"], float | int) and r["duration_ms"] >= 0 for r in access)
    assert all(r["level"] == "info" and isinstance(r["ts"], float) for r in access)
    assert "query-marker-7431" not in json.dumps(ours)
    assert any(r["event"] == "token.obtained" for r in ours)


async def test_text_access_log_line(aiohttp_server, aiohttp_client):
    """Text logs: timestamp, level, event name, then key=value fields; the query string is left out."""
    buffer = io.StringIO()
    client = await _proxy_logging_to(buffer, "text", aiohttp_server, aiohttp_client)
    await _ready(client)
    resp = await client.get("/v1/echo/t?marker=query-marker-7431", headers={**KEY, "X-Request-Id": "txt-1"})
    size = len(await resp.read())
    flush_access_log()
    lines = [line for line in buffer.getvalue().splitlines() if " request method=" in line]
    assert len(lines) == 1
    assert re.fullmatch(
        rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ info request method=GET path=/v1/echo/t status=200 "
        rf"bytes={size} duration_ms=[0-9.]+ request_id=txt-1",
        lines[0],
    )
    token_lines = [line for line in buffer.getvalue().splitlines() if " token.obtained " in line]
    assert len(token_lines) == 1 and "kind=login" in token_lines[0]


# A JWT-shaped value (never issued by anyone) and secrets that collide with the line's own words.
FAKE_JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
LINE_SECRETS = ["s3cr3t-key-value", "ques", "HEAD", "gone"]
ACCESS_CASES = [
    # method, path, status, bytes, duration_ms, request_id, outcome
    ("GET", "/v1/hello", 200, 57, 1.23, "f2096140bf1ac7152ee9000000000001", ""),
    ("HEAD", "/", 0, 0, 0.0, "req-42", "client_gone"),
    ("PROPFIND", "/a b/c", 207, 12345, 1234.5, "with space", "upstream_cut"),
    (FAKE_JWT, "/x\nforged info request", 400, 10, 0.05, '"quoted"', ""),
    ("s3cr3t-key-value", "/x/s3cr3t-key-value/" + FAKE_JWT, 403, 151, 2.0, "s3cr3t-key-value", "client_stalled"),
    ("POST", "/x/Bearer abcdefghijkl/basic%20Zm9vYmFyYmF6", 502, 1, 10.0, "Basic dXNlcjpwYXNzd29yZA==", ""),
    ("GET", "/ba\u017fic abcdefghijkl/\u00fc/\x00\t", 200, 3, 0.01, "BEARER 0123456789abc", ""),
    ("DELETE", "", 204, 0, 99999.99, "x" * 128, ""),
]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_fast_access_line_is_the_line_the_record_would_give(fmt, monkeypatch):
    """The access line written directly is, byte for byte, the line its record gives through the handler's
    redaction filter and formatter: for hostile paths, methods and request ids, and secrets that collide
    with the line's own words ("ques" in "request", "HEAD", "gone")."""
    monkeypatch.setattr(proxy.observability.time, "time", lambda: 1795436166.1755)
    buffer = io.StringIO()
    setup_logging("info", fmt, LINE_SECRETS, stream=buffer)
    for method, path, status, size, duration_ms, request_id, outcome in ACCESS_CASES:
        seconds = duration_ms / 1000  # the forwarder passes seconds; the line shows milliseconds, rounded
        log_request(method, path, status, size, seconds, request_id, outcome)
        flush_access_log()
        fields = {"method": method, "path": path, "status": status, "bytes": size}
        fields["duration_ms"] = round(seconds * 1e5) / 100  # two decimals, rounded as hundredths
        fields["request_id"] = request_id
        if outcome:
            fields["outcome"] = outcome
        access_log.info("request", extra={"fields": fields})  # the record path, through the handler
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2 * len(ACCESS_CASES)
    for fast, record in zip(lines[::2], lines[1::2], strict=True):
        assert fast == record
    output = buffer.getvalue()
    assert "s3cr3t-key-value" not in output and FAKE_JWT not in output and "abcdefghijkl" not in output
    assert "dXNlcjpwYXNzd29yZA" not in output and "0123456789abc" not in output


# What a client controls in an access line, drawn from what makes lines differ: the secrets and words of
# LINE_SECRETS, a JWT, scheme words, spaces, quotes, control and non-ASCII characters, the empty string.
_CLIENT_TEXT = st.lists(
    st.sampled_from(
        ["/v1", "/", "a", " ", '"', "\n", "\t", "\u017f", "\u00fc", "%", "eyJ", FAKE_JWT, "Bearer ", "basic "]
    )
    | st.sampled_from(LINE_SECRETS),
    max_size=4,
).map("".join)
_ACCESS_FIELDS = st.tuples(
    st.sampled_from(["GET", "POST", "HEAD", "PROPFIND"]) | _CLIENT_TEXT,
    _CLIENT_TEXT,
    st.sampled_from([0, 200, 404, 502]),
    st.integers(0, 10**9),
    st.floats(0, 1e5, allow_nan=False),
    st.sampled_from(["f2096140bf1ac7152ee9000000000001", "req-42"]) | _CLIENT_TEXT,
    st.sampled_from(["", "client_gone", "upstream_cut"]),
)


# Lines with nothing to mask or quote: batches of these alone are formatted without a look at each field.
_PLAIN_FIELDS = st.tuples(
    st.sampled_from(["GET", "POST", "PROPFIND"]),
    st.sampled_from(["/v1/hello", "/", "/a%20b;p=1", "/x/eyj"]),
    st.sampled_from([0, 200, 404, 502]),
    st.integers(0, 10**9),
    st.floats(0, 1e5, allow_nan=False),
    st.sampled_from(["f2096140bf1ac7152ee9000000000001", "req-42"]),
    st.sampled_from(["", "client_gone", "upstream_cut"]),
)


def _batch_and_records(fmt: str, batch: list[tuple[Any, ...]]) -> tuple[str, str]:
    """The lines ``batch`` gives as one batch of the access writer, and the lines of its records."""
    with mock.patch.object(proxy.observability.time, "time", lambda: 1795436166.1755):
        fast, records = io.StringIO(), io.StringIO()
        setup_logging("info", fmt, LINE_SECRETS, stream=fast)
        for fields in batch:
            log_request(*fields)
        flush_access_log()
        setup_logging("info", fmt, LINE_SECRETS, stream=records)
        for method, path, status, size, seconds, request_id, outcome in batch:
            extra = {"method": method, "path": path, "status": status, "bytes": size}
            extra |= {"duration_ms": round(seconds * 1e5) / 100, "request_id": request_id}
            if outcome:
                extra["outcome"] = outcome
            access_log.info("request", extra={"fields": extra})
    return fast.getvalue(), records.getvalue()


@pytest.mark.parametrize("fmt", ["text", "json"])
@settings(max_examples=60, deadline=None)
@given(
    batch=st.lists(_PLAIN_FIELDS, min_size=1, max_size=6)
    | st.lists(_ACCESS_FIELDS | _PLAIN_FIELDS, min_size=1, max_size=6)
)
def test_a_batch_of_access_lines_is_the_lines_their_records_would_give(fmt, batch):
    """Lines written as one batch (one check of what the clients sent, then the lines formatted at once,
    or each line redacted and quoted by itself) are the lines their records give through the handler."""
    fast, records = _batch_and_records(fmt, batch)
    assert fast == records
    assert fast.count("\n") == len(batch)


PLAIN_LINE = ("GET", "/v1/hello", 200, 57, 0.00123, "f2096140bf1ac7152ee9000000000001", "")
HOSTILE_VALUES = [
    FAKE_JWT,
    "basic abcdefghijkl",
    "Bearer abcdefghijkl",
    "s3cr3t-key-value",
    "a b",
    "\t",
    "",
    "\u00fc",
    "ba\u017fic abcdefghijkl",
]


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("field", [0, 1, 5], ids=["method", "path", "request_id"])
@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_one_value_to_mask_or_quote_is_masked_or_quoted_in_a_batch_of_plain_lines(fmt, field, value):
    """A single value to mask or quote anywhere in a batch is masked or quoted as its record would be."""
    hostile = list(PLAIN_LINE)
    hostile[field] = value
    fast, records = _batch_and_records(fmt, [PLAIN_LINE, tuple(hostile), PLAIN_LINE])
    assert fast == records


def test_the_access_line_is_a_record_when_someone_else_listens(caplog):
    """With a handler added after setup_logging (pytest's capture, a test's), the access line is a record
    with its fields, as before."""
    setup_logging("info", "text", [], stream=io.StringIO())
    logging.getLogger("oauth_sidecar").addHandler(caplog.handler)
    log_request("GET", "/v1/x", 200, 5, 0.0005, "id-1", "client_gone")  # seconds, logged in ms
    (record,) = [r for r in caplog.records if r.name == "oauth_sidecar.access"]
    assert record.getMessage() == "request"
    assert record.fields == {  # type: ignore[attr-defined]
        "method": "GET",
        "path": "/v1/x",
        "status": 200,
        "bytes": 5,
        "duration_ms": 0.5,
        "request_id": "id-1",
        "outcome": "client_gone",
    }


class StuckStream(io.StringIO):
    """A stderr that takes no write until released, like a full pipe nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        self.release.wait(10)
        return super().write(text)


def test_a_stuck_stderr_never_blocks_the_caller_and_lines_beyond_the_bound_are_counted(monkeypatch):
    """While stderr takes nothing, access lines wait up to ACCESS_MAX_PENDING; beyond that they are dropped
    at once, and a log.access_dropped warning says how many once stderr moves again."""
    monkeypatch.setattr(proxy.observability, "ACCESS_MAX_PENDING", 50)
    monkeypatch.setattr(proxy.observability, "ACCESS_FLUSH_S", 0.01)
    stream = StuckStream()
    setup_logging("info", "text", [], stream=stream)
    log_request("GET", "/first", 200, 1, 0.1, "id-0", "")
    assert stream.entered.wait(5)  # the writer's thread took the first line and is stuck writing it
    started = time.monotonic()
    for n in range(1, 81):
        log_request("GET", f"/n/{n}", 200, 1, 0.1, f"id-{n}", "")
    assert time.monotonic() - started < 0.5  # 80 lines, none of them waited for stderr
    stream.release.set()
    setup_logging("info", "text", [], stream=io.StringIO())  # closes the writer: its last lines are written
    lines = stream.getvalue().splitlines()
    assert [line.split(" path=")[1].split()[0] for line in lines if " request " in line] == [
        "/first",
        *(f"/n/{n}" for n in range(1, 51)),
    ]
    (dropped,) = [line for line in lines if " log.access_dropped " in line]
    assert dropped.endswith(" warning log.access_dropped lines=30 max_pending=50")


async def _full_cycle(aiohttp_server: Any, aiohttp_client: Any, **auth: Any) -> tuple[DemoIdP, Any]:
    """Transient login failure, rejected login, login, forwarded requests, a refresh after an upstream 401,
    a request with a wrong API key, then shutdown with the session ended at the provider."""
    idp = await _idp(aiohttp_server)
    idp.fail_next(
        Fault(503, {"error": "temporarily_unavailable", "error_description": "Keycloak is restarting"}),
        Fault(400, {"error": "invalid_grant", "error_description": "Account disabled"}),
    )
    api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(
        aiohttp_client, _config(idp, api_url, auth={"revoke_on_shutdown": True, **auth}), **QUICK_LOGINS
    )
    await _ready(client)
    assert (await client.get("/v1/hello?who=me", headers=KEY)).status == 200
    assert (await client.post("/v1/echo", data=b"payload", headers=KEY)).status == 200
    idp.revoke_all_access()
    assert (await client.get("/v1/hello", headers=KEY)).status == 200  # 401 upstream -> refresh -> retry
    assert (await client.get("/v1/hello", headers={"X-Api-Key": "wrong-key"})).status == 401
    assert (await client.get("/-/status", headers=KEY)).status == 200
    await client.close()  # runs the app's cleanup: the session is ended at the provider
    assert idp.hits["logout"] == 1
    assert len(api.rejected) == 1  # the revoked token, once
    return idp, client


async def test_token_events_logged_once_each(aiohttp_server, aiohttp_client, caplog):
    """Login, refresh and each failure are logged exactly once, failures with the provider's error and
    error_description."""
    caplog.set_level(logging.DEBUG)
    await _full_cycle(aiohttp_server, aiohttp_client)
    events = [(r.getMessage(), getattr(r, "fields", {})) for r in caplog.records if r.name == "oauth_sidecar"]

    def named(name: str, **match: Any) -> list[dict[str, Any]]:
        return [f for e, f in events if e == name and all(f.get(k) == v for k, v in match.items())]

    assert len(named("token.obtained", kind="login")) == 1
    assert len(named("token.obtained", kind="refresh")) == 1
    assert len(named("token.obtained")) == 2
    (unavailable,) = named("token.unavailable")
    assert unavailable["reason"] == "server_error"
    assert "temporarily_unavailable: Keycloak is restarting" in unavailable["detail"]
    (rejected,) = named("token.login_rejected")
    assert (rejected["error"], rejected["description"]) == ("invalid_grant", "Account disabled")
    assert len(named("token.rejected_upstream")) == 1
    refreshed = named("token.obtained", kind="refresh")[0]["token"]
    assert named("token.session_ended") == [{"how": "logout", "token": refreshed}]


async def test_no_secret_in_debug_logs_of_a_full_cycle(aiohttp_server, aiohttp_client, caplog):
    """At debug level, the records of a whole login/refresh/forward/shutdown cycle (before the redaction
    safety net) contain no password, client secret, API key, access or refresh token."""
    caplog.set_level(logging.DEBUG)
    idp, _ = await _full_cycle(aiohttp_server, aiohttp_client)
    assert any(r["password"] == PASSWORD and r["client_secret"] == CLIENT_SECRET for r in idp.requests)
    secrets = _secrets(idp)
    assert len(idp.issued) >= 4  # two access and two refresh tokens

    text_format, json_format = TextFormatter(), JsonFormatter()
    outputs = []
    for record in caplog.records:
        outputs.append(text_format.format(record))
        outputs.append(json_format.format(record))
        outputs.append(repr(record.__dict__))
    everything = "\n".join(outputs)
    names = {record.getMessage() for record in caplog.records}
    assert {"token.obtained", "request", "token.session_ended"} <= names  # login, forwarding, shutdown all logged
    for secret in secrets:
        assert secret not in everything


def test_token_failure_reasons_cannot_grow_the_metric_without_bound():
    """The reason label is often the provider's own error string: odd ones and those past the cap are
    counted as "other"."""
    from prometheus_client.parser import text_string_to_metric_families

    from proxy.observability import MAX_FAILURE_REASONS, Metrics

    metrics = Metrics()
    metrics.count_token_failure("login", "invalid_grant")
    metrics.count_token_failure("login", "RESTEASY003065: Cannot consume content type")
    for i in range(MAX_FAILURE_REASONS * 3):
        metrics.count_token_failure("refresh", f"made_up_{i}")
    metrics.count_token_failure("login", "invalid_grant")
    reasons: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        if family.name == "oauth_sidecar_token_failures":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    reason = sample.labels["reason"]
                    reasons[reason] = reasons.get(reason, 0) + sample.value
    assert reasons["invalid_grant"] == 2
    assert len(reasons) == MAX_FAILURE_REASONS  # invalid_grant, other, and the first 30 made-up ones
    assert reasons["other"] == 1 + (MAX_FAILURE_REASONS * 3 - (MAX_FAILURE_REASONS - 2))


# --- the event registry --------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
# A name passed to event(...) or to a logger method, also on the line after the parenthesis, and the name
# MalformedRequestFilter gives aiohttp's record.
LOGGED_NAME = re.compile(
    r'(?:\bevent|\.(?:debug|info|warning|error|exception|critical))\(\s*"([a-z_]+(?:\.[a-z_]+)*)"'
    r'|\brecord\.msg\b[^=\n]*=\s*"([a-z_]+(?:\.[a-z_]+)*)"'
)


def _logged_names() -> dict[str, str]:
    """Every event name logged in proxy/*.py, with the first file that logs it."""
    found: dict[str, str] = {}
    for path in sorted((REPO / "proxy").glob("*.py")):
        for match in LOGGED_NAME.finditer(path.read_text(encoding="utf-8")):
            found.setdefault(match.group(1) or match.group(2), path.name)
    return found


def test_every_event_logged_is_in_the_registry_and_every_registered_one_is_logged():
    """proxy/observability.py's EVENTS is exactly the set of event names the code logs: none unlisted, none stale."""
    logged = _logged_names()
    assert len(logged) >= 20  # the pattern still finds the calls
    assert {name: where for name, where in logged.items() if name not in EVENTS} == {}, "logged, not in EVENTS"
    assert sorted(set(EVENTS) - set(logged)) == [], "in EVENTS, logged nowhere"


def test_the_readme_event_table_is_the_registry():
    """The README's Logs section lists every event in EVENTS, and no other."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    logs = readme[readme.index("### Logs") :]
    logs = logs[: logs.index("\n### ", 1)]
    table = re.findall(r"^\| `([a-z_]+(?:\.[a-z_]+)*)` \|", logs, re.M)
    assert len(table) == len(set(table)), "an event listed twice"
    assert sorted(table) == sorted(EVENTS)


def test_every_log_line_the_readme_quotes_names_a_real_event():
    """A log line quoted anywhere in the README (`warning token.unavailable ...` in the fault tables, the
    examples under Logs) names an event in EVENTS."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    quoted = set(re.findall(r"(?:`|\dZ )(?:debug|info|warning|error) ([a-z_]+(?:\.[a-z_]+)*)", readme))
    assert len(quoted) >= 10  # the pattern still finds them
    assert sorted(quoted - set(EVENTS)) == []


def test_a_batch_longer_than_a_slice_is_written_whole_and_in_order():
    """Lines queued faster than they are written (more than one slice of a batch) all reach the log,
    each once, in the order their requests ended."""
    stream = io.StringIO()
    setup_logging("info", "text", LINE_SECRETS, stream=stream)
    total = 5 * proxy.observability.ACCESS_SLICE + 3
    for n in range(total):
        log_request("GET", f"/v1/items/{n}", 200, n, 0.001, f"id-{n}")
    flush_access_log()
    lines = stream.getvalue().splitlines()
    assert [line.split(" path=")[1].split(" ")[0] for line in lines] == [f"/v1/items/{n}" for n in range(total)]
    assert all(f"bytes={n} " in line and line.endswith(f"request_id=id-{n}") for n, line in enumerate(lines))
