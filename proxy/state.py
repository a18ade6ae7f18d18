"""The token lifecycle, without I/O.

Theory of operation
-------------------
The sidecar holds at most one access token (a :class:`Token`). Its *health* is a function of the
clock alone: FRESH (use it), STALE (use it, but renew it now), EXPIRED (never send it). Times are on
:func:`token_clock`, measured from the moment the token was asked for (a slow answer has used up
part of the lifetime): a monotonic clock, so a wall-clock jump cannot make a token look valid, and
one that keeps counting while the machine sleeps, so a laptop waking up does not send a token that
expired during the night.

What the token manager is doing is its :class:`Phase`. It moves only through :data:`TRANSITIONS`,
driven by :class:`Event`\\ s; an event that is not in the table for the current phase is a bug and
raises :class:`IllegalTransition`.

Everything that decides *what to do next* is a :class:`Lifecycle` value, changed only by the pure
``on_*`` functions below, which take the clock reading (and a random number) as arguments:

* :func:`choose_renewal`: **refresh first**. A refresh while the refresh token lives and the access
  token can still be sent, whatever failed before; a login only when the refresh was refused, the
  refresh token expired, or the access token can no longer be sent and the last refresh failed (every
  login opens a new session at the provider; Keycloak keeps an ``offline_access`` one 30 days). A
  login that replaces a session whose refresh token was still alive hands that old token back from
  :func:`on_granted`, to be ended.
* logins are spaced by :data:`MIN_LOGIN_INTERVAL_S` (:func:`login_wait`): Keycloak locks an account
  for a minute when two logins fail within a second, and a locked account answers like a wrong password.
* :func:`on_failed` schedules the retry after a transient failure with :func:`retry_delay`, which
  fits the retries into what is left of the held token, and without a token keeps them seconds
  apart until the outage itself grows long; :func:`on_rejected` waits minutes after refused credentials.
* :func:`on_upstream_rejected` decides whether an upstream 401 is worth a renewal, by evidence: a
  token the upstream accepted (:func:`on_accepted`) and now rejects is renewed at once; one it never
  accepted only a few times, then rarely (a path that always answers 401 is not a revoked token).

``tokens.py`` performs the I/O and feeds the outcomes back in.
"""

from __future__ import annotations

import enum
import hashlib
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

# Linux's CLOCK_BOOTTIME and macOS's CLOCK_MONOTONIC count the time the machine was asleep; Python's
# time.monotonic() does not (CLOCK_MONOTONIC on Linux, mach_absolute_time on macOS). Elsewhere, monotonic.
_SLEEP_AWARE_CLOCK = {"linux": "CLOCK_BOOTTIME", "darwin": "CLOCK_MONOTONIC"}.get(sys.platform)
_CLOCK_ID: int | None = getattr(time, _SLEEP_AWARE_CLOCK, None) if _SLEEP_AWARE_CLOCK else None


def token_clock() -> float:
    """Seconds on a monotonic clock that keeps counting while the machine sleeps: token times use it."""
    return time.clock_gettime(_CLOCK_ID) if _CLOCK_ID is not None else time.monotonic()


# Never send a token this close to its expiry: the request still has to reach the upstream. Capped at
# a tenth of the lifetime, so a 4-second test token is not "expired" on arrival.
EXPIRY_SKEW_S = 5.0
# A refresh token this close to its own expiry is not worth sending (Keycloak checks `exp` first and
# answers "Token is not active"); log in instead.
REFRESH_TOKEN_SKEW_S = 5.0
# Refresh happens `refresh_margin_s` before expiry, but never earlier than half-way through the
# lifetime: a margin larger than the lifetime would refresh in a tight loop (google-auth #581, #1146).
MAX_MARGIN_FRACTION = 0.5
# ... and never later than two expiry skews before expiry: a margin shorter than the skew (0 s, 1 s)
# would schedule the refresh after the token already stopped being sent, and requests would wait.
MIN_MARGIN_SKEWS = 2.0
# ... and never sooner than this after the token was asked for: a provider issuing 50 ms tokens (or a
# refresh_expires_in just over REFRESH_TOKEN_SKEW_S) would otherwise be asked every 25 ms, forever. Half a
# second: at most two scheduled renewals a second, while a 1 s token (the shortest the tests use; no provider
# issues shorter on purpose) is still renewed at half its life, before it stops being sent. A token that
# lives less is renewed when a request needs it, or at this pace. Retries have RETRY_FLOOR_S.
MIN_RENEWAL_INTERVAL_S = 0.5

