"""The relayed response: the upstream's head bytes as they came, framed for this client.

aiohttp's ``StreamResponse`` builds its head from a dict of ``str``: it re-encodes header values as
UTF-8 (a latin-1 ``Content-Disposition`` filename arrives corrupted), and adds ``Content-Type``,
``Date`` and ``Server`` where the upstream sent none. :class:`RelayResponse` keeps aiohttp's
writer, flow control and keep-alive handling, and replaces only the two steps that make the head:
the head it writes is the upstream's filtered raw header lines, plus the framing this client can
read:

- a body known whole: ``Content-Length`` (one write for head and body);
- a Content-Length body: that length, and not one byte more is written;
- a chunked or close-delimited body: re-chunked for an HTTP/1.1 client; for an HTTP/1.0 client,
  which cannot read chunked, ``Connection: close`` and the body delimited by closing;
- no body (HEAD, 204, 304): none is ever written, whatever the upstream sent.

A whole answer (the common case: a small JSON body that arrived with its head) is prepared in one step:
aiohttp's ``prepare`` passes through four coroutines to get to the one write.

This is the one module that overrides aiohttp's response internals (:data:`AIOHTTP_INTERNALS`, and
``BaseRequest._prepare_hook``); tests/test_wire.py fails by name when an aiohttp release changes them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import must_be_empty_body
from aiohttp.http_writer import HttpVersion11

from .wire import Body, Framing

# The StreamResponse and BaseRequest attributes and methods this module relies on (checked by tests/test_wire.py).
AIOHTTP_INTERNALS = (
    "_prepare_headers",
    "_write_headers",
    "_req",
    "_payload_writer",
    "_must_be_empty_body",
    "_eof_sent",
)
AIOHTTP_REQUEST_INTERNALS = ("_prepare_hook", "_payload_writer")
# A streamed body written as it arrives (direct_writer): the upstream is read no further while the client's
# transport holds more than this. As much as the pool buffers for a body read in chunks (upstream.HIGH_WATER),
# so a client that reads its answers only once it has sent its requests fares the same either way.
CLIENT_BUFFER = 512 * 1024
# What direct_writer gives: write(bytes) -> ready for more; drain() waits until the client took enough.
DirectWriter = tuple[Callable[[bytes], bool], Callable[[], Awaitable[None]]]


class RelayResponse(web.StreamResponse):
    """A response whose head is ``lines`` (raw ``Name: value\\r\\n`` lines, already filtered) and whose
    body is framed by ``framing`` (the upstream's), or is ``whole`` when it has all arrived."""

    def __init__(self, status: int, reason: bytes, lines: bytes, framing: Framing, whole: bytes | None = None) -> None:
        super().__init__(status=status, reason=reason.decode("latin-1") or None)
        self._raw_reason = reason
        self._lines = lines
        self._framing = framing
        self._whole = whole
        self._head = b""
        self._chunk = False  # decided in _prepare_headers: re-chunk the body for this client

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._whole is None or self._eof_sent or self._payload_writer is not None:
            return await super().prepare(request)
        # What StreamResponse.prepare and _start do, with the head made and written here, with the body.
        self._must_be_empty_body = must_be_empty_body(request.method, self.status)
        self._req = request
        writer = self._payload_writer = request._payload_writer
        self._make_head(request)
        if type(request) is not web.BaseRequest:  # an Application's request: its on_response_prepare signals
            await request._prepare_hook(self)
        await writer.write(self._head if self._must_be_empty_body else self._head + self._whole)
        writer.length = 0
        return writer

    def direct_writer(self) -> DirectWriter | None:
        """Once prepared, for a body of known length that goes out as it comes (``Exchange.pipe``): a write
        straight to the client's transport, and the wait until the transport has drained. The write returns
        False once the transport holds more than :data:`CLIENT_BUFFER`, or is closing, and never writes
        past the length the head announced. None where aiohttp's writer frames the body (re-chunked for
        this client, or no body at all)."""
        writer = self._payload_writer
        framed = self._chunk or self._must_be_empty_body or self._framing.body is not Body.LENGTH
        if writer is None or writer.length is None or framed:
            return None
        transport = writer.transport
        if transport is None or transport.is_closing():
            return None
        limit = max(transport.get_write_buffer_limits()[1], CLIENT_BUFFER)
        left = writer.length

        def write(data: bytes) -> bool:
            nonlocal left
            if transport.is_closing():
                return False
            if len(data) > left:
                data = data[:left]
            left -= len(data)
            writer.length = left  # aiohttp's writer, should anything write after this, stays within it too
            writer.output_size += len(data)
            transport.write(data)
            return transport.get_write_buffer_size() <= limit

        async def drain() -> None:
            if transport.is_closing():
                raise ConnectionResetError("the client closed the connection")
            await writer.drain()

        return write, drain

    async def _prepare_headers(self) -> None:
        request = self._req
        assert request is not None
        self._make_head(request)

    def _make_head(self, request: web.BaseRequest) -> None:
        client_11 = request.version >= HttpVersion11
        keep_alive = request.keep_alive if self._keep_alive is None else self._keep_alive
        parts = [_status_line(self.status, self._raw_reason), self._lines]
        framing, whole = self._framing, self._whole
        if self._must_be_empty_body:
            pass  # the upstream's Content-Length, if any, is among the lines: it describes a GET's body
        elif whole is not None:
            parts.append(b"Content-Length: %d\r\n" % len(whole))
        elif framing.body is Body.LENGTH:
            parts.append(b"Content-Length: %d\r\n" % framing.length)
        elif client_11:
            parts.append(b"Transfer-Encoding: chunked\r\n")
            self._chunk = True
        else:
            keep_alive = False  # an HTTP/1.0 client reads this body until the connection closes
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
        elif not client_11:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self._keep_alive = keep_alive
        self._head = b"".join(parts)

    async def _write_headers(self) -> None:  # a streamed body's head (a whole answer's is written by prepare)
        writer = self._payload_writer
        assert writer is not None
        await writer.write(self._head)
        # From here on, aiohttp's writer frames what the relay writes: never past the length, never a
        # byte for a response that has no body, chunk-encoded where the head said so.
        if self._must_be_empty_body:
            writer.length = 0
        elif self._framing.body is Body.LENGTH:
            writer.length = self._framing.length
        elif self._chunk:
            writer.enable_chunking()


_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}


def _status_line(status: int, reason: bytes) -> bytes:
    """``HTTP/1.1 200 OK\\r\\n``, made once per status and reason (at most a few hundred are kept)."""
    line = _STATUS_LINES.get((status, reason))
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        if len(_STATUS_LINES) < 256:
            _STATUS_LINES[(status, reason)] = line
    return line
