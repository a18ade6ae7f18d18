"""Client authentication at the token endpoint (``auth.client_auth``): what each token request carries.

    body               client_id and client_secret in the request body (RFC 6749 §2.3.1)
    basic              client_id:client_secret in an HTTP Basic header (RFC 6749 §2.3.1)
    client_secret_jwt  a JWT signed HS256 with client_secret (RFC 7523 §2.2, OpenID Connect Core §9)
    private_key_jwt    a JWT signed with the key in auth.client_key_file (RS256, PS256 or ES256)
    tls_client_auth    the TLS client certificate auth.client_cert_file (RFC 8705 §2); client_id in the body

An assertion is made fresh for every request to the provider (login, refresh, logout, revocation): its
``jti`` is random and its ``exp`` a minute away, because providers remember the ``jti`` of every assertion
they accepted and refuse a second use (replay). Its audience is the token endpoint, also for logout and
revocation (OpenID Connect Core §9: "the Audience SHOULD be the URL of the Authorization Server's Token
Endpoint").

Keys and certificates are checked when the configuration is loaded (:func:`load_signing_key`,
:func:`check_client_cert`): a key that does not load is a configuration error naming the key, never
quoting the file. Nothing here logs; an assertion is a credential for its minute, and the caller redacts it.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import ssl
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .errors import ConfigError

if TYPE_CHECKING:  # config.py imports this module to validate keys
    from .config import AuthConfig

CLIENT_AUTH_METHODS = ("body", "basic", "client_secret_jwt", "private_key_jwt", "tls_client_auth")
JWT_METHODS = ("client_secret_jwt", "private_key_jwt")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"  # RFC 7523 §2.2
# Long enough for a slow network and a clock a little behind, short enough that a captured assertion is
# useless soon: Auth0 recommends a minute and accepts at most five; Okta refuses an exp over an hour away.
ASSERTION_LIFETIME_S = 60
# A jti of 256 random bits: never repeated, so a provider's replay check never refuses one of ours.
JTI_BYTES = 32
# Which algorithms each key type can sign with; the first is the default (RFC 7518 §3.1).
RSA_ALGORITHMS = ("RS256", "PS256")
EC_ALGORITHMS = {"secp256r1": ("ES256",)}  # RFC 7518 §3.4: ES256 is P-256 with SHA-256, nothing else
# RFC 7518 §3.3: "A key of size 2048 bits or larger MUST be used"; §3.2: an HS256 key of at least 256 bits.
MIN_RSA_BITS = 2048
MIN_HMAC_BYTES = 32
# A PEM key or certificate chain is a few KiB; a file far larger is no key (or /dev/zero), not read whole.
MAX_PEM_BYTES = 1024 * 1024

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# OpenSSL's names for the TLS alerts of a server that wants a client certificate it did not get (RFC 8446
# §4.4.2.4: certificate_required; a TLS 1.2 server answers handshake_failure), and of one that refuses the
# certificate it got. With TLS 1.3 the client's handshake is over before the server checks: the alert
# arrives on the first read, so it is found in whatever error that read raised.
TLS_NO_CERT_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "certificate required",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "handshake failure",
}
TLS_BAD_CERT_ALERTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "unknown CA",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate unknown",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "certificate expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "certificate revoked",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "unsupported certificate",
    "TLSV1_ALERT_ACCESS_DENIED": "access denied",
}


class KeyFileError(ValueError):
    """A key or certificate that cannot be used; the message names the file, never its content.
    ``which`` is the file at fault: ``key`` (client_key_file) or ``cert`` (client_cert_file)."""

    def __init__(self, message: str, which: str = "key") -> None:
        super().__init__(message)
        self.which = which


# --- loading (at configuration time) -------------------------------------------------------------


def read_pem(path: str) -> bytes:
    """The bytes of a PEM file, read at most :data:`MAX_PEM_BYTES` deep."""
    try:
        if not Path(path).is_file():  # a directory, a device, a FIFO (which would block the start for ever)
            raise KeyFileError(f"{path!r} is not a regular file" if Path(path).exists() else f"no such file: {path!r}")
        with Path(path).open("rb") as file:
            data = file.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read {path!r} ({exc.strerror or type(exc).__name__})") from None
    if len(data) > MAX_PEM_BYTES:
        raise KeyFileError(f"{path!r} is larger than {MAX_PEM_BYTES >> 20} MiB: not a PEM file")
    return data


def load_private_key(path: str) -> PrivateKey:
    """The unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1) in ``path``: RSA or EC."""
    data = read_pem(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography: "Password was not given but private key is encrypted"
        raise KeyFileError(
            f"{path!r} holds an encrypted private key; give it unencrypted (e.g. `openssl pkey -in enc.pem "
            "-out key.pem`) and protect the file instead"
        ) from None
    except (ValueError, UnsupportedAlgorithm):  # its message is not quoted: it could describe the content
        raise KeyFileError(f"{path!r} holds no PEM private key that can be loaded") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path!r} holds a {type(key).__name__.removesuffix('PrivateKey')} key; use RSA or EC P-256")
    return key


def signing_algorithm(key: PrivateKey, alg: str) -> str:
    """``alg``, checked against the key (or the key type's default when ``alg`` is empty).

    Raises ValueError naming what does not fit (for auth.client_key_alg), KeyFileError when the key
    itself is unusable (too short, an unsupported curve)."""
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyFileError(f"is a {key.key_size}-bit RSA key; at least {MIN_RSA_BITS} bits are needed (RFC 7518)")
        fitting: tuple[str, ...] = RSA_ALGORITHMS
        kind = "an RSA key"
    else:
        curve = key.curve.name
        if curve not in EC_ALGORITHMS:
            raise KeyFileError(f"is an EC key on curve {curve}; ES256 needs P-256 (secp256r1)")
        fitting, kind = EC_ALGORITHMS[curve], "an EC P-256 key"
    if not alg:
        return fitting[0]
    if alg not in fitting:
        raise ValueError(f"{alg!r} does not fit {kind} (use {' or '.join(fitting)})")
    return alg


def load_signing_key(path: str, alg: str) -> tuple[PrivateKey, str]:
    """The key in ``path`` and the algorithm to sign with. KeyFileError: the file; ValueError: the alg."""
    key = load_private_key(path)
    try:
        return key, signing_algorithm(key, alg)
    except KeyFileError as exc:
        raise KeyFileError(f"{path!r} {exc}") from None


def certificate_thumbprints(cert_file: str) -> dict[str, str]:
    """The ``x5t`` (SHA-1) and ``x5t#S256`` headers of the first certificate in ``cert_file`` (RFC 7515
    §4.1.7-8): Entra ID picks the key of an assertion by them."""
    data = read_pem(cert_file)
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise KeyFileError(f"{cert_file!r} holds no PEM certificate that can be loaded", which="cert") from None
    der = cert.public_bytes(serialization.Encoding.DER)
    return {
        "x5t": _b64url(hashlib.sha1(der, usedforsecurity=False).digest()),
        "x5t#S256": _b64url(cert.fingerprint(hashes.SHA256())),
    }


def check_client_cert(cert_file: str, key_file: str) -> None:
    """Load the certificate chain and its key as the TLS handshake will; KeyFileError saying why not."""
    try:
        read_pem(cert_file)  # readable, and not a huge file
    except KeyFileError as exc:
        raise KeyFileError(str(exc), which="cert") from None
    if key_file:
        load_private_key(key_file)  # the clear messages for an encrypted or garbage key
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    load_cert_chain(context, cert_file, key_file)


def load_cert_chain(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    """``context.load_cert_chain``, never prompting on the terminal for a key's password."""
    try:
        context.load_cert_chain(cert_file, key_file or None, password=_no_password)
    except KeyFileError:  # from _no_password: the key is encrypted
        raise KeyFileError(
            f"{key_file or cert_file!r} holds an encrypted private key; give it unencrypted",
            which="key" if key_file else "cert",
        ) from None
    except ssl.SSLError as exc:
        reason = (exc.reason or "").upper()
        if "KEY_VALUES_MISMATCH" in reason:
            raise KeyFileError(
                f"the private key {key_file!r} does not belong to the certificate {cert_file!r}"
            ) from None
        if not key_file:
            raise KeyFileError(
                f"{cert_file!r} is no PEM certificate with its private key; give client_key_file too", which="cert"
            ) from None
        raise KeyFileError(f"{cert_file!r} holds no PEM certificate that TLS can use", which="cert") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {cert_file!r} ({exc.strerror or type(exc).__name__})", which="cert") from None


