"""Long-lived connections keep to their credentials: every open WebSocket channel and tunnel
holds a lease (subject, host, deadline). At the deadline (the token's ``exp`` plus the auth
leeway) the connection is closed 4401 "token expired"; a revocation closes the leases it names
with 4403; a tunnel that renews its token in-band moves its deadline.

One timer for all of them: :class:`LeaseBook` (pure) keeps the deadlines in a heap, and
:class:`LeaseWatch` runs one task that sleeps until the earliest. That closes each connection
at its deadline, not at the next tick of a periodic sweep, and costs O(log n) per lease instead
of a timer (or a check per tick) per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from relay.errors import CloseCode
from relay.metrics import CredentialClose

log = structlog.get_logger("relay.leases")

# The timer re-reads the wall clock at least this often, so a clock step cannot delay a close
# by more than this.
MAX_SLEEP_S = 30.0

Closer = Callable[[int, str], None]


@dataclass(eq=False, slots=True)
class Lease:
    sub: str
    host_id: str
    deadline: float  # wall-clock seconds; math.inf for a connection whose expiry is not ours
    kind: str  # "channel" or "tunnel", for logs
    close: Closer = field(repr=False)
    active: bool = True


class LeaseBook:
    """Deadlines in a heap with lazy deletion; ended or moved leases leave stale entries that
    are skipped, and the heap is rebuilt when those outnumber the live ones."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Lease]] = []
        self._live: set[Lease] = set()
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def add(self, lease: Lease) -> None:
        self._live.add(lease)
        if lease.deadline != math.inf:
            heapq.heappush(self._heap, (lease.deadline, next(self._seq), lease))

    def remove(self, lease: Lease) -> None:
        if lease.active:
            lease.active = False
            self._live.discard(lease)
            self._compact()

    def move(self, lease: Lease, deadline: float) -> None:
        """A renewed credential: the lease now ends at ``deadline``."""
        if not lease.active:
            return
        lease.deadline = deadline
        if deadline != math.inf:
            heapq.heappush(self._heap, (deadline, next(self._seq), lease))
        self._compact()

    def due(self, now: float) -> list[Lease]:
        """Leases whose deadline has passed; they are removed (the caller closes them)."""
        expired = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, lease = heapq.heappop(heap)
            if lease.active and lease.deadline == deadline:
                lease.active = False
                self._live.discard(lease)
                expired.append(lease)
        return expired

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap:
            deadline, _, lease = heap[0]
            if lease.active and lease.deadline == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def matching(self, sub: str | None, host_id: str | None) -> list[Lease]:
        """Live leases of ``sub`` (any host when None) on ``host_id`` (any subject when None)."""
        if sub is None and host_id is None:
            return []  # "revoke everything cached" is about caches, not connections
        return [lease for lease in self._live
                if (sub is None or lease.sub == sub)
                and (host_id is None or lease.host_id == host_id)]

    def _compact(self) -> None:
        if len(self._heap) > 64 and len(self._heap) > 2 * len(self._live):
            self._heap = [entry for entry in self._heap
                          if entry[2].active and entry[2].deadline == entry[0]]
            heapq.heapify(self._heap)


class LeaseWatch:
    """The relay's one timer for credential deadlines, and the revocation fan-out to sockets."""

    def __init__(self, clock: Callable[[], float] = time.time,
                 on_close: Callable[[str, str], None] | None = None) -> None:
        self.book = LeaseBook()
        self._clock = clock
        self._wake = asyncio.Event()
        # (kind, "expired" | "revoked") for every connection closed, for metrics.
        self.on_close = on_close

    def hold(self, sub: str, host_id: str, deadline: float, kind: str, close: Closer) -> Lease:
        lease = Lease(sub, host_id, deadline, kind, close)
        earliest = self.book.next_deadline()
        self.book.add(lease)
        if earliest is None or deadline < earliest:
            self._wake.set()
        return lease

    def clock_stepped(self) -> None:
        """Re-read the clock now rather than at the next deadline: it was stepped (a test's
        clock; a real step is noticed within MAX_SLEEP_S anyway)."""
        self._wake.set()

    def end(self, lease: Lease | None) -> None:
        if lease is not None:
            self.book.remove(lease)

    def move(self, lease: Lease, deadline: float) -> None:
        self.book.move(lease, deadline)
        self._wake.set()

    def revoke(self, sub: str | None, host_id: str | None) -> int:
        """Close (4403) every connection of what was revoked; returns how many."""
        leases = self.book.matching(sub, host_id)
        for lease in leases:
            self.book.remove(lease)
            log.info("lease.revoked", kind=lease.kind, sub=lease.sub, host_id=lease.host_id)
            self._close(lease, int(CloseCode.FORBIDDEN), "access revoked", CredentialClose.REVOKED)
        return len(leases)

    def expire_due(self) -> int:
        expired = self.book.due(self._clock())
        for lease in expired:
            log.info("lease.expired", kind=lease.kind, sub=lease.sub, host_id=lease.host_id)
            self._close(lease, int(CloseCode.UNAUTHORIZED), "token expired",
                        CredentialClose.EXPIRED)
        return len(expired)

    async def run(self) -> None:
        while True:
            self.expire_due()
            deadline = self.book.next_deadline()
            delay = MAX_SLEEP_S if deadline is None else deadline - self._clock()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                # A hair past the deadline, so the wall clock has surely reached it on waking.
                await asyncio.wait_for(self._wake.wait(),
                                       min(max(delay, 0.0) + 0.001, MAX_SLEEP_S))

    def _close(self, lease: Lease, code: int, reason: str, why: CredentialClose) -> None:
        if self.on_close is not None:
            self.on_close(lease.kind, why)
        try:
            lease.close(code, reason)
        except Exception:
            # One connection failing to close must not keep the others open.
            log.exception("lease.close_failed", kind=lease.kind, host_id=lease.host_id)
