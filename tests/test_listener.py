"""The listener as cli.serve() runs it: listen.max_connections bounds the open client connections."""

from __future__ import annotations

import asyncio
import json

from proxy.cli import serve
from tests.fakes.servers import keycloak_config, start_api, start_idp

HEALTHY = b"GET /-/healthy HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


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


async def test_connections_over_the_limit_get_503_and_the_limit_frees_up(aiohttp_server):
    idp = await start_idp(aiohttp_server)
    _, api_url = await start_api(aiohttp_server, idp)
    config = keycloak_config(idp, api_url, listen={"port": 0, "max_connections": 2})
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    server = asyncio.ensure_future(serve(config, on_listening=listening.set_result, stop=stop))
    try:
        port = int((await asyncio.wait_for(listening, 10)).rsplit(":", 1)[1])
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
    finally:
        stop.set()
        assert await asyncio.wait_for(server, 15) == 0
