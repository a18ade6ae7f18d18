"""The listener as cli.serve() runs it: listen.max_connections bounds the open client connections, and a
request aiohttp's parser refuses gets the contract's JSON error; and the aiohttp internals it relies on."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import inspect
import io
import json
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http_parser import HttpRequestParser, HttpRequestParserPy

from proxy.app import make_app
from proxy.cli import serve
from proxy.listener import MAX_HEAD_LINE, LimitedSite, _JsonErrors
from proxy.observability import Metrics, setup_logging
from tests.fakes.servers import keycloak_config, start_api, start_idp, start_proxy
from tests.faults.conftest import wait_for

HEALTHY = b"GET /-/healthy HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

# A fake secret sent with each malformed request, in another header and in the refused line itself:
# aiohttp's own 400 quotes the refused line, so a body that echoed it would show the marker.
MARKER = b"ak-marker-never-echoed"
# aiohttp's C parser (llhttp) reports a bad header name as a plain BadHttpMessage; its pure-Python
# parser (AIOHTTP_NO_EXTENSIONS=1) as InvalidHeader.
BAD_NAME_DETAIL = "invalid header field" if HttpRequestParser is HttpRequestParserPy else "malformed HTTP request"
MALFORMED = {
    "header-name-with-space": (
        b"GET /v1/hello HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Api-Key: %s\r\nBad Header: %s\r\n\r\n" % (MARKER, MARKER),
        BAD_NAME_DETAIL,
    ),
    "header-line-too-long": (  # the listener's max_field_size is 16384
        b"GET /v1/hello HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Api-Key: %s\r\nX-Long: %s%s\r\n\r\n"
        % (MARKER, MARKER, b"a" * 16384),
        "a request line or header field is longer than 16384 bytes",
    ),
}


async def _exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        return head + await asyncio.wait_for(reader.readexactly(length), 5)
    finally:
        writer.close()


async def _until_closed(port: int, request: bytes) -> tuple[int, dict[str, str], bytes, bytes]:
    """Send ``request`` as-is; read until the server closes the connection: status, headers, body, all bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body, response


@contextlib.asynccontextmanager
async def _serving(aiohttp_server: Any, **listen: Any) -> AsyncIterator[int]:
    """cli.serve() in this process, in front of the demo IdP and API; yields its port, then stops it."""
    idp = await start_idp(aiohttp_server)
    _, api_url = await start_api(aiohttp_server, idp)
    config = keycloak_config(idp, api_url, listen={"port": 0, **listen})
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    server = asyncio.ensure_future(serve(config, on_listening=listening.set_result, stop=stop))
    try:
        yield int((await asyncio.wait_for(listening, 10)).rsplit(":", 1)[1])
    finally:
        stop.set()
        assert await asyncio.wait_for(server, 15) == 0


