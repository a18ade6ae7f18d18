"""What crosses the proxy byte for byte: request framing upstream, response heads and bodies back.

Upstreams are raw asyncio servers on 127.0.0.1 that record every byte and answer exactly what a test
chooses; clients are raw sockets, so a test sees every byte the proxy writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest
from aiohttp import web

from proxy import wire
from proxy.response import RelayResponse
from tests.fakes.raw_upstream import (
    LIMIT,
    READ_S,
    Recorder,
    header_fields,
    ok,
    read_response,
    start_recorded_proxy,
)


@pytest.mark.parametrize(
    ("target", "extra"),
    [
        (b"/v1/upload", b"X-Note: chunked\r\n"),
        (b"/uploads/chunked", b""),
        (b"/v1/upload?mode=Chunked", b""),
        (b"/v1/upload", b"Accept: transfer-encoding/chunked\r\n"),
    ],
)
async def test_a_large_upload_mentioning_chunked_is_sent_as_its_content_length(
    aiohttp_server, aiohttp_client, target, extra
):
    """A body over the replay limit sent with Content-Length, with the word "chunked" anywhere in the
    head, reaches the upstream as exactly those bytes: it cannot turn into a second request."""
    upstream = Recorder(lambda n: ok(b"%d" % n))
    _, port = await start_recorded_proxy(aiohttp_server, aiohttp_client, await upstream.start())
    smuggled = b"GET /api/capture HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n"
    body = smuggled + b"x" * (LIMIT * 3 - len(smuggled))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%sContent-Length: %d\r\n\r\n" % (target, extra, len(body)))
    writer.write(body)
    writer.write(b"GET /v1/next HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    first, second = await read_response(reader), await read_response(reader)
    writer.close()
    assert (first[1], second[1]) == (b"1", b"2")
    assert [(head.split(b" ")[1], got) for _, head, got in upstream.requests] == [
        (target, body),
        (b"/v1/next", b""),
    ]
    await upstream.stop()


async def test_a_chunked_upload_is_re_chunked_whatever_its_size(aiohttp_server, aiohttp_client):
    """A client's chunked body arrives whole, chunk-encoded, with no Content-Length beside it."""
    upstream = Recorder(lambda n: ok())
    _, port = await start_recorded_proxy(aiohttp_server, aiohttp_client, await upstream.start())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/up HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    writer.write(b"5\r\nhello\r\n" + b"%x\r\n" % (LIMIT * 2) + b"y" * (LIMIT * 2) + b"\r\n0\r\n\r\n")
    head, _ = await read_response(reader)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200 ")
    ((_, sent_head, got),) = upstream.requests
    assert got == b"hello" + b"y" * (LIMIT * 2)
    assert b"content-length" not in header_fields(sent_head)
    await upstream.stop()


async def test_a_204_followed_by_a_forged_response_reaches_no_client(aiohttp_server, aiohttp_client):
    """Bytes after a complete response are dropped and the connection closed: neither this client nor
    the next request ever sees the forged response."""
    forged = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
    upstream = Recorder(lambda n: b"HTTP/1.1 204 No Content\r\n\r\n" + forged if n == 1 else ok(b"real"))
    _, port = await start_recorded_proxy(aiohttp_server, aiohttp_client, await upstream.start())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"DELETE /v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /v1/y HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    first, second = await read_response(reader), await read_response(reader)
    writer.close()
    assert first[0].startswith(b"HTTP/1.1 204 No Content\r\n")
    assert b"forged" not in first[0] + second[0] + second[1]
    assert second[1] == b"real"
    assert upstream.connections == 2  # the connection that carried the stray bytes was not reused
    await upstream.stop()


