"""Talking to the identity provider: login, refresh and end-of-session, each returning a Token.

Every failure leaves this module as one of two errors:

* :class:`TokenRejected`: the provider answered 4xx (wrong password, dead refresh token, unknown
  client), or a 200 carrying such an OAuth error. Retrying soon would not help and, for logins, would
  lock the account.
* :class:`TokenUnavailable`: unreachable, timeout, 5xx, 429, ``temporarily_unavailable`` with any status,
  or a response we cannot use (not JSON, no ``access_token``, a token type we cannot send, a token
  that expired before its answer arrived), or a 404 (or 3xx, 405, 410) that is no OAuth answer at all:
  no token endpoint there, or not yet (a gateway during a deploy). Worth retrying with backoff.

This module keeps no state that steers renewals: what to send next is decided in ``state.py`` and
asked for by ``tokens.py`` (:meth:`IdentityProvider.login` always sends the configured grant).

Nothing raised here carries a credential: messages are built from status codes, the provider's
``error`` / ``error_description`` and our own words.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlencode

import aiohttp
import jwt

from .client_auth import ClientAuthenticator, describe_tls_refusal
from .config import SECRET_KEYS, AuthConfig, InjectConfig, check_url
from .egress import Egress, EgressError, EgressProxy, refusal
from .errors import TokenRejected, TokenUnavailable
from .observability import Redactor, event
from .providers import PRESETS
from .state import Token, token_clock

if TYPE_CHECKING:
    from .secrets import Secrets

TOKEN_CONTENT_TYPES = {"form": "application/x-www-form-urlencoded", "json": "application/json"}
# Statuses that mean "later", not "no".
TRANSIENT_STATUSES = {408, 425, 429}
# OAuth errors that mean "later", whatever status they come with (RFC 6749 §4.1.2.1 defines them; some token
# endpoints send them with a 400, or a 200). Any other error in a response without a token is a refusal: retrying
# it soon would lock the account.
TRANSIENT_ERRORS = {"temporarily_unavailable", "server_error"}
MAX_DESCRIPTION = 200
MAX_ERROR_BODY = 64 * 1024
# A token response (or a discovery document) is a few KiB; one larger than this is not read further, so a
# hostile or broken endpoint cannot make the sidecar hold any amount of memory (or read until auth.timeout_s).
MAX_TOKEN_BODY = 1024 * 1024
DISCOVERY_PATH = "/.well-known/openid-configuration"
# How long a session-ending call may delay shutdown (or --check).
END_SESSION_TIMEOUT_S = 5.0
SUPPORTED_TOKEN_TYPES = {"bearer"}
# Token request fields whose values are secrets: the [auth] secret keys (config.SECRET_KEYS), which are sent
# under their own names, and auth_string (WebCommander's base64 of username:password).
SECRET_FIELDS = (*(key for section, key in SECRET_KEYS if section == "auth"), "auth_string")
# Statuses that, without an OAuth error in the body, say "no token endpoint here": the URL is wrong (or the
# provider is not serving it yet). The credentials never reached a check, so retrying soon locks nothing.
NOT_AN_ENDPOINT_STATUSES = {404, 405, 410}
# What a session-ending call answers on success: Keycloak's logout endpoint 204 No Content (LogoutEndpoint:
# also for a session already gone); RFC 7009 §2.2 revocation 200, for an unknown token too. Anything else,
# e.g. the 200 HTML page of an OpenID Provider's end_session_endpoint (a browser endpoint), ended nothing.
LOGOUT_SUCCESS = 204
REVOKE_SUCCESS = 200
# A lifetime longer than this (a provider's "never expires" as 1e300) is cut to it, so expiry times stay
# finite and printable; the token is then renewed once a year, which costs nothing.
MAX_LIFETIME_S = 365 * 24 * 3600.0
# The refresh token's lifetime in seconds: Keycloak's name (in the 200 sample of OLI's "Bearer Token" page),
# then the name in that page's own field table ("Response description"), which other providers use too.
REFRESH_EXPIRY_FIELDS = ("refresh_expires_in", "refresh_token_expires_in")


@dataclass
class Reply:
    """What the token endpoint answered: status, the parsed JSON (or the raw bytes), its content type."""

    status: int
    body: Any
    content_type: str = ""


@dataclass
class Endpoints:
    token: str
    logout: str = ""  # Keycloak: ends the whole session with the refresh token
    revoke: str = ""  # RFC 7009


class IdentityProvider:
    """The token endpoint of one provider, spoken in its dialect (``[auth]``)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        auth: AuthConfig,
        inject: InjectConfig,
        *,
        clock: Callable[[], float] = token_clock,
        wall_clock: Callable[[], float] = time.time,
        secrets: Secrets | None = None,
        egress: Egress | None = None,
    ) -> None:
        """``secrets``: where the secret values in force are read at each request (they rotate,
        proxy/secrets.py); without it, those of ``auth``."""
        self._session = session
        self._given_auth = auth
        self._in_force = secrets
        self._egress = egress  # which proxy each request goes through (auth.proxy_url, HTTPS_PROXY); None: direct
        self._inject = inject
        self._clock = clock
        self._wall = wall_clock
        self._timeout = aiohttp.ClientTimeout(total=auth.timeout_s)
        self._client_auth = ClientAuthenticator(auth, clock=wall_clock)
        self.grant_type = auth.grant_type
        preset = PRESETS.get(auth.provider)
        # Keycloak's logout endpoint (POST refresh_token, 204) only for the presets that speak Keycloak, or
        # where the user named one: elsewhere discovery's end_session_endpoint is a browser page.
        self._keycloak = preset is not None and preset.keycloak
        self._endpoints: Endpoints | None = None
        if auth.token_url:
            self._endpoints = Endpoints(auth.token_url, auth.logout_url, auth.revoke_url)

    @property
    def _auth(self) -> AuthConfig:
        """``[auth]`` with the secrets in force now (a rotated file takes effect at the next token request)."""
        return self._in_force.auth if self._in_force is not None else self._given_auth

    # --- grants ----------------------------------------------------------------------------------

    async def login(self) -> Token:
        """Obtain a token with the configured grant (whether to, and when, is ``state.py``'s decision:
        an authorization code is sent once, RFC 6749 §4.1.2)."""
        a = self._auth
        fields: dict[str, str] = {"grant_type": a.grant_type}
        if a.grant_type == "password":
            fields.update(username=a.username, password=a.password)
        elif a.grant_type == "refresh_token":
            fields["refresh_token"] = a.refresh_token
        elif a.grant_type == "authorization_code":
            fields["code"] = a.code
            if a.code_verifier:  # PKCE (RFC 7636 §4.5): with the code exchange, and nowhere else
                fields["code_verifier"] = a.code_verifier
        if a.auth_string:
            fields["auth_string"] = base64.b64encode(f"{a.username}:{a.password}".encode()).decode()
            fields.pop("username", None)
            fields.pop("password", None)
        if a.redirect_uri:
            fields["redirect_uri"] = a.redirect_uri
        if a.scope:
            fields["scope"] = a.scope
        # RFC 6749 §6: a response without a new refresh token leaves the one sent valid.
        previous = fields["refresh_token"] if a.grant_type == "refresh_token" else None
        return await self._grant("login", fields, previous_refresh=previous)

    async def refresh(self, current: Token) -> Token:
        """Exchange ``current.refresh_token`` for a new token (the refresh token may rotate)."""
        if not current.refresh_token:
            raise TokenRejected("invalid_request", "no refresh token is held", 400)
        fields = {"grant_type": "refresh_token", "refresh_token": current.refresh_token}
        if self._auth.scope:
            fields["scope"] = self._auth.scope
        return await self._grant("refresh", fields, previous_refresh=current.refresh_token)

    async def end_session(self, token: Token) -> str:
        """End the session of ``token`` at the provider: Keycloak's logout endpoint (the Keycloak presets,
        or an explicit ``auth.logout_url``), else RFC 7009 revocation of its refresh token (else of the
        access token) with ``token_type_hint``.

        Returns what was done (``logout``, ``revoke``, or ``none`` when the provider offers neither);
        an answer other than the endpoint's documented success raises, so it is never taken for one.
        """
        endpoints = await self.endpoints()
        if endpoints.logout and token.refresh_token:
            url, fields, how, success = (
                endpoints.logout,
                {"refresh_token": token.refresh_token},
                "logout",
                LOGOUT_SUCCESS,
            )
        elif endpoints.revoke:
            value = token.refresh_token or token.access_token
            hint = "refresh_token" if token.refresh_token else "access_token"
            url, fields, how = endpoints.revoke, {"token": value, "token_type_hint": hint}, "revoke"
            success = REVOKE_SUCCESS
        else:
            return "none"
        redact = Redactor([value for value in fields.values()] + self._secrets())
        try:
            reply = await self._post(url, fields, redact, form_only=True)
        except (TokenRejected, TokenUnavailable) as exc:
            _mask_secrets(exc, redact)
            raise
        if reply.status != success:
            raise TokenRejected(
                f"http_{reply.status}",
                f"{how} endpoint {url} answered {reply.status} with {_describe_body(reply)}, not {success}",
                reply.status,
            )
        return how

    def rejection_keys(self, error: str) -> tuple[str, ...]:
        """The [auth] keys a refusal with OAuth ``error`` points at: only those the configured grant uses."""
        a = self._auth
        client = ["auth.client_id"]
        if a.client_auth == "private_key_jwt":  # the provider may not have (or no longer have) the public key
            client += ["auth.client_key_file"] + (["auth.client_key_id"] if a.client_key_id else [])
        elif a.client_auth == "tls_client_auth":
            client += ["auth.client_cert_file"]
        elif a.client_secret or a.grant_type == "client_credentials":
            client.append("auth.client_secret")
        if error.startswith("http_"):  # not an OAuth answer: the URL, not the credentials
            return ("auth.token_url" if a.token_url else "auth.issuer",)
        if error in ("invalid_client", "unauthorized_client"):
            return tuple(client)
        if error == "invalid_scope":
            return ("auth.scope",)
        if error == "unsupported_grant_type":
            return ("auth.grant_type",)
        if error == "code_already_used":
            return ("auth.code",)
        if error == "refresh_token_spent":
            return ("auth.refresh_token",)
        grant = {
            "password": ["auth.username", "auth.password"],
            "client_credentials": [],
            "refresh_token": ["auth.refresh_token"],
            "authorization_code": ["auth.code"]
            + (["auth.redirect_uri"] if a.redirect_uri else [])
            + (["auth.code_verifier"] if a.code_verifier else []),
        }[a.grant_type]
        if a.auth_string:
            grant += ["auth.username", "auth.password"]
        return tuple(dict.fromkeys(client + grant))

    def _secrets(self) -> list[str]:
        a = self._auth
        return [a.client_secret, a.password, a.refresh_token, a.code, a.code_verifier]

    # --- endpoints -------------------------------------------------------------------------------

    async def endpoints(self) -> Endpoints:
        """The token (and logout/revocation) endpoints; found by OpenID discovery once, when needed."""
        if self._endpoints is None:
            self._endpoints = await self._discover(self._auth.issuer.rstrip("/"))
        return self._endpoints

    async def _discover(self, issuer: str) -> Endpoints:
        url = issuer + DISCOVERY_PATH
        proxy, via, headers = self._via(url, "discovery_failed")
        try:
            # Never followed: a redirect is no discovery document (and could point anywhere, over http too).
            async with self._session.get(
                url, headers=headers, timeout=self._timeout, allow_redirects=False, **via
            ) as resp:
                if resp.status == 407 and proxy is not None:
                    raise TokenUnavailable(
                        f"OpenID discovery at {url} failed: {refusal(proxy, 407, url)}", reason="discovery_failed"
                    )
                if resp.status != 200:
                    raise TokenUnavailable(
                        f"OpenID discovery at {url} answered {resp.status}", reason="discovery_failed"
                    )
                raw, whole = await _read_body(resp.content, MAX_TOKEN_BODY)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TokenUnavailable(
                f"OpenID discovery at {url} failed ({_describe_transport(exc, proxy)})", reason="discovery_failed"
            ) from exc
        if not whole:
            raise TokenUnavailable(
                f"OpenID discovery at {url} answered more than {MAX_TOKEN_BODY >> 20} MiB", reason="discovery_failed"
            )
        doc = _json_or_raw(raw)
        token_url = doc.get("token_endpoint") if isinstance(doc, dict) else None
        if not isinstance(token_url, str) or check_url(token_url):
            raise TokenUnavailable(
                f"OpenID discovery at {url} gave no usable token_endpoint", reason="discovery_failed"
            )
        end_session = _url_or_empty(doc.get("end_session_endpoint")) if self._keycloak else ""
        found = Endpoints(
            token=token_url,
            logout=self._auth.logout_url or end_session,
            revoke=self._auth.revoke_url or _url_or_empty(doc.get("revocation_endpoint")),
        )
        event("idp.discovered", issuer=issuer, token_endpoint=token_url)
        return found

    # --- HTTP ------------------------------------------------------------------------------------

    async def _grant(self, kind: str, fields: dict[str, str], previous_refresh: str | None) -> Token:
        endpoints = await self.endpoints()
        # A provider may echo what it was sent; its words end up in /-/ready, /-/status and 503 bodies.
        redact = Redactor([fields.get(k, "") for k in SECRET_FIELDS] + self._secrets())
        try:
            # A lifetime counts from when the token was asked for: the provider issued it somewhere between
            # then and the answer's arrival, and a slow answer has already used up part of it.
            asked_at, asked_wall = self._clock(), self._wall()
            reply = await self._post(endpoints.token, fields, redact)
            if reply.status >= 300:
                raise _error_from_response(reply, redact, url=endpoints.token)
            try:
                token = self._parse_token(reply, asked_at, asked_wall, previous_refresh, redact)
            except (TokenRejected, TokenUnavailable):
                raise
            except Exception as exc:  # any answer we cannot read is an unusable answer (it spent a one-time code)
                raise TokenUnavailable(
                    f"token endpoint answered {reply.status} with a response that cannot be read "
                    f"({type(exc).__name__})",
                    reason="invalid_response",
                ) from exc
            if token.usable_until <= self._clock():
                raise TokenUnavailable(
                    f"token endpoint took {self._clock() - asked_at:.1f}s to answer; the token it issued expires "
                    f"after {token.lifetime:g}s",
                    reason="expired_on_arrival",
                )
            return token
        except (TokenRejected, TokenUnavailable) as exc:
            _mask_secrets(exc, redact)  # again, for the words that are not the provider's (a safety net)
            raise

    async def _post(self, url: str, fields: Mapping[str, str], redact: Redactor, form_only: bool = False) -> Reply:
        """POST ``fields`` with client authentication; the body comes back parsed, or raw when not JSON.

        Redirects are never followed: aiohttp would POST the form (password, client secret) again to
        wherever a 307 points, over plain http too; a 3xx is "not a token endpoint" (_error_from_response).
        """
        a = self._auth
        payload: dict[str, Any] = dict(fields)
        headers = {"Accept": "application/json"}
        # A signed assertion is made for this request alone, addressed to the token endpoint whatever the
        # URL (OpenID Connect Core §9); it is a credential for its minute, so it is redacted like one.
        audience = self._endpoints.token if self._endpoints is not None else url
        redact.add([self._client_auth.apply(payload, headers, audience)])
        for key, value in a.extra.items():
            payload.setdefault(key, value)
        body_kind = "form" if form_only else a.body
        headers["Content-Type"] = TOKEN_CONTENT_TYPES[body_kind]
        if body_kind == "json":
            data = json.dumps(payload)
        else:
            data = urlencode({k: _form_value(v) for k, v in payload.items()})
        proxy, via, proxy_headers = self._via(url, "unreachable")
        headers.update(proxy_headers)
        try:
            async with self._session.post(
                url, data=data, headers=headers, timeout=self._timeout, allow_redirects=False, **via
            ) as resp:
                if resp.status == 407 and proxy is not None:  # the proxy's answer (plain http), not the endpoint's
                    raise TokenUnavailable(
                        f"token endpoint unreachable: {refusal(proxy, 407, url)}", reason="unreachable"
                    )
                status, content_type = resp.status, resp.content_type
                retry_after = retry_after_s(resp.headers.get("Retry-After"))
                # An error body is only described (its first MAX_ERROR_BODY bytes); a token body must be whole.
                raw, whole = await _read_body(resp.content, MAX_ERROR_BODY if status >= 300 else MAX_TOKEN_BODY)
        except TimeoutError as exc:
            raise TokenUnavailable(f"token endpoint did not answer within {a.timeout_s:g}s", reason="timeout") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise TokenUnavailable(
                f"token endpoint unreachable ({_describe_transport(exc, proxy, a.client_cert_file)})",
                reason="unreachable",
            ) from exc
        if not whole and status < 300:
            raise TokenUnavailable(
                f"token endpoint answered {status} with more than {MAX_TOKEN_BODY >> 20} MiB, not a token response",
                reason="invalid_response",
            )
        reply = Reply(status, _json_or_raw(raw), content_type)
        if status in TRANSIENT_STATUSES or status >= 500:
            raise _error_from_response(reply, redact, retry_after)
        return reply

    def _via(self, url: str, reason: str) -> tuple[EgressProxy | None, dict[str, Any], dict[str, str]]:
        """The proxy for ``url``, aiohttp's arguments for it, and headers to add to the request.

        aiohttp does the CONNECT (an https:// URL: TLS verified against the endpoint's name) or the
        absolute-form request (http://). The credentials go to the proxy only: on the CONNECT request
        (``proxy_headers``), or, without a tunnel, on the request the proxy reads; never inside a tunnel.
        """
        if self._egress is None:
            return None, {}, {}
        try:
            proxy = self._egress.for_url(url)
        except EgressError as exc:  # a URL found by discovery, with a proxy variable no configured URL used
            raise TokenUnavailable(f"no usable proxy for {url} ({exc})", reason=reason) from None
        if proxy is None:
            return None, {}, {}
        via: dict[str, Any] = {"proxy": proxy.url}
        credentials = proxy.authorization
        if credentials is None:
            return proxy, via, {}
        if url.lower().startswith("https:"):
            via["proxy_headers"] = {"Proxy-Authorization": credentials}
            return proxy, via, {}
        return proxy, via, {"Proxy-Authorization": credentials}

    # --- parsing ---------------------------------------------------------------------------------

    def _parse_token(
        self, reply: Reply, sent: float, sent_wall: float, previous_refresh: str | None, redact: Redactor
    ) -> Token:
        body = reply.body
        if not isinstance(body, dict):
            raise TokenUnavailable(
                f"token endpoint answered {reply.status} with {_describe_body(reply)}, not a JSON object",
                reason="invalid_response",
            )
        access = body.get("access_token")
        error = body.get("error")
        if not access and isinstance(error, str) and error and error not in TRANSIENT_ERRORS:
            # Some providers answer 200 with an OAuth error (a wrong password): a refusal like a 400.
            raise _error_from_response(reply, redact)
        if not isinstance(access, str) or not access:
            problem = "no access_token" if access is None else "an access_token that is not a non-empty string"
            if body.get("error"):  # some providers answer 200 with an OAuth error
                problem += f" (error: {_clean(body['error'], redact)}"
                problem += f": {_clean(body['error_description'], redact)})" if body.get("error_description") else ")"
            raise TokenUnavailable(f"token response has {problem}", reason="invalid_response")
        if not access.isascii() or not access.isprintable() or any(c.isspace() for c in access):
            raise TokenUnavailable(
                "token response has an access_token with spaces, control or non-ASCII characters",
                reason="invalid_response",
            )
        token_type = body.get("token_type")
        if token_type is not None and str(token_type).lower() not in SUPPORTED_TOKEN_TYPES:
            raise TokenUnavailable(
                f"token_type {str(token_type)[:40]!r} is not supported (only Bearer tokens can be injected)",
                reason="invalid_response",
            )
        claims = _jwt_claims(access)
        lifetime = self._lifetime(body.get("expires_in"), claims, sent_wall)
        refresh = body.get("refresh_token")
        if not isinstance(refresh, str) or not refresh:
            refresh = previous_refresh  # RFC 6749 §6: no new refresh token means keep the old one
        refresh_expires_at = None
        refresh_in = _number(next((body[k] for k in REFRESH_EXPIRY_FIELDS if body.get(k) is not None), None))
        if refresh_in is not None and refresh_in > 0:  # Keycloak: 0 means no expiry (offline token)
            refresh_expires_at = sent + min(refresh_in, MAX_LIFETIME_S)
        subject = claims.get("preferred_username") or claims.get("sub") or self._auth.username or self._auth.client_id
        return Token(
            access_token=access,
            obtained_at=sent,
            expires_at=sent + lifetime,
            refresh_token=refresh,
            refresh_expires_at=refresh_expires_at,
            subject=_clean(subject),  # a provider's text: it is logged and shown
            scope=str(body.get("scope") or ""),
            wall_expires_at=sent_wall + lifetime,
            header_value=self._inject.value.replace("{token}", access),
            refresh_rotated=previous_refresh is not None and refresh != previous_refresh,
        )

    def _lifetime(self, expires_in: Any, claims: dict[str, Any], sent_wall: float) -> float:
        """The shorter of ``expires_in`` and the JWT's ``exp`` (relative to its ``iat``), else the configured
        default (only when the answer has neither). The upstream checks ``exp``: an ``expires_in`` promising
        more would have expired tokens sent. Without ``expires_in``, ``exp`` is also read against the local
        clock (a JWT cached by a gateway: ``iat`` long ago), which can only shorten the lifetime; with
        ``expires_in`` and no ``iat``, ``exp`` is not read (a clock running ahead would shorten it).

        A token that these say is already dead is ``expired_on_arrival``: never sent for the default."""
        found: list[float] = []
        if expires_in is not None:
            seconds = _number(expires_in)
            if seconds is None:
                raise TokenUnavailable(
                    f"token response has an expires_in that is not a number ({str(expires_in)[:40]!r})",
                    reason="invalid_response",
                )
            if seconds <= 0:
                raise TokenUnavailable(
                    f"token response has expires_in {seconds:g}: the token is already expired",
                    reason="expired_on_arrival",
                )
            found.append(seconds)
        exp = _number(claims.get("exp"))
        iat = _number(claims.get("iat"))
        # Without iat, and with an expires_in, exp is only the local clock's reading: expires_in is the better one.
        if exp is not None and (iat is not None or not found):
            by_wall = exp - sent_wall
            seconds = exp - iat if iat is not None else by_wall
            if iat is not None and not found and by_wall > 0:
                seconds = min(seconds, by_wall)
            if seconds <= 0:
                raise TokenUnavailable(
                    "token response has a JWT access token whose exp says it is already expired",
                    reason="expired_on_arrival",
                )
            if not math.isnan(seconds):  # NaN: exp and iat both "never" (a 400-digit integer each)
                found.append(seconds)
        return min(min(found, default=self._auth.default_lifetime_s), MAX_LIFETIME_S)


