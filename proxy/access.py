"""Who may use the proxy: the checks a request passes before anything is forwarded.

The listener turns any request into an authenticated call on the user's account, so it answers
only to the clients it is meant for:

* **Host** (DNS rebinding): a web page at ``attacker.example`` whose name is re-resolved to
  127.0.0.1 sends ``Host: attacker.example``. Accepted Host names are IP literals (a rebinding
  attack needs a DNS name), ``localhost``, and ``[listen] allowed_hosts``.
* **Browsers**: a request with an ``Origin`` header, or ``Sec-Fetch-Site: cross-site|same-site``,
  comes from a web page. It is refused unless the origin is in ``[access] allow_origins``. BI tools,
  scripts and curl send neither.
* ``[access] allow_clients`` (CIDRs), ``api_key`` (``X-Api-Key``, compared in constant time),
  ``allow_methods`` and ``allow_paths`` (prefix match on the decoded, dot-segment-free path).
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import unquote

from aiohttp import web

from .config import AccessConfig, ListenConfig
from .errors import BadRequest, Forbidden, Unauthenticated

API_KEY_HEADER = "X-Api-Key"
# Methods that are never forwarded: CONNECT would make us an open tunnel; TRACE/TRACK echo the
# request back, injected credential included.
REFUSED_METHODS = {
    "CONNECT": "CONNECT is not supported: this is a reverse proxy for one API, not a tunnel",
    "TRACE": "TRACE is not forwarded: the upstream would echo the injected credential back",
    "TRACK": "TRACK is not forwarded: the upstream would echo the injected credential back",
}
BROWSER_SITES = {"cross-site", "same-site"}
PREFLIGHT_MAX_AGE_S = "600"


def host_name(host_header: str) -> str:
    """The name part of a Host header, lower case, without port or trailing dot."""
    host = host_header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".")


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    """Admission checks, in the order a request meets them."""

    def __init__(self, listen: ListenConfig, access: AccessConfig) -> None:
        self._allowed_hosts = frozenset(("localhost", *listen.allowed_hosts))
        self._any_host = "*" in listen.allowed_hosts
        self._origins = frozenset(access.allow_origins)
        self._clients = access.allow_clients
        self._api_key = access.api_key.encode()
        self._methods = frozenset(access.allow_methods)
        self._paths = tuple(p if p.endswith("/") else p + "/" for p in access.allow_paths)
        self._exact_paths = frozenset(p.rstrip("/") or "/" for p in access.allow_paths)
        self._host_cache: dict[str, bool] = {}

    def check_listener(self, request: web.BaseRequest) -> str | None:
        """Host, browser and client-address rules (every path, reserved ones too).

        Returns the request's Origin when it is an allowed one (for CORS headers), else None.
        """
        headers = request.headers
        host = headers.get("Host")
        if host is not None and not self._host_ok(host):
            raise Forbidden(
                f"Host {host_name(host)!r} is not a name this proxy answers to (DNS rebinding protection); "
                "add it to listen.allowed_hosts if it is yours"
            )
        origin = headers.get("Origin")
        allowed_origin = None
        if origin is not None:
            if origin.rstrip("/").lower() not in self._origins:
                raise Forbidden(
                    "requests from web pages are refused (Origin header present); "
                    "add the origin to access.allow_origins to allow it"
                )
            allowed_origin = origin
        elif headers.get("Sec-Fetch-Site") in BROWSER_SITES:
            raise Forbidden("cross-site requests from web pages are refused (Sec-Fetch-Site)")
        if self._clients:
            remote = request.remote
            try:
                address = ipaddress.ip_address(remote or "")
            except ValueError:
                raise Forbidden("client address unknown; access.allow_clients is set") from None
            if not any(address in net for net in self._clients):
                raise Forbidden(f"client {remote} is not in access.allow_clients")
        return allowed_origin

    def set_api_key(self, api_key: str) -> None:
        """A rotated access.api_key (proxy/secrets.py): in force from the next request."""
        self._api_key = api_key.encode()

    def check_api_key(self, request: web.BaseRequest) -> None:
        if not self._api_key:
            return
        sent = request.headers.get(API_KEY_HEADER)
        if sent is None:
            raise Unauthenticated(f"missing {API_KEY_HEADER} header")
        # surrogateescape: aiohttp keeps non-UTF-8 header bytes as surrogates; they compare unequal, not crash.
        if not hmac.compare_digest(sent.encode("utf-8", "surrogateescape"), self._api_key):
            raise Unauthenticated(f"wrong {API_KEY_HEADER}")

    def check_forward(self, method: str, path: str) -> None:
        """Method and path rules for a request to be forwarded; ``path`` is the raw path."""
        if method in REFUSED_METHODS:
            raise BadRequest(REFUSED_METHODS[method])
        decoded = unquote(path) if "%" in path else path
        if "\x00" in decoded:
            raise BadRequest("the path contains a NUL byte")
        if "." in decoded:  # the common path has no dot segment to look for
            for segment in decoded.replace("\\", "/").split("/"):
                # "..;x" is ".." to servers that drop path parameters (Tomcat, Spring): refused too.
                if segment.partition(";")[0] in (".", ".."):
                    raise BadRequest("the path contains '.' or '..' segments; send the normalised path")
        if self._methods and method not in self._methods:
            raise Forbidden(f"method {method} is not in access.allow_methods")
        if self._paths and not (decoded in self._exact_paths or decoded.startswith(self._paths)):
            raise Forbidden("path is not under access.allow_paths")

    def preflight(self, request: web.BaseRequest, origin: str) -> web.Response:
        """Answer a CORS preflight from an allowed origin."""
        methods = (
            ", ".join(sorted(self._methods))
            if self._methods
            else request.headers.get("Access-Control-Request-Method", "GET")
        )
        headers = {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": methods,
            "Access-Control-Max-Age": PREFLIGHT_MAX_AGE_S,
            "Vary": "Origin",
        }
        if wanted := request.headers.get("Access-Control-Request-Headers"):
            headers["Access-Control-Allow-Headers"] = wanted
        return web.Response(status=204, headers=headers)

    def host_allowed(self, host: str) -> bool:
        """Whether ``host`` (a Host header or URL authority) names this listener."""
        return self._host_ok(host)

    def _host_ok(self, host: str) -> bool:
        ok = self._host_cache.get(host)
        if ok is None:
            name = host_name(host)
            ok = self._any_host or name in self._allowed_hosts or _is_ip_literal(name)
            if len(self._host_cache) < 1024:
                self._host_cache[host] = ok
        return ok