async def test_a_head_answered_with_a_body_gives_the_client_the_head_alone(aiohttp_server, aiohttp_client):
    """A HEAD response's body is never written to the client; its Content-Length passes through; the
    client's next response on the connection is its own."""
    upstream = Recorder(lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsplitting" if n == 1 else ok(b"second"))
    _, port = await start_recorded_proxy(aiohttp_server, aiohttp_client, await upstream.start())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"HEAD /v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /v1/y HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_S)
    assert b"Content-Length: 9\r\n" in head
    second = await read_response(reader)
    writer.close()
    assert second[0].startswith(b"HTTP/1.1 200 ") and second[1] == b"second"
    assert upstream.connections == 2
    await upstream.stop()


async def test_response_head_bytes_pass_through_as_they_came(aiohttp_server, aiohttp_client):
    """A latin-1 filename arrives byte for byte; the proxy adds no Content-Type, Date or Server."""
    disposition = b'attachment; filename="r\xe9sum\xe9.csv"'
    upstream = Recorder(
        lambda n: b"HTTP/1.1 200 Fine\r\nContent-Disposition: %s\r\nContent-Length: 2\r\n\r\nok" % disposition
    )
    _, port = await start_recorded_proxy(aiohttp_server, aiohttp_client, await upstream.start())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/file HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head, body = await read_response(reader)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200 Fine\r\n")
    assert b"Content-Disposition: " + disposition + b"\r\n" in head
    assert {b"content-type", b"date", b"server"} & set(header_fields(head)) == set()
    assert body == b"ok"
    await upstream.stop()


async def test_an_http10_keep_alive_client_can_delimit_a_chunked_response(raw_server, aiohttp_server, aiohttp_client):
    """HTTP/1.0 cannot read chunked: the body comes delimited by the close, announced by Connection:
    close, instead of a connection left open with no end in sight."""
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

    async def slow(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(chunked + b"3\r\nabc\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"3\r\ndef\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    url = await raw_server(slow)
    _, port = await start_recorded_proxy(aiohttp_server, aiohttp_client, url)
    head, rest = await _head_and_rest(port, b"GET /v1/x HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n")
    assert b"Connection: close\r\n" in head and b"transfer-encoding" not in header_fields(head)
    assert rest == b"abcdef"


async def test_an_http10_keep_alive_client_keeps_its_connection_for_a_sized_response(aiohttp_server, aiohttp_client):
    """With a Content-Length to delimit the body, an HTTP/1.0 keep-alive client is told keep-alive and
    its second request is answered on the same connection."""
    upstream = Recorder(lambda n: ok(b"%d" % n))
    _, port = await start_recorded_proxy(aiohttp_server, aiohttp_client, await upstream.start())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    for _ in range(2):
        writer.write(b"GET /v1/x HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n")
        answers.append(await read_response(reader))
    writer.close()
    assert [body for _, body in answers] == [b"1", b"2"]
    assert all(b"Connection: keep-alive\r\n" in head for head, _ in answers)
    await upstream.stop()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["content-length-and-chunked", "gzip-transfer-coding"],
)
async def test_a_response_two_parsers_could_split_differently_is_a_502(aiohttp_server, aiohttp_client, head):
    """Ambiguous response framing is refused with the proxy's JSON 502, not relayed."""
    upstream = Recorder(lambda n: head)
    _, port = await start_recorded_proxy(aiohttp_server, aiohttp_client, await upstream.start())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    got_head, body = await read_response(reader)
    writer.close()
    assert got_head.startswith(b"HTTP/1.1 502 ")
    assert b'"upstream_unreachable"' in body and b"hello" not in body
    await upstream.stop()


async def test_a_download_slower_than_the_timeout_but_flowing_is_not_cut(raw_server, aiohttp_server, aiohttp_client):
    """upstream.timeout_s counts time with no byte moving: a body that keeps arriving, for longer in
    total than the timeout, arrives whole."""

    async def trickle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        for byte in b"0123456789":
            await asyncio.sleep(0.06)
            writer.write(bytes([byte]))
            await writer.drain()
        await reader.read()

    url = await raw_server(trickle)
    _, port = await start_recorded_proxy(aiohttp_server, aiohttp_client, url, upstream={"timeout_s": 0.25})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/export HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head, body = await read_response(reader)  # 0.6 s in all, over twice the timeout
    writer.close()
    assert head.startswith(b"HTTP/1.1 200 ") and body == b"0123456789"


async def test_a_trickled_body_gets_408_and_its_connection_is_closed(aiohttp_server, aiohttp_client):
    """A body far below listen.min_body_rate is answered 408 (JSON) and the connection closed; the
    upstream never sees the request."""
    upstream = Recorder(lambda n: ok())
    _, port = await start_recorded_proxy(
        aiohttp_server, aiohttp_client, await upstream.start(), listen={"idle_timeout_s": 0.2, "min_body_rate": 1000}
    )
    for length in (100, LIMIT * 4):  # a small (buffered) body and a large (streamed) one
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % length)
        for _ in range(10):  # one byte every 50 ms (20 B/s) for 0.5 s: over two windows
            with contextlib.suppress(ConnectionError):  # the proxy may have answered and closed already
                writer.write(b"x")
            await asyncio.sleep(0.05)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_S)
        rest = await asyncio.wait_for(reader.read(), READ_S)  # the proxy closes the connection
        writer.close()
        assert head.startswith(b"HTTP/1.1 408 "), head
        assert b'"request_timeout"' in rest
    assert [n for n, head, _ in upstream.requests if head.startswith(b"POST")] == []
    await upstream.stop()


