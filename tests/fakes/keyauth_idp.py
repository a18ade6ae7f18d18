"""A token endpoint that authenticates clients by key, and an API behind it, for tests/test_client_auth*.py.

:class:`KeyAuthIdP` checks what a real provider checks (Keycloak's JWTClientAuthenticator, Okta's and Entra
ID's documented rules), so a proxy that gets a token from it really signed its assertion right:

* ``client_assertion_type`` is RFC 7523's jwt-bearer URN; the assertion's signature verifies with the
  client's registered public key (or its secret, HS256), in the algorithm the client registered;
* ``iss`` = ``sub`` = the client id (and ``client_id``, when sent, is the same); ``aud`` is this token
  endpoint's URL; ``exp`` is in the future but at most ``MAX_ASSERTION_LIFETIME_S`` away; ``iat`` is not in
  the future; ``jti`` was never seen before (a replay is refused);
* for ``tls_client_auth`` (RFC 8705 §2.1.1), the TLS client certificate's subject CN is the registered one;
  the server itself is started with ``ssl.CERT_REQUIRED`` by the tests, so no certificate, no handshake.

Every refusal is RFC 6749 §5.2's 401 ``invalid_client``, with a description saying which check failed.
Tokens are opaque random strings; :class:`KeyAuthAPI` accepts only the current ones.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import jwt
import trustme
from aiohttp import web

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LIFETIME_S = 300  # what the fake accepts; the proxy sends 60 s
CLOCK_SKEW_S = 5
ACCESS_LIFETIME_S = 300


@dataclass
class Client:
    """A registered client: ``key`` verifies its assertions (a public key, or the secret for HS256)."""

    client_id: str
    method: str  # private_key_jwt | client_secret_jwt | tls_client_auth
    key: Any = None
    algorithm: str = ""
    subject_cn: str = ""  # tls_client_auth: the certificate's subject common name


class Refused(Exception):
    pass


@dataclass
class KeyAuthIdP:
    clients: dict[str, Client] = field(default_factory=dict)
    base_url: str = ""
    hits: Counter[str] = field(default_factory=Counter)
    assertions: list[dict[str, Any]] = field(default_factory=list)  # each accepted one: header and claims
    requests: list[dict[str, Any]] = field(default_factory=list)  # each request's fields
    refusals: list[str] = field(default_factory=list)
    seen_jti: set[str] = field(default_factory=set)
    access_tokens: set[str] = field(default_factory=set)
    refresh_tokens: set[str] = field(default_factory=set)

    def add(self, client: Client) -> None:
        self.clients[client.client_id] = client

    def token_url(self) -> str:
        return self.base_url + "/token"

    def revoke_url(self) -> str:
        return self.base_url + "/revoke"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self.token_endpoint)
        app.router.add_post("/revoke", self._revoke)
        return app

    async def _fields(self, request: web.Request) -> dict[str, Any]:
        if request.content_type == "application/json":
            data = json.loads(await request.read())
            return {str(k): str(v) for k, v in data.items()}
        return dict(await request.post())  # type: ignore[arg-type]

    async def token_endpoint(self, request: web.Request) -> web.Response:
        fields = await self._fields(request)
        self.requests.append(fields)
        try:
            client = self._authenticate(request, fields)
        except Refused as exc:
            self.refusals.append(str(exc))
            return web.json_response({"error": "invalid_client", "error_description": str(exc)}, status=401)
        grant = fields.get("grant_type")
        self.hits[f"grant:{grant}"] += 1
        if grant == "refresh_token":
            if fields.get("refresh_token") not in self.refresh_tokens:
                return web.json_response({"error": "invalid_grant", "error_description": "Token is not active"}, 400)
            self.refresh_tokens.discard(fields["refresh_token"])
        elif grant != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        access, refresh = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        self.access_tokens.add(access)
        self.refresh_tokens.add(refresh)
        return web.json_response(
            {
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": ACCESS_LIFETIME_S,
                "refresh_token": refresh,
                "scope": client.client_id,
            }
        )

    async def _revoke(self, request: web.Request) -> web.Response:
        fields = await self._fields(request)
        self.requests.append(fields)
        try:
            self._authenticate(request, fields)
        except Refused as exc:
            self.refusals.append(str(exc))
            return web.json_response({"error": "invalid_client", "error_description": str(exc)}, status=401)
        self.hits["revoke"] += 1
        self.refresh_tokens.discard(fields.get("token", ""))
        return web.Response(status=200)

    def _authenticate(self, request: web.Request, fields: dict[str, Any]) -> Client:
        if "client_secret" in fields or request.headers.get("Authorization"):
            raise Refused("a client secret was sent; this client authenticates by key")
        if "client_assertion" in fields:
            return self._check_assertion(fields)
        client = self.clients.get(fields.get("client_id", ""))
        if client is None or client.method != "tls_client_auth":
            raise Refused("no client assertion and no client that authenticates by certificate")
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        if not peer:
            raise Refused("no TLS client certificate")
        cn = dict(pair[0] for pair in peer.get("subject", ())).get("commonName", "")
        if cn != client.subject_cn:
            raise Refused(f"certificate subject {cn!r} is not the client's")
        return client

    def _check_assertion(self, fields: dict[str, Any]) -> Client:
        if fields.get("client_assertion_type") != ASSERTION_TYPE:
            raise Refused("client_assertion_type is not jwt-bearer")
        assertion = fields["client_assertion"]
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError as exc:
            raise Refused(f"not a JWT ({type(exc).__name__})") from None
        client = self.clients.get(str(unverified.get("iss")))
        if client is None or client.method not in ("private_key_jwt", "client_secret_jwt"):
            raise Refused("unknown issuer")
        if "client_id" in fields and fields["client_id"] != client.client_id:
            raise Refused("client_id is not the assertion's issuer")
        try:
            claims = jwt.decode(
                assertion,
                client.key,
                algorithms=[client.algorithm],
                audience=self.token_url(),
                issuer=client.client_id,
                leeway=CLOCK_SKEW_S,
                options={"require": ["iss", "sub", "aud", "exp", "iat", "jti"]},
            )
        except jwt.PyJWTError as exc:
            raise Refused(f"assertion rejected ({type(exc).__name__}: {exc})") from None
        now = time.time()
        if claims["sub"] != client.client_id:
            raise Refused("sub is not the client id")
        if claims["exp"] > now + MAX_ASSERTION_LIFETIME_S:
            raise Refused("exp is too far in the future")
        if claims["jti"] in self.seen_jti:
            raise Refused("jti already used (replay)")
        self.seen_jti.add(claims["jti"])
        self.assertions.append({"header": header, "claims": claims})
        return client


@dataclass
class KeyAuthAPI:
    """An API accepting the tokens ``idp`` issued; with ``subject_cn``, it also wants that TLS client cert."""

    idp: KeyAuthIdP
    subject_cn: str = ""
    hits: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        if self.subject_cn:
            peer = request.transport.get_extra_info("peercert") if request.transport else None
            cn = dict(pair[0] for pair in (peer or {}).get("subject", ())).get("commonName", "")
            if cn != self.subject_cn:
                return web.json_response({"error": "no client certificate"}, status=403)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in self.idp.access_tokens:
            return web.json_response({"error": "invalid_token"}, status=401)
        self.hits += 1
        return web.json_response({"ok": True, "path": request.path})


def server_context(ca: trustme.CA, *, require_client_cert: bool) -> ssl.SSLContext:
    """A TLS server context for 127.0.0.1 signed by ``ca``; with ``require_client_cert``, a client
    certificate issued by ``ca`` is required (ssl.CERT_REQUIRED), else the handshake fails."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(context)
    return context


