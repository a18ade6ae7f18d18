"""Fake token endpoints in the dialects the vendors document, as small aiohttp apps with hit counters, for loopback.

* :class:`FakeWebCommander` ("WebCommander API Authentication"): ``POST /api/v4/oauth2/token``, JSON only,
  ``grant_type`` ``client_credentials`` with ``auth_string`` = base64(``username:password``), ``redirect_uri``,
  ``client_id``, ``client_secret``; answers ``access_token``, ``expires_in`` 3600 and a ``refresh_token``.
  Refresh is undocumented, so by default a ``refresh_token`` grant gets 400 ``unsupported_grant_type``.
  The same app is the store's API, which wants the token in an ``access_token`` header (the docs' example).
* :class:`FakeOAuth2` (a generic provider's OAuth 2.0 guide, and RFC 6749): form or JSON bodies; client
  authentication in the body or with HTTP Basic (never both); grants ``password``, ``client_credentials``
  (with a refresh token, as the guide's Option 5 says of every grant but implicit;
  ``client_credentials_refresh=False`` for RFC 6749 §4.4.3's none),
  ``refresh_token`` (rotating: the presented refresh token dies) and ``authorization_code`` (a code works
  once; a second use revokes what it issued, RFC 6749 §4.1.2). Its API wants ``Authorization: Bearer``.

OLI and any Keycloak are :class:`proxy.demo.DemoIdP`. Every fake here builds, as DemoIdP does, on
:class:`proxy.demo.TokenEndpoint`: issued tokens checked with ``valid()``, hits per grant, and the next
requests (``fail_next``) or all of them (``fail_always``) answered with a canned :class:`proxy.demo.Fault`.
On top of it each records every token request as a :class:`Seen` (content type, fields, Basic
credentials) and issues opaque random tokens that its API accepts until they expire or are revoked.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote_plus

from aiohttp import web

from proxy.demo import NO_STORE, IssuedToken, TokenEndpoint

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"


@dataclass
class Seen:
    """One token request as the fake received it."""

    content_type: str
    fields: dict[str, str]
    basic: tuple[str, str] | None = None  # (client_id, client_secret) from an HTTP Basic header
    raw_json: dict[str, Any] | None = None  # a JSON body as sent, with its types

    @property
    def grant(self) -> str:
        return self.fields.get("grant_type", "")


@dataclass
class Issued(IssuedToken):
    """An issued token (``expires_at`` inf for a refresh token without expiry), with where it came from."""

    source: str = ""  # the authorization code a token came from, if any


@dataclass
class ApiCall:
    """One request that reached the fake's API, with the headers it arrived with."""

    path: str
    headers: dict[str, str]
    authorized: bool
    subject: str = ""
    why: str = ""


