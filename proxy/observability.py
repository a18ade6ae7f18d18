"""Logs, events, metrics and redaction.

Log lines are events with stable names (``token.obtained``, ``token.login_rejected``, ``request``, ...:
every one is in :data:`EVENTS`) and structured fields. A token is named by its fingerprint, never its
value. On top of that, :class:`RedactingFilter` masks anything shaped like a JWT or equal to a configured
secret in every record, as a safety net.

The access line (``request``, one per forwarded request) is the one line on the hot path: once
:func:`setup_logging` has run, :class:`AccessWriter` only queues its fields there; a thread of its own
builds the lines in batches every ``ACCESS_FLUSH_S`` (formatted exactly as the handler would format the
record, with the fields that can carry what a client sent redacted) and writes each batch at once. A slow
stderr never blocks the event loop: past ``ACCESS_MAX_PENDING`` waiting lines, lines are dropped and
counted (``log.access_dropped``).

Metrics use ``prometheus_client`` with one registry per app, so two apps in one process (tests,
``--dev``) never share counters.
"""

from __future__ import annotations

import atexit
import json
import logging
import re
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from json.encoder import encode_basestring_ascii as _json_str  # what json.dumps uses for a str
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
    "sidecar.reloaded": "SIGHUP: the secret files were read again (which changed, which keep their last good value)",
    # listen.workers > 1 (proxy/workers.py: the parent; worker.listening: cli.serve in a worker)
    "workers.starting": "the parent starts listen.workers workers: their count, its pid, which token store they share",
    "worker.listening": "one worker's listener is up (the parent logs sidecar.listening once all are): index, pid",
    "worker.exited": "a worker ended: expected (stopping) or not (restart_in_s, or restart=no)",
    "worker.killed": "a worker still running past listen.shutdown_grace_s and a margin was killed",
    "workers.gave_up": "a worker died too often within a minute: the others are stopped, the parent exits 1",
    "workers.stopping": "SIGTERM or SIGINT reached the parent: forwarded to every worker",
    # rotated secrets (proxy/secrets.py)
    "secret.rotated": "a secret file changed: its new value is in force (the key and file, never the value)",
    "secret.unreadable": "a secret file cannot be read, is empty or invalid: the last good value stays in force",
    "secret.readable": "a secret file that could not be read is readable again",
    "secret.watch_failed": "watching the secret files failed on a bug in the proxy (its type and file:line)",
    # requests (proxy/forward.py; request.malformed by MalformedRequestFilter below)
    "request": "one access line per request (logger oauth_sidecar.access)",
    "request.failed": "the proxy answered 5xx itself (502 unreachable, 503 no token, 504 timeout)",
    "request.malformed": "a request aiohttp's parser refused (400)",
    "log.access_dropped": "stderr took nothing while ACCESS_MAX_PENDING access lines waited: how many were dropped",
    "upstream.body_interrupted": "the upstream failed mid-body: the client's connection is cut",
    "websocket.closed": "a WebSocket tunnel ended: who ended it, bytes each way, its duration (proxy/websocket.py)",
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
    # the shared token store (proxy/store.py, proxy/tokens.py)
    "store.unavailable": "the store failed (once per change of state): this process renews alone until it is back",
    "store.available": "the store answers again: the fleet shares its token again",
    "store.lease_wait": "another process holds the renewal lease: waiting for the token it writes",
    "store.token_adopted": "a token another process (or this one before a restart) wrote was taken from the store",
    "store.rejection_adopted": "another process's login was refused: this one backs off with the fleet",
    "store.refresh_in_doubt": "a refresh token another process claimed and never answered for: logging in instead",
    "store.write_conflict": "the fenced write was refused (a newer entry, or the lease expired): kept locally only",
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
        self.generation = 0  # bumped by add(): what was redacted before may need it again
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        # Very short values would mask ordinary words; they are also not worth guessing.
        self._secrets.extend(s for s in secrets if s and len(s) >= 4)
        self._secrets.sort(key=len, reverse=True)
        self.generation += 1

    def untouched(self, text: str) -> bool:
        """Whether :meth:`__call__` leaves ``text`` as it is without a look further: it holds no configured
        secret, no ``eyJ`` (where a JWT starts) and, in ASCII, no scheme word. Checked once over a batch of
        values joined, it holds for each of them (False may still be a text nothing would be masked in)."""
        if "eyJ" in text or not text.isascii() or any(secret in text for secret in self._secrets):
            return False
        low = text.lower()
        return "bearer" not in low and "basic" not in low

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        # Each regex only where it can match: a JWT starts with "eyJ"; a scheme word is "bearer" or "basic"
        # in any case, which lower() finds in ASCII text (outside ASCII, case folding has other spellings:
        # the regex decides).
        if "eyJ" in text:
            text = JWT_RE.sub(MASK, text)
        if not text.isascii() or "bearer" in (low := text.lower()) or "basic" in low:
            text = BEARER_RE.sub(lambda m: f"{m.group(1)} {MASK}", text)
        return text


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
            "ts": _seconds(record.created),
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


