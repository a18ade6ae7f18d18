"""A fleet sharing one token: several token managers, one real Redis (or one file), one identity provider.

The managers run in one event loop here, each with its own connection to the store, exactly as separate
processes would use it (the store is their only link); tests/test_fleet_processes.py runs real processes.
Times are real (the store's lease and Redis's expiry are), kept to a few seconds with 2 s tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from proxy.config import StoreConfig
from proxy.errors import NoToken
from proxy.store import FileBackend, RedisBackend, Sealer, SharedStore
from proxy.tokens import TokenManager
from tests.fakes.idp import FakeIdP, rejected
from tests.fakes.redis_server import RedisServer

# slow: real Redis TTLs, lease expiries and 2 s token lifetimes, a few seconds of real time each
pytestmark = pytest.mark.slow

KEY = "fleet-store-key-0123456789-abcdefghijkl"
DIGEST = "f" * 24
FLEET = 4
LIFETIME = 2.0  # renewed at half its life: one renewal a second for the fleet


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def redis_store(server: RedisServer, lease_s: float = 3.0) -> SharedStore:
    config = StoreConfig(kind="redis", url=server.url, key=KEY)
    # Skipped for at most half a second after failing (30 s in production: still within a real token's life).
    return SharedStore(RedisBackend(config, DIGEST), Sealer(KEY, DIGEST), lease_s=lease_s, retry_s=0.1, retry_cap_s=0.5)


def file_store(path: Path) -> SharedStore:
    return SharedStore(FileBackend(str(path), DIGEST), Sealer(KEY, DIGEST), lease_s=3.0)


class Fleet:
    """``FLEET`` managers on one provider, each with its own store connection, and steady traffic."""

    def __init__(self, idp: FakeIdP, stores: list[SharedStore | None], **options: Any) -> None:
        self.idp = idp
        self.managers = [
            TokenManager(idp, refresh_margin_s=60.0, store=store, transient_backoff=lambda *a: 0.3, **options)
            for store in stores
        ]
        self.errors: Counter[str] = Counter()
        self.served = 0

    async def __aenter__(self) -> Fleet:
        for manager in self.managers:
            manager.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for manager in self.managers:
            await manager.close()

    async def traffic(self, seconds: float, until: asyncio.Event | None = None) -> None:
        """Every manager serves a request every 20 ms for ``seconds`` (or until ``until`` is set); a token
        that reaches a request must not have expired by the provider's reckoning."""
        deadline = time.monotonic() + seconds

        async def one(manager: TokenManager) -> None:
            while time.monotonic() < deadline and not (until is not None and until.is_set()):
                try:
                    token = await manager.get()
                except NoToken as exc:
                    self.errors[str(exc)[:60]] += 1
                else:
                    if self.idp.clock() >= self.idp.expiry[token.access_token]:
                        self.errors["expired token sent"] += 1
                    self.served += 1
                await asyncio.sleep(0.02)

        await asyncio.gather(*(one(m) for m in self.managers))

    def presented_twice(self) -> list[str]:
        presented = [rt for kind, rt, _ in self.idp.calls if kind == "refresh" and rt is not None]
        return [rt for rt, n in Counter(presented).items() if n > 1]


