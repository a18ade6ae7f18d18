"""Processes the benchmark starts: a fallback upstream, a fake identity provider, two reference proxies.

    python -m bench.servers upstream PORT DIR   # GET /small (200-byte JSON), GET /big (DIR/big.bin)
    python -m bench.servers idp PORT LIFETIME DELAY
    python -m bench.servers minimal_proxy PORT UPSTREAM_PORT
    python -m bench.servers lean_proxy PORT UPSTREAM_PORT

The identity provider is proxy.demo.DemoIdP, slowed by DELAY seconds per token request, so a request
that ever waited for a refresh would show it in the latency percentiles.

The two reference proxies are measuring sticks, not products: they forward GETs without a body through
the sidecar's own upstream pool (proxy/upstream.py) with a fixed token, and do nothing else (no checks,
no token lifecycle, no metrics, no logs). ``minimal_proxy`` is the least a proxy built on aiohttp's
server can do per request; ``lean_proxy`` does the same on bare asyncio transports with httptools'
request parser, to show what leaving aiohttp's server would buy.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import httptools
from aiohttp import web
from multidict import CIMultiDict

from proxy.demo import DemoIdP
from proxy.upstream import Pool

_PREFIX = b'{"status":"ok","items":[1,2,3],"note":"'
SMALL_BODY = _PREFIX + b"x" * (200 - len(_PREFIX) - 2) + b'"}'  # 200 bytes of JSON


def upstream_app(directory: Path) -> web.Application:
    big = directory / "big.bin"

    async def small(request: web.Request) -> web.Response:
        return web.Response(body=SMALL_BODY, content_type="application/json")

    async def large(request: web.Request) -> web.FileResponse:
        return web.FileResponse(big)

    app = web.Application()
    app.router.add_get("/small", small)
    app.router.add_get("/big", large)
    return app


def idp_app(lifetime_s: float, delay_s: float) -> web.Application:
    idp = DemoIdP(access_lifetime_s=lifetime_s, refresh_lifetime_s=max(lifetime_s * 10, 600))

    @web.middleware
    async def slow(request: web.Request, handler):  # type: ignore[no-untyped-def]
        if request.path.endswith("/token"):
            await asyncio.sleep(delay_s)
        return await handler(request)

    app = idp.app()
    app.middlewares.append(slow)
    return app


# --- reference proxies ----------------------------------------------------------------------------

_TOKEN_LINE = b"Authorization: Bearer " + b"x" * 350 + b"\r\n\r\n"  # a Keycloak access token's size
_DROP_REQUEST = frozenset({b"host", b"connection", b"authorization"})
_DROP_RESPONSE = frozenset({b"connection", b"content-length", b"transfer-encoding", b"keep-alive"})


def _pool(upstream_port: int) -> Pool:
    return Pool(f"http://127.0.0.1:{upstream_port}", limit=100, connect_timeout_s=5, timeout_s=30, ssl_context=None)


def _head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], host: bytes) -> bytes:
    parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    for name, value in headers:
        if name.lower() not in _DROP_REQUEST:
            parts += (name, b": ", value, b"\r\n")
    parts.append(_TOKEN_LINE)
    return b"".join(parts)


async def _whole_body(exchange) -> bytes:  # type: ignore[no-untyped-def]
    chunks = []
    while chunk := await exchange.read():
        chunks.append(chunk)
    return b"".join(chunks)


def lowlevel_proxy_handler(upstream_port: int) -> Callable[[web.BaseRequest], Awaitable[web.Response]]:
    """The least a proxy on aiohttp's server and the sidecar's pool can do: forward with a fixed token, relay
    the answer whole. On the low-level server (``web.Server``: no Application, router or middlewares) it
    is the floor the sidecar is measured against; ``minimal_proxy_app`` serves it as an Application."""
    pool, host = _pool(upstream_port), b"127.0.0.1:%d" % upstream_port

    async def forward(request: web.BaseRequest) -> web.Response:
        method = request.method
        head = _head(method.encode(), request.raw_path.encode(), list(request.raw_headers), host)
        exchange = await pool.request(method, head, None)
        body = await _whole_body(exchange)
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in exchange.headers:
            if name.lower() not in _DROP_RESPONSE:
                headers.add(name.decode("latin-1"), value.decode("latin-1"))
        return web.Response(status=exchange.status, headers=headers, body=body)

    return forward


def minimal_proxy_app(upstream_port: int) -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", lowlevel_proxy_handler(upstream_port))
    return app


async def lowlevel_proxy(port: int, upstream_port: int) -> None:
    runner = web.ServerRunner(web.Server(lowlevel_proxy_handler(upstream_port)), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


class _LeanProxy(asyncio.Protocol):
    """One client connection: httptools parses requests; each is forwarded as it completes."""

    def __init__(self, pool: Pool, host: bytes) -> None:
        self._pool, self._host = pool, host
        self._parser = httptools.HttpRequestParser(self)
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def on_url(self, url: bytes) -> None:
        self._target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_message_complete(self) -> None:
        head = _head(self._parser.get_method(), self._target, self._headers, self._host)
        self._target, self._headers = b"", []
        asyncio.get_running_loop().create_task(self._forward(self._parser.get_method().decode(), head))

    async def _forward(self, method: str, head: bytes) -> None:
        exchange = await self._pool.request(method, head, None)
        body = await _whole_body(exchange)
        out = [b"HTTP/1.1 %d %s\r\n" % (exchange.status, exchange.reason.encode("latin-1"))]
        for name, value in exchange.headers:
            if name.lower() not in _DROP_RESPONSE:
                out += (name, b": ", value, b"\r\n")
        out += (b"Content-Length: %d\r\n\r\n" % len(body), body)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(out))


async def start_lean_proxy(port: int, upstream_port: int) -> asyncio.Server:
    pool, host = _pool(upstream_port), b"127.0.0.1:%d" % upstream_port
    return await asyncio.get_running_loop().create_server(lambda: _LeanProxy(pool, host), "127.0.0.1", port)


async def lean_proxy(port: int, upstream_port: int) -> None:
    async with await start_lean_proxy(port, upstream_port) as server:
        await server.serve_forever()


def main(argv: list[str]) -> None:
    kind, port = argv[0], int(argv[1])
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if kind in ("lean_proxy", "lowlevel_proxy"):
        asyncio.run((lean_proxy if kind == "lean_proxy" else lowlevel_proxy)(port, int(argv[2])))
        return
    if kind == "upstream":
        app = upstream_app(Path(argv[2]))
    elif kind == "minimal_proxy":
        app = minimal_proxy_app(int(argv[2]))
    else:
        app = idp_app(float(argv[2]), float(argv[3]))
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main(sys.argv[1:])
