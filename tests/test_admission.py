"""Stream admission on one tunnel: bounded, fair queue past max_streams, per-subject share.

The pure module with a FakeClock, then the awaitable gate on top of it (no sockets).
"""

from __future__ import annotations

import asyncio

import pytest

from relay.errors import HostOffline, Overloaded
from relay.tunnel.admission import Admission, Ticket, TicketState
from relay.tunnel.gate import StreamGate
from tests.clock import FakeClock


def admission(max_streams: int = 4, *, per_subject: int = 0, max_queued: int = 8,
              timeout: float = 5.0, clock: FakeClock | None = None) -> Admission:
    return Admission(max_streams, per_subject=per_subject, max_queued=max_queued,
                     queue_timeout_s=timeout, clock=clock or FakeClock())


def states(tickets: list[Ticket]) -> list[str]:
    return [t.state.value for t in tickets]


def test_default_share_is_half_the_tunnel() -> None:
    assert admission(256).share == 128
    assert admission(1).share == 1
    assert admission(10, per_subject=3).share == 3


def test_requests_under_the_limits_are_admitted_at_once() -> None:
    a = admission(4, per_subject=4)
    tickets = [a.request("alice") for _ in range(4)]
    assert states(tickets) == ["admitted"] * 4
    assert a.in_flight == 4 and a.queued == 0


def test_past_max_streams_requests_wait_and_go_in_order_as_streams_free() -> None:
    a = admission(2, per_subject=2)
    first, second = a.request("alice"), a.request("alice")
    waiting = [a.request("alice") for _ in range(3)]
    assert states(waiting) == ["waiting"] * 3 and a.queued == 3
    assert a.release(first) == [waiting[0]]
    assert waiting[0].state is TicketState.ADMITTED
    assert a.release(second) == [waiting[1]]
    assert a.in_flight == 2 and a.queued == 1


def test_a_subject_at_its_share_waits_even_with_room_and_others_pass_it() -> None:
    a = admission(4, per_subject=2)
    alice = [a.request("alice") for _ in range(2)]
    alice_waits = a.request("alice")
    assert alice_waits.state is TicketState.WAITING  # room on the tunnel, but not for alice
    bob = a.request("bob")
    assert bob.state is TicketState.ADMITTED  # bob is not stuck behind alice's waiter
    assert a.release(alice[0]) == [alice_waits]


def test_when_a_stream_frees_the_oldest_waiter_under_its_share_goes_first() -> None:
    a = admission(3, per_subject=2)
    alice = [a.request("alice") for _ in range(2)]  # alice at her share
    bob = a.request("bob")  # the tunnel is full
    alice_more = [a.request("alice") for _ in range(2)]  # queued first
    bob_more = a.request("bob")  # queued last
    # Bob's stream frees: alice's waiters are older, but alice is at her share.
    assert a.release(bob) == [bob_more]
    # One of alice's frees: her oldest waiter goes (FIFO within a subject).
    assert a.release(alice[0]) == [alice_more[0]]
    assert alice_more[1].state is TicketState.WAITING


def test_fifo_among_subjects_under_their_share() -> None:
    a = admission(2, per_subject=2)
    held = [a.request("alice") for _ in range(2)]
    order = [a.request(who) for who in ("carol", "alice", "bob")]
    assert a.release(held[0]) == [order[0]]
    assert a.release(held[1]) == [order[1]]


def test_one_subject_cannot_take_more_than_its_share_of_a_burst() -> None:
    a = admission(256, max_queued=4096)
    burst = [a.request("alice") for _ in range(1500)]
    assert sum(t.state is TicketState.ADMITTED for t in burst) == 128
    assert a.queued == 1500 - 128
    assert a.request("bob").state is TicketState.ADMITTED


def test_waiters_time_out_at_their_deadline() -> None:
    clock = FakeClock()
    a = admission(1, timeout=5.0, clock=clock)
    a.request("alice")
    early = a.request("alice")
    clock.advance(2)
    late = a.request("alice")
    assert a.next_deadline() == early.deadline
    clock.advance(2.9)
    assert a.expire() == []
    clock.advance(0.1)
    assert a.expire() == [early] and early.state is TicketState.TIMED_OUT
    assert a.next_deadline() == late.deadline
    clock.advance(2)
    assert a.expire() == [late]
    assert a.queued == 0 and a.next_deadline() is None


