"""Shutdown keeps its word, in a real process: the drain ends within listen.shutdown_grace_s, a download
still running is cut at that deadline (not before), and the logout still happens."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.fakes.servers import start_app, start_idp
from tests.fakes.sidecar import PASSWORD, Sidecar, wait_ready, write_config

# slow: a real process and a real 1.5 s shutdown grace
pytestmark = pytest.mark.slow

GRACE_S = 1.5
# What a clean exit may take beyond the grace: cancelling the cut request, the logout at the (local) fake
# provider, closing the pools, the interpreter's exit. aiohttp's own drain took a second grace on top.
EXIT_SLACK_S = 1.0
# How early or late the cut may come, measured on the test's side (signal delivery, socket buffers).
CUT_SLACK_S = 0.5


async def _endless_download(aiohttp_server: Any) -> tuple[str, asyncio.Event]:
    """An upstream whose /streaming sends 1 KiB every 50 ms for up to 30 s (a download still moving when
    the grace ends), and whose /stuck sends 1 KiB and then nothing for 30 s."""
    started = asyncio.Event()

    async def download(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        started.set()
        for _ in range(600):
            await resp.write(b"x" * 1024)
            await asyncio.sleep(0.05 if request.match_info["kind"] == "streaming" else 30)
        return resp

    app = web.Application()
    app.router.add_get("/{kind:streaming|stuck}", download)
    return await start_app(aiohttp_server, app), started


@pytest.mark.parametrize("kind", ["streaming", "stuck"])
async def test_sigterm_during_a_download_cuts_it_at_the_grace_deadline_and_still_logs_out(
    aiohttp_server, tmp_path, kind
):
    """SIGTERM during a download that never ends, still streaming or stuck: a streaming one keeps
    delivering bytes until the grace is over; either is cut then (not before, not a second grace later),
    the session is ended at the provider (revoke_on_shutdown), and the process exits 0 soon after the grace."""
    idp = await start_idp(aiohttp_server, users={"demo": PASSWORD})
    upstream, started = await _endless_download(aiohttp_server)
    sidecar = await Sidecar.start(
        write_config(tmp_path, idp.token_url(), upstream, grace=GRACE_S, revoke_on_shutdown=True)
    )
    loop = asyncio.get_running_loop()
    received_after: list[float] = []  # seconds after SIGTERM at which bytes arrived
    try:
        url = await sidecar.url()
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, url)
            async with session.get(url + "/" + kind) as resp:
                assert resp.status == 200
                await asyncio.wait_for(started.wait(), 10)
                await resp.content.readany()
                sent_at = loop.time()
                sidecar.proc.send_signal(signal.SIGTERM)
                cut = False
                try:
                    for _ in range(10_000):  # bounded: 1 KiB each 50 ms for at most 30 s
                        chunk = await asyncio.wait_for(resp.content.readany(), 10)
                        if not chunk:
                            break
                        received_after.append(loop.time() - sent_at)
                except aiohttp.ClientPayloadError:
                    cut = True
                cut_after = loop.time() - sent_at
            await asyncio.wait_for(sidecar.proc.wait(), 15)
            exited_after = loop.time() - sent_at
        assert await sidecar.exit_code() == 0
    finally:
        await sidecar.kill()
    assert cut, "the download ended as if complete; it should have been cut"
    if kind == "streaming":
        assert received_after and received_after[-1] > GRACE_S - CUT_SLACK_S, "the download was cut before the grace"
    else:
        assert received_after == []
    assert GRACE_S - CUT_SLACK_S < cut_after < GRACE_S + CUT_SLACK_S
    assert exited_after < GRACE_S + EXIT_SLACK_S, f"exit {exited_after:.2f}s after SIGTERM, grace {GRACE_S}s"
    assert idp.hits["logout"] == 1
    assert [e["how"] for e in sidecar.events("token.session_ended")] == ["logout"]
    assert sidecar.events("sidecar.stopped")
    assert PASSWORD not in "\n".join(sidecar.lines)
