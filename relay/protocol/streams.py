"""Per-stream state machine, flow-control windows and receive buffer, as data. Pure: no I/O,
no clock.

A stream's life is a transition table. Each side may end its sending half with FIN; either
side may end the whole stream with CLOSE. Sending or receiving data on a half that is already
finished is a protocol violation.

Flow control is credit-based, per stream and direction, like HTTP/2: a sender may only send
as many DATA payload bytes as the receiver has granted; the receiver grants credit back (WINDOW)
as its consumer drains the bytes. So no stream ever has more than one window of bytes buffered
at the receiver, however slow the final reader is.
"""

from __future__ import annotations

import collections
from enum import Enum, StrEnum
from typing import NamedTuple

from relay.errors import ProtocolViolation
from relay.protocol.frames import MAX_WINDOW, WS_FRAME_COST, Flags
from relay.protocol.messages import Head


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


class StreamKind(StrEnum):
    HTTP = "http"
    WS = "ws"


# Body bytes received and not yet read: a view into a DATA frame (copied once, when read), or
# a buffer of ours gathering small payloads. Only buffers the stream made are bytearrays.
Payload = bytes | bytearray | memoryview
# Payloads below this are copied into the receive buffer rather than held by reference.
COPY_BELOW = 4096


class Chunk(NamedTuple):
    data: bytes
    text: bool
    more: bool


class StreamEnd(NamedTuple):
    """Why a stream ended abnormally: a CLOSE (either way), or the tunnel going away."""

    code: int
    reason: str
    tunnel_lost: bool = False


# Plain ints: IntFlag arithmetic allocates a new flag object per operation, on every frame.
_FIN, _TEXT, _MORE = int(Flags.FIN), int(Flags.TEXT), int(Flags.MORE)
_END_OF_INPUT = None  # the inbox's last item once the peer sent FIN