def test_a_full_queue_refuses_at_once() -> None:
    a = admission(1, max_queued=2)
    a.request("alice")
    assert states([a.request("alice"), a.request("bob")]) == ["waiting", "waiting"]
    assert a.request("carol").state is TicketState.REFUSED


def test_a_zero_queue_timeout_sheds_at_once() -> None:
    a = admission(1, timeout=0)
    a.request("alice")
    assert a.request("bob").state is TicketState.REFUSED


def test_channels_never_wait_and_are_refused_past_the_share() -> None:
    a = admission(4, per_subject=2)
    assert states([a.open_channel("alice"), a.open_channel("alice")]) == ["admitted"] * 2
    assert a.open_channel("alice").state is TicketState.REFUSED
    assert a.request("bob").state is TicketState.ADMITTED
    assert a.open_channel("bob").state is TicketState.ADMITTED
    assert a.open_channel("carol").state is TicketState.REFUSED  # the tunnel is full
    assert a.queued == 0


def test_cancelled_waiters_leave_the_queue_and_releases_are_idempotent() -> None:
    a = admission(1)
    held = a.request("alice")
    gone, stays = a.request("bob"), a.request("carol")
    assert a.cancel(gone) and gone.state is TicketState.CANCELLED
    assert not a.cancel(gone)
    assert a.release(held) == [stays]
    assert a.release(held) == []  # a second release frees nothing
    assert a.in_flight == 1


def test_close_fails_every_waiter_and_admits_nobody_after() -> None:
    a = admission(1)
    a.request("alice")
    waiters = [a.request("bob"), a.request("carol")]
    assert a.close() == waiters
    assert states(waiters) == ["closed", "closed"]
    assert a.request("dave").state is TicketState.REFUSED


# -- the awaitable gate ---------------------------------------------------------------------------


def gate(max_streams: int = 1, timeout: float = 5.0, **kwargs: int) -> StreamGate:
    return StreamGate.build(max_streams, per_subject=kwargs.get("per_subject", 0),
                            max_queued=kwargs.get("max_queued", 8), queue_timeout_s=timeout)


async def test_a_waiter_wakes_when_a_stream_is_released() -> None:
    g = gate(1)
    held = await g.acquire("alice")
    waiter = asyncio.ensure_future(g.acquire("bob"))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    g.release(held)
    ticket = await asyncio.wait_for(waiter, 1)
    assert ticket.state is TicketState.ADMITTED and g.admission.in_flight == 1


async def test_a_waiter_that_waits_too_long_gets_overloaded() -> None:
    g = gate(1, timeout=0.05)
    await g.acquire("alice")
    with pytest.raises(Overloaded):
        await asyncio.wait_for(g.acquire("bob"), 1)
    assert g.admission.queued == 0


async def test_a_cancelled_waiter_gives_its_slot_back() -> None:
    g = gate(1)
    held = await g.acquire("alice")
    waiter = asyncio.ensure_future(g.acquire("bob"))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    g.release(held)
    assert g.admission.in_flight == 0 and g.admission.queued == 0


async def test_waiters_fail_with_host_offline_when_the_tunnel_goes() -> None:
    g = gate(1)
    await g.acquire("alice")
    waiter = asyncio.ensure_future(g.acquire("bob"))
    await asyncio.sleep(0.01)
    g.close()
    with pytest.raises(HostOffline):
        await asyncio.wait_for(waiter, 1)


async def test_http_slot_holds_and_returns_the_stream() -> None:
    g = gate(2, per_subject=2)
    async with g.http_slot("alice"):
        assert g.admission.in_flight == 1
    assert g.admission.in_flight == 0
    with pytest.raises(Overloaded):
        g.open_channel("alice")
        g.open_channel("alice")
        g.open_channel("alice")