# Grants that can be sent again to open a new session. The others cannot: a configured refresh token
# is spent once the provider answered it (or a refresh) with a different one (rotation: presenting the old
# one again is reuse, answered "Stale token", and providers with reuse detection revoke the whole family),
# an authorization code is spent once answered; with those a renewal is a refresh with the newest refresh
# token for as long as one lives.
REPEATABLE_GRANTS = ("password", "client_credentials")

# --- retries after a transient failure (unreachable, 5xx, 429, garbage) ---------------------------
# While a usable token is held: 1 s, 2 s, 4 s ... jittered, but never one wait longer than a third of
# what is left of the token, so several attempts fit before it stops being sent (a 3 s token refreshed
# 1.5 s before expiry has 1.2 s left: about five attempts, not one), and never faster than the floor.
TRANSIENT_BACKOFF_BASE_S = 1.0
HELD_RETRY_FRACTION = 1 / 3
RETRY_FLOOR_S = 0.25
# Without a usable token requests are failing: retry a few seconds apart (jittered upwards, never
# sooner), the spacing growing with the outage, a sixth of its length, so a provider down for good is
# asked about every 10 s after a minute and once a minute (the cap) after six.
NO_TOKEN_RETRY_S = 2.0
OUTAGE_STRETCH = 1 / 6
RETRY_JITTER = 0.5
TRANSIENT_BACKOFF_CAP_S = 60.0
# A Retry-After from the provider is honoured up to this long.
RETRY_AFTER_CAP_S = 600.0
# A login whose answer was a 200 we could not use, or a token dead on arrival, still spent a one-time code;
# so did one that crashed on our side, as far as we know (the code may have been answered): a code is never
# sent twice (RFC 6749 §4.1.2), and a new one costs the user a restart, a reused one the session.
CODE_SPENDING_FAILURES = ("invalid_response", "expired_on_arrival", "internal_error")

# --- logins ---------------------------------------------------------------------------------------
# Keycloak's brute-force detection counts a failure within quickLoginCheckMilliSeconds (1000) of the
# previous one as a "quick login" and locks the account for minQuickLoginWaitSeconds (60), after which
# even the right password is answered "Invalid user credentials". Never two logins closer than this,
# measured from the end of the previous one.
MIN_LOGIN_INTERVAL_S = 1.0
# Rejected logins: 1 min, 2 min, 4 min ... capped at 1 h. Keycloak's brute-force detection locks an
# account after 30 failures by default; at this pace that takes more than a day.
REJECTED_BACKOFF_BASE_S = 60.0
REJECTED_BACKOFF_CAP_S = 3600.0

# --- upstream 401s ----------------------------------------------------------------------------------
# Three kinds of evidence, three budgets, each refilled or reset over time:
# * a token the upstream accepted and now rejects was revoked: renewed at once, however soon after the last
#   renewal. Still bounded (an upstream rejecting the token on one path while accepting it on others would
#   otherwise turn every request to that path into a token request): EVIDENCE_BURST at once, one more
#   every EVIDENCE_REFILL_S.
# * a token the upstream never saw accepted, obtained on schedule or by a login: FRESH_BURST, refilled likewise
#   (a revoke right after a scheduled refresh, before any request).
# * a token that a 401-triggered renewal just obtained, rejected before it was ever accepted: the renewal did
#   not help, the upstream rejects something else. 1 min, 2 min, 4 min ... capped at an hour between such
#   renewals; the streak ends when a token is accepted, or after two quiet hours. A path that always answers
#   401 costs about six token requests in its first hour, then one.
EVIDENCE_BURST = 5.0
EVIDENCE_REFILL_S = 600.0
FRESH_BURST = 3.0
FRESH_REFILL_S = 600.0
FUTILE_SPACING_S = 60.0
FUTILE_CAP_S = 3600.0
FUTILE_RESET_S = 2 * FUTILE_CAP_S


class Health(enum.Enum):
    """What a caller may do with a token."""

    FRESH = "fresh"  # use it
    STALE = "stale"  # use it, and renew it now
    EXPIRED = "expired"  # never send it


