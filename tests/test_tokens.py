"""TokenManager: single flight, background refresh, rotation, fallbacks and backoff, with a fake identity provider."""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import time

import aiohttp
import pytest
from aiohttp import web

from proxy import state
from proxy.config import AuthConfig, InjectConfig
from proxy.errors import NoToken, TokenRejected, TokenUnavailable
from proxy.idp import IdentityProvider
from proxy.observability import TextFormatter
from proxy.state import Phase, Token, token_clock
from proxy.tokens import TokenManager

SECRET_MARK = "s3cr3t-tok"  # every token the fake issues contains it; logs must never show it


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeIdP:
    """Stands in for IdentityProvider: issues numbered tokens, records every call, fails on request.

    ``outcomes`` is a queue of what the next calls do: an exception to raise, or None to grant.
    ``gate``, when set, holds every call until it is opened.
    """

    def __init__(
        self,
        clock=token_clock,
        *,
        lifetime: float = 300.0,
        refresh_lifetime: float | None = 1800.0,
        delay: float = 0.0,
    ) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.refresh_lifetime = refresh_lifetime
        self.delay = delay
        self.outcomes: list[Exception | None] = []
        self.gate: asyncio.Event | None = None
        self.calls: list[tuple[str, str | None, float]] = []  # (kind, refresh token presented, clock)
        self.issued = 0
        self.ended: list[Token] = []

    @property
    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.calls]

    async def login(self) -> Token:
        return await self._grant("login", None)

    async def refresh(self, current: Token) -> Token:
        return await self._grant("refresh", current.refresh_token)

    async def end_session(self, token: Token) -> str:
        self.ended.append(token)
        return "logout"

    async def _grant(self, kind: str, presented: str | None) -> Token:
        self.calls.append((kind, presented, self.clock()))
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.outcomes:
            outcome = self.outcomes.pop(0)
            if outcome is not None:
                raise outcome
        self.issued += 1
        now = self.clock()
        access = f"access-{SECRET_MARK}-{self.issued}"
        return Token(
            access_token=access,
            obtained_at=now,
            expires_at=now + self.lifetime,
            refresh_token=f"refresh-{SECRET_MARK}-{self.issued}",
            refresh_expires_at=None if self.refresh_lifetime is None else now + self.refresh_lifetime,
            subject="demo",
            header_value=f"Bearer {access}",
        )


def rejected(description: str = "Invalid user credentials") -> TokenRejected:
    return TokenRejected("invalid_grant", description, 400)


@pytest.fixture
async def managers():
    """Makes TokenManagers and closes them all at the end of the test."""
    made: list[TokenManager] = []

    def make(idp, **options) -> TokenManager:
        options.setdefault("refresh_margin_s", 60.0)
        manager = TokenManager(idp, **options)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        await manager.close()


def logged(caplog) -> str:
    """The captured log lines as the sidecar writes them, structured fields included."""
    return "\n".join(TextFormatter().format(record) for record in caplog.records)


