"""WebSocket pass-through (proxy/websocket.py): a real WebSocket server behind the proxy, real clients in front.

The upstream is aiohttp's own WebSocket server (web.WebSocketResponse), which accepts only tokens the demo
identity provider issued; one test uses uvicorn with the ``websockets`` package instead. Clients are
aiohttp's WebSocket client and, where a test needs to see or forge bytes, a raw TCP socket.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from proxy import websocket
from proxy.demo import DemoIdP
from tests.fakes.servers import ServerFactory, keycloak_config, start_idp, start_proxy
from tests.wire.servers import free_port

KEY = base64.b64encode(b"0123456789abcdef").decode()  # a client's Sec-WebSocket-Key (16 bytes)
BIG = 5 * 1024 * 1024  # a message far beyond any socket buffer: backpressure both ways


class WsUpstream:
    """A WebSocket API: echoes, closes on request, sends large messages; checks the token on the handshake."""

    def __init__(self, idp: DemoIdP) -> None:
        self.idp = idp
        self.handshakes: list[dict[str, str]] = []
        self.closed = asyncio.Event()  # a server-side socket saw its client go
        self.reject_next = 0  # answer this many handshakes 401 whatever the token

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/plain", self._plain)
        return app

    async def _plain(self, request: web.Request) -> web.Response:
        return web.Response(text="not a websocket")

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        self.handshakes.append(dict(request.headers))
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.reject_next or self.idp.valid(token) is None:
            self.reject_next = max(0, self.reject_next - 1)
            return web.Response(status=401, text="token rejected", headers={"WWW-Authenticate": "Bearer"})
        ws = web.WebSocketResponse(protocols=("chat.v1",), max_msg_size=0)
        await ws.prepare(request)
        if request.query.get("greet"):
            await ws.send_str("hello")  # the server speaks first, right after its 101
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    if msg.data == "close-me":
                        await ws.close(code=4000, message=b"asked to")
                        break
                    if msg.data.startswith("big:"):
                        await ws.send_bytes(b"x" * int(msg.data[4:]))
                        continue
                    await ws.send_str("echo:" + msg.data)
                elif msg.type is WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
        finally:
            self.closed.set()
        return ws


@pytest.fixture
async def stack(aiohttp_server: ServerFactory, aiohttp_client: Any) -> AsyncIterator[tuple[TestClient, WsUpstream]]:
    idp = await start_idp(aiohttp_server)
    upstream = WsUpstream(idp)
    server = await aiohttp_server(upstream.app())
    config = keycloak_config(
        idp, str(server.make_url("")).rstrip("/"), access={"allow_origins": ["https://ok.example"]}
    )
    client = await start_proxy(aiohttp_client, config)
    yield client, upstream


async def test_echo_through_the_proxy_with_the_token_injected(stack: tuple[TestClient, WsUpstream]) -> None:
    """Text and binary messages go both ways; the upstream saw a live token the client never sent nor saw."""
    client, upstream = stack
    async with client.ws_connect("/ws", protocols=("chat.v1",), headers={"Authorization": "Bearer forged"}) as ws:
        assert ws.protocol == "chat.v1"  # Sec-WebSocket-Protocol came back from the upstream
        await ws.send_str("one")
        assert await ws.receive_str(timeout=5) == "echo:one"
        await ws.send_bytes(b"\x00\x01two")
        assert await ws.receive_bytes(timeout=5) == b"\x00\x01two"
        response_headers = {k.lower(): v for k, v in ws._response.headers.items()}
    assert "authorization" not in response_headers
    assert all("Bearer" not in v for v in response_headers.values())
    (handshake,) = upstream.handshakes
    token = handshake["Authorization"].removeprefix("Bearer ")
    assert token != "forged" and upstream.idp.valid(token) is not None


async def test_large_messages_both_ways(stack: tuple[TestClient, WsUpstream]) -> None:
    """A 5 MiB message up and a 5 MiB message down arrive whole (flow control both ways, nothing lost)."""
    client, _ = stack
    async with client.ws_connect("/ws", max_msg_size=0) as ws:
        payload = os.urandom(BIG)
        await ws.send_bytes(payload)
        assert await ws.receive_bytes(timeout=20) == payload
        await ws.send_str(f"big:{BIG}")
        assert await ws.receive_bytes(timeout=20) == b"x" * BIG


async def test_server_speaking_first_and_closing(stack: tuple[TestClient, WsUpstream]) -> None:
    """A message the server sends right after its 101 reaches the client; its close (code 4000) too."""
    client, _ = stack
    async with client.ws_connect("/ws?greet=1") as ws:
        assert await ws.receive_str(timeout=5) == "hello"
        await ws.send_str("close-me")
        msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.CLOSE and msg.data == 4000
    assert ws.closed


async def test_client_close_reaches_the_upstream(stack: tuple[TestClient, WsUpstream]) -> None:
    """A client that closes (a Close frame, then its connection) ends the upstream's socket too."""
    client, upstream = stack
    ws = await client.ws_connect("/ws")
    await ws.send_str("x")
    assert await ws.receive_str(timeout=5) == "echo:x"
    await ws.close()
    await asyncio.wait_for(upstream.closed.wait(), 5)


