"""Reconnect delays: exponential growth with half jitter, a cap, resets and the slow lane."""

from __future__ import annotations

import itertools

import pytest

from relay.agent.backoff import Backoff


def low() -> float:
    return 0.0


def high() -> float:
    return 0.999999


def test_delays_double_from_base_at_the_jitter_floor() -> None:
    backoff = Backoff(base=0.5, cap=100, rng=low)
    assert [backoff.next_delay() for _ in range(5)] == [0.25, 0.5, 1.0, 2.0, 4.0]


def test_delays_double_from_base_at_the_jitter_ceiling() -> None:
    backoff = Backoff(base=0.5, cap=100, rng=high)
    delays = [backoff.next_delay() for _ in range(5)]
    assert delays == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0], rel=1e-5)


def test_jitter_spreads_delays_over_the_upper_half() -> None:
    values = itertools.cycle([0.0, 0.25, 0.5, 0.75])
    backoff = Backoff(base=8, cap=8, rng=lambda: next(values))
    assert [backoff.next_delay() for _ in range(4)] == [4.0, 5.0, 6.0, 7.0]


def test_delays_never_exceed_the_cap() -> None:
    backoff = Backoff(base=0.5, cap=30, rng=high)
    delays = [backoff.next_delay() for _ in range(40)]
    assert max(delays) <= 30
    assert delays[-1] == pytest.approx(30, rel=1e-5)
    assert all(d >= 15 for d in delays[7:])  # the floor stays at half the cap


def test_a_host_offline_for_days_still_gets_a_capped_delay() -> None:
    """float ** int overflows after ~1000 doublings; the reconnect loop must not die of it."""
    backoff = Backoff(base=0.5, cap=30, rng=low)
    for _ in range(5000):
        delay = backoff.next_delay()
    assert delay == 15.0
    backoff.attempt = 10**9
    assert backoff.next_delay() == 15.0
    assert backoff.slow() == 15.0


def test_reset_starts_over_from_base() -> None:
    backoff = Backoff(base=1, cap=60, rng=low)
    for _ in range(6):
        backoff.next_delay()
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.next_delay() == 0.5


def test_slow_waits_near_the_cap_whatever_the_history() -> None:
    fresh = Backoff(base=0.5, cap=40, rng=low)
    assert fresh.slow() == 20.0
    jittered = Backoff(base=0.5, cap=40, rng=high)
    assert 20.0 <= jittered.slow() <= 40.0


def test_slow_counts_as_an_attempt() -> None:
    backoff = Backoff(base=1, cap=64, rng=low)
    backoff.slow()
    backoff.slow()
    assert backoff.next_delay() == 2.0  # third attempt: 1 * 2**2 / 2


def test_default_rng_stays_within_bounds() -> None:
    backoff = Backoff(base=0.1, cap=2)
    for attempt in range(30):
        ceiling = min(2, 0.1 * 2**attempt)
        assert ceiling / 2 <= backoff.next_delay() <= ceiling