class Phase(enum.Enum):
    """What the token manager is doing."""

    IDLE = "idle"  # started, nothing asked yet
    LOGGING_IN = "logging_in"
    REFRESHING = "refreshing"
    HOLDING = "holding"  # a token is held; the next renewal is scheduled
    BACKING_OFF = "backing_off"  # the last attempt failed transiently; retry later
    REJECTED = "rejected"  # the provider refused the credentials; retry much later
    STOPPED = "stopped"


class Event(enum.Enum):
    LOGIN = "login"  # start a login with the configured grant
    REFRESH = "refresh"  # start a refresh_token grant
    GRANTED = "granted"  # the provider issued a token
    REJECTED = "rejected"  # the provider refused the grant (4xx)
    FAILED = "failed"  # transport error, 5xx, 429, unusable response
    ADOPTED = "adopted"  # another process of the fleet obtained a token (the shared store)
    FLEET_REJECTED = "fleet_rejected"  # another process's login was refused: the fleet backs off together
    STOP = "stop"


# Between renewals, what the fleet shares can replace the lifecycle: a token another process obtained, or
# the refusal another process's login met.
_SHARED = {Event.ADOPTED: Phase.HOLDING, Event.FLEET_REJECTED: Phase.REJECTED}

TRANSITIONS: dict[Phase, dict[Event, Phase]] = {
    Phase.IDLE: {Event.LOGIN: Phase.LOGGING_IN, Event.STOP: Phase.STOPPED, **_SHARED},
    Phase.HOLDING: {
        Event.LOGIN: Phase.LOGGING_IN,
        Event.REFRESH: Phase.REFRESHING,
        Event.STOP: Phase.STOPPED,
        **_SHARED,
    },
    Phase.BACKING_OFF: {
        Event.LOGIN: Phase.LOGGING_IN,
        Event.REFRESH: Phase.REFRESHING,
        Event.STOP: Phase.STOPPED,
        **_SHARED,
    },
    # Refused credentials: the next attempt may be a refresh when the session's refresh token still lives.
    Phase.REJECTED: {
        Event.LOGIN: Phase.LOGGING_IN,
        Event.REFRESH: Phase.REFRESHING,
        Event.STOP: Phase.STOPPED,
        **_SHARED,
    },
    Phase.LOGGING_IN: {
        Event.GRANTED: Phase.HOLDING,
        Event.REJECTED: Phase.REJECTED,
        Event.FAILED: Phase.BACKING_OFF,
        Event.STOP: Phase.STOPPED,
    },
    Phase.REFRESHING: {
        Event.GRANTED: Phase.HOLDING,
        # A refused refresh token is not a reason to give up: fall back to a fresh login.
        Event.REJECTED: Phase.LOGGING_IN,
        Event.FAILED: Phase.BACKING_OFF,
        Event.STOP: Phase.STOPPED,
    },
    Phase.STOPPED: {Event.STOP: Phase.STOPPED},
}


class IllegalTransition(RuntimeError):
    """An event arrived that the current phase does not accept: a bug in the caller."""


def transition(phase: Phase, event: Event) -> Phase:
    """The phase after ``event`` happens in ``phase``."""
    try:
        return TRANSITIONS[phase][event]
    except KeyError:
        raise IllegalTransition(f"{event.value} is not allowed while {phase.value}") from None


