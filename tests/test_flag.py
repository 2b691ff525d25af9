"""The lean Flag behaves like asyncio.Event where the tunnel relies on it."""

from __future__ import annotations

import asyncio

from relay.tunnel.session import Flag


async def test_wait_returns_at_once_when_set_and_blocks_when_clear() -> None:
    flag = Flag(True)
    waiter = asyncio.ensure_future(flag.wait())
    await asyncio.sleep(0)  # one loop turn, not a wait on the clock
    assert waiter.done()
    flag.clear()
    blocked = asyncio.ensure_future(flag.wait())
    for _ in range(10):
        await asyncio.sleep(0)
        assert not blocked.done()
    flag.set()
    await asyncio.wait_for(blocked, 5)


async def test_set_wakes_every_waiter_and_cancelled_waiters_are_forgotten() -> None:
    flag = Flag()
    waiters = [asyncio.ensure_future(flag.wait()) for _ in range(3)]
    cancelled = asyncio.ensure_future(flag.wait())
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    assert flag._waiters is not None and len(flag._waiters) == 3
    flag.set()
    await asyncio.wait_for(asyncio.gather(*waiters), 0.1)
    assert flag.is_set() and flag._waiters is None