class AlertingTLSServer:
    """A TLS server on 127.0.0.1 that requires a client certificate and, refusing a handshake, sends the
    TLS alert the way OpenSSL-, BoringSSL- and Java-based servers do (asyncio's server closes without it).
    It answers nothing else: the tests use it to see what a refused client is told.

    Runs on one thread with blocking sockets, every wait bounded; ``with`` starts and stops it."""

    ACCEPT_POLL_S = 0.05
    DRAIN_S = 2.0

    def __init__(self, ca: trustme.CA) -> None:
        self.context = server_context(ca, require_client_cert=True)
        self.refused: list[str] = []  # the server side's reason for each refused handshake
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(self.ACCEPT_POLL_S)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.url = f"https://127.0.0.1:{self._sock.getsockname()[1]}"

    def __enter__(self) -> AlertingTLSServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(self.DRAIN_S)
            tls = self.context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            with tls:
                try:
                    tls.do_handshake()
                    self.refused.append("")  # a handshake that worked: nothing to answer
                except (ssl.SSLError, OSError) as exc:
                    self.refused.append(getattr(exc, "reason", None) or type(exc).__name__)
                    self._drain(tls.fileno())

    def _drain(self, fd: int) -> None:
        """Read what the client still sends (its request) until it closes, at most DRAIN_S: closing with
        its bytes unread would reset the connection before the client has read the alert."""
        deadline = time.monotonic() + self.DRAIN_S
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([fd], [], [], left)
            try:
                if readable and not os.read(fd, 65536):
                    return
            except OSError:
                return


def client_credentials_mapping(auth: dict[str, Any], upstream: dict[str, Any] | None = None) -> dict[str, Any]:
    """A configuration mapping for the oauth2 provider's client_credentials grant, with the ``auth`` keys (the
    client id and the client authentication under test; they may replace token_url) and ``upstream`` keys on
    top. The default URLs are never contacted: for configuration errors and authenticators built from a
    configuration."""
    return {
        "upstream": {"url": "https://api.example", **(upstream or {})},
        "auth": {
            "provider": "oauth2",
            "token_url": "https://idp.example/token",
            "grant_type": "client_credentials",
            **auth,
        },
    }
