"""Token endpoints for the lifecycle tests: one that holds every request until the test lets it go
(:class:`HeldIdP`), one that remembers every token value it handed out (:class:`RecordingIdP`), and one
that takes its time and is its own API, refusing tokens past their real expiry (:class:`SlowIdP`)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter

import jwt
from aiohttp import web

from proxy.demo import DemoIdP


class HeldIdP(DemoIdP):
    """A DemoIdP whose token endpoint waits until the test opens ``gate``."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.gate = asyncio.Event()
        self.waiting = 0

    async def token_endpoint(self, request: web.Request) -> web.StreamResponse:
        self.waiting += 1
        await self.gate.wait()
        return await super().token_endpoint(request)


class RecordingIdP(DemoIdP):
    """A DemoIdP that remembers every access and refresh token value it issued, in ``issued``."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.issued: list[str] = []

    def issue(self, subject: str, client_id: str) -> web.Response:
        response = super().issue(subject, client_id)
        body = json.loads(response.body)  # type: ignore[arg-type]
        self.issued.extend(v for k, v in body.items() if k in ("access_token", "refresh_token"))
        return response


class SlowIdP:
    """A token endpoint that issues a token, then takes ``delays[n]`` seconds to answer request ``n``.

    A token lives ``lifetimes[n]`` seconds (the last one repeats) from the moment it is issued, and the
    response says so in ``expires_in`` (or ``expires_in`` when given). With ``as_jwt`` the token is a JWT
    whose ``iat``/``exp`` carry the real lifetime. The same app is the upstream: it answers 401 to a token
    past its real expiry and counts what it saw in ``api`` (ok / expired / unknown).
    """

    def __init__(
        self,
        lifetimes: list[float],
        delays: list[float] | None = None,
        *,
        expires_in: float | None = None,
        as_jwt: bool = False,
    ) -> None:
        self.lifetimes = lifetimes
        self.delays = delays or []
        self.expires_in = expires_in
        self.as_jwt = as_jwt
        self.key = secrets.token_bytes(32)
        self.grants: list[str] = []
        self.expiry: dict[str, float] = {}  # token -> monotonic time it dies
        self.api: Counter[str] = Counter()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self.token_endpoint)
        app.router.add_get("/{tail:.*}", self._api)
        return app

    async def token_endpoint(self, request: web.Request) -> web.Response:
        form = await request.post()
        n = len(self.grants)
        self.grants.append(str(form.get("grant_type")))
        lifetime = self.lifetimes[min(n, len(self.lifetimes) - 1)]
        if self.as_jwt:
            now = time.time()
            access = jwt.encode({"sub": "slow", "iat": now, "exp": now + lifetime, "n": n}, self.key, "HS256")
        else:
            access = f"slow-{n}-{secrets.token_urlsafe(12)}"
        self.expiry[access] = time.monotonic() + lifetime
        await asyncio.sleep(self.delays[n] if n < len(self.delays) else 0.0)
        expires_in = lifetime if self.expires_in is None else self.expires_in
        body = {"access_token": access, "token_type": "Bearer", "expires_in": expires_in, "refresh_token": f"rt-{n}"}
        return web.json_response(body)

    async def _api(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        dies = self.expiry.get(token)
        seen = "unknown" if dies is None else "expired" if time.monotonic() >= dies else "ok"
        self.api[seen] += 1
        if seen != "ok":
            return web.Response(status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return web.json_response({"ok": True})
