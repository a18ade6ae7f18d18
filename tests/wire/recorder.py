"""A raw recording upstream in the test process: every byte per connection, and scripted (mis)behaviour.

Each connection is numbered; every byte it receives is kept. Requests are cut out of the stream leniently
(Content-Length or chunked) so the recorder can answer each one. By default a request gets
``200`` with body ``echo:<X-Request-Id>:conn<N>``; a test scripts other answers per path with
:meth:`Recorder.script`: the exact bytes to write (in one write, or several with pauses), whether to
answer before reading the request body, bytes to write later on the idle connection, and whether to
close afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

READ_S = 5.0


@dataclass
class Reply:
    writes: tuple[bytes, ...]  # written in order, with ``pause_s`` between them
    pause_s: float = 0.02
    early: bool = False  # answer as soon as the head is in, before reading the body
    later: bytes = b""  # written ``later_s`` after the reply, on the (then idle) connection
    later_s: float = 0.05
    close: bool = False  # after replying: stop writing, read until EOF (a lingering close), close


@dataclass
class Seen:
    """One request as the recorder cut it out of a connection's bytes."""

    conn: int
    index: int  # its position on that connection (0 = first)
    method: str
    target: str
    # Not in the repr (failure messages): they hold the injected token.
    headers: list[tuple[str, str]] = field(repr=False)
    head: bytes = field(repr=False)
    body: bytes = field(default=b"", repr=False)
    complete: bool = False  # its whole body arrived (by its own framing)

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return values[-1] if values else None

    @property
    def request_id(self) -> str:
        return self.header("x-request-id") or ""


@dataclass
class Recorder:
    port: int = 0
    # connection number -> every byte it got (not in the repr: it holds the injected token)
    received: dict[int, bytearray] = field(default_factory=dict, repr=False)
    requests: list[Seen] = field(default_factory=list)
    scripts: dict[str, Reply] = field(default_factory=dict, repr=False)
    closed: set[int] = field(default_factory=set)  # connections whose peer (the proxy) closed them
    _server: asyncio.Server | None = field(default=None, repr=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, path: str, reply: Reply) -> None:
        """Answer requests whose path (before any query) is ``path`` with ``reply``."""
        self.scripts[path] = reply

    def seen(self, request_id: str) -> Seen:
        matches = [seen for seen in self.requests if seen.request_id == request_id]
        assert len(matches) == 1, f"request {request_id} reached the upstream {len(matches)} times: {matches}"
        return matches[0]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        number = len(self.received)
        self.received[number] = bytearray()
        try:
            await self._connection(number, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed.add(number)
        except TimeoutError:
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _read(self, reader: asyncio.StreamReader, number: int, buffer: bytearray) -> bool:
        data = await asyncio.wait_for(reader.read(65536), READ_S)
        if not data:
            self.closed.add(number)
            return False
        self.received[number] += data
        buffer += data
        return True

    async def _connection(self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = bytearray()
        index = 0
        while True:
            while b"\r\n\r\n" not in buffer:
                if not await self._read(reader, number, buffer):
                    return
            end = buffer.index(b"\r\n\r\n") + 4
            head = bytes(buffer[:end])
            del buffer[:end]
            seen = _parse_request_head(number, index, head)
            self.requests.append(seen)
            index += 1
            reply = self.scripts.get(seen.target.partition("?")[0])
            if reply is not None and reply.early:
                await self._reply(writer, reply, seen)
                if reply.close:
                    await self._linger(reader, number, writer)
                    return
                # Keep reading the body, as a server that answered early but still frames the stream.
                if not await self._body(reader, number, buffer, seen):
                    return
                continue
            if not await self._body(reader, number, buffer, seen):
                return
            if reply is None:
                reply = Reply((_default_answer(seen),))
            await self._reply(writer, reply, seen)
            if reply.close:
                await self._linger(reader, number, writer)
                return

    async def _body(self, reader: asyncio.StreamReader, number: int, buffer: bytearray, seen: Seen) -> bool:
        """Cut the body out of the stream; False when the connection ended first."""
        length = seen.header("content-length")
        coding = (seen.header("transfer-encoding") or "").lower()
        if "chunked" in coding:
            body = bytearray()
            while True:
                while b"\r\n" not in buffer:
                    if not await self._read(reader, number, buffer):
                        seen.body = bytes(body)
                        return False
                line_end = buffer.index(b"\r\n")
                size = int(bytes(buffer[:line_end]).split(b";")[0], 16)
                del buffer[: line_end + 2]
                while len(buffer) < size + 2:
                    if not await self._read(reader, number, buffer):
                        seen.body = bytes(body + buffer)
                        return False
                body += buffer[:size]
                del buffer[: size + 2]
                if size == 0:
                    seen.body, seen.complete = bytes(body), True
                    return True
        size = int(length) if length and length.isdigit() else 0
        while len(buffer) < size:
            if not await self._read(reader, number, buffer):
                seen.body = bytes(buffer)
                return False
        seen.body, seen.complete = bytes(buffer[:size]), True
        del buffer[:size]
        return True

    async def _reply(self, writer: asyncio.StreamWriter, reply: Reply, seen: Seen) -> None:
        for position, data in enumerate(reply.writes):
            if position:
                await asyncio.sleep(reply.pause_s)
            writer.write(data.replace(b"{id}", seen.request_id.encode()))
            await writer.drain()
        if reply.later:
            task = asyncio.get_running_loop().create_task(self._later(writer, reply))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _later(self, writer: asyncio.StreamWriter, reply: Reply) -> None:
        await asyncio.sleep(reply.later_s)
        if not writer.is_closing():
            with contextlib.suppress(ConnectionError):
                writer.write(reply.later)
                await writer.drain()

    async def _linger(self, reader: asyncio.StreamReader, number: int, writer: asyncio.StreamWriter) -> None:
        """Stop sending, keep reading (so the peer gets our answer, not a reset), until EOF or a while."""
        if writer.can_write_eof():
            writer.write_eof()
        sink = bytearray()
        with contextlib.suppress(TimeoutError):
            while await self._read(reader, number, sink):
                pass


def _default_answer(seen: Seen) -> bytes:
    body = f"echo:{seen.request_id}:conn{seen.conn}".encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Echo-Request-Id: %s\r\n\r\n%s" % (
        len(body),
        seen.request_id.encode(),
        body,
    )


def _parse_request_head(number: int, index: int, head: bytes) -> Seen:
    lines = head[:-4].decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    target = rest.rpartition(" ")[0]
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    return Seen(number, index, method, target, headers, head)
