"""The shared token store under attack and on a bad day: a local user who can write the store file or the Redis
keys, a holder that pauses past its lease, a lock file that vanishes, a full disk, a Redis that accepts and never
answers, clocks that disagree between hosts. Real redis-server, real files, real processes; bounded and fast."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis

from proxy.config import StoreConfig
from proxy.errors import NoToken
from proxy.store import FileBackend, RedisBackend, Sealer, SharedStore, StoreUnavailable
from proxy.tokens import TokenManager
from tests.fakes.idp import SECRET_MARK, FakeIdP
from tests.fakes.redis_server import RedisServer

# slow: a real Redis, real leases and 1-2 s tokens: most cases wait a second or two of real time
pytestmark = pytest.mark.slow


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
    options = {"retry_s": 0.1, "retry_cap_s": 0.5, **options}
    return SharedStore(RedisBackend(config, DIGEST), Sealer(key, DIGEST), lease_s=lease_s, **options)


def file_store(path: Path, lease_s: float = 3.0) -> SharedStore:
    return SharedStore(
        FileBackend(str(path), DIGEST), Sealer(KEY, DIGEST), lease_s=lease_s, retry_s=0.1, retry_cap_s=0.5
    )


def manager(idp: FakeIdP, store: SharedStore | None, margin: float = 60.0, **options: Any) -> TokenManager:
    return TokenManager(idp, refresh_margin_s=margin, store=store, transient_backoff=lambda *a: 0.3, **options)


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


@contextlib.asynccontextmanager
async def closing(*things: Any) -> AsyncIterator[None]:
    """Close every manager, store or relay given, in order, when the block ends, however it ends."""
    try:
        yield
    finally:
        for thing in things:
            await thing.close()


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
    async with closing(m):
        token = await asyncio.wait_for(m.get(), 5)
        assert token.access_token.startswith("access-")


# --- the same rotating refresh token, presented twice by the fleet ---------------------------------------------


def pause_before(store: SharedStore, seconds: float, claim: bool) -> list[str]:
    """The holder freezes (a GC pause, a SIGSTOP'd container) right before its next claim (``claim``) or
    its next token write, for ``seconds``: past its lease. Returns a list that records the pause."""
    original = store.write
    paused: list[str] = []

    async def write(entry: Any, expected: int) -> Any:
        if not paused and bool(entry.refresh_claimed) == claim:
            paused.append("claim" if claim else "token")
            await asyncio.sleep(seconds)  # the other managers run on: they are other processes
        return await original(entry, expected)

    store.write = write  # type: ignore[method-assign]
    return paused


async def test_a_holder_that_paused_before_its_claim_never_presents_the_refresh_token_too(redis_server):
    """A takes the lease to refresh, freezes past its lease before writing its claim; B takes the lease and
    refreshes. A's claim is refused: A must not present the refresh token B presented."""
    idp = FakeIdP(lifetime=LIFETIME, refresh_lifetime=600.0)
    a_store, b_store = redis_store(redis_server.url, lease_s=0.5), redis_store(redis_server.url, lease_s=0.5)
    # Both hold the same token; A renews it at half its life (1 s), B later (0.5 s before it expires).
    a, b = manager(idp, a_store), manager(idp, b_store, margin=0.5)
    async with closing(a, b):
        await a.get()  # A logs in and writes; B adopts
        await b.get()
        assert idp.kinds == ["login"]
        paused = pause_before(a_store, 1.2, claim=True)
        a.start()
        b.start()
        errors = await traffic([a, b], idp, 2.3)
        assert paused == ["claim"], idp.calls
    assert presented_twice(idp) == [], idp.calls
    assert errors["expired token sent"] == 0 and errors["no token"] == 0, (errors, idp.calls)


async def test_a_holder_that_paused_with_the_answer_keeps_its_token_and_the_fleet_never_reuses_it(redis_server):
    """A presents the refresh token and freezes past its lease before writing what it got. B finds A's claim
    unanswered and logs in (it never presents that refresh token again); A's late write is refused, it keeps its
    own token, and takes the fleet's at its next renewal."""
    idp = FakeIdP(lifetime=LIFETIME, refresh_lifetime=600.0)
    a_store, b_store = redis_store(redis_server.url, lease_s=0.5), redis_store(redis_server.url, lease_s=0.5)
    a, b = manager(idp, a_store), manager(idp, b_store, margin=0.5)
    async with closing(a, b):
        await a.get()
        await b.get()
        paused = pause_before(a_store, 1.0, claim=False)
        a.start()
        b.start()
        errors = await traffic([a, b], idp, 2.4)
        assert paused == ["token"]
        held = {m.held.access_token for m in (a, b) if m.held}
    assert presented_twice(idp) == [], idp.calls
    assert idp.kinds[:3] == ["login", "refresh", "login"], idp.kinds
    assert errors["expired token sent"] == 0 and errors["no token"] == 0, errors
    assert len(held) == 1  # one token again


# --- the file store on a bad day -------------------------------------------------------------------------------


def sealed_entry(**changes: Any) -> Any:
    from proxy.store import Entry

    now = time.time()
    values: dict[str, Any] = {
        "access_token": f"access-{SECRET_MARK}-x",
        "refresh_token": f"refresh-{SECRET_MARK}-x",
        "obtained_at": now,
        "expires_at": now + 300,
    }
    values.update(changes)
    return Entry(**values)


async def test_a_lock_file_unlinked_while_held_makes_no_second_writer(tmp_path):
    """Someone deletes the lock file while A holds it (a cleanup job, a careless rm): B locks a new one. Two
    holders may never both write: A's lease was lost with the file."""
    path = tmp_path / "token"
    a, b = file_store(path), file_store(path)
    assert await a.lease()
    os.unlink(str(path) + ".lock")
    assert await b.lease()  # B cannot know: the lock it takes is a new file
    assert await a.write(sealed_entry(subject="from-a"), 0) is None  # A's lock is no longer the lock
    assert await b.write(sealed_entry(subject="from-b"), 0) is not None
    read = await a.read()
    assert read is not None and read.subject == "from-b"
    await a.close()
    await b.close()


async def test_a_lock_file_replaced_while_held_makes_no_second_writer(tmp_path):
    path = tmp_path / "token"
    a, b = file_store(path), file_store(path)
    assert await a.lease()
    other = tmp_path / "elsewhere"
    other.write_bytes(b"")
    os.replace(other, str(path) + ".lock")
    assert await b.lease()
    assert await a.write(sealed_entry(), 0) is None
    await a.close()
    await b.close()


FULL_DISK_WRITER = """
import asyncio, resource, signal, sys, time
from proxy.store import Entry, FileBackend, Sealer, SharedStore, StoreUnavailable

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
async def main():
    store = SharedStore(FileBackend(sys.argv[1], sys.argv[3]), Sealer(sys.argv[4], sys.argv[3]), lease_s=5.0)
    assert await store.lease()
    now = time.time()
    try:
        await store.write(Entry(access_token="a" * 3000, obtained_at=now, expires_at=now + 300), 1)
    except StoreUnavailable as exc:
        print("unavailable:", exc)
    else:
        print("written")
asyncio.run(main())
"""


async def test_a_full_disk_never_leaves_a_damaged_store_file(tmp_path):
    """The disk fills up while the holder writes (here: a file size limit, which makes write() short, as a full
    disk does): the write fails, and the store file still holds the entry it held."""
    path = tmp_path / "token"
    first = file_store(path)
    assert await first.lease()
    assert await first.write(sealed_entry(subject="before"), 0) is not None
    await first.close()
    limit = path.stat().st_size + 100  # room for a little, not for the new entry
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        FULL_DISK_WRITER,
        str(path),
        str(limit),
        DIGEST,
        KEY,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    stdout, stderr = await asyncio.wait_for(child.communicate(), 20)
    assert child.returncode == 0, stderr.decode()[-2000:]
    assert stdout.decode().startswith("unavailable:"), stdout
    read = await file_store(path).read()  # not "not an oauth-sidecar store"
    assert read is not None and read.subject == "before"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftover temporary file


async def test_a_store_file_replaced_by_a_fifo_never_blocks_the_event_loop(tmp_path):
    """A local user replaces the store file with a named pipe: reading it would wait for a writer forever, in
    the event loop. It is not a regular file: unavailable, at once."""
    path = tmp_path / "token"
    os.mkfifo(path)
    unblocked: list[bool] = []

    def unblock() -> None:  # the safety net of the test: a blocked loop is freed after 3 s
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.write(fd, b"{}")
            os.close(fd)
            unblocked.append(True)

    import threading

    timer = threading.Timer(3.0, unblock)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable, match="not a regular file"):
            await file_store(path).read()
    finally:
        timer.cancel()
    assert time.monotonic() - started < 1.0 and not unblocked