def fingerprint(secret: str) -> str:
    """A short, stable, non-reversible name for a token, for logs and status."""
    return hashlib.sha256(secret.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Token:
    """One access token and what came with it. Times are monotonic seconds."""

    access_token: str = field(repr=False)
    obtained_at: float
    expires_at: float
    refresh_token: str | None = field(default=None, repr=False)
    refresh_expires_at: float | None = None  # None: no expiry known
    subject: str = ""
    scope: str = ""
    wall_expires_at: float = 0.0  # for display only (status, --check)
    header_value: str = field(default="", repr=False)  # the injected header's value, built once
    # The answer carried a refresh token other than the one presented (RFC 6749 §6 rotation: the one
    # presented may be revoked, and presenting it again is reuse).
    refresh_rotated: bool = False
    # Derived once, read by every request (the hot path compares a clock with it and sends the bytes).
    usable_until: float = field(init=False, repr=False, compare=False)
    header_bytes: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "usable_until", self.expires_at - self.skew)
        object.__setattr__(self, "header_bytes", self.header_value.encode())

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.obtained_at

    @property
    def id(self) -> str:
        return fingerprint(self.access_token)

    @property
    def skew(self) -> float:
        """How long before expiry the token stops being sent."""
        return min(EXPIRY_SKEW_S, self.lifetime * 0.1)

    def refresh_at(self, margin: float) -> float:
        """When to start renewing: ``margin`` before expiry, but not before half the lifetime and
        while the token can still be sent; earlier, by the same rule, when the refresh token would die
        first (an identity provider's session idle time shorter than the access token's life), so the
        session is kept by a refresh instead of being lost (a spent authorization code cannot log in).
        Never sooner than MIN_RENEWAL_INTERVAL_S after the token was asked for."""
        margin = max(margin, MIN_MARGIN_SKEWS * self.skew)
        due = self.expires_at - min(margin, self.lifetime * MAX_MARGIN_FRACTION)
        if self.refresh_token and self.refresh_expires_at is not None:
            last = self.refresh_expires_at - REFRESH_TOKEN_SKEW_S  # the refresh token's last moment
            if self.obtained_at < last < due:
                due = last - min(margin, (last - self.obtained_at) * MAX_MARGIN_FRACTION)
        return max(due, self.obtained_at + MIN_RENEWAL_INTERVAL_S)

    def unusable_at(self) -> float:
        """From when on the token must not be sent."""
        return self.usable_until

    def health(self, now: float, margin: float) -> Health:
        if now >= self.unusable_at():
            return Health.EXPIRED
        if now >= self.refresh_at(margin):
            return Health.STALE
        return Health.FRESH

    def can_refresh(self, now: float) -> bool:
        """A refresh token is held and has not (nearly) expired."""
        if not self.refresh_token:
            return False
        return self.refresh_expires_at is None or now < self.refresh_expires_at - REFRESH_TOKEN_SKEW_S


def transient_backoff(attempt: int, rand: float, retry_after: float | None = None) -> float:
    """Exponential delay before retry number ``attempt`` (0-based): 1 s, 2 s, 4 s ... capped.

    "Equal jitter" (half fixed, half random, ``rand`` in [0, 1)); a provider's Retry-After is a floor,
    itself capped. :func:`retry_delay` fits it to the held token.
    """
    ceiling = min(TRANSIENT_BACKOFF_CAP_S, TRANSIENT_BACKOFF_BASE_S * 2 ** min(attempt, 16))
    delay = ceiling / 2 + rand * ceiling / 2
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP_S))
    return delay


def rejected_backoff(attempt: int, rand: float) -> float:
    """Delay before logging in again after the provider refused the credentials ``attempt + 1`` times."""
    ceiling = min(REJECTED_BACKOFF_CAP_S, REJECTED_BACKOFF_BASE_S * 2 ** min(attempt, 16))
    return ceiling * (0.9 + 0.1 * rand)


TransientPolicy = Callable[..., float]  # (attempt, rand, retry_after) -> seconds: a test's override
RejectedPolicy = Callable[[int, float], float]


@dataclass(frozen=True)
class Lifecycle:
    """Everything that steers renewals: the phase, the token, and what the provider and upstream did.

    Changed only by the functions below; ``tokens.py`` keeps the current value and replaces it.
    """

    grant_type: str = "password"
    phase: Phase = Phase.IDLE
    token: Token | None = field(default=None, repr=False)
    accepted: bool = False  # the upstream answered something other than 401 to the current token
    refresh_refused: bool = False  # the provider refused the current token's refresh token
    refresh_unsupported: bool = False  # the provider answered unsupported_grant_type to a refresh: never again
    code_spent: bool = False  # authorization_code: the code was answered once and is never sent again
    # refresh_token: the configured refresh token was rotated away (a different one was received): never sent again
    configured_refresh_spent: bool = False
    last_attempt: str = ""  # login | refresh: what failed last since the last grant
    transient_failures: int = 0  # in a row, since the last grant
    rejections: int = 0  # refused logins in a row
    failing_since: float | None = None  # the first failure since the last grant
    retry_at: float = 0.0  # BACKING_OFF / REJECTED: when the next attempt is due
    login_ended_at: float = -math.inf  # when the last login attempt was answered
    from_401: bool = False  # the current token was obtained by a renewal an upstream 401 asked for
    evidence_budget: float = EVIDENCE_BURST  # renewals left for 401s on accepted tokens, as of evidence_at
    evidence_at: float = -math.inf
    fresh_budget: float = FRESH_BURST  # ... on never-accepted tokens obtained otherwise, as of fresh_at
    fresh_at: float = -math.inf
    futile_renewals: int = 0  # 401 renewals of never-accepted tokens a 401 renewal had obtained, in a row
    renewed_401_at: float = -math.inf  # the last 401-triggered renewal


