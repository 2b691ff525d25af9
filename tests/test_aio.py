"""relay.aio: owned tasks, bounded cancellation, single-flight."""

from __future__ import annotations

import asyncio

import pytest

from relay.aio import SingleFlight, TaskOwner, cancel_and_wait


async def test_cancel_and_wait_is_bounded_and_sees_errors() -> None:
    refusals = 1

    async def stubborn() -> None:
        nonlocal refusals
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if not refusals:
                    raise
                refusals -= 1  # ignores the first cancel: the wait must still end

    async def failed() -> None:
        raise RuntimeError("boom")

    stuck = asyncio.ensure_future(stubborn())
    broken = asyncio.ensure_future(failed())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await cancel_and_wait([stuck, broken], timeout=0.05)
    assert loop.time() - started < 1.0
    assert broken.done() and not stuck.done()
    await cancel_and_wait([stuck], timeout=1.0)
    assert stuck.cancelled()


async def test_task_owner_groups_find_their_own_tasks_and_cancel_them() -> None:
    owner = TaskOwner()
    gate = asyncio.Event()
    closers = [owner.spawn("tunnel-close", gate.wait()) for _ in range(3)]
    other = owner.spawn("housekeeping", asyncio.sleep(3600))
    assert len(owner.group("tunnel-close")) == 3
    assert set(owner.group("tunnel-close").tasks()) == set(closers)
    assert not await owner.group("tunnel-close").wait(timeout=0.01)
    gate.set()
    assert await owner.group("tunnel-close").wait(timeout=1.0)
    await asyncio.sleep(0)
    assert len(owner.group("tunnel-close")) == 0  # finished tasks leave their group
    await owner.cancel(timeout=1.0)
    assert other.cancelled()


async def test_single_flight_shares_one_call_and_forgets_failures() -> None:
    calls = 0
    release = asyncio.Event()

    async def fetch() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        if calls == 1:
            raise ConnectionError("down")
        return calls

    flight = SingleFlight(fetch)
    first = [asyncio.ensure_future(flight()) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*first, return_exceptions=True)
    assert calls == 1 and all(isinstance(r, ConnectionError) for r in results)
    assert await flight() == 2  # the failure was not remembered


async def test_a_cancelled_caller_does_not_cancel_the_shared_call() -> None:
    release = asyncio.Event()

    async def fetch() -> str:
        await release.wait()
        return "doc"

    flight = SingleFlight(fetch)
    impatient = asyncio.ensure_future(flight())
    patient = asyncio.ensure_future(flight())
    await asyncio.sleep(0)
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    release.set()
    assert await asyncio.wait_for(patient, 1.0) == "doc"
