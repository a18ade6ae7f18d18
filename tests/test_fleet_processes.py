"""The fleet as operators run it: several ``python -m proxy`` processes, one real Redis, one identity provider."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest
import redis

from proxy.config import load_config
from proxy.demo import Fault
from proxy.store import config_digest
from tests.fakes.redis_server import RedisServer
from tests.fakes.servers import start_api, start_idp
from tests.fakes.sidecar import PASSWORD, Sidecar, wait_ready, write_config

# slow: real sidecar processes against a real Redis, waiting out a real lease
pytestmark = pytest.mark.slow

STORE_KEY = "process-fleet-store-key-0123456789abcdef"


def _with_store(config: Path, server: RedisServer, **store: object) -> Path:
    lines = ["[store]", 'kind = "redis"', f'url = "{server.url}"', f'key = "{STORE_KEY}"']
    lines += [f"{key} = {value}" for key, value in store.items()]
    config.write_text(config.read_text() + "\n".join(lines) + "\n")
    return config


async def _fleet(configs: list[Path]) -> list[tuple[Sidecar, str]]:
    sidecars = [await Sidecar.start(config) for config in configs]
    return [(sidecar, await sidecar.url()) for sidecar in sidecars]


async def test_a_restarted_fleet_logs_in_zero_times(aiohttp_server, tmp_path):
    server = RedisServer(tmp_path).start()
    idp = await start_idp(aiohttp_server, users={"demo": PASSWORD})
    _, upstream = await start_api(aiohttp_server, idp)
    configs = []
    for n in range(3):
        (tmp_path / f"p{n}").mkdir()
        configs.append(_with_store(write_config(tmp_path / f"p{n}", idp.token_url(), upstream), server))
    try:
        async with aiohttp.ClientSession() as session:
            fleet = await _fleet(configs)
            for _, url in fleet:
                await wait_ready(session, url)
                async with session.get(url + "/api/whoami") as resp:
                    assert resp.status == 200
            assert idp.token_requests == 1  # one login for the three
            for sidecar, _ in fleet:
                sidecar.proc.send_signal(signal.SIGTERM)
                assert await sidecar.exit_code() == 0

            again = await _fleet(configs)
            for _, url in again:
                await wait_ready(session, url)
                async with session.get(url + "/api/whoami") as resp:
                    assert resp.status == 200
            assert idp.token_requests == 1  # restarted: the stored token, no login
            for sidecar, _ in again:
                assert sidecar.events("store.token_adopted")
                assert not any(PASSWORD in line for line in sidecar.lines)
                await sidecar.kill()
    finally:
        server.stop()


async def test_kill_9_of_the_lease_holder_while_its_login_hangs(aiohttp_server, tmp_path):
    """The holder is killed while the provider sits on its login; another process holds a token within the
    lease time plus one token request."""
    server = RedisServer(tmp_path).start()
    idp = await start_idp(aiohttp_server, users={"demo": PASSWORD})
    idp.fail_next(Fault(status=200, body={"access_token": "never"}, delay_s=30.0))  # the first login hangs
    _, upstream = await start_api(aiohttp_server, idp)
    lease_s = 2.0
    configs = []
    for n in range(2):
        (tmp_path / f"p{n}").mkdir()
        config = write_config(tmp_path / f"p{n}", idp.token_url(), upstream, timeout_s=20)
        configs.append(_with_store(config, server, lease_s=lease_s))
    digest = config_digest(load_config(configs[0], env={}).auth)
    client = redis.Redis(port=server.port)
    loop = asyncio.get_running_loop()
    try:
        fleet = await _fleet(configs)
        owner = None
        for _ in range(500):  # the first login reached the provider, under someone's lease
            owner = client.get(f"oauth-sidecar:{{{digest}}}:lease")
            if owner and idp.token_requests == 1:
                break
            await asyncio.sleep(0.01)
        assert owner is not None and idp.token_requests == 1
        holder_pid = int(owner.decode().split(":")[1])
        holder = next(s for s, _ in fleet if s.proc.pid == holder_pid)
        other_url = next(url for s, url in fleet if s is not holder)
        killed_at = loop.time()
        os.kill(holder_pid, signal.SIGKILL)
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, other_url)
            ready_after = loop.time() - killed_at
            async with session.get(other_url + "/api/whoami") as resp:
                assert resp.status == 200
        # Well before the hung login's 20 s timeout; the margin allows for a loaded 2-core CI machine (5.0 s seen).
        assert ready_after < lease_s + 4.0, ready_after
        assert idp.token_requests == 2  # the hung one and the one after the lease expired
        for sidecar, _ in fleet:
            await sidecar.kill()
    finally:
        client.close()
        server.stop()
