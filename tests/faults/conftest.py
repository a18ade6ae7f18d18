"""Shared pieces of the fault-injection suite: misbehaving servers, raw sockets, log lookups.

Every server here listens on 127.0.0.1 and is closed when its test ends; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable, Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.app import TOKENS
from proxy.tokens import TokenManager

RAW_READ_TIMEOUT_S = 5.0

# Fake credentials: distinctive, so a test can prove they never show up anywhere.
PASSWORD = "pw-Hunter2-never-logged"
CLIENT_SECRET = "cs-9f8e7d6c-never-logged"
API_KEY = "ak-5b4a3928-never-logged"


def manager(client: TestClient) -> TokenManager:
    """The proxy's token manager, to read its state (never to drive it)."""
    return client.server.app[TOKENS]


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    """The captured log records of event ``name`` (their structured fields are in ``record.fields``)."""
    return [r for r in caplog.records if r.getMessage() == name]


async def wait_for(condition: Callable[[], bool], within: float = 5.0, step: float = 0.02) -> None:
    """Poll ``condition`` until true; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(step)


async def raw_request(port: int, data: bytes, within: float = RAW_READ_TIMEOUT_S) -> bytes:
    """Send ``data`` as-is on a fresh connection; everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(1 << 20), within)
    finally:
        writer.close()


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP response."""
    first = response.split(b"\r\n", 1)[0].split()
    assert len(first) >= 2 and first[0].startswith(b"HTTP/"), f"not an HTTP response: {response[:80]!r}"
    return int(first[1])


def body_of(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


@pytest.fixture
def dead_url() -> Iterator[str]:
    """An http URL on 127.0.0.1 whose port is bound but not listening: connections are refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    """Read one request's head (up to the blank line), bounded in time."""
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_READ_TIMEOUT_S)


def app_with(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]], path: str = "/{tail:.*}"
) -> web.Application:
    """A one-route aiohttp app answering every method on ``path`` with ``handler``."""
    app = web.Application()
    app.router.add_route("*", path, handler)
    return app


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Self-signed certificates made with the openssl CLI: one for 127.0.0.1, one for another name.

    Not skipped when openssl is missing: the TLS checks are part of what this suite must show.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command is needed to make test certificates (and `cryptography` is not installed)")
    folder = tmp_path_factory.mktemp("tls")
    files: dict[str, str] = {}
    for name, san in (("loopback", "IP:127.0.0.1,DNS:localhost"), ("other", "DNS:other.example")):
        cert, key = folder / f"{name}.pem", folder / f"{name}.key"
        subprocess.run(
            [
                openssl,
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-subj",
                f"/CN={name} test",
                "-addext",
                f"subjectAltName={san}",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        files[name], files[f"{name}_key"] = str(cert), str(key)
    return files


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
