"""TokenManager: single flight, background refresh, rotation, fallbacks and backoff, with a fake identity provider."""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time

import aiohttp
import pytest
from aiohttp import web

from proxy import state
from proxy.config import AuthConfig, InjectConfig
from proxy.errors import NoToken, TokenUnavailable
from proxy.idp import IdentityProvider
from proxy.observability import TextFormatter
from proxy.state import Phase, Token, token_clock
from tests.fakes.clock import FakeClock, VirtualTime
from tests.fakes.idp import SECRET_MARK, FakeIdP, rejected, unavailable


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
    vt = VirtualTime()
    idp = FakeIdP(vt, lifetime=1.0, sleep=vt.sleep)
    tm = managers(idp, clock=vt, sleep=vt.sleep)
    tm.start()
    first = await asyncio.wait_for(tm.get(), 5)
    idp.gate = asyncio.Event()  # the next token request hangs until the test opens the gate
    await vt.run_until(lambda: len(idp.calls) == 2, within=5.0)
    kind, presented, started = idp.calls[1]
    assert kind == "refresh"
    assert presented == first.refresh_token
    assert first.obtained_at + 0.5 <= started < first.unusable_at()  # due at half the lifetime, before expiry
    # The identity provider is stuck, yet a request gets the still-valid token at once.
    assert await asyncio.wait_for(tm.get(), 0.5) is first
    idp.gate.set()
    await vt.run_until(lambda: tm.usable() is not first, within=5.0)
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
    tm = managers(idp, clock=clock)
    old = await tm.get()
    new = await tm.renew_rejected(old)
    assert new is not None and new is not old
    clock.advance(60.0)  # well past the renewal interval: only identity decides
    for _ in range(10):
        assert await tm.renew_rejected(old) is new
    assert idp.kinds == ["login", "refresh"]


async def test_a_token_the_upstream_accepted_is_renewed_at_once_on_every_revoke(managers):
    """Revoked, renewed, accepted, revoked again a second later: each 401 on a token the upstream had
    accepted renews at once, however soon after the last renewal (no 401 reaches a client)."""
    clock = FakeClock()
    idp = FakeIdP(clock)
    tm = managers(idp, clock=clock)
    token = await tm.get()
    for _ in range(4):
        tm.accepted(token)  # the upstream answered 200 to it
        clock.advance(1.0)
        renewed = await tm.renew_rejected(token)  # ... and now 401: revoked
        assert renewed is not None and renewed is not token
        token = renewed
    assert idp.kinds == ["login"] + ["refresh"] * 4


async def test_a_path_that_always_answers_401_costs_a_handful_of_token_requests_an_hour(managers):
    """A path that always answers 401 (no token is ever accepted), a request every second for two hours: one
    renewal, then a minute, two, four ... between them (each renewal's token was rejected too: renewing does
    not help); about six token requests in the first hour, one or two in the second."""
    clock = FakeClock()
    idp = FakeIdP(clock, lifetime=36000.0, refresh_lifetime=None)
    tm = managers(idp, clock=clock)
    token = await tm.get()
    renewed_at: list[float] = []
    started = clock.now
    for _ in range(2 * 3600):
        renewed = await tm.renew_rejected(tm.usable() or token)
        if renewed is not None:
            renewed_at.append(clock.now - started)
        clock.advance(1.0)
    assert renewed_at[:3] == [0.0, 60.0, 180.0]
    first_hour = [t for t in renewed_at if t < 3600]
    assert len(first_hour) <= 7, renewed_at
    assert len(renewed_at) - len(first_hour) <= 2, renewed_at
    assert len(idp.calls) == 1 + len(renewed_at)


async def test_401s_on_one_path_among_accepted_requests_stay_bounded(managers):
    """Every token is accepted on most paths and rejected on one: the renewals of accepted tokens are
    bounded too (a handful at once, then one every EVIDENCE_REFILL_S), not one per request to that path."""
    clock = FakeClock()
    idp = FakeIdP(clock, lifetime=36000.0, refresh_lifetime=None)
    tm = managers(idp, clock=clock)
    await tm.get()
    for _ in range(3600):  # an hour: every second a 200 on /ok, then a 401 on /bad
        tm.accepted(tm.usable())
        await tm.renew_rejected(tm.usable())
        clock.advance(1.0)
    renewals = len(idp.calls) - 1
    assert renewals <= state.EVIDENCE_BURST + 3600 / state.EVIDENCE_REFILL_S + 1, renewals


