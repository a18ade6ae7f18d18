from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from proxy.observability import LOGGER_NAME
from proxy.tokens import TokenManager


@pytest.fixture(scope="session", autouse=True)
def _system_trust_from_its_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The system trust store, looked up in its hashed directory instead of parsed whole for every TLS context.

    Every proxy app a test starts builds two TLS contexts (upstream and token endpoint), and each parses the
    system CA bundle (SSL_CERT_FILE, some 140 certificates): 20 ms of CPU, most of what a typical test costs.
    With an empty bundle and SSL_CERT_DIR set to the system's directory of the same certificates (named by
    subject hash), OpenSSL reads a system CA only when a chain needs it: the same trust, at 0.2 ms a context.
    The tests trust only their own CAs (``ca_file``) anyway. Where there is no such directory, nothing changes."""
    paths = ssl.get_default_verify_paths()
    directory = os.environ.get("SSL_CERT_DIR") or paths.capath or paths.openssl_capath
    if not directory or not os.path.isdir(directory) or not any(name.endswith(".0") for name in os.listdir(directory)):
        yield
        return
    empty = tmp_path_factory.mktemp("trust") / "no-bundle.pem"
    empty.write_text("")
    with pytest.MonkeyPatch.context() as patch:  # subprocesses the tests start inherit it
        patch.setenv("SSL_CERT_FILE", str(empty))
        patch.setenv("SSL_CERT_DIR", directory)
        yield


@pytest.fixture(autouse=True)
def _reset_logging():
    """Each test starts with our loggers propagating to pytest's capture, at debug level."""
    for name in (LOGGER_NAME, "aiohttp"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.setLevel(logging.DEBUG)
    yield


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[RawHandler], Awaitable[str]]]:
    """Start a TCP server on 127.0.0.1 that runs ``handler`` per connection; returns its http URL."""
    servers: list[asyncio.Server] = []

    async def start(handler: RawHandler) -> str:
        async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(guarded, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def managers() -> AsyncIterator[Callable[..., TokenManager]]:
    """Makes TokenManagers (refresh_margin_s 60 unless given) and closes them all at the end of the test."""
    made: list[TokenManager] = []

    def make(idp: Any, **options: Any) -> TokenManager:
        options.setdefault("refresh_margin_s", 60.0)
        manager = TokenManager(idp, **options)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        await manager.close()
