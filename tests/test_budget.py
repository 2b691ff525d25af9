"""The PING budget's token bucket, on a fake clock."""

from __future__ import annotations

import pytest

from relay.protocol.budget import RateBudget, ping_burst


def test_a_burst_passes_then_the_rate_holds() -> None:
    budget = RateBudget(rate=8, burst=16, now=100.0)
    assert all(budget.allow(100.0) for _ in range(16))
    assert not budget.allow(100.0)
    # A second refills eight tokens, never more than the burst.
    assert sum(budget.allow(101.0) for _ in range(20)) == 8
    assert sum(budget.allow(1000.0) for _ in range(40)) == 16


def test_an_honest_agent_never_meets_it() -> None:
    budget = RateBudget(rate=8, burst=ping_burst(8), now=0.0)
    # One PING per second for an hour, plus a burst of 10 at every minute (a reconnect storm).
    for second in range(3600):
        assert budget.allow(float(second))
        if second % 60 == 0:
            assert all(budget.allow(second + 0.5) for _ in range(10))


def test_a_clock_going_backwards_grants_nothing() -> None:
    budget = RateBudget(rate=1, burst=1, now=50.0)
    assert budget.allow(50.0)
    assert not budget.allow(40.0)
    assert not budget.allow(50.5)
    assert budget.allow(51.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, 16), (-1, 16), (8, 0.5)])
def test_a_budget_that_could_never_allow_is_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        RateBudget(rate, burst, 0.0)
