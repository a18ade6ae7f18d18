"""WebSocket pass-through: the handshake is forwarded like any request, then bytes are relayed both ways.

A ``GET`` with ``Connection: Upgrade`` and ``Upgrade: websocket`` passes the same admission checks as any
request (proxy/access.py: Host, Origin / ``Sec-Fetch-Site``, the API key, methods and paths), then goes
upstream with the token and the static headers injected (proxy/forward.py) on a connection of the pool
asked for an upgrade (``Pool.request(upgrade=True)``). A ``401`` renews the token and retries once, like
any bodiless request; any answer but ``101`` is relayed as a normal response. On the ``101`` (checked:
``Upgrade: websocket`` and the ``Sec-WebSocket-Accept`` that the client's key calls for, RFC 6455 §4.2.2),
the client gets a ``101`` with the upstream's end-to-end headers (``Sec-WebSocket-Accept``, ``-Protocol``,
``-Extensions``, ...), and from then on :class:`Tunnel` relays raw bytes, frames unparsed:

- upstream -> client: :meth:`Tunnel.data_received` (the upstream transport's protocol from
  ``Exchange.detach`` on) writes to the client's transport; when aiohttp's protocol says writing is
  paused, upstream reading pauses until the client has drained;
- client -> upstream: aiohttp hands the client's bytes to :meth:`Tunnel.feed_data` (the hook its own
  ``web.WebSocketResponse`` uses, ``RequestHandler.set_parser``); when the upstream's transport pauses
  writing, the client's reading pauses until it resumes;
- whichever side closes (or resets), the other is closed once what it was sent is flushed; no byte moving
  either way for ``upstream.timeout_s`` closes both (``outcome=idle_timeout``).

Why raw bytes rather than ``web.WebSocketResponse`` on one side and a client WebSocket on the other:
aiohttp's server lets a handler take the connection over after a ``101`` (``set_parser``), so the proxy
need not parse, unmask, re-mask and re-frame every message, nor understand the extensions both ends agreed
on (``permessage-deflate`` is negotiated between them, and its frames pass through compressed).

The aiohttp internals this module relies on are :data:`AIOHTTP_INTERNALS`; tests/test_websocket.py fails
by name when a release changes them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_writer import HttpVersion11

from .errors import BadRequest, UpstreamUnreachable
from .observability import event
from .response import RelayResponse
from .upstream import Exchange
from .wire import NO_BODY

# RFC 6455 §1.3: the GUID a server appends to the client's key to compute Sec-WebSocket-Accept.
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# What the handshake sent upstream says instead of the client's hop-by-hop Connection and Upgrade.
UPGRADE_LINES = b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
# After one side closed, the other gets this long to take what it was sent before it is cut.
CLOSE_LINGER_S = 5.0
# What this module touches that aiohttp does not document: the parsed request message's upgrade flag, the
# per-connection handler's parser hook and keep-alive switch (what web.WebSocketResponse uses), the flow
# control of aiohttp's protocol, and RelayResponse's own _keep_alive (aiohttp's StreamResponse attribute).
AIOHTTP_INTERNALS: dict[str, tuple[str, ...]] = {
    "BaseRequest": ("_message",),
    "RequestHandler": ("set_parser", "keep_alive", "pause_reading", "resume_reading", "writing_paused"),
    "StreamResponse": ("_keep_alive",),
}


def requested(request: web.BaseRequest) -> bool:
    """Whether ``request`` is a WebSocket handshake that aiohttp's parser switched the connection for: a
    ``GET`` over HTTP/1.1 with ``Connection: upgrade`` and ``Upgrade: websocket``. The framing decision is the
    parser's (its ``upgrade`` flag), not re-derived here from the header bytes."""
    return (
        request._message.upgrade
        and request.method == "GET"
        and request.version == HttpVersion11
        and request.headers.get("Upgrade", "").strip().lower() == "websocket"
    )