class SessionEnder(Protocol):
    async def end_session(self, token: Token) -> str: ...


async def try_end_session(idp: SessionEnder, token: Token) -> tuple[bool, str]:
    """``idp.end_session`` bounded by ``END_SESSION_TIMEOUT_S``, for shutdown and ``--check``:
    ``(True, what was done)`` or ``(False, why not)``; never raises."""
    try:
        return True, await asyncio.wait_for(idp.end_session(token), END_SESSION_TIMEOUT_S)
    except TimeoutError:
        return False, "timed out"
    except (TokenRejected, TokenUnavailable) as exc:
        return False, exc.detail
    except Exception as exc:  # a bug, or an answer nothing expected: shutdown goes on; named by type only
        return False, f"failed ({type(exc).__name__})"


def _jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified (we only read `exp`; we are not its audience), or {}."""
    if token.count(".") != 2:
        return {}
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError, RecursionError):  # RecursionError: a payload nested thousands deep
        return {}
    return claims if isinstance(claims, dict) else {}


def _form_value(value: Any) -> str:
    """A form field from a config value: TOML's true/false as JSON spells them, not Python's True."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _number(value: Any) -> float | None:
    """A finite JSON number, or a string holding one (some providers send "3600"); None otherwise. An
    integer too large for a float (a 400-digit "never expires") is infinite, for the caller to cap."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None  # "NaN", "Infinity" and Python's json's Infinity


def retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime

        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _mask_secrets(exc: TokenRejected | TokenUnavailable, redact: Redactor) -> None:
    exc.detail = redact(exc.detail)
    exc.args = (exc.detail,)
    if isinstance(exc, TokenRejected):
        exc.error, exc.description = redact(exc.error), redact(exc.description)


async def _read_body(content: aiohttp.StreamReader, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of a body, and whether that was all of it (read() returns what has arrived,
    so one call may give only the first chunk)."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await content.read(limit + 1 - size)
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:limit], False


def _json_or_raw(raw: bytes) -> Any:
    """The parsed JSON, the raw bytes when they are not JSON, None when empty."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # ValueError includes UnicodeDecodeError; RecursionError: "[[[[..."
        return raw


def _clean(text: Any, redact: Callable[[str], str] | None = None) -> str:
    """A provider's text, made safe to log: printable, without the secrets it may echo, short. Redacted
    before it is cut: a secret cut in two would no longer be recognised."""
    out = "".join(c if c.isprintable() else " " for c in str(text)[:MAX_ERROR_BODY])
    if redact is not None:
        out = redact(out)
    return out[:MAX_DESCRIPTION]


def _describe_body(reply: Reply) -> str:
    """``an HTML page`` / ``a text/plain body`` / ``an empty body`` / ``a JSON list``: never the body itself."""
    body = reply.body
    if body is None:
        return "an empty body"
    if isinstance(body, bytes | bytearray):
        if reply.content_type == "text/html":
            return "an HTML page"
        return f"a {reply.content_type} body" if reply.content_type else "a non-JSON body"
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean"}
    return f"a JSON {kinds.get(type(body), 'number')}"


def _error_from_response(
    reply: Reply, redact: Callable[[str], str] | None = None, retry_after: float | None = None, url: str = ""
) -> Exception:
    """The error for a token endpoint's non-2xx answer (or a 200 carrying an OAuth error); ``url``, the
    endpoint's, is named when the answer is no OAuth answer at all (a URL holds no secret: config.check_url)."""
    status, body = reply.status, reply.body
    error = description = ""
    if isinstance(body, dict):
        error = _clean(body.get("error") or "", redact)
        description = _clean(body.get("error_description") or "", redact)
    if status == 429:
        return TokenUnavailable(
            f"token endpoint is rate limiting (429{': ' + error if error else ''})",
            retry_after=retry_after,
            reason="rate_limited",
        )
    if status in TRANSIENT_STATUSES or status >= 500 or error in TRANSIENT_ERRORS:
        if error:
            shown = f"{error}: {description}" if description else error
        else:
            shown = f"{_describe_body(reply)} without an OAuth error"
        return TokenUnavailable(
            f"token endpoint answered {status} ({shown})", retry_after=retry_after, reason="server_error"
        )
    if not error:
        where = f"token endpoint {url}" if url else "token endpoint"
        if status in NOT_AN_ENDPOINT_STATUSES or status < 400:
            return TokenUnavailable(
                f"{where} answered {status} with {_describe_body(reply)}, not an OAuth answer: is auth.token_url "
                "(or auth.issuer) right?",
                reason="not_a_token_endpoint",
            )
        error = f"http_{status}"
        description = description or f"{where} answered {status} with {_describe_body(reply)}"
        description += " without an OAuth error" if isinstance(body, dict) else ", not an OAuth answer"
    return TokenRejected(error, description, status)


def _describe_transport(exc: BaseException, proxy: EgressProxy | None = None, cert_file: str = "") -> str:
    if proxy is not None:
        if isinstance(exc, aiohttp.ClientHttpProxyError):  # the proxy's answer to CONNECT: its status only
            return refusal(proxy, exc.status, "the token endpoint")
        if isinstance(exc, aiohttp.ClientProxyConnectionError):
            return (
                f"cannot connect to the proxy {proxy.address} ({proxy.source}): {exc.os_error.strerror or exc.os_error}"
            )
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "TLS certificate verification failed"
    if tls_refusal := describe_tls_refusal(exc, "auth.client_cert_file", presented=bool(cert_file)):
        return tls_refusal
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text[:MAX_DESCRIPTION]


def _url_or_empty(value: Any) -> str:
    return value if isinstance(value, str) and not check_url(value) else ""
