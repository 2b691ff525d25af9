"""Per-peer failure throttle: too many wrong admin secrets from one address answer 429 for a while.

Pure (the clock is passed in) and bounded: at most ``max_peers`` addresses are tracked; the
least recently failing one is forgotten first, so a flood from many addresses costs memory
proportional to ``max_peers``, never to the number of attackers.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Peer:
    window_start: float
    failures: int = 0
    locked_until: float = 0.0


@dataclass(slots=True)
class FailureThrottle:
    max_failures: int
    window_s: float
    lockout_s: float
    clock: Callable[[], float]
    max_peers: int = 4096
    _peers: OrderedDict[str, _Peer] = field(default_factory=OrderedDict)

    def retry_after(self, peer: str) -> int | None:
        """Seconds until ``peer`` may try again, or None when it is not locked out."""
        entry = self._peers.get(peer)
        if entry is None:
            return None
        left = entry.locked_until - self.clock()
        return max(1, math.ceil(left)) if left > 0 else None

    def failed(self, peer: str) -> int | None:
        """Count a failure; returns the lockout (seconds) when this one trips it."""
        now = self.clock()
        entry = self._peers.get(peer)
        if entry is None or now - entry.window_start >= self.window_s:
            entry = _Peer(window_start=now)
        entry.failures += 1
        self._peers[peer] = entry
        self._peers.move_to_end(peer)
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)
        if entry.failures >= self.max_failures:
            entry.locked_until = now + self.lockout_s
            # The next window starts when the lockout ends: one more failure after it is not
            # an instant second lockout, but max_failures more are.
            entry.window_start = entry.locked_until
            entry.failures = 0
            return max(1, math.ceil(self.lockout_s))
        return None

    def succeeded(self, peer: str) -> None:
        self._peers.pop(peer, None)

    def __len__(self) -> int:
        return len(self._peers)
