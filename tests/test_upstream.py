"""The upstream connection pool, against raw servers that answer exactly the bytes a test chooses."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from proxy.errors import UpstreamTimeout, UpstreamUnreachable
from proxy.upstream import BodyInterrupted, Exchange, Pool
from tests.fakes.clock import FakeClock
from tests.faults.conftest import wait_for

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
GET = b"GET /x HTTP/1.1\r\nHost: upstream\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


class RawServer:
    """A TCP server on 127.0.0.1 whose handler gets (reader, writer, connection number)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        return head


def pool_for(server: RawServer, limit: int = 4, timeout_s: float = 5.0, **options: Any) -> Pool:
    return Pool(server.url, limit=limit, connect_timeout_s=2.0, timeout_s=timeout_s, ssl_context=None, **options)


async def read_all(exchange: Exchange) -> bytes:
    parts = []
    while chunk := await exchange.read():
        parts.append(chunk)
    return b"".join(parts)


def answering(*responses: bytes, close_after: bool = False) -> Callable[[RawServer], Handler]:
    """A handler that answers each request on a connection with the next response."""

    def make(server: RawServer) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            for response in responses:
                await server.read_request(reader)
                writer.write(response)
                await writer.drain()
                if close_after:
                    return
            await reader.read()  # keep the connection until the client closes it

        return handler

    return make


async def serve(factory: Callable[[RawServer], Handler]) -> RawServer:
    server = RawServer(None)  # type: ignore[arg-type]
    server.handler = factory(server)
    return await server.__aenter__()


async def test_keep_alive_connection_is_reused():
    server = await serve(answering(OK, OK, OK))
    pool = pool_for(server)
    for _ in range(3):
        exchange = await pool.request("GET", GET, None)
        assert exchange.status == 200
        assert await read_all(exchange) == b"hello"
    assert server.connections == 1
    await pool.close()
    await server.__aexit__()


async def test_connection_close_is_not_reused():
    close = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    server = await serve(answering(close, close_after=True))
    pool = pool_for(server)
    for _ in range(2):
        exchange = await pool.request("GET", GET, None)
        assert await read_all(exchange) == b"hello"
    assert server.connections == 2
    await pool.close()
    await server.__aexit__()


