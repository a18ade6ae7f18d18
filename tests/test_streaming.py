"""Large bodies stream through a real proxy process without its memory growing."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.fakes.servers import start_app, start_idp
from tests.fakes.sidecar import spawn

MiB = 1024 * 1024
DOWNLOAD_BYTES = 300 * MiB
UPLOAD_BYTES = 200 * MiB
MAX_RSS_GROWTH = 64 * MiB
CHUNK = os.urandom(256 * 1024)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def big_upstream() -> web.Application:
    """Serves DOWNLOAD_BYTES at /download; counts and hashes what is POSTed to /upload."""

    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = DOWNLOAD_BYTES
        await response.prepare(request)
        sent = 0
        while sent < DOWNLOAD_BYTES:
            await response.write(CHUNK)
            sent += len(CHUNK)
        await response.write_eof()
        return response

    async def upload(request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"bytes": size, "sha256": digest.hexdigest()})

    app = web.Application()
    app.router.add_get("/download", download)
    app.router.add_post("/upload", upload)
    return app


@pytest.fixture
async def proxy_process(aiohttp_server, tmp_path):
    idp = await start_idp(aiohttp_server)
    upstream = await start_app(aiohttp_server, big_upstream())
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[listen]
port = {port}
[upstream]
url = "{upstream}"
[auth]
provider = "keycloak"
token_url = "{idp.token_url()}"
client_id = "demo-client"
username = "demo"
password = "demo"
[log]
level = "warning"
"""
    )
    proc = await spawn(config, stdout=asyncio.subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 15
            while True:
                try:
                    async with session.get(base + "/-/ready") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "proxy did not become ready"
                await asyncio.sleep(0.05)
        yield proc, base
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)


@pytest.mark.slow(reason="300 MiB through a real proxy process, its memory sampled")
async def test_300mb_download_streams_in_bounded_memory(proxy_process):
    """A 300 MB download arrives whole while the proxy's RSS grows by less than 64 MB."""
    proc, base = proxy_process
    baseline = rss_bytes(proc.pid)
    peak = baseline
    received = 0
    async with aiohttp.ClientSession() as session, session.get(base + "/download") as resp:
        assert resp.status == 200
        assert resp.content_length == DOWNLOAD_BYTES
        async for chunk in resp.content.iter_chunked(1024 * 1024):
            received += len(chunk)
            peak = max(peak, rss_bytes(proc.pid))
    assert received == DOWNLOAD_BYTES
    assert peak - baseline < MAX_RSS_GROWTH, f"RSS grew by {(peak - baseline) / MiB:.1f} MiB"


@pytest.mark.slow(reason="200 MiB through a real proxy process, its memory sampled")
async def test_200mb_upload_streams_in_bounded_memory(proxy_process):
    """A 200 MB upload reaches the upstream intact while the proxy's RSS grows by less than 64 MB."""
    proc, base = proxy_process
    baseline = rss_bytes(proc.pid)
    peak = baseline
    digest = hashlib.sha256()

    async def body():
        nonlocal peak
        sent = 0
        while sent < UPLOAD_BYTES:
            digest.update(CHUNK)
            yield CHUNK
            sent += len(CHUNK)
            peak = max(peak, rss_bytes(proc.pid))

    async with (
        aiohttp.ClientSession() as session,
        session.post(base + "/upload", data=body(), headers={"Content-Length": str(UPLOAD_BYTES)}) as resp,
    ):
        assert resp.status == 200
        result = await resp.json()
    assert result == {"bytes": UPLOAD_BYTES, "sha256": digest.hexdigest()}
    assert peak - baseline < MAX_RSS_GROWTH, f"RSS grew by {(peak - baseline) / MiB:.1f} MiB"
