"""The upstream client: keep-alive HTTP/1.1 connections on asyncio transports, parsed by httptools.

Why not aiohttp's ClientSession: profiled under load (bench/), about half the proxy's CPU per request
went to the client side (request objects, header re-encoding, timers, a task and several futures per
request). A reverse proxy to one origin needs much less: a pool of keep-alive connections, the
request head written as bytes the client sent (never decoded and re-encoded), the response parsed
by llhttp (httptools) straight into a list of raw headers and body chunks, flow control both ways.

Theory of operation: a :class:`Connection` is an ``asyncio.Protocol`` that carries one exchange at
a time; what the exchange may do next is its :class:`~proxy.wire.ExchangeState` (proxy/wire.py, no
I/O), which this module moves from what the transport and llhttp report. :meth:`Pool.request`
takes an idle connection (or opens one, at most ``limit``; beyond that it waits, bounded by
``timeout_s``), writes the head and the body by the framing its caller decided, and returns an
:class:`Exchange` once the final response head has arrived. Body chunks collect in the protocol;
the transport stops reading when more than ``HIGH_WATER`` bytes wait, and resumes when the reader
has taken them, so a slow client slows the upstream instead of filling memory. Each exchange has a
fresh llhttp parser; bytes past the end of a response are never parsed or relayed and close the
connection. A connection goes back to the pool only when both directions are done and both sides
allow keep-alive (``ExchangeState.reusable``).

Through an HTTP proxy (``proxy``, decided by proxy/egress.py): an https:// upstream is reached
through a ``CONNECT`` tunnel, one per connection, with TLS started on the tunnel
(``loop.start_tls``) and verified against the upstream's own name (SNI too), so the proxy sees only
ciphertext; a plain http:// upstream gets absolute-form requests sent to the proxy. The proxy's answer
to CONNECT is read strictly (a bounded head, 200 only); anything else is a 502 naming its status,
never relaying its body. The pool serves one (proxy, upstream) pair, so its connections are per pair.

``timeout_s`` counts time with no byte moving in either direction (:class:`_Idle`): a response head
that does not come is a 504, a body that stops is cut, a body that keeps moving is never cut.

Errors leave as the proxy's own: :class:`UpstreamUnreachable` (connect, TLS, a reset before the
response head, a response that cannot be delimited), :class:`UpstreamTimeout` (connect timeout,
or ``timeout_s`` before the head), and :class:`BodyInterrupted` from :meth:`Exchange.read` when the
upstream fails mid-body (the caller must then cut its client's connection, never present a short
body as whole).
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

import httptools
from yarl import URL

from .client_auth import describe_tls_refusal
from .egress import EgressProxy, refusal
from .errors import RequestRefused, UpstreamTimeout, UpstreamUnreachable
from .wire import (
    NO_BODY,
    Body,
    ExchangeState,
    Framing,
    Phase,
    WireError,
    head_response_reusable,
    length,
    persistent,
    response_framing,
)

# Pause reading from the upstream when this many body bytes wait for the client.
HIGH_WATER = 512 * 1024
# Close a pooled connection idle for longer than this: servers commonly drop idle keep-alive
# connections after 5-75 s (nginx 75 s, Node 5 s, uvicorn 5 s); reusing one they are closing costs a
# retry, or a lost POST. An upstream announcing less (Keep-Alive: timeout=N) gets less: _idle_limit.
KEEPALIVE_S = 4.0
# Request bodies that stream (unknown or large size) are sent in chunks of at most this size.
WRITE_CHUNK = 256 * 1024
HeaderList = list[tuple[bytes, bytes]]
# A response head larger than this, or with more header lines, is refused (502): httptools sets no
# limit of its own, and every byte of it would be held in memory and copied to the client.
MAX_RESPONSE_HEAD = 64 * 1024
MAX_RESPONSE_HEADERS = 256
# What may arrive before the head is complete, beyond MAX_RESPONSE_HEAD of names and values: line ends,
# ": ", the status line, 1xx heads. Past it the exchange fails even inside one endless line.
MAX_HEAD_SLACK = 16 * 1024
# 1xx responses skipped before the final one (103 Early Hints, 100 Continue): an upstream sending them
# without end would otherwise hold the request, its bytes "moving", for good.
MAX_INFORMATIONAL = 16
# A request lost on a reused connection is sent again only when repeating it is harmless (RFC 9110
# §9.2.2): the upstream may have read a POST and acted on it before closing without an answer.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# A proxy's answer to CONNECT is a status line and a few headers (tinyproxy's and squid's: under 200
# bytes); one larger than this is refused rather than buffered.
MAX_TUNNEL_HEAD = 8 * 1024
_TUNNEL_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [\t\x20-\x7e\x80-\xff]*)?")
_TUNNEL_FIELD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*")


class BodyStream(Protocol):
    """A request body that arrives over time (the client's, paced by the forwarder)."""

    async def readany(self) -> bytes: ...


Body_ = bytes | BodyStream | None


class BodyInterrupted(Exception):
    """The upstream connection failed after the response head: the body is incomplete."""


class _Retry(Exception):
    """A reused connection was closed by the upstream before it answered: try a fresh one."""


class _PastTheResponse(Exception):
    """Raised inside llhttp's callbacks to stop it at bytes that follow the response."""


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to the upstream, one exchange at a time.

    What the exchange may do next is :attr:`state` (proxy/wire.py); this class moves it from what
    the transport and llhttp report, and holds the response's head and body bytes for the reader.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: Callable[[], float]) -> None:
        self._loop = loop
        self._clock = clock
        self.transport: asyncio.Transport | None = None
        self.state = ExchangeState()
        self.closed = False
        self.active = False  # an exchange is under way (else any byte from the upstream is a violation)
        self.reused = False
        self.used_at = 0.0  # the pool's clock, when it last went idle
        self.idle_limit = KEEPALIVE_S  # reused only while idle for less than this (see _idle_limit)
        self.moved_at = 0.0  # the loop's clock, when a byte last moved either way (upstream.timeout_s)
        self._drain: asyncio.Future[None] | None = None
        self._paused_writing = False
        self._parser_dirty = True
        self._reset("GET")

    def _reset(self, method: str) -> None:
        self._method = method
        if self._parser_dirty:
            # The last response ended where llhttp could not see it (a Content-Length body taken past it, a
            # HEAD's head): it would read the next response as that body. Else llhttp ended the message
            # itself and is clean for the next one, as it is designed to be on a keep-alive connection.
            self._parser = httptools.HttpResponseParser(self)
            self._parser_dirty = False
        self.status = 0
        self.reason = b""
        self.headers: HeaderList = []
        self.head_bytes = 0  # bytes fed to llhttp before the final head ended (a bound on what it buffers)
        self.header_bytes = 0
        self.trailer_bytes = 0
        self.informational = 0
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.remaining = 0  # body bytes still due, when framed by Content-Length
        self.error: BaseException | None = None
        self.got_bytes = False
        # A 101 Switching Protocols to a request that asked for it (Pool.request(upgrade=True)): the bytes
        # after its head belong to the new protocol, kept in ``tail`` until Exchange.detach hands them over.
        self.upgrade = False
        self.switched = False
        self._switching = False
        self.tail = b""
        self._waiter: asyncio.Future[None] | None = None
        # Exchange.pipe: the body goes to this as it arrives, from the transport's callback; it returns False
        # when its receiver is full (reading pauses until the pipe has drained it).
        self.sink: Callable[[bytes], bool] | None = None
        if getattr(self, "_paused_reading", False) and self.transport is not None and not self.closed:
            # The last response was complete but released unread while its buffer held reading off (a 401
            # before its retry, a client gone): the next exchange must hear its own answer.
            self.transport.resume_reading()
        self._paused_reading = False

    @property
    def complete(self) -> bool:
        """The whole response has arrived."""
        return self.state.response is Phase.DONE

    @property
    def head_done(self) -> bool:
        """The final response head has arrived (``status`` is set only then)."""
        return self.status != 0

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.switched:  # the new protocol's bytes, before Exchange.detach handed the transport over
            self.tail += data
            return
        if not self.active:  # nothing was asked: a server talking on an idle connection
            self._abort()
            return
        self.got_bytes = True
        self.moved_at = self._loop.time()
        state = self.state
        if state.response is not Phase.SEND_BODY or state.response_framing.body is not Body.LENGTH:
            if state.response is Phase.DONE:  # the response is whole: these bytes belong to no exchange
                self._past_the_response()
                return
            self._feed(data)
            return
        # The rest of a Content-Length body: llhttp would only count it, and httptools would copy every
        # chunk into new bytes on the way; take it as it came (a copy less per 256 KiB while streaming).
        self._parser_dirty = True  # this body goes past llhttp, which still expects it
        remaining = self.remaining
        extra = len(data) > remaining
        if extra:
            data = data[:remaining]
        self.remaining = remaining - len(data)
        self._add_body(data)
        if self.remaining == 0:
            state.response_ended()
            self._wake()
        if extra:
            self._past_the_response()

    def _feed(self, data: bytes) -> None:
        in_head = self.status == 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:  # not a parse error: llhttp stops at a 101 Switching Protocols
            if self.upgrade and self._switching:
                # The switch this exchange asked for: what follows the head is the new protocol's, not HTTP.
                self.status = 101
                self.switched = True
                self.tail = data[exc.args[0] :] if exc.args and isinstance(exc.args[0], int) else b""
                if self.transport is not None:
                    self.transport.pause_reading()  # until the caller takes the transport over
                self._wake()
                return
            self._fail(ConnectionError("the upstream switched protocols (101); the proxy forwards plain HTTP only"))
            return
        except httptools.HttpParserError as exc:
            if self.state.response is Phase.DONE:  # llhttp was stopped (or choked) past the response's end
                self._past_the_response()
                return
            if self.error is None:
                reason = exc.__cause__ or exc.__context__ or exc
                detail = (
                    f"a response it cannot relay: {reason}"
                    if isinstance(reason, WireError)
                    else f"a malformed response ({exc})"
                )
                self._fail(ConnectionError(f"the upstream sent {detail}"))
            else:
                self._fail(self.error)
            return
        if in_head and self.status == 0:
            # httptools hands a line over only once it ends, buffering it until then: a status or header
            # line without end would grow without bound before on_header saw it. Count what it holds.
            self.head_bytes += len(data)
            if self.head_bytes > MAX_RESPONSE_HEAD + MAX_HEAD_SLACK:
                self._fail(ConnectionError(f"the upstream sent a response head over {MAX_RESPONSE_HEAD // 1024} KiB"))

    def _past_the_response(self) -> None:
        """Bytes after a complete response: dropped unread, and the connection is closed, never reused."""
        self.state.extra_bytes()
        self._abort()
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.active:
            before = self.state.response
            if exc is None:
                self.state.connection_closed()
            else:  # a reset: a body delimited by the close is not known to be whole
                self.state.abort()
            if self.state.response is Phase.ERROR and self.error is None and before is not Phase.DONE:
                self.error = exc or ConnectionResetError("the upstream closed the connection")
        self._wake()
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("the upstream closed the connection"))

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # --- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.state.response is Phase.DONE:  # a second response in the same bytes: never parsed
            raise _PastTheResponse

    def on_status(self, status: bytes) -> None:
        self.reason = self.reason + status if self.reason else status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.state.response is not Phase.IDLE:
            # A trailer field (after a chunked body): never merged into the head (RFC 9110 §6.5.1), and
            # bounded like a head, so an endless trailer section cannot grow memory.
            self.trailer_bytes += len(name) + len(value)
            if self.trailer_bytes > MAX_RESPONSE_HEAD:
                self.error = ConnectionError(f"the upstream sent trailers over {MAX_RESPONSE_HEAD // 1024} KiB")
                raise ValueError("trailers too large")
            return
        self.headers.append((name, value))
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_RESPONSE_HEAD or len(self.headers) > MAX_RESPONSE_HEADERS:
            self.error = ConnectionError(
                f"the upstream sent a response head over {MAX_RESPONSE_HEAD // 1024} KiB "
                f"or {MAX_RESPONSE_HEADERS} header lines"
            )
            raise ValueError("response head too large")  # stops llhttp; _feed fails the exchange

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        state = self.state
        if status < 100:  # llhttp reads any three digits: "000" is no status
            self.error = ConnectionError(f"the upstream sent an invalid status code ({status:03d})")
            raise ValueError("invalid status")  # stops llhttp; _feed fails the exchange
        if status == 101 and self.upgrade:  # the switch asked for: completed in _feed, where llhttp stops
            self._switching = True
            return
        if 100 <= status < 200:  # 1xx (103 Early Hints, a stray 100 Continue): not the answer
            state.informational()
            self.headers, self.reason, self.header_bytes = [], b"", 0
            self.informational += 1
            if self.informational > MAX_INFORMATIONAL:
                self.error = ConnectionError(
                    f"the upstream sent over {MAX_INFORMATIONAL} informational (1xx) responses"
                )
                raise ValueError("too many 1xx responses")  # stops llhttp; _feed fails the exchange
            return
        content_length = transfer_encoding = connection = None
        idle_limit = KEEPALIVE_S
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length":
                content_length = value
            elif lowered == b"transfer-encoding":
                transfer_encoding = value if transfer_encoding is None else transfer_encoding + b"," + value
            elif lowered == b"keep-alive":
                idle_limit = _idle_limit(value)
            elif lowered == b"connection":
                connection = value if connection is None else connection + b"," + value
        framing = response_framing(self._method, status, content_length, transfer_encoding)  # WireError: refused
        self.status = status
        self.idle_limit = idle_limit
        if framing.body is Body.NONE:
            # llhttp does not know a HEAD's answer has no body: without a length it expects one read to
            # the close, and calls that not keep-alive. Here the HTTP version and Connection decide.
            keep_alive = persistent(self._parser.get_http_version(), connection)
            if self._method == "HEAD" and not head_response_reusable(content_length, transfer_encoding):
                keep_alive = False
        else:
            keep_alive = self._parser.should_keep_alive()
        state.response_head(framing, keep_alive=keep_alive)
        if framing.body is Body.LENGTH:
            self.remaining = framing.length
        if self._method == "HEAD":
            self._parser_dirty = True  # llhttp would wait for the body its Content-Length announces
        self._wake()

    def on_body(self, body: bytes) -> None:
        state = self.state
        if state.response is not Phase.SEND_BODY:  # a body for HEAD, 204 or 304: past the response
            raise _PastTheResponse
        if state.response_framing.body is Body.LENGTH:
            self.remaining -= len(body)
        self._add_body(body)

    def _add_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is not None:
            try:
                ready = sink(body)
            except Exception as exc:  # the receiving side failed: this exchange ends, not the transport's callback
                self._fail(exc)
                return
            if not ready and not self._paused_reading and self.transport is not None:
                self._paused_reading = True
                self.transport.pause_reading()
                self._wake()
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.state.response is Phase.SEND_BODY:  # else a 1xx, or a response already ended at its head
            self.state.response_ended()
            self._wake()

    # --- used by Pool and Exchange ---------------------------------------------------------------

    def begin(self, method: str, framing: Framing, upgrade: bool = False) -> None:
        self._reset(method)
        self.upgrade = upgrade
        self.state.send_head(framing)
        self.active = True
        self.moved_at = self._loop.time()

    def body_sent(self) -> None:
        if self.state.request is Phase.SEND_BODY:
            self.state.request_ended()

    def sent(self, sender: asyncio.Task[None]) -> None:
        """The request body was copied, or copying it failed (the client went away, or was too slow)."""
        if sender.cancelled():
            if self.state.request is Phase.SEND_BODY:
                if self.head_done and self.state.response is not Phase.ERROR:
                    # Stopped on purpose after the answer came (an early 413): the answer is still read to
                    # its end; only the connection is spent.
                    self.state.abandon_request()
                else:
                    self._fail(ConnectionResetError("the request body was not sent whole"))
            return
        exc = sender.exception()
        if exc is not None:
            self._fail(exc)
        else:
            self.body_sent()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        """This exchange is over: the connection is closed; an unfinished response is an error."""
        if self.error is None and not self.complete:
            self.error = exc
        self.state.abort()
        self._abort()
        self._wake()

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    async def wait(self) -> None:
        """Until something changes: head, body, completion or failure."""
        self._waiter = waiter = self._loop.create_future()
        await waiter

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("the upstream closed the connection")
        if self._paused_writing:
            self._drain = drain = self._loop.create_future()
            await drain

    def take(self) -> bytes:
        """Every body byte received so far; resume reading if it was paused."""
        chunks = self.take_pieces()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def take_pieces(self) -> list[bytes]:
        """Every body byte received so far, as the pieces it arrived in; resume reading if it was paused."""
        chunks = self.chunks
        self.chunks = []
        self.buffered = 0
        self.moved_at = self._loop.time()
        if self._paused_reading and self.transport is not None and not self.closed:
            self._paused_reading = False
            self.transport.resume_reading()
        return chunks

    def reusable(self) -> bool:
        return not self.closed and self.state.reusable()


