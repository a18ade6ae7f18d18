"""Processes the benchmark starts: a fallback upstream and a fake identity provider.

    python -m bench.servers upstream PORT DIR   # GET /small (200-byte JSON), GET /big (DIR/big.bin)
    python -m bench.servers idp PORT LIFETIME DELAY

The identity provider is proxy.demo.DemoIdP, slowed by DELAY seconds per token request, so a request
that ever waited for a refresh would show it in the latency percentiles.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from aiohttp import web

from proxy.demo import DemoIdP

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


def main(argv: list[str]) -> None:
    kind, port = argv[0], int(argv[1])
    if kind == "upstream":
        app = upstream_app(Path(argv[2]))
    else:
        app = idp_app(float(argv[2]), float(argv[3]))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main(sys.argv[1:])
