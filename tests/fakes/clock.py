"""Virtual time for the token manager: a clock and a sleep that move only when the test says so.

``TokenManager(idp, clock=vt, sleep=vt.sleep)``: every wait of the manager (its scheduler, the backoff,
the spacing of logins) and of a fake identity provider sleeping on ``vt.sleep`` is a point on the
virtual timeline; :meth:`VirtualTime.run_for` lets every task run until all are waiting, then jumps to
the next wake-up. Minutes of backoff, or a 40 s soak of 3 s tokens, take milliseconds, and the schedule,
not the machine's speed, decides what happens. No I/O may happen under it (real sockets take real time).
"""

from __future__ import annotations

import asyncio
import heapq

# Loop iterations that let every runnable task reach its next wait (a hop through asyncio.wait, a
# shielded flight and an Event takes a few each); the chains here are short.
SETTLE_ROUNDS = 40
MAX_STEPS = 1_000_000


class VirtualTime:
    """A fake monotonic clock (call it) with a matching ``sleep``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock by hand (sleepers wake at the next :meth:`run_for`)."""
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), self._seq, future))
        self._seq += 1
        await future

    async def settle(self) -> None:
        for _ in range(SETTLE_ROUNDS):
            await asyncio.sleep(0)

    async def run_for(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass, waking every sleeper due in them, in order."""
        end = self.now + seconds
        for _ in range(MAX_STEPS):
            await self.settle()
            while self._sleepers and self._sleepers[0][2].done():  # cancelled sleeps
                heapq.heappop(self._sleepers)
            if not self._sleepers or self._sleepers[0][0] > end:
                self.now = end
                await self.settle()
                return
            wake, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, wake)
            future.set_result(None)
        raise AssertionError(f"more than {MAX_STEPS} wake-ups in {seconds}s of virtual time: a busy loop")

    async def run_until(self, condition, within: float, step: float = 0.01) -> None:  # type: ignore[no-untyped-def]
        """Run virtual time in ``step``s until ``condition()`` holds; fail after ``within`` virtual seconds."""
        for _ in range(int(within / step) + 1):
            if condition():
                return
            await self.run_for(step)
        assert condition(), f"condition not met within {within}s of virtual time"


class FakeClock:
    """A monotonic clock that moves only when a test moves it (``advance``, or setting ``now``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
