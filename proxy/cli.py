"""The command line: parse arguments, load the configuration, set up logging, then run one of three things:
the proxy (:func:`serve`; with ``listen.workers`` > 1, that many of them under proxy/workers.py's parent),
a one-time login (:func:`check`, ``--check``) or ``--dev``, which starts proxy/demo.py's identity provider
and API in this process and the proxy in front of them."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from . import __version__
from .app import (
    DISPATCH,
    FORWARDER,
    GUARD,
    METRICS,
    SECRETS,
    TOKENS,
    WORKER,
    idp_ssl_context,
    log_startup,
    make_app,
)
from .config import Config, config_from_mapping, is_loopback_host, load_config, resolve_config_path
from .demo import DemoAPI, DemoIdP
from .errors import ConfigError, TokenRejected, TokenUnavailable
from .idp import IdentityProvider, try_end_session
from .listener import LimitedSite, SidecarRunner, connection_cap, raise_open_files_limit
from .observability import Redactor, event, flush_access_log, setup_logging
from .secrets import HEADER_KEY, SecretWatcher
from .workers import WorkerInfo, run_workers

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
DEV_ACCESS_LIFETIME_S = 120.0  # short, so a refresh shows up in the demo's log within a minute or two
# The drain is serve()'s own, with one deadline (see _drain). What aiohttp's cleanup may still wait after it,
# per connection: by then each request has finished or been cancelled, so this is never more than a moment.
CLEANUP_TIMEOUT_S = 1.0
# How long requests cancelled at the deadline get to unwind (close their upstream connection, log their line).
CANCEL_WAIT_S = 1.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="oauth-sidecar",
        description="A local reverse proxy that logs in to an OAuth identity provider, keeps the access "
        "token fresh and injects it into every request it forwards.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="TOML configuration file (default: $OAUTH_SIDECAR_CONFIG, else ./config.toml, else the environment alone)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the configuration, log in once, print the token's subject and expiry, exit",
    )
    parser.add_argument(
        "--dev",
        action="store_true",
        help="run against a built-in demo identity provider and demo API (no credentials needed)",
    )
    parser.add_argument("--port", type=int, metavar="N", help="listen on this port (overrides listen.port)")
    parser.add_argument("--version", action="version", version=f"oauth-sidecar {__version__}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = parse_args(argv)
    env = os.environ if env is None else env
    try:
        if args.dev:
            return run(_dev(args, env))
        config = load_config(resolve_config_path(args.config, env), env)
        if args.port is not None:
            config = _with_port(config, args.port)
    except ConfigError as exc:
        print(f"oauth-sidecar: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    redactor = setup_logging(config.log.level, config.log.format, config.secrets())
    if args.check:
        return run(check(config))
    if config.listen.workers > 1:
        return run_workers(config, redactor, lambda worker_config, worker: _worker(worker_config, worker, redactor))
    try:
        return run(serve(config, redactor=redactor))
    finally:
        flush_access_log()  # the last batch of access lines, however the run ended


def _worker(config: Config, worker: WorkerInfo, redactor: Redactor) -> int:
    """One of listen.workers, in its forked process: a whole sidecar on its own SO_REUSEPORT socket."""
    try:
        return run(serve(config, redactor=redactor, worker=worker))
    finally:
        flush_access_log()


def run(main_coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed (the `fast` extra), else on asyncio's loop."""
    # Decided before the run, not around it: an exception raised while handling the ImportError would
    # carry it as its __context__, and every traceback from the run would end in "No module named 'uvloop'".
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main_coro)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when uvloop is installed; None (asyncio's own loop) otherwise."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _with_port(config: Config, port: int) -> Config:
    from dataclasses import replace

    if not 0 <= port <= 65535:
        raise ConfigError("--port", "must be between 0 and 65535", "command line")
    return replace(config, listen=replace(config.listen, port=port))


async def serve(
    config: Config,
    *,
    on_listening: Callable[[str], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
    redactor: Redactor | None = None,
    worker: WorkerInfo | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); drain in-flight requests; exit code. SIGHUP reads the
    secret files again (and so does a change to one of them); ``redactor`` learns the new values.
    As one of listen.workers (``worker``), it listens with SO_REUSEPORT and tells the parent when it does."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    watcher: SecretWatcher | None = None

    def reload() -> None:
        if watcher is not None:
            watcher.reload()
        else:  # still starting: the files were just read
            event("sidecar.reloaded", files=len(config.secret_files), changed="none", kept="none")

    handlers: list[tuple[int, Callable[[], object]]] = [(signal.SIGINT, stop.set), (signal.SIGTERM, stop.set)]
    if hasattr(signal, "SIGHUP"):  # not on Windows; elsewhere its default action would end the process
        handlers.append((signal.SIGHUP, reload))
    for sig, handler in handlers:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, handler)
    if worker is not None:  # the parent forked us with these blocked: one sent since was kept for the handlers
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig for sig, _ in handlers})
    log_startup(config)
    # Before listening: as many open files as allowed, and a connection cap that fits in them.
    open_files = raise_open_files_limit()
    limit = connection_cap(config.listen.max_connections, config.upstream.pool_size, open_files)
    app = make_app(config)
    if worker is not None:
        app[WORKER] = {"index": worker.index, "of": worker.count, "pid": os.getpid()}
    runner = SidecarRunner(
        app,
        app[DISPATCH],
        access_log=None,  # we log requests ourselves, without query strings
        handler_cancellation=True,  # a client that disconnects cancels its upstream request
        # A connection with no request under way (idle keep-alive, or a request head still arriving) is
        # closed after this; aiohttp's own default, outside run_app, is an hour.
        keepalive_timeout=config.listen.idle_timeout_s,
        shutdown_timeout=CLEANUP_TIMEOUT_S,
    )
    await runner.setup()
    try:
        site = LimitedSite(
            runner,
            config.listen.host,
            config.listen.port,
            limit=limit,
            metrics=runner.app[METRICS],
            backlog=config.listen.max_connections,  # a queued connection holds no descriptor of ours
            reuse_port=worker is not None,
        )
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        print(
            f"oauth-sidecar: cannot listen on {config.listen.host}:{config.listen.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    tokens, guard = app[TOKENS], app[GUARD]

    def changed(keys: tuple[str, ...]) -> None:
        if "access.api_key" in keys:
            guard.set_api_key(app[SECRETS].config.access.api_key)
        if any(key.startswith(HEADER_KEY) for key in keys):
            app[FORWARDER].set_static_headers(app[SECRETS].config.inject.headers)
        tokens.credentials_changed(keys)

    watcher = SecretWatcher(
        app[SECRETS], redactor=redactor, on_change=changed, refusals=lambda: tokens.counts["rejections"]
    )
    watching = loop.create_task(watcher.run(), name="secret-watcher") if watcher.files else None
    url = _listen_url(runner, config)
    if worker is None:
        event("sidecar.listening", url=url)
        warn_if_exposed(config)
    else:  # the parent logs sidecar.listening once every worker listens
        event("worker.listening", url=url, index=worker.index, pid=os.getpid())
        if worker.index == 0:
            warn_if_exposed(config)
        worker.listening()
    if on_listening is not None:
        result = on_listening(url)
        if asyncio.iscoroutine(result):
            await result
    await stop.wait()
    event("sidecar.stopping", grace_s=config.listen.shutdown_grace_s)
    if watching is not None:
        watching.cancel()
    await _drain(runner, app[FORWARDER].under_way, config.listen.shutdown_grace_s)
    await runner.cleanup()  # the app's cleanup: the token manager stops, the session ends (revoke_on_shutdown)
    flush_access_log()  # the drained requests' lines come before the last one
    event("sidecar.stopped")
    return EXIT_OK


async def _drain(runner: web.BaseRunner, requests: set[asyncio.Task[Any]], grace: float) -> None:
    """Stop listening, let the requests under way finish for ``grace`` seconds, then cancel the rest.

    aiohttp's own drain (``runner.cleanup()`` with ``shutdown_timeout``) waits the timeout for a request to
    finish, then cancels its *body* and waits the timeout again (``RequestHandler.shutdown``): a download,
    which reads no body, was cut only after twice the grace, and Kubernetes' or compose's SIGKILL came
    before the logout. Here one deadline holds for all; a request cut at it is cancelled like one whose
    client went away (its connection is closed).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    for site in list(runner.sites):
        await site.stop()  # new connections are refused from now on
    if runner.server is not None:
        runner.server.pre_shutdown()  # keep-alive connections close: idle ones now, busy ones after their answer
    while requests and (left := deadline - loop.time()) > 0:
        await asyncio.wait(set(requests), timeout=left)
    cut = set(requests)
    for task in cut:
        task.cancel()
    if cut:
        await asyncio.wait(cut, timeout=CANCEL_WAIT_S)


def _listen_url(runner: web.BaseRunner, config: Config) -> str:
    port = config.listen.port
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            port = address[1]
            break
    host = config.listen.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}"


def warn_if_exposed(config: Config) -> None:
    access = config.access
    if not is_loopback_host(config.listen.host) and not (access.api_key or access.allow_clients):
        event(
            "sidecar.exposed",
            level=logging.WARNING,
            detail=f"listening on {config.listen.host}, beyond loopback, with neither access.api_key nor "
            "access.allow_clients set: anyone who can reach this port can call the API as this account",
        )


async def check(config: Config) -> int:
    """Log in once and print who we are and until when; never the token."""
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=idp_ssl_context(config)),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    async with session:
        idp = IdentityProvider(session, config.auth, config.inject, egress=config.egress("auth"))
        try:
            token = await idp.login()
        except (TokenRejected, TokenUnavailable) as exc:
            print(f"oauth-sidecar: check failed: {exc.detail}", file=sys.stderr)
            return EXIT_FAILURE
        # A check run as an init step should not leave a session behind when the user asked for
        # sessions to be ended; a failure here does not fail the check (the login worked).
        session_note = ""
        if config.auth.revoke_on_shutdown:
            ended, what = await try_end_session(idp, token)
            session_note = f"; session ended ({what})" if ended else f"; ending the session failed ({what})"

    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(token.wall_expires_at))
    print(
        f"ok: logged in to {config.auth.provider} as {token.subject or '(no subject)'}; token {token.id} "
        f"expires in {token.lifetime:.0f}s (at {expires}); "
        f"refresh token: {'yes' if token.refresh_token else 'no'}{session_note}"
    )
    return EXIT_OK


async def _dev(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """The embedded default: demo identity provider and demo API on loopback, the proxy in front."""
    # A fresh random password: the redaction filter masks configured secrets wherever they appear,
    # and "demo" would also mask the user name and the realm in every log line.
    password = secrets.token_urlsafe(16)
    idp = DemoIdP(users={"demo": password}, access_lifetime_s=DEV_ACCESS_LIFETIME_S)
    api = DemoAPI(idp)
    runners = []
    urls = []
    for app in (idp.app(), api.app()):
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
    idp.base_url = urls[0]
    port = args.port if args.port is not None else int(env.get("OAUTH_SIDECAR_LISTEN_PORT", "8360"))
    config = config_from_mapping(
        {
            "listen": {"port": port},
            "upstream": {"url": urls[1]},
            "auth": {
                "provider": "keycloak",
                "token_url": idp.token_url(),
                "client_id": "demo-client",
                "username": "demo",
                "password": password,
            },
        },
        source="--dev",
    )
    redactor = setup_logging(
        env.get("OAUTH_SIDECAR_LOG_LEVEL", "info"), env.get("OAUTH_SIDECAR_LOG_FORMAT", "text"), config.secrets()
    )

    def announce(url: str) -> None:
        print(
            f"oauth-sidecar --dev: demo identity provider at {urls[0]}, demo API at {urls[1]}\n"
            f"proxy listening on {url} (user 'demo', tokens live {DEV_ACCESS_LIFETIME_S:.0f}s)\n"
            f"try:  curl {url}/v1/hello\n"
            f"      curl '{url}/v1/report?rows=5'\n"
            f"      curl {url}/-/status",
            flush=True,
        )

    try:
        return await serve(config, on_listening=announce, redactor=redactor)
    finally:
        for runner in runners:
            await runner.cleanup()