async def test_a_renewal_withheld_passes_the_401_back_without_a_token_request(managers):
    """A 401 on the token a 401-triggered renewal just obtained, never accepted: None at once, no token request;
    a token obtained on schedule since then is renewed again (a second revoke right after a refresh)."""
    vt = VirtualTime()
    idp = FakeIdP(vt, lifetime=100.0)
    tm = managers(idp, clock=vt, sleep=vt.sleep)
    await tm.get()
    assert await tm.renew_rejected(tm.usable()) is not None
    calls = len(idp.calls)
    assert await tm.renew_rejected(tm.usable()) is None
    assert len(idp.calls) == calls
    tm.start()  # the scheduler ...
    await vt.run_for(49.9)
    assert len(idp.calls) == calls  # not before
    await vt.run_for(0.1)  # ... renews at half the lifetime
    assert len(idp.calls) == calls + 1
    assert await tm.renew_rejected(tm.usable()) is not None


async def test_transient_failure_keeps_the_valid_token_and_backs_off(managers):
    """A 5xx on refresh keeps the held token in use and retries after the backoff, not at once."""
    backoffs: list[tuple[int, float | None]] = []

    def backoff(attempt, rand, retry_after=None):
        backoffs.append((attempt, retry_after))
        return 0.3

    vt = VirtualTime()
    idp = FakeIdP(vt, lifetime=3.0, sleep=vt.sleep)
    tm = managers(idp, clock=vt, sleep=vt.sleep, transient_backoff=backoff)
    tm.start()
    first = await asyncio.wait_for(tm.get(), 5)
    idp.outcomes = [TokenUnavailable("token endpoint answered 503 (no OAuth error in the body)", reason="server_error")]
    await vt.run_until(lambda: tm.phase is Phase.BACKING_OFF, within=5.0)
    assert await asyncio.wait_for(tm.get(), 0.5) is first  # still valid: used, no waiting
    assert tm.status()["last_error"]["reason"] == "server_error"
    await vt.run_until(lambda: tm.usable() is not first, within=5.0)
    assert idp.kinds == ["login", "refresh", "refresh"]
    gap = idp.calls[2][2] - idp.calls[1][2]
    assert gap >= 0.29  # waited out the backoff
    assert backoffs == [(0, None)]
    assert tm.phase is Phase.HOLDING


async def test_transient_failure_without_a_token_gives_no_token_until_the_backoff_ends(managers):
    """With no usable token, requests during the backoff (a few seconds) get NoToken at once, with no token request."""
    clock = FakeClock()
    idp = FakeIdP(clock)
    tm = managers(idp, clock=clock, rand=lambda: 0.0)
    idp.outcomes = [TokenUnavailable("token endpoint unreachable (connection refused)", reason="unreachable")]
    with pytest.raises(NoToken) as info:
        await tm.get()
    assert tm.phase is Phase.BACKING_OFF
    assert "unreachable" in info.value.detail
    assert info.value.retry_after == state.NO_TOKEN_RETRY_S  # a few seconds, not the minutes of a long outage
    for _ in range(100):
        with pytest.raises(NoToken):
            await tm.get()
    assert len(idp.calls) == 1
    clock.advance(state.NO_TOKEN_RETRY_S)
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
    vt = VirtualTime()
    idp = FakeIdP(vt)
    idp.outcomes = [rejected()] * 1000
    tm = managers(idp, clock=vt, sleep=vt.sleep, rejected_backoff=lambda attempt, rand: 5.0)
    tm.start()
    refused = 0
    for _ in range(600):  # a request every 50 ms for 30 s
        try:
            await tm.get()
        except NoToken:
            refused += 1
        await vt.run_for(0.05)
    assert refused == 600
    assert 6 <= len(idp.calls) <= 7
    assert tm.phase is Phase.REJECTED