class FakeTokenServer(TokenEndpoint):
    """What the vendor fakes share: proxy.demo's TokenEndpoint (issued tokens, counters, faults, valid()), a
    record of every token request as it arrived, and an API that checks the token."""

    token_path = "/token"

    def __init__(
        self,
        *,
        expires_in: Any = 3600,
        api_header: str = "Authorization",
        api_prefix: str = "Bearer ",
    ) -> None:
        super().__init__()
        self.expires_in = expires_in
        self.api_header = api_header
        self.api_prefix = api_prefix
        self.seen: list[Seen] = []
        self.api_calls: list[ApiCall] = []
        self.handed_out: list[str] = []  # every token value issued (tests assert none reached a log)

    # --- test controls ---------------------------------------------------------------------------

    @property
    def token_url(self) -> str:
        return self.base_url + self.token_path

    def grants(self, grant: str) -> list[Seen]:
        """The token requests of one grant type, in order."""
        return [seen for seen in self.seen if seen.grant == grant]

    # --- issuing ---------------------------------------------------------------------------------

    def _issue(self, subject: str, *, with_refresh: bool, source: str = "") -> dict[str, Any]:
        access = "fake-at-" + secrets.token_urlsafe(24)
        lifetime = float(self.expires_in) if isinstance(self.expires_in, int | float) else 3600.0
        self.access[access] = Issued(subject, time.monotonic() + lifetime, source=source)
        self.handed_out.append(access)
        body: dict[str, Any] = {"access_token": access, "expires_in": self.expires_in}
        if with_refresh:
            refresh = self.add_refresh_token(subject, source=source)
            body["refresh_token"] = refresh
        return body

    def add_refresh_token(self, subject: str, *, source: str = "") -> str:
        """A refresh token the fake will honour (tests: an offline token obtained out of band)."""
        refresh = "fake-rt-" + secrets.token_urlsafe(24)
        self.refresh[refresh] = Issued(subject, float("inf"), "refresh", source=source)
        self.handed_out.append(refresh)
        return refresh

    # --- the app ---------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(self.token_path, self.token_endpoint)
        app.router.add_route("*", "/{tail:.*}", self._api)
        return app

    async def token_endpoint(self, request: web.Request) -> web.StreamResponse:
        seen = await _read_token_request(request)
        self.seen.append(seen)
        self.hits[f"grant:{seen.grant or 'missing'}"] += 1
        answer = await self.answer_fault()
        if answer is not None:
            self.hits["fault"] += 1
            return answer
        return await self.grant(request, seen)

    async def grant(self, request: web.Request, seen: Seen) -> web.StreamResponse:
        raise NotImplementedError

    async def _api(self, request: web.Request) -> web.Response:
        headers = dict(request.headers)
        value = request.headers.get(self.api_header, "")
        token = value[len(self.api_prefix) :] if value.startswith(self.api_prefix) else ""
        issued = self.valid(token) if token else None
        if issued is None:
            why = "missing" if not token else "expired" if token in self.access else "unknown"
            self.hits["api:rejected"] += 1
            self.api_calls.append(ApiCall(request.path, headers, False, why=why))
            return web.json_response({"error": "invalid_token", "why": why}, status=401)
        self.hits["api:authorized"] += 1
        self.api_calls.append(ApiCall(request.path, headers, True, subject=issued.subject))
        return web.json_response({"subject": issued.subject, "path": request.path})


# --- WebCommander --------------------------------------------------------------------------------


