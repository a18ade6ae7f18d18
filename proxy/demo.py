"""A demo identity provider (Keycloak's dialect) and a demo API, for ``--dev`` and for tests.

Both are small aiohttp apps meant for loopback only. The identity provider issues signed JWTs with
short lifetimes, rotates refresh tokens, answers errors the way Keycloak 26 does (its ``error`` codes,
``error_description`` texts and statuses, e.g. 400 ``invalid_grant`` "Invalid user credentials"),
counts every request, and can be told to fail the next requests. The API accepts only tokens the
identity provider issued and that have not expired, and counts what it saw, so a test can assert "no
expired token ever reached the upstream". The identity provider is a :class:`TokenEndpoint`: the issued
tokens, counters and canned faults that the tests' fakes of other vendors' token endpoints build on too.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


@dataclass
class Fault:
    """A canned answer for the next token request(s)."""

    status: int
    body: bytes | str | dict[str, Any] = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class IssuedToken:
    subject: str
    expires_at: float  # monotonic
    kind: str = "access"


class TokenEndpoint:
    """What every fake token endpoint keeps, and the controls a test has over it: the tokens it issued
    (which an API checks with :meth:`valid`), request counters, and canned faults for the next token
    requests or for all of them. :class:`DemoIdP` is one; the tests' vendor fakes build on it too."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.access: dict[str, IssuedToken] = {}
        self.refresh: dict[str, IssuedToken] = {}
        self.faults: list[Fault] = []
        self.sticky: Fault | None = None
        self.base_url = ""

    # --- test controls ---------------------------------------------------------------------------

    def fail_next(self, *faults: Fault) -> None:
        """Answer the next token requests with these, one each."""
        self.faults.extend(faults)

    def fail_always(self, fault: Fault | None) -> None:
        """Answer every token request with ``fault`` (once the queued ones are spent) until called with None."""
        self.sticky = fault

    def revoke_all_access(self) -> None:
        """Invalidate every issued access token (the upstream will answer 401)."""
        self.access.clear()

    def revoke_all_refresh(self) -> None:
        self.refresh.clear()

    @property
    def token_requests(self) -> int:
        return sum(v for k, v in self.hits.items() if k.startswith("grant:"))

    def valid(self, token: str) -> IssuedToken | None:
        issued = self.access.get(token)
        if issued is None or time.monotonic() >= issued.expires_at:
            return None
        return issued

    async def answer_fault(self) -> web.Response | None:
        """The canned answer to this token request, after its delay, if a fault is queued or set for all."""
        fault = self.faults.pop(0) if self.faults else self.sticky
        if fault is None:
            return None
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        return fault_response(fault)


