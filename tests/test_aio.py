"""relay.aio: owned tasks, bounded cancellation, single-flight."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from relay.aio import KeyedSingleFlight, SingleFlight, TaskOwner, cancel_and_wait


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


async def settle() -> None:
    """Let the callers' tasks and the calls they start run up to their first real wait."""
    for _ in range(4):
        await asyncio.sleep(0)


async def test_keyed_single_flight_shares_per_key_and_detached_calls_are_not_joined() -> None:
    flights: KeyedSingleFlight[str, str] = KeyedSingleFlight("test")
    gates = {"a": asyncio.Event(), "b": asyncio.Event()}
    calls: list[str] = []

    def fetch(key: str, answer: str) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            calls.append(key)
            await gates[key].wait()
            return answer
        return run

    first = [asyncio.ensure_future(flights("a", fetch("a", "one"))) for _ in range(3)]
    other = asyncio.ensure_future(flights("b", fetch("b", "bee")))
    await settle()
    assert calls == ["a", "b"] and len(flights) == 2
    flights.detach(lambda key: key == "a")  # e.g. a revocation
    fresh = asyncio.ensure_future(flights("a", fetch("a", "two")))
    await settle()
    assert calls == ["a", "b", "a"]
    gates["a"].set()
    assert await asyncio.gather(*first) == ["one"] * 3  # its waiters still get the old answer
    assert await fresh == "two"
    cancelled = other
    await flights.cancel(timeout=1)
    assert len(flights) == 0
    with pytest.raises(asyncio.CancelledError):
        await cancelled


async def test_keyed_single_flight_forgets_a_failure() -> None:
    flights: KeyedSingleFlight[int, int] = KeyedSingleFlight("test")
    attempts = [0]

    async def flaky() -> int:
        attempts[0] += 1
        if attempts[0] == 1:
            raise ConnectionError("upstream down")
        return 7

    with pytest.raises(ConnectionError):
        await flights(1, flaky)
    assert await flights(1, flaky) == 7 and len(flights) == 0