async def test_logins_are_one_at_a_time_and_at_least_a_second_apart(managers):
    """Even with no backoff at all after a refusal (a test policy of 0 s), a second login never follows the
    first within MIN_LOGIN_INTERVAL_S: Keycloak locks an account for a minute after two quick failures."""
    vt = VirtualTime()
    idp = FakeIdP(vt, delay=0.05, sleep=vt.sleep)
    idp.outcomes = [rejected()] * 1000
    tm = managers(idp, clock=vt, sleep=vt.sleep, rejected_backoff=lambda attempt, rand: 0.0)
    tm.start()
    await vt.run_for(10.0)
    times = idp.times("login")
    assert 8 <= len(times) <= 11
    assert all(b - a >= state.MIN_LOGIN_INTERVAL_S for a, b in itertools.pairwise(times)), times
    assert idp.most_in_flight == 1


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
    vt = VirtualTime()
    idp = FakeIdP(vt, lifetime=300.0, refresh_lifetime=6.0, sleep=vt.sleep)  # its last moment: 1 s (5 s skew)
    tm = managers(idp, clock=vt, sleep=vt.sleep)
    tm.start()
    first = await asyncio.wait_for(tm.get(), 5)
    await vt.run_until(lambda: len(idp.calls) >= 3, within=5.0)
    assert idp.kinds[:3] == ["login", "refresh", "refresh"]
    assert idp.calls[1][1] == first.refresh_token
    assert idp.calls[1][2] - first.obtained_at < 1.0  # sent before the refresh token's last moment


async def test_close_stops_the_scheduler_and_ends_the_session(managers):
    """close(revoke=True) ends the session at the provider once and leaves no token behind; no renewal follows."""
    vt = VirtualTime()
    idp = FakeIdP(vt, lifetime=1.0, sleep=vt.sleep)  # the scheduler would refresh at half the lifetime, at 0.5 s
    tm = managers(idp, clock=vt, sleep=vt.sleep)
    tm.start()
    token = await asyncio.wait_for(tm.get(), 5)
    await tm.close(revoke=True)
    assert idp.ended == [token]
    assert tm.phase is Phase.STOPPED
    assert tm.usable() is None
    await vt.run_for(token.obtained_at + 0.7 - vt.now)  # past the time the refresh was due
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
    that expired during the night would still look valid. Token times use a clock that keeps counting while
    the machine sleeps, and runs at monotonic's rate while it is awake."""
    if sys.platform == "linux":
        before = time.clock_gettime(time.CLOCK_BOOTTIME)
        now = token_clock()
        assert before <= now <= time.clock_gettime(time.CLOCK_BOOTTIME)
    started, at = time.monotonic(), token_clock()
    time.sleep(0.05)
    assert abs((token_clock() - at) - (time.monotonic() - started)) < 0.01  # same rate while awake


# The clock that keeps counting while the machine sleeps, as time.clock_gettime names it (time.monotonic()
# does not go through clock_gettime, so moving this one alone is a machine that slept).
SLEEP_AWARE_CLOCK = {"linux": "CLOCK_BOOTTIME", "darwin": "CLOCK_MONOTONIC"}.get(sys.platform, "")


