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

Nothing here decides. The manager keeps one :class:`state.Lifecycle` value; it asks ``state`` what
to do (refresh or log in, whether a 401 is worth a renewal, how long to wait), performs the I/O
through ``idp.py``, and feeds each outcome back through the ``state.on_*`` functions. The clock and
the sleeps are injected (``clock=``, ``sleep=``), so a test can run minutes of backoff, or a soak
of short tokens, on a fake clock in milliseconds.

An upstream 401 calls :meth:`renew_rejected` with the token that was rejected. It renews only if
that token is still the current one (invalidation by identity, not by clock), and only when
``state.on_upstream_rejected`` sees reason to: a token the upstream accepted (the forwarder calls
:meth:`accepted`) and now rejects is renewed at once; one it never accepted only a few times.

While backing off, a request with no usable token gets :class:`NoToken` at once (503 with
Retry-After), without a token request; once an attempt has failed, it waits for a retry only
``FAILING_PROVIDER_WAIT_S``, never until ``auth.timeout_s``. A login that replaced a session whose
refresh token still lived ends that session in the background (bounded, best effort).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from . import state
from .errors import NoToken, TokenRejected, TokenUnavailable
from .idp import END_SESSION_TIMEOUT_S, try_end_session
from .observability import Metrics, event
from .state import Health, Lifecycle, Phase, Token, token_clock
from .store import Entry, SharedStore, StoreUnavailable

# While the identity provider is failing, a request without a usable token waits at most this long for
# the retry in flight: a healthy answer takes milliseconds, a hanging one would hold it until auth.timeout_s.
FAILING_PROVIDER_WAIT_S = 0.5
CODE_SPENT = (
    "the authorization code (auth.code) was already sent once and is never sent twice, and no "
    "refresh token is left to renew with: get a new code, set auth.code and restart"
)
REFRESH_TOKEN_SPENT = (
    "the configured refresh token (auth.refresh_token) was rotated away by the provider and is never sent "
    "again (that would be refresh-token reuse), and no refresh token is left to renew with: set a new "
    "auth.refresh_token and restart"
)


# A refresh that failed for one of these reasons was answered without the refresh token being used:
# the claim on it is lifted. After a timeout or an unreadable answer it may have been used: the claim stays.
UNSPENT_REASONS = ("unreachable", "server_error", "rate_limited", "temporarily_unavailable")


# Backing off without a token, a request looks in the store for another process's token at most this often.
PEEK_INTERVAL_S = 1.0
STORE_NEEDED = (
    "the store is unavailable and the refresh token the fleet shares may only be presented by the process that "
    "obtained it (presenting it twice is refresh-token reuse); this grant cannot log in again: waiting for the store"
)


class _LeaseBusy(Exception):
    """Another process held the store's lease for longer than a lease lives."""


class TokenSource(Protocol):
    """What the manager needs of an identity provider (``idp.IdentityProvider``, or a test's fake)."""

    grant_type: str

    async def login(self) -> Token: ...

    async def refresh(self, current: Token) -> Token: ...

    async def end_session(self, token: Token) -> str: ...

    def rejection_keys(self, error: str) -> tuple[str, ...]: ...


@dataclass
class LastError:
    kind: str  # login | refresh
    reason: str  # provider error code, or unreachable / timeout / server_error / ...
    detail: str
    at: float  # wall clock
    keys: tuple[str, ...] = ()  # a refusal: the [auth] keys to check


