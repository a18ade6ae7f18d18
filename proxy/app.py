"""make_app(config): the aiohttp application, its client sessions, its token manager; Dispatch, its routes.

Two clients live for the life of the app, created and closed in ``cleanup_ctx``: the upstream's
connection pool (proxy/upstream.py) and a small aiohttp session for the identity provider, so that a
token refresh never queues behind a hundred streaming downloads for a connection.

Routing is :class:`Dispatch`: the four ``/-/`` paths by exact match, everything else forwarded. The
listener (proxy/listener.py, :class:`~proxy.listener.SidecarRunner`) serves it on aiohttp's low-level
server, without the Application's router and middleware chain, which cost more per request than all of
the proxy's admission checks together; the Application itself, served by any aiohttp runner (the tests'
``TestServer``, ``web.run_app``), routes every request to the same :class:`Dispatch`.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from . import __version__
from .access import Guard
from .client_auth import tls_context
from .config import Config
from .errors import SidecarError
from .forward import Forwarder, error_response
from .idp import IdentityProvider
from .listener import HANDLER_ARGS
from .observability import Metrics, event
from .secrets import Secrets
from .store import open_store
from .tokens import TokenManager
from .upstream import Pool

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
TOKENS = web.AppKey("tokens", TokenManager)
IDP = web.AppKey("idp", IdentityProvider)
FORWARDER = web.AppKey("forwarder", Forwarder)
GUARD = web.AppKey("guard", Guard)
SECRETS = web.AppKey("secrets", Secrets)  # the secret values in force (rotated files: proxy/secrets.py)
WORKER = web.AppKey("worker", dict)  # listen.workers > 1: which worker this is (index, of, pid), for /-/status

IDP_POOL_SIZE = 4
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def ssl_context(ca_file: str, cert_file: str = "", key_file: str = "") -> ssl.SSLContext:
    """The system trust store plus ``ca_file``; verification is always on. With ``cert_file``, a client
    certificate for servers that ask for one (mutual TLS)."""
    return tls_context(ca_file, cert_file, key_file)


def idp_ssl_context(config: Config) -> ssl.SSLContext:
    """For the identity provider: ``auth.client_cert_file`` is presented (tls_client_auth, RFC 8705)."""
    auth = config.auth
    return ssl_context(
        config.upstream.ca_file, auth.client_cert_file, auth.client_key_file if auth.client_cert_file else ""
    )


def upstream_ssl_context(config: Config) -> ssl.SSLContext:
    """For the upstream pool: ``upstream.client_cert_file`` is presented to an API that wants mutual TLS."""
    upstream = config.upstream
    return ssl_context(upstream.ca_file, upstream.client_cert_file, upstream.client_key_file)


def make_app(config: Config, **manager_options: Any) -> web.Application:
    """The proxy as an aiohttp application. ``manager_options`` go to TokenManager (tests: backoff)."""
    app = web.Application(handler_args=HANDLER_ARGS, middlewares=[_non_path_targets])
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[GUARD] = Guard(config.listen, config.access)
    app[SECRETS] = Secrets(config)
    app[DISPATCH] = Dispatch()
    app.cleanup_ctx.append(_clients(manager_options))
    # Served as an Application, every path goes to Dispatch. "." does not match a newline: with "/{tail:.*}",
    # /a%0Ab got aiohttp's plain-text 404. Dispatch answers Expect itself (the route's handler would first).
    app.router.add_route("*", r"/{tail:[\s\S]*}", _routed, expect_handler=_expect_answered_by_dispatch)
    return app


async def _routed(request: web.Request) -> web.StreamResponse:
    return await request.app[DISPATCH](request)


@web.middleware
async def _non_path_targets(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    """A target that is not a path (``CONNECT host:443``, ``OPTIONS *``) matches no route of the router:
    Dispatch has the forwarder refuse it with its 400 JSON, instead of aiohttp's plain-text 404."""
    if request.path.startswith("/"):
        return await handler(request)
    return await request.app[DISPATCH](request)


