"""Who may open a stream on one host's tunnel now, who waits, and who is refused. Pure: no I/O.

A tunnel carries at most ``max_streams`` streams. Past that, HTTP exchanges wait in a bounded
FIFO queue (``max_queued``) for at most ``queue_timeout_s``. One subject may hold at most
``per_subject`` streams on the host; its further HTTP exchanges wait even when the tunnel has
room, its further WebSocket channels are refused (a channel is long-lived: waiting behind
channels that may never end helps nobody). When a stream ends, the oldest waiter whose subject
is under its share goes next, so one busy client cannot starve the others and a burst is
served in order instead of being shed.

Time comes from an injected clock; :mod:`relay.tunnel.gate` turns this into awaitables.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum


class TicketState(Enum):
    WAITING = "waiting"
    ADMITTED = "admitted"  # holds a stream slot until released
    REFUSED = "refused"  # the queue was full, or (channels) the subject is at its share
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"  # the caller gave up while waiting
    CLOSED = "closed"  # the tunnel went away while it waited


@dataclass(eq=False, slots=True)
class Ticket:
    subject: str
    deadline: float
    seq: int
    state: TicketState = TicketState.WAITING


class Admission:
    """Stream slots of one tunnel, shared fairly between subjects."""

    def __init__(self, max_streams: int, *, per_subject: int = 0, max_queued: int = 4096,
                 queue_timeout_s: float = 5.0, clock: Callable[[], float]) -> None:
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        self.max_streams = max_streams
        # 0 means half the tunnel, so one subject always leaves room for the others.
        self.share = per_subject or max(1, max_streams // 2)
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self._clock = clock
        self.in_flight = 0
        self._held: dict[str, int] = {}
        # Per subject, its waiters oldest first; all waiters share one timeout, so the global
        # FIFO order is also deadline order and expiry only ever looks at the oldest.
        self._waiting: dict[str, collections.deque[Ticket]] = {}
        # Created by the first waiter: most tunnels never queue anyone, and an empty deque is
        # 760 bytes of an idle tunnel (bench W4).
        self._order: collections.deque[Ticket] | None = None
        self.queued = 0
        self.closed = False
        self._seq = itertools.count()

    def now(self) -> float:
        return self._clock()

    def held_by(self, subject: str) -> int:
        return self._held.get(subject, 0)

    # -- asking -------------------------------------------------------------------------------
    def request(self, subject: str) -> Ticket:
        """An HTTP exchange wants a stream: admitted, queued (WAITING) or refused (queue full)."""
        now = self._clock()
        ticket = Ticket(subject, now + self.queue_timeout_s, next(self._seq))
        # Waiters that could go are only ever ones whose subject is at its share, so a newcomer
        # under its share with room on the tunnel does not jump anyone eligible.
        if self.in_flight < self.max_streams and self.held_by(subject) < self.share:
            self._take(ticket)
            return ticket
        if self.closed or self.queued >= self.max_queued or self.queue_timeout_s <= 0:
            ticket.state = TicketState.REFUSED
            return ticket
        self._waiting.setdefault(subject, collections.deque()).append(ticket)
        if self._order is None:
            self._order = collections.deque()
        self._order.append(ticket)
        self.queued += 1
        return ticket

    def open_channel(self, subject: str) -> Ticket:
        """A WebSocket channel wants a stream: admitted or refused, never queued."""
        ticket = Ticket(subject, self._clock(), next(self._seq))
        if self.in_flight < self.max_streams and self.held_by(subject) < self.share:
            self._take(ticket)
        else:
            ticket.state = TicketState.REFUSED
        return ticket

    # -- giving back --------------------------------------------------------------------------
    def release(self, ticket: Ticket) -> list[Ticket]:
        """``ticket``'s stream ended; returns the waiters admitted into the freed room."""
        if ticket.state is not TicketState.ADMITTED:
            return []
        ticket.state = TicketState.CANCELLED  # released: a second release is a no-op
        self.in_flight -= 1
        left = self._held[ticket.subject] - 1
        if left:
            self._held[ticket.subject] = left
        else:
            del self._held[ticket.subject]
        return self._admit_waiters()

    def cancel(self, ticket: Ticket) -> bool:
        """The caller stopped waiting; False if it was no longer waiting (admitted meanwhile)."""
        if ticket.state is not TicketState.WAITING:
            return False
        self._unqueue(ticket, TicketState.CANCELLED)
        return True

    def expire(self) -> list[Ticket]:
        """Waiters whose deadline has passed: removed, TIMED_OUT."""
        now = self._clock()
        expired = []
        order = self._order
        while order:
            head = order[0]
            if head.state is not TicketState.WAITING:
                order.popleft()
                continue
            if head.deadline > now:
                break
            self._unqueue(head, TicketState.TIMED_OUT)
            expired.append(head)
        return expired

    def next_deadline(self) -> float | None:
        for ticket in self._order or ():
            if ticket.state is TicketState.WAITING:
                return ticket.deadline
        return None

    def close(self) -> list[Ticket]:
        """The tunnel is gone: every waiter is CLOSED (returned) and nobody is admitted again."""
        waiters = [t for t in self._order or () if t.state is TicketState.WAITING]
        for ticket in waiters:
            ticket.state = TicketState.CLOSED
        self._waiting.clear()
        self._order = None
        self.queued = 0
        self.max_streams = 0
        self.closed = True
        return waiters

    # -- internals ----------------------------------------------------------------------------
    def _take(self, ticket: Ticket) -> None:
        ticket.state = TicketState.ADMITTED
        self.in_flight += 1
        self._held[ticket.subject] = self.held_by(ticket.subject) + 1

    def _unqueue(self, ticket: Ticket, state: TicketState) -> None:
        queue = self._waiting[ticket.subject]
        if queue[0] is ticket:
            queue.popleft()  # the common case: the oldest times out or goes first
        else:
            queue.remove(ticket)
        if not queue:
            del self._waiting[ticket.subject]
        ticket.state = state
        self.queued -= 1
        # Drop finished tickets from the front of the global order, so it only ever spans the
        # waiters still queued and whatever arrived since the oldest of them.
        order = self._order
        while order and order[0].state is not TicketState.WAITING:
            order.popleft()

    def _admit_waiters(self) -> list[Ticket]:
        admitted: list[Ticket] = []
        while self.in_flight < self.max_streams and self._waiting:
            # The oldest waiter among the subjects still under their share (FIFO within each).
            best: Ticket | None = None
            for subject, queue in self._waiting.items():
                if self.held_by(subject) < self.share and (best is None or queue[0].seq < best.seq):
                    best = queue[0]
            if best is None:
                break
            self._unqueue(best, TicketState.ADMITTED)
            self._take(best)
            admitted.append(best)
        return admitted
