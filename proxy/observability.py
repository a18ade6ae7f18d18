"""Logs, events, metrics and redaction.

Log lines are events with stable names (``token.obtained``, ``token.login_rejected``, ``request``, ...:
every one is in :data:`EVENTS`) and structured fields. A token is named by its fingerprint, never its
value. On top of that, :class:`RedactingFilter` masks anything shaped like a JWT or equal to a configured
secret in every record, as a safety net.

Metrics use ``prometheus_client`` with one registry per app, so two apps in one process (tests,
``--dev``) never share counters.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LOGGER_NAME = "oauth_sidecar"
log = logging.getLogger(LOGGER_NAME)
access_log = logging.getLogger(LOGGER_NAME + ".access")

# Every event name the proxy logs, and when. tests/test_observability.py checks that each name logged in
# proxy/*.py is here, that each name here is logged somewhere, and that the README's Logs section names it.
EVENTS: Mapping[str, str] = {
    # the process (proxy/app.py, proxy/cli.py, proxy/listener.py)
    "sidecar.starting": "the app is built: version, provider, upstream, grant type",
    "sidecar.listening": "the listener is up: its URL",
    "sidecar.exposed": "listening beyond loopback with neither access.api_key nor access.allow_clients",
    "sidecar.fd_limit": "at start: the open-file limit is too low for listen.max_connections, the cap is lowered",
    "sidecar.busy": "connections beyond listen.max_connections were refused (at most every 10 s)",
    "sidecar.accept_failed": "accept() failed, out of open files or memory (at most every 5 s)",
    "sidecar.stopping": "SIGTERM or SIGINT: in-flight requests get listen.shutdown_grace_s",
    "sidecar.stopped": "the process is about to exit 0",
    # requests (proxy/forward.py; request.malformed by MalformedRequestFilter below)
    "request": "one access line per request (logger oauth_sidecar.access)",
    "request.failed": "the proxy answered 5xx itself (502 unreachable, 503 no token, 504 timeout)",
    "request.malformed": "a request aiohttp's parser refused (400)",
    "upstream.body_interrupted": "the upstream failed mid-body: the client's connection is cut",
    # the token (proxy/tokens.py, proxy/idp.py)
    "token.obtained": "a login or refresh succeeded",
    "token.unavailable": "a token request failed for a transient reason: unreachable, timeout, 5xx, 429, bad reply",
    "token.refresh_rejected": "the provider refused the refresh token: the same renewal logs in",
    "token.login_rejected": "the provider refused the credentials: backing off",
    "token.rejected_upstream": "the upstream answered 401 to the current token: it is renewed",
    "token.dropped": "a token the upstream rejected is dropped after its renewal was refused too",
    "token.flight_crashed": "a renewal failed on a bug in the proxy (its type and file:line, never its message)",
    "token.session_ended": "the session was ended at the provider on shutdown (revoke_on_shutdown)",
    "token.session_end_failed": "ending the session at the provider on shutdown failed",
    "idp.discovered": "the endpoints of auth.issuer were found by OpenID discovery",
    "idp.refresh_unsupported": "the provider does not implement the refresh grant: renewals log in from now on",
}

MASK = "[REDACTED]"
# Three base64url segments, the first starting like a JSON header ("eyJ"): a JWS/JWT.
JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
# A credential after a scheme word, in case an Authorization header value slips into a message.
BEARER_RE = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")


class Redactor:
    """Masks JWT-shaped strings and configured secrets in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        # Very short values would mask ordinary words; they are also not worth guessing.
        self._secrets.extend(s for s in secrets if s and len(s) >= 4)
        self._secrets.sort(key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        text = JWT_RE.sub(MASK, text)
        return BEARER_RE.sub(lambda m: f"{m.group(1)} {MASK}", text)


class RedactingFilter(logging.Filter):
    """Rewrites each record's message and fields through a :class:`Redactor`."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redactor(record.getMessage())
        record.args = None
        fields = getattr(record, "fields", None)
        if fields:
            record.fields = {k: self._clean(v) for k, v in fields.items()}
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.redactor(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True

    def _clean(self, value: Any) -> Any:
        return self.redactor(value) if isinstance(value, str) else value


class TextFormatter(logging.Formatter):
    """``2026-11-22T10:00:00Z info token.obtained kind=refresh token=3f2a9c1b0d expires_in_s=299.0``"""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = getattr(record, "fields", {}) or {}
        extra = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        line = f"{stamp}Z {record.levelname.lower()} {record.getMessage()}"
        line = f"{line} {extra}" if extra else line
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, event, logger, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        data.update(getattr(record, "fields", {}) or {})
        if record.exc_text:
            data["exception"] = record.exc_text
        return json.dumps(data, default=str)


def _text(value: Any) -> str:
    """A field's value as the text format writes it: bare when it is one printable word, else a JSON string,
    so that no value (a provider's subject holding a newline) can end the line or forge another."""
    text = str(value)
    return json.dumps(text) if (not text or " " in text or not text.isprintable()) else text


def event(name: str, level: int = logging.INFO, logger: logging.Logger = log, **fields: Any) -> None:
    """Log the event ``name`` (one of :data:`EVENTS`) with structured ``fields``."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"fields": fields})


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs every malformed request at ERROR with a traceback quoting the raw bytes: any
    client could flood the log with it, and the bytes may hold a header value. One WARNING line
    naming the kind of error is what an operator needs."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args, record.exc_info, record.exc_text = "request.malformed", (), None, None
            record.fields = {"error": type(exc).__name__, "status": exc.code}
        return True


def setup_logging(level: str, fmt: str, secrets: Iterable[str] = (), stream: Any = None) -> Redactor:
    """Send our loggers (and aiohttp's) to ``stream`` through the redaction filter."""
    redactor = Redactor(secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(MalformedRequestFilter())
    handler.addFilter(RedactingFilter(redactor))
    for name in (LOGGER_NAME, "aiohttp", "asyncio"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(level.upper())
    return redactor


# --- metrics -------------------------------------------------------------------------------------

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The sidecar's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.token_requests = Counter(
            "oauth_sidecar_token_requests",
            "Token endpoint requests by grant kind (login, refresh) and outcome (ok, rejected, failed).",
            ["kind", "outcome"],
            registry=r,
        )
        self.token_failures = Counter(
            "oauth_sidecar_token_failures",
            "Failed token requests by reason (the provider's error code, or unreachable, timeout, "
            "server_error, rate_limited, invalid_response).",
            ["kind", "reason"],
            registry=r,
        )
        self.token_expiry = Gauge(
            "oauth_sidecar_token_expiry_seconds", "Seconds until the held access token expires.", registry=r
        )
        self.token_ready = Gauge(
            "oauth_sidecar_token_ready", "1 when a usable access token is held, else 0.", registry=r
        )
        # The per-request figures are plain ints on the hot path (no lock, no label lookup per request),
        # turned into metric families when scraped: see _PerRequest.
        self.in_flight_count = 0
        self.request_counts: dict[tuple[str, int, str], int] = {}
        self.duration_buckets = [0] * len(DURATION_BUCKETS)  # observations <= each bound, not cumulative
        self.duration_count = 0
        self.duration_sum = 0.0
        self.bytes_out_total = 0
        r.register(_PerRequest(self))
        self.in_flight = Gauge("oauth_sidecar_requests_in_flight", "Requests being forwarded now.", registry=r)
        self.in_flight.set_function(lambda: self.in_flight_count)
        self.auth_retries = Counter(
            "oauth_sidecar_upstream_auth_retries",
            "Requests retried after the upstream answered 401 with the current token.",
            registry=r,
        )
        self.connections_refused = Counter(
            "oauth_sidecar_connections_refused",
            "Client connections answered 503 and closed because listen.max_connections were open.",
            registry=r,
        )
        self._failure_reasons: set[str] = set()

    def count_request(self, method: str, status: int, source: str) -> None:
        """Count one answered request. Any method outside the standard ones is counted as OTHER, so a
        client inventing methods cannot grow the label set (or this cache)."""
        key = (method if method in _KNOWN_METHODS else "OTHER", status, source)
        counts = self.request_counts
        counts[key] = counts.get(key, 0) + 1

    def observe_upstream(self, seconds: float) -> None:
        """Time from sending a request upstream to its response head."""
        self.duration_count += 1
        self.duration_sum += seconds
        index = bisect_left(DURATION_BUCKETS, seconds)
        if index < len(DURATION_BUCKETS):
            self.duration_buckets[index] += 1

    def count_token_failure(self, kind: str, reason: str) -> None:
        """Count a failed token request. The reason is often the provider's own ``error`` string: a
        reason that is not a plain code, or beyond the first ``MAX_FAILURE_REASONS`` seen, is counted as
        ``other``, so a misbehaving provider cannot grow the metric without bound."""
        if reason not in self._failure_reasons:
            if len(self._failure_reasons) >= MAX_FAILURE_REASONS or not _PLAIN_CODE.fullmatch(reason):
                reason = "other"
            self._failure_reasons.add(reason)
        self.token_failures.labels(kind, reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _PerRequest(Collector):
    """The per-request counters of :class:`Metrics`, as metric families at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # no fixed samples to check for clashes at registration

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        requests = CounterMetricFamily(
            "oauth_sidecar_requests",
            "Requests answered, by method class (GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, OTHER), status "
            "class (2xx..5xx), exact status code, and who answered (upstream, proxy).",
            labels=["method", "status", "code", "source"],
        )
        for (method, status, source), count in sorted(m.request_counts.items()):
            requests.add_metric([method, f"{status // 100}xx", str(status), source], count)
        yield requests
        cumulative, buckets = 0, []
        for bound, count in zip(DURATION_BUCKETS, m.duration_buckets, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        buckets.append(("+Inf", m.duration_count))
        duration = HistogramMetricFamily(
            "oauth_sidecar_upstream_duration_seconds",
            "Time from sending a request upstream to receiving its response headers.",
        )
        duration.add_metric([], buckets, m.duration_sum)
        yield duration
        yield CounterMetricFamily(
            "oauth_sidecar_response_bytes", "Response body bytes relayed to clients.", value=m.bytes_out_total
        )


MAX_FAILURE_REASONS = 32
_PLAIN_CODE = re.compile(r"[a-z0-9_]{1,40}")
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