# --- the access line -----------------------------------------------------------------------------

# How late an access line may reach stderr: a batch a fifth of a second costs one write and one flush
# for thousands of lines under load, and is still "now" for someone tailing the log.
ACCESS_FLUSH_S = 0.2
# Lines waiting while stderr takes none (a stuck pipe, a paused log shipper): about 4 MB at ~200 bytes
# a line, over a second of the proxy's top rate. Beyond it lines are dropped and counted, never waited for.
ACCESS_MAX_PENDING = 20_000
# Access lines built between two chances for the event loop's thread to take the GIL (~0.1 ms of work here).
ACCESS_SLICE = 64
_ACCESS_LOGGER = '"logger": "oauth_sidecar.access"'


def _milliseconds(seconds: float) -> float:
    """A request's duration as the access line shows it: milliseconds, two decimals. Rounded as a whole
    number of hundredths (round with digits goes through decimal strings: twice as slow, per line)."""
    return round(seconds * 1e5) / 100


def _seconds(now: float) -> float:
    """A JSON line's timestamp: seconds, three decimals (rounded like :func:`_milliseconds`)."""
    return round(now * 1000) / 1000


def log_request(
    method: str, path: str, status: int, size: int, seconds: float, request_id: str, outcome: str = ""
) -> None:
    """The access line of one request (the caller has checked ``access_log.isEnabledFor(INFO)``). Written
    by the :class:`AccessWriter` when the logging is still as :func:`setup_logging` left it; else logged
    as a record, for whatever handlers (pytest's capture) are in place."""
    writer = _access_writer
    if writer is not None and writer.write(method, path, status, size, seconds, request_id, outcome):
        return
    fields: dict[str, Any] = {
        "method": method,
        "path": path,
        "status": status,
        "bytes": size,
        "duration_ms": _milliseconds(seconds),
        "request_id": request_id,
    }
    if outcome:
        fields["outcome"] = outcome
    access_log.info("request", extra={"fields": fields})


