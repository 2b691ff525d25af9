"""Per-stream state machine and flow-control windows, as data. Pure: no I/O, no clock.

A stream's life is a transition table. Each side may end its sending half with FIN; either
side may end the whole stream with CLOSE. Sending or receiving data on a half that is already
finished is a protocol violation.

Flow control is credit-based, per stream and direction, like HTTP/2: a sender may only send
as many DATA payload bytes as the receiver has granted; the receiver grants credit back (WINDOW)
as its consumer drains the bytes. So no stream ever has more than one window of bytes buffered
at the receiver, however slow the final reader is.
"""

from __future__ import annotations

from enum import Enum

from relay.errors import ProtocolViolation
from relay.protocol.frames import MAX_WINDOW


class StreamState(Enum):
    OPEN = "open"
    LOCAL_DONE = "local_done"  # we sent FIN; we may still receive
    REMOTE_DONE = "remote_done"  # peer sent FIN; we may still send
    CLOSED = "closed"


class StreamEvent(Enum):
    SEND_FIN = "send_fin"
    RECV_FIN = "recv_fin"
    SEND_CLOSE = "send_close"
    RECV_CLOSE = "recv_close"


_S, _E = StreamState, StreamEvent
TRANSITIONS: dict[tuple[StreamState, StreamEvent], StreamState] = {
    (_S.OPEN, _E.SEND_FIN): _S.LOCAL_DONE,
    (_S.OPEN, _E.RECV_FIN): _S.REMOTE_DONE,
    (_S.LOCAL_DONE, _E.RECV_FIN): _S.CLOSED,
    (_S.REMOTE_DONE, _E.SEND_FIN): _S.CLOSED,
}
for _state in StreamState:
    TRANSITIONS[(_state, _E.SEND_CLOSE)] = _S.CLOSED
    TRANSITIONS[(_state, _E.RECV_CLOSE)] = _S.CLOSED

CAN_SEND = frozenset({_S.OPEN, _S.REMOTE_DONE})
CAN_RECEIVE = frozenset({_S.OPEN, _S.LOCAL_DONE})


def transition(state: StreamState, event: StreamEvent) -> StreamState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise ProtocolViolation(f"{event.value} not allowed in state {state.value}") from None


class SendWindow:
    """Credit we may spend sending DATA to the peer."""

    __slots__ = ("credit",)

    def __init__(self, initial: int) -> None:
        self.credit = initial

    def spend(self, size: int) -> None:
        if size > self.credit:
            raise ValueError(f"spending {size} bytes with only {self.credit} of credit")
        self.credit -= size

    def grant(self, increment: int) -> None:
        if self.credit + increment > MAX_WINDOW:
            raise ProtocolViolation("peer granted credit beyond the maximum window")
        self.credit += increment


class RecvWindow:
    """Credit the peer holds for sending to us, and the credit we owe back as we consume.

    Updates are batched: credit is returned once half a window has been consumed, so a stream
    of small chunks does not cost one WINDOW frame each.
    """

    __slots__ = ("available", "pending", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.available = size  # what the peer may still send without a WINDOW from us
        self.pending = 0  # consumed bytes not yet granted back

    def receive(self, size: int) -> None:
        if size > self.available:
            raise ProtocolViolation(
                f"peer sent {size} bytes with only {self.available} of credit"
            )
        self.available -= size

    def consume(self, size: int) -> int:
        """Record ``size`` bytes handed to the consumer; return the WINDOW increment to send."""
        self.pending += size
        if self.pending * 2 >= self.size:
            increment, self.pending = self.pending, 0
            self.available += increment
            return increment
        return 0

    @property
    def buffered_limit(self) -> int:
        return self.size
