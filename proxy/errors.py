"""The errors oauth-sidecar raises, and the HTTP status each one maps to.

    SidecarError                      base; ``status`` is what a client sees
    ├── ConfigError                   bad configuration (the CLI exits 2)
    ├── RequestRefused                the proxy will not forward this request
    │   ├── BadRequest          400   absolute-form URI to another host, CONNECT, dot segments
    │   ├── Unauthenticated     401   missing or wrong X-Api-Key
    │   ├── Forbidden           403   method/path/client outside [access], Host, Origin
    │   └── RequestTimeout      408   the request body trickles in below listen.min_body_rate
    ├── TokenError                    getting a token from the identity provider
    │   ├── TokenRejected             the provider refused the grant (wrong password, dead refresh token)
    │   ├── TokenUnavailable          transport error, 5xx, 429, or a response we cannot use
    │   └── NoToken             503   no usable token right now (carries Retry-After)
    └── UpstreamError                 talking to upstream.url
        ├── UpstreamUnreachable 502
        └── UpstreamTimeout     504

Lower-level exceptions (aiohttp, OSError, JSON) are translated where they happen with
``raise X(...) from exc``, so request handlers only ever see these. No message carries a secret:
messages are built from the provider's ``error`` / ``error_description`` and our own words.
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ConfigError(SidecarError):
    """A configuration problem, naming where it is (file, key) and what is wrong."""

    code = "config_error"

    def __init__(self, key: str, problem: str, source: str = "") -> None:
        self.key = key
        self.problem = problem
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {problem}")


class RequestRefused(SidecarError):
    """A request the proxy answers itself instead of forwarding."""


class BadRequest(RequestRefused):
    status = 400
    code = "bad_request"


class Unauthenticated(RequestRefused):
    status = 401
    code = "unauthenticated"


class Forbidden(RequestRefused):
    status = 403
    code = "forbidden"


class RequestTimeout(RequestRefused):
    status = 408
    code = "request_timeout"


class TokenError(SidecarError):
    """Getting a token went wrong."""

    status = 503
    code = "no_token"


class TokenRejected(TokenError):
    """The identity provider refused the grant (HTTP 4xx with an OAuth error)."""

    def __init__(self, error: str, description: str = "", http_status: int = 400, detail: str = "") -> None:
        self.error = error
        self.description = description
        self.http_status = http_status
        text = f"{error}: {description}" if description else error
        # `detail` replaces the default message when the refusal is ours, not the provider's.
        super().__init__(detail or f"identity provider rejected the request ({http_status} {text})")


class TokenUnavailable(TokenError):
    """A failure worth retrying: unreachable, timeout, 5xx, 429, or an unusable response."""

    def __init__(self, detail: str, retry_after: float | None = None, reason: str = "unavailable") -> None:
        super().__init__(detail)
        self.retry_after = retry_after
        self.reason = reason


class NoToken(TokenError):
    """No usable access token is held; the client should come back after ``retry_after`` seconds."""

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class UpstreamError(SidecarError):
    """Talking to the upstream failed before a response could be relayed."""


class UpstreamUnreachable(UpstreamError):
    status = 502
    code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
