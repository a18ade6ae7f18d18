"""Egress: which HTTP proxy, if any, a request to a URL goes through. No I/O.

Each side (the upstream, the token endpoint) has an :class:`Egress`, built from the side's
``proxy_url`` key and the process environment as it was when the configuration was loaded:

* ``proxy_url`` unset (None): the environment decides, as curl and requests read it. The target's
  scheme picks the variable: ``https_proxy`` then ``HTTPS_PROXY`` for an https:// URL, ``http_proxy``
  then ``HTTP_PROXY`` for an http:// one; the first one present decides, and an empty value means no
  proxy. ``no_proxy`` then ``NO_PROXY`` lists where to go direct (:func:`parse_no_proxy`).
  ``ALL_PROXY`` is not read: it usually names a SOCKS proxy, which the sidecar does not speak.
* ``proxy_url = ""``: direct, whatever the environment says.
* ``proxy_url = "http://..."``: that proxy for every request of the side; NO_PROXY does not apply to an
  explicit proxy (as with requests' ``proxies=``).

A proxy URL is ``http://[user:password@]host[:port]`` (no scheme: http://; no port: 80, as requests
and aiohttp have it). TLS to the proxy itself (an https:// proxy URL) is refused: an https:// target
is still TLS end to end, through a CONNECT tunnel. Credentials are sent as ``Proxy-Authorization:
Basic``; they are secrets: :func:`credential_strings` gives what the log redaction must mask, and no
message built here quotes a proxy URL, only its host and port.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import unquote, urlsplit

# The variables read, lower case first (curl and Python's urllib give it precedence).
PROXY_VARIABLES: Mapping[str, tuple[str, str]] = {
    "https": ("https_proxy", "HTTPS_PROXY"),
    "http": ("http_proxy", "HTTP_PROXY"),
}
NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")
DEFAULT_PROXY_PORT = 80  # requests, urllib3 and aiohttp: the http scheme's port (curl says 1080)
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class EgressError(ValueError):
    """A proxy setting that cannot be used: ``key`` is the config key or variable, ``problem`` why.

    Never quotes the value (it may carry a password)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class EgressProxy:
    """One HTTP proxy: where it is, its credentials (if any), and which setting named it."""

    host: str
    port: int
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    has_credentials: bool = False
    source: str = ""  # the key or variable it came from, for messages

    @property
    def address(self) -> str:
        """``host:port``, an IPv6 host in brackets: what status and messages show (never credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The proxy's URL without credentials."""
        return f"http://{self.address}"

    @property
    def authorization(self) -> str | None:
        """The ``Proxy-Authorization`` value (RFC 7617 Basic, UTF-8), or None without credentials."""
        if not self.has_credentials:
            return None
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


def parse_proxy_url(text: str, source: str) -> EgressProxy:
    """The proxy ``text`` names; :class:`EgressError` naming ``source`` if it cannot be used."""
    shape = "must look like http://[user:password@]host[:port]"
    if any(c in text for c in "\r\n\t\x00 "):
        raise EgressError(source, f"{shape} (it contains whitespace or control characters)")
    if "://" not in text:
        text = "http://" + text  # curl and requests: a proxy without a scheme is an http:// one
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise EgressError(source, f"{shape} (not a valid URL or port)") from None
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise EgressError(
            source,
            "an https:// proxy (TLS to the proxy itself) is not supported; give its http:// address "
            "(an https:// upstream or token endpoint is still TLS end to end, through a CONNECT tunnel)",
        )
    if scheme != "http":
        raise EgressError(source, f"{shape}: only http proxies are supported (not {scheme[:20]}://)")
    host = (parts.hostname or "").rstrip(".")
    if not host or not _valid_host(host):
        raise EgressError(source, f"{shape} (no valid host)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise EgressError(source, f"{shape} (no path, query or fragment)")
    username = unquote(parts.username or "")
    password = unquote(parts.password or "")
    if ":" in username:
        raise EgressError(source, "the proxy user name must not contain ':' (RFC 7617)")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in username + password):
        raise EgressError(source, "the proxy credentials must not contain control characters")
    return EgressProxy(
        host=host,
        port=DEFAULT_PROXY_PORT if port is None else port,
        username=username,
        password=password,
        has_credentials=parts.username is not None,
        source=source,
    )


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOST_NAME.fullmatch(host)) and len(host) <= 253


def credential_strings(text: str) -> list[str]:
    """What of proxy URL ``text`` is secret, as it may appear in text: the password as written and
    decoded, ``user:password``, and the Basic credentials. Lenient: never raises."""
    try:
        parts = urlsplit(text if "://" in text else "http://" + text)
    except ValueError:
        return [text]  # not a URL at all: mask all of it
    if parts.password is None and parts.username is None:
        return []
    userinfo = parts.netloc.rpartition("@")[0]
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return [s for s in dict.fromkeys((parts.password or "", password, userinfo, basic)) if s]


