"""The fleet benchmark: N sidecar processes on one credential set, with and without a shared Redis store.

    python -m bench.fleet [--processes 4] [--duration 60] [--lifetime 3] [--margin 60] [--json bench/fleet-run.json]

Starts, all on 127.0.0.1: a real ``redis-server``; the demo identity provider (proxy.demo.DemoIdP) issuing
``--lifetime``-second access tokens and rotating refresh tokens with reuse detection (a refresh token
presented twice is refused, as Keycloak's "Revoke Refresh Token" does); the demo API, which accepts only
live tokens; and ``--processes`` times ``python -m proxy``. Each process gets a steady request every
20 ms for ``--duration`` seconds, first with ``store.kind = "memory"`` (islands), then with one Redis.

It prints, for each run: token requests in total and per token lifetime (for the whole fleet), the same
against what one process alone makes (its renewal interval is the lifetime less ``auth.refresh_margin_s``,
capped at half the lifetime: 1.5 s for 3 s tokens with the default margin, so one process alone makes two
token requests per lifetime), logins, refresh tokens presented twice, and client errors (any answer but
200). Logins include the first one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.demo import DemoAPI, DemoIdP
from tests.fakes.redis_server import RedisServer  # the tests' real redis-server, started and stopped by pid

STORE_KEY_BYTES = 32
PASSWORD = "bench-fleet-password"
REQUEST_EVERY_S = 0.02


@dataclass
class FleetRun:
    store: str
    processes: int
    duration_s: float
    lifetime_s: float
    token_requests: int
    per_lifetime: float
    vs_one_process: float
    logins: int
    refreshes: int
    refresh_tokens_presented_twice: int
    requests: int
    client_errors: int


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def renewal_interval(lifetime: float, margin: float) -> float:
    """How often one process renews a token of ``lifetime`` (state.Token.refresh_at's rule)."""
    from proxy.state import EXPIRY_SKEW_S, MAX_MARGIN_FRACTION, MIN_MARGIN_SKEWS

    skew = min(EXPIRY_SKEW_S, lifetime * 0.1)
    return lifetime - min(max(margin, MIN_MARGIN_SKEWS * skew), lifetime * MAX_MARGIN_FRACTION)


def _config(workdir: Path, idp: DemoIdP, api_url: str, store: str, redis_url: str, key: str, margin: float) -> Path:
    (workdir / "password").write_text(PASSWORD)
    lines = [
        "[listen]",
        "port = 0",
        "[upstream]",
        f'url = "{api_url}"',
        "[auth]",
        'provider = "keycloak"',
        f'token_url = "{idp.token_url()}"',
        'client_id = "demo-client"',
        'username = "demo"',
        f'password_file = "{workdir / "password"}"',
        f"refresh_margin_s = {margin}",
        "[log]",
        'format = "json"',
        "access_log = false",
    ]
    if store == "redis":
        lines += ["[store]", 'kind = "redis"', f'url = "{redis_url}"', f'key = "{key}"']
    path = workdir / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def _start_sidecar(config: Path) -> tuple[asyncio.subprocess.Process, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OAUTH_SIDECAR_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--config", str(config), stderr=asyncio.subprocess.PIPE, env=env
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = await asyncio.wait_for(proc.stderr.readline(), 20)
        if not line:
            break
        record = json.loads(line) if line.startswith(b"{") else {}
        if record.get("event") == "sidecar.listening":
            asyncio.get_running_loop().create_task(_drain(proc.stderr))
            return proc, str(record["url"])
    raise RuntimeError("a sidecar did not start")


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def run_fleet(
    store: str, processes: int, duration: float, lifetime: float, margin: float, redis_url: str
) -> FleetRun:
    idp = DemoIdP(users={"demo": PASSWORD}, access_lifetime_s=lifetime, revoke_refresh_tokens=True)
    idp_runner, idp.base_url = await _serve(idp.app())
    api = DemoAPI(idp)
    api_runner, api_url = await _serve(api.app())
    key = os.urandom(STORE_KEY_BYTES).hex()
    procs: list[asyncio.subprocess.Process] = []
    outcomes: Counter[int] = Counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            urls = []
            for n in range(processes):
                workdir = Path(tmp) / f"p{n}"
                workdir.mkdir()
                proc, url = await _start_sidecar(_config(workdir, idp, api_url, store, redis_url, key, margin))
                procs.append(proc)
                urls.append(url)
            deadline = time.monotonic() + duration
            async with aiohttp.ClientSession() as session:

                async def client(url: str) -> None:
                    while time.monotonic() < deadline:
                        try:
                            async with session.get(url + "/v1/hello") as resp:
                                await resp.read()
                                outcomes[resp.status] += 1
                        except aiohttp.ClientError:
                            outcomes[0] += 1
                        await asyncio.sleep(REQUEST_EVERY_S)

                await asyncio.gather(*(client(url) for url in urls))
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            await proc.wait()
        await api_runner.cleanup()
        await idp_runner.cleanup()
    presented = Counter(r.get("refresh_token") for r in idp.requests if r.get("grant_type") == "refresh_token")
    logins = sum(1 for r in idp.requests if r.get("grant_type") == "password")
    refreshes = sum(presented.values())
    total = logins + refreshes
    return FleetRun(
        store=store,
        processes=processes,
        duration_s=duration,
        lifetime_s=lifetime,
        token_requests=total,
        per_lifetime=round(total / (duration / lifetime), 2),
        vs_one_process=round(total / (1 + duration / renewal_interval(lifetime, margin)), 2),
        logins=logins,
        refreshes=refreshes,
        refresh_tokens_presented_twice=sum(1 for n in presented.values() if n > 1),
        requests=sum(outcomes.values()),
        client_errors=sum(n for status, n in outcomes.items() if status != 200),
    )


async def _main(args: argparse.Namespace) -> list[FleetRun]:
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp)).start()
        try:
            runs = []
            for store in ("memory", "redis"):
                runs.append(
                    await run_fleet(store, args.processes, args.duration, args.lifetime, args.margin, redis.url)
                )
        finally:
            redis.stop()
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--lifetime", type=float, default=3.0)
    parser.add_argument("--margin", type=float, default=60.0, help="auth.refresh_margin_s (default: the default)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    runs = asyncio.run(_main(args))
    interval = renewal_interval(args.lifetime, args.margin)
    print(
        f"{args.processes} sidecars, {args.duration:.0f} s of traffic, {args.lifetime:g} s tokens "
        f"(one process renews every {interval:g} s)"
    )
    header = ("store", "token req", "/lifetime", "vs 1 proc", "logins", "refresh", "RT twice", "requests", "errors")
    print("{:8} {:>9} {:>9} {:>9} {:>6} {:>7} {:>8} {:>8} {:>6}".format(*header))
    for r in runs:
        print(
            f"{r.store:8} {r.token_requests:9d} {r.per_lifetime:9.2f} {r.vs_one_process:9.2f} {r.logins:6d} "
            f"{r.refreshes:7d} {r.refresh_tokens_presented_twice:8d} {r.requests:8d} {r.client_errors:6d}"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