class FakeWebCommander(FakeTokenServer):
    """A WebCommander store: its token endpoint and an API behind the ``access_token`` header."""

    token_path = "/api/v4/oauth2/token"

    def __init__(
        self,
        *,
        client_id: str = "f6681a45ad483e3c0a37016561d5b8be",
        client_secret: str = "wc-secret-14e72a77",
        redirect_uri: str = "https://api.webcommander.com/oauth-callback",
        users: dict[str, str] | None = None,
        refresh_supported: bool = False,
        expires_in: Any = 3600,
        api_header: str = "access_token",
        api_prefix: str = "",
    ) -> None:
        super().__init__(expires_in=expires_in, api_header=api_header, api_prefix=api_prefix)
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri
        self.users = {"shop@example.com": "wc-password-1"} if users is None else users
        self.refresh_supported = refresh_supported

    async def grant(self, request: web.Request, seen: Seen) -> web.StreamResponse:
        if seen.content_type != JSON:
            return _error(415, "invalid_request", "Content-Type must be application/json")
        f = seen.fields
        if f.get("client_id") != self.client_id or f.get("client_secret") != self.client_secret:
            return _error(401, "invalid_client", "Invalid client id or secret")
        if f.get("grant_type") == "refresh_token":
            if not self.refresh_supported:
                return _error(400, "unsupported_grant_type", "Unsupported grant type")
            issued = self.refresh.pop(f.get("refresh_token", ""), None)
            if issued is None:
                return _error(400, "invalid_grant", "Invalid refresh token")
            return web.json_response(self._issue(issued.subject, with_refresh=True), headers=NO_STORE)
        if f.get("grant_type") != "client_credentials":
            return _error(400, "unsupported_grant_type", "Unsupported grant type")
        if f.get("redirect_uri") != self.redirect_uri:
            return _error(400, "invalid_request", "redirect_uri does not match the application")
        try:
            user, _, password = base64.b64decode(f.get("auth_string", ""), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return _error(400, "invalid_request", "auth_string is not base64")
        if not user or self.users.get(user) != password:
            return _error(401, "invalid_grant", "Invalid username or password")
        return web.json_response(self._issue(user, with_refresh=True), headers=NO_STORE)


# --- generic OAuth 2.0 ---------------------------------------------------------------------------


class FakeOAuth2(FakeTokenServer):
    """A generic RFC 6749 token endpoint (the generic OAuth 2.0 guide: Options 1 to 5, one per grant)."""

    token_path = "/oauth/token"

    def __init__(
        self,
        *,
        clients: dict[str, str | None] | None = None,
        users: dict[str, str] | None = None,
        bodies: tuple[str, ...] = (FORM, JSON),
        client_auth: tuple[str, ...] = ("body", "basic"),
        expires_in: Any = 3600,
        token_type: str | None = "Bearer",
        rotate_refresh: bool = True,
        client_credentials_refresh: bool = True,
    ) -> None:
        super().__init__(expires_in=expires_in)
        self.clients: dict[str, str | None] = {"BA779C49-client": "4AD3CE00-secret"} if clients is None else clients
        self.users = {"jsmith": "password123"} if users is None else users
        self.bodies = bodies
        self.client_auth = client_auth
        self.token_type = token_type
        self.rotate_refresh = rotate_refresh
        self.client_credentials_refresh = client_credentials_refresh
        self.codes: dict[str, tuple[str, str]] = {}  # code -> (subject, redirect_uri)
        self.spent_codes: set[str] = set()

    def add_code(self, subject: str = "jsmith", redirect_uri: str = "") -> str:
        """A one-time authorization code, as the provider's login page would redirect with."""
        code = "fake-code-" + secrets.token_urlsafe(16)
        self.codes[code] = (subject, redirect_uri)
        return code

    def _respond(self, body: dict[str, Any]) -> web.Response:
        if self.token_type is not None:
            body["token_type"] = self.token_type
        return web.json_response(body, headers=NO_STORE)

    async def grant(self, request: web.Request, seen: Seen) -> web.StreamResponse:
        if seen.content_type not in self.bodies:
            return _error(415, "invalid_request", f"unsupported content type {seen.content_type!r}")
        f = seen.fields
        in_body = "client_secret" in f
        if seen.basic is not None and in_body:  # RFC 6749 §2.3: MUST NOT use more than one method
            return _error(400, "invalid_request", "more than one client authentication method")
        method = "basic" if seen.basic is not None else "body"
        client_id, secret = seen.basic if seen.basic is not None else (f.get("client_id", ""), f.get("client_secret"))
        if client_id not in self.clients or (secret is not None and method not in self.client_auth):
            return _invalid_client(seen)
        expected = self.clients[client_id]
        if expected is not None and secret != expected:
            return _invalid_client(seen)
        grant = seen.grant
        if grant == "password":
            user = f.get("username", "")
            if not user or self.users.get(user) != f.get("password"):
                return _error(400, "invalid_grant", "Invalid username or password")
            return self._respond(self._issue(user, with_refresh=True))
        if grant == "client_credentials":
            if expected is None:
                return _error(400, "unauthorized_client", "public clients cannot use client_credentials")
            # The guide's Option 5: "For all work flows, except implicit (option 2), the access token will come with
            # a refresh token" (RFC 6749 §4.4.3: SHOULD NOT).
            return self._respond(self._issue(client_id, with_refresh=self.client_credentials_refresh))
        if grant == "refresh_token":
            presented = f.get("refresh_token", "")
            issued = self.refresh.get(presented)
            if issued is None:
                return _error(400, "invalid_grant", "Invalid refresh token")
            if self.rotate_refresh:
                del self.refresh[presented]
            return self._respond(self._issue(issued.subject, with_refresh=True, source=issued.source))
        if grant == "authorization_code":
            code = f.get("code", "")
            if code in self.spent_codes:
                self._revoke_from(code)
                return _error(400, "invalid_grant", "Authorization code already used")
            if code not in self.codes:
                return _error(400, "invalid_grant", "Invalid authorization code")
            subject, redirect_uri = self.codes.pop(code)
            self.spent_codes.add(code)
            if redirect_uri and f.get("redirect_uri") != redirect_uri:
                return _error(400, "invalid_grant", "redirect_uri does not match")
            return self._respond(self._issue(subject, with_refresh=True, source=code))
        if grant == "implicit":
            return _error(400, "unsupported_grant_type", "implicit is not a token endpoint grant")
        return _error(400, "unsupported_grant_type", "Unsupported grant type")

    def _revoke_from(self, code: str) -> None:
        for tokens in (self.access, self.refresh):
            for value in [v for v, issued in tokens.items() if issued.source == code]:
                del tokens[value]


# --- helpers -------------------------------------------------------------------------------------


async def _read_token_request(request: web.Request) -> Seen:
    content_type = request.content_type
    fields: dict[str, str] = {}
    raw_json = None
    if content_type == FORM:
        fields = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    elif content_type == JSON:
        try:
            data = json.loads(await request.read())
        except ValueError:
            data = None
        if isinstance(data, dict):
            fields = {str(k): str(v) for k, v in data.items()}
            raw_json = data
    basic = None
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Basic "):
        try:
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            basic = (unquote_plus(user), unquote_plus(password))  # RFC 6749 §2.3.1: form-urlencoded first
        except (binascii.Error, UnicodeDecodeError):
            basic = ("", "")
    return Seen(content_type, fields, basic, raw_json)


def _error(status: int, error: str, description: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"error": error, "error_description": description}, status=status, headers={**NO_STORE, **(headers or {})}
    )