def _no_password() -> bytes:
    """OpenSSL asks for a password only for an encrypted key; without this it would ask on the terminal."""
    raise KeyFileError("encrypted")


def describe_tls_refusal(exc: BaseException, cert_key: str, presented: bool | None = None) -> str | None:
    """What a server's TLS alert about the client certificate means, naming the key to set (``cert_key``), or
    None when ``exc`` is no such alert. ``presented``: whether a certificate was offered (None: unknown)."""
    text = str(exc).upper()
    for alert, words in TLS_NO_CERT_ALERTS.items():
        if alert in text:
            if presented:
                return f"TLS handshake refused (alert: {words}): the server did not accept {cert_key}"
            if presented is None:
                return f"TLS handshake refused (alert: {words}): the server wants a client certificate ({cert_key})"
            return f"TLS handshake refused (alert: {words}): the server requires a client certificate; set {cert_key}"
    for alert, words in TLS_BAD_CERT_ALERTS.items():
        if alert in text:
            return f"TLS handshake refused (alert: {words}): the server refused the client certificate ({cert_key})"
    return None


def tls_context(ca_file: str = "", cert_file: str = "", key_file: str = "") -> ssl.SSLContext:
    """The system trust store plus ``ca_file``, verification always on; with ``cert_file``, the client
    certificate (and ``key_file``, else the key in ``cert_file``) offered to servers that ask for one."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    if cert_file:
        load_cert_chain(context, cert_file, key_file)
    return context


# --- per request ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signer:
    """Makes client assertions for one client: ``key`` (a private key, or the secret's bytes for HS256)."""

    client_id: str
    key: Any = field(repr=False)  # for client_secret_jwt, the secret itself
    algorithm: str
    headers: dict[str, str]

    def assertion(self, audience: str, now: float) -> str:
        issued = int(now)
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": audience,
            "jti": secrets.token_urlsafe(JTI_BYTES),
            "iat": issued,
            "nbf": issued,
            "exp": issued + ASSERTION_LIFETIME_S,
        }
        return jwt.encode(claims, self.key, algorithm=self.algorithm, headers=self.headers)