def usable(lc: Lifecycle, now: float) -> Token | None:
    """The held token if it may be sent at ``now``."""
    token = lc.token
    return token if token is not None and now < token.usable_until else None


def live_refresh(lc: Lifecycle, now: float) -> Token | None:
    """The held token if its refresh token may be sent: held, not refused, not (nearly) expired."""
    token = lc.token
    if token is None or lc.refresh_refused or lc.refresh_unsupported or not token.can_refresh(now):
        return None
    return token


def choose_renewal(lc: Lifecycle, now: float) -> Event:
    """Refresh first: while the refresh token lives, unless the access token can no longer be sent and
    the last attempt was a refresh that failed (then a login may work where the refresh does not). A
    grant that cannot be repeated renews by refresh for as long as a refresh token lives."""
    if live_refresh(lc, now) is None:
        return Event.LOGIN
    if lc.grant_type not in REPEATABLE_GRANTS:
        return Event.REFRESH
    if usable(lc, now) is None and lc.last_attempt == "refresh":
        return Event.LOGIN
    return Event.REFRESH


def login_blocked(lc: Lifecycle) -> bool:
    """No login is possible: the one-time authorization code was already answered, or the configured
    refresh token was rotated away."""
    if lc.grant_type == "authorization_code":
        return lc.code_spent
    return lc.grant_type == "refresh_token" and lc.configured_refresh_spent


def login_wait(lc: Lifecycle, now: float, min_interval_s: float = MIN_LOGIN_INTERVAL_S) -> float:
    """Seconds to wait before a login may be sent (``min_interval_s`` after the previous one)."""
    return max(0.0, lc.login_ended_at + min_interval_s - now)


# A token is held again (granted, or adopted from the fleet): every failure streak ends.
_STREAKS_ENDED: dict[str, Any] = {
    "last_attempt": "",
    "transient_failures": 0,
    "rejections": 0,
    "failing_since": None,
    "retry_at": 0.0,
}


def on_started(lc: Lifecycle, event: Event) -> Lifecycle:
    """A renewal (``Event.LOGIN`` or ``Event.REFRESH``) begins."""
    return replace(lc, phase=transition(lc.phase, event))


def on_granted(
    lc: Lifecycle, kind: str, token: Token, now: float, *, for_401: bool = False
) -> tuple[Lifecycle, Token | None]:
    """The provider issued ``token`` to a ``kind`` (login | refresh) request answered at ``now``;
    ``for_401``: the renewal was asked for by an upstream 401.

    Returns the new value and, when a login replaced a session whose refresh token was still alive,
    the old token, whose session should be ended so that sessions do not pile up at the provider.
    """
    replaced = None
    old = live_refresh(lc, now)
    if kind == "login" and old is not None and old.refresh_token != token.refresh_token:
        replaced = old
    new = replace(
        lc,
        phase=transition(lc.phase, Event.GRANTED),
        token=token,
        accepted=False,
        from_401=for_401,
        refresh_refused=False,
        code_spent=lc.code_spent or (kind == "login" and lc.grant_type == "authorization_code"),
        # Every refresh token held descends from the configured one: any rotation leaves it behind.
        configured_refresh_spent=lc.configured_refresh_spent
        or (lc.grant_type == "refresh_token" and token.refresh_rotated),
        **_STREAKS_ENDED,
        login_ended_at=now if kind == "login" else lc.login_ended_at,
    )
    return new, replaced


