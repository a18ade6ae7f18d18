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
raises :class:`IllegalTransition`. Everything that decides *what to do next* lives here:

* :func:`choose_renewal` picks a refresh or a fresh login;
* a rejected refresh falls back to a login (a row in the table, not an ``except`` clause);
* a transient failure backs off with :func:`transient_backoff` (exponential, jittered, capped,
  honouring ``Retry-After``); a rejected login backs off with :func:`rejected_backoff`, which is
  minutes long because identity providers lock accounts after a few wrong passwords.

``tokens.py`` performs the I/O and feeds the outcomes back in as events.
"""

from __future__ import annotations

import enum
import hashlib
import sys
import time
from dataclasses import dataclass, field

# Never send a token this close to its expiry: the request still has to reach the upstream. Capped at
# a tenth of the lifetime, so a 4-second test token is not "expired" on arrival.
# Linux's CLOCK_BOOTTIME and macOS's CLOCK_MONOTONIC count the time the machine was asleep; Python's
# time.monotonic() does not (CLOCK_MONOTONIC on Linux, mach_absolute_time on macOS). Elsewhere, monotonic.
_SLEEP_AWARE_CLOCK = {"linux": "CLOCK_BOOTTIME", "darwin": "CLOCK_MONOTONIC"}.get(sys.platform)
_CLOCK_ID: int | None = getattr(time, _SLEEP_AWARE_CLOCK, None) if _SLEEP_AWARE_CLOCK else None


def token_clock() -> float:
    """Seconds on a monotonic clock that keeps counting while the machine sleeps: token times use it."""
    return time.clock_gettime(_CLOCK_ID) if _CLOCK_ID is not None else time.monotonic()


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
# After this many transient refresh failures in a row, try a fresh login instead (a refresh that keeps
# failing with 5xx may be a refresh token the provider chokes on, e.g. Keycloak's lock timeout).
MAX_REFRESH_FAILURES = 2

# Transient failures (unreachable, 5xx, 429, garbage): 1 s, 2 s, 4 s ... capped at 60 s, jittered.
TRANSIENT_BACKOFF_BASE_S = 1.0
TRANSIENT_BACKOFF_CAP_S = 60.0
# A Retry-After from the provider is honoured up to this long.
RETRY_AFTER_CAP_S = 600.0
# Rejected logins: 1 min, 2 min, 4 min ... capped at 1 h. Keycloak's brute-force detection locks an
# account after 30 failures by default; at this pace that takes more than a day.
REJECTED_BACKOFF_BASE_S = 60.0
REJECTED_BACKOFF_CAP_S = 3600.0


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
    STOP = "stop"


TRANSITIONS: dict[Phase, dict[Event, Phase]] = {
    Phase.IDLE: {Event.LOGIN: Phase.LOGGING_IN, Event.STOP: Phase.STOPPED},
    Phase.HOLDING: {
        Event.LOGIN: Phase.LOGGING_IN,
        Event.REFRESH: Phase.REFRESHING,
        Event.STOP: Phase.STOPPED,
    },
    Phase.BACKING_OFF: {
        Event.LOGIN: Phase.LOGGING_IN,
        Event.REFRESH: Phase.REFRESHING,
        Event.STOP: Phase.STOPPED,
    },
    Phase.REJECTED: {Event.LOGIN: Phase.LOGGING_IN, Event.STOP: Phase.STOPPED},
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
        session is kept by a refresh instead of being lost (a spent authorization code cannot log in)."""
        margin = max(margin, MIN_MARGIN_SKEWS * self.skew)
        due = self.expires_at - min(margin, self.lifetime * MAX_MARGIN_FRACTION)
        if self.refresh_token and self.refresh_expires_at is not None:
            last = self.refresh_expires_at - REFRESH_TOKEN_SKEW_S  # the refresh token's last moment
            if self.obtained_at < last < due:
                due = last - min(margin, (last - self.obtained_at) * MAX_MARGIN_FRACTION)
        return due

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


def choose_renewal(token: Token | None, now: float, refresh_failures: int) -> Event:
    """Refresh when a live refresh token is held and refreshing has not kept failing; else log in."""
    if token is not None and token.can_refresh(now) and refresh_failures < MAX_REFRESH_FAILURES:
        return Event.REFRESH
    return Event.LOGIN


def transient_backoff(attempt: int, rand: float, retry_after: float | None = None) -> float:
    """Delay before retry number ``attempt`` (0-based) after a transient failure.

    Exponential with "equal jitter" (half fixed, half random, ``rand`` in [0, 1)), capped; a
    provider's Retry-After is a floor, itself capped.
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