async def test_an_upload_at_a_usable_speed_is_never_cut(aiohttp_server, aiohttp_client):
    """A body arriving above listen.min_body_rate, over many windows, reaches the upstream whole."""
    upstream = Recorder(lambda n: ok())
    _, port = await start_recorded_proxy(
        aiohttp_server, aiohttp_client, await upstream.start(), listen={"idle_timeout_s": 0.2, "min_body_rate": 1000}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = bytes(range(256)) * 16  # 4 KiB in 500-byte pieces every 50 ms: 10 kB/s, over 0.4 s
    writer.write(b"PUT /v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body))
    for i in range(0, len(body), 500):
        writer.write(body[i : i + 500])
        await asyncio.sleep(0.05)
    head, _ = await read_response(reader)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200 ")
    assert upstream.requests[0][2] == body
    await upstream.stop()


async def test_a_download_the_client_abandons_is_logged_with_what_was_sent(
    raw_server, aiohttp_server, aiohttp_client, caplog
):
    """The access line of a cut download says the status and the bytes that went out, and why it ended."""
    started = asyncio.Event()

    async def endless(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
        for _ in range(200):  # bounded
            writer.write(b"z" * 65536)
            await writer.drain()
            started.set()
            await asyncio.sleep(0.005)

    url = await raw_server(endless)
    _, port = await start_recorded_proxy(aiohttp_server, aiohttp_client, url)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/export HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await asyncio.wait_for(reader.readexactly(300_000), READ_S)
    writer.close()
    caplog.set_level(logging.INFO)
    line = await _access_line(caplog)  # the proxy notices the hang-up within milliseconds
    assert line.fields["status"] == 200
    assert line.fields["bytes"] >= 200_000
    assert line.fields["outcome"] == "client_gone"


async def test_an_endless_run_of_1xx_responses_is_a_502(aiohttp_server, aiohttp_client):
    """An upstream that sends 100 Continue without end cannot hold the request open for good."""
    upstream = Recorder(lambda n: b"HTTP/1.1 100 Continue\r\n\r\n" * 40 + ok())
    _, port = await start_recorded_proxy(aiohttp_server, aiohttp_client, await upstream.start())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head, body = await read_response(reader)
    writer.close()
    assert head.startswith(b"HTTP/1.1 502 ") and b"informational" in body
    await upstream.stop()


@pytest.mark.parametrize("split", ["with the head", "after the head"])
async def test_a_body_arriving_in_pieces_reaches_the_client_whole(raw_server, aiohttp_server, aiohttp_client, split):
    """A Content-Length body whose first bytes come with the head (or right after it) and the rest in
    later pieces arrives byte for byte, and the connection serves the next request."""
    body = bytes(range(256)) * 1024  # 256 KiB
    first = 3000 if split == "with the head" else 0

    async def pieces(reader, writer):
        for _ in range(2):  # the download, then the request after it
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:first])
            await writer.drain()
            for i in range(first, len(body), 50_000):
                await asyncio.sleep(0.01)  # the relay is under way before each piece
                writer.write(body[i : i + 50_000])
                await writer.drain()

    url = await raw_server(pieces)
    _, port = await start_recorded_proxy(aiohttp_server, aiohttp_client, url)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(2):
        writer.write(b"GET /v1/export HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, got = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200 ") and header_fields(head)[b"content-length"] == b"%d" % len(body)
        assert got == body
    writer.close()


@pytest.mark.parametrize("when", ["with the head", "while relayed"])
async def test_an_upstream_that_closes_before_its_content_length_cuts_the_client(
    raw_server, aiohttp_server, aiohttp_client, caplog, when
):
    """A body shorter than its Content-Length is never presented as complete: the client gets the bytes
    that came, then its connection closes; the access line says the upstream cut it."""
    caplog.set_level(logging.INFO)
    sent = 120_000

    async def short(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n"
        if when == "with the head":
            writer.write(head + b"s" * sent)
        else:
            writer.write(head + b"s" * 1000)
            for _ in range(4):
                await asyncio.sleep(0.01)
                writer.write(b"s" * ((sent - 1000) // 4))
        await writer.drain()
        # then the upstream closes (raw_server closes the writer)

    url = await raw_server(short)
    _, port = await start_recorded_proxy(aiohttp_server, aiohttp_client, url)
    head, got = await _head_and_rest(port, b"GET /v1/export HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and header_fields(head)[b"content-length"] == b"1000000"
    assert got == b"s" * sent
    line = await _access_line(caplog)
    assert (line.fields["bytes"], line.fields["outcome"]) == (sent, "upstream_cut")


async def test_a_direct_write_never_goes_past_the_length_the_head_announced(aiohttp_server):
    """Bytes beyond a relayed head's Content-Length, handed to the direct writer, never reach the client:
    what follows on the connection is the next real response, not bytes smuggled after the body."""

    async def answer(request: web.Request) -> web.StreamResponse:
        response = RelayResponse(200, b"OK", b"", wire.length(10))
        await response.prepare(request)
        direct = response.direct_writer()
        assert direct is not None
        write, _ = direct
        write(b"01234")
        write(b"56789HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", answer)
    server = await aiohttp_server(app)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
    answers = [await read_response(reader), await read_response(reader)]
    writer.close()
    assert [(head.split(b"\r\n")[0], body) for head, body in answers] == [(b"HTTP/1.1 200 OK", b"0123456789")] * 2


async def _head_and_rest(port: int, request: bytes) -> tuple[bytes, bytes]:
    """``request`` on a new connection: the response head, and every byte after it until the proxy closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_S)
    rest = await asyncio.wait_for(reader.read(), READ_S)
    writer.close()
    return head, rest


async def _access_line(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    """The one access line logged, once the handler has returned (bounded wait)."""
    for _ in range(100):
        lines = [r for r in caplog.records if r.getMessage() == "request" and r.name.endswith("access")]
        if lines:
            break
        await asyncio.sleep(0.02)
    (line,) = lines
    return line