def on_rejected(
    lc: Lifecycle,
    kind: str,
    now: float,
    rand: float,
    *,
    error: str = "",
    policy: RejectedPolicy = rejected_backoff,
) -> Lifecycle:
    """The provider refused a ``kind`` request (4xx) with OAuth ``error``.

    A refused refresh token is never sent again and the renewal goes on as a login (LOGGING_IN); a
    refused login waits minutes (REJECTED), so that wrong credentials never become a lockout.
    """
    phase = transition(lc.phase, Event.REJECTED)
    if kind == "refresh":
        return replace(
            lc,
            phase=phase,
            refresh_refused=True,
            refresh_unsupported=lc.refresh_unsupported or error == "unsupported_grant_type",
            last_attempt="refresh",
            failing_since=now if lc.failing_since is None else lc.failing_since,
        )
    rejections = lc.rejections + 1
    return replace(
        lc,
        phase=phase,
        code_spent=lc.code_spent or lc.grant_type == "authorization_code",
        last_attempt="login",
        rejections=rejections,
        failing_since=now if lc.failing_since is None else lc.failing_since,
        retry_at=now + policy(rejections - 1, rand),
        login_ended_at=now,
    )


def on_failed(
    lc: Lifecycle,
    kind: str,
    now: float,
    rand: float,
    *,
    retry_after: float | None = None,
    reason: str = "",
    policy: TransientPolicy | None = None,
) -> Lifecycle:
    """A ``kind`` request failed transiently (``reason``: unreachable, server_error, ...): back off."""
    failures = lc.transient_failures + 1
    failed = replace(
        lc,
        phase=transition(lc.phase, Event.FAILED),
        code_spent=lc.code_spent
        or (kind == "login" and lc.grant_type == "authorization_code" and reason in CODE_SPENDING_FAILURES),
        last_attempt=kind,
        transient_failures=failures,
        failing_since=now if lc.failing_since is None else lc.failing_since,
        login_ended_at=now if kind == "login" else lc.login_ended_at,
    )
    if policy is not None:
        delay = policy(failures - 1, rand, retry_after)
    else:
        delay = retry_delay(failed, now, rand, retry_after)
    return replace(failed, retry_at=now + delay)


def retry_delay(lc: Lifecycle, now: float, rand: float, retry_after: float | None = None) -> float:
    """How long to wait before the next attempt, ``lc.transient_failures`` failures into an outage.

    With a usable token: the exponential backoff, but at most a third of what is left of the token.
    Without one: NO_TOKEN_RETRY_S, or a sixth of how long the provider has been failing (since the
    first failure after the last grant, a held token's retries included), whichever is longer, up to
    the cap, jittered upwards. Never below RETRY_FLOOR_S; never before a
    provider's Retry-After (capped).
    """
    held = usable(lc, now)
    if held is not None:
        delay = transient_backoff(max(0, lc.transient_failures - 1), rand)
        delay = min(delay, (held.usable_until - now) * HELD_RETRY_FRACTION)
    else:
        since = lc.failing_since if lc.failing_since is not None else now
        spacing = min(TRANSIENT_BACKOFF_CAP_S, max(NO_TOKEN_RETRY_S, (now - since) * OUTAGE_STRETCH))
        delay = spacing * (1 + RETRY_JITTER * rand)
    delay = max(delay, RETRY_FLOOR_S)
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP_S))
    return delay


def on_credentials_changed(lc: Lifecycle, keys: Iterable[str], now: float) -> Lifecycle:
    """The secrets ``keys`` ("auth.password", "access.api_key", ...) were replaced at ``now`` (a rotated
    file, SIGHUP: proxy/secrets.py).

    Credentials the provider refused are tried again now instead of after the backoff: the backoff waits
    for someone to fix them, and this is the fix (``login_wait`` still keeps logins MIN_LOGIN_INTERVAL_S
    apart, so a file rewritten in a loop cannot lock the account faster than wrong passwords would). A spent
    authorization code or configured refresh token that was replaced is a new one, never sent: logins may
    send it. Secrets the provider never sees (``access.*``) change nothing here.
    """
    auth = {key.partition(".")[2] for key in keys if key.startswith("auth.")}
    if not auth:
        return lc
    new = replace(
        lc,
        code_spent=lc.code_spent and "code" not in auth,
        configured_refresh_spent=lc.configured_refresh_spent and "refresh_token" not in auth,
        retry_at=now if lc.phase is Phase.REJECTED and lc.retry_at > now else lc.retry_at,
    )
    return lc if new == lc else new


