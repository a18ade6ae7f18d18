"""make_app(config): the aiohttp application, its client sessions, its token manager, its routes.

Two clients live for the life of the app, created and closed in ``cleanup_ctx``: the upstream's
connection pool (proxy/upstream.py) and a small aiohttp session for the identity provider, so that a
token refresh never queues behind a hundred streaming downloads for a connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import http_exceptions, web

from . import __version__
from .access import Guard
from .config import Config
from .errors import SidecarError
from .forward import Forwarder, error_response
from .idp import IdentityProvider
from .observability import Metrics, event
from .tokens import TokenManager
from .upstream import Pool

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
TOKENS = web.AppKey("tokens", TokenManager)
IDP = web.AppKey("idp", IdentityProvider)
FORWARDER = web.AppKey("forwarder", Forwarder)
GUARD = web.AppKey("guard", Guard)

IDP_POOL_SIZE = 4
MAX_HEAD_LINE = 16384  # bytes in the request line or one header field; aiohttp's default is 8190
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def ssl_context(ca_file: str) -> ssl.SSLContext:
    """The system trust store plus ``ca_file``; verification is always on."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def make_app(config: Config, **manager_options: Any) -> web.Application:
    """The proxy as an aiohttp application. ``manager_options`` go to TokenManager (tests: backoff)."""
    app = web.Application(
        handler_args={"max_field_size": MAX_HEAD_LINE, "max_line_size": MAX_HEAD_LINE},
        middlewares=[_non_path_targets],
    )
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[GUARD] = Guard(config.listen, config.access)
    app.cleanup_ctx.append(_clients(manager_options))

    for name, handler in (
        ("healthy", _healthy),
        ("ready", _ready),
        ("status", _status),
        ("metrics", _metrics),
    ):
        app.router.add_route("*", f"/-/{name}", _reserved(handler, private=name in ("status", "metrics")))
    app.router.add_route("*", "/{tail:.*}", _forward)
    return app


def _clients(manager_options: dict[str, Any]) -> Callable[[web.Application], AsyncIterator[None]]:
    async def clients(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        context = ssl_context(config.upstream.ca_file)
        upstream = Pool(
            config.upstream.url,
            limit=config.upstream.pool_size,
            connect_timeout_s=config.upstream.connect_timeout_s,
            timeout_s=config.upstream.timeout_s,
            ssl_context=context,
        )
        idp_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=IDP_POOL_SIZE, ssl=context),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        idp = IdentityProvider(idp_session, config.auth, config.inject)
        tokens = TokenManager(
            idp, refresh_margin_s=config.auth.refresh_margin_s, metrics=app[METRICS], **manager_options
        )
        app[IDP] = idp
        app[TOKENS] = tokens
        app[FORWARDER] = Forwarder(config, upstream, tokens, app[METRICS], app[GUARD])
        tokens.start()
        try:
            yield
        finally:
            await tokens.close(revoke=config.auth.revoke_on_shutdown)
            await upstream.close()
            await idp_session.close()

    return clients


async def _forward(request: web.Request) -> web.StreamResponse:
    return await request.app[FORWARDER].handle(request)


@web.middleware
async def _non_path_targets(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    """A target that is not a path (``CONNECT host:443``, ``OPTIONS *``) matches no route; the forwarder
    refuses it with its 400 JSON, instead of aiohttp's plain-text 404."""
    if request.path.startswith("/"):
        return await handler(request)
    return await request.app[FORWARDER].handle(request)


def _reserved(handler: Callable[[web.Request], web.Response], private: bool) -> Callable[[web.Request], Any]:
    """Wrap a /-/ handler: the listener rules always apply; the API key for status and metrics."""

    async def reserved(request: web.Request) -> web.StreamResponse:
        guard = request.app[GUARD]
        try:
            guard.check_listener(request)
            if private:
                guard.check_api_key(request)
        except SidecarError as exc:
            return error_response(exc)
        if request.method not in ("GET", "HEAD"):
            return web.json_response(
                {"error": "method_not_allowed", "detail": f"{request.path} answers GET only"},
                status=405,
                headers={"Allow": "GET, HEAD"},
            )
        return handler(request)

    return reserved


def _healthy(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _ready(request: web.Request) -> web.Response:
    tokens = request.app[TOKENS]
    token = tokens.usable()
    if token is not None:
        return web.json_response(
            {
                "ready": True,
                "state": tokens.phase.value,
                "token_expires_in_s": round(token.expires_at - tokens._clock(), 1),
            }
        )
    reason = tokens.reason()
    return web.json_response(
        {"ready": False, "state": tokens.phase.value, "error": "no_token", "detail": reason, "reason": reason},
        status=503,
        headers={"Retry-After": str(round(tokens.retry_after()))},
    )


def _status(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    body = {
        "service": "oauth-sidecar",
        "version": __version__,
        "provider": config.auth.provider,
        "grant_type": config.auth.grant_type,
        "upstream": config.upstream.url,
        **request.app[TOKENS].status(),
    }
    return web.json_response(body)


def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


def log_startup(config: Config) -> None:
    event(
        "sidecar.starting",
        version=__version__,
        provider=config.auth.provider,
        upstream=config.upstream.url,
        grant_type=config.auth.grant_type,
    )


# --- the listener ------------------------------------------------------------------------------------

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