class AccessWriter:
    """Queues access lines' fields on the event loop's thread, and builds and writes the lines in batches
    from a thread of its own, as the handler's formatter and :class:`RedactingFilter` would have.

    Built on the request's path, a line cost 10-14 us of CPU per request in the proxy under load, against
    ~2 us for the same line built in a batch (most likely cache effects: that code ran once between two
    requests' worth of proxy code). Queued, a request pays one ``list.extend``.

    What is redacted: the path (the raw path a client sent, any bytes it liked), the request id (the
    client's ``X-Request-Id``: any printable ASCII), a method outside the standard ones (any token
    characters, a JWT included) and the outcome. Status, bytes and duration are numbers, which the
    record path never redacted either; the event name and the standard methods are redacted once per set
    of secrets (a configured secret could be "POST").
    """

    FIELDS = 8  # (time, method, path, status, bytes, seconds, request_id, outcome): queued flat, no tuple

    def __init__(self, handler: logging.StreamHandler[Any], fmt: str, redactor: Redactor) -> None:
        self.handler = handler
        self._json = fmt == "json"
        self._redact = redactor
        # Appended to by the event loop's thread only, taken from the front by flush only: list.extend and
        # ``del pending[:n]`` are each one step under the GIL, so neither ever sees half of the other's work.
        self._pending: list[Any] = []
        self._max_pending = ACCESS_MAX_PENDING * self.FIELDS
        self.dropped = 0  # counted by the event loop's thread only
        self._reported = 0  # by the writing thread only
        self._event = ""
        self._plain_methods: frozenset[str] = frozenset()
        self._generation = -1
        self._second = -1
        self._stamp = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def write(
        self, method: str, path: str, status: int, size: int, seconds: float, request_id: str, outcome: str
    ) -> bool:
        """Queue one line (the event loop's thread: no formatting, no I/O); False, and nothing queued,
        when our records would no longer reach this writer's handler alone (someone added a handler)."""
        handlers = log.handlers
        if not (
            len(handlers) == 1 and handlers[0] is self.handler and not access_log.handlers and access_log.propagate
        ):
            return False
        pending = self._pending
        if len(pending) >= self._max_pending:
            self.dropped += 1
            return True
        # One extend is one step under the GIL: the writing thread never sees half a line's fields.
        pending.extend((time.time(), method, path, status, size, seconds, request_id, outcome))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="oauth-sidecar-access-log", daemon=True)
            self._thread.start()
        return True

    def _lines(self, fields: list[Any]) -> str:
        """The lines of a batch of queued fields. When nothing a client sent anywhere in the batch needs
        masking or quoting (one check over those fields joined: the common case), the lines are formatted
        without a call per field; else each line is built by :meth:`_line`. Either way the same bytes."""
        n = self.FIELDS
        self._follow_secrets()
        methods, paths, ids, outcomes = fields[1::n], fields[2::n], fields[6::n], fields[7::n]
        sent = "".join(methods) + "".join(paths) + "".join(ids) + "".join(outcomes)
        plain = self._redact.untouched(sent) and (
            self._json or (all(methods) and all(paths) and all(ids) and " " not in sent and sent.isprintable())
        )
        if not plain:
            line = self._line
            return "".join([line(*fields[i : i + n]) for i in range(0, len(fields), n)])
        rows = zip(*[iter(fields)] * n, strict=True)
        if self._json:
            head = '{"ts": %r, "level": "info", "event": ' + _json_str(self._event).replace("%", "%%") + ", "
            head += _ACCESS_LOGGER + ', "method": %s, "path": %s, "status": %d, "bytes": %d, "duration_ms": %r'
            head += ', "request_id": %s'
            return "".join(
                [
                    head
                    % (round(now * 1000) / 1000, _json_str(m), _json_str(p), st, b, round(s * 1e5) / 100, _json_str(i))
                    + (f', "outcome": {_json_str(o)}}}\n' if o else "}\n")
                    for now, m, p, st, b, s, i, o in rows
                ]
            )
        head = "%sZ info " + self._event.replace("%", "%%") + " method=%s path=%s status=%d bytes=%d duration_ms=%r"
        head += " request_id=%s"
        stamps = {second: self._stamp_of(second) for second in {int(now) for now in fields[0::n]}}
        return "".join(
            [
                head % (stamps[int(now)], m, p, st, b, round(s * 1e5) / 100, i) + (f" outcome={o}\n" if o else "\n")
                for now, m, p, st, b, s, i, o in rows
            ]
        )

    def _follow_secrets(self) -> None:
        """What depends on the set of secrets only, made again when it changed."""
        redact = self._redact
        if self._generation != redact.generation:
            self._generation = redact.generation
            self._event = redact("request")
            self._plain_methods = frozenset(m for m in _KNOWN_METHODS if redact(m) == m)

    def _stamp_of(self, now: float) -> str:
        """The text format's timestamp (to the second) of ``now``, made once a second."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        return self._stamp

    def _line(
        self,
        now: float,
        method: str,
        path: str,
        status: int,
        size: int,
        seconds: float,
        request_id: str,
        outcome: str,
    ) -> str:
        duration_ms = _milliseconds(seconds)
        redact = self._redact
        if method not in self._plain_methods:
            method = redact(method)
        path = redact(path)
        request_id = redact(request_id)
        if self._json:
            line = (
                f'{{"ts": {_seconds(now)!r}, "level": "info", "event": {_json_str(self._event)}, {_ACCESS_LOGGER}, '
                f'"method": {_json_str(method)}, "path": {_json_str(path)}, "status": {status:d}, '
                f'"bytes": {size:d}, "duration_ms": {duration_ms!r}, "request_id": {_json_str(request_id)}'
            )
            return line + (f', "outcome": {_json_str(redact(outcome))}}}\n' if outcome else "}\n")
        line = (
            f"{self._stamp_of(now)}Z info {self._event} method={_text(method)} path={_text(path)} status={status:d} "
            f"bytes={size:d} duration_ms={duration_ms!r} request_id={_text(request_id)}"
        )
        return line + (f" outcome={_text(redact(outcome))}\n" if outcome else "\n")

    def flush(self) -> None:
        """Build and write every waiting line now (and the count of dropped ones), from the calling thread."""
        pending = self._pending
        if not pending and self.dropped == self._reported:
            return
        # Under the handler's lock, so batches and the other events' lines never interleave mid-line, and
        # two flushes (the thread's, a shutdown's) write their batches in order.
        with self.handler.lock or _NO_LOCK:
            queued = len(pending) // self.FIELDS * self.FIELDS
            fields = pending[:queued]
            del pending[:queued]
            if fields:
                # In slices, the GIL given up between them: a batch built in one go held the event loop's
                # thread back for milliseconds (up to the interpreter's 5 ms switch interval).
                step = ACCESS_SLICE * self.FIELDS
                parts = []
                for start in range(0, len(fields), step):
                    if start:
                        time.sleep(0)
                    parts.append(self._lines(fields[start : start + step]))
                text = "".join(parts)
                stream = self.handler.stream
                try:
                    stream.write(text)
                    stream.flush()
                except (OSError, ValueError):  # stderr closed or gone: nothing to write to
                    pass
            missed = self.dropped - self._reported
            if missed:
                self._reported += missed
                event("log.access_dropped", level=logging.WARNING, lines=missed, max_pending=ACCESS_MAX_PENDING)

    def close(self) -> None:
        """Stop the thread and write what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(ACCESS_FLUSH_S):
            self.flush()


_NO_LOCK = threading.Lock()  # a handler whose lock was never made (createLock overridden)
_access_writer: AccessWriter | None = None


def flush_access_log() -> None:
    """Write the access lines still waiting (at shutdown; tests that read the log)."""
    if _access_writer is not None:
        _access_writer.flush()


atexit.register(flush_access_log)


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
    global _access_writer
    redactor = Redactor(secrets)
    handler: logging.StreamHandler[Any] = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(MalformedRequestFilter())
    handler.addFilter(RedactingFilter(redactor))
    if _access_writer is not None:
        _access_writer.close()
    _access_writer = AccessWriter(handler, fmt, redactor)
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
        self.store_operations = Counter(
            "oauth_sidecar_store_operations",
            "Shared token store operations (read, write, lease, release, wait) by outcome (ok, busy: the lease "
            "is another process's, conflict: a fenced write refused, error).",
            ["op", "outcome"],
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
