"""The awaitable face of :class:`relay.tunnel.admission.Admission`: wait for a stream slot.

Thin on purpose: the decisions (who goes, who waits, who times out) are the pure module's; this
only parks each waiting exchange on a future and wakes it. No task of its own: each waiter's
wait is bounded by its own deadline, and whoever times out first sweeps every expired waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Final

from relay.errors import HostOffline, Overloaded
from relay.metrics import QueueOutcome
from relay.tunnel.admission import Admission, Ticket, TicketState

# What became of an exchange that could not start at once (for metrics): outcome, seconds waited.
Observer = Callable[[str, float], None]
_OUTCOMES: Final = {TicketState.ADMITTED: QueueOutcome.WAITED,
                    TicketState.TIMED_OUT: QueueOutcome.TIMED_OUT,
                    TicketState.CLOSED: QueueOutcome.TUNNEL_GONE}


def _ignore(outcome: str, waited_s: float) -> None:
    return None


class HttpSlot:
    """``async with gate.http_slot(subject)``: a class, not a generator-based context manager,
    since every proxied request enters one (the generator's machinery cost more than the
    admission decision itself)."""

    __slots__ = ("_gate", "_subject", "_ticket")

    def __init__(self, gate: StreamGate, subject: str) -> None:
        self._gate = gate
        self._subject = subject
        self._ticket: Ticket | None = None

    async def __aenter__(self) -> None:
        self._ticket = await self._gate.acquire(self._subject)

    async def __aexit__(self, *_: object) -> None:
        if self._ticket is not None:
            self._gate.release(self._ticket)


class StreamGate:
    def __init__(self, admission: Admission, observe: Observer = _ignore) -> None:
        self.admission = admission
        self._observe = observe
        self._wakers: dict[Ticket, asyncio.Future[None]] = {}

    @classmethod
    def build(cls, max_streams: int, *, per_subject: int, max_queued: int,
              queue_timeout_s: float, clock: Callable[[], float] = time.monotonic,
              observe: Observer = _ignore) -> StreamGate:
        return cls(Admission(max_streams, per_subject=per_subject, max_queued=max_queued,
                             queue_timeout_s=queue_timeout_s, clock=clock), observe)

    def http_slot(self, subject: str) -> HttpSlot:
        """Hold a stream slot for one HTTP exchange; waits (bounded) or raises Overloaded."""
        return HttpSlot(self, subject)

    async def acquire(self, subject: str) -> Ticket:
        ticket = self.admission.request(subject)
        # A local copy: narrowing ticket.state here would outlive the waits that change it.
        first = ticket.state
        if first is TicketState.ADMITTED:
            return ticket
        if first is TicketState.REFUSED:
            self._observe(QueueOutcome.QUEUE_FULL, 0.0)
            raise Overloaded("too many requests waiting for this host; retry shortly")
        queued_at = self.admission.now()
        waker = asyncio.get_running_loop().create_future()
        self._wakers[ticket] = waker
        try:
            while ticket.state is TicketState.WAITING:
                remaining = ticket.deadline - self.admission.now()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waker), max(0.0, remaining) + 0.001)
                if ticket.state is TicketState.WAITING:
                    self._wake(self.admission.expire())
        except BaseException:
            # Cancelled (the client went away): give the slot back if it was just granted.
            if not self.admission.cancel(ticket):
                self.release(ticket)
            raise
        finally:
            self._wakers.pop(ticket, None)
        outcome = _OUTCOMES.get(ticket.state)
        if outcome is not None:
            self._observe(outcome, self.admission.now() - queued_at)
        if ticket.state is TicketState.ADMITTED:
            return ticket
        if ticket.state is TicketState.CLOSED:
            raise HostOffline("the host's tunnel went away while the request waited; retry")
        raise Overloaded("too many concurrent streams to this host; retry shortly")

    def open_channel(self, subject: str) -> Ticket:
        """A slot for a WebSocket channel, or Overloaded (1013) at once."""
        ticket = self.admission.open_channel(subject)
        if ticket.state is not TicketState.ADMITTED:
            if self.admission.held_by(subject) >= self.admission.share:
                raise Overloaded("you hold this host's share of streams; close some, retry later")
            raise Overloaded("this host has no free stream; retry later")
        return ticket

    def release(self, ticket: Ticket) -> None:
        self._wake(self.admission.release(ticket))

    def close(self) -> None:
        """The tunnel is gone: every waiter fails now rather than at its deadline."""
        self._wake(self.admission.close())

    def _wake(self, tickets: list[Ticket]) -> None:
        for ticket in tickets:
            waker = self._wakers.get(ticket)
            if waker is not None and not waker.done():
                waker.set_result(None)