class Stream:
    """One stream's protocol state: its half-close state, both windows, the peer's HEAD and
    the bytes received and not yet taken (at most one window of them).

    The multiplexer (:mod:`relay.protocol.mux`) creates and drives streams; an I/O layer may
    subclass this to wake its waiters in the ``_on_*`` hooks, which the multiplexer calls right
    after it changed the stream. So the data path allocates no event object per frame.
    """

    __slots__ = ("_inbox", "awaits_head", "buffered", "bytes_in", "bytes_out", "end",
                 "fin_on_open", "frame_cost", "head_sent", "id", "in_message", "kind",
                 "peer_head", "recv_window", "send_window", "state")

    def __init__(self, stream_id: int, kind: StreamKind, window: int, awaits_head: bool) -> None:
        self.id = stream_id
        self.kind = kind
        self.state = StreamState.OPEN
        self.send_window = SendWindow(window)
        self.recv_window = RecvWindow(window)
        # Each WebSocket message (or fragment) costs credit beyond its payload, so a flood of
        # tiny or empty messages is bounded by the window like bytes are.
        self.frame_cost = WS_FRAME_COST if kind is StreamKind.WS else 0
        # The peer answers this stream with a HEAD before any DATA (we opened it).
        self.awaits_head = awaits_head
        self.peer_head: Head | None = None
        self.head_sent = False
        self.fin_on_open = False  # the peer's OPEN carried FIN: it sends no body
        self.in_message = False  # the peer's last DATA on this ws stream had MORE
        # HTTP: body bytes (one frame's payload, or a list of the payloads not taken yet, joined
        # once when read); WS: one Chunk per message or fragment; _END_OF_INPUT last.
        self._inbox: collections.deque[Chunk | Payload | list[Payload] | None] = (
            collections.deque())
        self.buffered = 0
        self.end: StreamEnd | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    # -- hooks for an I/O layer ------------------------------------------------------------------
    def _on_input(self) -> None:
        """Bytes or the peer's FIN were added to the inbox."""

    def _on_credit(self) -> None:
        """The peer granted credit."""

    def _on_head(self) -> None:
        """The peer's HEAD arrived (``peer_head``)."""

    def _on_end(self) -> None:
        """The stream ended abnormally (``end`` says why)."""

    # -- receiving (called by the multiplexer) -----------------------------------------------
    def receive_data(self, payload: bytes | memoryview, flags: int) -> None:
        """One DATA frame from the peer; raises ProtocolViolation when it breaks a rule."""
        if self.state not in CAN_RECEIVE:
            raise ProtocolViolation(f"DATA on stream {self.id} after its FIN")
        if self.awaits_head and self.peer_head is None:
            raise ProtocolViolation(f"DATA on stream {self.id} before its HEAD")
        size = len(payload)
        fin = flags & _FIN
        if self.frame_cost:
            more = bool(flags & _MORE)
            if more and not size:
                raise ProtocolViolation("empty DATA fragment")
            if fin and (self.in_message or more):
                raise ProtocolViolation("stream finished inside a fragmented message")
            if size or not fin:  # an empty FIN-only frame is free and no message
                self.recv_window.receive(size + self.frame_cost)
                self._inbox.append(Chunk(bytes(payload), bool(flags & _TEXT), more))
            self.in_message = more
        else:
            if flags & (_TEXT | _MORE):
                raise ProtocolViolation(f"TEXT or MORE on stream {self.id}, an HTTP stream")
            self.recv_window.receive(size)
            if size:
                # Chunk boundaries mean nothing in a body: what the reader has not taken yet is
                # one item, its pieces joined once when it is read (growing one buffer frame by
                # frame copied a 64 KiB frame's bytes two or three times: bench W2). Small
                # payloads are gathered into a buffer of ours instead of held by reference: a
                # view per tiny frame would cost a couple of hundred bytes per byte buffered.
                small = size < COPY_BELOW
                inbox = self._inbox
                last = inbox[-1] if inbox else None
                if last is None or isinstance(last, Chunk):
                    inbox.append(bytearray(payload) if small else payload)
                elif small and isinstance(last, bytearray):
                    last += payload
                elif isinstance(last, list):
                    tail = last[-1]
                    if small and isinstance(tail, bytearray):
                        tail += payload
                    else:
                        last.append(bytearray(payload) if small else payload)
                else:
                    inbox[-1] = [last, bytearray(payload) if small else payload]
        self.buffered += size
        self.bytes_in += size
        if fin:
            if self.frame_cost:
                # A WebSocket channel ends with CLOSE; a FIN on one means CLOSE 1000.
                self.state = StreamState.CLOSED
                if size:
                    self._on_input()
                self.end_with(StreamEnd(1000, ""))
                return
            self.state = transition(self.state, StreamEvent.RECV_FIN)
            self._inbox.append(_END_OF_INPUT)
        self._on_input()

    def receive_open_fin(self) -> None:
        """The peer's OPEN carried FIN: no body follows."""
        self.state = transition(self.state, StreamEvent.RECV_FIN)
        self.fin_on_open = True
        self._inbox.append(_END_OF_INPUT)

    def end_with(self, end: StreamEnd) -> None:
        if self.end is not None:
            return
        self.end = end
        self.state = StreamState.CLOSED
        self._on_end()

    # -- the consumer's side -----------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Ended abnormally (CLOSE either way, or the tunnel went away)."""
        return self.end is not None

    @property
    def has_input(self) -> bool:
        return bool(self._inbox)

    @property
    def queued_items(self) -> int:
        """Objects in the receive buffer (coalesced HTTP bytes count once)."""
        return len(self._inbox)

    def pop_input(self) -> Chunk | None:
        """The next chunk received, or None for the peer's FIN; only while ``has_input``."""
        item = self._inbox.popleft()
        if item is None:
            return None
        if isinstance(item, list):
            item = Chunk(b"".join(item), False, False)
        elif not isinstance(item, Chunk):
            item = Chunk(bytes(item), False, False)
        self.buffered -= len(item.data)
        return item

    def take_whole_body(self) -> bytes | None:
        """The peer's entire remaining HTTP body if it has all arrived (FIN queued), else None.

        Lets a small response go out as one write instead of head, chunks and end separately.
        """
        inbox = self._inbox
        if self.kind is not StreamKind.HTTP or not inbox or inbox[-1] is not None:
            return None
        parts: list[Payload] = []
        for item in inbox:
            if isinstance(item, list):
                parts += item
            elif item is not None and not isinstance(item, Chunk):
                parts.append(item)
        inbox.clear()
        body = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
        self.buffered -= len(body)
        return body

    def unread(self, body: bytes) -> None:
        """Put back what :meth:`take_whole_body` took."""
        if body:
            self._inbox.append(body)
        self._inbox.append(_END_OF_INPUT)
        self.buffered += len(body)