def on_accepted(lc: Lifecycle, token: Token) -> Lifecycle:
    """The upstream answered something other than 401 to ``token``."""
    if token is not lc.token or lc.accepted:
        return lc
    return replace(lc, accepted=True, futile_renewals=0)


def _refill(budget: float, at: float, now: float, burst: float, every: float) -> float:
    return min(burst, budget + (now - at) / every)


def on_upstream_rejected(lc: Lifecycle, now: float) -> Lifecycle | None:
    """The upstream answered 401 to the current token: the value after allowing a renewal, or None
    when the 401 should be passed back without one."""
    if lc.accepted:
        budget = _refill(lc.evidence_budget, lc.evidence_at, now, EVIDENCE_BURST, EVIDENCE_REFILL_S)
        if budget < 1.0:
            return None
        return replace(lc, evidence_budget=budget - 1.0, evidence_at=now, renewed_401_at=now)
    if not lc.from_401:
        budget = _refill(lc.fresh_budget, lc.fresh_at, now, FRESH_BURST, FRESH_REFILL_S)
        if budget < 1.0:
            return None
        return replace(lc, fresh_budget=budget - 1.0, fresh_at=now, renewed_401_at=now)
    futile = lc.futile_renewals if now - lc.renewed_401_at < FUTILE_RESET_S else 0
    if now - lc.renewed_401_at < min(FUTILE_CAP_S, FUTILE_SPACING_S * 2 ** min(futile, 16)):
        return None
    return replace(lc, futile_renewals=futile + 1, renewed_401_at=now)


def on_dropped(lc: Lifecycle) -> Lifecycle:
    """Forget the held token (the upstream rejects it and the provider refused to renew it)."""
    return replace(lc, token=None, accepted=False)


def on_stopped(lc: Lifecycle) -> Lifecycle:
    return replace(lc, phase=transition(lc.phase, Event.STOP), token=None, accepted=False)


# --- the fleet (a shared store: tokens.py reads and writes it, these decide what it means) -----------


def on_adopted(lc: Lifecycle, token: Token, *, login_spent: bool = False) -> Lifecycle:
    """Hold ``token``, which another process of the fleet obtained (or this one, before a restart).

    Like a grant without a token request: the failure streaks end. The upstream has not yet answered
    this process with it (``accepted`` starts again). ``login_spent``: the fleet already used up the
    configured code or refresh token, so this process never sends it either.
    """
    spent = login_spent and lc.grant_type in ("authorization_code", "refresh_token")
    return replace(
        lc,
        phase=transition(lc.phase, Event.ADOPTED),
        token=token,
        accepted=False,
        from_401=False,
        refresh_refused=False,
        code_spent=lc.code_spent or (spent and lc.grant_type == "authorization_code"),
        configured_refresh_spent=lc.configured_refresh_spent or (spent and lc.grant_type == "refresh_token"),
        **_STREAKS_ENDED,
    )


def on_fleet_rejected(lc: Lifecycle, now: float, *, retry_at: float, rejections: int) -> Lifecycle:
    """Another process's login was refused ``rejections`` times in a row; no login before ``retry_at``.
    The token held, if any, stays (it may still be sent: a 401 renewal met the refusal)."""
    return replace(
        lc,
        phase=transition(lc.phase, Event.FLEET_REJECTED),
        last_attempt="login",
        rejections=max(lc.rejections, rejections),
        failing_since=now if lc.failing_since is None else lc.failing_since,
        retry_at=retry_at,
    )


def on_fleet_seen(lc: Lifecycle, *, rejections: int, login_ended_at: float) -> Lifecycle:
    """What the fleet did that spaces this process's next login: its refused logins in a row (the
    backoff grows for the fleet, not per process) and when its last login was answered (never two
    logins of the fleet within MIN_LOGIN_INTERVAL_S)."""
    return replace(lc, rejections=max(lc.rejections, rejections), login_ended_at=max(lc.login_ended_at, login_ended_at))


def on_refresh_in_doubt(lc: Lifecycle) -> Lifecycle:
    """Another process claimed the held refresh token and never wrote what it got: it may have been
    presented and rotated away. A grant that can log in again does so rather than present it a second
    time (reuse, which providers with reuse detection punish by revoking the whole session)."""
    if lc.grant_type not in REPEATABLE_GRANTS:
        return lc  # nothing else can renew: the refresh token is the only way
    return replace(lc, refresh_refused=True)