def _clients(manager_options: dict[str, Any]) -> Callable[[web.Application], AsyncIterator[None]]:
    async def clients(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        upstream = Pool(
            config.upstream.url,
            limit=config.upstream.pool_size,
            connect_timeout_s=config.upstream.connect_timeout_s,
            timeout_s=config.upstream.timeout_s,
            ssl_context=upstream_ssl_context(config),
            proxy=config.egress("upstream").for_url(config.upstream.url),
        )
        idp_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=IDP_POOL_SIZE, ssl=idp_ssl_context(config)),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,  # the proxy is chosen per request by proxy/egress.py (auth.proxy_url, HTTPS_PROXY)
        )
        idp = IdentityProvider(
            idp_session, config.auth, config.inject, secrets=app[SECRETS], egress=config.egress("auth")
        )
        store = open_store(config.store, config.auth)
        if store is not None:
            store.metrics = app[METRICS]
        tokens = TokenManager(
            idp,
            refresh_margin_s=config.auth.refresh_margin_s,
            metrics=app[METRICS],
            store=store,
            inject_value=config.inject.value,
            **manager_options,
        )
        app[IDP] = idp
        app[TOKENS] = tokens
        app[FORWARDER] = Forwarder(config, upstream, tokens, app[METRICS], app[GUARD])
        app[DISPATCH].bind(app)
        tokens.start()
        try:
            yield
        finally:
            await tokens.close(revoke=config.auth.revoke_on_shutdown)
            await upstream.close()
            await idp_session.close()

    return clients


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Dispatch:
    """The proxy's one request handler: a ``/-/`` route by exact path, else the forwarder.

    ``bind(app)`` once the app has started (its forwarder exists); the listener calls it. The path a
    route is matched on is the one aiohttp's router used (``rel_url.path_safe``: decoded, ``%2F`` kept),
    so ``/-/%68ealthy`` and an absolute-form ``GET http://127.0.0.1:8360/-/ready`` are the routes too.
    ``Expect`` is answered here as aiohttp's router would, before any rule: ``100-continue`` gets its
    interim answer, anything else a 417 (JSON)."""

    __slots__ = ("_app", "_forwarder")

    def __init__(self) -> None:
        self._app: web.Application | None = None
        self._forwarder: Forwarder | None = None

    def bind(self, app: web.Application) -> None:
        self._app, self._forwarder = app, app[FORWARDER]

    def __call__(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        # Not a coroutine itself: the forwarder's is the request's, with no frame of ours around it.
        if "Expect" in request.headers:
            return self._expecting(request)
        return self._route(request)

    def _route(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        forwarder, app = self._forwarder, self._app
        assert forwarder is not None and app is not None, "Dispatch.bind(app) comes first"
        raw = request.raw_path
        if raw.startswith("/-/") or not raw.startswith("/") or "%" in raw:  # maybe a reserved route
            route = RESERVED.get(request.rel_url.path_safe)
            # An absolute-form target is a route only when it names this listener; else the forwarder's 400.
            if route is not None and (raw.startswith("/") or forwarder.origin_form(raw) is not None):
                return _answered(_reserved(app, request, *route))
        return forwarder.handle(request)

    async def _expecting(self, request: web.BaseRequest) -> web.StreamResponse:
        refused = await _expect(request)
        return refused if refused is not None else await self._route(request)


async def _answered(response: web.StreamResponse) -> web.StreamResponse:
    return response


DISPATCH = web.AppKey("dispatch", Dispatch)  # bound to its app when the app has started


async def _expect(request: web.BaseRequest) -> web.Response | None:
    """What aiohttp's router does with ``Expect`` (HTTP/1.1 only): the 100 Continue interim answer, or a
    refusal for an expectation it does not know."""
    if request.version < aiohttp.HttpVersion11:
        return None
    if request.headers["Expect"].lower() == "100-continue":
        await request.writer.write(CONTINUE)
        request.writer.output_size = 0  # the interim answer is not the response's body
        return None
    return web.json_response(
        {"error": "expectation_failed", "detail": "only Expect: 100-continue is understood"}, status=417
    )


async def _expect_answered_by_dispatch(request: web.Request) -> None:
    return None


def _reserved(
    app: web.Application, request: web.BaseRequest, handler: Callable[..., web.Response], private: bool
) -> web.Response:
    """A /-/ route: the listener rules always apply; the API key for status and metrics."""
    guard = app[GUARD]
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
    return handler(app)


def _healthy(app: web.Application) -> web.Response:
    return web.json_response({"status": "ok"})


def _ready(app: web.Application) -> web.Response:
    tokens = app[TOKENS]
    token = tokens.usable()
    if token is not None:
        return web.json_response(
            {
                "ready": True,
                "state": tokens.phase.value,
                "token_expires_in_s": round(token.expires_at - tokens.now(), 1),
            }
        )
    reason = tokens.reason()
    return web.json_response(
        {"ready": False, "state": tokens.phase.value, "error": "no_token", "detail": reason, "reason": reason},
        status=503,
        headers={"Retry-After": str(round(tokens.retry_after()))},
    )


def _status(app: web.Application) -> web.Response:
    config = app[CONFIG]
    body = {
        "service": "oauth-sidecar",
        "version": __version__,
        "provider": config.auth.provider,
        "grant_type": config.auth.grant_type,
        "upstream": config.upstream.url,
        "proxy": proxies(config),
        **app[TOKENS].status(),
    }
    if WORKER in app:
        body["worker"] = app[WORKER]
    return web.json_response(body)


def proxies(config: Config) -> dict[str, str | None]:
    """The proxy (host:port, never its credentials) each side goes through, or None for direct."""
    auth_url = config.auth.token_url or config.auth.issuer
    shown: dict[str, str | None] = {}
    for side, url in (("upstream", config.upstream.url), ("token_endpoint", auth_url)):
        try:
            proxy = config.egress("auth" if side == "token_endpoint" else side).for_url(url)
        except ValueError:  # checked when the configuration was loaded; a Config built by hand may skip that
            proxy = None
        shown[side] = proxy.address if proxy is not None else None
    return shown


def _metrics(app: web.Application) -> web.Response:
    body = app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


# path -> (handler, private): private ones (status, metrics) also ask for access.api_key
RESERVED: dict[str, tuple[Callable[[web.Application], web.Response], bool]] = {
    "/-/healthy": (_healthy, False),
    "/-/ready": (_ready, False),
    "/-/status": (_status, True),
    "/-/metrics": (_metrics, True),
}


def log_startup(config: Config) -> None:
    shown = proxies(config)
    event(
        "sidecar.starting",
        version=__version__,
        provider=config.auth.provider,
        upstream=config.upstream.url,
        grant_type=config.auth.grant_type,
        upstream_proxy=shown["upstream"] or "direct",
        token_endpoint_proxy=shown["token_endpoint"] or "direct",
    )
