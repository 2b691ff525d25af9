"""Reconnect delays: exponential with half jitter, reset by a relay's drain. Pure; rng injected."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """``base * factor**n`` capped at ``cap``, drawn uniformly from its upper half.

    Half-jitter keeps a floor under each delay (so a failing relay is not hammered) while still
    spreading a crowd of agents that lost the same relay at the same moment.
    """

    def __init__(self, base: float = 0.5, cap: float = 30.0, factor: float = 2.0,
                 rng: Callable[[], float] = random.random) -> None:
        self.base, self.cap, self.factor = base, cap, factor
        self._rng = rng
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = self._ceiling()
        self.attempt += 1
        return ceiling / 2 + self._rng() * ceiling / 2

    def slow(self) -> float:
        """A delay at the cap, for refusals that retrying fast cannot fix."""
        self.attempt += 1
        return self.cap / 2 + self._rng() * self.cap / 2

    def _ceiling(self) -> float:
        try:
            return min(self.cap, self.base * self.factor ** self.attempt)
        except OverflowError:  # ~1000 doublings: a host offline for days is still capped
            return self.cap

    def reset(self) -> None:
        self.attempt = 0