def _invalid_client(seen: Seen) -> web.Response:
    # RFC 6749 §5.2: 401 with WWW-Authenticate when the client tried HTTP Basic.
    headers = {"WWW-Authenticate": 'Basic realm="oauth"'} if seen.basic is not None else None
    return _error(401, "invalid_client", "Client authentication failed", headers)


FakeT = TypeVar("FakeT", bound=FakeTokenServer)


async def start_fake(aiohttp_server: Any, fake: FakeT) -> FakeT:
    """Run ``fake`` on 127.0.0.1 and set its ``base_url``."""
    server = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("")).rstrip("/")
    return fake


# --- a certified OpenID Provider (panva's oidc-provider, in its defaults' shape) ------------------


class FakeOIDCProvider(FakeOAuth2):
    """An OpenID Provider that is not Keycloak: discovery at ``/.well-known/openid-configuration``, an
    ``end_session_endpoint`` that is RP-initiated logout (a browser page: 200 HTML whatever is posted, ending
    nothing), and an RFC 7009 ``revocation_endpoint`` (200 for any token, RFC 7009 §2.2) that really revokes."""

    token_path = "/token"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.revocations: list[Seen] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_route("*", "/session/end", self._end_session_page)
        app.router.add_post("/token/revocation", self._revoke)
        app.router.add_post(self.token_path, self.token_endpoint)
        app.router.add_route("*", "/{tail:.*}", self._api)
        return app

    async def _discovery(self, request: web.Request) -> web.Response:
        self.hits["discovery"] += 1
        return web.json_response(
            {
                "issuer": self.base_url,
                "token_endpoint": self.base_url + self.token_path,
                "end_session_endpoint": self.base_url + "/session/end",
                "revocation_endpoint": self.base_url + "/token/revocation",
            }
        )

    async def _end_session_page(self, request: web.Request) -> web.Response:
        self.hits["end_session_page"] += 1
        await request.read()
        return web.Response(
            text="<html><body><form>Do you want to sign out?</form></body></html>", content_type="text/html"
        )

    async def _revoke(self, request: web.Request) -> web.Response:
        seen = await _read_token_request(request)
        self.revocations.append(seen)
        token = seen.fields.get("token", "")
        self.refresh.pop(token, None)
        self.access.pop(token, None)
        return web.Response(status=200)