class TokenManager:
    """The one credential set of this process and the token it yields."""

    def __init__(
        self,
        idp: TokenSource,
        *,
        refresh_margin_s: float,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = token_clock,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        wall_clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        transient_backoff: state.TransientPolicy | None = None,
        rejected_backoff: state.RejectedPolicy = state.rejected_backoff,
        rejection_renewal_interval_s: float | None = None,
        min_login_interval_s: float = state.MIN_LOGIN_INTERVAL_S,
        store: SharedStore | None = None,
        inject_value: str = "Bearer {token}",
    ) -> None:
        """``transient_backoff`` replaces ``state.retry_delay`` (tests that are about something else);
        ``rejection_renewal_interval_s = 0`` lifts the limits on 401-triggered renewals (likewise);
        ``min_login_interval_s`` replaces ``state.MIN_LOGIN_INTERVAL_S`` (tests whose second login is incidental).
        ``store``: the fleet's shared entry (None: this process alone); ``inject_value`` builds the
        header of a token read from it."""
        self._idp = idp
        self._margin = refresh_margin_s
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._wall = wall_clock
        self._rand = rand
        self._transient_backoff = transient_backoff
        self._rejected_backoff = rejected_backoff
        self._unlimited_401 = rejection_renewal_interval_s == 0
        self._min_login_interval = min_login_interval_s
        self._store = store
        self._inject_value = inject_value
        self._seen = 0  # the version of the store's entry last read or written
        self._leased = False  # this process holds the store's renewal lease (during a flight)
        # The refresh token the fleet shares (read from or written to the store), and whether this process got
        # it from the provider: without the store, only that process presents it.
        self._fleet_refresh: str | None = None
        self._fleet_refresh_mine = False
        self._credentials_at = 0.0  # wall clock: when this process's [auth] secrets last changed
        self._peeked_at = -math.inf  # when a request backing off last looked in the store (_peek)

        self._lc = Lifecycle(grant_type=idp.grant_type)
        self._flight: asyncio.Task[None] | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._enders: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self.last_error: LastError | None = None
        self.last_renewal_at: float | None = None  # wall clock
        self.counts = {"logins": 0, "refreshes": 0, "failures": 0, "rejections": 0}
        if store is not None:
            self.counts["adopted"] = 0  # tokens taken from the store
        if metrics is not None:
            metrics.token_expiry.set_function(self._seconds_to_expiry)
            metrics.token_ready.set_function(lambda: 1.0 if self.usable() else 0.0)

    # --- what requests call ----------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._lc.phase

    @property
    def lifecycle(self) -> Lifecycle:
        """The current lifecycle value (read-only: it is replaced, never changed)."""
        return self._lc

    @property
    def renewing(self) -> bool:
        """A renewal (a flight) is under way."""
        return self._flight is not None and not self._flight.done()

    @property
    def scheduling(self) -> bool:
        """The background scheduler runs (started, not stopped or crashed)."""
        return self._scheduler is not None and not self._scheduler.done()

    @property
    def held(self) -> Token | None:
        """The token held, usable or not."""
        return self._lc.token

    def now(self) -> float:
        """The manager's clock (token times are on it)."""
        return self._clock()

    def usable(self) -> Token | None:
        """The held token if it may be sent now, else None. No I/O, no lock."""
        token = self._lc.token
        if token is not None and self._clock() < token.usable_until:
            return token
        return None

    async def get(self) -> Token:
        """A usable token: the held one, or one from the renewal in flight; else :class:`NoToken`."""
        token = self.usable()
        if token is not None:
            return token
        if self._flight is None and self._waiting_out_backoff():
            if self._store is not None and await self._peek():
                token = self.usable()
                if token is not None:
                    return token
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

    def accepted(self, token: Token) -> None:
        """The upstream answered something other than 401 to a request sent with ``token``: evidence
        that a later 401 for it means it was revoked. Cheap: called for every answer."""
        lc = self._lc
        if token is lc.token and not lc.accepted:
            self._lc = state.on_accepted(lc, token)

    async def renew_rejected(self, rejected: Token) -> Token | None:
        """The upstream answered 401 to ``rejected``: the token to retry with, or None (don't retry)."""
        if self._lc.token is not rejected:
            return self.usable()  # someone renewed it already
        if self._flight is not None:  # a renewal is under way (maybe for another 401 on this token): share it
            await self._join_flight(rejected)
            return self._after_renewal(rejected)
        if self._waiting_out_backoff():
            return None
        was_accepted = self._lc.accepted
        allowed = state.on_upstream_rejected(self._lc, self._clock())
        if allowed is None and not self._unlimited_401:  # the 401 goes back to the client
            event("token.rejected_upstream", level=logging.DEBUG, token=rejected.id, accepted=was_accepted, renew=False)
            return None
        if allowed is not None:
            self._lc = allowed
        event("token.rejected_upstream", level=logging.INFO, token=rejected.id, accepted=was_accepted, renew=True)
        await self._join_flight(rejected)
        return self._after_renewal(rejected)

    def _after_renewal(self, rejected: Token) -> Token | None:
        """The token to retry with after a 401-triggered renewal, or None.

        When the provider refused the credentials too, the token the upstream rejected is dropped:
        holding it would keep /-/ready green while every client gets the upstream's 401.
        """
        if self._lc.token is rejected and self._lc.phase is Phase.REJECTED:
            self._lc = state.on_dropped(self._lc)
            event("token.dropped", level=logging.WARNING, token=rejected.id, reason="rejected upstream")
        token = self.usable()
        return token if token is not rejected else None

    def credentials_changed(self, keys: tuple[str, ...]) -> None:
        """The secrets ``keys`` were replaced (proxy/secrets.py): what that changes is
        ``state.on_credentials_changed``'s decision (refused credentials: the next login now); the
        scheduler wakes for it."""
        lc = state.on_credentials_changed(self._lc, keys, self._clock())
        if any(key.startswith("auth.") for key in keys):
            # A refusal the fleet wrote before now was of the old credentials: this process tries the new ones.
            self._credentials_at = self._wall()
        if lc is not self._lc:
            self._set(lc)

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
        if self._enders:  # old sessions being ended: each is bounded by END_SESSION_TIMEOUT_S
            _, pending = await asyncio.wait(set(self._enders), timeout=END_SESSION_TIMEOUT_S)
            for task in pending:
                task.cancel()
        token = self._lc.token
        self._lc = state.on_stopped(self._lc)
        self._changed.set()
        if revoke and token is not None:
            await self._end_session(token, "shutdown")
        if self._store is not None:
            await self._store.close()

    # --- status ----------------------------------------------------------------------------------

    def reason(self) -> str:
        """Why no usable token is held (for 503 bodies and /-/ready)."""
        if self.usable() is not None:
            return "a usable token is held"
        err = self.last_error
        retry = self.retry_after()
        phase = self._lc.phase
        if phase is Phase.REJECTED and err is not None:
            keys = f" ({', '.join(err.keys)})" if err.keys else ""
            return f"{err.detail}; check the credentials in [auth]{keys}; next login attempt in {retry:.0f}s"
        if phase is Phase.BACKING_OFF and err is not None:
            return f"{err.detail}; retrying in {retry:.0f}s"
        if phase in (Phase.IDLE, Phase.LOGGING_IN, Phase.REFRESHING):
            if err is not None and self._provider_failing():
                return f"{err.detail}; retrying now"
            return "logging in to the identity provider"
        if phase is Phase.STOPPED:
            return "shutting down"
        return "the access token has expired and could not be renewed yet"

    def retry_after(self) -> float:
        """Seconds until the next attempt (at least 1, for a Retry-After header)."""
        return max(1.0, self._lc.retry_at - self._clock()) if self._waiting_out_backoff() else 1.0

    def status(self) -> dict[str, Any]:
        """What /-/status shows. Never a secret: the token is named by its fingerprint."""
        lc = self._lc
        token = lc.token
        now = self._clock()
        info: dict[str, Any] = {
            "state": lc.phase.value,
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
                "has_refresh_token": state.live_refresh(lc, now) is not None,
                "accepted_upstream": lc.accepted,
            }
        if self.last_error is not None:
            err = self.last_error
            info["last_error"] = {"kind": err.kind, "reason": err.reason, "detail": err.detail, "at": _iso(err.at)}
        if self._waiting_out_backoff():
            info["retry_in_s"] = round(lc.retry_at - now, 1)
        if self._store is not None:
            info["store"] = self._store.status()
        return info

    # --- internals -------------------------------------------------------------------------------

    def _provider_failing(self) -> bool:
        """The identity provider has failed or refused since the last token was obtained."""
        return bool(self._lc.transient_failures or self._lc.rejections)

    def _waiting_out_backoff(self) -> bool:
        lc = self._lc
        return lc.phase in (Phase.BACKING_OFF, Phase.REJECTED) and self._clock() < lc.retry_at

    def _seconds_to_expiry(self) -> float:
        token = self._lc.token
        return max(0.0, token.expires_at - self._clock()) if token is not None else 0.0

    def _set(self, lc: Lifecycle) -> None:
        self._lc = lc
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
        """One renewal: re-check; with a store, take the fleet's token or its lease; then refresh or log
        in, as ``state`` decides."""
        lc = self._lc
        now = self._clock()
        if rejected is not None and lc.token is not rejected:
            return
        if (
            rejected is None
            and lc.phase is Phase.HOLDING
            and lc.token is not None
            and lc.token.health(now, self._margin) is Health.FRESH
        ):
            return
        if lc.phase is Phase.STOPPED:
            return
        store = self._store
        try:
            alone = store is not None
            if store is not None and store.usable():
                try:
                    if await self._share(store, rejected):
                        return
                    alone = False
                except StoreUnavailable:
                    pass  # logged by the store; this renewal goes on alone, as without one
                except _LeaseBusy as busy:  # never renew uncoordinated: the holder may still be at the provider
                    self._fail_before_renewal("store_busy", str(busy))
                    return
            if alone and not self._may_renew_alone():
                self._fail_before_renewal("store_unavailable", STORE_NEEDED)
                return
            await self._renew(rejected)
        finally:
            if self._leased and store is not None:
                self._leased = False
                await store.release()

    async def _renew(self, rejected: Token | None) -> None:
        """Refresh or log in until a token is granted, the credentials are refused, or an attempt failed."""
        self._set(state.on_started(self._lc, state.choose_renewal(self._lc, self._clock())))
        while True:
            kind = "refresh" if self._lc.phase is Phase.REFRESHING else "login"
            try:
                new = await self._attempt(kind)
            except TokenRejected as exc:
                self._record_failure(kind, exc.error, exc.detail, "rejected", exc.error)
                before = self._lc
                self._set(
                    state.on_rejected(
                        before, kind, self._clock(), self._rand(), error=exc.error, policy=self._rejected_backoff
                    )
                )
                if kind == "refresh":
                    if self._lc.refresh_unsupported and not before.refresh_unsupported:
                        event(
                            "idp.refresh_unsupported", description=exc.description, next="log in to renew from now on"
                        )
                    event(
                        "token.refresh_rejected",
                        level=logging.WARNING,
                        error=exc.error,
                        description=exc.description,
                        next="login",
                    )
                    continue  # the same flight logs in (LOGGING_IN)
                event(
                    "token.login_rejected",
                    level=logging.ERROR,
                    error=exc.error,
                    description=exc.description,
                    status=exc.http_status,
                    hint=_check(self._idp.rejection_keys(exc.error)),
                    retry_in_s=round(self._lc.retry_at - self._clock(), 1),
                )
                await self._publish(rejection=exc)
                return
            except TokenUnavailable as exc:
                self._fail_transient(kind, exc.reason, exc.detail, exc.retry_after)
                if kind == "refresh" and exc.reason in UNSPENT_REASONS:
                    await self._publish()  # the provider answered without using the refresh token: unclaim it
                return
            except Exception as exc:
                # A bug, not the provider: logged on our own logger (formatted and redacted like every line),
                # by its type and where it happened, never its message (it could quote a response's values).
                frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
                where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else "?"
                event("token.flight_crashed", level=logging.ERROR, kind=kind, error=type(exc).__name__, where=where)
                self._fail_transient(kind, "internal_error", f"internal error ({type(exc).__name__})", None)
                return
            self._accept(kind, new, for_401=rejected is not None)
            await self._publish()
            return

    # --- the fleet (store.py) ------------------------------------------------------------------------

    async def _share(self, store: SharedStore, rejected: Token | None) -> bool:
        """Before renewing: take what the fleet has, or its lease. True when nothing is left to do (a
        token, or a refusal, came from the store); False when this process is to renew (holding the
        lease, with the fleet's refresh token). Raises StoreUnavailable, or _LeaseBusy when another
        process kept the lease for longer than one lives."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + store.lease_s
        waited = relooked = False
        while True:
            if self._take(await store.read(), rejected):
                return True
            if await store.lease():
                self._leased = True
                entry = await store.read()  # again, under the lease: it may have changed meanwhile
                if self._take(entry, rejected):
                    return True
                self._take_stale(entry, rejected)
                if await self._claim(store, entry):
                    return False
                # The claim was refused: the lease expired while this process was paused, and another holder
                # may be presenting that refresh token now. Never present it too: look again, as a waiter of
                # that holder's lease (once; a second refusal is another lease lost: renewing waits).
                self._leased = False
                await store.release()
                if not relooked:
                    relooked = True
                    deadline = max(deadline, loop.time() + store.lease_s)
                    continue
            if not waited:
                waited = True
                event("store.lease_wait", level=logging.DEBUG, kind=store.kind)
            if loop.time() >= deadline:
                raise _LeaseBusy(
                    f"another process has held the store's renewal lease for {store.lease_s:.0f}s without "
                    "writing a token"
                )
            await store.wait(min(store.lease_s, deadline - loop.time()))

    async def _peek(self) -> bool:
        """Backing off without a token: has another process of the fleet written one meanwhile (its
        credentials were fixed, or the provider answers it again)? At most one look a second; True when a
        token was taken."""
        store = self._store
        now = self._clock()
        if store is None or now < self._peeked_at + PEEK_INTERVAL_S or not store.usable():
            return False
        self._peeked_at = now
        try:
            entry = await store.read()
        except StoreUnavailable:
            return False
        if self._flight is not None or not self._waiting_out_backoff() or entry is None:
            return False
        now = self._clock()
        token = self._new_token(entry, now, None)
        if token is None or token.health(now, self._margin) is not Health.FRESH:
            return False
        self._seen = entry.version
        self._adopt(token, entry)
        return True

    def _take(self, entry: Entry | None, rejected: Token | None) -> bool:
        """Adopt the entry's token when it is FRESH and new to this process, or the fleet's refusal when no
        token can be sent; a usable token this process lacks is adopted too, but the renewal goes on."""
        if entry is None:
            self._seen = 0  # nothing stored (or Redis restarted empty): the next write creates the entry
            return False
        self._seen = entry.version
        now = self._clock()
        token = self._new_token(entry, now, rejected)
        if token is not None:
            health = token.health(now, self._margin)
            if health is Health.FRESH or (health is Health.STALE and self.usable() is None):
                self._adopt(token, entry)
                return health is Health.FRESH
        wall = self._wall()
        if (
            entry.rejected_until > wall
            and (self.usable() is None or rejected is not None)
            and entry.written_at >= self._credentials_at
        ):
            self._set(
                state.on_fleet_rejected(
                    self._lc, now, retry_at=now + entry.rejected_until - wall, rejections=entry.rejections
                )
            )
            keys = self._idp.rejection_keys(entry.rejected_error)
            self.last_error = LastError("login", entry.rejected_error, entry.rejected_detail, entry.written_at, keys)
            event(
                "store.rejection_adopted",
                level=logging.WARNING,
                writer=entry.writer,
                error=entry.rejected_error,
                retry_in_s=round(entry.rejected_until - wall, 1),
            )
            return True
        return False

    def _new_token(self, entry: Entry, now: float, rejected: Token | None) -> Token | None:
        """The entry's token on this process's clock, when it is neither the one held nor ``rejected``."""
        token = self._token_from(entry, now)
        if token is None or (self._lc.token is not None and token.access_token == self._lc.token.access_token):
            return None
        if rejected is not None and token.access_token == rejected.access_token:
            return None
        return token

    def _take_stale(self, entry: Entry | None, rejected: Token | None) -> None:
        """Holding the lease: renew from the fleet's session (its refresh token), not this process's own,
        and space this process's login by the fleet's."""
        if entry is None:
            return
        now = self._clock()
        token = self._new_token(entry, now, rejected)
        lc = self._lc
        if (
            token is not None
            and token.can_refresh(now)
            # not over a newer session of this process's own (obtained while it was cut off from the store)
            and (lc.token is None or not lc.token.can_refresh(now) or token.obtained_at > lc.token.obtained_at)
        ):
            self._adopt(token, entry)
        login_at = now - (self._wall() - entry.login_at) if entry.login_at else -math.inf
        self._lc = state.on_fleet_seen(self._lc, rejections=entry.rejections, login_ended_at=login_at)

    async def _claim(self, store: SharedStore, entry: Entry | None) -> bool:
        """Before presenting a refresh token: mark it claimed in the store, so that if this process dies
        with the answer, the next holder does not present it again. A claim left by another process on
        the refresh token held makes this one log in instead (where the grant can). False when the claim
        was refused (the lease is no longer this process's): then nothing may be presented."""
        lc = self._lc
        if state.choose_renewal(lc, self._clock()) is not state.Event.REFRESH or lc.token is None:
            return True
        held = lc.token.refresh_token
        claimed = entry is not None and entry.refresh_token == held and entry.refresh_claimed not in ("", store.owner)
        # A refresh token the fleet shared that the store no longer holds (Redis restarted empty, or moved on
        # while this process was cut off) may have been presented meanwhile: the store vouches for it no more.
        unvouched = held == self._fleet_refresh and (entry is None or entry.refresh_token != held)
        if claimed or unvouched:
            self._lc = state.on_refresh_in_doubt(lc)
            by = entry.refresh_claimed if claimed and entry is not None else "the store no longer holds it"
            event("store.refresh_in_doubt", level=logging.WARNING, claimed_by=by)
            if self._lc.refresh_refused:
                return True
        written = await store.write(replace(self._entry_of(entry), refresh_claimed=store.owner), self._seen)
        if written is None:
            self._lease_lost(store)
            return False
        self._seen = written.version
        return True

    async def _publish(self, rejection: TokenRejected | None = None) -> None:
        """Holding the lease: write what this renewal got (a token, or the refusal) for the fleet."""
        store = self._store
        if store is None or not self._leased:
            return
        entry = self._entry_of(
            store.last_entry if store.last_entry and store.last_entry.version == self._seen else None
        )
        if rejection is not None:
            now = self._clock()
            entry = replace(
                entry,
                rejected_until=self._wall() + max(0.0, self._lc.retry_at - now),
                rejections=self._lc.rejections,
                rejected_error=rejection.error,
                rejected_detail=rejection.detail,
            )
        try:
            written = await store.write(entry, self._seen)
            if written is None and self._seen and await store.read() is None and await store.lease():
                # The entry this renewal started from is gone, and nothing replaced it (Redis restarted empty):
                # what this process just got is the fleet's newest token; the store vouches for it again, so
                # nobody presents the refresh token this renewal spent.
                written = await store.write(entry, 0)
        except StoreUnavailable:
            return
        if written is None:
            self._lease_lost(store)
        else:
            self._seen = written.version
            self._fleet_refresh, self._fleet_refresh_mine = written.refresh_token or None, True

    def _may_renew_alone(self) -> bool:
        """Without the store, a refresh token the fleet shares is never presented where the grant can log in
        again: the others may present it too (all of them cut off from the store, or some only), and a
        rotating provider answers the second with "Stale token", or revokes the session. Where the grant
        cannot log in, only the process that got it from the provider (the last writer) presents it; the
        others wait for the store (False)."""
        token = self._lc.token
        now = self._clock()
        if token is None or not token.refresh_token or token.refresh_token != self._fleet_refresh:
            return True
        if state.choose_renewal(self._lc, now) is not state.Event.REFRESH:
            return True
        self._lc = state.on_refresh_in_doubt(self._lc)
        return state.choose_renewal(self._lc, now) is not state.Event.REFRESH or self._fleet_refresh_mine

    def _fail_before_renewal(self, reason: str, detail: str) -> None:
        self._set(state.on_started(self._lc, state.choose_renewal(self._lc, self._clock())))
        self._fail_transient("refresh" if self._lc.phase is Phase.REFRESHING else "login", reason, detail, None)

    def _lease_lost(self, store: SharedStore) -> None:
        """The fenced write was refused: the token stays this process's own. The lease is still released
        at the end of the flight (compare-and-delete: only if it is still ours)."""
        event("store.write_conflict", level=logging.WARNING, kind=store.kind, version=self._seen)

    def _adopt(self, token: Token, entry: Entry) -> None:
        self._set(
            state.on_adopted(
                self._lc, token, login_spent=entry.login_spent and entry.written_at >= self._credentials_at
            )
        )
        self._fleet_refresh = token.refresh_token
        self._fleet_refresh_mine = self._store is not None and entry.writer == self._store.owner
        self.counts["adopted"] += 1
        event("store.token_adopted", level=logging.DEBUG, token=token.id, writer=entry.writer, version=entry.version)

    def _token_from(self, entry: Entry, now: float) -> Token | None:
        """The entry's token on this process's clock, or None when it has none."""
        if not entry.access_token:
            return None
        ahead = now - self._wall()  # token_clock time minus wall time
        return Token(
            access_token=entry.access_token,
            obtained_at=entry.obtained_at + ahead,
            expires_at=entry.expires_at + ahead,
            refresh_token=entry.refresh_token or None,
            refresh_expires_at=None if entry.refresh_expires_at is None else entry.refresh_expires_at + ahead,
            subject=entry.subject,
            scope=entry.scope,
            wall_expires_at=entry.expires_at,
            header_value=self._inject_value.replace("{token}", entry.access_token),
        )

    def _entry_of(self, base: Entry | None) -> Entry:
        """The entry for what this process holds now (the token and the login spacing), unclaimed."""
        lc = self._lc
        now = self._clock()
        behind = self._wall() - now  # wall time minus token_clock time
        token = lc.token
        entry = Entry(
            login_spent=lc.code_spent or lc.configured_refresh_spent or bool(base and base.login_spent),
            login_at=lc.login_ended_at + behind if math.isfinite(lc.login_ended_at) else 0.0,
        )
        if token is None:
            return entry
        return replace(
            entry,
            access_token=token.access_token,
            refresh_token=token.refresh_token or "",
            obtained_at=token.obtained_at + behind,
            expires_at=token.expires_at + behind,
            refresh_expires_at=None if token.refresh_expires_at is None else token.refresh_expires_at + behind,
            subject=token.subject,
            scope=token.scope,
        )

    async def _attempt(self, kind: str) -> Token:
        """One token request of ``kind``; a login waits out the minimum login interval first."""
        if kind == "refresh":
            token = self._lc.token
            assert token is not None  # choose_renewal refreshes only a held token
            return await self._idp.refresh(token)
        if state.login_blocked(self._lc):
            if self._lc.grant_type == "refresh_token":
                raise TokenRejected("refresh_token_spent", REFRESH_TOKEN_SPENT, 400, detail=REFRESH_TOKEN_SPENT)
            raise TokenRejected("code_already_used", CODE_SPENT, 400, detail=CODE_SPENT)
        wait = state.login_wait(self._lc, self._clock(), self._min_login_interval)
        if wait > 0:
            await self._sleep(wait)
        return await self._idp.login()

    def _accept(self, kind: str, new: Token, for_401: bool) -> None:
        previous = self._lc.token
        lc, replaced = state.on_granted(self._lc, kind, new, self._clock(), for_401=for_401)
        self._set(lc)
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
        if replaced is not None:
            task = asyncio.get_running_loop().create_task(
                self._end_session(replaced, "replaced by a new login"), name="token-end-session"
            )
            self._enders.add(task)
            task.add_done_callback(self._enders.discard)

    async def _end_session(self, token: Token, why: str) -> None:
        ended, what = await try_end_session(self._idp, token)
        if ended and what != "none":
            if why == "shutdown":
                event("token.session_ended", how=what, token=token.id)
            else:
                event("token.session_ended", how=what, token=token.id, why=why)
            return
        if ended:  # the provider offers neither: worth a warning only when ending it was asked for
            what = "no logout or revocation endpoint is known (auth.revoke_url)"
        level = logging.WARNING if why == "shutdown" or not ended else logging.DEBUG
        event("token.session_end_failed", level=level, token=token.id, detail=what)

    def _fail_transient(self, kind: str, reason: str, detail: str, retry_after: float | None) -> None:
        self._record_failure(kind, reason, detail, "failed")
        now = self._clock()
        self._set(
            state.on_failed(
                self._lc,
                kind,
                now,
                self._rand(),
                retry_after=retry_after,
                reason=reason,
                policy=self._transient_backoff,
            )
        )
        event(
            "token.unavailable",
            level=logging.WARNING,
            kind=kind,
            reason=reason,
            detail=detail,
            retry_in_s=round(self._lc.retry_at - now, 1),
            token_held=self.usable() is not None,
        )

    def _record_failure(self, kind: str, reason: str, detail: str, outcome: str, error: str = "") -> None:
        keys = self._idp.rejection_keys(error) if outcome == "rejected" else ()
        self.last_error = LastError(kind, reason, detail, self._wall(), keys)
        self.counts["rejections" if outcome == "rejected" else "failures"] += 1
        if self._metrics is not None:
            self._metrics.token_requests.labels(kind, outcome).inc()
            self._metrics.count_token_failure(kind, reason)

    def _next_wake(self) -> float | None:
        """token_clock time of the next renewal attempt, or None when there is nothing to schedule."""
        lc = self._lc
        if lc.phase is Phase.IDLE:
            return self._clock()
        if lc.phase in (Phase.BACKING_OFF, Phase.REJECTED):
            return lc.retry_at
        if lc.phase is Phase.HOLDING and lc.token is not None:
            return lc.token.refresh_at(self._margin)
        return None  # a flight is running; it will signal a change

    async def _schedule(self) -> None:
        """Renew when due; sleep until the next due time or until something changes."""
        while self._lc.phase is not Phase.STOPPED:
            self._changed.clear()
            wake = self._next_wake()
            now = self._clock()
            if wake is not None and wake <= now:
                await self._join_flight(None)
                continue
            await self._nap(None if wake is None else wake - now)

    async def _nap(self, seconds: float | None) -> None:
        """Until ``seconds`` have passed on the injected sleep, or something changed."""
        changed = asyncio.ensure_future(self._changed.wait())
        if seconds is None:
            try:
                await changed
            finally:
                changed.cancel()
            return
        nap = asyncio.ensure_future(self._sleep(seconds))
        try:
            await asyncio.wait((changed, nap), return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            nap.cancel()


def _check(keys: tuple[str, ...]) -> str:
    """``check auth.client_id, auth.username and auth.password``."""
    if not keys:
        return "check the [auth] section"
    return "check " + (", ".join(keys[:-1]) + " and " + keys[-1] if len(keys) > 1 else keys[0])


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))