# --- NO_PROXY ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Bypass:
    """One NO_PROXY entry: every host, a domain (with its subdomains), or an address range; maybe one port."""

    everything: bool = False
    domain: str = ""
    network: IPNetwork | None = None
    port: int | None = None


def parse_no_proxy(text: str) -> tuple[_Bypass, ...]:
    """NO_PROXY as curl reads it: comma-separated entries, whitespace around them ignored.

    ``*`` (alone or as an entry): everything goes direct. ``example.com``, ``.example.com`` and
    ``*.example.com``: that domain and every name under it (not ``notexample.com``). An IP address or
    CIDR (``10.0.0.0/8``, ``::1``, ``[::1]``): a target given by such an address (names are never
    resolved to match one). ``host:port`` (``[v6]:port``): only that port. Case and a trailing dot do not
    matter. An entry that is none of these matches nothing."""
    rules: list[_Bypass] = []
    for raw in text.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            rules.append(_Bypass(everything=True))
            continue
        host, port = _split_port(entry)
        if port == -1:
            continue  # a port that is no number: matches nothing
        try:
            rules.append(_Bypass(network=ipaddress.ip_network(host, strict=False), port=port))
            continue
        except ValueError:
            pass
        domain = host.removeprefix("*.").lstrip(".").rstrip(".")
        if domain and _valid_host(domain):
            rules.append(_Bypass(domain=domain, port=port))
    return tuple(rules)


def _split_port(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port``, bare ``v6`` (several colons: no port). -1: a bad port."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        if not rest:
            return host, None
        if not rest.startswith(":"):
            return host, -1
        return host, _port(rest[1:])
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, _port(port)
    return entry, None


def _port(text: str) -> int:
    return int(text) if text.isdigit() and 0 < int(text) <= 65535 else -1


def bypasses(rules: tuple[_Bypass, ...], host: str, port: int) -> bool:
    """Whether a request to ``host``:``port`` goes direct under ``rules``."""
    host = host.strip("[]").lower().rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for rule in rules:
        if rule.everything:
            return True
        if rule.port is not None and rule.port != port:
            continue
        if rule.network is not None:
            if address is not None and address.version == rule.network.version and address in rule.network:
                return True
        elif host == rule.domain or host.endswith("." + rule.domain):
            return True
    return False


# --- one side's egress ---------------------------------------------------------------------------


class Egress:
    """How one side's requests leave: direct, through its ``proxy_url``, or as the environment says."""

    def __init__(self, override: str | None, env: Mapping[str, str], key: str) -> None:
        self._override = override
        self._env = env
        self._key = key  # e.g. "upstream.proxy_url", for messages

    @property
    def configured(self) -> str:
        """Where the decision comes from, for status: "direct", the key, or "environment"."""
        if self._override is None:
            return "environment"
        return "direct" if self._override == "" else self._key

    def for_url(self, url: str) -> EgressProxy | None:
        """The proxy a request to ``url`` goes through, or None for direct. Raises :class:`EgressError`."""
        if self._override is not None:
            return parse_proxy_url(self._override, self._key) if self._override else None
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        variables = PROXY_VARIABLES.get(scheme)
        if variables is None:
            return None
        name, value = _first(self._env, variables)
        if not value:
            return None
        port = parts.port or (443 if scheme == "https" else 80)
        _, no_proxy = _first(self._env, NO_PROXY_VARIABLES)
        if no_proxy and bypasses(parse_no_proxy(no_proxy), parts.hostname or "", port):
            return None
        return parse_proxy_url(value, name)


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str]:
    """The first of ``names`` present in ``env`` (even if empty: an empty lower-case value wins)."""
    for name in names:
        if name in env:
            return name, env[name].strip()
    return names[-1], ""


def proxy_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The proxy variables of ``env``, as a snapshot the configuration keeps."""
    names = (*(n for pair in PROXY_VARIABLES.values() for n in pair), *NO_PROXY_VARIABLES)
    return {name: env[name] for name in names if name in env}


def refusal(proxy: EgressProxy, status: int, target: str) -> str:
    """Why a proxy's answer to CONNECT (or a 407) ended the request: its status, never its body."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "an unknown status"
    where = f"the proxy {proxy.address} ({proxy.source})"
    if status in (401, 407):  # tinyproxy answers wrong credentials with a 401
        if proxy.has_credentials:
            return f"{where} refused the credentials in its URL ({status} {phrase})"
        return (
            f"{where} needs credentials ({status} {phrase}): give them in the proxy URL, http://user:password@host:port"
        )
    return f"{where} refused the tunnel to {target} ({status} {phrase})"
