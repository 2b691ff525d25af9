"""Where one proxied exchange's time went: auth, access, tunnel wait, the host's response head.

A :class:`PathTimer` exists only when ``server.server_timing`` or tracing is on (the middleware in
:mod:`relay.server.observe` attaches it to the request); the edge and the proxies call
:func:`lap` at each phase boundary, which is a dictionary miss when it is off. Laps are
contiguous, so the four durations add up to the time to the host's response head.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from aiohttp import web

from relay.protocol.messages import Open
from relay.tracing import with_trace_headers

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from relay.tracing import Tracing

PHASES = ("auth", "access", "tunnel", "host")
# Each phase is an event on the exchange's span, at the moment it ended, carrying its duration.
# Events, not child spans: four more spans per request cost the relay about three times the CPU
# (creating and encoding them) for the same information.
EVENT_NAMES = {
    "auth": "relay.auth",
    "access": "relay.access",
    "tunnel": "relay.tunnel_wait",
    "host": "relay.host_head",
}


class PathTimer:
    __slots__ = ("_last", "_wall_offset", "durations_ms", "server_timing", "span", "tracing")

    def __init__(self, tracing: Tracing | None, span: Span | None, *, server_timing: bool) -> None:
        self.tracing = tracing
        self.span = span
        self.server_timing = server_timing
        self.durations_ms: dict[str, float] = {}
        self._last = time.perf_counter_ns()
        # Spans take wall-clock nanoseconds; durations come from the monotonic clock.
        self._wall_offset = time.time_ns() - self._last if span is not None else 0

    def lap(self, phase: str) -> None:
        now = time.perf_counter_ns()
        duration_ms = self.durations_ms[phase] = (now - self._last) / 1e6
        if self.span is not None:
            self.span.add_event(EVENT_NAMES.get(phase, phase), {"duration_ms": duration_ms},
                                timestamp=now + self._wall_offset)
        self._last = now

    def restart(self) -> None:
        """The next lap starts now (time in between belongs to no phase)."""
        self._last = time.perf_counter_ns()

    def header(self, phases: tuple[str, ...] = PHASES) -> str | None:
        """The ``Server-Timing`` value for the phases measured here, or None when it is off."""
        if not self.server_timing:
            return None
        entries = [f"{p};dur={self.durations_ms[p]:.3f}" for p in phases if p in self.durations_ms]
        return ", ".join(entries) or None

    def next_hop_headers(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``headers`` for the next hop: its trace parent is this exchange's span."""
        if self.span is None or self.tracing is None:
            return headers
        return with_trace_headers(headers, self.tracing.inject(self.span))


PATH_TIMER: web.RequestKey[PathTimer] = web.RequestKey("relay_path_timer", PathTimer)


def timer_of(request: web.Request) -> PathTimer | None:
    # web.Request.get is collections.abc's Mapping.get: without a timer (the default: no
    # tracing, no Server-Timing) it raises and catches a KeyError, about 1 µs, three times per
    # exchange. aiohttp keeps a request's items in the dict ``_state``.
    items = getattr(request, "_state", None)
    if type(items) is dict:
        timer: PathTimer | None = items.get(PATH_TIMER)
        return timer
    return request.get(PATH_TIMER)


def lap(request: web.Request, phase: str) -> None:
    timer = timer_of(request)
    if timer is not None:
        timer.lap(phase)


def trace_next_hop(timer: PathTimer, head: Open) -> Open:
    """The host's (or the agent's) trace parent is this exchange's span."""
    headers = timer.next_hop_headers(list(head.headers))
    return dataclasses.replace(head, headers=tuple(headers))