async def test_client_vanishing_reaches_the_upstream(stack: tuple[TestClient, WsUpstream]) -> None:
    """A client whose TCP connection just drops (no Close frame) ends the upstream's socket too."""
    client, upstream = stack
    sock, _ = await _raw_handshake(client, "/ws")
    sock.close()
    await asyncio.wait_for(upstream.closed.wait(), 5)


async def test_cross_origin_page_is_refused(stack: tuple[TestClient, WsUpstream]) -> None:
    """A page's WebSocket from an origin not in allow_origins gets 403 JSON and never reaches the upstream;
    an allowed origin gets through."""
    client, upstream = stack
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws", origin="https://evil.example")
    assert refused.value.status == 403
    raw = await _raw_request(client, "/ws", origin="https://evil.example")
    assert raw.startswith(b"HTTP/1.1 403 ")
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["error"] == "forbidden"
    raw = await _raw_request(client, "/ws", extra="Sec-Fetch-Site: cross-site\r\n")
    assert raw.startswith(b"HTTP/1.1 403 ")
    assert upstream.handshakes == []
    async with client.ws_connect("/ws", origin="https://ok.example") as ws:
        await ws.send_str("hi")
        assert await ws.receive_str(timeout=5) == "echo:hi"


async def test_admission_rules_apply(aiohttp_server: ServerFactory, aiohttp_client: Any) -> None:
    """Paths outside allow_paths, a missing API key and a foreign Host are refused before the handshake leaves."""
    idp = await start_idp(aiohttp_server)
    upstream = WsUpstream(idp)
    server = await aiohttp_server(upstream.app())
    config = keycloak_config(
        idp, str(server.make_url("")).rstrip("/"), access={"allow_paths": ["/ws"], "api_key": "k3y-k3y-k3y"}
    )
    client = await start_proxy(aiohttp_client, config)
    assert (await _raw_request(client, "/ws")).startswith(b"HTTP/1.1 401 ")
    assert (await _raw_request(client, "/other", extra="X-Api-Key: k3y-k3y-k3y\r\n")).startswith(b"HTTP/1.1 403 ")
    assert (await _raw_request(client, "/ws", host="evil.example", extra="X-Api-Key: k3y-k3y-k3y\r\n")).startswith(
        b"HTTP/1.1 403 "
    )
    assert upstream.handshakes == []
    async with client.ws_connect("/ws", headers={"X-Api-Key": "k3y-k3y-k3y"}) as ws:
        await ws.send_str("in")
        assert await ws.receive_str(timeout=5) == "echo:in"
    assert "X-Api-Key" not in upstream.handshakes[0]