class DemoIdP(TokenEndpoint):
    """A Keycloak-like token endpoint: password, client_credentials and refresh_token grants."""

    def __init__(
        self,
        *,
        realm: str = "demo",
        users: dict[str, str] | None = None,
        clients: dict[str, str | None] | None = None,
        access_lifetime_s: float = 300.0,
        refresh_lifetime_s: float = 1800.0,
        send_expires_in: bool = True,
        revoke_refresh_tokens: bool = False,
    ) -> None:
        super().__init__()
        self.realm = realm
        self.users = {"demo": "demo"} if users is None else users
        self.clients: dict[str, str | None] = {"demo-client": None} if clients is None else clients
        self.access_lifetime_s = access_lifetime_s
        self.refresh_lifetime_s = refresh_lifetime_s
        self.send_expires_in = send_expires_in
        self.revoke_refresh_tokens = revoke_refresh_tokens
        self.key = secrets.token_bytes(64)
        self.used_refresh: set[str] = set()
        self.requests: list[dict[str, str]] = []  # every token request's fields (tests inspect them)

    # --- the app ---------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        base = f"/realms/{self.realm}/protocol/openid-connect"
        app.router.add_post(f"{base}/token", self.token_endpoint)
        app.router.add_post(f"{base}/logout", self.logout_endpoint)
        app.router.add_post(f"{base}/revoke", self._revoke)
        app.router.add_get(f"/realms/{self.realm}/.well-known/openid-configuration", self._discovery)
        return app

    def token_url(self) -> str:
        return f"{self.base_url}/realms/{self.realm}/protocol/openid-connect/token"

    def issuer(self) -> str:
        return f"{self.base_url}/realms/{self.realm}"

    async def _discovery(self, request: web.Request) -> web.Response:
        self.hits["discovery"] += 1
        base = f"{self.issuer()}/protocol/openid-connect"
        return web.json_response(
            {
                "issuer": self.issuer(),
                "token_endpoint": f"{base}/token",
                "end_session_endpoint": f"{base}/logout",
                "revocation_endpoint": f"{base}/revoke",
            }
        )

    async def token_endpoint(self, request: web.Request) -> web.StreamResponse:
        """POST .../token. Tests wrap it (override, then call super) to hold, fail or watch token requests."""
        if request.content_type != "application/x-www-form-urlencoded":
            self.hits["bad_content_type"] += 1
            return web.json_response({"error": "RESTEASY003065: Cannot consume content type"}, status=415)
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        self.requests.append(form)
        grant = form.get("grant_type", "")
        self.hits[f"grant:{grant or 'missing'}"] += 1
        answer = await self.answer_fault()
        if answer is not None:
            return answer
        if not grant:
            return _oauth_error(400, "invalid_request", "Missing form parameter: grant_type")
        if grant not in ("password", "refresh_token", "client_credentials"):
            return _oauth_error(400, "unsupported_grant_type", "Unsupported grant_type")
        client_id, secret = _client_credentials(request, form)
        if client_id not in self.clients:
            return _oauth_error(401, "invalid_client", "Invalid client or Invalid client credentials")
        expected_secret = self.clients[client_id]
        if expected_secret is not None and secret != expected_secret:
            return _oauth_error(401, "unauthorized_client", "Invalid client or Invalid client credentials")
        if grant == "password":
            user = form.get("username", "")
            if not user:
                return _oauth_error(401, "invalid_request", "Missing parameter: username")
            if self.users.get(user) != form.get("password") or user not in self.users:
                return _oauth_error(400, "invalid_grant", "Invalid user credentials")
            return self.issue(user, client_id)
        if grant == "client_credentials":
            if expected_secret is None:
                return _oauth_error(400, "unauthorized_client", "Client not allowed for client credentials")
            return self.issue(f"service-account-{client_id}", client_id)
        presented = form.get("refresh_token", "")
        if not presented:
            return _oauth_error(400, "invalid_request", "No refresh token")
        issued = self.refresh.get(presented)
        if issued is None:
            return _oauth_error(400, "invalid_grant", "Invalid refresh token")
        if time.monotonic() >= issued.expires_at:
            return _oauth_error(400, "invalid_grant", "Token is not active")
        if self.revoke_refresh_tokens:
            if presented in self.used_refresh:
                return _oauth_error(400, "invalid_grant", "Maximum allowed refresh token reuse exceeded")
            self.used_refresh.add(presented)
        return self.issue(issued.subject, client_id)

    def issue(self, subject: str, client_id: str) -> web.Response:
        """A new access and refresh token for ``subject``, registered and answered. Tests override it to watch
        what is issued."""
        now_wall = time.time()
        now = time.monotonic()
        claims = {
            "exp": int(now_wall + self.access_lifetime_s),
            "iat": int(now_wall),
            "jti": str(uuid.uuid4()),
            "iss": self.issuer(),
            "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, subject)),
            "typ": "Bearer",
            "azp": client_id,
            "preferred_username": subject,
        }
        access = jwt.encode(claims, self.key, algorithm="HS256")
        refresh = jwt.encode({**claims, "typ": "Refresh", "jti": str(uuid.uuid4())}, self.key, algorithm="HS512")
        self.access[access] = IssuedToken(subject, now + self.access_lifetime_s)
        self.refresh[refresh] = IssuedToken(subject, now + self.refresh_lifetime_s, "refresh")
        body: dict[str, Any] = {"access_token": access}
        if self.send_expires_in:
            body["expires_in"] = self.access_lifetime_s
            body["refresh_expires_in"] = self.refresh_lifetime_s
        body.update(
            {
                "refresh_token": refresh,
                "token_type": "Bearer",
                "not-before-policy": 0,
                "session_state": str(uuid.uuid4()),
                "scope": "email profile",
            }
        )
        return web.json_response(body, headers=NO_STORE)

    async def logout_endpoint(self, request: web.Request) -> web.Response:
        """POST .../logout (ends the session of a refresh token). Tests wrap it to watch logouts."""
        form = await request.post()
        self.hits["logout"] += 1
        token = form.get("refresh_token")
        if isinstance(token, str):
            self.refresh.pop(token, None)
        return web.Response(status=204)

    async def _revoke(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.hits["revoke"] += 1
        token = form.get("token")
        if isinstance(token, str):
            self.refresh.pop(token, None)
            self.access.pop(token, None)
        return web.Response(status=200)


def _client_credentials(request: web.Request, form: dict[str, str]) -> tuple[str, str | None]:
    client_id, secret = form.get("client_id", ""), form.get("client_secret")
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Basic "):
        from urllib.parse import unquote

        user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        client_id = client_id or unquote(user)
        secret = unquote(password)
    return client_id, secret


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status, headers=NO_STORE)


