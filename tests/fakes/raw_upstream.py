"""A raw HTTP/1.1 upstream that records every request by its own framing, and raw-socket client helpers.

The recorder reads each request the way a strict server would (Content-Length, or chunked with chunk
extensions), so a test sees exactly what the proxy sent; the client helpers read each response off a raw
connection by its own framing, so a test sees exactly what the proxy wrote.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.fakes.servers import keycloak_config, start_idp, start_proxy

READ_S = 5.0  # every read from a socket is bounded by this
LIMIT = 1024  # upstream.replay_limit_bytes for proxies started here: larger bodies stream


class Recorder:
    """A raw upstream: parses each request by its own framing, records (connection number, head, body),
    and answers with ``respond(request_number)``."""

    def __init__(self, respond: Callable[[int], bytes]) -> None:
        self.respond = respond
        self.requests: list[tuple[int, bytes, bytes]] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.sleep(0.01)  # the handlers see their connections close and return

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self._writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = await read_body(reader, head)
                self.requests.append((number, head, body))
                writer.write(self.respond(len(self.requests)))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()


async def read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    """A message body by the framing its head declares (chunked, else Content-Length, else none)."""
    fields = header_fields(head)
    if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return body
            body += chunk[:-2]
    return await reader.readexactly(int(fields.get(b"content-length", b"0")))


def header_fields(head: bytes) -> dict[bytes, bytes]:
    """A head's fields by lower-case name (the last one wins)."""
    out = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


async def start_recorded_proxy(aiohttp_server: Any, aiohttp_client: Any, url: str, **sections: Any) -> tuple[Any, int]:
    """The proxy app in front of ``url`` (replay limit LIMIT), under a test client; (client, port)."""
    idp = await start_idp(aiohttp_server)
    sections["upstream"] = {"replay_limit_bytes": LIMIT, **sections.get("upstream", {})}
    client = await start_proxy(aiohttp_client, keycloak_config(idp, url, **sections))
    return client, client.server.port


async def read_response(
    reader: asyncio.StreamReader, method: bytes = b"GET", timeout_s: float = READ_S
) -> tuple[bytes, bytes]:
    """One response off a raw client connection, read by its own framing: (head, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    fields = header_fields(head)
    status = head.split(b"\r\n", 1)[0].split(b" ")[1]
    if method == b"HEAD" or status in (b"204", b"304") or status.startswith(b"1"):
        return head, b""
    if fields.get(b"transfer-encoding") == b"chunked":
        return head, await asyncio.wait_for(read_body(reader, head), timeout_s)
    if b"content-length" in fields:
        return head, await asyncio.wait_for(reader.readexactly(int(fields[b"content-length"])), timeout_s)
    return head, await asyncio.wait_for(reader.read(), timeout_s)  # delimited by the close


def ok(body: bytes = b"ok") -> bytes:
    """A 200 with ``body`` and its Content-Length."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