async def test_401_on_the_handshake_renews_and_retries(stack: tuple[TestClient, WsUpstream]) -> None:
    """An upstream 401 to the handshake renews the token once and retries; the client only sees the socket."""
    client, upstream = stack
    async with client.ws_connect("/ws") as ws:  # a token is held
        await ws.send_str("first")
        assert await ws.receive_str(timeout=5) == "echo:first"
    upstream.idp.revoke_all_access()  # and now dead: the next handshake gets 401
    upstream.handshakes.clear()
    async with client.ws_connect("/ws") as ws:
        await ws.send_str("again")
        assert await ws.receive_str(timeout=5) == "echo:again"
    first, second = upstream.handshakes
    assert first["Authorization"] != second["Authorization"]


async def test_non_101_answer_is_relayed_and_the_connection_serves_on(stack: tuple[TestClient, WsUpstream]) -> None:
    """An upstream that does not switch (a plain 200) is relayed as a normal response; the client's
    connection then serves the next request as HTTP."""
    client, _ = stack
    reader, writer = await _open(client)
    handshake = _handshake_bytes(client, "/plain")
    writer.write(handshake + b"GET /plain HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    first = await _read_response(reader)
    second = await _read_response(reader)
    writer.close()
    assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"not a websocket")
    assert second.startswith(b"HTTP/1.1 200 ") and second.endswith(b"not a websocket")


async def test_upstream_101_without_a_valid_accept_is_a_502(
    raw_server: Any, aiohttp_server: ServerFactory, aiohttp_client: Any
) -> None:
    """A 101 that is not the WebSocket switch asked for (a wrong Sec-WebSocket-Accept) is a 502: the client
    never gets a raw channel to an upstream connection that carries the token."""
    idp = await start_idp(aiohttp_server)

    async def bogus(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: bm90IHRoZSByaWdodCBvbmU=\r\n\r\n"
        )
        await writer.drain()
        await reader.read(100)

    url = await raw_server(bogus)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, url))
    raw = await _raw_request(client, "/ws")
    assert raw.startswith(b"HTTP/1.1 502 ")
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["error"] == "upstream_unreachable"


async def test_handshake_without_a_key_is_refused(stack: tuple[TestClient, WsUpstream]) -> None:
    """A handshake with no usable Sec-WebSocket-Key gets 400 JSON and never leaves the proxy."""
    client, upstream = stack
    raw = await _raw_request(client, "/ws", key="")
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert upstream.handshakes == []


async def test_idle_tunnel_is_closed(aiohttp_server: ServerFactory, aiohttp_client: Any) -> None:
    """No byte either way for upstream.timeout_s closes both sides; the access line says idle_timeout."""
    idp = await start_idp(aiohttp_server)
    upstream = WsUpstream(idp)
    server = await aiohttp_server(upstream.app())
    config = keycloak_config(idp, str(server.make_url("")).rstrip("/"), upstream={"timeout_s": 0.3})
    client = await start_proxy(aiohttp_client, config)
    async with client.ws_connect("/ws", autoping=False, heartbeat=None) as ws:
        msg = await ws.receive(timeout=5)
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR)
    await asyncio.wait_for(upstream.closed.wait(), 5)


async def test_no_descriptor_leaks(stack: tuple[TestClient, WsUpstream]) -> None:
    """Twenty sockets opened and closed, either side first, leave no file descriptor behind."""
    client, _ = stack
    async with client.ws_connect("/ws") as ws:  # the token is held, the identity provider's connection open
        await ws.send_str("warm")
        await ws.receive(timeout=5)
    await asyncio.sleep(0.1)
    before = len(os.listdir("/proc/self/fd"))
    for i in range(20):
        async with client.ws_connect("/ws") as ws:
            await ws.send_str("close-me" if i % 2 else "x")
            await ws.receive(timeout=5)
    for _ in range(100):  # at most 5 s for the last closes to land
        if len(os.listdir("/proc/self/fd")) <= before:
            break
        await asyncio.sleep(0.05)
    assert len(os.listdir("/proc/self/fd")) <= before


