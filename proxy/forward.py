"""One request upstream and back.

The request goes to ``upstream.url`` joined with the request's raw path and query string, byte for
byte (never decoded and re-encoded). Hop-by-hop headers, those named in ``Connection``, the client's
``Authorization`` and the configured header are dropped; ``Host`` is the upstream's; the token is
injected last, after the static ``[inject] headers`` (whose names are dropped from the client's request
too). A WebSocket handshake goes the same way; its 101 is handed to proxy/websocket.py. Bodies stream
both ways with backpressure: a 200 MB report never sits in memory.
``Content-Encoding`` passes through untouched (the client session does not decompress).

An upstream 401 with the current token triggers one shared renewal and one retry, when the body can
be replayed (no body, or one small enough that it was buffered); otherwise the 401 goes back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from aiohttp import StreamReader, web
from yarl import URL

from . import websocket
from .access import Guard
from .config import Config
from .errors import BadRequest, NoToken, RequestTimeout, SidecarError, UpstreamUnreachable
from .observability import Metrics, access_log, event, log_request
from .response import DirectWriter, RelayResponse
from .state import Token
from .tokens import TokenManager
from .upstream import BodyInterrupted, Exchange, Pool
from .wire import HOP_BY_HOP, Body, Framing, WireError, request_framing

# Retry a request at most this many times after the upstream rejected the token.
MAX_AUTH_RETRIES = 1
REQUEST_ID_HEADER = "X-Request-Id"
RawHeaders = tuple[tuple[bytes, bytes], ...]
# A client's X-Request-Id is kept when it is this short and plain; otherwise one is generated, so a
# client cannot put control characters or a megabyte into every log line and upstream request.
MAX_REQUEST_ID = 128


def error_response(exc: SidecarError, headers: dict[str, str] | None = None) -> web.Response:
    """The JSON body of an error the proxy makes itself: ``{"error": ..., "detail": ...}``."""
    response = web.json_response({"error": exc.code, "detail": exc.detail}, status=exc.status, headers=headers)
    if isinstance(exc, RequestTimeout):
        response.force_close()  # Connection: close; the rest of a trickling body is not waited for
    return response


class Progress:
    """What a request has been answered so far: the access line and the metrics read it even when the
    client hung up (the handler is then cancelled mid-relay)."""

    __slots__ = ("outcome", "size", "status")

    def __init__(self) -> None:
        self.status = 0  # 0: no response head was sent
        self.size = 0  # body bytes written to the client
        self.outcome = ""  # "" when answered whole; else why not (client_gone, upstream_cut)


class PacedBody:
    """The client's request body, refused with 408 when it arrives slower than ``min_rate`` bytes a
    second over any ``window`` seconds spent waiting for it (Apache's ``RequestReadTimeout ... MinRate``).

    Only time spent waiting for the client counts: while the upstream holds the body back (its own
    backpressure), the client is not to blame. A real upload, however large, is never cut while it
    moves at a usable speed; a trickle (1000 bytes announced, one byte every 2 s) frees its slot."""

    __slots__ = ("_got", "_loop", "_min_bytes", "_stream", "_waited", "_window")

    def __init__(self, stream: StreamReader, window: float, min_rate: float) -> None:
        self._stream = stream
        self._loop = asyncio.get_running_loop()
        self._window = window
        self._min_bytes = min_rate * window
        self._waited = 0.0
        self._got = 0

    async def readany(self) -> bytes:
        if self._min_bytes <= 0:
            return await self._stream.readany()
        loop = self._loop
        while True:
            started = loop.time()
            chunk: bytes | None = None
            try:
                async with asyncio.timeout_at(started + self._window - self._waited):
                    chunk = await self._stream.readany()
            except TimeoutError:
                pass
            self._waited += loop.time() - started
            if chunk:
                self._got += len(chunk)
            if self._waited >= self._window:
                if self._got < self._min_bytes and chunk != b"":
                    rate = self._min_bytes / self._window
                    raise RequestTimeout(
                        f"the request body arrived slower than listen.min_body_rate ({rate:g} bytes/s "
                        f"over {self._window:g} s)"
                    )
                self._waited, self._got = 0.0, 0
            if chunk is not None:
                return chunk

    async def read(self) -> bytes:
        """The whole body (a small, replayable one)."""
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)


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
        self._stall_s = config.upstream.timeout_s  # a client that takes no body byte for this long is cut
        self._body_window = config.listen.idle_timeout_s
        self._min_body_rate = config.listen.min_body_rate
        self._inject = config.inject.header.encode("ascii")
        injected = config.inject.header.lower()
        # Also its "-"/"_" twin (Access-Token for access_token): CGI-style servers read both as one variable.
        twins = {injected, injected.replace("_", "-"), injected.replace("-", "_")}
        # The framing headers' "_" spellings too: an upstream that folds "_" into "-" must not find a second
        # Content-Length or Transfer-Encoding beside the one the proxy wrote.
        framing_twins = {"content_length", "transfer_encoding"}
        drop = set(HOP_BY_HOP) | {"host", "authorization", "expect", "content-length"} | twins | framing_twins
        drop.add(REQUEST_ID_HEADER.lower())  # sent again as the id we log
        # [inject] headers: the client's own of those names (and their "-"/"_" twins) are dropped, like the token's,
        # and ours go with the token, pre-encoded once. config.py has checked the names and values.
        for name in config.inject.headers:
            lowered = name.lower()
            drop |= {lowered, lowered.replace("_", "-"), lowered.replace("-", "_")}
        self.set_static_headers(config.inject.headers)
        if config.access.api_key:
            drop.add("x-api-key")  # the proxy's own key is not the upstream's business
        self._drop_request = frozenset(name.encode("ascii") for name in drop)
        self._drop_response = frozenset(name.encode("ascii") for name in HOP_BY_HOP | {"content-length"})
        # A HEAD's or a 304's Content-Length describes the body a GET would get: it passes through.
        self._drop_bodiless = frozenset(name.encode("ascii") for name in HOP_BY_HOP)
        self._access_log = config.log.access_log
        # Request ids: a random prefix per process and a counter, 32 hex digits like a UUID's, at a
        # fraction of uuid4's cost (it reads os.urandom for every request).
        self._id_prefix = secrets.token_hex(10)
        self._ids = itertools.count(1)
        # The tasks of the requests under way (a shutdown lets them finish, then cancels what is left).
        self.under_way: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.get_running_loop()  # current_task(loop) skips looking the loop up per request

    @property
    def pool(self) -> Pool:
        """The upstream connection pool (its stats: Pool.waiting, idle_in_use, open_connections)."""
        return self._pool

    def set_static_headers(self, headers: Mapping[str, str]) -> None:
        """Put the static ``[inject] headers`` in force (at start, and when a ``headers_file`` rotates: its
        names never change, so what is dropped from the client's request stays). Pre-encoded once."""
        self._static = b"".join(
            b"%s: %s\r\n" % (name.encode("ascii"), value.encode("ascii")) for name, value in headers.items()
        )

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Admit the request, send it upstream with the token, relay the answer; or answer a JSON error.

        One coroutine from admission to the answer, whatever path a request takes: every frame in a
        request's coroutine chain is passed through again each time it resumes, and two more of ours cost
        more per request than all the admission checks (bench/). The rarer steps (a body to read, a
        rejected token, a tunnel, a streamed body) are coroutines of their own."""
        started = time.monotonic()
        method = request.method
        request_id = request.headers.get(REQUEST_ID_HEADER, "")
        if not _usable_request_id(request_id):
            request_id = "%s%012x" % (self._id_prefix, next(self._ids))  # noqa: UP031 (no format spec to parse)
        progress = Progress()
        metrics = self._metrics
        metrics.in_flight_count += 1
        task = asyncio.current_task(self._loop)
        assert task is not None
        under_way = self.under_way
        under_way.add(task)
        try:
            allowed_origin = self._guard.check_listener(request)
            preflight_asked = method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
            if allowed_origin is not None and preflight_asked:
                preflight = self._guard.preflight(request, allowed_origin)
                progress.status = preflight.status
                return preflight
            target = self._target(request)
            self._guard.check_api_key(request)
            self._guard.check_forward(method, target.partition("?")[0])
            upgrade = websocket.requested(request)  # a WebSocket handshake, admitted like any request
            framing = _framing(request, method)
            body: bytes | PacedBody | None = None
            replayable = True
            accept = ""
            if upgrade:
                if framing.has_body:
                    raise BadRequest("a WebSocket handshake has no body")
                accept = websocket.expected_accept(request)
            if framing.has_body:
                body, replayable = await self._body(request, framing)
            connection = request.headers.getall("Connection", [])
            head = self._request_head(method, target, request.raw_headers, request_id, connection) + framing.header()
            if upgrade:
                head += websocket.UPGRADE_LINES
            # Only now, once the body is read: a slow client must not make the proxy send a token that expired
            # meanwhile.
            if self._tokens.usable() is None:  # no coroutine while it is fresh
                await self._tokens.get()  # the renewal in flight, or NoToken (503) at once

            sent: list[Token] = []
            sent_at = time.monotonic()
            upstream = await self._pool.request(method, head, body, self._last(sent), framing=framing, upgrade=upgrade)
            metrics.observe_upstream(time.monotonic() - sent_at)
            token = sent[-1]
            try:  # from here on, whatever happens (a client hanging up mid-renewal), the connection goes back
                if upstream.status == 401 and replayable:
                    upstream, token = await self._retry_rejected(method, head, body, framing, upgrade, upstream, token)
                if upstream.status != 401:
                    self._tokens.accepted(token)  # evidence for a later 401: this token was good (state.py)
                if upstream.status == 101:  # only ever the answer to an upgrade (the pool refuses it otherwise)
                    return await self._tunnel(request, upstream, request_id, accept, progress)
                complete = upstream.complete  # a small answer, whole already: no relay coroutine, one write
                relayed = self._response(request, upstream, request_id, allowed_origin, progress, complete)
                if complete:
                    return relayed
                return await self._relay(request, upstream, relayed, request_id, progress)
            finally:
                upstream.release()
        except SidecarError as exc:
            return await self._refused(request, exc, method, request_id, progress)
        except asyncio.CancelledError:
            progress.outcome = progress.outcome or "client_gone"  # the client hung up: aiohttp cancelled us
            raise
        finally:
            under_way.discard(task)
            metrics.in_flight_count -= 1
            if self._access_log and access_log.isEnabledFor(logging.INFO):
                log_request(
                    method,
                    _logged_path(request),
                    progress.status,
                    progress.size,
                    time.monotonic() - started,
                    request_id,
                    progress.outcome,
                )

    async def _refused(
        self, request: web.BaseRequest, exc: SidecarError, method: str, request_id: str, progress: Progress
    ) -> web.Response:
        """The proxy's own JSON answer to a request it did not (or could not) forward."""
        headers = {REQUEST_ID_HEADER: request_id}
        retry_after = getattr(exc, "retry_after", None)
        if exc.status == 503 and retry_after is not None:
            headers["Retry-After"] = str(max(1, round(retry_after)))
        self._metrics.count_request(method, exc.status, "proxy")
        if exc.status >= 500:
            event(
                "request.failed",
                level=logging.WARNING,
                method=method,
                path=_logged_path(request),
                status=exc.status,
                error=exc.code,
                detail=exc.detail,
                request_id=request_id,
            )
        response = error_response(exc, headers)
        progress.status = exc.status
        progress.size = len(response.body) if isinstance(response.body, bytes) else 0  # for the access log
        if isinstance(exc, RequestTimeout) and request.transport is not None:
            # Answer, then end our side at once, so the client reads the answer and its end; aiohttp then
            # drains what is still arriving for at most its lingering time and closes. (Closing outright
            # with unread bytes queued would make the kernel send a reset that can destroy the answer.)
            await response.prepare(request)
            await response.write_eof()
            if request.transport.can_write_eof():
                request.transport.write_eof()
        return response

    async def _body(self, request: web.BaseRequest, framing: Framing) -> tuple[bytes | PacedBody, bool]:
        """The request's body to send, and whether it can be sent again (a 401 retry): a small one with a
        Content-Length is read whole first; anything else streams."""
        paced = PacedBody(request.content, self._body_window, self._min_body_rate)
        if framing.body is Body.LENGTH and framing.length <= self._replay_limit:
            body = await paced.read()
            if len(body) != framing.length:  # aiohttp's parser delimits it: a second lock on the door
                raise BadRequest("the request body does not match its Content-Length")
            return body, True
        return paced, False

    async def _retry_rejected(
        self,
        method: str,
        head: bytes,
        body: bytes | PacedBody | None,
        framing: Framing,
        upgrade: bool,
        upstream: Exchange,
        token: Token,
    ) -> tuple[Exchange, Token]:
        """The upstream answered 401 to ``token``: renew it (once for every request that saw it) and send
        again, at most MAX_AUTH_RETRIES times. The answer to relay, and the token it answered."""
        for _ in range(MAX_AUTH_RETRIES):
            renewed = await self._tokens.renew_rejected(token)
            if renewed is None:
                break
            upstream.release()
            self._metrics.auth_retries.inc()
            sent: list[Token] = []
            sent_at = time.monotonic()
            upstream = await self._pool.request(method, head, body, self._last(sent), framing=framing, upgrade=upgrade)
            self._metrics.observe_upstream(time.monotonic() - sent_at)
            token = sent[-1]
            if upstream.status != 401:
                break
        return upstream, token

    def _target(self, request: web.BaseRequest) -> str:
        """The raw path and query to append to the upstream URL, exactly as the client sent them."""
        raw = request.raw_path
        if raw.startswith("/"):
            return raw
        rest = self.origin_form(raw)
        if rest is not None:
            return rest
        if raw.startswith(("http://", "https://")):
            raise BadRequest("absolute-form request targets for other hosts are not forwarded (not an open proxy)")
        raise BadRequest(f"request target {raw[:60]!r} is not a path")

    def origin_form(self, raw: str) -> str | None:
        """The path and query of an absolute-form target that names this listener (``GET
        http://127.0.0.1:8360/v1/x``, as an HTTP proxy client sends it); None for any other target."""
        if not raw.startswith(("http://", "https://")):
            return None
        try:
            parts = urlsplit(raw)
        except ValueError:  # an authority urlsplit cannot read ("http://[::1/x"): not a name we answer to
            return None
        if not (parts.hostname and self._guard.host_allowed(parts.netloc)):
            return None
        rest = raw[len(parts.scheme) + 3 + len(parts.netloc) :]
        return rest if rest.startswith("/") else "/" + rest

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

    def _last(self, sent: list[Token]) -> Callable[[], bytes]:
        """The end of the request head, for the pool to call once a connection is ready; the token it puts
        there is appended to ``sent``."""

        def last() -> bytes:
            # The token goes last, so nothing the client sent can override it; and late, once a connection is
            # ready: after a wait for one (a busy pool), the token renewed meanwhile, never one that expired.
            token = self._tokens.usable()
            if token is None:
                raise NoToken(self._tokens.reason(), retry_after=self._tokens.retry_after())
            sent.append(token)
            return b"%s%s: %s\r\n\r\n" % (self._static, self._inject, token.header_bytes)

        return last

    def _response_lines(
        self, upstream: Exchange, drop: frozenset[bytes], request_id: str, cors: bool, reason: bytes
    ) -> bytes:
        """The upstream's end-to-end header lines for the client, and X-Request-Id when it sent none.
        ``reason``: the upstream's reason phrase as bytes, checked here with the lines."""
        # The upstream's header lines, byte for byte (a latin-1 filename stays latin-1), in one pass; a
        # second one only when Connection names an end-to-end header, or for CORS (ours replaces theirs).
        lines: list[bytes] = []
        named: set[bytes] = set()
        has_id = False
        for name, value in upstream.headers:
            lowered = name.lower()
            if lowered in drop:
                if lowered == b"connection" and value.lower() not in _PLAIN_CONNECTION:
                    named |= _named_in_connection((value,))
                continue
            lines += (name, b": ", value, b"\r\n")
            has_id = has_id or lowered == b"x-request-id"
        if cors:
            named.add(b"access-control-allow-origin")
        if named and not named <= drop:
            lines = [
                part for i in range(0, len(lines), 4) if lines[i].lower() not in named for part in lines[i : i + 4]
            ]
            has_id = any(lines[i].lower() == b"x-request-id" for i in range(0, len(lines), 4))
        raw = b"".join(lines)
        count = len(lines) // 4
        # llhttp has refused CR, LF and NUL inside them and inside the reason; this is the second lock on that
        # door, since one stray LF here would let the upstream write a second response head to the client.
        # (find, not "in": bytes.__contains__ first tries its argument as an int, raising a TypeError.)
        if (
            raw.count(b"\n") != count
            or raw.count(b"\r") != count
            or raw.find(b"\x00") != -1
            or reason.find(b"\n") != -1
            or reason.find(b"\r") != -1
        ):
            raise UpstreamUnreachable("the upstream sent a response head the proxy will not relay (control bytes)")
        if not has_id:
            raw += b"X-Request-Id: %s\r\n" % request_id.encode("ascii")
        return raw

    async def _tunnel(
        self, request: web.BaseRequest, upstream: Exchange, request_id: str, accept: str, progress: Progress
    ) -> web.StreamResponse:
        """The upstream switched to WebSocket: answer the client's handshake and relay bytes (proxy/websocket.py)."""
        websocket.check_switch(upstream.headers, accept)  # else 502, before the client got anything
        reason = upstream.reason.encode("latin-1")
        lines = websocket.UPGRADE_LINES + self._response_lines(upstream, self._drop_response, request_id, False, reason)
        self._metrics.count_request(request.method, 101, "upstream")
        progress.status = 101

        def done(tunnel: websocket.Tunnel) -> None:
            progress.size = tunnel.sent_down
            progress.outcome = tunnel.closed_by
            self._metrics.bytes_out_total += tunnel.sent_down

        response = await websocket.relay(
            request, upstream, lines, self._stall_s, _logged_path(request), request_id, done
        )
        return response

    def _response(
        self,
        request: web.BaseRequest,
        upstream: Exchange,
        request_id: str,
        origin: str | None,
        progress: Progress,
        complete: bool,
    ) -> RelayResponse:
        """The client's response to the upstream's: its head, and its body when the whole body is here."""
        status = upstream.status
        framing = upstream.framing
        bodiless = framing.body is Body.NONE and status != 204  # HEAD and 304: their Content-Length passes through
        drop = self._drop_bodiless if bodiless else self._drop_response
        reason = upstream.reason.encode("latin-1")
        raw = self._response_lines(upstream, drop, request_id, origin is not None, reason)
        if origin is not None:
            raw += b"Access-Control-Allow-Origin: %s\r\nVary: Origin\r\n" % origin.encode("latin-1")
        self._metrics.count_request(request.method, status, "upstream")
        if not complete:
            return RelayResponse(status, reason, raw, framing)
        # The whole body is here already (small responses): head and body in one write.
        body = upstream.take()
        progress.status = status
        progress.size = len(body)
        self._metrics.bytes_out_total += len(body)
        return RelayResponse(status, reason, raw, framing, whole=body)

    def _counted(self, direct: DirectWriter, progress: Progress) -> DirectWriter:
        """A direct writer (RelayResponse.direct_writer) that counts what it writes, and whose wait for a
        client to drain is bounded by upstream.timeout_s (a client that stops reading: no byte moving)."""
        write, drain = direct
        metrics, stall_s = self._metrics, self._stall_s

        def counted(data: bytes) -> bool:
            progress.size += len(data)
            metrics.bytes_out_total += len(data)
            return write(data)

        async def drained() -> None:
            async with asyncio.timeout(stall_s):
                await drain()

        return counted, drained

    async def _relay(
        self,
        request: web.BaseRequest,
        upstream: Exchange,
        response: RelayResponse,
        request_id: str,
        progress: Progress,
    ) -> web.StreamResponse:
        """Stream the upstream's body to the client as it arrives, with backpressure."""
        status = upstream.status
        await response.prepare(request)
        progress.status = status
        direct = response.direct_writer()
        try:
            if direct is not None:  # a body of known length: written as it arrives, no copy, no task switch
                await upstream.pipe(*self._counted(direct, progress))
            else:
                while chunk := await upstream.read():
                    async with asyncio.timeout(self._stall_s):  # a client that stops reading: no byte moving
                        await response.write(chunk)
                    progress.size += len(chunk)
                    self._metrics.bytes_out_total += len(chunk)
        except BodyInterrupted as exc:
            # The upstream failed mid-body: cut the client's connection so a short body is never
            # presented as complete (no terminating chunk, fewer bytes than Content-Length).
            progress.outcome = "upstream_cut"
            event(
                "upstream.body_interrupted",
                level=logging.WARNING,
                path=_logged_path(request),
                bytes=progress.size,
                error=str(exc),
                request_id=request_id,
            )
            if request.transport is not None:
                request.transport.close()
            return response
        except ConnectionError:
            progress.outcome = "client_gone"  # the client disconnected while we wrote
            return response
        except TimeoutError:
            # The client took no byte for upstream.timeout_s: cut it, so it cannot hold an upstream
            # connection (and a pool slot) for as long as it likes.
            progress.outcome = "client_stalled"
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        return response


# Connection values that name no header but the hop-by-hop ones (the common case: no second pass).
_PLAIN_CONNECTION = frozenset((b"keep-alive", b"close"))


def _named_in_connection(values: Iterable[bytes]) -> set[bytes]:
    """The header names listed in Connection header values (RFC 9110 §7.6.1), lower case."""
    return {name.strip().lower() for value in values for name in value.split(b",")}


def _framing(request: web.BaseRequest, method: str) -> Framing:
    """The request body's framing, decided here, once, from aiohttp's parse of the request, and handed to
    the pool with the head it goes with; nothing downstream reads it back out of bytes."""
    try:
        return request_framing(
            method,
            has_body=request.body_exists,
            content_length=request.content_length,
            transfer_encoding=request.headers.get("Transfer-Encoding"),
        )
    except WireError as exc:
        raise BadRequest(str(exc)) from None


def _logged_path(request: web.BaseRequest) -> str:
    """The path for log lines: never the query string (it may carry secrets), never the scheme and host
    of an absolute-form target (``GET http://127.0.0.1:8360/v1/x``, as an HTTP proxy client sends it)."""
    raw = request.raw_path
    if not raw.startswith("/") and raw.startswith(("http://", "https://")):
        raw = request.rel_url.raw_path
    return raw.partition("?")[0]


def _usable_request_id(value: str) -> bool:
    return 0 < len(value) <= MAX_REQUEST_ID and value.isascii() and value.isprintable()
