"""A raw HTTP/1.1 client for the proxy's listener: requests as exact bytes, responses parsed strictly.

The parser here is deliberately independent of the proxy's (no httptools, no aiohttp) and strict where
framing is concerned: a response with both Content-Length and Transfer-Encoding, a malformed chunk, a
status line that does not start where the previous response ended, or a body where none may be (HEAD,
204, 304) is a :class:`FramingError`. Every read is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

READ_S = 5.0  # every read from a socket is bounded by this
MAX_HEAD = 64 * 1024
STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: ([^\r\n]*))?")
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(;[^\r\n]*)?")
BODYLESS_METHODS = frozenset({"HEAD"})
BODYLESS_STATUSES = frozenset({204, 304})
MAX_INFORMATIONAL = 16  # 1xx responses skipped before the final one; more is a broken stream


class FramingError(AssertionError):
    """The bytes from the proxy are not a well-framed HTTP/1.1 response where one was due."""


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]  # names in lower case, in order
    body: bytes
    raw: bytes  # the exact bytes this response took on the wire (head and body)
    informational: list[int] = field(default_factory=list)  # 1xx statuses seen before it
    close_delimited: bool = False

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key == name.lower()]
        return values[-1] if values else None


@dataclass
class WireRequest:
    """One request as the client sends it; :meth:`encode` gives its exact bytes."""

    method: str
    target: str
    request_id: str
    body: bytes = b""
    framing: str = "length"  # "length" | "chunked" | "none" (no body header at all)
    chunk_sizes: tuple[int, ...] = ()  # sizes of the chunks the body is cut in (the rest: one last chunk)
    chunk_ext: str = ""  # a chunk extension added to every chunk-size line, e.g. ";note=chunked"
    headers: tuple[tuple[str, str], ...] = ()
    version: str = "1.1"  # an HTTP/1.0 request without "Connection: keep-alive" in headers ends its connection
    close: bool = False

    def encode(self, host: str) -> bytes:
        lines = [
            f"{self.method} {self.target} HTTP/{self.version}",
            f"Host: {host}",
            f"X-Request-Id: {self.request_id}",
        ]
        lines += [f"{name}: {value}" for name, value in self.headers]
        if self.framing == "length":
            lines.append(f"Content-Length: {len(self.body)}")
        elif self.framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
        if self.close:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if self.framing != "chunked":
            return head + self.body
        return head + chunk_encode(self.body, self.chunk_sizes, self.chunk_ext)


def chunk_encode(body: bytes, sizes: tuple[int, ...] = (), ext: str = "") -> bytes:
    out = []
    rest = body
    for size in sizes:
        if not rest:
            break
        piece, rest = rest[:size], rest[size:]
        if piece:
            out.append(b"%x%s\r\n%s\r\n" % (len(piece), ext.encode(), piece))
    if rest:
        out.append(b"%x%s\r\n%s\r\n" % (len(rest), ext.encode(), rest))
    out.append(b"0\r\n\r\n")
    return b"".join(out)


class WireClient:
    """One raw TCP connection to the proxy."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._buffer = bytearray()
        self.eof = False

    @property
    def drained(self) -> bool:
        """The connection ended and every byte it brought was read."""
        return self.eof and not self._buffer

    @classmethod
    async def connect(cls, port: int) -> WireClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), READ_S)
        return cls(reader, writer)

    async def __aenter__(self) -> WireClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), READ_S)
        except (ConnectionError, TimeoutError):
            pass

    async def send(self, *parts: bytes, pause_s: float = 0.0) -> None:
        """Write ``parts`` in order, each its own write (and, with ``pause_s``, its own segment)."""
        for index, part in enumerate(parts):
            if index and pause_s:
                await asyncio.sleep(pause_s)
            self._writer.write(part)
            await asyncio.wait_for(self._writer.drain(), READ_S)

    async def _fill(self, deadline: float) -> bool:
        """Read more into the buffer; False at EOF. TimeoutError past ``deadline``."""
        if self.eof:
            return False
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise TimeoutError
        try:
            data = await asyncio.wait_for(self._reader.read(65536), remaining)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self._buffer += data
        return True

    async def _until(self, marker: bytes, deadline: float, limit: int) -> bytes | None:
        while True:
            index = self._buffer.find(marker)
            if index >= 0:
                out = bytes(self._buffer[: index + len(marker)])
                del self._buffer[: index + len(marker)]
                return out
            if len(self._buffer) > limit:
                raise FramingError(f"no {marker!r} in the first {limit} bytes: {bytes(self._buffer[:200])!r}")
            if not await self._fill(deadline):
                return None

    async def _exactly(self, size: int, deadline: float) -> bytes:
        while len(self._buffer) < size:
            if not await self._fill(deadline):
                raise FramingError(f"connection closed {size - len(self._buffer)} bytes before the body's end")
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    async def response(self, method: str, timeout_s: float = READ_S) -> Response | None:
        """The next response (skipping 1xx), or None if the connection ends cleanly before one starts."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        informational: list[int] = []
        for _ in range(MAX_INFORMATIONAL + 1):
            head = await self._until(b"\r\n\r\n", deadline, MAX_HEAD)
            if head is None:
                if self._buffer:
                    raise FramingError(f"connection closed inside a response head: {bytes(self._buffer[:200])!r}")
                return None
            status, reason, headers = _parse_head(head)
            if 100 <= status < 200:
                informational.append(status)
                continue
            break
        else:
            raise FramingError(f"more than {MAX_INFORMATIONAL} 1xx responses in a row: {informational}")
        lengths = [value for name, value in headers if name == "content-length"]
        codings = [value for name, value in headers if name == "transfer-encoding"]
        if lengths and codings:
            raise FramingError(f"response has both Content-Length and Transfer-Encoding: {head!r}")
        raw = bytearray(head)
        close_delimited = False
        if method in BODYLESS_METHODS or status in BODYLESS_STATUSES:
            body = b""
        elif codings:
            if [c.strip().lower() for c in ",".join(codings).split(",")][-1] != "chunked":
                raise FramingError(f"Transfer-Encoding without chunked last: {codings!r}")
            body = await self._chunked(raw, deadline)
        elif lengths:
            if len(set(lengths)) != 1 or not lengths[0].isdigit():
                raise FramingError(f"bad Content-Length {lengths!r}")
            body = await self._exactly(int(lengths[0]), deadline)
            raw += body
        else:
            close_delimited = True
            while await self._fill(deadline):
                pass
            body = bytes(self._buffer)
            self._buffer.clear()
            raw += body
        return Response(status, reason, headers, body, bytes(raw), informational, close_delimited)

    async def _chunked(self, raw: bytearray, deadline: float) -> bytes:
        body = bytearray()
        while True:
            line = await self._until(b"\r\n", deadline, 1024)
            if line is None:
                raise FramingError("connection closed inside a chunked body")
            raw += line
            match = CHUNK_SIZE.fullmatch(line[:-2])
            if match is None:
                raise FramingError(f"bad chunk-size line {line!r}")
            size = int(match.group(1), 16)
            if size == 0:
                break
            data = await self._exactly(size + 2, deadline)
            raw += data
            if data[-2:] != b"\r\n":
                raise FramingError(f"chunk of {size} bytes not followed by CRLF: {data[-8:]!r}")
            body += data[:-2]
        while True:  # trailer section, then the blank line
            line = await self._until(b"\r\n", deadline, MAX_HEAD)
            if line is None:
                raise FramingError("connection closed inside a chunked body's trailer section")
            raw += line
            if line == b"\r\n":
                return bytes(body)

    async def rest(self, timeout_s: float) -> bytes:
        """Whatever else arrives before EOF or ``timeout_s`` (the bytes nobody asked for)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            while await self._fill(deadline):
                pass
        except TimeoutError:
            pass
        out = bytes(self._buffer)
        self._buffer.clear()
        return out