def test_aiohttp_internals_still_exist() -> None:
    """What proxy/websocket.py touches in aiohttp is still there (a release that renames one fails here)."""
    from aiohttp import web_protocol, web_request, web_response

    classes = {
        "BaseRequest": web_request.BaseRequest,
        "RequestHandler": web_protocol.RequestHandler,
        "StreamResponse": web_response.StreamResponse,
    }
    for cls_name, names in websocket.AIOHTTP_INTERNALS.items():
        cls = classes[cls_name]
        for name in names:
            assert hasattr(cls, name) or name in getattr(cls, "__slots__", ()) or name in _init_attrs(cls), (
                cls_name,
                name,
            )


def _init_attrs(cls: type) -> set[str]:
    import inspect

    source = inspect.getsource(cls.__init__)  # type: ignore[misc]
    return {part.split("=")[0].strip()[5:] for part in source.splitlines() if part.strip().startswith("self.")}


# --- uvicorn + websockets: a second, independent server implementation -------------------------------------

UVICORN_APP = textwrap.dedent(
    """
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"up"})
            return
        await receive()  # websocket.connect
        headers = dict(scope["headers"])
        if not headers.get(b"authorization", b"").startswith(b"Bearer "):
            await send({"type": "websocket.close", "code": 4401})
            return
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") == "who":
                await send({"type": "websocket.send", "text": headers.get(b"ocp-apim-subscription-key", b"-").decode()})
            elif message.get("text") is not None:
                await send({"type": "websocket.send", "text": "uv:" + message["text"]})
            elif message.get("bytes") is not None:
                await send({"type": "websocket.send", "bytes": message["bytes"]})
    """
)


@pytest.fixture
def uvicorn_ws(tmp_path: Any) -> Any:
    (tmp_path / "wsapp.py").write_text(UVICORN_APP)
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "wsapp:app",
            "--port",
            str(port),
            "--ws",
            "websockets",
            "--log-level",
            "warning",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    os.killpg(process.pid, 15)
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait(5)


async def test_uvicorn_websockets_upstream(uvicorn_ws: str, aiohttp_server: ServerFactory, aiohttp_client: Any) -> None:
    """Against uvicorn with the websockets package: echo, a 1 MiB binary message, the static header arrives."""
    idp = await start_idp(aiohttp_server)
    config = keycloak_config(idp, uvicorn_ws, inject={"headers": {"Ocp-Apim-Subscription-Key": "sub-key-0042"}})
    client = await start_proxy(aiohttp_client, config)
    async with client.ws_connect("/ws", max_msg_size=0, headers={"Ocp-Apim-Subscription-Key": "client-forged"}) as ws:
        await ws.send_str("hi")
        assert await ws.receive_str(timeout=5) == "uv:hi"
        payload = os.urandom(1024 * 1024)
        await ws.send_bytes(payload)
        assert await ws.receive_bytes(timeout=10) == payload
        await ws.send_str("who")
        assert await ws.receive_str(timeout=5) == "sub-key-0042"


# --- helpers -----------------------------------------------------------------------------------------------


def _handshake_bytes(
    client: TestClient, path: str, *, origin: str = "", host: str = "", key: str = KEY, extra: str = ""
) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host or f'127.0.0.1:{client.port}'}",
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
    ]
    if key:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if origin:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


async def _open(client: TestClient) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", client.port)


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await asyncio.wait_for(reader.readexactly(length), 5) if length else b""
    return head + body


async def _raw_request(client: TestClient, path: str, **options: Any) -> bytes:
    reader, writer = await _open(client)
    try:
        writer.write(_handshake_bytes(client, path, **options))
        return await _read_response(reader)
    finally:
        writer.close()


