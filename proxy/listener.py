"""The listener: the TCP site cli.serve() runs, bounded in connections, answering aiohttp's own errors in JSON.

aiohttp has no public hook to choose the per-connection handler class or to refuse a connection before
it gets one, so this module reaches into aiohttp's private attributes. It is the only module that does:

- ``web.Server._loop`` and ``web.Server._kwargs``: to build a :class:`_JsonErrors` handler the way
  ``web.Server.__call__`` builds aiohttp's own;
- ``web.BaseSite._runner``, ``._server`` and ``._backlog``: :class:`LimitedSite` starts its own
  ``loop.create_server`` with its own protocol factory, as ``web.TCPSite.start`` does with aiohttp's;
- ``web.BaseRunner._make_server``, ``._cleanup_server`` and ``._kwargs``: :class:`SidecarRunner` runs an
  Application's lifecycle as ``web.AppRunner`` does, and serves its requests on a low-level
  ``web.Server`` (the proxy's own dispatch, no router or middleware chain).

tests/test_listener.py checks each of them by name, so an aiohttp release that renames one fails there,
and pyproject.toml's aiohttp range is the one that test passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Any

from aiohttp import http_exceptions, web

from .observability import Metrics, event

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

MAX_HEAD_LINE = 16384  # bytes in the request line or one header field; aiohttp's default is 8190
# aiohttp's per-connection handler settings (an Application's handler_args): the head limits above.
HANDLER_ARGS: dict[str, Any] = {"max_field_size": MAX_HEAD_LINE, "max_line_size": MAX_HEAD_LINE}

# A connection refused for being over listen.max_connections may send its request head first; it is
# read (up to this much, for this long) so the client sees the 503 instead of a connection reset.
BUSY_READ_LIMIT = 16384
BUSY_READ_TIMEOUT_S = 2.0
BUSY_LOG_INTERVAL_S = 10.0
# At most this many refused connections wait for their request head at once; beyond it, a refused
# connection is answered and closed at once (it may see a reset instead of the 503), so that a flood of
# silent connections cannot hold more than this many file descriptors.
BUSY_MAX_WAITING = 32

# File descriptors kept free beyond listen.max_connections client connections and upstream.pool_size
# upstream ones: the listening sockets (and the dup kept for answering when out of files), the spare
# descriptor below, the event loop's own (epoll, self-pipe), stdio, the identity provider's pool
# (app.IDP_POOL_SIZE), CA bundles and DNS lookups, and up to BUSY_MAX_WAITING refused connections.
FD_RESERVE = 64
# How often, at most, failed accepts (out of open files or memory) are logged: one line with a count.
ACCEPT_LOG_INTERVAL_S = 5.0
# Out of open files, the listener stops accepting for this long (asyncio's own pause is 1 s), after
# answering the pending connections 503, at most ACCEPT_ANSWER_MAX of them each time.
ACCEPT_RETRY_DELAY_S = 0.25
ACCEPT_ANSWER_MAX = 256
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def raise_open_files_limit() -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit, best effort; the soft limit now in force, or None
    where there is none to know (no ``resource`` module, or unlimited)."""
    if resource is None:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        # macOS refuses an unlimited or too large soft limit (kern.maxfilesperproc); the old one stays.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def connection_cap(max_connections: int, pool_size: int, open_files: int | None) -> int:
    """listen.max_connections, lowered so that it, the upstream pool and FD_RESERVE fit in ``open_files``
    (logged once as ``sidecar.fd_limit`` when lowered). Never below 1."""
    if open_files is None or max_connections + pool_size + FD_RESERVE <= open_files:
        return max_connections
    cap = max(1, open_files - pool_size - FD_RESERVE)
    event(
        "sidecar.fd_limit",
        level=logging.WARNING,
        open_files=open_files,
        max_connections=max_connections,
        pool_size=pool_size,
        reserve=FD_RESERVE,
        connections=cap,
        detail="listen.max_connections + upstream.pool_size + a reserve exceed the open-file limit (ulimit -n); "
        "client connections beyond the lowered cap get 503",
    )
    return cap