async def _get_hello(port: int) -> int:
    """A well-formed request forwarded to the demo API; its status."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/v1/hello") as resp:
        return resp.status


async def test_connections_over_the_limit_get_503_and_the_limit_frees_up(aiohttp_server):
    async with _serving(aiohttp_server, max_connections=2) as port:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]  # idle, kept open
        await asyncio.sleep(0.05)

        refused = await _exchange(port, HEALTHY)
        assert refused.startswith(b"HTTP/1.1 503 ")
        assert b"Retry-After: 1" in refused
        assert json.loads(refused.split(b"\r\n\r\n", 1)[1])["error"] == "too_many_connections"

        _, writer = held.pop()
        writer.close()
        for _ in range(100):  # bounded: the server notices the closed connection within milliseconds
            await asyncio.sleep(0.02)
            answer = await _exchange(port, HEALTHY)
            if answer.startswith(b"HTTP/1.1 200 "):
                break
        assert answer.startswith(b"HTTP/1.1 200 ")
        for _, writer in held:
            writer.close()


@pytest.mark.parametrize("request_bytes, detail", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_requests_get_the_json_error_and_the_listener_keeps_serving(
    aiohttp_server, request_bytes, detail
):
    """A request aiohttp's parser refuses gets 400 with the contract's JSON body (a fixed detail, never the
    request's bytes), and the connection is closed; the next request through the same listener is forwarded."""
    async with _serving(aiohttp_server) as port:
        status, headers, body, response = await _until_closed(port, request_bytes)
        assert status == 400
        assert headers["content-type"].startswith("application/json")
        assert json.loads(body) == {"error": "bad_request", "detail": detail}
        assert MARKER not in response
        assert await _get_hello(port) == 200


async def test_a_malformed_request_is_still_logged_as_one_warning_line(aiohttp_server):
    """The JSON answer does not change the log: one WARNING request.malformed line, no traceback, no bytes."""
    out = io.StringIO()
    setup_logging("info", "text", (), stream=out)
    async with _serving(aiohttp_server) as port:
        status, headers, _, _ = await _until_closed(port, MALFORMED["header-name-with-space"][0])
        assert status == 400 and headers["content-type"].startswith("application/json")
        await wait_for(lambda: "request.malformed" in out.getvalue())
        assert await _get_hello(port) == 200
    logged = [line for line in out.getvalue().splitlines() if "request.malformed" in line]
    assert len(logged) == 1
    assert "warning request.malformed error=" in logged[0] and "status=400" in logged[0]
    assert "Traceback" not in out.getvalue() and MARKER.decode() not in out.getvalue()


async def _closed_by_server_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the server closes the connection (EOF, or a reset) within ``seconds``; nothing else may arrive."""
    try:
        data = await asyncio.wait_for(reader.read(1), seconds)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    assert data == b"", f"unexpected bytes {data!r}"
    return True


async def test_idle_connections_and_unfinished_heads_are_closed_after_idle_timeout(aiohttp_server):
    """listen.idle_timeout_s: a client that never finishes its request head, or leaves a keep-alive
    connection idle, does not hold a connection slot for longer (aiohttp's own default is an hour)."""
    async with _serving(aiohttp_server, idle_timeout_s=0.3) as port:
        # Half a request head, then silence.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v1/hello HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert not await _closed_by_server_within(reader, 0.15)  # not before its time
        assert await _closed_by_server_within(reader, 5)
        writer.close()

        # A whole request answered on a keep-alive connection, then silence.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEALTHY)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await asyncio.wait_for(reader.readexactly(length), 5)
        assert await _closed_by_server_within(reader, 5)
        writer.close()


async def test_a_request_under_way_is_not_cut_by_idle_timeout(aiohttp_server):
    """The idle timeout only applies between requests: a body arriving slowly, over several idle
    timeouts, is still forwarded whole and answered (listen.min_body_rate is off here: the trickle it
    refuses is tests/test_relay.py's)."""
    async with _serving(aiohttp_server, idle_timeout_s=0.1, min_body_rate=0) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\n"
        )
        for byte in b"slow":
            await asyncio.sleep(0.1)  # a whole idle timeout between bytes
            writer.write(bytes([byte]))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = json.loads(await asyncio.wait_for(reader.readexactly(length), 5))
        assert (body["body_bytes"], body["body_sha256"]) == (4, hashlib.sha256(b"slow").hexdigest())
        writer.close()


async def test_the_aiohttp_internals_the_listener_relies_on_are_still_there():
    """proxy/listener.py touches aiohttp private attributes; an aiohttp release that renames or drops one
    fails here, by name, instead of at the first connection. pyproject.toml's aiohttp range is where this
    passed."""
    app = web.Application(handler_args={"max_field_size": MAX_HEAD_LINE})
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = LimitedSite(runner, "127.0.0.1", 0, limit=1, metrics=Metrics())
        server = runner.server
        assert server is not None
        where = f"aiohttp {aiohttp.__version__}"
        for owner, obj, attribute in (
            ("web.Server", server, "_loop"),
            ("web.Server", server, "_kwargs"),
            ("web.BaseSite", site, "_runner"),
            ("web.BaseSite", site, "_server"),
            ("web.BaseSite", site, "_backlog"),
        ):
            assert hasattr(obj, attribute), f"{where}: {owner}.{attribute} is gone; proxy/listener.py uses it"
        assert server._loop is asyncio.get_running_loop(), f"{where}: web.Server._loop is not the server's loop"
        assert server._kwargs.get("max_field_size") == MAX_HEAD_LINE, (
            f"{where}: web.Server._kwargs no longer holds the RequestHandler keyword arguments (handler_args)"
        )
        assert site._runner is runner, f"{where}: web.BaseSite._runner is not the runner"
        assert isinstance(site._backlog, int), f"{where}: web.BaseSite._backlog is not the listen backlog"
        handle_error = inspect.signature(web.RequestHandler.handle_error)
        assert list(handle_error.parameters)[:5] == ["self", "request", "status", "exc", "message"], (
            f"{where}: web.RequestHandler.handle_error{handle_error} changed; _JsonErrors overrides it"
        )
        handler = _JsonErrors(server, loop=server._loop, **server._kwargs)  # what web.Server.__call__ does
        assert isinstance(handler, web.RequestHandler)
        for method in ("_make_server", "_cleanup_server"):  # SidecarRunner implements BaseRunner's two hooks
            assert method in web.BaseRunner.__abstractmethods__, f"{where}: web.BaseRunner.{method} is no longer a hook"
        assert hasattr(runner, "_kwargs"), f"{where}: web.BaseRunner._kwargs is gone; SidecarRunner passes it on"

        await site.start()  # the site's own create_server, stored where BaseSite.stop() closes it
        assert isinstance(site._server, asyncio.AbstractServer), f"{where}: web.BaseSite._server is not the server"
    finally:
        await runner.cleanup()


ENCODED_CONTROL_PATHS = [b"/a%0Ab.txt", b"/a%0Db", b"/dir%0A/x%0D%0A?q=%0A", b"/-/healthy%0A", b"/%0A"]


def _get(path: bytes) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % path


async def test_paths_with_encoded_control_characters_are_forwarded_byte_for_byte(
    aiohttp_server, aiohttp_raw_server, aiohttp_client
):
    """An encoded newline or carriage return in the path does not fall out of the catch-all route into
    aiohttp's plain-text 404: the request is forwarded, its raw path and query intact. An encoded NUL reaches
    the forwarder too, which refuses it with the contract's JSON 400; /-/ paths still route to the proxy."""
    seen: list[str] = []

    async def upstream(request: web.BaseRequest) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({"raw_path": request.raw_path})

    up = await aiohttp_raw_server(upstream)
    idp = await start_idp(aiohttp_server)
    proxy = await start_proxy(aiohttp_client, keycloak_config(idp, str(up.make_url("")).rstrip("/")))
    port = proxy.server.port
    assert port is not None
    for path in ENCODED_CONTROL_PATHS:
        status, headers, body, _ = await _until_closed(port, _get(path))
        assert (status, headers["content-type"]) == (200, "application/json; charset=utf-8"), (path, body)
        assert json.loads(body) == {"raw_path": path.decode()}
    assert seen == [path.decode() for path in ENCODED_CONTROL_PATHS]

    # proxy/access.py refuses a path that decodes to a NUL byte (Guard.check_forward), by design.
    status, _, body, _ = await _until_closed(port, _get(b"/a%00b"))
    assert (status, json.loads(body)) == (400, {"error": "bad_request", "detail": "the path contains a NUL byte"})

    for reserved in (b"/-/healthy", b"/-/ready", b"/-/status", b"/-/metrics"):
        status, _, body, _ = await _until_closed(port, _get(reserved))
        assert status in (200, 503), (reserved, body)  # /-/ready is 503 until the first login lands
        assert not body.startswith(b'{"raw_path"'), reserved
    assert len(seen) == len(ENCODED_CONTROL_PATHS)  # none of the others went upstream


# The open-file limit for the proxy below: its baseline (with --dev's identity provider and API in the same
# process) is about 20 descriptors, so a few dozen idle clients exhaust it.
LOW_OPEN_FILES = 40
FLOOD_CLIENTS = 300
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _answer(port: int, request: bytes, seconds: float) -> bytes:
    """What comes back on a new connection for ``request`` within ``seconds`` (b"" for none or a reset)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), seconds)
    except (OSError, TimeoutError):
        return b""
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(200), seconds)
    except (OSError, TimeoutError):
        return b""
    finally:
        writer.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_out_of_open_files_the_log_stays_bounded_and_the_proxy_recovers(tmp_path, loop):
    """Under a low ulimit -n, the connection cap is lowered (one sidecar.fd_limit line); a flood of clients
    that exhausts the descriptors anyway gives a few log lines, not a traceback per failed accept, the
    clients get a 503 where the loop lets us answer, and the proxy serves again once they are gone."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    block = "sys.modules['uvloop'] = None; " if loop == "asyncio" else ""
    port = _free_port()
    log_path = tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OAUTH_SIDECAR_")}
    code = f"import sys; {block}from proxy.cli import main; sys.exit(main())"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-c", code, "--dev", "--port", str(port)),
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env=env,
            cwd=REPO,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_OPEN_FILES, LOW_OPEN_FILES)),
        )
    try:
        assert proc.stdout is not None
        for _ in range(20):  # the banner is a handful of lines
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, log_path.read_text()
            if b"curl" in line:
                break
        answers = await asyncio.gather(*(_answer(port, HEALTHY, 3) for _ in range(FLOOD_CLIENTS)))
        statuses = [answer[9:12] for answer in answers if answer.startswith(b"HTTP/1.1 ")]
        assert set(statuses) <= {b"200", b"503"}, statuses
        if loop == "asyncio":  # libuv closes what it cannot accept without a word
            assert len(statuses) >= FLOOD_CLIENTS // 2, f"{len(statuses)} of {FLOOD_CLIENTS} answered"

        for _ in range(50):  # bounded: accepting resumes within ACCEPT_RETRY_DELAY_S
            if (await _answer(port, HEALTHY, 2)).startswith(b"HTTP/1.1 200 "):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the proxy does not answer after the clients went away")
    finally:
        proc.send_signal(signal.SIGTERM)
        exit_code = await asyncio.wait_for(proc.wait(), 30)
    logged = log_path.read_text()
    assert exit_code == 0, logged
    assert "Traceback" not in logged, logged[:3000]
    lines = logged.splitlines()
    assert len(lines) <= 15, lines
    assert sum("sidecar.fd_limit" in line for line in lines) == 1, lines
    assert sum("sidecar.accept_failed" in line for line in lines) <= 3, lines