class Exchange:
    """The upstream's response: status, raw headers, its framing, and the body to read in chunks."""

    __slots__ = ("_conn", "_ended", "_pool", "_sender", "_timer", "framing", "headers", "reason", "status")

    def __init__(self, pool: Pool, conn: Connection, timer: _Idle, sender: asyncio.Task[None] | None = None) -> None:
        self._pool = pool
        self._conn = conn
        self._timer: _Idle | None = timer
        self._sender = sender  # the request body still being sent, if the answer came first
        self._ended = False  # released with its whole body read (else a read after the release is a failure)
        self.status = conn.status
        self.reason = conn.reason.decode("latin-1")  # the bytes as received, one char each
        self.headers = conn.headers
        self.framing = conn.state.response_framing  # decided once, from the head (proxy/wire.py)

    @property
    def complete(self) -> bool:
        """The whole body has arrived (it can be taken at once with :meth:`read`)."""
        return self._conn.complete

    def take(self) -> bytes:
        """Every body byte received so far, without waiting (all of it once :attr:`complete`)."""
        return self._conn.take() if self._conn.chunks else b""

    async def read(self) -> bytes:
        """The next body bytes; b"" at the end. Raises :class:`BodyInterrupted` on a failure."""
        conn = self._conn
        while not self._released():
            if conn.chunks:
                return conn.take()
            if conn.complete:
                self.release()
                return b""
            if conn.error is not None or conn.state.response is Phase.ERROR:
                raise BodyInterrupted(
                    _describe(conn.error or ConnectionResetError("the upstream closed the connection"))
                )
            await conn.wait()
        return b""

    async def pipe(self, write: Callable[[bytes], bool], drain: Callable[[], Awaitable[None]]) -> None:
        """Hand the rest of the body to ``write`` as it arrives, from the transport's own callback: no copy
        to join pieces, no task switch per piece. ``write`` returns False when its receiver wants no more
        for now: reading pauses until ``drain()`` returns. Returns once the whole body went to ``write``
        (the response is released); raises :class:`BodyInterrupted` on a failure, and what ``drain``
        raises (a client gone, a timeout)."""
        conn = self._conn
        if self._released():
            return
        ready = True
        for piece in conn.take_pieces():
            ready = write(piece) and ready
        conn.sink = write
        try:
            if not ready and not conn.complete and conn.transport is not None:
                conn._paused_reading = True
                conn.transport.pause_reading()
            while True:
                if conn.complete:
                    self.release()
                    return
                if conn.error is not None or conn.state.response is Phase.ERROR:
                    raise BodyInterrupted(
                        _describe(conn.error or ConnectionResetError("the upstream closed the connection"))
                    )
                if conn._paused_reading:
                    await drain()
                    conn.moved_at = conn._loop.time()
                    if conn._paused_reading and conn.transport is not None and not conn.closed:
                        conn._paused_reading = False
                        conn.transport.resume_reading()
                else:
                    await conn.wait()
        finally:
            conn.sink = None

    def discard(self) -> None:
        """Done with this response, unread: its connection is closed."""
        self._conn._abort()
        self.release()

    def release(self) -> None:
        """Done with this response: back to the pool when both directions are done, else closed."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._ended = self._conn.complete
            if self._sender is not None:
                self._sender.cancel()  # a no-op once the body was sent
                self._sender = None
            self._pool.release(self._conn)

    def _released(self) -> bool:
        """Released (or detached): the connection may be another exchange's by now, so nothing of it is read
        again. True when the body had ended by then; else a read is a failure, never an early end."""
        if self._timer is not None:
            return False
        if self._ended:
            return True
        raise BodyInterrupted("the response was released before its end")

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """After a 101 Switching Protocols (``Pool.request(upgrade=True)``): the connection leaves the pool for
        good, as a raw byte stream. Returns its transport, reading paused, and the bytes that came after the
        101's head. The caller sets its own protocol on the transport (``transport.set_protocol``), resumes
        reading and closes it in the end; the pool no longer counts it (``upstream.pool_size`` bounds pooled
        HTTP connections). UpstreamUnreachable if the connection is already gone."""
        conn = self._conn
        if self.status != 101 or not conn.switched or self._timer is None:
            raise WireError("only a 101 Switching Protocols, once, can be detached")
        self._timer.cancel()
        self._timer = None
        conn.switched = False
        conn.active = False
        self._pool._detached(conn)
        transport = conn.transport
        if conn.closed or transport is None or transport.is_closing():
            raise UpstreamUnreachable("the upstream closed the connection right after switching protocols")
        tail, conn.tail = conn.tail, b""
        return transport, tail


class _Idle:
    """upstream.timeout_s for one exchange: fires when no byte has moved either way for that long.

    One timer per exchange, re-armed only when it fires early (bytes moved meanwhile): the hot path
    only stores the loop's time in ``Connection.moved_at``."""

    __slots__ = ("_conn", "_handle", "_loop", "_timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: Connection, timeout: float) -> None:
        self._loop, self._conn, self._timeout = loop, conn, timeout
        self._handle: asyncio.TimerHandle | None = loop.call_at(conn.moved_at + timeout, self._check)

    def _check(self) -> None:
        conn = self._conn
        due = conn.moved_at + self._timeout
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self._handle = None
        conn._fail(TimeoutError("upstream.timeout_s elapsed with no byte moving"))

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Pool:
    """Keep-alive connections to the one upstream origin, at most ``limit`` open at a time; through
    ``proxy`` when one is given (every connection then goes through it)."""

    def __init__(
        self,
        url: str,
        *,
        limit: int,
        connect_timeout_s: float,
        timeout_s: float,
        ssl_context: ssl.SSLContext | None,
        clock: Callable[[], float] = time.monotonic,
        proxy: EgressProxy | None = None,
    ) -> None:
        base = URL(url)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._host = base.host or "localhost"
        self._port = base.port or (443 if base.scheme == "https" else 80)
        self._ssl = ssl_context if base.scheme == "https" else None
        netloc = base.raw_host or self._host
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if not base.is_default_port():
            netloc += f":{self._port}"
        self.host_header = (b"Host", netloc.encode("idna" if not netloc.isascii() else "ascii"))
        self._proxy = proxy
        self._tunnel = proxy is not None and self._ssl is not None
        raw_host = base.raw_host or self._host
        self._authority = f"[{raw_host}]:{self._port}" if ":" in raw_host else f"{raw_host}:{self._port}"
        credentials = proxy.authorization if proxy is not None else None
        proxy_line = b"Proxy-Authorization: %s\r\n" % credentials.encode("ascii") if credentials else b""
        authority = self._authority.encode("idna" if not self._authority.isascii() else "ascii")
        self._connect_head = b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (authority, authority, proxy_line)
        # A plain http:// upstream through a proxy: absolute-form targets (RFC 9112 §3.2.2), and the proxy's
        # credentials on every request (never sent on a tunnel, where only the upstream would read them).
        self._origin: bytes | None = (
            b"http://" + self.host_header[1] if proxy is not None and not self._tunnel else None
        )
        self._proxy_line = proxy_line
        self._limit = max(1, limit)
        self._connect_timeout = connect_timeout_s
        self._timeout = timeout_s
        self._clock = clock  # idle reuse (KEEPALIVE_S, Keep-Alive: timeout=N); tests pass a fake one
        self._idle: list[Connection] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        """Requests waiting for a connection (pool_size reached)."""
        return len(self._waiters)

    @property
    def idle_in_use(self) -> int:
        """Idle connections that still have an exchange under way: a leak, always 0."""
        return sum(1 for conn in self._idle if conn.active)

    # --- the one public operation ----------------------------------------------------------------

    async def request(
        self,
        method: str,
        head: bytes,
        body: Body_,
        last: Callable[[], bytes] | None = None,
        *,
        framing: Framing | None = None,
        upgrade: bool = False,
    ) -> Exchange:
        """Send ``head`` (request line and headers, ending in a blank line) and ``body``.

        ``framing`` is how ``head`` frames the body (proxy/wire.py), decided by whoever built the head
        from the parsed request; the pool writes the body by it and never looks inside the head. It may
        be omitted for no body (NO_BODY) or a bytes body (its length). A stream that ends before its
        Content-Length, or would run past it, fails the exchange and closes the connection.
        With ``last``, ``head`` ends before the blank line, and ``last()``, called once a connection is
        ready, gives the head's end: the proxy puts the token there, so a request that waited for a
        connection leaves with the token current then, not one that expired while it waited. What
        ``last()`` raises (no usable token) leaves the connection unused, back in the pool.
        With ``upgrade`` (a WebSocket handshake), a 101 Switching Protocols is an answer (else a 502), and
        the returned Exchange is :meth:`Exchange.detach`-ed by the caller.
        """
        if framing is None:
            if body is not None and not isinstance(body, bytes | bytearray):
                raise WireError("a streamed body needs its framing")
            framing = NO_BODY if body is None else length(len(body))
        elif isinstance(body, bytes | bytearray) and framing != length(len(body)):
            raise WireError("a bytes body is framed by its own length")
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        deadline = loop.time() + self._timeout
        if self._origin is not None:
            head = self._absolute_form(head)
        for attempt in range(2):
            conn = self._idle_connection() or await self._acquire(loop, deadline)
            try:
                whole = head if last is None else head + last()
            except BaseException:
                self._put_back(conn)
                raise
            try:
                exchange = await self._exchange(
                    loop, conn, method, whole, body, framing, retry=attempt == 0, upgrade=upgrade
                )
            except _Retry:
                continue
            if exchange.status == 407 and self._origin is not None and self._proxy is not None:
                exchange.discard()  # the proxy's own answer, not the upstream's: never relayed
                raise UpstreamUnreachable(f"cannot reach the upstream: {refusal(self._proxy, 407, self._authority)}")
            return exchange
        raise UpstreamUnreachable("the upstream closed the connection before answering")

    async def _exchange(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: Connection,
        method: str,
        head: bytes,
        body: Body_,
        framing: Framing,
        retry: bool,
        upgrade: bool = False,
    ) -> Exchange:
        conn.begin(method, framing, upgrade)
        timer = _Idle(loop, conn, self._timeout)
        sender: asyncio.Task[None] | None = None
        try:
            transport = conn.transport
            assert transport is not None
            if body is None or isinstance(body, bytes | bytearray):
                if body is not None and len(body) >= WRITE_CHUNK:
                    transport.write(head)
                    transport.write(body)
                else:
                    transport.write(head + body if body else head)
                conn.body_sent()
            else:
                transport.write(head)
                sender = loop.create_task(_send_stream(conn, body, framing))
                sender.add_done_callback(conn.sent)
            while not conn.head_done:
                if conn.error is not None:
                    raise conn.error
                if conn.state.response is Phase.ERROR:  # failed without a reason recorded: never wait on
                    raise ConnectionResetError("the upstream connection failed")
                await conn.wait()
        except BaseException as exc:
            timer.cancel()
            if sender is not None:
                sender.cancel()
            reused = conn.reused and not conn.got_bytes
            self._discard(conn)
            if isinstance(exc, asyncio.CancelledError):
                raise
            if isinstance(exc, RequestRefused):  # the client's body was the problem (too slow): its error
                raise
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout("the upstream did not answer in time (upstream.timeout_s)") from exc
            if (
                retry
                and reused
                and method in IDEMPOTENT_METHODS
                and (body is None or isinstance(body, bytes | bytearray))
                and isinstance(exc, ConnectionError)
            ):
                raise _Retry from exc
            raise UpstreamUnreachable(f"the upstream connection failed ({_describe(exc)})") from exc
        if sender is not None and not sender.done():
            # The upstream answered before it had the whole body: the connection cannot be reused (the
            # state says so), but the answer is still the answer. An error (413, 401) says it does not want
            # the rest: stop sending (RFC 9112 §9.5). Any other status may come from a server that answers
            # while it reads (full duplex): the body goes on until the response is released.
            if conn.status >= 400:
                sender.cancel()
                sender = None
        return Exchange(self, conn, timer, sender)

    # --- the pool --------------------------------------------------------------------------------

    def _idle_connection(self) -> Connection | None:
        """The most recently used idle connection that is still good, or None."""
        if self._closed:
            return None
        now = self._clock()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.used_at < conn.idle_limit:
                conn.reused = True
                return conn
            self._discard(conn)
        return None

    async def _acquire(self, loop: asyncio.AbstractEventLoop, deadline: float) -> Connection:
        while True:
            if self._closed:
                raise UpstreamUnreachable("the proxy is shutting down")
            conn = self._idle_connection()
            if conn is not None:
                return conn
            if self._open < self._limit:
                self._open += 1
                try:
                    return await self._connect(loop)
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                # Not asyncio.wait_for: on Python 3.11 it returns a waiter's result and drops a cancellation
                # that came after the wake-up, so a request whose client hung up took the connection.
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, but leaving: the wake-up goes to the next in line
                if isinstance(exc, TimeoutError):
                    raise UpstreamTimeout(
                        f"all {self._limit} upstream connections stayed busy (upstream.pool_size)"
                    ) from exc
                raise
            finally:
                if not waiter.done():
                    waiter.cancel()
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass

    def _absolute_form(self, head: bytes) -> bytes:
        """``GET /p HTTP/1.1`` -> ``GET http://host:port/p HTTP/1.1``, the proxy's credentials after it."""
        target = head.index(b" ") + 1
        line_end = head.index(b"\r\n") + 2
        assert self._origin is not None
        return head[:target] + self._origin + head[target:line_end] + self._proxy_line + head[line_end:]

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> Connection:
        proxy = self._proxy
        via = "" if proxy is None else f" through the proxy {proxy.address}"
        try:
            async with asyncio.timeout(self._connect_timeout):
                if proxy is not None:
                    return await self._through(loop, proxy)
                _, conn = await loop.create_connection(
                    lambda: Connection(loop, self._clock),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"could not connect to the upstream{via} within {self._connect_timeout:g}s (upstream.connect_timeout_s)"
            ) from exc
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamUnreachable(
                f"cannot connect to the upstream{via} (TLS certificate verification failed: {exc.verify_message})"
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamUnreachable(f"cannot connect to the upstream{via} ({_describe(exc)})") from exc
        return conn

    async def _through(self, loop: asyncio.AbstractEventLoop, proxy: EgressProxy) -> Connection:
        """A connection to the upstream through ``proxy``: a CONNECT tunnel with TLS started on it, verified
        against the upstream's name; for a plain http:// upstream, the connection to the proxy itself."""
        try:
            if not self._tunnel:
                _, conn = await loop.create_connection(lambda: Connection(loop, self._clock), proxy.host, proxy.port)
                return conn
            transport, opener = await loop.create_connection(lambda: _TunnelOpener(loop), proxy.host, proxy.port)
        except OSError as exc:
            raise UpstreamUnreachable(
                f"cannot connect to the proxy {proxy.address} ({proxy.source}): {_describe(exc)}"
            ) from exc
        try:
            transport.write(self._connect_head)
            status = _tunnel_status(await opener.answer(), proxy)
            if status != 200:
                raise UpstreamUnreachable(f"cannot reach the upstream: {refusal(proxy, status, self._authority)}")
            if opener.late:  # bytes from the proxy before the TLS client spoke: no upstream sent them
                raise UpstreamUnreachable(
                    f"the proxy {proxy.address} ({proxy.source}) sent bytes after its answer to CONNECT"
                )
            conn = Connection(loop, self._clock)
            assert self._ssl is not None  # a tunnel is only for an https:// upstream
            tls = await loop.start_tls(transport, conn, self._ssl, server_hostname=self._host)
            if tls is None:
                raise ConnectionResetError("the tunnel closed during the TLS handshake")
        except BaseException:
            transport.abort()
            raise
        conn.connection_made(tls)  # start_tls hands the new transport back; the protocol is not told
        return conn

    def release(self, conn: Connection) -> None:
        conn.active = False
        if conn.reusable() and not self._closed:
            conn.state.next_cycle()
            conn.used_at = self._clock()
            self._idle.append(conn)
            self._wake_one()
        else:
            self._discard(conn)

    def _put_back(self, conn: Connection) -> None:
        """An open connection taken for a request that was not sent after all."""
        if conn.closed or self._closed:
            self._discard(conn)
            return
        conn.used_at = self._clock()
        self._idle.append(conn)
        self._wake_one()

    def _detached(self, conn: Connection) -> None:
        """A connection that left the pool as a raw stream (Exchange.detach): its slot is free."""
        self._open -= 1
        self._wake_one()

    def _discard(self, conn: Connection) -> None:
        conn.active = False
        conn._abort()
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn._abort()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


class _TunnelOpener(asyncio.Protocol):
    """Reads a proxy's answer to CONNECT: a head of at most MAX_TUNNEL_HEAD bytes, and nothing after it
    (in TLS the client speaks first, so any byte past the head came from the proxy, not the upstream)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._buffer = bytearray()
        self._head: asyncio.Future[bytes] = loop.create_future()
        self.late = False

    def data_received(self, data: bytes) -> None:
        if self._head.done():
            self.late = True
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end == -1:
            if len(self._buffer) > MAX_TUNNEL_HEAD:
                self._head.set_exception(
                    ConnectionError(f"the proxy's answer to CONNECT ran past {MAX_TUNNEL_HEAD // 1024} KiB")
                )
            return
        if end + 4 != len(self._buffer):
            self.late = True
        self._head.set_result(bytes(self._buffer[: end + 4]))

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._head.done():
            self._head.set_exception(ConnectionResetError("the proxy closed the connection before answering CONNECT"))

    async def answer(self) -> bytes:
        return await self._head


def _tunnel_status(head: bytes, proxy: EgressProxy) -> int:
    """The status of a proxy's answer to CONNECT, read strictly: ``HTTP/1.x NNN reason``, header lines
    ``name: value`` (ignored: a 200 to CONNECT has no body, RFC 9110 §9.3.6), CRLF line ends."""
    lines = head[:-4].split(b"\r\n")
    status = _TUNNEL_STATUS.fullmatch(lines[0])
    if status is None or not all(_TUNNEL_FIELD.fullmatch(line) for line in lines[1:]):
        raise UpstreamUnreachable(f"the proxy {proxy.address} ({proxy.source}) sent a malformed answer to CONNECT")
    return int(status.group(1))


async def _send_stream(conn: Connection, body: BodyStream, framing: Framing) -> None:
    """Copy a client's request body to the upstream as ``framing`` says, with backpressure both ways.

    A Content-Length body is sent exactly: a client stream that ends short, or runs past it, fails
    the exchange (the connection is closed; the upstream never reads a byte of one request as another).
    """
    transport = conn.transport
    assert transport is not None
    chunked = framing.body is Body.CHUNKED
    due = framing.length if framing.body is Body.LENGTH else -1
    while True:
        chunk = await body.readany()
        if not chunk:
            break
        if conn.closed:
            raise ConnectionResetError("the upstream closed the connection")
        if chunked:
            transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            if len(chunk) > due:
                raise ConnectionResetError("the request body ran past its Content-Length")
            due -= len(chunk)
            transport.write(chunk)
        conn.moved_at = conn._loop.time()
        await conn.drain()
    if chunked:
        transport.write(b"0\r\n\r\n")
    elif due != 0:
        raise ConnectionResetError("the request body ended before its Content-Length")


def _idle_limit(keep_alive: bytes) -> float:
    """How long an idle connection may be reused, from the upstream's ``Keep-Alive: timeout=N``: a second
    less than it says (a request sent as it closes the connection would be lost), never more than
    KEEPALIVE_S. Apache and Node.js announce theirs; servers that do not are covered by KEEPALIVE_S."""
    for param in keep_alive.split(b","):
        name, _, value = param.partition(b"=")
        if name.strip().lower() == b"timeout":
            try:
                seconds = float(value.strip())
            except ValueError:
                break
            if seconds == seconds:  # not NaN
                return min(KEEPALIVE_S, max(0.0, seconds - 1.0))
    return KEEPALIVE_S


def _describe(exc: BaseException) -> str:
    if tls_refusal := describe_tls_refusal(exc, "upstream.client_cert_file"):
        return tls_refusal
    if isinstance(exc, ssl.SSLError):  # its errno is OpenSSL's, not the OS's ("Operation not permitted")
        return (exc.reason or str(exc))[:200]
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's "Connect call failed (...)" hides the reason
    text = str(exc)
    return text[:200] if text else type(exc).__name__
