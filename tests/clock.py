"""Time for tests: a clock injected where code reads time, moved only when the test says so,
and a sleep injected where a loop waits, each wait ending only when the test steps it."""

from __future__ import annotations

import asyncio
import contextlib
import time


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ShiftedClock:
    """The wall clock moved by ``offset`` seconds: real time keeps flowing (so real timers and
    timeouts behave), but a test can put "now" just before a deadline instead of waiting.

    :meth:`sleep` waits on this clock: it ends when the clock reaches its end, whether real
    time got there or :meth:`set` moved the clock past it.
    """

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset
        self._moved = asyncio.Event()

    def __call__(self) -> float:
        return time.time() + self.offset

    def set(self, now: float) -> None:
        """From now on the clock reads ``now`` (and runs on from there)."""
        self.offset = now - time.time()
        self._moved.set()
        self._moved = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        until = self() + seconds
        while (left := until - self()) > 0:
            moved = self._moved
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(moved.wait(), left)


class SteppedSleep:
    """Stands in for a loop's ``asyncio.sleep``: each :meth:`step` is one wait ending, so a test
    runs exactly the iterations it counts instead of waiting out real intervals.

    ``step`` returns once the loop is back in its next wait, that is, once the iteration the
    step let through has done all its work.
    """

    def __init__(self) -> None:
        self._go: asyncio.Queue[asyncio.Event] = asyncio.Queue(maxsize=1)
        self._done: asyncio.Event | None = None

    async def sleep(self, seconds: float) -> None:
        if self._done is not None:  # back for the next wait: the previous iteration finished
            self._done.set()
        self._done = await self._go.get()

    async def step(self, count: int = 1, timeout_s: float = 5.0) -> None:
        for _ in range(count):
            done = asyncio.Event()
            self._go.put_nowait(done)
            async with asyncio.timeout(timeout_s):
                await done.wait()