async def test_a_huge_store_file_is_refused_not_read(tmp_path):
    path = tmp_path / "token"
    path.touch()
    os.truncate(path, 64 * 1024 * 1024)  # sparse: 64 MB of zeros that cost no disk
    with pytest.raises(StoreUnavailable, match="too large"):
        await file_store(path).read()


# --- outage: a Redis that accepts and never answers -------------------------------------------------------------


class Blackhole:
    """A TCP relay to Redis that can turn into a black hole: connections stay open, bytes go nowhere, nothing
    comes back (a dead VM behind a live load balancer, a firewall dropping packets)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.swallowing = False
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> Blackhole:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.pumps:
            task.cancel()
        await asyncio.gather(*self.pumps, return_exceptions=True)
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 0.5)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers.append(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pump(src, dst))
            self.pumps.add(task)
            task.add_done_callback(self.pumps.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                if not self.swallowing:
                    dst.write(data)
                    await dst.drain()
        dst.close()


async def test_a_blackholed_redis_costs_a_renewal_one_store_timeout_not_three(redis_server):
    """Redis stops answering right after this process took the lease. The renewal goes on alone; the store's
    failure is known after the first timed-out command: the write and the release that follow do not wait
    another REDIS_TIMEOUT_S each."""
    from proxy.store import REDIS_TIMEOUT_S

    hole = await Blackhole(redis_server.port).start()
    idp = FakeIdP(lifetime=300.0)
    store = redis_store(hole.url, retry_s=5.0, retry_cap_s=5.0)
    original = store.lease

    async def lease_then_blackhole() -> bool:
        got = await original()
        hole.swallowing = True
        return got

    m = manager(idp, store)
    async with closing(m, hole):
        store.lease = lease_then_blackhole  # type: ignore[method-assign]
        started = time.monotonic()
        token = await asyncio.wait_for(m.get(), 10)
        waited = time.monotonic() - started
        assert token.access_token.startswith("access-")
        assert waited < REDIS_TIMEOUT_S + 0.5, waited
        assert m.status()["store"]["state"] == "unavailable"


async def test_a_redis_that_never_answers_holds_no_request_with_a_token(redis_server):
    """Blackholed from the start and through renewals: the first request waits one store timeout at most; after
    it no request waits (renewals happen in the background), none gets an expired token or a 503."""
    from proxy.store import REDIS_TIMEOUT_S

    hole = await Blackhole(redis_server.port).start()
    hole.swallowing = True
    idp = FakeIdP(lifetime=1.0)
    m = manager(idp, redis_store(hole.url, retry_s=5.0, retry_cap_s=5.0))  # skipped after failing, as in production
    async with closing(m, hole):
        started = time.monotonic()
        await asyncio.wait_for(m.get(), 10)
        assert time.monotonic() - started < REDIS_TIMEOUT_S + 0.5
        m.start()
        slowest = 0.0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            token = await m.get()
            slowest = max(slowest, time.monotonic() - t0)
            assert idp.clock() < idp.expiry[token.access_token]
            await asyncio.sleep(0.02)
        assert slowest < 0.1, slowest
        assert len(idp.calls) >= 3  # it renewed meanwhile, alone


# --- clocks that disagree between hosts -------------------------------------------------------------------------


def skewed(seconds: float) -> Any:
    return lambda: time.time() + seconds


@pytest.mark.parametrize("skew", [30.0, -30.0])
async def test_a_host_whose_clock_is_off_by_30s_never_sends_an_expired_token_nor_renews_in_a_loop(redis_server, skew):
    """Entries carry wall-clock times; A's clock is ``skew`` off. Neither A nor B (right clock) sends a token the
    provider considers expired, and together they renew about as often as one process would."""
    idp = FakeIdP(lifetime=1.0)
    a_store = redis_store(redis_server.url, wall_clock=skewed(skew))
    a = manager(idp, a_store, wall_clock=skewed(skew))
    b = manager(idp, redis_store(redis_server.url))
    async with closing(a, b):
        await a.get()  # A writes the first token with its clock
        a.start()
        b.start()
        errors = await traffic([a, b], idp, 1.3)
    assert errors["expired token sent"] == 0 and errors["no token"] == 0, (errors, idp.kinds)
    assert len(idp.calls) <= 1.3 / 0.5 + 2, idp.kinds  # renewed at half-life, not in a loop
    assert presented_twice(idp) == []


async def test_a_huge_blob_in_redis_is_damaged_and_never_fetched(redis_server):
    client = redis.Redis(port=redis_server.port)
    client.hset(entry_key(), mapping={"v": b"1", "blob": b"x" * (4 * 1024 * 1024)})
    store = redis_store(redis_server.url)
    try:
        with pytest.raises(StoreUnavailable, match="too large"):
            await store.read()
    finally:
        await store.close()
        client.close()


# --- two fleets, one Redis; secrets -----------------------------------------------------------------------------


async def test_two_fleets_with_different_keys_on_one_redis_never_overwrite_each_other(redis_server):
    """Same credential set, same prefix, another store.key (a second cluster pointed at the same Redis): the
    second cannot open the first's entry. It renews alone, never overwrites it, never loops."""
    idp = FakeIdP(lifetime=1.0)
    first_store = redis_store(redis_server.url)
    first = manager(idp, first_store)
    other_idp = FakeIdP(lifetime=1.0)
    second_store = redis_store(redis_server.url, key=KEY[::-1])
    second = manager(other_idp, second_store)
    async with closing(first, second):
        await first.get()
        first.start()
        second.start()
        errors = await traffic([first, second], idp, 0.1)  # first only: `second` is measured on its own provider
        second_errors = await traffic([second], other_idp, 1.0)
        status = second.status()["store"]
        looker = redis_store(redis_server.url)
        entry = await looker.read()
        await looker.close()
    assert errors["no token"] == 0 and second_errors["no token"] == 0 and second_errors["expired token sent"] == 0
    assert status["state"] == "unavailable" and "does not open with this store.key" in status["problem"]
    assert entry is not None and entry.writer == first_store.owner
    assert len(other_idp.calls) <= 1.1 / 0.5 + 2, other_idp.kinds  # renewed alone at its pace, not in a loop


