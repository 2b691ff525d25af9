"""Credential leases without sockets: one heap of deadlines, revocations by subject and host."""

from __future__ import annotations

import asyncio
import math
import time

from relay.errors import CloseCode
from relay.server.leases import Lease, LeaseBook, LeaseWatch
from tests.clock import FakeClock
from tests.harness import eventually


def lease(sub: str = "alice", host: str = "acme:laptop", deadline: float = 100.0,
          closed: list[tuple[str, int, str]] | None = None) -> Lease:
    def close(code: int, reason: str) -> None:
        if closed is not None:
            closed.append((sub, code, reason))
    return Lease(sub, host, deadline, "channel", close)


def test_due_returns_what_expired_in_deadline_order() -> None:
    book = LeaseBook()
    late, early, never = lease(deadline=20), lease(deadline=10), lease(deadline=math.inf)
    for item in (late, early, never):
        book.add(item)
    assert book.next_deadline() == 10
    assert book.due(9.9) == []
    assert book.due(15) == [early]
    assert book.due(1e12) == [late]
    assert len(book) == 1 and book.next_deadline() is None  # the one that never expires


def test_a_moved_deadline_replaces_the_old_one() -> None:
    book = LeaseBook()
    renewed = lease(deadline=10)
    book.add(renewed)
    book.move(renewed, 50)
    assert book.due(20) == []
    assert book.next_deadline() == 50
    assert book.due(50) == [renewed]


def test_ended_leases_never_come_due_and_the_heap_is_compacted() -> None:
    book = LeaseBook()
    items = [lease(deadline=float(n)) for n in range(1000)]
    for item in items:
        book.add(item)
    for item in items[:-1]:
        book.remove(item)
    assert len(book._heap) < 200
    assert book.due(1e9) == [items[-1]]


def test_matching_by_subject_host_or_both_and_never_everything() -> None:
    book = LeaseBook()
    a1, a2, b1 = lease("alice", "acme:one"), lease("alice", "acme:two"), lease("bob", "acme:one")
    for item in (a1, a2, b1):
        book.add(item)
    assert set(book.matching("alice", None)) == {a1, a2}
    assert set(book.matching(None, "acme:one")) == {a1, b1}
    assert book.matching("alice", "acme:one") == [a1]
    assert book.matching(None, None) == []  # "drop every cached decision" closes nothing


async def test_the_watch_closes_expired_leases_4401_and_revoked_ones_4403() -> None:
    clock = FakeClock(1000.0)
    watch = LeaseWatch(clock=clock)
    closed: list[tuple[str, int, str]] = []
    for sub, deadline in (("alice", 1010.0), ("bob", 1020.0), ("carol", math.inf)):
        held = lease(sub, deadline=deadline, closed=closed)
        watch.hold(held.sub, held.host_id, held.deadline, "channel", held.close)
    clock.advance(15)
    assert watch.expire_due() == 1
    assert closed == [("alice", int(CloseCode.UNAUTHORIZED), "token expired")]
    assert watch.revoke("carol", None) == 1
    assert closed[-1] == ("carol", int(CloseCode.FORBIDDEN), "access revoked")
    assert watch.revoke("carol", None) == 0  # closed once
    clock.advance(10)
    assert watch.expire_due() == 1 and closed[-1][0] == "bob"


async def test_the_watch_task_wakes_for_an_earlier_deadline() -> None:
    watch = LeaseWatch()  # the real clock: this checks the task's sleeping, briefly
    closed: list[tuple[str, int, str]] = []
    task = asyncio.ensure_future(watch.run())
    try:
        far = lease("bob", closed=closed)
        watch.hold("bob", "acme:laptop", time.time() + 1e6, "channel", far.close)
        await asyncio.sleep(0.01)
        near = lease("alice", closed=closed)
        watch.hold("alice", "acme:laptop", time.time() + 0.05, "channel", near.close)
        await eventually(lambda: bool(closed), timeout=2)
        assert closed == [("alice", int(CloseCode.UNAUTHORIZED), "token expired")]
    finally:
        task.cancel()
