"""One request upstream and back.

The request goes to ``upstream.url`` joined with the request's raw path and query string, byte for
byte (never decoded and re-encoded). Hop-by-hop headers, those named in ``Connection``, the client's
``Authorization`` and the configured header are dropped; ``Host`` is the upstream's; the token is
injected last. Bodies stream both ways with backpressure: a 200 MB report never sits in memory.
``Content-Encoding`` passes through untouched (the client session does not decompress).

An upstream 401 with the current token triggers one shared renewal and one retry, when the body can
be replayed (no body, or one small enough that it was buffered); otherwise the 401 goes back.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

from aiohttp import StreamReader, web
from yarl import URL

from .access import Guard
from .config import Config
from .errors import BadRequest, NoToken, SidecarError
from .observability import Metrics, access_log, event
from .state import Token
from .tokens import TokenManager
from .upstream import BodyInterrupted, Exchange, Pool

# RFC 9110 §7.6.1, plus the legacy Proxy-Connection.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Retry a request at most this many times after the upstream rejected the token.
MAX_AUTH_RETRIES = 1
REQUEST_ID_HEADER = "X-Request-Id"
# Methods whose requests are expected to carry a body: sent with Content-Length: 0 when empty.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
NO_BODY_STATUSES = frozenset({204, 304})
RawHeaders = tuple[tuple[bytes, bytes], ...]
# A client's X-Request-Id is kept when it is this short and plain; otherwise one is generated, so a
# client cannot put control characters or a megabyte into every log line and upstream request.
MAX_REQUEST_ID = 128


def error_response(exc: SidecarError, headers: dict[str, str] | None = None) -> web.Response:
    """The JSON body of an error the proxy makes itself: ``{"error": ..., "detail": ...}``."""
    return web.json_response({"error": exc.code, "detail": exc.detail}, status=exc.status, headers=headers)


class Forwarder:
    """The catch-all handler: admit, get a token, forward, stream back."""

    def __init__(self, config: Config, pool: Pool, tokens: TokenManager, metrics: Metrics, guard: Guard) -> None:
        base = URL(config.upstream.url)
        self._base_path = base.raw_path.rstrip("/").encode("ascii")
        self._host_line = b"%s: %s\r\n" % pool.host_header
        self._pool = pool
        self._tokens = tokens
        self._metrics = metrics
        self._guard = guard
        self._replay_limit = config.upstream.replay_limit_bytes
        self._inject = config.inject.header.encode("ascii")
        injected = config.inject.header.lower()
        # Also its "-"/"_" twin (Access-Token for access_token): CGI-style servers read both as one variable.
        twins = {injected, injected.replace("_", "-"), injected.replace("-", "_")}
        drop = set(HOP_BY_HOP) | {"host", "authorization", "expect", "content-length"} | twins
        drop.add(REQUEST_ID_HEADER.lower())  # sent again as the id we log
        if config.access.api_key:
            drop.add("x-api-key")  # the proxy's own key is not the upstream's business
        self._drop_request = frozenset(name.encode("ascii") for name in drop)
        self._drop_response = frozenset(name.encode("ascii") for name in HOP_BY_HOP | {"content-length"})
        self._access_log = config.log.access_log
        # Request ids: a random prefix per process and a counter, 32 hex digits like a UUID's, at a
        # fraction of uuid4's cost (it reads os.urandom for every request).
        self._id_prefix = secrets.token_hex(10)
        self._ids = itertools.count(1)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        method = request.method
        request_id = request.headers.get(REQUEST_ID_HEADER, "")
        if not _usable_request_id(request_id):
            request_id = f"{self._id_prefix}{next(self._ids):012x}"
        status, size = 0, 0
        self._metrics.in_flight_count += 1
        try:
            response, size = await self._forward(request, method, request_id)
            status = response.status
            return response
        except SidecarError as exc:
            status = exc.status
            headers = {REQUEST_ID_HEADER: request_id}
            retry_after = getattr(exc, "retry_after", None)
            if status == 503 and retry_after is not None:
                headers["Retry-After"] = str(max(1, round(retry_after)))
            self._metrics.count_request(method, status, "proxy")
            if status >= 500:
                event(
                    "request.failed",
                    level=logging.WARNING,
                    method=method,
                    path=_logged_path(request),
                    status=status,
                    error=exc.code,
                    detail=exc.detail,
                    request_id=request_id,
                )
            response = error_response(exc, headers)
            size = len(response.body) if isinstance(response.body, bytes) else 0  # for the access log
            return response
        finally:
            self._metrics.in_flight_count -= 1
            if self._access_log and access_log.isEnabledFor(logging.INFO):
                event(
                    "request",
                    logger=access_log,
                    method=method,
                    path=_logged_path(request),
                    status=status,
                    bytes=size,
                    duration_ms=round((time.monotonic() - started) * 1000, 2),
                    request_id=request_id,
                )

    async def _forward(self, request: web.Request, method: str, request_id: str) -> tuple[web.StreamResponse, int]:
        allowed_origin = self._guard.check_listener(request)
        if allowed_origin is not None and method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return self._guard.preflight(request, allowed_origin), 0
        target = self._target(request)
        self._guard.check_api_key(request)
        self._guard.check_forward(method, target.partition("?")[0])

        body: bytes | StreamReader | None = None
        replayable = True
        framing = b""
        if request.body_exists:
            length = request.content_length
            if length is not None and length <= self._replay_limit:
                body = await request.read()
                framing = b"Content-Length: %d\r\n" % len(body)
            else:
                body, replayable = request.content, False
                framing = b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length
        elif method in BODY_METHODS:
            framing = b"Content-Length: 0\r\n"
        connection = request.headers.getall("Connection", [])
        head = self._request_head(method, target, request.raw_headers, request_id, connection) + framing
        # Only now, once the body is read: a slow client must not make the proxy send a token that expired meanwhile.
        if self._tokens.usable() is None:  # no coroutine while it is fresh
            await self._tokens.get()  # the renewal in flight, or NoToken (503) at once

        upstream, token = await self._send(method, head, body)
        try:  # from here on, whatever happens (a client hanging up mid-renewal), the connection goes back
            if upstream.status == 401 and replayable:
                for _ in range(MAX_AUTH_RETRIES):
                    renewed = await self._tokens.renew_rejected(token)
                    if renewed is None:
                        break
                    upstream.release()
                    self._metrics.auth_retries.inc()
                    upstream, token = await self._send(method, head, body)
                    if upstream.status != 401:
                        break
            return await self._relay(request, upstream, request_id, allowed_origin)
        finally:
            upstream.release()

    def _target(self, request: web.BaseRequest) -> str:
        """The raw path and query to append to the upstream URL, exactly as the client sent them."""
        raw = request.raw_path
        if raw.startswith("/"):
            return raw
        if raw.startswith(("http://", "https://")):  # absolute-form: only for a name we answer to
            parts = urlsplit(raw)
            if parts.hostname and self._guard.host_allowed(parts.netloc):
                rest = raw[len(parts.scheme) + 3 + len(parts.netloc) :]
                return rest if rest.startswith("/") else "/" + rest
            raise BadRequest("absolute-form request targets for other hosts are not forwarded (not an open proxy)")
        raise BadRequest(f"request target {raw[:60]!r} is not a path")

    def _request_head(self, method: str, target: str, raw: RawHeaders, request_id: str, connection: list[str]) -> bytes:
        """Request line, Host and the client's end-to-end headers, as raw bytes; no token, no framing.

        ``connection``: the values of the client's Connection headers; the headers they name are dropped.
        """
        drop = self._drop_request
        if connection:
            drop = drop | _named_in_connection(value.encode("utf-8", "surrogateescape") for value in connection)
        parts = [
            method.encode("ascii"),
            b" ",
            self._base_path,
            target.encode("utf-8", "surrogateescape"),
            b" HTTP/1.1\r\n",
            self._host_line,
        ]
        for name, value in raw:
            if name.lower() not in drop:
                parts += (name, b": ", value, b"\r\n")
        parts += (b"X-Request-Id: ", request_id.encode("ascii"), b"\r\n")  # the id we log, exactly
        return b"".join(parts)

    async def _send(self, method: str, head: bytes, body: bytes | StreamReader | None) -> tuple[Exchange, Token]:
        """The upstream's answer, and the token it was sent with."""
        sent: list[Token] = []

        def last() -> bytes:
            # The token goes last, so nothing the client sent can override it; and late, once a connection is
            # ready: after a wait for one (a busy pool), the token renewed meanwhile, never one that expired.
            token = self._tokens.usable()
            if token is None:
                raise NoToken(self._tokens.reason(), retry_after=self._tokens.retry_after())
            sent.append(token)
            return b"%s: %s\r\n\r\n" % (self._inject, token.header_bytes)

        started = time.monotonic()
        exchange = await self._pool.request(method, head, body, last)
        self._metrics.observe_upstream(time.monotonic() - started)
        return exchange, sent[-1]

    async def _relay(
        self, request: web.Request, upstream: Exchange, request_id: str, origin: str | None
    ) -> tuple[web.StreamResponse, int]:
        drop = self._drop_response
        content_length: int | None = None
        connection: list[bytes] = []
        kept = []
        for name, value in upstream.headers:
            lowered = name.lower()
            if lowered in drop:
                if lowered == b"content-length":
                    content_length = int(value)
                elif lowered == b"connection":
                    connection.append(value)
                continue
            kept.append((lowered, name, value))
        named = _named_in_connection(connection)
        if origin is not None:
            named.add(b"access-control-allow-origin")  # ours replaces the upstream's
        # A list, not a CIMultiDict: aiohttp's response copies what it is given into its own.
        headers: list[tuple[str, str]] = []
        has_id = False
        for lowered, name, value in kept:
            if lowered not in named:
                headers.append((name.decode("latin-1"), value.decode("utf-8", "replace")))
                has_id = has_id or lowered == b"x-request-id"
        if not has_id:
            headers.append((REQUEST_ID_HEADER, request_id))
        if origin is not None:
            headers += (("Access-Control-Allow-Origin", origin), ("Vary", "Origin"))
        status = upstream.status
        self._metrics.count_request(request.method, status, "upstream")

        if upstream.complete and status not in NO_BODY_STATUSES and request.method != "HEAD":
            # The whole body is here already (small responses): one write, no streaming machinery.
            body = upstream.take()
            self._metrics.bytes_out_total += len(body)
            return web.Response(status=status, reason=upstream.reason, headers=headers, body=body), len(body)

        response = web.StreamResponse(status=status, reason=upstream.reason, headers=headers)
        if content_length is not None:  # bytes are relayed as received, so it still holds
            response.content_length = content_length
        await response.prepare(request)
        size = 0
        try:
            while True:
                chunk = await upstream.read()
                if not chunk:
                    break
                size += len(chunk)
                await response.write(chunk)
        except BodyInterrupted as exc:
            # The upstream failed mid-body: cut the client's connection so a short body is never
            # presented as complete (no terminating chunk, fewer bytes than Content-Length).
            event(
                "upstream.body_interrupted",
                level=logging.WARNING,
                path=request.path,
                bytes=size,
                error=str(exc),
                request_id=request_id,
            )
            if request.transport is not None:
                request.transport.close()
            return response, size
        except ConnectionError:
            return response, size  # the client disconnected while we wrote
        self._metrics.bytes_out_total += size
        await response.write_eof()
        return response, size


def _named_in_connection(values: Iterable[bytes]) -> set[bytes]:
    """The header names listed in Connection header values (RFC 9110 §7.6.1), lower case."""
    return {name.strip().lower() for value in values for name in value.split(b",")}


def _logged_path(request: web.BaseRequest) -> str:
    """The path for log lines: never the query string (it may carry secrets), never the scheme and host
    of an absolute-form target (``GET http://127.0.0.1:8360/v1/x``, as an HTTP proxy client sends it)."""
    raw = request.raw_path
    if not raw.startswith("/") and raw.startswith(("http://", "https://")):
        raw = request.rel_url.raw_path
    return raw.partition("?")[0]


def _usable_request_id(value: str) -> bool:
    return 0 < len(value) <= MAX_REQUEST_ID and value.isascii() and value.isprintable()