async def _raw_handshake(client: TestClient, path: str) -> tuple[socket.socket, bytes]:
    """A client socket past a 101 (blocking, for a thread), and the bytes that came after the 101's head."""

    def connect() -> tuple[socket.socket, bytes]:
        sock = socket.create_connection(("127.0.0.1", client.port), timeout=5)
        sock.sendall(_handshake_bytes(client, path))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 101 "), head
        return sock, head.partition(b"\r\n\r\n")[2]

    return await asyncio.to_thread(connect)


# --- backpressure: raw bytes on both sides, so nothing but the proxy's flow control can hold them back -------

FLOOD = 48 * 1024 * 1024  # beyond every socket buffer on the way (loopback: a few MiB each)


async def _raw_ws_upstream(raw_server: Any, after_switch: Any) -> str:
    """A raw upstream that answers the handshake with a correct 101, then runs ``after_switch``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.partition(b":")[2].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + websocket.WEBSOCKET_GUID).digest())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: %s\r\n\r\n" % accept
        )
        await after_switch(reader, writer)

    return await raw_server(handler)


async def test_a_client_that_does_not_read_holds_the_upstream_back(
    raw_server: Any, aiohttp_server: ServerFactory, aiohttp_client: Any
) -> None:
    """48 MiB from the upstream to a client that reads nothing: most of it stays with the upstream (the proxy
    does not buffer it); once the client reads, all of it arrives."""
    idp = await start_idp(aiohttp_server)
    upstream_writer: list[asyncio.StreamWriter] = []
    sent = asyncio.Event()

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_writer.append(writer)
        writer.write(b"d" * FLOOD)
        await writer.drain()
        sent.set()
        await reader.read(1)  # until the proxy closes

    client = await start_proxy(aiohttp_client, keycloak_config(idp, await _raw_ws_upstream(raw_server, flood)))
    sock, early = await _raw_handshake(client, "/ws")
    try:
        await asyncio.sleep(0.5)
        assert not sent.is_set()
        assert upstream_writer[0].transport.get_write_buffer_size() > 8 * 1024 * 1024

        def read_all() -> int:
            got = len(early)
            deadline = time.monotonic() + 20
            while got < FLOOD and time.monotonic() < deadline:
                chunk = sock.recv(1 << 20)
                assert chunk
                got += len(chunk)
            return got

        assert await asyncio.to_thread(read_all) == FLOOD
        await asyncio.wait_for(sent.wait(), 5)
    finally:
        sock.close()


async def test_an_upstream_that_does_not_read_holds_the_client_back(
    raw_server: Any, aiohttp_server: ServerFactory, aiohttp_client: Any
) -> None:
    """48 MiB from a client to an upstream that reads nothing: the client's sending stalls (the proxy stops
    reading it) instead of the proxy buffering the lot; once the upstream reads, all of it arrives."""
    idp = await start_idp(aiohttp_server)
    start_reading = asyncio.Event()
    received: list[int] = []

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await start_reading.wait()
        got = 0
        while got < FLOOD:
            chunk = await reader.read(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        received.append(got)

    client = await start_proxy(aiohttp_client, keycloak_config(idp, await _raw_ws_upstream(raw_server, sink)))
    sock, _ = await _raw_handshake(client, "/ws")
    try:
        data = memoryview(b"u" * FLOOD)

        def send(limit_s: float) -> int:
            sock.settimeout(limit_s)
            sent = 0
            try:
                while sent < FLOOD:
                    sent += sock.send(data[sent : sent + (1 << 20)])
            except TimeoutError:
                pass
            return sent

        stalled_at = await asyncio.to_thread(send, 0.5)
        assert stalled_at < FLOOD - 8 * 1024 * 1024
        start_reading.set()
        rest = await asyncio.to_thread(lambda: stalled_at + _send_rest(sock, data, stalled_at))
        assert rest == FLOOD
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.05)
        assert received == [FLOOD]
    finally:
        sock.close()


def _send_rest(sock: socket.socket, data: memoryview, offset: int) -> int:
    sock.settimeout(10)
    sock.sendall(data[offset:])
    return len(data) - offset
