"""Helpers that start the fakes and a proxy in front of them, all on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import DISPATCH, make_app
from proxy.config import Config, config_from_mapping
from proxy.demo import DemoAPI, DemoIdP
from proxy.listener import SidecarRunner

ServerFactory = Callable[..., Awaitable[TestServer]]
ClientFactory = Callable[..., Awaitable[TestClient]]
IdP = TypeVar("IdP", bound=DemoIdP)

# Backoff policies that keep tests fast: a few tens of milliseconds instead of seconds or minutes.
FAST_BACKOFF: dict[str, Any] = {
    "transient_backoff": lambda attempt, rand, retry_after=None: 0.05,
    "rejected_backoff": lambda attempt, rand: 0.2,
}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        if isinstance(values, dict):
            out.setdefault(section, {}).update(values)
        else:
            out[section] = values
    return out


async def start_idp(aiohttp_server: ServerFactory, **options: Any) -> DemoIdP:
    return await serve_idp(aiohttp_server, DemoIdP(**options))


async def serve_idp(aiohttp_server: ServerFactory, idp: IdP) -> IdP:
    """Serve ``idp`` (a DemoIdP or one of the fakes built on it) on 127.0.0.1; sets its base_url."""
    server = await aiohttp_server(idp.app())
    idp.base_url = str(server.make_url("")).rstrip("/")
    return idp


async def start_api(aiohttp_server: ServerFactory, idp: DemoIdP, **options: Any) -> tuple[DemoAPI, str]:
    api = DemoAPI(idp, **options)
    server = await aiohttp_server(api.app())
    return api, str(server.make_url("")).rstrip("/")


async def start_app(aiohttp_server: ServerFactory, app: web.Application) -> str:
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


def proxy_config(token_url: str, upstream_url: str, **sections: dict[str, Any]) -> Config:
    """A Keycloak-dialect proxy config (client demo-client, user demo) pointed at any token endpoint and
    upstream, with per-section overrides."""
    base = {
        "listen": {"port": 0},
        "upstream": {"url": upstream_url},
        "auth": {
            "provider": "keycloak",
            "token_url": token_url,
            "client_id": "demo-client",
            "username": "demo",
            "password": "demo",
        },
    }
    return config_from_mapping(deep_merge(base, sections), source="test")


def keycloak_config(idp: DemoIdP, upstream_url: str, **sections: dict[str, Any]) -> Config:
    """A proxy config for the demo Keycloak-like provider ``idp``, with per-section overrides."""
    return proxy_config(idp.token_url(), upstream_url, **sections)


# Manager options for a test whose second login is incidental: logins spaced 50 ms apart instead of
# state.MIN_LOGIN_INTERVAL_S (1 s), which it would wait for while asserting nothing about the spacing. The
# spacing itself is tested at its real value (test_state, test_tokens): never use this where a test asserts
# how far apart logins are, or reads MIN_LOGIN_INTERVAL_S.
QUICK_LOGINS: dict[str, Any] = {"min_login_interval_s": 0.05}


class SidecarTestServer(TestServer):
    """The proxy app served the way ``oauth-sidecar`` serves it (proxy/cli.py): a SidecarRunner answering
    with the app's Dispatch on aiohttp's low-level server, not the Application's router."""

    async def _make_runner(self, **kwargs: Any) -> SidecarRunner:
        return SidecarRunner(self.app, self.app[DISPATCH], access_log=None, **kwargs)


async def start_proxy(aiohttp_client: ClientFactory, config: Config, **manager_options: Any) -> TestClient:
    """The proxy under a test client, served as ``oauth-sidecar`` serves it (handler_cancellation on, as
    there); backoffs are fast unless given."""
    options = {**FAST_BACKOFF, **manager_options}
    return await aiohttp_client(SidecarTestServer(make_app(config, **options)))