async def test_head_response_has_no_body_and_its_connection_is_reused_only_without_a_length():
    """A HEAD's answer has no body whatever its Content-Length says. A connection is reused after one
    that announces none; after one that announces a body it is not (servers exist that send that body
    anyway, and late bytes would become the next request's response)."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    bare = b"HTTP/1.1 200 OK\r\nX-Size: 1000\r\n\r\n"
    server = await serve(answering(bare, OK, head, OK))
    pool = pool_for(server)
    exchange = await pool.request("HEAD", b"HEAD /x HTTP/1.1\r\nHost: upstream\r\n\r\n", None)
    assert (exchange.status, await read_all(exchange)) == (200, b"")
    exchange = await pool.request("GET", GET, None)
    assert await read_all(exchange) == b"hello"
    assert server.connections == 1
    exchange = await pool.request("HEAD", b"HEAD /x HTTP/1.1\r\nHost: upstream\r\n\r\n", None)
    assert exchange.status == 200
    assert (b"Content-Length", b"1000") in exchange.headers
    assert await read_all(exchange) == b""
    assert server.connections == 1
    server.handler = answering(OK)(server)
    exchange = await pool.request("GET", GET, None)
    assert await read_all(exchange) == b"hello"
    assert server.connections == 2
    await pool.close()
    await server.__aexit__()


async def test_informational_responses_are_skipped():
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    server = await serve(answering(early + b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-Final: 1\r\n\r\nok"))
    pool = pool_for(server)
    exchange = await pool.request("GET", GET, None)
    assert exchange.status == 201
    assert exchange.reason == "Created"
    assert [name for name, _ in exchange.headers] == [b"Content-Length", b"X-Final"]
    assert await read_all(exchange) == b"ok"
    await pool.close()
    await server.__aexit__()


async def test_chunked_and_until_close_bodies_arrive_whole():
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    server = await serve(answering(chunked))
    pool = pool_for(server)
    assert await read_all(await pool.request("GET", GET, None)) == b"hello world"
    await pool.close()
    await server.__aexit__()

    until_close = b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 100_000
    server = await serve(answering(until_close, close_after=True))
    pool = pool_for(server)
    assert await read_all(await pool.request("GET", GET, None)) == b"x" * 100_000
    await pool.close()
    await server.__aexit__()


async def test_a_reused_connection_closed_by_the_upstream_is_retried_on_a_new_one():
    """Servers drop idle keep-alive connections; the next request must not fail because of it."""
    server = await serve(answering(OK, close_after=True))  # closes after one answer, no Connection: close
    pool = pool_for(server)
    assert await read_all(await pool.request("GET", GET, None)) == b"hello"
    await asyncio.sleep(0.05)  # the close arrives while the connection sits in the pool
    assert await read_all(await pool.request("GET", GET, None)) == b"hello"
    assert server.connections == 2
    await pool.close()
    await server.__aexit__()


async def test_a_post_is_not_sent_on_a_connection_the_upstream_said_it_would_have_closed():
    """Keep-Alive: timeout=N is the upstream's promise to close an idle connection after N s. A request
    sent just as it does is lost, and a POST is never sent twice: past N - 1 s the pool opens a new
    connection. The upstream here keeps the socket open but drops what arrives after its timeout, the way
    a close racing the request looks to the proxy. Pool and upstream share one fake clock: the waits are
    the clock moved, not slept."""
    post = b"POST /x HTTP/1.1\r\nHost: upstream\r\nContent-Length: 0\r\n\r\n"
    hinted = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=2, max=100\r\nContent-Length: 5\r\n\r\nhello"
    clock = FakeClock()

    def make(server: RawServer) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            answered_at = None
            while True:
                await server.read_request(reader)
                if answered_at is not None and clock() - answered_at > 2.0:
                    return  # "closed" for idleness: the request is dropped unanswered
                writer.write(hinted)
                await writer.drain()
                answered_at = clock()

        return handler

    server = await serve(make)
    pool = pool_for(server, clock=clock)
    assert await read_all(await pool.request("GET", GET, None)) == b"hello"
    clock.now += 0.1
    assert await read_all(await pool.request("GET", GET, None)) == b"hello"  # well within: reused
    assert server.connections == 1
    clock.now += 2.1  # past the upstream's timeout, well within the pool's own 4 s
    exchange = await pool.request("POST", post, None)
    assert (exchange.status, await read_all(exchange)) == (200, b"hello")
    assert server.connections == 2
    await pool.close()
    await server.__aexit__()


async def test_pool_limit_makes_requests_wait_and_times_them_out():
    server = await serve(answering(OK, OK, OK))
    pool = pool_for(server, limit=1, timeout_s=10)
    held = await pool.request("GET", GET, None)  # its body is not read yet: the connection stays busy
    waiting = asyncio.ensure_future(pool.request("GET", GET, None))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    assert await read_all(held) == b"hello"  # read to the end: the connection goes back to the pool
    assert await read_all(await waiting) == b"hello"
    assert server.connections == 1
    await pool.close()

    pool = pool_for(server, limit=1, timeout_s=0.3)
    held = await pool.request("GET", GET, None)
    with pytest.raises(UpstreamTimeout, match="pool_size"):
        await pool.request("GET", GET, None)
    held.release()
    await pool.close()
    await server.__aexit__()


async def test_malformed_response_is_an_unreachable_upstream():
    server = await serve(answering(b"HTTP/1.1 2OO NOPE\r\n\r\n"))
    pool = pool_for(server)
    with pytest.raises(UpstreamUnreachable, match="malformed"):
        await pool.request("GET", GET, None)
    await pool.close()
    await server.__aexit__()


async def test_deadline_mid_body_interrupts_the_body():
    async def stall(reader, writer, n):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(5)

    server = await serve(lambda s: stall)
    pool = pool_for(server, timeout_s=0.3)
    exchange = await pool.request("GET", GET, None)
    assert await exchange.read() == b"partial"
    with pytest.raises(BodyInterrupted):
        await asyncio.wait_for(exchange.read(), 3)
    exchange.release()
    await pool.close()
    await server.__aexit__()


async def test_no_answer_within_the_deadline_is_a_timeout():
    async def silent(reader, writer, n):
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(5)

    server = await serve(lambda s: silent)
    pool = pool_for(server, timeout_s=0.2)
    with pytest.raises(UpstreamTimeout):
        await asyncio.wait_for(pool.request("GET", GET, None), 3)
    await pool.close()
    await server.__aexit__()


async def test_connection_refused_names_the_reason():
    server = await serve(answering(OK))
    url = server.url
    await server.__aexit__()
    await asyncio.sleep(0.05)
    pool = Pool(url, limit=2, connect_timeout_s=1.0, timeout_s=2.0, ssl_context=None)
    with pytest.raises(UpstreamUnreachable, match="refused"):
        await pool.request("GET", GET, None)
    await pool.close()


async def test_host_header_omits_the_default_port():
    def host(url: str) -> tuple[bytes, bytes]:
        return Pool(url, limit=1, connect_timeout_s=1, timeout_s=1, ssl_context=None).host_header

    assert host("https://api.example:443/v1") == (b"Host", b"api.example")
    assert host("http://127.0.0.1:8080") == (b"Host", b"127.0.0.1:8080")


async def test_content_length_body_in_many_segments_then_the_connection_is_reused():
    """The body after the head bypasses the parser; the next response on the connection still parses."""
    body = bytes(range(256)) * 4096  # 1 MiB

    async def segmented(reader, writer, n):
        for _ in range(2):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:1000])
            await writer.drain()
            for i in range(1000, len(body), 300_000):
                await asyncio.sleep(0.01)
                writer.write(body[i : i + 300_000])
                await writer.drain()
        await reader.read()

    server = await serve(lambda s: segmented)
    pool = pool_for(server)
    for _ in range(2):
        exchange = await pool.request("GET", GET, None)
        assert await read_all(exchange) == body
    assert server.connections == 1
    await pool.close()
    await server.__aexit__()


async def test_bytes_beyond_content_length_are_dropped_and_the_connection_is_not_reused():
    async def overlong(reader, writer, n):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"0123456789EXTRA-BYTES")
        await writer.drain()
        await reader.read()

    server = await serve(lambda s: overlong)
    pool = pool_for(server)
    exchange = await pool.request("GET", GET, None)
    assert await read_all(exchange) == b"0123456789"
    await pool.request("GET", GET, None)  # a new connection: the old one carried stray bytes
    assert server.connections == 2
    await pool.close()
    await server.__aexit__()


async def test_an_oversized_response_head_is_refused():
    """httptools has no limit of its own: 300 header lines from the upstream are a 502, not memory."""
    many = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 10) for i in range(300))
    server = await serve(answering(b"HTTP/1.1 200 OK\r\n" + many + b"Content-Length: 2\r\n\r\nok"))
    pool = pool_for(server)
    with pytest.raises(UpstreamUnreachable, match="header lines"):
        await pool.request("GET", GET, None)
    await pool.close()
    await server.__aexit__()


async def test_a_cancelled_waiter_passes_its_wake_up_on():
    """pool_size = 1: when the only connection comes back, the first waiter is woken; if its client hung
    up in the meantime (its task is cancelled before it runs), the next waiter gets the connection instead
    of waiting out its deadline (timeout_s, 1 s here) beside an idle one."""
    answer_first = asyncio.Event()

    def held_then_answering(server: RawServer) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await server.read_request(reader)
            await answer_first.wait()  # the only connection stays busy until the waiters queue
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
            while True:
                await server.read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")

        return handler

    server = await serve(held_then_answering)
    pool = pool_for(server, limit=1, timeout_s=1.0)
    try:
        holder = asyncio.ensure_future(pool.request("GET", GET, None))
        await wait_for(lambda: len(server.requests) == 1, within=2.0, step=0.005)
        first = asyncio.ensure_future(pool.request("GET", GET, None))
        second = asyncio.ensure_future(pool.request("GET", GET, None))
        await wait_for(lambda: pool.waiting == 2, within=2.0, step=0.005)  # both wait
        answer_first.set()
        assert await read_all(await holder) == b"first"  # its last read puts the connection back: wakes the first
        first.cancel()  # whose client hangs up before it runs
        assert await read_all(await second) == b"next"
        assert server.connections == 1  # the second took the connection the first was woken for
        with pytest.raises(asyncio.CancelledError):
            await first
    finally:
        await pool.close()
        await server.__aexit__()


async def test_a_released_response_is_never_read_from_its_connection_again():
    """Once released, an exchange reads nothing more from its connection, which may already carry the
    next exchange: its end again if its body had ended, else a failure (never a body cut short that
    looks complete)."""
    long = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 10
    server = await serve(answering(OK, OK, long))
    pool = pool_for(server, limit=1)
    first = await pool.request("GET", GET, None)
    assert await read_all(first) == b"hello"
    second = await pool.request("GET", GET, None)  # on the connection the first one left
    assert await first.read() == b""  # not the second one's body
    assert await read_all(second) == b"hello"
    third = await pool.request("GET", GET, None)
    third.release()  # unread: its connection is closed
    with pytest.raises(BodyInterrupted, match="released before its end"):
        await third.read()
    with pytest.raises(BodyInterrupted, match="released before its end"):
        await third.pipe(lambda data: True, lambda: asyncio.sleep(0))
    assert server.connections == 1
    await pool.close()
    await server.__aexit__()
