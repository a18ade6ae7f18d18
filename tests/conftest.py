from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from proxy.observability import LOGGER_NAME
from proxy.tokens import TokenManager


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
