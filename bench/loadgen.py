"""A small, bounded HTTP/1.1 load generator, used when wrk is not installed.

Keep-alive connections on raw asyncio streams (aiohttp's client would be the bottleneck), each
sending GETs back to back for a fixed time or request count, whichever ends first. Slower than wrk,
so its figures are only comparable with each other within one run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

MAX_REQUESTS = 2_000_000


@dataclass
class LoadResult:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _connection(host: str, port: int, path: str, deadline: float, budget: list[int], result: LoadResult) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: bench\r\n\r\n".encode()
    try:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            result.latencies_s.append(time.perf_counter() - started)
            if status == 200:
                result.requests += 1
            else:
                result.errors += 1
    finally:
        writer.close()


async def run(host: str, port: int, path: str, connections: int, duration_s: float) -> LoadResult:
    result = LoadResult()
    budget = [MAX_REQUESTS]
    started = time.perf_counter()
    deadline = started + duration_s
    await asyncio.gather(*(_connection(host, port, path, deadline, budget, result) for _ in range(connections)))
    result.seconds = time.perf_counter() - started
    return result