def _parse_head(head: bytes) -> tuple[int, str, list[tuple[str, str]]]:
    lines = head[:-4].split(b"\r\n")
    match = STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise FramingError(f"not a status line where a response was due: {head[:200]!r}")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or TOKEN.fullmatch(name) is None or b"\n" in value or b"\r" in value:
            raise FramingError(f"malformed header line {line!r} in {head[:300]!r}")
        headers.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    return int(match.group(1)), (match.group(2) or b"").decode("latin-1"), headers


@dataclass
class Conversation:
    """What one client connection got back: a response (or None: the connection ended) per request, and
    whatever bytes came after the last one."""

    responses: list[Response | None]
    trailing: bytes

    @property
    def wire(self) -> bytes:
        """Every byte the client received."""
        return b"".join(r.raw for r in self.responses if r is not None) + self.trailing


async def converse(
    port: int,
    host: str,
    requests: list[WireRequest],
    *,
    pause_s: float = 0.0,
    writes: list[bytes] | None = None,
    trailing_s: float = 0.3,
) -> Conversation:
    """Send ``requests`` pipelined on one connection (or the exact ``writes``), read one response each.

    After the last response, whatever else arrives within ``trailing_s`` (or until the proxy closes) is
    returned as ``trailing``: on a well-behaved proxy it is empty. A request whose connection was closed
    before its response gets None (and so do the ones after it).
    """
    responses: list[Response | None] = []
    trailing = b""
    pending = list(requests)
    while pending:
        data = [request.encode(host) for request in pending]
        async with await WireClient.connect(port) as client:
            await client.send(*(writes if writes is not None else data), pause_s=pause_s)
            closed_at = None
            for i, request in enumerate(pending):
                response = None if client.drained else await client.response(request.method)
                responses.append(response)
                if response is not None and _closes(response) and i + 1 < len(pending) and writes is None:
                    # "close": the server processes no further request on this connection (RFC 9112 §9.6),
                    # so an HTTP/1.1 client sends the rest again on a new one, as this one does.
                    closed_at = i + 1
                    break
            trailing += await client.rest(trailing_s)
        pending = pending[closed_at:] if closed_at is not None else []
    return Conversation(responses, trailing)


def _closes(response: Response) -> bool:
    value = response.header("connection") or ""
    return "close" in {token.strip().lower() for token in value.split(",")}
