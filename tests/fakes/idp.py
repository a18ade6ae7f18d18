"""An in-process stand-in for ``proxy.idp.IdentityProvider``: numbered tokens, every call recorded, failures on request.

No HTTP: it is for TokenManager tests, on real time or on :class:`tests.fakes.clock.VirtualTime`. It
stands in for the Python interface TokenManager calls (login / refresh / end_session -> Token), not for a
token endpoint, so it shares nothing with the HTTP fakes (proxy.demo.TokenEndpoint and what builds on it:
DemoIdP, tests/fakes/vendors.py): a token endpoint's faults are HTTP answers, this one's are exceptions.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.errors import TokenRejected, TokenUnavailable
from proxy.state import Token, token_clock

SECRET_MARK = "s3cr3t-tok"  # every token the fake issues contains it; logs must never show it


def rejected(description: str = "Invalid user credentials", error: str = "invalid_grant") -> TokenRejected:
    return TokenRejected(error, description, 400)


def unavailable(detail: str = "token endpoint answered 503 (an HTML page without an OAuth error)") -> TokenUnavailable:
    return TokenUnavailable(detail, reason="server_error")


class FakeIdP:
    """Issues numbered tokens, records every call, fails on request.

    ``outcomes`` is a queue of what the next calls do: an exception to raise, or None to grant; when it is
    empty, a call fails with ``fail_rate`` probability (drawn from ``rng``) with a 503, else grants.
    ``gate``, when set, holds every call until it is opened. ``delay`` is each call's latency, slept
    on ``sleep`` (a VirtualTime's, for virtual-time tests). ``expiry`` maps each access token to when
    the provider considers it dead (counted from the request's arrival, the strictest reading).
    """

    def __init__(
        self,
        clock: Callable[[], float] = token_clock,
        *,
        lifetime: float = 300.0,
        refresh_lifetime: float | None = 1800.0,
        delay: float = 0.0,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        grant_type: str = "password",
        fail_rate: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.refresh_lifetime = refresh_lifetime
        self.delay = delay
        self.sleep = sleep
        self.grant_type = grant_type
        self.fail_rate = fail_rate
        self.rng = rng or random.Random(0)
        self.outcomes: list[Exception | None] = []
        self.failing: set[str] = set()  # kinds of call (login, refresh) that fail with a 503 until removed
        self.gate: asyncio.Event | None = None
        self.calls: list[tuple[str, str | None, float]] = []  # (kind, refresh token presented, clock)
        self.issued = 0
        self.ended: list[Token] = []
        self.end_result: Exception | str = "logout"
        self.expiry: dict[str, float] = {}
        self.in_flight = 0
        self.most_in_flight = 0

    @property
    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.calls]

    def times(self, kind: str | None = None) -> list[float]:
        return [at for k, _, at in self.calls if kind is None or k == kind]

    async def login(self) -> Token:
        return await self._grant("login", None)

    async def refresh(self, current: Token) -> Token:
        return await self._grant("refresh", current.refresh_token)

    async def end_session(self, token: Token) -> str:
        self.ended.append(token)
        if isinstance(self.end_result, Exception):
            raise self.end_result
        return self.end_result

    def rejection_keys(self, error: str) -> tuple[str, ...]:
        return ("auth.client_id", "auth.username", "auth.password")

    async def _grant(self, kind: str, presented: str | None) -> Token:
        self.calls.append((kind, presented, self.clock()))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                await self.sleep(self.delay)
            outcome = self.outcomes.pop(0) if self.outcomes else None
            if outcome is None and kind in self.failing:
                outcome = unavailable()
            if outcome is None and self.fail_rate and self.rng.random() < self.fail_rate:
                outcome = unavailable()
            if outcome is not None:
                raise outcome
        finally:
            self.in_flight -= 1
        self.issued += 1
        asked = self.calls[-1][2]
        access = f"access-{SECRET_MARK}-{self.issued}"
        self.expiry[access] = asked + self.lifetime  # as if issued the moment the request arrived
        return Token(
            access_token=access,
            obtained_at=asked,
            expires_at=asked + self.lifetime,
            refresh_token=f"refresh-{SECRET_MARK}-{self.issued}",
            refresh_expires_at=None if self.refresh_lifetime is None else asked + self.refresh_lifetime,
            subject="demo",
            header_value=f"Bearer {access}",
        )
