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

import logging
import time
import uuid
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .access import Guard
from .config import Config
from .errors import BadRequest, SidecarError, UpstreamTimeout, UpstreamUnreachable
from .observability import Metrics, access_log, event
from .state import Token
from .tokens import TokenManager

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
READ_CHUNK = 2**18


def error_response(exc: SidecarError, headers: dict[str, str] | None = None) -> web.Response:
    """The JSON body of an error the proxy makes itself: ``{"error": ..., "detail": ...}``."""
    return web.json_response({"error": exc.code, "detail": exc.detail}, status=exc.status, headers=headers)


class Forwarder:
    """The catch-all handler: admit, get a token, forward, stream back."""

    def __init__(
        self, config: Config, session: aiohttp.ClientSession, tokens: TokenManager, metrics: Metrics, guard: Guard
    ) -> None:
        base = URL(config.upstream.url)
        self._prefix = str(base.origin()) + base.raw_path.rstrip("/")
        self._session = session
        self._tokens = tokens
        self._metrics = metrics
        self._guard = guard
        self._replay_limit = config.upstream.replay_limit_bytes
        self._inject = config.inject.header
        drop = set(HOP_BY_HOP) | {"host", "authorization", self._inject.lower(), "expect", "content-length"}
        if config.access.api_key:
            drop.add("x-api-key")  # the proxy's own key is not the upstream's business
        self._drop_request = frozenset(drop)
        self._drop_response = frozenset(HOP_BY_HOP | {"content-length"})
        self._access_log = config.log.access_log

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        method = request.method
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        status, size = 0, 0
        self._metrics.in_flight.inc()
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
                    path=request.raw_path.partition("?")[0],
                    status=status,
                    error=exc.code,
                    detail=exc.detail,
                    request_id=request_id,
                )
            return error_response(exc, headers)
        finally:
            self._metrics.in_flight.dec()
            if self._access_log and access_log.isEnabledFor(logging.INFO):
                event(
                    "request",
                    logger=access_log,
                    method=method,
                    path=request.raw_path.partition("?")[0],
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
        token = await self._tokens.get()

        body: bytes | aiohttp.StreamReader | None = None
        replayable = True
        if request.body_exists:
            length = request.content_length
            if length is not None and length <= self._replay_limit:
                body = await request.read()
            else:
                body, replayable = request.content, False
        url = URL(self._prefix + target, encoded=True)
        headers = self._request_headers(request.headers, request_id)

        upstream = await self._send(method, url, headers, body, token)
        if upstream.status == 401 and replayable:
            for _ in range(MAX_AUTH_RETRIES):
                renewed = await self._tokens.renew_rejected(token)
                if renewed is None:
                    break
                upstream.close()
                self._metrics.auth_retries.inc()
                token = renewed
                upstream = await self._send(method, url, headers, body, token)
                if upstream.status != 401:
                    break
        try:
            return await self._relay(request, upstream, request_id, allowed_origin)
        finally:
            upstream.close()

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

    def _request_headers(self, incoming: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
        drop = self._drop_request
        connection = incoming.get("Connection")
        if connection:
            drop = drop | {name.strip().lower() for name in connection.split(",")}
        headers: CIMultiDict[str] = CIMultiDict(
            (name, value) for name, value in incoming.items() if name.lower() not in drop
        )
        if REQUEST_ID_HEADER not in headers:
            headers[REQUEST_ID_HEADER] = request_id
        return headers

    async def _send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes | aiohttp.StreamReader | None,
        token: Token,
    ) -> aiohttp.ClientResponse:
        headers[self._inject] = token.header_value  # last, so nothing the client sent can override it
        started = time.monotonic()
        try:
            response = await self._session.request(method, url, headers=headers, data=body, allow_redirects=False)
        except TimeoutError as exc:
            raise UpstreamTimeout("the upstream did not answer in time (upstream.timeout_s)") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnreachable(f"cannot connect to the upstream ({_os_reason(exc)})") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnreachable(f"the upstream connection failed ({type(exc).__name__})") from exc
        self._metrics.upstream_duration.observe(time.monotonic() - started)
        return response

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, request_id: str, origin: str | None
    ) -> tuple[web.StreamResponse, int]:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        out = response.headers
        drop = self._drop_response
        connection = upstream.headers.get("Connection")
        if connection:
            drop = drop | {name.strip().lower() for name in connection.split(",")}
        for name, value in upstream.headers.items():
            if name.lower() not in drop:
                out.add(name, value)
        if REQUEST_ID_HEADER not in out:
            out[REQUEST_ID_HEADER] = request_id
        if origin is not None:
            out["Access-Control-Allow-Origin"] = origin
            out.add("Vary", "Origin")
        if upstream.content_length is not None:  # bytes are relayed as received, so it still holds
            response.content_length = upstream.content_length
        self._metrics.count_request(request.method, upstream.status, "upstream")

        await response.prepare(request)
        size = 0
        content = upstream.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                size += len(chunk)
                await response.write(chunk)
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            if isinstance(exc, ConnectionResetError | aiohttp.ClientConnectionResetError) and _client_gone(request):
                return response, size  # the client went away; closing the upstream response cancels it
            # The upstream failed mid-body: cut the client's connection so a short body is never
            # presented as complete (no terminating chunk, fewer bytes than Content-Length).
            event(
                "upstream.body_interrupted",
                level=logging.WARNING,
                path=request.path,
                bytes=size,
                error=type(exc).__name__,
                request_id=request_id,
            )
            if request.transport is not None:
                request.transport.close()
            return response, size
        except ConnectionError:
            return response, size  # the client disconnected while we wrote
        self._metrics.bytes_out.inc(size)
        await response.write_eof()
        return response, size


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _os_reason(exc: aiohttp.ClientConnectorError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "TLS certificate verification failed"
    return str(exc.os_error.strerror or exc.os_error or "connection failed")
