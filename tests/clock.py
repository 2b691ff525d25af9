"""Time for tests: a clock injected where code reads time, moved only when the test says so,
and a sleep injected where a loop waits, each wait ending only when the test steps it."""

from __future__ import annotations

import asyncio


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


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
