"""make_app(config): the aiohttp application, its client sessions, its token manager, its routes.

Two clients live for the life of the app, created and closed in ``cleanup_ctx``: the upstream's
connection pool (proxy/upstream.py) and a small aiohttp session for the identity provider, so that a
token refresh never queues behind a hundred streaming downloads for a connection.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
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
from .listener import MAX_HEAD_LINE
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
    app = web.Application(
        handler_args={"max_field_size": MAX_HEAD_LINE, "max_line_size": MAX_HEAD_LINE},
        middlewares=[_non_path_targets],
    )
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[GUARD] = Guard(config.listen, config.access)
    app[SECRETS] = Secrets(config)
    app.cleanup_ctx.append(_clients(manager_options))

    for name, handler in (
        ("healthy", _healthy),
        ("ready", _ready),
        ("status", _status),
        ("metrics", _metrics),
    ):
        app.router.add_route("*", f"/-/{name}", _reserved(handler, private=name in ("status", "metrics")))
    # Every other path is forwarded. aiohttp matches the decoded path, and "." does not match a newline:
    # with "/{tail:.*}", /a%0Ab got aiohttp's plain-text 404. The raw path still goes upstream as sent.
    app.router.add_route("*", r"/{tail:[\s\S]*}", _forward)
    return app


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
                "token_expires_in_s": round(token.expires_at - tokens.now(), 1),
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
        "proxy": proxies(config),
        **request.app[TOKENS].status(),
    }
    if WORKER in request.app:
        body["worker"] = request.app[WORKER]
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


def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


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
