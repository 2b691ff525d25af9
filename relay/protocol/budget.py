"""A token bucket for frames a peer may send only now and then (PINGs), on an injected clock.

An honest agent sends one PING per ping interval. A peer that sends them as fast as its
socket allows costs the relay a decode and a (coalesced) PONG for each, CPU every other tunnel
on the process pays for: HTTP/2 servers call this a control-frame flood (CVE-2019-9512) and
end the connection. The bucket says when a peer has crossed that line.
"""

from __future__ import annotations


class RateBudget:
    """``rate`` events per second on average, ``burst`` at once; pure: the caller gives ``now``."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a budget needs a positive rate and a burst of at least 1")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = now

    def allow(self, now: float) -> bool:
        """Spend one token if there is one; False means the peer is over its budget."""
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


def ping_burst(rate: float) -> float:
    """The burst allowed above ``rate``: room for an agent catching up after a stall, a PING
    per WebSocket-level and tunnel-level keepalive, and probes such as `relay status`."""
    return max(16.0, 2 * rate)