def fault_response(fault: Fault) -> web.Response:
    """A canned answer: a dict becomes JSON; bytes or text go out as an HTML page unless headers say else."""
    if isinstance(fault.body, dict):
        return web.json_response(fault.body, status=fault.status, headers=fault.headers)
    body = fault.body.encode() if isinstance(fault.body, str) else fault.body
    headers = {"Content-Type": "text/html", **fault.headers}
    return web.Response(body=body, status=fault.status, headers=headers)


class DemoAPI:
    """An API that accepts only live tokens from a :class:`DemoIdP`, and counts what it saw."""

    def __init__(self, idp: DemoIdP, header: str = "Authorization", prefix: str = "Bearer ") -> None:
        self.idp = idp
        self.header = header
        self.prefix = prefix
        self.hits: Counter[str] = Counter()
        self.rejected: list[str] = []  # why each rejected request was rejected

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_get("/v1/hello", self._hello)
        app.router.add_get("/v1/report", self.report)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        return app

    def authorize(self, request: web.Request) -> str | web.Response:
        """The subject of the request's token, or the 401 to answer. Tests override it to watch refusals."""
        value = request.headers.get(self.header, "")
        if not value.startswith(self.prefix):
            self.hits["unauthenticated"] += 1
            self.rejected.append("missing")
            return web.Response(status=401, headers={"WWW-Authenticate": 'Bearer realm="demo"'})
        token = value[len(self.prefix) :]
        issued = self.idp.valid(token)
        if issued is None:
            self.hits["invalid_token"] += 1
            self.rejected.append("expired" if token in self.idp.access else "unknown")
            return web.Response(
                status=401,
                headers={
                    "WWW-Authenticate": 'Bearer realm="demo", error="invalid_token", '
                    'error_description="Token verification failed"'
                },
            )
        self.hits["authorized"] += 1
        return issued.subject

    async def _hello(self, request: web.Request) -> web.Response:
        who = self.authorize(request)
        if isinstance(who, web.Response):
            return who
        return web.json_response({"message": "hello from the demo API", "subject": who})

    async def report(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/report: a CSV report of ``rows`` rows, streamed (tests override it to cut it short)."""
        who = self.authorize(request)
        if isinstance(who, web.Response):
            return who
        rows = min(int(request.query.get("rows", "10")), 10_000_000)
        response = web.StreamResponse(headers={"Content-Type": "text/csv"})
        await response.prepare(request)
        await response.write(b"day,employee,active_minutes\n")
        batch = []
        for i in range(rows):
            batch.append(f"2026-11-{1 + i % 28:02d},{who}-{i % 97},{(i * 37) % 480}\n")
            if len(batch) == 1000:
                await response.write("".join(batch).encode())
                batch.clear()
        if batch:
            await response.write("".join(batch).encode())
        await response.write_eof()
        return response

    async def _echo(self, request: web.Request) -> web.Response:
        who = self.authorize(request)
        if isinstance(who, web.Response):
            return who
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        headers = [[k, v] for k, v in request.headers.items() if k.lower() != self.header.lower()]
        return web.json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": headers,
                "body_sha256": digest.hexdigest(),
                "body_bytes": size,
                "subject": who,
            },
            dumps=lambda o: json.dumps(o),
        )
