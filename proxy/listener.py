"""The listener: the TCP site cli.serve() runs, bounded in connections, answering aiohttp's own errors in JSON.

aiohttp has no public hook to choose the per-connection handler class or to refuse a connection before
it gets one, so this module reaches into aiohttp's private attributes. It is the only module that does:

- ``web.Server._loop`` and ``web.Server._kwargs``: to build a :class:`_JsonErrors` handler the way
  ``web.Server.__call__`` builds aiohttp's own;
- ``web.BaseSite._runner``, ``._server`` and ``._backlog``: :class:`LimitedSite` starts its own
  ``loop.create_server`` with its own protocol factory, as ``web.TCPSite.start`` does with aiohttp's.

tests/test_listener.py checks each of them by name, so an aiohttp release that renames one fails there,
and pyproject.toml's aiohttp range is the one that test passed on.
"""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus

from aiohttp import http_exceptions, web

from .observability import Metrics, event

MAX_HEAD_LINE = 16384  # bytes in the request line or one header field; aiohttp's default is 8190

# A connection refused for being over listen.max_connections may send its request head first; it is
# read (up to this much, for this long) so the client sees the 503 instead of a connection reset.
BUSY_READ_LIMIT = 16384
BUSY_READ_TIMEOUT_S = 2.0
BUSY_LOG_INTERVAL_S = 10.0


class LimitedSite(web.BaseSite):
    """A TCP listener that holds at most ``limit`` client connections open at once.

    aiohttp's server accepts connections without bound; each idle keep-alive or slow client holds a
    socket and a handler. Over the limit, a new connection gets ``503`` (JSON, ``Retry-After: 1``)
    and is closed, and ``sidecar.busy`` is logged at most every ``BUSY_LOG_INTERVAL_S``. Under it,
    each connection gets a :class:`_JsonErrors` handler.
    """

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, limit: int, metrics: Metrics) -> None:
        super().__init__(runner, backlog=min(limit, 4096))
        self._host, self._port, self._limit, self._metrics = host, port, limit, metrics
        self._refused_since_log = 0
        self._logged_at = -BUSY_LOG_INTERVAL_S

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        handlers = self._runner.server
        assert handlers is not None

        def protocol() -> asyncio.BaseProtocol:
            if len(handlers.connections) < self._limit:
                # What web.Server.__call__ does, with our class (aiohttp has no hook to choose it); minus its
                # retry without handler_args after a TypeError: ours are fixed in make_app and serve().
                return _JsonErrors(handlers, loop=handlers._loop, **handlers._kwargs)
            self._refused(loop.time())
            return _Busy(loop)

        self._server = await loop.create_server(
            protocol, self._host, self._port, backlog=self._backlog, reuse_address=True
        )

    def _refused(self, now: float) -> None:
        self._metrics.connections_refused.inc()
        self._refused_since_log += 1
        if now - self._logged_at >= BUSY_LOG_INTERVAL_S:
            event(
                "sidecar.busy",
                level=logging.WARNING,
                limit=self._limit,
                refused=self._refused_since_log,
                detail="listen.max_connections client connections are open; new ones get 503",
            )
            self._logged_at, self._refused_since_log = now, 0


# What a client is told when aiohttp's parser refuses its request. Never aiohttp's message or the exception
# text: they quote the request's bytes (a header value, an API key). Subclasses before their base classes.
_MALFORMED_DETAILS: tuple[tuple[type[Exception], str], ...] = (
    (http_exceptions.LineTooLong, f"a request line or header field is longer than {MAX_HEAD_LINE} bytes"),
    (http_exceptions.InvalidHeader, "invalid header field"),
    (http_exceptions.BadHttpMethod, "invalid request method"),
    (http_exceptions.BadStatusLine, "invalid request line"),
    (http_exceptions.InvalidURLError, "invalid request target"),
    (http_exceptions.PayloadEncodingError, "invalid body framing"),  # chunked framing, Content-Length
)


def _error_body(status: int, exc: BaseException | None) -> dict[str, str]:
    if status == HTTPStatus.BAD_REQUEST:
        detail = next((text for kind, text in _MALFORMED_DETAILS if isinstance(exc, kind)), "malformed HTTP request")
        return {"error": "bad_request", "detail": detail}
    if status == HTTPStatus.INTERNAL_SERVER_ERROR:
        return {"error": "internal_error", "detail": "the proxy failed to handle this request; see its log"}
    try:
        known = HTTPStatus(status)
    except ValueError:  # aiohttp answers only 400, 500 and 504 itself
        known = HTTPStatus.BAD_REQUEST
    return {"error": known.phrase.lower().replace(" ", "_").replace("-", "_"), "detail": known.description}


class _JsonErrors(web.RequestHandler):
    """aiohttp's per-connection handler, answering the errors aiohttp makes itself (a request its parser
    refuses, a handler that raised) with the contract's JSON instead of plain text."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own logs the error (MalformedRequestFilter makes a parse error one request.malformed
        # line) and raises ConnectionError once a response has started; its plain-text answer is dropped.
        super().handle_error(request, status, exc, message)
        response = web.json_response(_error_body(status, exc), status=status)
        response.force_close()
        return response


_BUSY_BODY = json.dumps(
    {"error": "too_many_connections", "detail": "the proxy has listen.max_connections connections open; retry"}
).encode()
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class _Busy(asyncio.Protocol):
    """Answers 503 once the request head has arrived (or after a short wait), then closes."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._seen = 0
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._timer = self._loop.call_later(BUSY_READ_TIMEOUT_S, self._answer)

    def data_received(self, data: bytes) -> None:
        self._seen += len(data)
        if b"\r\n\r\n" in data or self._seen >= BUSY_READ_LIMIT:
            self._answer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    def _answer(self) -> None:
        transport, self._transport = self._transport, None
        if self._timer is not None:
            self._timer.cancel()
        if transport is not None and not transport.is_closing():
            transport.write(_BUSY_RESPONSE)
            transport.close()