async def wait_until(predicate: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return bool(predicate())


async def test_four_managers_on_one_redis_make_the_token_requests_of_one(redis_server):
    seconds = 5.0
    idp = FakeIdP(lifetime=LIFETIME, delay=0.05)
    async with Fleet(idp, [redis_store(redis_server) for _ in range(FLEET)]) as fleet:
        await fleet.traffic(seconds)
    lifetimes = seconds / LIFETIME
    # One renewal a token lifetime would be 2.5 here (renewed at half-life: 5); alone, each manager makes 5.
    assert len(idp.calls) <= 1.2 * 2 * lifetimes + 1, idp.kinds
    assert idp.kinds.count("login") == 1
    assert fleet.errors == Counter() and fleet.served > 500
    assert fleet.presented_twice() == []
    assert idp.most_in_flight == 1
    assert sum(m.counts["adopted"] for m in fleet.managers) >= len(idp.calls)


async def test_without_a_store_each_manager_renews_on_its_own():
    """The baseline the fleet test beats: the same traffic, four islands."""
    seconds = 3.0
    idp = FakeIdP(lifetime=LIFETIME)
    async with Fleet(idp, [None] * FLEET) as fleet:
        await fleet.traffic(seconds)
    assert idp.kinds.count("login") == FLEET
    assert len(idp.calls) >= FLEET * (seconds / LIFETIME * 2 - 1)


async def test_a_restarted_fleet_uses_the_stored_token_without_a_login(redis_server):
    idp = FakeIdP(lifetime=300.0)
    async with Fleet(idp, [redis_store(redis_server)]) as fleet:
        await fleet.managers[0].get()
    assert idp.kinds == ["login"]
    async with Fleet(idp, [redis_store(redis_server) for _ in range(FLEET)]) as restarted:
        await restarted.traffic(0.3)
        assert restarted.errors == Counter()
        assert {m.held.access_token for m in restarted.managers if m.held} == {"access-s3cr3t-tok-1"}
    assert idp.kinds == ["login"]  # no login, no refresh: the token was fresh


async def test_a_restart_with_only_a_live_refresh_token_refreshes(redis_server):
    idp = FakeIdP(lifetime=1.0, refresh_lifetime=600.0)
    async with Fleet(idp, [redis_store(redis_server)]) as fleet:
        await fleet.managers[0].get()
    await asyncio.sleep(1.0)  # the stored access token has expired; its refresh token lives
    async with Fleet(idp, [redis_store(redis_server) for _ in range(FLEET)]) as restarted:
        await restarted.traffic(0.2)
        assert restarted.errors == Counter()
    assert idp.kinds[:2] == ["login", "refresh"]
    assert idp.calls[1][1] == "refresh-s3cr3t-tok-1"
    assert "login" not in idp.kinds[1:]


async def test_wrong_credentials_are_tried_once_per_backoff_step_by_the_whole_fleet(redis_server):
    idp = FakeIdP()
    idp.outcomes = [rejected() for _ in range(50)]
    stores = [redis_store(redis_server) for _ in range(FLEET)]
    async with Fleet(idp, stores, rejected_backoff=lambda attempt, rand: 1.0) as fleet:
        await asyncio.sleep(2.5)
        reasons = {m.reason() for m in fleet.managers}
    # Steps at 0 s, 1 s, 2 s (plus the 1 s login spacing): three or four logins, not four per step.
    assert 2 <= idp.kinds.count("login") <= 4, idp.kinds
    assert all("Invalid user credentials" in r and "check the credentials" in r for r in reasons), reasons


async def test_redis_down_for_a_while_fails_no_request_and_the_fleet_converges_again(redis_server):
    idp = FakeIdP(lifetime=LIFETIME)
    async with Fleet(idp, [redis_store(redis_server) for _ in range(FLEET)]) as fleet:
        await fleet.traffic(1.0)
        redis_server.stop()
        await fleet.traffic(2.0)  # each manager renews alone meanwhile
        redis_server.start()
        back = time.monotonic()

        def converged() -> bool:
            held = [m.held.access_token if m.held else None for m in fleet.managers]
            states = {m.status()["store"]["state"] for m in fleet.managers}
            return states == {"available"} and len(set(held)) == 1 and None not in held

        done = asyncio.Event()
        traffic = asyncio.create_task(fleet.traffic(3 * LIFETIME, until=done))
        # One token lifetime after Redis is back, give or take the scheduling of a loaded 2-core machine.
        assert await wait_until(converged, 2 * LIFETIME), [m.status()["store"] for m in fleet.managers]
        converged_after = time.monotonic() - back
        await asyncio.sleep(0.5)  # and it stays so for a while
        assert converged()
        done.set()
        await traffic
    assert fleet.errors == Counter()
    assert converged_after <= 2 * LIFETIME
    assert fleet.presented_twice() == []


async def test_a_refresh_token_claimed_by_a_holder_that_vanished_is_not_presented_again(redis_server):
    """A holder dies after presenting the refresh token and before writing the answer: the next holder
    logs in (a password grant can) instead of presenting the maybe-rotated-away refresh token."""
    idp = FakeIdP(lifetime=LIFETIME)
    first = redis_store(redis_server, lease_s=0.5)
    async with Fleet(idp, [first]) as fleet:
        await fleet.managers[0].get()
        idp.gate = asyncio.Event()  # the next token request hangs at the provider
        await asyncio.sleep(LIFETIME / 2 + 0.2)  # the scheduled refresh is sent and hangs
        assert idp.kinds == ["login", "refresh"]
    # The holder is gone (closed while its refresh hung, as if killed); its claim is in the store.
    idp.gate = None
    await asyncio.sleep(0.5)  # its lease expires
    async with Fleet(idp, [redis_store(redis_server)]) as others:
        await others.traffic(0.3)
        assert others.errors == Counter()
    assert idp.kinds == ["login", "refresh", "login"]


async def test_two_managers_on_one_file_share_one_token_and_the_file_holds_none(tmp_path):
    path = tmp_path / "token"
    idp = FakeIdP(lifetime=LIFETIME)
    async with Fleet(idp, [file_store(path), file_store(path)]) as fleet:
        await fleet.traffic(2.5)
        held = {m.held.access_token for m in fleet.managers if m.held}
    assert fleet.errors == Counter()
    assert idp.kinds.count("login") == 1
    assert len(idp.calls) <= 1.2 * 2.5 + 1
    assert len(held) == 1
    raw = path.read_bytes()
    assert b"s3cr3t-tok" not in raw and b"access-" not in raw and b"refresh-" not in raw
    calls = len(idp.calls)
    async with Fleet(idp, [file_store(path)]) as restarted:
        await restarted.managers[0].get()
    assert len(idp.calls) == calls  # restart: no login


async def test_a_fixed_password_on_one_replica_ends_the_fleets_backoff(redis_server):
    """The fleet backs off after a refused login (minutes); the password file is fixed (each replica sees it
    change): the next login happens at once, and replicas still backing off take its token from the store."""
    idp = FakeIdP()
    idp.outcomes = [rejected()]
    stores = [redis_store(redis_server) for _ in range(FLEET)]
    async with Fleet(idp, stores) as fleet:  # the real backoff: a minute
        assert await wait_until(lambda: all(m.phase.value == "rejected" for m in fleet.managers), 3.0)
        assert idp.kinds == ["login"]
        fleet.managers[0].credentials_changed(("auth.password",))
        await fleet.traffic(1.5)
        held = [m.held.access_token if m.held else None for m in fleet.managers]
    assert idp.kinds == ["login", "login"]  # one login with the new password, for the whole fleet
    assert held == ["access-s3cr3t-tok-1"] * FLEET
    assert sum(fleet.errors.values()) > 0  # requests before the fix got the 503 they get today, no more


async def test_a_refusal_the_fleet_wrote_after_the_change_is_not_ignored(redis_server):
    """Each replica sees the Secret change; the new password is wrong too: one login for the fleet, not one each."""
    idp = FakeIdP()
    idp.outcomes = [rejected(), rejected(), rejected(), rejected(), rejected()]
    stores = [redis_store(redis_server) for _ in range(FLEET)]
    async with Fleet(idp, stores) as fleet:
        assert await wait_until(lambda: all(m.phase.value == "rejected" for m in fleet.managers), 3.0)
        for manager in fleet.managers:
            manager.credentials_changed(("auth.password",))
        await asyncio.sleep(2.0)
    assert idp.kinds == ["login", "login"]