def expected_accept(request: web.BaseRequest) -> str:
    """The Sec-WebSocket-Accept the upstream must answer with (RFC 6455 §4.2.2); BadRequest when the client's
    handshake has no usable Sec-WebSocket-Key (one header, base64 of 16 bytes)."""
    keys = request.headers.getall("Sec-WebSocket-Key", [])
    try:
        if len(keys) != 1 or len(base64.b64decode(keys[0].strip(), validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        raise BadRequest("a WebSocket handshake needs one Sec-WebSocket-Key (RFC 6455 §4.1)") from None
    digest = hashlib.sha1(keys[0].strip().encode("ascii") + WEBSOCKET_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def check_switch(headers: list[tuple[bytes, bytes]], accept: str) -> None:
    """The upstream's 101 must be the WebSocket switch the client asked for; else 502, before the client gets
    anything. Relaying a 101 that is not one would let a client speak raw HTTP on a connection that was
    authenticated with the token and has passed no admission check since."""
    upgrade = accepted = b""
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"upgrade":
            upgrade = value.strip().lower()
        elif lowered == b"sec-websocket-accept":
            accepted = value.strip()
    if upgrade != b"websocket" or accepted != accept.encode("ascii"):
        raise UpstreamUnreachable(
            "the upstream answered 101 without a valid WebSocket handshake (Upgrade, Sec-WebSocket-Accept)"
        )


class SwitchResponse(RelayResponse):
    """The client's ``101 Switching Protocols``: ``lines`` as they are, no framing; the connection never
    serves HTTP again (its keep-alive is off, so aiohttp closes it when the tunnel ends)."""

    async def _prepare_headers(self) -> None:
        self._head = b"HTTP/1.1 101 Switching Protocols\r\n" + self._lines + b"\r\n"
        self._keep_alive = False


class Tunnel(asyncio.Protocol):
    """The relay after the 101: the upstream transport's protocol, and the client side's "parser" (aiohttp
    calls :meth:`feed_data` with the client's bytes and :meth:`feed_eof` when the client is gone)."""

    def __init__(self, request: web.BaseRequest, upstream: asyncio.Transport, timeout_s: float) -> None:
        client = request.transport
        if client is None:
            raise ConnectionResetError("the client is gone")
        self._loop = asyncio.get_running_loop()
        self._handler: Any = request.protocol  # aiohttp's RequestHandler for the client's connection
        self._client = client
        self._upstream = upstream
        self._timeout = timeout_s
        self.sent_up = 0  # client -> upstream bytes
        self.sent_down = 0  # upstream -> client bytes
        self.closed_by = ""  # client_closed, upstream_closed, upstream_reset, idle_timeout, cancelled
        self._moved_at = self._loop.time()
        self._down_paused = False  # upstream reading paused until the client drains
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    # --- the upstream's transport (asyncio.Protocol) ---------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed_by:
            return
        self._client.write(data)
        self.sent_down += len(data)
        self._moved_at = self._loop.time()
        if self._handler.writing_paused and not self._down_paused:
            self._down_paused = True
            self._upstream.pause_reading()
            self._wake()

    def eof_received(self) -> bool | None:
        return None  # the upstream is done sending: close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._end("upstream_closed" if exc is None else "upstream_reset")

    def pause_writing(self) -> None:
        self._handler.pause_reading()  # the client waits while the upstream's send buffer is full

    def resume_writing(self) -> None:
        if not self.closed_by:
            self._handler.resume_reading()

    # --- the client's bytes (aiohttp's parser interface) -----------------------------------------

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if not self.closed_by and data:
            self._upstream.write(data)
            self.sent_up += len(data)
            self._moved_at = self._loop.time()
        return False, b""

    def feed_eof(self) -> None:
        self._end("client_closed")

    # --- the relay -------------------------------------------------------------------------------

    def _end(self, by: str) -> None:
        if self.closed_by:
            return
        self.closed_by = by
        # close(), not abort(): what each side was sent is flushed first (a Close frame, the last message).
        self._upstream.close()
        self._client.close()
        # A peer that never reads would hold its socket open for good: cut both after a linger.
        self._loop.call_later(CLOSE_LINGER_S, self._abort)
        self._wake()

    def _abort(self) -> None:
        self._upstream.abort()
        self._client.abort()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_idle(self) -> None:
        due = self._moved_at + self._timeout
        if self._loop.time() >= due:
            self._end("idle_timeout")
        elif not self.closed_by:
            self._timer = self._loop.call_at(due, self._check_idle)

    async def run(self, writer: Any) -> None:
        """Until either side closes or nothing moves for ``timeout_s``. ``writer``: the 101's payload writer,
        whose ``drain()`` waits while the client's transport is paused."""
        self._timer = self._loop.call_at(self._moved_at + self._timeout, self._check_idle)
        try:
            while not self.closed_by:
                if self._down_paused:
                    try:
                        await writer.drain()
                    except ConnectionError:
                        self._end("client_closed")
                        break
                    self._down_paused = False
                    if not self.closed_by:
                        self._upstream.resume_reading()
                    continue
                self._waiter = self._loop.create_future()
                await self._waiter
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._end("cancelled")


async def relay(
    request: web.BaseRequest,
    upstream: Exchange,
    lines: bytes,
    timeout_s: float,
    path: str,
    request_id: str,
    done: Callable[[Tunnel], None],
) -> web.StreamResponse:
    """Answer the client's handshake with ``lines`` (the 101's headers, filtered by the forwarder) and relay
    bytes both ways until either side closes; ``done(tunnel)`` then, however it ended (a cancellation too).
    Returns the response, for aiohttp."""
    started = time.monotonic()
    transport, tail = upstream.detach()  # at once: its reading is paused, nothing it sends is lost
    try:
        tunnel = Tunnel(request, transport, timeout_s)
    except BaseException:
        transport.abort()
        raise
    transport.set_protocol(tunnel)
    response = SwitchResponse(101, b"Switching Protocols", lines, NO_BODY)
    try:
        try:
            writer = await response.prepare(request)
        except BaseException:
            tunnel._end("client_closed")
            raise
        handler: Any = request.protocol
        handler.keep_alive(False)
        if tail:
            tunnel.data_received(tail)  # what the upstream sent right after its 101
        # From here on aiohttp hands the client's bytes (those already buffered first) to the tunnel.
        handler.set_parser(tunnel)
        if not tunnel.closed_by and not tunnel._down_paused:
            transport.resume_reading()
        await tunnel.run(writer)
    finally:
        done(tunnel)
        event(
            "websocket.closed",
            level=logging.INFO,
            path=path,
            by=tunnel.closed_by or "cancelled",
            bytes_in=tunnel.sent_up,
            bytes_out=tunnel.sent_down,
            duration_s=round(time.monotonic() - started, 3),
            request_id=request_id,
        )
    return response
