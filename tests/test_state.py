"""The token lifecycle without I/O: the transition table, token health, renewal choice, backoff."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools

import pytest

from proxy import state
from proxy.state import Event, Health, IllegalTransition, Lifecycle, Phase, Token, choose_renewal, transition

# Every legal (phase, event) -> phase, written out by hand: the table in state.py must match it exactly.
EXPECTED = {
    (Phase.IDLE, Event.LOGIN): Phase.LOGGING_IN,
    (Phase.IDLE, Event.STOP): Phase.STOPPED,
    (Phase.HOLDING, Event.LOGIN): Phase.LOGGING_IN,
    (Phase.HOLDING, Event.REFRESH): Phase.REFRESHING,
    (Phase.HOLDING, Event.STOP): Phase.STOPPED,
    (Phase.BACKING_OFF, Event.LOGIN): Phase.LOGGING_IN,
    (Phase.BACKING_OFF, Event.REFRESH): Phase.REFRESHING,
    (Phase.BACKING_OFF, Event.STOP): Phase.STOPPED,
    (Phase.REJECTED, Event.LOGIN): Phase.LOGGING_IN,
    (Phase.REJECTED, Event.REFRESH): Phase.REFRESHING,  # a refused login; the session's refresh token lives on
    (Phase.REJECTED, Event.STOP): Phase.STOPPED,
    (Phase.LOGGING_IN, Event.GRANTED): Phase.HOLDING,
    (Phase.LOGGING_IN, Event.REJECTED): Phase.REJECTED,
    (Phase.LOGGING_IN, Event.FAILED): Phase.BACKING_OFF,
    (Phase.LOGGING_IN, Event.STOP): Phase.STOPPED,
    (Phase.REFRESHING, Event.GRANTED): Phase.HOLDING,
    (Phase.REFRESHING, Event.REJECTED): Phase.LOGGING_IN,  # a refused refresh falls back to a login
    (Phase.REFRESHING, Event.FAILED): Phase.BACKING_OFF,
    (Phase.REFRESHING, Event.STOP): Phase.STOPPED,
    (Phase.STOPPED, Event.STOP): Phase.STOPPED,
    # Between renewals (never during one, never once stopped) the fleet's store can hand over a token or a refusal.
    (Phase.IDLE, Event.ADOPTED): Phase.HOLDING,
    (Phase.HOLDING, Event.ADOPTED): Phase.HOLDING,
    (Phase.BACKING_OFF, Event.ADOPTED): Phase.HOLDING,
    (Phase.REJECTED, Event.ADOPTED): Phase.HOLDING,
    (Phase.IDLE, Event.FLEET_REJECTED): Phase.REJECTED,
    (Phase.HOLDING, Event.FLEET_REJECTED): Phase.REJECTED,
    (Phase.BACKING_OFF, Event.FLEET_REJECTED): Phase.REJECTED,
    (Phase.REJECTED, Event.FLEET_REJECTED): Phase.REJECTED,
}
ILLEGAL = [pair for pair in itertools.product(Phase, Event) if pair not in EXPECTED]


def token(lifetime: float, *, at: float = 1000.0, refresh_in: float | None = None, refresh: str | None = "rt") -> Token:
    return Token(
        access_token="access-token-value",
        obtained_at=at,
        expires_at=at + lifetime,
        refresh_token=refresh,
        refresh_expires_at=None if refresh_in is None else at + refresh_in,
    )


@pytest.mark.parametrize(("phase", "event"), list(EXPECTED))
def test_every_legal_transition(phase, event):
    """Each legal (phase, event) pair leads to the documented phase."""
    assert transition(phase, event) is EXPECTED[(phase, event)]


def test_table_has_no_unlisted_transitions():
    """The table holds exactly the legal pairs above, nothing more."""
    actual = {(p, e): to for p, row in state.TRANSITIONS.items() for e, to in row.items()}
    assert actual == EXPECTED


@pytest.mark.parametrize(("phase", "event"), ILLEGAL)
def test_illegal_transition_raises(phase, event):
    """An event the current phase does not accept raises IllegalTransition naming both."""
    with pytest.raises(IllegalTransition) as info:
        transition(phase, event)
    assert event.value in str(info.value)
    assert phase.value in str(info.value)


def test_health_thresholds():
    """A 100 s token with a 10 s margin: fresh until 90 s, stale until 95 s, then expired."""
    t = token(100.0, at=0.0)
    assert t.refresh_at(10.0) == 90.0
    assert t.unusable_at() == 95.0  # EXPIRY_SKEW_S before expiry
    assert t.health(0.0, 10.0) is Health.FRESH
    assert t.health(89.9, 10.0) is Health.FRESH
    assert t.health(90.0, 10.0) is Health.STALE
    assert t.health(94.9, 10.0) is Health.STALE
    assert t.health(95.0, 10.0) is Health.EXPIRED
    assert t.health(1e9, 10.0) is Health.EXPIRED


def test_short_token_is_not_expired_on_arrival():
    """A 4 s token stays usable for 90% of its life: the skew is a tenth of the lifetime, not 5 s."""
    t = token(4.0, at=0.0)
    assert t.unusable_at() == pytest.approx(3.6)
    assert t.health(0.0, 60.0) is Health.FRESH  # a 60 s margin is capped at half of 4 s ...
    assert t.health(1.9, 60.0) is Health.FRESH  # ... so the token is fresh for its first 2 s
    assert t.health(2.0, 60.0) is Health.STALE
    assert t.health(3.5, 60.0) is Health.STALE
    assert t.health(3.6, 60.0) is Health.EXPIRED


@pytest.mark.parametrize("lifetime", [1.0, 4.0, 300.0, 36000.0])
def test_refresh_at_is_capped_at_half_the_lifetime(lifetime):
    """A margin larger than the lifetime cannot make the token due for refresh on arrival."""
    t = token(lifetime, at=50.0)
    assert t.refresh_at(1e9) == pytest.approx(50.0 + lifetime / 2)
    assert t.health(50.0, 1e9) is Health.FRESH


@pytest.mark.parametrize("lifetime", [1.0, 4.0, 60.0, 300.0, 36000.0])
@pytest.mark.parametrize("margin", [0.0, 1.0, 4.9, 60.0, 1e9])
def test_refresh_is_due_before_the_token_becomes_unusable(lifetime, margin):
    """Whatever the margin, the refresh starts while the token can still be sent, so requests never wait."""
    t = token(lifetime, at=0.0)
    assert t.obtained_at + lifetime / 2 <= t.refresh_at(margin) < t.unusable_at() < t.expires_at
    assert t.health(t.refresh_at(margin), margin) is Health.STALE


@pytest.mark.parametrize(("lifetime", "refresh_in"), [(0.05, None), (0.001, None), (300.0, 5.05), (0.2, 5.2)])
def test_renewals_are_never_scheduled_closer_than_the_minimum_interval(lifetime, refresh_in):
    """A 50 ms token, or a refresh token living just past its skew, is not due again within MIN_RENEWAL_INTERVAL_S."""
    t = token(lifetime, at=0.0, refresh_in=refresh_in)
    assert t.refresh_at(60.0) == pytest.approx(state.MIN_RENEWAL_INTERVAL_S)


@pytest.mark.parametrize(
    ("lifetime", "refresh_in", "margin", "due"),
    [
        (3600.0, 1800.0, 60.0, 1735.0),  # refresh token dies first: renewed 60 s before its last moment
        (3600.0, 25.0, 60.0, 10.0),  # a very short session: at half of what the refresh token allows
        (3600.0, 7200.0, 60.0, 3540.0),  # refresh token outlives the access token: the usual rule
        (3600.0, None, 60.0, 3540.0),  # no refresh expiry known
        (3600.0, 4.0, 60.0, 3540.0),  # too short to ever be used: no earlier renewal that would be a login
    ],
)
def test_renewal_comes_before_the_refresh_token_dies(lifetime, refresh_in, margin, due):
    """When the provider's session (refresh token) ends before the access token, the scheduled renewal
    is a refresh while the refresh token still works, not a login after it died."""
    t = token(lifetime, at=0.0, refresh_in=refresh_in)
    assert t.refresh_at(margin) == pytest.approx(due)
    if refresh_in is not None and due < 3540.0:
        assert t.can_refresh(t.refresh_at(margin))
        assert choose_renewal(Lifecycle(token=t), t.refresh_at(margin)) is Event.REFRESH


def test_can_refresh_respects_refresh_token_expiry():
    """A refresh token is usable until REFRESH_TOKEN_SKEW_S before its refresh_expires_in runs out."""
    t = token(300.0, at=0.0, refresh_in=1800.0)
    assert t.can_refresh(0.0)
    assert t.can_refresh(1800.0 - state.REFRESH_TOKEN_SKEW_S - 0.1)
    assert not t.can_refresh(1800.0 - state.REFRESH_TOKEN_SKEW_S)
    assert not t.can_refresh(5000.0)
    assert token(300.0, refresh_in=None).can_refresh(1e12)  # no expiry known (offline token)
    assert not token(300.0, refresh=None).can_refresh(0.0)
    assert not token(300.0, refresh="").can_refresh(0.0)


def test_choose_renewal():
    """Refresh first: while a live refresh token is held, whatever failed before, as long as the access token can
    be sent; a login without one, after it expired or was refused, or once the token is unusable and the last
    refresh failed (then a login, then a refresh again)."""
    t = token(300.0, at=0.0, refresh_in=600.0)  # usable until 295 s; refresh token until 595 s
    lc = Lifecycle(token=t)
    assert choose_renewal(lc, 100.0) is Event.REFRESH
    assert choose_renewal(lc, 600.0) is Event.LOGIN  # the refresh token has expired: never send it
    assert choose_renewal(Lifecycle(), 0.0) is Event.LOGIN
    assert choose_renewal(Lifecycle(token=token(300.0, refresh=None)), 0.0) is Event.LOGIN
    assert choose_renewal(Lifecycle(token=t, refresh_refused=True), 100.0) is Event.LOGIN
    assert choose_renewal(Lifecycle(token=t, refresh_unsupported=True), 100.0) is Event.LOGIN
    failed = Lifecycle(token=t, last_attempt="refresh", transient_failures=9)
    assert choose_renewal(failed, 290.0) is Event.REFRESH  # many transient failures: still a refresh
    assert choose_renewal(failed, 300.0) is Event.LOGIN  # ... until the token can no longer be sent
    assert choose_renewal(Lifecycle(token=t, last_attempt="login"), 300.0) is Event.REFRESH
    assert choose_renewal(Lifecycle(token=t), 300.0) is Event.REFRESH  # an expired token: refresh first
    for grant in ("refresh_token", "authorization_code"):  # a login would resend a rotated token / a spent code
        assert choose_renewal(Lifecycle(grant_type=grant, token=t, last_attempt="refresh"), 300.0) is Event.REFRESH


def test_on_granted_hands_back_a_replaced_live_session():
    """A login replacing a token whose refresh token lives returns the old token, to end its session; a refresh,
    or a login after the refresh token was refused, returns none."""
    old = token(300.0, at=0.0, refresh_in=1800.0, refresh="rt-old")
    new = token(300.0, at=400.0, refresh_in=1800.0, refresh="rt-new")
    lc = Lifecycle(phase=Phase.LOGGING_IN, token=old, last_attempt="refresh", transient_failures=3)
    after, replaced = state.on_granted(lc, "login", new, 400.0)
    assert replaced is old
    assert (after.phase, after.token, after.transient_failures, after.login_ended_at) == (Phase.HOLDING, new, 0, 400.0)
    assert state.on_granted(dataclasses.replace(lc, phase=Phase.REFRESHING), "refresh", new, 400.0)[1] is None
    assert state.on_granted(dataclasses.replace(lc, refresh_refused=True), "login", new, 400.0)[1] is None


def test_login_wait_spaces_logins():
    """A login may follow the previous one only MIN_LOGIN_INTERVAL_S after its answer."""
    lc = state.on_rejected(Lifecycle(phase=Phase.LOGGING_IN), "login", 10.0, 0.5, policy=lambda attempt, rand: 0.0)
    assert state.login_wait(lc, 10.0) == state.MIN_LOGIN_INTERVAL_S
    assert state.login_wait(lc, 10.0 + state.MIN_LOGIN_INTERVAL_S) == 0.0
    assert state.login_wait(Lifecycle(), 0.0) == 0.0


def test_login_wait_takes_the_interval_a_manager_was_given():
    """TokenManager(min_login_interval_s=...) spaces logins by that interval instead of the constant."""
    lc = state.on_rejected(Lifecycle(phase=Phase.LOGGING_IN), "login", 10.0, 0.5, policy=lambda attempt, rand: 0.0)
    assert state.login_wait(lc, 10.0, 0.05) == pytest.approx(0.05)
    assert state.login_wait(lc, 10.03, 0.05) == pytest.approx(0.02)
    assert state.login_wait(lc, 10.05, 0.05) == 0.0


def test_a_spent_code_blocks_logins():
    """authorization_code: any answer to the exchange spends the code; a 'later' answer or a lost request does not."""
    lc = Lifecycle(grant_type="authorization_code", phase=Phase.LOGGING_IN)
    assert not state.login_blocked(lc)
    assert state.login_blocked(state.on_rejected(lc, "login", 0.0, 0.0))
    assert state.login_blocked(state.on_failed(lc, "login", 0.0, 0.0, reason="invalid_response"))
    assert not state.login_blocked(state.on_failed(lc, "login", 0.0, 0.0, reason="server_error"))
    assert state.login_blocked(state.on_granted(lc, "login", token(300.0), 0.0)[0])


def test_upstream_401_evidence():
    """A 401 on an accepted token may renew at once, EVIDENCE_BURST times in a row; on a token obtained on
    schedule FRESH_BURST times; on one a 401 renewal obtained only after FUTILE_SPACING_S, doubling, until a
    token is accepted."""
    t = token(300.0)
    lc = state.on_accepted(Lifecycle(token=t), t)
    assert lc.accepted and state.on_accepted(lc, token(300.0)) is lc  # another token's acceptance changes nothing
    for _ in range(int(state.EVIDENCE_BURST)):
        lc = state.on_upstream_rejected(lc, 0.0)
        assert lc is not None
    assert state.on_upstream_rejected(lc, 0.0) is None
    assert state.on_upstream_rejected(lc, state.EVIDENCE_REFILL_S) is not None
    fresh = Lifecycle(token=t)
    for _ in range(int(state.FRESH_BURST)):
        fresh = state.on_upstream_rejected(fresh, 0.0)
        assert fresh is not None
    assert state.on_upstream_rejected(fresh, 0.0) is None
    futile = Lifecycle(token=t, from_401=True, renewed_401_at=0.0)
    assert state.on_upstream_rejected(futile, state.FUTILE_SPACING_S - 1) is None
    futile = state.on_upstream_rejected(futile, state.FUTILE_SPACING_S)
    assert futile is not None
    assert state.on_upstream_rejected(futile, 2 * state.FUTILE_SPACING_S) is None  # the next spacing is doubled
    assert state.on_upstream_rejected(futile, 3 * state.FUTILE_SPACING_S) is not None
    assert state.on_accepted(futile, t).futile_renewals == 0


def test_transient_backoff_is_exponential_jittered_and_bounded():
    """1 s, 2 s, 4 s ... with the upper half random, never above the cap, even after thousands of attempts."""
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (5, 32.0), (6, 60.0), (50, 60.0), (10_000, 60.0)]:
        low = state.transient_backoff(attempt, 0.0)
        high = state.transient_backoff(attempt, 0.999999)
        assert low == pytest.approx(ceiling / 2)
        assert ceiling / 2 < high <= ceiling
        assert high <= state.TRANSIENT_BACKOFF_CAP_S
    delays = {state.transient_backoff(3, r / 10) for r in range(10)}
    assert len(delays) == 10  # the random part changes the delay: no thundering herd


def test_retry_after_is_honoured_and_capped():
    """Retry-After is a floor for the delay, itself capped at RETRY_AFTER_CAP_S."""
    assert state.transient_backoff(0, 0.5, retry_after=30.0) == 30.0
    assert state.transient_backoff(0, 0.5, retry_after=0.0) == 0.75  # a shorter Retry-After does not shorten it
    assert state.transient_backoff(6, 0.0, retry_after=10.0) == 30.0
    assert state.transient_backoff(0, 0.5, retry_after=1e9) == state.RETRY_AFTER_CAP_S


def test_rejected_backoff_is_minutes_and_bounded():
    """After a rejected login: about a minute, doubling, never above an hour, jittered downwards by 10% at most."""
    assert 54.0 <= state.rejected_backoff(0, 0.0) <= state.rejected_backoff(0, 0.999) <= 60.0
    assert 108.0 <= state.rejected_backoff(1, 0.5) <= 120.0
    for attempt in (6, 7, 100, 10_000):
        assert 0.9 * 3600.0 <= state.rejected_backoff(attempt, 0.0) <= state.rejected_backoff(attempt, 0.999) <= 3600.0
    assert state.rejected_backoff(0, 0.1) != state.rejected_backoff(0, 0.9)


def test_token_repr_and_id_hide_the_secrets():
    """repr() names neither the access nor the refresh token; the id is a short hash."""
    t = Token(access_token="eyJ-access-secret", obtained_at=0.0, expires_at=10.0, refresh_token="refresh-secret")
    assert "access-secret" not in repr(t)
    assert "refresh-secret" not in repr(t)
    assert t.id == state.fingerprint("eyJ-access-secret")
    assert t.id == hashlib.sha256(b"eyJ-access-secret").hexdigest()[:10]  # a hash, not a piece of the token
    assert not "eyJ-access-secret".startswith(t.id[:3])
