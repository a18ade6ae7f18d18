"""HTTP forwarding as plain HTTP/1.1 clients and upstreams use it: framing, pipelining, keep-alive, hang-ups.

Upstreams here are raw asyncio servers on 127.0.0.1 that answer exactly the bytes a test chooses; clients
are raw sockets (parsed with httptools) or aiohttp, talking to the real proxy app.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable

import aiohttp
import httptools
import pytest
from aiohttp.test_utils import TestClient

from proxy.app import FORWARDER, TOKENS
from proxy.demo import Fault
from proxy.upstream import Pool
from tests.fakes.servers import keycloak_config, start_idp, start_proxy

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
    return client.server.app[FORWARDER]._pool


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


# --- defects found in review ---------------------------------------------------------------------


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
    assert _pool(client)._open == 1  # the one kept-alive connection; none leaked


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


# --- behaviour no other test covers --------------------------------------------------------------


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
    assert _pool(client)._open == 0


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
