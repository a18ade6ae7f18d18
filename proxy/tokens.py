"""TokenManager: holds the access token and keeps it fresh.

Theory of operation
-------------------
Requests call :meth:`TokenManager.get`. While the held token is usable this is a lock-free read of
one attribute and a clock comparison; requests never wait for the identity provider in the normal
case, because a background task renews the token at ``Token.refresh_at`` (``refresh_margin_s``
before expiry, capped at half the lifetime).

Every renewal is a *flight*: one asyncio task, shared by everybody who needs it. Whoever finds no
flight starts one; everyone else awaits the same task (shielded, so a client that disconnects does
not cancel the login the others wait for). Inside, the flight checks again, before any I/O, that
the renewal is still needed (double-checked: 200 waiters see the token the first one fetched). So
however many requests wait, at most one token request is in flight.

An upstream 401 calls :meth:`renew_rejected` with the token that was rejected. It renews only if
that token is still the current one (invalidation by identity, not by clock), and not when that token
is the one a 401-triggered renewal obtained less than ``REJECTION_RENEWAL_INTERVAL_S`` ago, so an
endpoint that always answers 401 cannot turn every request into a token request (a token renewed on
schedule since then is renewed: a second revoke soon after the first is hidden too).

The flight's steps follow ``state.TRANSITIONS``: a rejected refresh moves to LOGGING_IN and the
same flight logs in; a transient failure moves to BACKING_OFF and the scheduler retries at the
backoff's end; a rejected login moves to REJECTED and waits minutes. While backing off, a request
with no usable token gets :class:`NoToken` at once (503 with Retry-After), without a token request;
once an attempt has failed, it waits for a retry only ``FAILING_PROVIDER_WAIT_S``, never until
``auth.timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import state
from .errors import NoToken, TokenRejected, TokenUnavailable
from .idp import IdentityProvider, try_end_session
from .observability import Metrics, event
from .state import Event, Health, Phase, Token, token_clock

# An upstream 401 for a token obtained less than this long ago by an earlier 401-triggered
# renewal is passed back to the client: the upstream rejects something other than token age.
REJECTION_RENEWAL_INTERVAL_S = 5.0
# While the identity provider is failing, a request without a usable token waits at most this long for
# the retry in flight: a healthy answer takes milliseconds, a hanging one would hold it until auth.timeout_s.
FAILING_PROVIDER_WAIT_S = 0.5


@dataclass
class LastError:
    kind: str  # login | refresh
    reason: str  # provider error code, or unreachable / timeout / server_error / ...
    detail: str
    at: float  # wall clock


class TokenManager:
    """The one credential set of this process and the token it yields."""

    def __init__(
        self,
        idp: IdentityProvider,
        *,
        refresh_margin_s: float,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = token_clock,
        wall_clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        transient_backoff: Callable[..., float] = state.transient_backoff,
        rejected_backoff: Callable[[int, float], float] = state.rejected_backoff,
        rejection_renewal_interval_s: float = REJECTION_RENEWAL_INTERVAL_S,
    ) -> None:
        self._idp = idp
        self._margin = refresh_margin_s
        self._metrics = metrics
        self._clock = clock
        self._wall = wall_clock
        self._rand = rand
        self._transient_backoff = transient_backoff
        self._rejected_backoff = rejected_backoff
        self._rejection_interval = rejection_renewal_interval_s

        self.phase = Phase.IDLE
        self._token: Token | None = None
        self._flight: asyncio.Task[None] | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._retry_at = 0.0
        self._transient_failures = 0
        self._rejections = 0
        self._refresh_failures = 0
        self._last_rejection_renewal = -1e18
        self._rejection_renewed: Token | None = None  # the token the last 401-triggered renewal obtained
        self.last_error: LastError | None = None
        self.last_renewal_at: float | None = None  # wall clock
        self.counts = {"logins": 0, "refreshes": 0, "failures": 0, "rejections": 0}
        if metrics is not None:
            metrics.token_expiry.set_function(self._seconds_to_expiry)
            metrics.token_ready.set_function(lambda: 1.0 if self.usable() else 0.0)

    # --- what requests call ----------------------------------------------------------------------

    def usable(self) -> Token | None:
        """The held token if it may be sent now, else None. No I/O, no lock."""
        token = self._token
        if token is not None and self._clock() < token.usable_until:
            return token
        return None

    async def get(self) -> Token:
        """A usable token: the held one, or one from the renewal in flight; else :class:`NoToken`."""
        token = self.usable()
        if token is not None:
            return token
        if self._flight is None and self._waiting_out_backoff():
            raise NoToken(self.reason(), retry_after=self.retry_after())
        # Once the provider has failed, a retry may hang until auth.timeout_s: wait for it only briefly.
        wait = FAILING_PROVIDER_WAIT_S if self._provider_failing() else None
        try:
            await asyncio.wait_for(self._join_flight(None), wait)
        except TimeoutError:
            pass  # the retry goes on without this request
        token = self.usable()
        if token is None:
            raise NoToken(self.reason(), retry_after=self.retry_after())
        return token

    async def renew_rejected(self, rejected: Token) -> Token | None:
        """The upstream answered 401 to ``rejected``: the token to retry with, or None (don't retry)."""
        if self._token is not rejected:
            return self.usable()  # someone renewed it already
        if self._flight is not None:  # a renewal is under way (maybe for another 401 on this token): share it
            await self._join_flight(rejected)
            return self._after_renewal(rejected)
        now = self._clock()
        if rejected is self._rejection_renewed and now - self._last_rejection_renewal < self._rejection_interval:
            return None
        if self._flight is None and self._waiting_out_backoff():
            return None
        self._last_rejection_renewal = now
        event("token.rejected_upstream", level=logging.INFO, token=rejected.id)
        await self._join_flight(rejected)
        self._rejection_renewed = self._token
        return self._after_renewal(rejected)

    def _after_renewal(self, rejected: Token) -> Token | None:
        """The token to retry with after a 401-triggered renewal, or None.

        When the provider refused the credentials too, the token the upstream rejected is dropped:
        holding it would keep /-/ready green while every client gets the upstream's 401.
        """
        if self._token is rejected and self.phase is Phase.REJECTED:
            self._token = None
            event("token.dropped", level=logging.WARNING, token=rejected.id, reason="rejected upstream")
        token = self.usable()
        return token if token is not rejected else None

    # --- life of the manager ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the background scheduler: it logs in at once and renews before expiry."""
        if self._scheduler is None:
            self._scheduler = asyncio.get_running_loop().create_task(self._schedule(), name="token-scheduler")

    async def close(self, revoke: bool = False) -> None:
        """Stop renewing; when ``revoke``, end the session at the identity provider."""
        for task in (self._scheduler, self._flight):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:
                    pass
        self._scheduler = self._flight = None
        self._move(Event.STOP)
        token = self._token
        if revoke and token is not None:
            ended, what = await try_end_session(self._idp, token)
            if ended:
                event("token.session_ended", how=what, token=token.id)
            else:
                event("token.session_end_failed", level=logging.WARNING, detail=what)
        self._token = None

    # --- status ----------------------------------------------------------------------------------

    def reason(self) -> str:
        """Why no usable token is held (for 503 bodies and /-/ready)."""
        if self.usable() is not None:
            return "a usable token is held"
        err = self.last_error
        retry = self.retry_after()
        if self.phase is Phase.REJECTED and err is not None:
            return f"{err.detail}; check the credentials in [auth]; next login attempt in {retry:.0f}s"
        if self.phase is Phase.BACKING_OFF and err is not None:
            return f"{err.detail}; retrying in {retry:.0f}s"
        if self.phase in (Phase.IDLE, Phase.LOGGING_IN, Phase.REFRESHING):
            if err is not None and self._provider_failing():
                return f"{err.detail}; retrying now"
            return "logging in to the identity provider"
        if self.phase is Phase.STOPPED:
            return "shutting down"
        return "the access token has expired and could not be renewed yet"

    def retry_after(self) -> float:
        """Seconds until the next attempt (at least 1, for a Retry-After header)."""
        return max(1.0, self._retry_at - self._clock()) if self._waiting_out_backoff() else 1.0

    def status(self) -> dict[str, Any]:
        """What /-/status shows. Never a secret: the token is named by its fingerprint."""
        token = self._token
        now = self._clock()
        info: dict[str, Any] = {
            "state": self.phase.value,
            "ready": self.usable() is not None,
            "token": None,
            "last_refresh": _iso(self.last_renewal_at),
            "last_error": None,
            "counters": dict(self.counts),
        }
        if token is not None:
            info["token"] = {
                "id": token.id,
                "subject": token.subject,
                "health": token.health(now, self._margin).value,
                "expires_in_s": round(token.expires_at - now, 1),
                "expires_at": _iso(token.wall_expires_at),
                "refresh_in_s": round(max(0.0, token.refresh_at(self._margin) - now), 1),
                "has_refresh_token": bool(token.refresh_token),
            }
        if self.last_error is not None:
            err = self.last_error
            info["last_error"] = {"kind": err.kind, "reason": err.reason, "detail": err.detail, "at": _iso(err.at)}
        if self._waiting_out_backoff():
            info["retry_in_s"] = round(self._retry_at - now, 1)
        return info

    # --- internals -------------------------------------------------------------------------------

    def _provider_failing(self) -> bool:
        """The identity provider has failed or refused since the last token was obtained."""
        return bool(self._transient_failures or self._rejections)

    def _waiting_out_backoff(self) -> bool:
        return self.phase in (Phase.BACKING_OFF, Phase.REJECTED) and self._clock() < self._retry_at

    def _seconds_to_expiry(self) -> float:
        token = self._token
        return max(0.0, token.expires_at - self._clock()) if token is not None else 0.0

    def _move(self, ev: Event) -> None:
        self.phase = state.transition(self.phase, ev)
        self._changed.set()

    async def _join_flight(self, rejected: Token | None) -> None:
        flight = self._flight
        if flight is None:
            flight = self._flight = asyncio.get_running_loop().create_task(self._fly(rejected))
            flight.add_done_callback(self._flight_done)
        await asyncio.shield(flight)

    def _flight_done(self, task: asyncio.Task[None]) -> None:
        if self._flight is task:
            self._flight = None

    async def _fly(self, rejected: Token | None) -> None:
        """One renewal: re-check, then refresh or log in, following the transition table."""
        token = self._token
        now = self._clock()
        if rejected is not None and token is not rejected:
            return
        if (
            rejected is None
            and self.phase is Phase.HOLDING
            and token is not None
            and token.health(now, self._margin) is Health.FRESH
        ):
            return
        if self.phase is Phase.STOPPED:
            return
        self._move(state.choose_renewal(token, now, self._refresh_failures))
        while True:
            kind = "refresh" if self.phase is Phase.REFRESHING else "login"
            try:
                if self.phase is Phase.REFRESHING and token is not None:
                    new = await self._idp.refresh(token)
                else:
                    new = await self._idp.login()
            except TokenRejected as exc:
                self._record_failure(kind, exc.error, exc.detail, "rejected")
                self._move(Event.REJECTED)
                if self.phase is Phase.LOGGING_IN:
                    # The refresh token is dead: never send it again (and REJECTED accepts no REFRESH).
                    self._refresh_failures = state.MAX_REFRESH_FAILURES
                    event(
                        "token.refresh_rejected",
                        level=logging.WARNING,
                        error=exc.error,
                        description=exc.description,
                        next="login",
                    )
                    continue
                self._rejections += 1
                self._retry_at = self._clock() + self._rejected_backoff(self._rejections - 1, self._rand())
                event(
                    "token.login_rejected",
                    level=logging.ERROR,
                    error=exc.error,
                    description=exc.description,
                    status=exc.http_status,
                    hint="check auth.client_id, auth.username and the password",
                    retry_in_s=round(self._retry_at - self._clock(), 1),
                )
                return
            except TokenUnavailable as exc:
                self._fail_transient(kind, exc.reason, exc.detail, exc.retry_after)
                return
            except Exception as exc:
                logging.getLogger(__name__).exception("token.flight_crashed")
                self._fail_transient(kind, "internal_error", f"internal error ({type(exc).__name__})", None)
                return
            self._accept(kind, new, token)
            return

    def _accept(self, kind: str, new: Token, previous: Token | None) -> None:
        self._token = new
        self._move(Event.GRANTED)
        self._transient_failures = self._rejections = self._refresh_failures = 0
        self._retry_at = 0.0
        self.last_renewal_at = self._wall()
        self.counts["logins" if kind == "login" else "refreshes"] += 1
        if self._metrics is not None:
            self._metrics.token_requests.labels(kind, "ok").inc()
        rotated = previous is not None and previous.refresh_token != new.refresh_token
        event(
            "token.obtained",
            kind=kind,
            token=new.id,
            subject=new.subject,
            expires_in_s=round(new.lifetime, 1),
            refresh_token=("rotated" if rotated else "kept" if previous is not None else "new")
            if new.refresh_token
            else "none",
        )

    def _fail_transient(self, kind: str, reason: str, detail: str, retry_after: float | None) -> None:
        self._record_failure(kind, reason, detail, "failed")
        self._move(Event.FAILED)
        if kind == "refresh":
            self._refresh_failures += 1
        delay = self._transient_backoff(self._transient_failures, self._rand(), retry_after)
        self._transient_failures += 1
        self._retry_at = self._clock() + delay
        event(
            "token.unavailable",
            level=logging.WARNING,
            kind=kind,
            reason=reason,
            detail=detail,
            retry_in_s=round(delay, 1),
            token_held=self.usable() is not None,
        )

    def _record_failure(self, kind: str, reason: str, detail: str, outcome: str) -> None:
        self.last_error = LastError(kind, reason, detail, self._wall())
        self.counts["rejections" if outcome == "rejected" else "failures"] += 1
        if self._metrics is not None:
            self._metrics.token_requests.labels(kind, outcome).inc()
            self._metrics.count_token_failure(kind, reason)

    def _next_wake(self) -> float | None:
        """token_clock time of the next renewal attempt, or None when there is nothing to schedule."""
        if self.phase is Phase.IDLE:
            return self._clock()
        if self.phase in (Phase.BACKING_OFF, Phase.REJECTED):
            return self._retry_at
        if self.phase is Phase.HOLDING and self._token is not None:
            return self._token.refresh_at(self._margin)
        return None  # a flight is running; it will signal a change

    async def _schedule(self) -> None:
        """Renew when due; sleep until the next due time or until something changes."""
        while self.phase is not Phase.STOPPED:
            self._changed.clear()
            wake = self._next_wake()
            now = self._clock()
            if wake is not None and wake <= now:
                await self._join_flight(None)
                continue
            try:
                timeout = None if wake is None else wake - now
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))