HANGING_UP = {
    "get": b"GET /fast HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "post-whole-body": b"POST /fast HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello",
    "post-body-half-sent": b"POST /fast HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50000\r\n\r\nhello",
    "chunked-body-half-sent": (
        b"POST /fast HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    ),
}


@pytest.mark.parametrize("waiting", HANGING_UP.values(), ids=HANGING_UP.keys())
async def test_a_client_that_hangs_up_while_waiting_for_the_pool_leaves_no_error(aiohttp_server, caplog, waiting):
    """upstream.pool_size = 1, a slow request holding the only connection: a second client that hangs up
    while its request waits for that connection causes no ERROR line and no traceback, and the pool still
    serves the next request."""
    slow_started, hung_up = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        slow_started.set()
        await asyncio.wait_for(hung_up.wait(), 5)  # the only connection stays busy until the client is gone
        await asyncio.sleep(0.2)  # and a while longer, for the proxy to see the hang-up while it waits
        return web.json_response({"slow": True})

    async def fast(request: web.Request) -> web.Response:
        return web.json_response({"fast": True})

    upstream = web.Application()
    upstream.router.add_get("/slow", slow)
    upstream.router.add_route("*", "/fast", fast)
    up = await aiohttp_server(upstream)
    idp = await start_idp(aiohttp_server)
    config = keycloak_config(idp, str(up.make_url("")).rstrip("/"), upstream={"pool_size": 1})
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    server = asyncio.ensure_future(serve(config, on_listening=listening.set_result, stop=stop))
    try:
        port = int((await asyncio.wait_for(listening, 10)).rsplit(":", 1)[1])
        holder = asyncio.ensure_future(_until_closed(port, _get(b"/slow")))
        await asyncio.wait_for(slow_started.wait(), 5)

        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(waiting)
        await writer.drain()
        await asyncio.sleep(0.2)  # queued behind /slow for the pool's only connection
        writer.close()  # and the client hangs up
        hung_up.set()

        status, _, body, _ = await asyncio.wait_for(holder, 5)
        assert (status, json.loads(body)) == (200, {"slow": True})
        status, _, body, _ = await _until_closed(port, _get(b"/fast"))
        assert (status, json.loads(body)) == (200, {"fast": True})
        await asyncio.sleep(0.1)
    finally:
        stop.set()
        assert await asyncio.wait_for(server, 15) == 0
    gc.collect()  # a task or future exception never retrieved is logged when it is collected
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [(r.name, r.getMessage(), r.exc_info) for r in errors]


ROUTES = {  # request line (and extra header lines) -> (status, what answered: "proxy" or the demo API's JSON)
    "reserved": (b"GET /-/healthy HTTP/1.1\r\n", 200, "proxy"),
    "reserved, percent-encoded": (b"GET /-/%68ealthy HTTP/1.1\r\n", 200, "proxy"),
    "reserved, absolute-form": (b"GET http://127.0.0.1/-/healthy HTTP/1.1\r\n", 200, "proxy"),
    "reserved path, absolute-form for another host": (b"GET http://evil.example/-/status HTTP/1.1\r\n", 400, "proxy"),
    "reserved, with a query": (b"GET /-/healthy?x=1 HTTP/1.1\r\n", 200, "proxy"),
    "reserved, POST": (b"POST /-/status HTTP/1.1\r\nContent-Length: 0\r\n", 405, "proxy"),
    "not reserved: trailing slash": (b"GET /-/healthy/ HTTP/1.1\r\n", 200, "api"),
    "not reserved: unknown": (b"GET /-/nothing HTTP/1.1\r\n", 200, "api"),
    "forwarded": (b"GET /v1/anything HTTP/1.1\r\n", 200, "api"),
    "CONNECT": (b"CONNECT example.com:443 HTTP/1.1\r\n", 400, "proxy"),
    "unknown Expect": (b"POST /v1/echo HTTP/1.1\r\nExpect: 200-ok\r\nContent-Length: 0\r\n", 417, "proxy"),
}


@pytest.mark.parametrize("served", ["sidecar-runner", "application"])
@pytest.mark.parametrize("case", list(ROUTES))
async def test_routes_are_the_same_however_the_app_is_served(aiohttp_server, aiohttp_client, served, case):
    """The /-/ routes match the decoded path exactly (as aiohttp's router did), everything else is forwarded,
    and the proxy's own answers are JSON: the same whether the app runs as oauth-sidecar serves it
    (SidecarRunner, low-level server) or as an aiohttp Application under any runner."""
    idp = await start_idp(aiohttp_server)
    _, api_url = await start_api(aiohttp_server, idp)
    config = keycloak_config(idp, api_url)
    if served == "sidecar-runner":
        client = await start_proxy(aiohttp_client, config)
    else:
        client = await aiohttp_client(make_app(config))
    line, status, answered = ROUTES[case]
    response = await _exchange(client.port, line + b"Host: 127.0.0.1\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == str(status).encode(), response[:300]
    assert b"application/json" in head.lower()
    data = json.loads(body)
    if answered == "proxy":
        assert "raw_path" not in data  # the demo API echoes the path it was asked for
        assert status == 200 or set(data) == {"error", "detail"}
    else:
        assert data["raw_path"] == line.split(b" ")[1].decode()


@pytest.mark.parametrize("served", ["sidecar-runner", "application"])
async def test_expect_100_continue_is_answered_once_before_the_body(aiohttp_server, aiohttp_client, served):
    """Expect: 100-continue gets exactly one interim answer, then the final one, however the app is served."""
    idp = await start_idp(aiohttp_server)
    _, api_url = await start_api(aiohttp_server, idp)
    config = keycloak_config(idp, api_url)
    client = await (
        start_proxy(aiohttp_client, config) if served == "sidecar-runner" else aiohttp_client(make_app(config))
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(b"POST /v1/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.write(b"ping")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert head.startswith(b"HTTP/1.1 200 "), head
