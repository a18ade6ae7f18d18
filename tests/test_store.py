"""The shared token store on its own: sealing, the lease, the fenced write, on a real file and a real Redis."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from proxy.config import AuthConfig, StoreConfig, config_from_mapping
from proxy.errors import ConfigError
from proxy.store import Entry, FileBackend, RedisBackend, Sealer, SharedStore, StoreUnavailable, config_digest
from tests.fakes.redis_server import RedisSentinel, RedisServer

KEY = "store-key-for-tests-0123456789-abcdefgh"
ACCESS = "eyJhbGciOiJSUzI1NiJ9.access-TOKEN-bytes-7f3a.sig"
REFRESH = "refresh-TOKEN-bytes-91c2-never-readable"
DIGEST = "d" * 24


def entry(**changes: object) -> Entry:
    now = time.time()
    values: dict[str, object] = {
        "access_token": ACCESS,
        "refresh_token": REFRESH,
        "obtained_at": now,
        "expires_at": now + 300,
        "refresh_expires_at": now + 1800,
        "subject": "demo-subject-name",
    }
    values.update(changes)
    return Entry(**values)  # type: ignore[arg-type]


def file_store(path: Path, **options: object) -> SharedStore:
    return SharedStore(FileBackend(str(path), DIGEST), Sealer(KEY, DIGEST), lease_s=5.0, **options)  # type: ignore[arg-type]


def redis_store(server: RedisServer, lease_s: float = 5.0, **config: object) -> SharedStore:
    config.setdefault("url", server.url)
    store_config = StoreConfig(kind="redis", key=KEY, **config)  # type: ignore[arg-type]
    return SharedStore(RedisBackend(store_config, DIGEST), Sealer(KEY, DIGEST), lease_s=lease_s)


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


# --- sealing ----------------------------------------------------------------------------------------


def test_a_sealed_entry_opens_only_with_its_key_digest_and_version():
    sealer = Sealer(KEY, DIGEST)
    blob = sealer.seal(entry(version=3))
    assert ACCESS.encode() not in blob and REFRESH.encode() not in blob and b"demo-subject" not in blob
    assert sealer.open(blob, 3).access_token == ACCESS
    with pytest.raises(StoreUnavailable, match=r"does not open with this store\.key"):
        Sealer(KEY + "-other", DIGEST).open(blob, 3)
    with pytest.raises(StoreUnavailable):
        Sealer(KEY, "e" * 24).open(blob, 3)  # moved to another credential set's name
    with pytest.raises(StoreUnavailable):
        sealer.open(blob, 4)  # presented as another version
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(StoreUnavailable):
        sealer.open(tampered, 3)


def test_two_credential_sets_never_share_an_entry():
    base = AuthConfig(token_url="https://idp.example/token", client_id="c", username="u", grant_type="password")
    names = {
        config_digest(base),
        config_digest(AuthConfig(**{**base.__dict__, "client_id": "c2"})),
        config_digest(AuthConfig(**{**base.__dict__, "username": "u2"})),
        config_digest(AuthConfig(**{**base.__dict__, "scope": "openid"})),
        config_digest(AuthConfig(**{**base.__dict__, "grant_type": "client_credentials"})),
        config_digest(AuthConfig(**{**base.__dict__, "token_url": "https://other.example/token"})),
    }
    assert len(names) == 6
    # ... while the password is not part of the name: a rotated password keeps the fleet's entry.
    assert config_digest(AuthConfig(**{**base.__dict__, "password": "new"})) == config_digest(base)


# --- configuration ------------------------------------------------------------------------------------

UPSTREAM = {"url": "http://127.0.0.1:2"}
AUTH = {
    "provider": "keycloak",
    "token_url": "http://127.0.0.1:1/token",
    "client_id": "c",
    "username": "u",
    "password": "p",
}


@pytest.mark.parametrize(
    ("store", "key", "message"),
    [
        ({"kind": "disk"}, "store.kind", "must be one of memory, file, redis"),
        ({"kind": "file", "key": KEY}, "store.path", "required for kind file"),
        ({"kind": "file", "path": "/nonexistent-dir/token", "key": KEY}, "store.path", "does not exist"),
        ({"kind": "redis", "key": KEY}, "store.url", "required for kind redis"),
        ({"kind": "redis", "url": "http://127.0.0.1:6379", "key": KEY}, "store.url", "redis://, rediss:// or unix://"),
        ({"kind": "redis", "url": "redis://127.0.0.1:6379"}, "store.key", "required for kind file and redis"),
        ({"kind": "redis", "url": "redis://127.0.0.1:6379", "key": "short"}, "store.key", "too short"),
        ({"kind": "redis", "url": "redis://x", "key": KEY, "mode": "sentinel"}, "store.sentinels", "required"),
    ],
)
def test_a_bad_store_section_names_the_key(tmp_path, store, key, message):
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"upstream": UPSTREAM, "auth": AUTH, "store": store})
    assert info.value.key == key and message in str(info.value)
    assert "short" not in str(info.value).replace("too short", "")  # the key's value is never quoted


def test_revoke_on_shutdown_is_refused_with_a_shared_store(tmp_path):
    with pytest.raises(ConfigError) as info:
        config_from_mapping(
            {
                "upstream": UPSTREAM,
                "auth": {**AUTH, "revoke_on_shutdown": True},
                "store": {"kind": "file", "path": str(tmp_path / "t"), "key": KEY},
            }
        )
    assert info.value.key == "auth.revoke_on_shutdown" and "every process sharing the store" in str(info.value)


def test_the_store_key_and_password_are_secrets(tmp_path):
    (tmp_path / "key").write_text(KEY + "\n")
    config = config_from_mapping(
        {
            "upstream": UPSTREAM,
            "auth": AUTH,
            "store": {
                "kind": "redis",
                "url": "redis://:url-pass-word@127.0.0.1:6379/0",
                "key_file": str(tmp_path / "key"),
                "password": "acl-pass-word",
            },
        }
    )
    assert config.store.key == KEY
    assert {KEY, "acl-pass-word", "url-pass-word"} <= set(config.secrets())
    assert KEY not in repr(config) and "acl-pass-word" not in repr(config)


# --- the file store ------------------------------------------------------------------------------------


async def test_file_store_holds_no_token_byte_and_is_private(tmp_path):
    path = tmp_path / "token"
    store = file_store(path)
    assert await store.lease()
    written = await store.write(entry(), 0)
    assert written is not None and written.version == 1
    raw = path.read_bytes()
    assert ACCESS.encode() not in raw and REFRESH.encode() not in raw and b"demo-subject" not in raw
    assert b"TOKEN" not in raw
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(str(path) + ".lock").st_mode) == 0o600
    read = await file_store(path).read()
    assert read is not None and read.access_token == ACCESS and read.version == 1
    await store.close()


async def test_file_lease_is_exclusive_and_the_write_is_fenced(tmp_path):
    path = tmp_path / "token"
    first, second = file_store(path), file_store(path)
    assert await first.lease()
    assert not await second.lease()  # another holder (another process, or another open file here)
    assert await second.write(entry(), 0) is None  # no lease, no write
    assert (await first.write(entry(), 0)) is not None
    assert await first.write(entry(subject="stale"), 0) is None  # the version moved on: refused
    await first.release()
    assert await second.lease()
    assert (await second.write(entry(subject="second"), 1)) is not None
    read = await first.read()
    assert read is not None and read.subject == "second" and read.version == 2
    await first.close()
    await second.close()


async def test_file_lease_of_a_killed_process_is_free_at_once(tmp_path):
    """flock: the kernel releases the lock of a process that dies (kill -9), no TTL to wait out."""
    path = tmp_path / "token"
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)",
        str(path) + ".lock",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert (await asyncio.wait_for(holder.stdout.readline(), 10)).strip() == b"locked"
        store = file_store(path)
        assert not await store.lease()
        holder.kill()
        await holder.wait()
        assert await store.lease()
        await store.close()
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


async def test_a_damaged_store_file_is_unavailable_not_a_crash(tmp_path):
    path = tmp_path / "token"
    path.write_text("not json at all")
    store = file_store(path)
    with pytest.raises(StoreUnavailable, match="not an oauth-sidecar store"):
        await store.read()
    assert not store.available and "not an oauth-sidecar store" in store.status()["problem"]


async def test_a_file_waiter_wakes_when_the_entry_changes(tmp_path):
    path = tmp_path / "token"
    holder, waiter = file_store(path), file_store(path)
    assert await holder.lease()
    loop = asyncio.get_running_loop()

    async def write_soon() -> None:
        await asyncio.sleep(0.1)
        await holder.write(entry(), 0)

    started = loop.time()
    writing = asyncio.create_task(write_soon())
    await waiter.wait(3.0)
    assert loop.time() - started < 1.0  # woken by the change, not the timeout
    await writing
    await holder.close()


# --- the redis store ------------------------------------------------------------------------------------


async def test_redis_holds_no_token_byte(redis_server):
    store = redis_store(redis_server)
    assert await store.lease()
    assert await store.write(entry(), 0) is not None
    raw = redis_server.keys_and_values()
    assert raw and ACCESS.encode() not in raw and REFRESH.encode() not in raw and b"demo-subject" not in raw
    assert b"TOKEN" not in raw
    other = redis_store(redis_server)
    read = await other.read()
    assert read is not None and read.access_token == ACCESS and read.refresh_token == REFRESH
    await store.close()
    await other.close()


async def test_redis_lease_is_released_only_by_its_owner(redis_server):
    first, second = redis_store(redis_server), redis_store(redis_server)
    assert await first.lease()
    assert not await second.lease()
    await second.release()  # compare-and-delete: not second's lease, nothing happens
    assert not await second.lease()
    await first.release()
    assert await second.lease()
    await first.close()
    await second.close()


async def test_a_holder_that_paused_past_its_lease_cannot_overwrite_a_newer_entry(redis_server):
    slow = redis_store(redis_server, lease_s=0.2)
    fast = redis_store(redis_server, lease_s=5.0)
    assert await slow.lease()
    await asyncio.sleep(0.3)  # the holder pauses (a GC, SIGSTOP) past its lease
    assert await fast.lease()
    assert (await fast.write(entry(subject="newer"), 0)) is not None
    assert await slow.write(entry(subject="older"), 0) is None  # the version moved on
    assert await slow.write(entry(subject="older"), 1) is None  # and the lease is not its own
    read = await slow.read()
    assert read is not None and read.subject == "newer" and read.version == 1
    await slow.close()
    await fast.close()


async def test_redis_waiter_is_woken_by_the_write(redis_server):
    holder, waiter = redis_store(redis_server), redis_store(redis_server)
    assert await holder.lease()
    await waiter.lease()  # subscribes
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def write_soon() -> None:
        await asyncio.sleep(0.05)
        await holder.write(entry(), 0)

    writing = asyncio.create_task(write_soon())
    await waiter.wait(0.2)
    assert loop.time() - started < 0.2
    await writing
    await holder.close()
    await waiter.close()


async def test_redis_with_a_password_and_an_acl_user(tmp_path):
    server = RedisServer(tmp_path, password="default-pass-1", acl_user=("sidecar", "acl-pass-2")).start()
    try:
        store = redis_store(server, username="sidecar", password="acl-pass-2")
        assert await store.lease() and await store.write(entry(), 0) is not None
        await store.close()
        wrong = redis_store(server, username="sidecar", password="wrong-pass-3")
        with pytest.raises(StoreUnavailable) as info:
            await wrong.read()
        assert "wrong-pass-3" not in str(info.value) and "acl-pass-2" not in str(info.value)
        assert not wrong.available
        await wrong.close()
    finally:
        server.stop()


async def test_redis_down_is_unavailable_logged_once_then_available_again(tmp_path, caplog):
    server = RedisServer(tmp_path).start()
    store = redis_store(server)
    assert await store.read() is None
    server.stop()
    for _ in range(3):
        with pytest.raises(StoreUnavailable):
            await store.read()
    unavailable = [r for r in caplog.records if "store.unavailable" in r.getMessage()]
    assert len(unavailable) == 1
    assert not store.usable()  # backing off: not tried again at once
    server.start()
    assert await store.read() is None
    assert store.available
    assert [r for r in caplog.records if "store.available" in r.getMessage()]
    await store.close()
    server.stop()


async def test_redis_through_sentinel(redis_server, tmp_path):
    """mode = "sentinel": the master is found through the sentinel by its name (url = redis://NAME)."""
    sentinel = RedisSentinel(tmp_path, redis_server).start()
    try:
        store = redis_store(
            redis_server, url="redis://mymaster", mode="sentinel", sentinels=(f"127.0.0.1:{sentinel.port}",)
        )
        assert await store.lease() and await store.write(entry(), 0) is not None
        direct = redis_store(redis_server)
        read = await direct.read()  # it landed on the master
        assert read is not None and read.access_token == ACCESS
        await store.close()
        await direct.close()
    finally:
        sentinel.stop()