async def wait_until(predicate, within: float = 5.0) -> None:
    """Poll ``predicate`` every 10 ms, failing after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_200_concurrent_gets_cause_one_login(managers):
    """200 requests arriving together with no token share one login and all get its token."""
    idp = FakeIdP(delay=0.05)
    tm = managers(idp)
    tokens = await asyncio.gather(*(tm.get() for _ in range(200)))
    assert idp.kinds == ["login"]
    assert {t.access_token for t in tokens} == {f"access-{SECRET_MARK}-1"}
    assert tm.phase is Phase.HOLDING
    # Once held, further requests do not touch the identity provider at all.
    await asyncio.gather(*(tm.get() for _ in range(200)))
    assert len(idp.calls) == 1


async def test_cancelled_waiter_does_not_cancel_the_login(managers):
    """A client that gives up while the login is in flight does not abort it for the others."""
    idp = FakeIdP()
    idp.gate = asyncio.Event()
    tm = managers(idp)
    first = asyncio.create_task(tm.get())
    second = asyncio.create_task(tm.get())
    await wait_until(lambda: idp.calls)
    first.cancel()
    idp.gate.set()
    token = await asyncio.wait_for(second, 5)
    assert token.access_token.endswith("-1")
    assert idp.kinds == ["login"]


async def test_background_refresh_before_expiry_requests_do_not_wait(managers):
    """The scheduler refreshes at half the lifetime; while the refresh is held up, requests get the old token."""
    idp = FakeIdP(lifetime=1.0)
    tm = managers(idp)
    tm.start()
    first = await asyncio.wait_for(tm.get(), 5)
    idp.gate = asyncio.Event()  # the next token request hangs until the test opens the gate
    await wait_until(lambda: len(idp.calls) == 2)
    kind, presented, started = idp.calls[1]
    assert kind == "refresh"
    assert presented == first.refresh_token
    assert first.obtained_at + 0.5 <= started < first.unusable_at()  # due at half the lifetime, before expiry
    # The identity provider is stuck, yet a request gets the still-valid token at once.
    assert await asyncio.wait_for(tm.get(), 0.5) is first
    idp.gate.set()
    await wait_until(lambda: tm.usable() is not first)
    assert tm.usable().access_token.endswith("-2")
    assert idp.kinds == ["login", "refresh"]
    assert tm.counts["refreshes"] == 1


async def test_refresh_token_rotation_newest_is_always_used(managers):
    """Each refresh presents the refresh token from the latest response, never an older one."""
    clock = FakeClock()
    idp = FakeIdP(clock, lifetime=100.0)
    tm = managers(idp, clock=clock)
    await tm.get()
    for _ in range(3):
        clock.advance(100.0)  # expired: the next request renews
        await tm.get()
    assert idp.kinds == ["login", "refresh", "refresh", "refresh"]
    presented = [p for _, p, _ in idp.calls[1:]]
    assert presented == [f"refresh-{SECRET_MARK}-{n}" for n in (1, 2, 3)]
    assert tm.usable().access_token.endswith("-4")


async def test_rotation_on_the_wire_with_a_real_identity_provider(managers, aiohttp_server):
    """Through IdentityProvider: a refresh sends the rotated refresh token; a response without one keeps it."""
    answers = [
        {"access_token": "at-1", "expires_in": 100, "refresh_token": "rt-1", "token_type": "Bearer"},
        {"access_token": "at-2", "expires_in": 100, "refresh_token": "rt-2", "token_type": "Bearer"},
        {"access_token": "at-3", "expires_in": 100, "token_type": "Bearer"},  # no refresh token: keep rt-2
        {"access_token": "at-4", "expires_in": 100, "refresh_token": "rt-4", "token_type": "Bearer"},
    ]
    sent: list[dict[str, str]] = []

    async def token_endpoint(request: web.Request) -> web.Response:
        sent.append(dict(await request.post()))
        return web.json_response(answers[len(sent) - 1])

    app = web.Application()
    app.router.add_post("/token", token_endpoint)
    server = await aiohttp_server(app)
    auth = AuthConfig(
        provider="oauth2", token_url=str(server.make_url("/token")), client_id="cid", username="u", password="pw"
    )
    clock = FakeClock()
    async with aiohttp.ClientSession() as session:
        idp = IdentityProvider(session, auth, InjectConfig(), clock=clock)
        tm = managers(idp, clock=clock)
        for n in range(4):
            assert (await tm.get()).access_token == f"at-{n + 1}"
            clock.advance(100.0)
        await tm.close()
    assert [s["grant_type"] for s in sent] == ["password", "refresh_token", "refresh_token", "refresh_token"]
    assert [s.get("refresh_token") for s in sent] == [None, "rt-1", "rt-2", "rt-2"]


async def test_refresh_rejected_logs_in_within_the_same_flight(managers, caplog):
    """A refused refresh token is followed at once by a password login; the waiting request gets that token."""
    clock = FakeClock()
    idp = FakeIdP(clock, lifetime=100.0)
    tm = managers(idp, clock=clock)
    await tm.get()
    clock.advance(100.0)
    idp.outcomes = [rejected("Token is not active")]
    token = await tm.get()
    assert token.access_token.endswith("-2")
    assert idp.kinds == ["login", "refresh", "login"]
    assert tm.phase is Phase.HOLDING
    assert tm.counts == {"logins": 2, "refreshes": 0, "failures": 0, "rejections": 1}
    assert "token.refresh_rejected" in caplog.text
    assert SECRET_MARK not in logged(caplog)


async def test_expired_refresh_token_is_never_sent(managers):
    """When refresh_expires_in has passed (or is about to), the manager logs in instead of refreshing."""
    clock = FakeClock()
    idp = FakeIdP(clock, lifetime=100.0, refresh_lifetime=150.0)
    tm = managers(idp, clock=clock)
    await tm.get()
    clock.advance(200.0)  # access and refresh token both expired
    await tm.get()
    assert idp.kinds == ["login", "login"]
    # Within REFRESH_TOKEN_SKEW_S of the refresh token's expiry counts as expired too.
    clock.advance(150.0 - state.REFRESH_TOKEN_SKEW_S + 0.01)
    await tm.get()
    assert idp.kinds == ["login", "login", "login"]
    # A refresh token with life left is used.
    clock.advance(100.0)
    await tm.get()
    assert idp.kinds == ["login", "login", "login", "refresh"]


async def test_50_concurrent_401s_cause_one_renewal(managers):
    """Fifty requests rejected with the same token share one renewal, and every one of them gets the new token."""
    idp = FakeIdP(delay=0.05)
    tm = managers(idp)
    old = await tm.get()
    results = await asyncio.gather(*(tm.renew_rejected(old) for _ in range(50)))
    assert idp.kinds == ["login", "refresh"]
    assert all(r is not None for r in results), "some requests were not given the renewed token"
    assert {r.access_token for r in results} == {f"access-{SECRET_MARK}-2"}


async def test_401_on_an_old_token_does_not_renew(managers):
    """A 401 for a token that was already replaced returns the current token without a token request."""
    clock = FakeClock()
    idp = FakeIdP(clock)
    tm = managers(idp, clock=clock, rejection_renewal_interval_s=5.0)
    old = await tm.get()
    new = await tm.renew_rejected(old)
    assert new is not None and new is not old
    clock.advance(60.0)  # well past the renewal interval: only identity decides
    for _ in range(10):
        assert await tm.renew_rejected(old) is new
    assert idp.kinds == ["login", "refresh"]


async def test_repeated_401_on_the_new_token_is_not_renewed_at_once(managers):
    """A 401 on a token just obtained by a 401-renewal is passed back (no retry), not renewed in a loop."""
    clock = FakeClock()
    idp = FakeIdP(clock)
    tm = managers(idp, clock=clock, rejection_renewal_interval_s=5.0)
    first = await tm.get()
    second = await tm.renew_rejected(first)
    assert await tm.renew_rejected(second) is None
    assert idp.kinds == ["login", "refresh"]
    clock.advance(5.0)  # after the interval, a 401 may renew again
    assert await tm.renew_rejected(second) is not None
    assert idp.kinds == ["login", "refresh", "refresh"]


async def test_transient_failure_keeps_the_valid_token_and_backs_off(managers):
    """A 5xx on refresh keeps the held token in use and retries after the backoff, not at once."""
    backoffs: list[tuple[int, float | None]] = []

    def backoff(attempt, rand, retry_after=None):
        backoffs.append((attempt, retry_after))
        return 0.3

    idp = FakeIdP(lifetime=3.0)
    tm = managers(idp, transient_backoff=backoff)
    tm.start()
    first = await asyncio.wait_for(tm.get(), 5)
    idp.outcomes = [TokenUnavailable("token endpoint answered 503 (no OAuth error in the body)", reason="server_error")]
    await wait_until(lambda: tm.phase is Phase.BACKING_OFF)
    assert await asyncio.wait_for(tm.get(), 0.5) is first  # still valid: used, no waiting
    assert tm.status()["last_error"]["reason"] == "server_error"
    await wait_until(lambda: tm.usable() is not first)
    assert idp.kinds == ["login", "refresh", "refresh"]
    gap = idp.calls[2][2] - idp.calls[1][2]
    assert gap >= 0.29  # waited out the backoff
    assert backoffs == [(0, None)]
    assert tm.phase is Phase.HOLDING


async def test_transient_failure_without_a_token_gives_no_token_until_the_backoff_ends(managers):
    """With no usable token, requests during the backoff get NoToken at once, with no token request."""
    clock = FakeClock()
    idp = FakeIdP(clock)
    tm = managers(idp, clock=clock)
    idp.outcomes = [TokenUnavailable("token endpoint unreachable (connection refused)", reason="unreachable")]
    with pytest.raises(NoToken) as info:
        await tm.get()
    assert tm.phase is Phase.BACKING_OFF
    assert "unreachable" in info.value.detail
    assert info.value.retry_after == 1.0  # the first backoff is under 1 s; Retry-After is at least 1
    for _ in range(100):
        with pytest.raises(NoToken):
            await tm.get()
    assert len(idp.calls) == 1
    clock.advance(1.0)  # the first transient backoff is at most 1 s
    assert (await tm.get()).access_token.endswith("-1")
    assert idp.kinds == ["login", "login"]


async def test_retry_after_from_the_provider_is_honoured(managers):
    """A 429 with Retry-After: 30 keeps the manager from asking again for 30 s."""
    clock = FakeClock()
    idp = FakeIdP(clock)
    tm = managers(idp, clock=clock)
    idp.outcomes = [TokenUnavailable("token endpoint is rate limiting (429)", retry_after=30.0, reason="rate_limited")]
    with pytest.raises(NoToken) as info:
        await tm.get()
    assert info.value.retry_after == pytest.approx(30.0)
    clock.advance(29.0)
    with pytest.raises(NoToken):
        await tm.get()
    assert len(idp.calls) == 1
    clock.advance(1.0)
    await tm.get()
    assert idp.kinds == ["login", "login"]


async def test_rejected_login_gives_no_token_with_reason_and_waits_minutes(managers, caplog):
    """Wrong credentials: REJECTED, NoToken says why and when; no further login for about a minute."""
    clock = FakeClock()
    idp = FakeIdP(clock)
    tm = managers(idp, clock=clock)
    idp.outcomes = [rejected(), rejected()]
    with pytest.raises(NoToken) as info:
        await tm.get()
    assert tm.phase is Phase.REJECTED
    assert "Invalid user credentials" in info.value.detail
    assert "check the credentials" in info.value.detail
    assert 54.0 <= info.value.retry_after <= 60.0
    for _ in range(200):
        with pytest.raises(NoToken):
            await tm.get()
    assert len(idp.calls) == 1
    clock.advance(60.0)
    with pytest.raises(NoToken) as info:
        await tm.get()
    assert len(idp.calls) == 2
    assert 108.0 <= info.value.retry_after <= 120.0  # the second rejection doubles the wait
    assert "token.login_rejected" in caplog.text


async def test_rejected_login_is_not_retried_in_a_tight_loop(managers):
    """With the scheduler running and requests hammering, logins are spaced by the rejected backoff."""
    idp = FakeIdP()
    idp.outcomes = [rejected()] * 1000
    tm = managers(idp, rejected_backoff=lambda attempt, rand: 0.25)
    tm.start()
    window = 1.5
    deadline = time.monotonic() + window
    refused = 0
    for _ in range(10_000):
        if time.monotonic() >= deadline:
            break
        try:
            await tm.get()
        except NoToken:
            refused += 1
        await asyncio.sleep(0.001)
    assert refused > 10
    assert 2 <= len(idp.calls) <= window / 0.25 + 2
    assert tm.phase is Phase.REJECTED


async def test_renewal_after_refresh_and_login_were_rejected(managers):
    """Refresh refused, then login refused: after the backoff it logs in, never re-sending the dead refresh token."""
    clock = FakeClock()
    idp = FakeIdP(clock, lifetime=100.0)
    tm = managers(idp, clock=clock)
    await tm.get()
    clock.advance(100.0)
    idp.outcomes = [rejected("Token is not active"), rejected()]
    with pytest.raises(NoToken):
        await tm.get()
    assert tm.phase is Phase.REJECTED
    clock.advance(60.0)
    token = await tm.get()
    assert token.access_token.endswith("-2")
    assert idp.kinds == ["login", "refresh", "login", "login"]
    assert tm.phase is Phase.HOLDING


async def test_a_session_shorter_than_the_access_token_is_kept_by_refreshing(managers):
    """A provider whose refresh token (its session) lives 6 s while access tokens live 5 minutes: the
    scheduler refreshes while the refresh token works, so the session never lapses into a new login
    (with a spent authorization code there would be none)."""
    idp = FakeIdP(lifetime=300.0, refresh_lifetime=6.0)  # the refresh token's last moment: 1 s (5 s skew)
    tm = managers(idp)
    tm.start()
    first = await asyncio.wait_for(tm.get(), 5)
    await wait_until(lambda: len(idp.calls) >= 3, within=5)
    assert idp.kinds[:3] == ["login", "refresh", "refresh"]
    assert idp.calls[1][1] == first.refresh_token
    assert idp.calls[1][2] - first.obtained_at < 1.0  # sent before the refresh token's last moment


async def test_close_stops_the_scheduler_and_ends_the_session(managers):
    """close(revoke=True) ends the session at the provider once and leaves no token behind; no renewal follows."""
    idp = FakeIdP(lifetime=1.0)  # the scheduler would refresh at half the lifetime, 0.5 s after the login
    tm = managers(idp)
    tm.start()
    token = await asyncio.wait_for(tm.get(), 5)
    await tm.close(revoke=True)
    assert idp.ended == [token]
    assert tm.phase is Phase.STOPPED
    assert tm.usable() is None
    await asyncio.sleep(token.obtained_at + 0.7 - token_clock())  # past the time the refresh was due
    assert idp.kinds == ["login"]


async def test_status_and_logs_never_show_a_token(managers, caplog):
    """Status names the token by its fingerprint; neither it nor the logs contain the token or refresh token."""
    caplog.set_level(logging.DEBUG)
    clock = FakeClock()
    idp = FakeIdP(clock, lifetime=100.0)
    tm = managers(idp, clock=clock)
    token = await tm.get()
    clock.advance(100.0)
    idp.outcomes = [TokenUnavailable("token endpoint answered 502", reason="server_error")]
    with pytest.raises(NoToken):
        await tm.get()
    status = tm.status()
    assert status["token"]["id"] == token.id
    assert SECRET_MARK not in repr(status)
    assert SECRET_MARK not in logged(caplog)
    assert token.id in logged(caplog)  # the fingerprint is what identifies it


def test_token_times_count_the_time_the_machine_slept():
    """A laptop closed overnight: time.monotonic() stops while the machine sleeps (Linux, macOS), so a token
    that expired during the night would still look valid. Token times use a clock that keeps counting, and
    the token manager and the identity provider use it unless told otherwise."""
    if sys.platform == "linux":
        before = time.clock_gettime(time.CLOCK_BOOTTIME)
        now = token_clock()
        assert before <= now <= time.clock_gettime(time.CLOCK_BOOTTIME)
    started, at = time.monotonic(), token_clock()
    time.sleep(0.05)
    assert abs((token_clock() - at) - (time.monotonic() - started)) < 0.01  # same rate while awake
    for cls in (TokenManager, IdentityProvider):
        assert inspect.signature(cls).parameters["clock"].default is token_clock