async def test_the_redis_password_never_reaches_a_message_a_log_line_or_the_status(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    server = RedisServer(tmp_path, password="the-right-one-4").start()
    try:
        secrets = ("url-pass-word-77", "acl-pass-word-88")
        config = StoreConfig(
            kind="redis", url=f"redis://sidecar:{secrets[0]}@127.0.0.1:{server.port}/0", password=secrets[1], key=KEY
        )
        store = SharedStore(RedisBackend(config, DIGEST), Sealer(KEY, DIGEST), lease_s=3.0, retry_s=0.0)
        idp = FakeIdP(lifetime=300.0)
        m = manager(idp, store)
        messages = []
        for op in (store.read(), store.lease()):
            with pytest.raises(StoreUnavailable) as info:
                await op
            messages.append(str(info.value))
        await m.get()  # alone
        status = json.dumps(m.status())
        await m.close()
        server.stop()  # refused now: another error text
        down = SharedStore(RedisBackend(config, DIGEST), Sealer(KEY, DIGEST), lease_s=3.0)
        with pytest.raises(StoreUnavailable) as info:
            await down.read()
        messages.append(str(info.value))
        await down.close()
    finally:
        server.stop()
    seen = (
        "\n".join(messages)
        + status
        + "\n".join(r.getMessage() + repr(getattr(r, "fields", "")) for r in caplog.records)
    )
    for secret in (*secrets, KEY, "the-right-one-4"):
        assert secret not in seen
    assert "redis: AuthenticationError" in messages[0] or "redis:" in messages[0], messages


async def test_redis_restarted_empty_mid_refresh_the_holder_writes_its_token_again(redis_server):
    """A presents the refresh token; Redis restarts empty (no persistence) while the provider answers. A's
    write is refused (the version it read is gone), but the store holds nothing newer: A writes its token as
    the new entry, so B, renewing later, takes it instead of presenting the spent refresh token (a
    refresh_token grant has no login to fall back on)."""
    idp = FakeIdP(lifetime=LIFETIME, refresh_lifetime=600.0, grant_type="refresh_token")
    a = manager(idp, redis_store(redis_server.url))
    b = manager(idp, redis_store(redis_server.url), margin=0.5)
    async with closing(a, b):
        await a.get()
        await b.get()
        idp.gate = asyncio.Event()
        a.start()
        b.start()
        for _ in range(200):  # A's scheduled refresh reaches the provider and hangs there
            if idp.kinds == ["login", "refresh"]:
                break
            await asyncio.sleep(0.01)
        assert idp.kinds == ["login", "refresh"]
        redis_server.stop()
        redis_server.start()
        idp.gate.set()
        idp.gate = None
        errors = await traffic([a, b], idp, 1.2)
    assert presented_twice(idp) == [], idp.calls
    assert errors["expired token sent"] == 0, errors


@pytest.mark.parametrize("kind", ["string", "hash"])
async def test_a_lease_key_holding_garbage_forever_does_not_stop_the_fleet(redis_server, kind):
    """Someone sets the lease key by hand (no expiry; or as a hash). Waiting out one lease, the fleet renews:
    a lease without an expiry is not one a sidecar took (they always expire), so it is given one."""
    client = redis.Redis(port=redis_server.port)
    if kind == "string":
        client.set(lease_key(), b"garbage-owner")
    else:
        client.hset(lease_key(), mapping={"x": b"y"})
    idp = FakeIdP(lifetime=300.0)
    m = manager(idp, redis_store(redis_server.url, lease_s=0.2))
    async with closing(m):
        token = None
        deadline = time.monotonic() + 3.0
        while token is None and time.monotonic() < deadline:
            with contextlib.suppress(NoToken):
                token = await m.get()
            await asyncio.sleep(0.05)
        assert token is not None, m.reason()
        assert m.status()["store"]["state"] == "available"
        client.close()


# --- configuration that redis-py would refuse at start (a traceback, not exit 2) ----------------------------------


@pytest.mark.parametrize(
    ("store", "key"),
    [
        ({"url": "redis://mymaster", "mode": "sentinel", "sentinels": ["s1:abc"]}, "store.sentinels"),
        ({"url": "redis://mymaster", "mode": "sentinel", "sentinels": [":26379"]}, "store.sentinels"),
        ({"url": "unix://:url-pass-word-5@/tmp/x.sock?db=zz"}, "store.url"),
        ({"url": "redis://:url-pass-word-5@127.0.0.1:6379/0?socket_timeout=abc"}, "store.url"),
    ],
)
def test_a_store_url_or_sentinel_redis_would_refuse_is_a_config_error(store, key):
    from proxy.config import config_from_mapping
    from proxy.errors import ConfigError

    auth = {"provider": "keycloak", "token_url": "http://127.0.0.1:1/token", "client_id": "c", "username": "u"}
    with pytest.raises(ConfigError) as info:
        config_from_mapping(
            {
                "upstream": {"url": "http://127.0.0.1:2"},
                "auth": {**auth, "password": "p"},
                "store": {"kind": "redis", "key": KEY, **store},
            }
        )
    assert info.value.key == key and "url-pass-word-5" not in str(info.value)


async def test_a_refresh_that_timed_out_is_not_presented_again_by_another_replica(redis_server):
    """A's refresh times out (the provider may have used the refresh token: its claim stays); B, renewing
    next, logs in instead of presenting it. After a 503 (answered without using it) the claim is lifted and B
    refreshes with it."""
    from proxy.errors import TokenUnavailable

    for failure, b_renews_with in (
        (TokenUnavailable("token endpoint timed out", reason="timeout"), "login"),
        (TokenUnavailable("token endpoint answered 503", reason="server_error"), "refresh"),
    ):
        with redis.Redis(port=redis_server.port) as client:
            client.flushall()
        idp = FakeIdP(lifetime=1.5, refresh_lifetime=600.0)
        a = TokenManager(
            idp, refresh_margin_s=60.0, store=redis_store(redis_server.url), transient_backoff=lambda *x: 5.0
        )
        b = manager(idp, redis_store(redis_server.url), margin=0.4)  # A renews at 0.75 s, B at 1.1 s
        async with closing(a, b):
            await a.get()
            await b.get()
            idp.outcomes = [failure]
            a.start()
            b.start()
            errors = await traffic([a, b], idp, 1.3)
        assert idp.kinds[:3] == ["login", "refresh", b_renews_with], (failure.reason, idp.calls)
        assert errors["expired token sent"] == 0 and errors["no token"] == 0, errors
