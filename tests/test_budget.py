"""The PING budget's token bucket on a fake clock, and the tunnel keys that bound a flood."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import load_config
from relay.errors import ConfigError
from relay.protocol.budget import RateBudget, ping_burst
from tests.harness import write_config


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


@pytest.mark.parametrize("lockout", [-1, 3601])
def test_a_flood_lockout_out_of_range_is_refused_at_load(tmp_path: Path, lockout: float) -> None:
    path = write_config(tmp_path, {"tunnel": {"flood_lockout_s": lockout}})
    with pytest.raises(ConfigError, match=r"tunnel\.flood_lockout_s"):
        load_config(path, env={})


def test_the_flood_lockout_defaults_to_ten_seconds_and_zero_turns_it_off(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path), env={}).tunnel.flood_lockout_s == 10
    path = write_config(tmp_path, {"tunnel": {"flood_lockout_s": 0}})
    assert load_config(path, env={}).tunnel.flood_lockout_s == 0
