"""The benchmark's measuring sticks and its verdicts (bench/): a reference proxy that answered wrongly,
or a ratio compared the wrong way, would make every figure in the README meaningless."""

from __future__ import annotations

import asyncio
import copy
import os
import threading
import time

from aiohttp import ClientSession, web

from bench import run
from bench.servers import SMALL_BODY, lowlevel_proxy_handler, minimal_proxy_app, start_lean_proxy, upstream_app


async def _recording_upstream(aiohttp_server, tmp_path):  # type: ignore[no-untyped-def]
    seen: list[dict[str, str]] = []

    @web.middleware
    async def record(request: web.Request, handler):  # type: ignore[no-untyped-def]
        seen.append(dict(request.headers))
        return await handler(request)

    app = upstream_app(tmp_path)
    app.middlewares.append(record)
    return await aiohttp_server(app), seen


async def _get(url: str) -> tuple[int, bytes]:
    async with ClientSession() as session:
        async with session.get(url, headers={"Authorization": "Bearer client-must-not-pass"}) as resp:
            return resp.status, await resp.read()


async def test_reference_proxies_forward_with_their_token(aiohttp_server, aiohttp_raw_server, tmp_path):
    upstream, seen = await _recording_upstream(aiohttp_server, tmp_path)
    minimal = await aiohttp_server(minimal_proxy_app(upstream.port))
    lowlevel = await aiohttp_raw_server(lowlevel_proxy_handler(upstream.port))
    lean = await start_lean_proxy(0, upstream.port)
    lean_port = lean.sockets[0].getsockname()[1]
    try:
        for port in (minimal.port, lowlevel.port, lean_port):
            for _ in range(3):  # keep-alive reuse on both sides
                assert await _get(f"http://127.0.0.1:{port}/small") == (200, SMALL_BODY)
    finally:
        lean.close()
        await asyncio.wait_for(lean.wait_closed(), 5)
    assert len(seen) == 9
    assert all(h["Authorization"].startswith("Bearer xxx") for h in seen)
    assert all(h["Host"] == f"127.0.0.1:{upstream.port}" for h in seen)


def _results(sidecar_c64_rps: float, errors: int = 0) -> dict:
    def target(c1_p50: float, c64_rps: float, stream: float | None = None, **extra: float) -> dict:
        return {
            "c1": {"rps": 1e6 / c1_p50, "p50_us": c1_p50, "p99_us": 2 * c1_p50, "errors": 0},
            "c64": {"rps": c64_rps, "p50_us": 1000.0, "p99_us": 2000.0, "errors": 0},
            "stream_mb_s": stream,
            "extra": extra,
        }

    targets = {
        "direct": target(20, 60_000, 1_400),
        "nginx": target(160, 50_000, 1_300, c1_p50_us_same_core=45),
        "sidecar": target(300, sidecar_c64_rps, 1_100, c1_p50_us_same_core=140, rss_growth_mib=12),
        "sidecar_refreshing": target(300, sidecar_c64_rps),
        "aiohttp_alone": target(150, 30_000),
        "minimal_proxy": target(250, 15_000, c1_p50_us_same_core=120),
        "lean_proxy": target(200, 25_000),
    }
    targets["sidecar"]["c64"]["errors"] = errors
    return {"upstream": "nginx", "load_generator": "wrk", "duration_s": 5, "rounds": 3, "targets": targets}


def test_verdicts_compare_each_ratio_the_right_way():
    results = _results(sidecar_c64_rps=16_000)
    r = run.ratios(results)
    assert r["c64_rps_sidecar_over_nginx"] == 0.32
    assert r["added_p50_us_over_direct_c1"] == 280
    assert r["added_p50_us_over_direct_c1_same_core"] == 120
    assert r["added_p50_us_nginx_over_direct_c1_same_core"] == 25
    assert r["stream_sidecar_over_nginx"] == round(1_100 / 1_300, 3)
    table = run.report(results, r)
    assert "| c64_rps_sidecar_over_nginx | 0.32 | >= 0.3 | yes |" in table
    assert "| added_p50_us_over_direct_c1 | 280 | <= 100 | NO |" in table
    assert "| rss_growth_mib_8x100MiB | 12 | <= 16 | yes |" in table
    assert "WARNING" not in table

    slow = _results(sidecar_c64_rps=10_000)
    assert "| c64_rps_sidecar_over_nginx | 0.2 | >= 0.3 | NO |" in run.report(slow, run.ratios(slow))


def test_a_target_that_answered_errors_is_flagged():
    results = _results(sidecar_c64_rps=16_000, errors=7)
    table = run.report(copy.deepcopy(results), run.ratios(results))
    assert "WARNING: sidecar answered 7 requests with an error or none; its figures are void" in table


def test_cpu_seconds_counts_every_thread_of_a_process():
    """A thread's CPU time is the process's too, once the thread has ended as well (the access log's writer
    is a thread of the sidecar)."""
    before = run.cpu_seconds(os.getpid())
    spent = []

    def spin() -> None:
        started = time.thread_time()
        for _ in range(50_000_000):  # bounded: stops at 100 ms of this thread's CPU, whichever comes first
            if time.thread_time() - started >= 0.1:
                break
        spent.append(time.thread_time() - started)

    worker = threading.Thread(target=spin)
    worker.start()
    worker.join(10)
    assert spent and run.cpu_seconds(os.getpid()) - before >= spent[0] - 0.02  # clock ticks are 10 ms
