"""Fixtures for the wire suite: real upstream servers, a raw recorder, and the proxy on its real listener.

Everything async here lives on one session-wide event loop (every test module in this package sets
``pytestmark = pytest.mark.asyncio(loop_scope="session")``), so the identity provider and the real
servers are started once per run, while each test gets a proxy of its own (a clean pool). The proxy runs as
``proxy.cli.serve(config, on_listening=..., stop=...)`` in a task, exactly as the console script runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from proxy.cli import serve
from proxy.config import config_from_mapping
from proxy.demo import DemoIdP
from tests.wire.client import WireClient
from tests.wire.recorder import Recorder
from tests.wire.servers import SERVER_NAMES, RealServer, launch_all, stop_all

# Small, so that bodies on both sides of it (buffered and replayable / streamed) cost nothing to send.
REPLAY_LIMIT = 1024
START_S = 10.0  # bound on the proxy and the identity provider starting, and on the proxy stopping


@dataclass
class RunningProxy:
    """The proxy serving on 127.0.0.1:<port> in front of ``upstream_url``."""

    port: int
    upstream_url: str
    task: asyncio.Task[int]
    stop_event: asyncio.Event

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self.stop_event.set()
        try:
            await asyncio.wait_for(self.task, START_S)
        finally:
            # serve() installs SIGINT/SIGTERM handlers on the loop; give the signals back once it is done.
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)


@dataclass
class WireIdP:
    idp: DemoIdP
    runner: web.AppRunner


@dataclass
class ProxyFactory:
    idp: DemoIdP
    started: list[RunningProxy] = field(default_factory=list)

    async def start(self, upstream_url: str, **upstream: Any) -> RunningProxy:
        config = config_from_mapping(
            {
                # Short: a test that leaves a client connection open waits this long for the proxy to stop.
                "listen": {"port": 0, "shutdown_grace_s": 0.25},
                "upstream": {
                    "url": upstream_url,
                    "replay_limit_bytes": REPLAY_LIMIT,
                    "timeout_s": 10.0,
                    "connect_timeout_s": 2.0,
                    **upstream,
                },
                "auth": {
                    "provider": "keycloak",
                    "token_url": self.idp.token_url(),
                    "client_id": "demo-client",
                    "username": "demo",
                    "password": "demo",
                },
            },
            source="tests/wire",
        )
        loop = asyncio.get_running_loop()
        listening: asyncio.Future[str] = loop.create_future()
        stop = asyncio.Event()
        task = loop.create_task(serve(config, on_listening=listening.set_result, stop=stop))
        either: set[asyncio.Future[Any]] = {listening, task}
        await asyncio.wait(either, timeout=START_S, return_when=asyncio.FIRST_COMPLETED)
        if not listening.done():
            stop.set()
            code = await asyncio.wait_for(task, START_S)
            pytest.fail(f"the proxy did not start in front of {upstream_url} (serve() returned {code})")
        port = int(listening.result().rpartition(":")[2])
        proxy = RunningProxy(port, upstream_url, task, stop)
        self.started.append(proxy)
        await _wait_ready(proxy)
        return proxy

    async def stop_all(self) -> None:
        while self.started:
            await self.started.pop().stop()


async def _wait_ready(proxy: RunningProxy) -> None:
    """Until /-/ready says a token is held (the first login), bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_S
    while loop.time() < deadline:
        async with await WireClient.connect(proxy.port) as client:
            await client.send(f"GET /-/ready HTTP/1.1\r\nHost: {proxy.host}\r\nConnection: close\r\n\r\n".encode())
            response = await client.response("GET")
        if response is not None and response.status == 200:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"the proxy on port {proxy.port} never became ready (no token from the demo identity provider)")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def wire_idp() -> AsyncIterator[DemoIdP]:
    """The demo Keycloak-like token endpoint on 127.0.0.1, for every proxy in the run."""
    idp = DemoIdP()
    runner = web.AppRunner(idp.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    idp.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield idp
    await runner.cleanup()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def proxies(wire_idp: DemoIdP) -> AsyncIterator[ProxyFactory]:
    """Starts proxies in front of any upstream, and stops whichever a test left running."""
    factory = ProxyFactory(wire_idp)
    yield factory
    await factory.stop_all()


@pytest.fixture(scope="session")
def real_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RealServer]]:
    """nginx, gunicorn (sync, gthread), uvicorn (h11, httptools), hypercorn, waitress: started together."""
    base = Path(tmp_path_factory.mktemp("wire-servers"))
    servers = launch_all(base)
    try:
        yield servers
    finally:
        stop_all(servers.values())


@dataclass
class Upstream:
    """A real server and a proxy of the test's own in front of it."""

    name: str
    server: RealServer
    proxy: RunningProxy


@pytest_asyncio.fixture(loop_scope="session", params=SERVER_NAMES)
async def upstream(
    request: pytest.FixtureRequest, real_servers: dict[str, RealServer], proxies: ProxyFactory
) -> AsyncIterator[Upstream]:
    """Each real server in turn, behind a fresh proxy (pool_size 2, so its connections are reused a lot)."""
    name: str = request.param
    server = real_servers[name]
    if server.problem:
        pytest.fail(f"the wire suite needs {name} as a real upstream, and it could not be started: {server.problem}")
    proxy = await proxies.start(server.url, pool_size=2)
    try:
        yield Upstream(name, server, proxy)
    finally:
        proxies.started.remove(proxy)
        await proxy.stop()


@dataclass
class Recorded:
    recorder: Recorder
    proxy: RunningProxy


@pytest_asyncio.fixture(loop_scope="session")
async def recorded(proxies: ProxyFactory) -> AsyncIterator[Recorded]:
    """A fresh raw recording upstream and a fresh proxy (pool_size 1: every reuse is visible) in front."""
    recorder = Recorder()
    await recorder.start()
    proxy = await proxies.start(recorder.url, pool_size=1)
    try:
        yield Recorded(recorder, proxy)
    finally:
        proxies.started.remove(proxy)
        await proxy.stop()
        await recorder.stop()
