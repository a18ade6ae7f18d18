"""The shared token store under attack and on a bad day: a local user who can write the store file or the Redis
keys, a holder that pauses past its lease, a lock file that vanishes, a full disk, a Redis that accepts and never
answers, clocks that disagree between hosts. Real redis-server, real files, real processes; bounded and fast."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from proxy.config import StoreConfig
from proxy.errors import NoToken
from proxy.store import FileBackend, RedisBackend, Sealer, SharedStore, StoreUnavailable
from proxy.tokens import TokenManager
from tests.fakes.idp import SECRET_MARK, FakeIdP
from tests.fakes.redis_server import RedisServer, free_port

KEY = "attack-store-key-0123456789-abcdefghijkl"
DIGEST = "a" * 24
LIFETIME = 2.0


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def redis_store(url: str, lease_s: float = 3.0, key: str = KEY, **options: Any) -> SharedStore:
    config = StoreConfig(kind="redis", url=url, key=key)
    return SharedStore(
        RedisBackend(config, DIGEST), Sealer(key, DIGEST), lease_s=lease_s, retry_s=0.1, retry_cap_s=0.5, **options
    )


def file_store(path: Path, lease_s: float = 3.0) -> SharedStore:
    return SharedStore(FileBackend(str(path), DIGEST), Sealer(KEY, DIGEST), lease_s=lease_s, retry_s=0.1, retry_cap_s=0.5)


def manager(idp: FakeIdP, store: SharedStore | None, **options: Any) -> TokenManager:
    return TokenManager(idp, refresh_margin_s=60.0, store=store, transient_backoff=lambda *a: 0.3, **options)


def entry_key(prefix: str = "oauth-sidecar") -> str:
    return f"{prefix}:{{{DIGEST}}}:entry"


def lease_key(prefix: str = "oauth-sidecar") -> str:
    return f"{prefix}:{{{DIGEST}}}:lease"


async def traffic(managers: list[TokenManager], idp: FakeIdP, seconds: float) -> Counter[str]:
    """Every manager serves a request every 20 ms; counts what went wrong (an expired token sent, by the
    provider's reckoning, or no token)."""
    errors: Counter[str] = Counter()
    deadline = time.monotonic() + seconds

    async def one(m: TokenManager) -> None:
        while time.monotonic() < deadline:
            try:
                token = await m.get()
            except NoToken:
                errors["no token"] += 1
            else:
                if idp.clock() >= idp.expiry[token.access_token]:
                    errors["expired token sent"] += 1
                errors["served"] += 1
            await asyncio.sleep(0.02)

    await asyncio.gather(*(one(m) for m in managers))
    return errors


def presented_twice(idp: FakeIdP) -> list[str]:
    presented = [rt for kind, rt, _ in idp.calls if kind == "refresh" and rt is not None]
    return [rt for rt, n in Counter(presented).items() if n > 1]


# --- tampering: a local user who can write the Redis keys or the store file ---------------------------------------


@pytest.mark.parametrize("version", [b"not-a-number", b"1e+30", b"99999999999999999999999", b"-5", b"3.5"])
async def test_a_garbage_version_in_redis_is_unavailable_never_a_crash(redis_server, version):
    client = redis.Redis(port=redis_server.port)
    client.hset(entry_key(), mapping={"v": version, "blob": b"x" * 40})
    idp = FakeIdP(lifetime=300.0)
    m = manager(idp, redis_store(redis_server.url))
    try:
        token = await asyncio.wait_for(m.get(), 5)  # the store is unusable: this process logs in alone
        assert token.access_token.startswith("access-")
        assert m.status()["store"]["state"] == "unavailable"
    finally:
        await m.close()
        client.close()


@pytest.mark.parametrize(
    "record",
    [
        {"version": "seven", "blob": "AAAA"},
        {"version": [1], "blob": "AAAA"},
        {"version": 1e300, "blob": "AAAA"},
        {"version": 2, "blob": 12},
        {"blob": "AAAA"},
        "a string, not a record",
    ],
)
async def test_a_garbage_record_in_the_store_file_is_unavailable_never_a_crash(tmp_path, record):
    path = tmp_path / "token"
    path.write_text(json.dumps({"format": 1, "entries": {DIGEST: record}}))
    idp = FakeIdP(lifetime=300.0)
    m = manager(idp, file_store(path))
    try:
        token = await asyncio.wait_for(m.get(), 5)
        assert token.access_token.startswith("access-")
    finally:
        await m.close()