@pytest.mark.skipif(not hasattr(time, SLEEP_AWARE_CLOCK), reason="no clock that counts sleep on this platform")
async def test_a_token_that_expired_while_the_machine_slept_is_not_sent(managers, aiohttp_server, monkeypatch):
    """The machine sleeps ten hours with a 5-minute token held: a token manager and an identity provider on
    their default clocks see it expired on waking, refresh, and hand out the new token, never the old one."""
    answers = [
        {"access_token": "at-before-the-night", "expires_in": 300, "refresh_token": "rt-1", "token_type": "Bearer"},
        {"access_token": "at-after-the-night", "expires_in": 300, "refresh_token": "rt-2", "token_type": "Bearer"},
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
    sleep_aware, night = getattr(time, SLEEP_AWARE_CLOCK), 0.0
    real_clock_gettime = time.clock_gettime

    def clock_gettime(clock_id: int) -> float:
        return real_clock_gettime(clock_id) + (night if clock_id == sleep_aware else 0.0)

    monkeypatch.setattr(time, "clock_gettime", clock_gettime)
    async with aiohttp.ClientSession() as session:
        tm = managers(IdentityProvider(session, auth, InjectConfig()))
        assert (await tm.get()).access_token == "at-before-the-night"
        night = 10 * 3600.0
        assert tm.usable() is None
        assert (await tm.get()).access_token == "at-after-the-night"
        await tm.close()
    assert [s["grant_type"] for s in sent] == ["password", "refresh_token"]


# --- the retry schedule, refresh first, on virtual time ----------------------------------------------


async def test_transient_refresh_failures_are_retried_as_refreshes_while_the_token_can_be_sent(managers):
    """Five 503s in a row on the refresh of a 300 s token: every retry is a refresh, several fit before the
    token stops being sent, none waits longer than a third of what is left, and no login opens a new session."""
    vt = VirtualTime()
    idp = FakeIdP(vt, lifetime=300.0, sleep=vt.sleep)
    tm = managers(idp, clock=vt, sleep=vt.sleep)
    tm.start()
    await vt.run_for(0.1)
    first = tm.usable()
    idp.outcomes = [unavailable()] * 5
    await vt.run_until(lambda: tm.usable() is not first, within=300.0, step=1.0)
    assert idp.kinds == ["login"] + ["refresh"] * 6
    times = idp.times()[1:]
    for before, after in itertools.pairwise(times):
        assert after - before <= (first.usable_until - before) / 3 + 1e-6
        assert after - before >= state.RETRY_FLOOR_S
    assert times[-1] < first.usable_until
    assert tm.status()["counters"] == {"logins": 1, "refreshes": 1, "failures": 5, "rejections": 0}
    assert idp.ended == []


async def test_a_login_replaces_a_session_only_once_the_token_cannot_be_sent_and_ends_the_old_one(managers, caplog):
    """Refreshes fail until the access token can no longer be sent: then a login, and the session it replaces
    (its refresh token still alive) is ended at the provider, so sessions do not pile up."""
    vt = VirtualTime()
    idp = FakeIdP(vt, lifetime=30.0, sleep=vt.sleep)
    tm = managers(idp, clock=vt, sleep=vt.sleep)
    tm.start()
    await vt.run_for(0.1)
    first = tm.usable()
    idp.failing = {"refresh"}  # the refresh path is broken (Keycloak's refresh lock timing out, say)
    await vt.run_until(lambda: tm.usable() is not first and tm.usable() is not None, within=60.0, step=0.1)
    login_at = idp.times("login")[1]
    assert login_at >= first.usable_until  # never while the token could still be sent
    assert all(kind == "refresh" for kind, _, at in idp.calls[1:] if at < first.usable_until)
    assert idp.kinds[-1] == "login"
    await vt.run_for(0.1)
    assert idp.ended and idp.ended[0] is first  # the replaced session, by its (live) refresh token
    assert [r.fields.get("why") for r in caplog.records if r.getMessage() == "token.session_ended"] == [
        "replaced by a new login"
    ]


async def test_a_refused_refresh_logs_in_without_ending_a_session(managers):
    """A refresh token the provider refused is dead: the login that follows has no old session to end."""
    clock = FakeClock()
    idp = FakeIdP(clock, lifetime=100.0)
    tm = managers(idp, clock=clock)
    await tm.get()
    clock.advance(100.0)
    idp.outcomes = [rejected("Session not active")]
    await tm.get()
    await asyncio.sleep(0)
    assert idp.kinds == ["login", "refresh", "login"]
    assert idp.ended == []


async def test_a_ten_minute_outage_costs_about_one_request_every_10s_after_the_first_minute(managers):
    """The provider is down for ten minutes from the start: token requests stay a few seconds apart at first,
    then at most about one every 10 s, and once the provider is back the next attempt gets a token."""
    vt = VirtualTime()
    idp = FakeIdP(vt, sleep=vt.sleep, delay=0.05)
    idp.outcomes = [unavailable()] * 10_000
    tm = managers(idp, clock=vt, sleep=vt.sleep)
    started = vt.now
    tm.start()
    await vt.run_for(600.0)
    times = [t - started for t in idp.times()]
    first_minute = [t for t in times if t < 60]
    assert len(first_minute) >= 10  # a few seconds apart while requests wait
    assert all(b - a >= state.NO_TOKEN_RETRY_S for a, b in itertools.pairwise(times))
    later = [t for t in times if t >= 60]
    assert len(later) <= 540 / 10, later
    assert all(b - a >= 9.9 for a, b in itertools.pairwise(later)), later
    idp.outcomes = []
    await vt.run_until(lambda: tm.usable() is not None, within=state.TRANSIENT_BACKOFF_CAP_S * 1.6, step=1.0)


def test_retry_delay_fits_the_token_that_is_left():
    """The schedule as a function: a third of what is left at most, never below the floor; without a token a
    few seconds, growing with the outage up to the cap; Retry-After is a floor."""
    held = state.Lifecycle(token=Token("a", obtained_at=0.0, expires_at=3.0), transient_failures=1, failing_since=1.5)
    assert held.token.usable_until == pytest.approx(2.7)
    assert state.retry_delay(held, 1.5, 0.99) == pytest.approx(1.2 / 3)
    assert state.retry_delay(held, 2.5, 0.99) == state.RETRY_FLOOR_S
    many = state.Lifecycle(token=Token("a", obtained_at=0.0, expires_at=3600.0), transient_failures=20)
    assert state.retry_delay(many, 100.0, 0.99) <= state.TRANSIENT_BACKOFF_CAP_S
    gone = state.Lifecycle(transient_failures=9, failing_since=0.0)
    assert state.retry_delay(gone, 1.0, 0.0) == state.NO_TOKEN_RETRY_S
    assert state.NO_TOKEN_RETRY_S <= state.retry_delay(gone, 1.0, 0.99) <= 1.5 * state.NO_TOKEN_RETRY_S
    assert state.retry_delay(gone, 60.0, 0.0) == pytest.approx(10.0)
    assert state.retry_delay(gone, 3600.0, 0.0) == state.TRANSIENT_BACKOFF_CAP_S
    assert state.retry_delay(gone, 1.0, 0.0, retry_after=30.0) == 30.0
    assert state.retry_delay(gone, 1.0, 0.0, retry_after=1e9) == state.RETRY_AFTER_CAP_S


# --- a hostile provider, a 401-happy upstream, the clock: the schedule holds ----------------------------------


async def test_tiny_expires_in_does_not_make_a_refresh_storm(managers):
    """A provider issuing 50 ms tokens with refresh tokens: the sidecar refreshes every 25 ms, ~400 token
    requests in 10 s, forever (no floor between scheduled renewals, unlike retries' RETRY_FLOOR_S)."""
    vt = VirtualTime()
    source = FakeIdP(vt, lifetime=0.05, refresh_lifetime=None)
    tm = managers(source, clock=vt, sleep=vt.sleep)
    tm.start()
    await vt.run_for(10.0)
    limit = 10.0 / state.RETRY_FLOOR_S + 1
    assert len(source.calls) <= limit, f"{len(source.calls)} token requests in 10 s"


async def test_logins_stay_a_second_apart_whatever_fails(managers):
    """150 virtual seconds of logins failing every way (refused, 503, crash): never two logins within 1 s."""
    vt = VirtualTime()
    source = FakeIdP(vt, delay=0.01, sleep=vt.sleep, refresh_lifetime=None)
    source.outcomes = list(
        itertools.islice(itertools.cycle([rejected(), unavailable(), RuntimeError("boom"), ValueError("x")]), 2000)
    )
    tm = managers(
        source,
        clock=vt,
        sleep=vt.sleep,
        transient_backoff=lambda a, r, ra=None: 0.0,
        rejected_backoff=lambda a, r: 0.0,
    )
    tm.start()
    await vt.run_for(150.0)  # about 145 logins, each kind of failure followed by each
    times = source.times("login")
    assert len(times) >= 100
    assert all(b - a >= state.MIN_LOGIN_INTERVAL_S for a, b in itertools.pairwise(times))
    assert source.most_in_flight == 1


async def test_scheduler_survives_unexpected_exceptions_from_the_provider(managers):
    """RuntimeError / RecursionError / KeyError from a renewal are internal_error retries: renewing goes on."""
    vt = VirtualTime()
    source = FakeIdP(vt, lifetime=10.0)
    tm = managers(source, clock=vt, sleep=vt.sleep)
    tm.start()
    await vt.run_for(0.1)
    source.outcomes = [RuntimeError("boom"), RecursionError("deep"), KeyError("k")]
    await vt.run_for(60.0)
    assert tm.scheduling
    assert tm.usable() is not None
    assert tm.counts["failures"] == 3
    assert tm.last_error is not None and tm.last_error.reason == "internal_error"


async def test_upstream_that_alternates_200_and_401_costs_bounded_renewals(managers):
    """Two virtual hours of an upstream answering 200 then 401 to every token: the renewals stay bounded."""
    clock = FakeClock()
    source = FakeIdP(clock, lifetime=36000.0, refresh_lifetime=None)
    tm = managers(source, clock=clock)
    await tm.get()
    for n in range(7200):
        token = tm.usable()
        assert token is not None
        if n % 2:
            tm.accepted(token)
        else:
            await tm.renew_rejected(token)
        clock.advance(1.0)
    assert len(source.calls) <= 1 + state.EVIDENCE_BURST + 7200 / state.EVIDENCE_REFILL_S + state.FRESH_BURST + 2


async def test_200_concurrent_401s_while_the_provider_hangs_cause_one_request(managers):
    """200 requests get a 401 at once while the provider hangs: one token request, and none of them hangs forever."""
    vt = VirtualTime()
    source = FakeIdP(vt, lifetime=300.0)
    tm = managers(source, clock=vt, sleep=vt.sleep)
    token = await tm.get()
    tm.accepted(token)
    source.gate = asyncio.Event()
    waiters = [asyncio.ensure_future(tm.renew_rejected(token)) for _ in range(200)]
    await vt.run_for(1.0)
    assert len(source.calls) == 2 and source.in_flight == 1
    source.gate.set()
    await vt.run_for(1.0)
    results = await asyncio.gather(*waiters)
    assert len({id(r) for r in results}) == 1 and results[0] is not token
    assert len(source.calls) == 2


async def test_clock_jump_past_expiry_never_hands_out_the_expired_token(managers):
    """The clock jumps an hour (a suspended laptop): get() never returns the dead token; it renews first."""
    vt = VirtualTime()
    source = FakeIdP(vt, lifetime=300.0, refresh_lifetime=1800.0)
    tm = managers(source, clock=vt, sleep=vt.sleep)
    tm.start()
    await vt.run_for(0.1)
    old = tm.usable()
    vt.advance(3600.0)
    assert tm.usable() is None
    task = asyncio.ensure_future(tm.get())
    await vt.run_for(1.0)
    new = await task
    assert new is not old and vt() < new.usable_until
    assert source.kinds[-1] == "login"  # the refresh token died too


async def test_refresh_token_rotating_to_the_same_value_is_harmless(managers):
    """A provider 'rotating' the refresh token to the value it already had: refreshes go on, no login."""
    clock = FakeClock()
    source = FakeIdP(clock, lifetime=100.0)
    tm = managers(source, clock=clock)
    first = await tm.get()

    async def same(current: Token) -> Token:
        source.calls.append(("refresh", current.refresh_token, clock()))
        return Token("at-same-" + str(len(source.calls)), clock(), clock() + 100.0, refresh_token=first.refresh_token)

    source.refresh = same  # type: ignore[method-assign]
    for _ in range(3):
        clock.advance(100.0)
        await tm.get()
    assert source.kinds == ["login", "refresh", "refresh", "refresh"]
    assert {rt for kind, rt, _ in source.calls if kind == "refresh"} == {first.refresh_token}