class SidecarRunner(web.BaseRunner):
    """Runs ``app``'s lifecycle as ``web.AppRunner`` does (startup, shutdown, cleanup: its cleanup_ctx),
    and answers its requests with ``handler`` on aiohttp's low-level ``web.Server``.

    An Application routes each request through its router, builds a ``web.Request`` with match info and
    runs a middleware chain: per request, more than the proxy's admission checks, token and metrics
    together. The proxy routes four exact paths itself (proxy/app.py, ``Dispatch``), so it needs none of
    that; ``handler`` gets aiohttp's plain ``BaseRequest``. ``kwargs`` are the per-connection settings
    (``keepalive_timeout``, ``handler_cancellation``, ``access_log``...), with :data:`HANDLER_ARGS`.
    """

    __slots__ = ("_app", "_handler")

    def __init__(
        self,
        app: web.Application,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._app, self._handler = app, handler

    @property
    def app(self) -> web.Application:
        return self._app

    async def shutdown(self) -> None:
        await self._app.shutdown()

    async def _make_server(self) -> web.Server:
        self._app.on_startup.freeze()  # as web.AppRunner: startup() sends it; its handlers still set the app's state
        await self._app.startup()
        self._app.freeze()
        return web.Server(self._handler, loop=asyncio.get_running_loop(), **{**HANDLER_ARGS, **self._kwargs})

    async def _cleanup_server(self) -> None:
        await self._app.cleanup()


class LimitedSite(web.BaseSite):
    """A TCP listener that holds at most ``limit`` client connections open at once.

    aiohttp's server accepts connections without bound; each idle keep-alive or slow client holds a
    socket and a handler. Over the limit, a new connection gets ``503`` (JSON, ``Retry-After: 1``)
    and is closed, and ``sidecar.busy`` is logged at most every ``BUSY_LOG_INTERVAL_S``. Under it,
    each connection gets a :class:`_JsonErrors` handler.

    Out of open files anyway, asyncio's own accept loop logs a traceback for every failed ``accept()``,
    up to ``backlog`` of them each time it retries, and leaves the clients waiting. On asyncio's selector
    loop this site accepts by itself (:class:`_Acceptor`): it answers the pending connections 503 on a
    spare descriptor, pauses, and logs ``sidecar.accept_failed`` at most every ``ACCEPT_LOG_INTERVAL_S``.
    On uvloop, libuv does the same with its own spare descriptor (answering nothing, logging nothing).
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        limit: int,
        metrics: Metrics,
        backlog: int | None = None,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, backlog=min(limit if backlog is None else backlog, 4096))
        self._host, self._port, self._limit, self._metrics = host, port, limit, metrics
        self._reuse_port = reuse_port  # listen.workers: each worker's own socket on the one port
        self._refused_since_log = 0
        self._logged_at = -BUSY_LOG_INTERVAL_S
        self._waiting = 0  # refused connections waiting for their request head
        self._acceptor: _Acceptor | None = None

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
            wait = self._waiting < BUSY_MAX_WAITING
            self._waiting += wait
            return _Busy(loop, self._busy_done, wait=wait)

        own_accept = isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)
        self._server = server = await loop.create_server(
            protocol,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
            reuse_port=self._reuse_port or None,
            start_serving=not own_accept,
        )
        if own_accept:
            self._acceptor = _Acceptor(loop, protocol, self._backlog, self._metrics)
            self._acceptor.start(server.sockets)

    async def stop(self) -> None:
        await super().stop()  # closes the listening sockets (and removes the acceptor's readers)
        if self._acceptor is not None:
            self._acceptor.close()

    def _busy_done(self, waited: bool) -> None:
        if waited:
            self._waiting -= 1

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


class _Acceptor:
    """Accepts connections for asyncio's selector loop, as its ``_accept_connection`` does, except when out
    of open files (or memory): then the pending connections are answered 503 and closed on a spare
    descriptor, accepting pauses for ``ACCEPT_RETRY_DELAY_S``, and one ``sidecar.accept_failed`` line (with
    counts) is logged at most every ``ACCEPT_LOG_INTERVAL_S``. The server's ``close()`` removes its readers."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol: Callable[[], asyncio.BaseProtocol],
        backlog: int,
        metrics: Metrics,
    ) -> None:
        self._loop, self._protocol, self._backlog, self._metrics = loop, protocol, backlog, metrics
        self._sockets: list[socket.socket] = []  # our dups of the server's listening sockets
        self._spare: int | None = None
        self._closed = False
        self._failed = self._answered = 0
        self._errors: set[str] = set()
        self._logged_at = -ACCEPT_LOG_INTERVAL_S
        self._flush: asyncio.TimerHandle | None = None

    def start(self, listening: Sequence[Any]) -> None:
        self._spare = _open_spare()
        for server_socket in listening:
            fd = server_socket.fileno()
            sock = socket.fromfd(fd, server_socket.family, server_socket.type)
            sock.setblocking(False)
            sock.listen(self._backlog)  # start_serving=False: the server has not called listen()
            self._sockets.append(sock)
            # On the server's descriptor, so that the server's close() removes it.
            self._loop.add_reader(fd, self._ready, fd, sock)

    def close(self) -> None:
        self._closed = True
        if self._flush is not None:
            self._flush.cancel()
            self._log()
        for sock in self._sockets:
            sock.close()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None

    def _ready(self, fd: int, sock: socket.socket) -> None:
        for _ in range(self._backlog):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise  # the loop logs it, as it does from its own accept loop
                self._out_of_resources(fd, sock, exc)
                return
            conn.setblocking(False)
            self._loop.create_task(self._connect(conn))

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._protocol, conn)
        except OSError:  # the client is already gone
            conn.close()

    def _out_of_resources(self, fd: int, sock: socket.socket, exc: OSError) -> None:
        self._loop.remove_reader(fd)
        self._loop.call_later(ACCEPT_RETRY_DELAY_S, self._resume, fd, sock)
        self._failed += 1
        self._errors.add(errno.errorcode.get(exc.errno or 0, str(exc.errno)))
        self._answered += self._answer_pending(sock)
        if self._loop.time() - self._logged_at >= ACCEPT_LOG_INTERVAL_S:
            self._log()
        elif self._flush is None:  # the count since the last line is logged when the interval is up
            self._flush = self._loop.call_at(self._logged_at + ACCEPT_LOG_INTERVAL_S, self._log)

    def _resume(self, fd: int, sock: socket.socket) -> None:
        if not self._closed:
            self._loop.add_reader(fd, self._ready, fd, sock)

    def _answer_pending(self, sock: socket.socket) -> int:
        """Answer the connections waiting in the listen queue 503 on the spare descriptor, and close them."""
        if self._spare is None:
            self._spare = _open_spare()
            return 0
        os.close(self._spare)
        self._spare = None
        answered = 0
        try:
            for _ in range(ACCEPT_ANSWER_MAX):
                try:
                    conn, _ = sock.accept()
                except OSError:  # none left (BlockingIOError), or the freed descriptor went elsewhere
                    break
                with conn:
                    conn.setblocking(False)
                    with contextlib.suppress(OSError):  # what has arrived, so that closing does not reset
                        conn.recv(BUSY_READ_LIMIT)
                    with contextlib.suppress(OSError):
                        conn.send(_OUT_OF_FILES_RESPONSE)
                answered += 1
        finally:
            self._spare = _open_spare()
        self._metrics.connections_refused.inc(answered)
        return answered

    def _log(self) -> None:
        self._flush = None
        if not self._failed:
            return
        event(
            "sidecar.accept_failed",
            level=logging.WARNING,
            error=",".join(sorted(self._errors)),
            failed=self._failed,
            answered=self._answered,
            detail="out of open files or memory: pending connections are answered 503 and closed; "
            "see listen.max_connections, upstream.pool_size and ulimit -n",
        )
        self._logged_at = self._loop.time()
        self._failed = self._answered = 0
        self._errors.clear()


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None


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
_OUT_OF_FILES_BODY = json.dumps(
    {"error": "too_many_connections", "detail": "the proxy is out of open files; retry"}
).encode()


def _503(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )


_BUSY_RESPONSE = _503(_BUSY_BODY)
_OUT_OF_FILES_RESPONSE = _503(_OUT_OF_FILES_BODY)


class _Busy(asyncio.Protocol):
    """Answers 503 once the request head has arrived (or after a short wait; at once when not ``wait``),
    then closes; ``done(wait)`` when the connection is gone."""

    def __init__(self, loop: asyncio.AbstractEventLoop, done: Callable[[bool], None], *, wait: bool) -> None:
        self._loop, self._done, self._wait = loop, done, wait
        self._seen = 0
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        if self._wait:
            self._timer = self._loop.call_later(BUSY_READ_TIMEOUT_S, self._answer)
        else:
            self._answer()

    def data_received(self, data: bytes) -> None:
        self._seen += len(data)
        if b"\r\n\r\n" in data or self._seen >= BUSY_READ_LIMIT:
            self._answer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None
        self._done(self._wait)

    def _answer(self) -> None:
        transport, self._transport = self._transport, None
        if self._timer is not None:
            self._timer.cancel()
        if transport is not None and not transport.is_closing():
            transport.write(_BUSY_RESPONSE)
            transport.close()