class ClientAuthenticator:
    """Puts the client's credentials into a token request, the way ``auth.client_auth`` says.

    Built from ``[auth]`` (already validated: the key loads, the algorithm fits)."""

    def __init__(self, auth: AuthConfig, clock: Callable[[], float] = time.time) -> None:
        self.method: str = auth.client_auth
        self._client_id: str = auth.client_id
        self._secret: str = auth.client_secret
        self._clock = clock
        self._signer: Signer | None = None
        self._audience: str = auth.assertion_audience
        headers = {"typ": "JWT"}
        if auth.client_key_id:
            headers["kid"] = auth.client_key_id
        if self.method == "private_key_jwt":
            try:  # checked when the configuration was loaded; the file may have changed since
                key, alg = load_signing_key(auth.client_key_file, auth.client_key_alg)
                if auth.client_cert_file:
                    headers.update(certificate_thumbprints(auth.client_cert_file))
            except KeyFileError as exc:
                which = "auth.client_cert_file" if exc.which == "cert" else "auth.client_key_file"
                raise ConfigError(which, str(exc)) from None
            except ValueError as exc:
                raise ConfigError("auth.client_key_alg", str(exc)) from None
            self._signer = Signer(auth.client_id, key, alg, headers)
        elif self.method == "client_secret_jwt":
            self._signer = Signer(auth.client_id, auth.client_secret.encode(), auth.client_key_alg or "HS256", headers)

    def apply(self, payload: MutableMapping[str, Any], headers: MutableMapping[str, str], audience: str) -> str:
        """Add the credentials to ``payload`` (the body's fields) and ``headers``; returns the assertion
        made for this request ("" without one), for the caller to redact. ``audience`` is the token
        endpoint's URL, the assertion's ``aud`` unless ``auth.assertion_audience`` says otherwise."""
        if self.method == "basic" and self._secret:
            # RFC 6749 §2.3.1: each part form-encoded before the base64.
            pair = f"{quote(self._client_id, safe='')}:{quote(self._secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
            return ""
        if self._client_id:  # RFC 7521 §4.2 allows it beside an assertion; Entra ID requires it
            payload["client_id"] = self._client_id
        if self._signer is not None:
            assertion = self._signer.assertion(self._audience or audience, self._clock())
            payload["client_assertion_type"] = ASSERTION_TYPE
            payload["client_assertion"] = assertion
            return assertion
        if self.method in ("body", "basic") and self._secret:
            payload["client_secret"] = self._secret
        return ""


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
