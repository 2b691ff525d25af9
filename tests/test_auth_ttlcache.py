"""TTLCache: bounded LRU with expiry, driven by an injected clock."""

from __future__ import annotations

import pytest

from relay.auth.ttlcache import TTLCache
from tests.clock import FakeClock


def test_entry_lives_until_ttl_then_disappears() -> None:
    clock = FakeClock()
    cache: TTLCache[str, int] = TTLCache(10, ttl=30, clock=clock)
    cache.set("k", 1)
    clock.advance(29.9)
    assert cache.get("k") == 1
    assert "k" in cache
    clock.advance(0.1)
    assert cache.get("k") is None
    assert "k" not in cache
    assert len(cache) == 0  # dropped on the failed lookup


def test_deadline_caps_the_ttl() -> None:
    clock = FakeClock()
    cache: TTLCache[str, int] = TTLCache(10, ttl=100, clock=clock)
    cache.set("k", 1, deadline=clock.now + 5)
    clock.advance(4.99)
    assert cache.get("k") == 1
    clock.advance(0.01)
    assert cache.get("k") is None


def test_lru_evicts_least_recently_used_when_full() -> None:
    cache: TTLCache[str, int] = TTLCache(2, clock=FakeClock())
    cache.set("a", 1)
    cache.set("b", 2)
    assert cache.get("a") == 1  # a is now most recent
    cache.set("c", 3)
    assert cache.get("b") is None
    assert cache.get("a") == 1
    assert cache.get("c") == 3
    assert len(cache) == 2


def test_changing_ttl_applies_to_stored_entries() -> None:
    clock = FakeClock()
    cache: TTLCache[str, int] = TTLCache(10, ttl=900, clock=clock)
    cache.set("k", 1)
    clock.advance(60)
    cache.ttl = 30
    assert cache.get("k") is None
    cache.set("k2", 2)
    cache.ttl = 900
    clock.advance(600)
    assert cache.get("k2") == 2


def test_remove_where_and_pop_and_purge() -> None:
    clock = FakeClock()
    cache: TTLCache[tuple[str, str], bool] = TTLCache(10, ttl=10, clock=clock)
    cache.set(("alice", "o:1"), True)
    cache.set(("alice", "o:2"), True)
    cache.set(("bob", "o:1"), True)
    assert cache.remove_where(lambda k, v: k[0] == "alice") == 2
    assert list(cache.keys()) == [("bob", "o:1")]
    assert cache.pop(("bob", "o:1")) is True
    assert cache.pop(("bob", "o:1")) is None
    cache.set(("c", "o:1"), True)
    clock.advance(11)
    assert cache.purge_expired() == 1
    assert len(cache) == 0


def test_zero_size_cache_stores_nothing() -> None:
    cache: TTLCache[str, int] = TTLCache(0)
    cache.set("k", 1)
    assert cache.get("k") is None


def test_negative_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        TTLCache(-1)
    with pytest.raises(ValueError):
        TTLCache(1, ttl=-1)
    cache: TTLCache[str, int] = TTLCache(1)
    with pytest.raises(ValueError):
        cache.ttl = -5
