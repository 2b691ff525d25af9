"""A small bounded LRU cache whose entries expire, with the clock passed in.

Used for the access allow/deny caches and the verified-token cache. Written here rather than
taken from a library because those callers need three things together: a TTL that can be
changed at runtime and applies to entries already stored (config reload), an optional
per-entry hard deadline (a token's ``exp``), and removal by predicate (revoke by subject or
host). Pure: no asyncio, no clock read except through ``clock``.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["TTLCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """Bounded LRU with expiry.

    An entry is live while ``now < min(stored_at + ttl, deadline)``. ``ttl`` is read at lookup
    time, so changing it shortens or lengthens entries already stored. ``maxsize == 0`` disables
    the cache (every ``set`` is dropped).
    """

    __slots__ = ("_clock", "_data", "_maxsize", "_ttl")

    def __init__(
        self, maxsize: int, ttl: float = math.inf, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if maxsize < 0:
            raise ValueError("maxsize must not be negative")
        if ttl < 0:
            raise ValueError("ttl must not be negative")
        self._maxsize = maxsize
        self._ttl = float(ttl)
        self._clock = clock
        # key -> (value, stored_at, deadline)
        self._data: OrderedDict[K, tuple[V, float, float]] = OrderedDict()

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @property
    def ttl(self) -> float:
        return self._ttl

    @ttl.setter
    def ttl(self, value: float) -> None:
        if value < 0:
            raise ValueError("ttl must not be negative")
        self._ttl = float(value)

    def _live(self, stored_at: float, deadline: float, now: float) -> bool:
        return now < min(stored_at + self._ttl, deadline)

    def get(self, key: K) -> V | None:
        """The live value for ``key`` (refreshing its LRU position), or None."""
        item = self._data.get(key)
        if item is None:
            return None
        value, stored_at, deadline = item
        if not self._live(stored_at, deadline, self._clock()):
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def set(self, key: K, value: V, *, deadline: float = math.inf) -> None:
        """Store ``value``; it expires after ``ttl`` or at ``deadline`` (clock time), if sooner."""
        if self._maxsize == 0:
            return
        self._data[key] = (value, self._clock(), deadline)
        self._data.move_to_end(key)
        while len(self._data) > self._maxsize:
            self._data.popitem(last=False)

    def pop(self, key: K) -> V | None:
        item = self._data.pop(key, None)
        return None if item is None else item[0]

    def remove_where(self, predicate: Callable[[K, V], bool]) -> int:
        """Drop every entry (live or not) matching ``predicate``; return how many."""
        doomed = [k for k, (v, _, _) in self._data.items() if predicate(k, v)]
        for key in doomed:
            del self._data[key]
        return len(doomed)

    def purge_expired(self) -> int:
        """Drop expired entries now (they are otherwise dropped lazily); return how many."""
        now = self._clock()
        doomed = [k for k, (_, at, dl) in self._data.items() if not self._live(at, dl, now)]
        for key in doomed:
            del self._data[key]
        return len(doomed)

    def clear(self) -> None:
        self._data.clear()

    def __contains__(self, key: object) -> bool:
        item = self._data.get(key)  # type: ignore[arg-type]
        return item is not None and self._live(item[1], item[2], self._clock())

    def __len__(self) -> int:
        """Stored entries, including expired ones not yet dropped."""
        return len(self._data)

    def keys(self) -> Iterator[K]:
        """A snapshot of the stored keys, oldest first (including expired ones)."""
        return iter(list(self._data))
