"""The tunnel multiplexer, sans I/O: many flow-controlled streams over one tunnel connection.

No socket, no event loop, no clock: the caller passes ``now`` in. One tunnel frame (one
WebSocket message) goes in with :meth:`Mux.receive`; what it caused comes out two ways:

- on the stream it was for (``relay.protocol.streams.Stream``): DATA lands in the stream's
  inbox, WINDOW in its send window, HEAD and CLOSE in its fields, each followed by the
  stream's ``_on_*`` hook. So the data path, every frame, allocates no event object;
- as connection events, :meth:`Mux.next_event`: a stream the peer opened, HELLO, DRAIN, RENEW,
  RENEWED, a PONG's round trip, and the verdicts (keepalive missed, peer not reading, control
  flood, stream ids exhausted).

Frames to write come out of :meth:`Mux.next_frame` / :meth:`Mux.data_to_send`, in order. The
caller reports writes it hands to the socket (:meth:`Mux.write_began` / :meth:`Mux.write_ended`)
so :meth:`Mux.tick` can tell a peer that stopped reading from a slow one. Modelled on
python-websockets' ``protocol.py`` and h11's ``Connection``.

Roles are data (:class:`Side`): which frames a side may receive and whether it opens streams.
:class:`ProtocolViolation` is the peer breaking the protocol (1002, the tunnel is dropped);
:class:`LocalProtocolError` is this side's code misusing the mux.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeAlias, TypeVar

from relay.errors import CloseCode, ProtocolViolation
from relay.protocol import defaults, frames
from relay.protocol.budget import RateBudget, ping_burst
from relay.protocol.frames import HEADER, HEADER_SIZE, MAX_STREAM_ID, Flags, FrameType
from relay.protocol.messages import Drain, Head, Hello, Open, Renew, Renewed
from relay.protocol.streams import (
    CAN_RECEIVE,
    CAN_SEND,
    Stream,
    StreamEnd,
    StreamEvent,
    StreamKind,
    StreamState,
    transition,
)

# Frames queued for the writer beyond this many bytes make data senders wait.
OUTBOX_HIGH_WATER = 1 << 20
# What a peer can make us queue without reading (control replies: PONG, WINDOW, HEAD, CLOSE,
# OPEN) beyond the data senders' high-water mark; past it the peer is cut off, never buffered for.
DEFAULT_MAX_OUTBOX = 8 << 20


def min_outbox_bound(max_frame: int) -> int:
    """The smallest outgoing-queue bound that honest traffic cannot trip: the data high-water
    mark plus a few of the largest frames (a sender may overshoot the mark by one)."""
    return OUTBOX_HIGH_WATER + 4 * frames.max_message(max_frame)


@dataclass(frozen=True, slots=True)
class SessionSettings:
    window: int = defaults.WINDOW
    max_frame: int = defaults.MAX_FRAME
    max_streams: int = defaults.MAX_STREAMS
    max_ws_message: int = defaults.MAX_WS_MESSAGE
    ping_interval_s: float = defaults.PING_INTERVAL_S
    keepalive_misses: int = defaults.KEEPALIVE_MISSES
    max_outbox: int = DEFAULT_MAX_OUTBOX  # bytes queued for a peer before it is cut off
    max_pings_per_s: float = 0.0  # PINGs the peer may send per second on average; 0 = any

    @property
    def outbox_bound(self) -> int:
        return max(self.max_outbox, min_outbox_bound(self.max_frame))

    @property
    def silence_limit_s(self) -> float:
        return self.ping_interval_s * self.keepalive_misses

    @property
    def keepalive_check_s(self) -> float:
        """How often keepalive ticks run: often enough for timely pings and verdicts."""
        return min(self.ping_interval_s, max(0.05, self.ping_interval_s / 4))


# -- roles ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Side:
    name: str
    receives: frozenset[FrameType]  # the frame types this side may be sent
    opens_streams: bool


_BOTH_WAYS = frozenset({FrameType.DATA, FrameType.WINDOW, FrameType.CLOSE, FrameType.PING,
                        FrameType.PONG})
RELAY_SIDE = Side("relay", _BOTH_WAYS | {FrameType.HEAD, FrameType.RENEW}, opens_streams=True)
AGENT_SIDE = Side("agent", _BOTH_WAYS | {FrameType.HELLO, FrameType.OPEN, FrameType.DRAIN,
                                         FrameType.RENEWED}, opens_streams=False)


class Role(Enum):
    RELAY = RELAY_SIDE
    AGENT = AGENT_SIDE

    @property
    def side(self) -> Side:
        side: Side = self.value
        return side

    @property
    def peer(self) -> Side:
        return AGENT_SIDE if self is Role.RELAY else RELAY_SIDE


# -- events -------------------------------------------------------------------------------------

S = TypeVar("S", bound=Stream)


@dataclass(frozen=True, slots=True)
class StreamOpened(Generic[S]):
    """The peer opened a stream (its OPEN carried FIN when ``stream.fin_on_open``)."""

    stream: S
    open: Open


@dataclass(frozen=True, slots=True)
class PongReceived:
    rtt_s: float | None  # None: the PONG answered no PING of ours


@dataclass(frozen=True, slots=True)
class KeepaliveMissed:
    silent_s: float


@dataclass(frozen=True, slots=True)
class PeerNotReading:
    """Verdict: the peer stopped reading; the tunnel is over (its streams ended 4410)."""

    reason: str
    queued_bytes: int


@dataclass(frozen=True, slots=True)
class ControlFlood:
    """Verdict: the peer sends control frames beyond any honest need; the tunnel is over."""

    frame: str


@dataclass(frozen=True, slots=True)
class StreamIdsExhausted:
    """No stream id is left: DRAIN was queued; the tunnel should close once it is idle."""


Event: TypeAlias = (StreamOpened[S] | Hello | Drain | Renew | Renewed | PongReceived
                    | KeepaliveMissed | PeerNotReading | ControlFlood | StreamIdsExhausted)


# -- local errors -------------------------------------------------------------------------------

class LocalProtocolError(Exception):
    """This side's code asked the mux for something the protocol does not allow."""


class CannotOpen(Exception):
    """A stream cannot be opened now; nothing was allocated or sent."""


class MuxClosed(CannotOpen):
    pass


class StreamLimit(CannotOpen):
    pass


class IdsExhausted(CannotOpen):
    pass


StreamFactory = Callable[[int, StreamKind, int, bool], S]

_FIN, _TEXT, _MORE = int(Flags.FIN), int(Flags.TEXT), int(Flags.MORE)
_DATA = int(FrameType.DATA)
_NOT_READING_REASON = "the tunnel's peer stopped reading"


class Mux(Generic[S]):
    """One tunnel's streams, windows, keepalive and outgoing queue, for one side."""

    def __init__(
        self,
        role: Role,
        settings: SessionSettings,
        new_stream: StreamFactory[S],
        *,
        now: float,
        version: int = frames.PROTOCOL_VERSION,
        first_stream_id: int = 1,
    ) -> None:
        self.side = role.side
        self.peer = role.peer
        self._new_stream = new_stream
        self.settings = settings
        # The negotiated protocol version: frames newer than it are unknown (relay.protocol).
        self.version = version
        self.streams: dict[int, S] = {}
        # The next id this side opens. Settable, so a test can start near MAX_STREAM_ID.
        self.next_stream_id = first_stream_id
        self.last_stream_id = 0  # the highest id opened on this tunnel (one side opens them)
        self.ids_exhausted = False
        self.alive = True
        # Both exist only while they hold something: an idle tunnel's two empty deques were
        # 1.5 KiB of its memory (bench W4). None means empty.
        self._events: collections.deque[Event[S]] | None = None
        self._outbox: collections.deque[bytes] | None = None
        self.outbox_bytes = 0
        # At most one PONG waits in the outbox (as an empty placeholder, encoded when taken)
        # and it answers the latest PING: a peer that floods PINGs without reading cannot make
        # us queue one PONG per PING.
        self._pong_payload: bytes | None = None
        self.pings_coalesced = 0
        # Writes handed to the socket and not finished, and since when none has finished while
        # one was in progress: a peer that stops reading leaves it set, and tick() cuts it off.
        self.writes_in_progress = 0
        self._write_since: float | None = None
        self._next_ping: float | None = None
        self._pings_sent = 0
        self._silence_reported = False
        self.last_inbound = now
        self.last_pong = now
        self.rtt_s: float | None = None
        self.bytes_in = 0
        rate = settings.max_pings_per_s
        self._ping_budget = RateBudget(rate, ping_burst(rate), now) if rate > 0 else None

    @property
    def settings(self) -> SessionSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: SessionSettings) -> None:
        self._settings = settings
        self._outbox_bound = settings.outbox_bound

    # -- output -------------------------------------------------------------------------------
    @property
    def has_output(self) -> bool:
        return self._outbox is not None

    @property
    def queued_frames(self) -> int:
        return len(self._outbox) if self._outbox is not None else 0

    def next_frame(self) -> bytes | None:
        """The next frame to write, or None when nothing is queued."""
        outbox = self._outbox
        if outbox is None:
            return None
        frame = outbox.popleft()
        if not outbox:
            self._outbox = None
        if not frame:  # the PONG placeholder: answer the latest PING
            frame = frames.encode_ping(FrameType.PONG, self._pong_payload or b"")
            self._pong_payload = None
        self.outbox_bytes -= len(frame)
        return frame

    def data_to_send(self, max_bytes: int | None = None) -> list[bytes]:
        """The queued frames in order: all of them or, with ``max_bytes``, frames until they add
        up to that many bytes (the last may go past it)."""
        out = []
        total = 0
        while (frame := self.next_frame()) is not None:
            out.append(frame)
            total += len(frame)
            if max_bytes is not None and total >= max_bytes:
                break
        return out

    def write_began(self, now: float) -> None:
        self.writes_in_progress += 1
        if self._write_since is None:
            self._write_since = now

    def write_ended(self, now: float) -> None:
        self.writes_in_progress -= 1
        # A finished write is progress: the stall clock restarts for whatever is still going.
        self._write_since = now if self.writes_in_progress else None

    def _queue(self, frame: bytes) -> None:
        if not self.alive:
            return
        self._output().append(frame)
        self.outbox_bytes += len(frame)
        if self.outbox_bytes > self._outbox_bound:
            self._not_reading("outgoing queue over its bound")

    def _queue_pong(self, payload: bytes) -> None:
        if self._pong_payload is not None:
            # A PONG is already queued: it will carry this newer payload instead.
            self.pings_coalesced += 1
            self.outbox_bytes += len(payload) - len(self._pong_payload)
            self._pong_payload = payload
            return
        self._pong_payload = payload
        self._output().append(b"")  # the placeholder costs nothing itself
        self.outbox_bytes += HEADER_SIZE + len(payload)
        if self.outbox_bytes > self._outbox_bound:
            self._not_reading("outgoing queue over its bound")

    def _output(self) -> collections.deque[bytes]:
        if self._outbox is None:
            self._outbox = collections.deque()
        return self._outbox

    # -- events ---------------------------------------------------------------------------------
    @property
    def has_events(self) -> bool:
        return self._events is not None

    def next_event(self) -> Event[S] | None:
        events = self._events
        if events is None:
            return None
        event = events.popleft()
        if not events:
            self._events = None
        return event

    def events(self) -> list[Event[S]]:
        out = list(self._events or ())
        self._events = None
        return out

    def _event(self, event: Event[S]) -> None:
        if self._events is None:
            self._events = collections.deque()
        self._events.append(event)

    # -- the end of the tunnel --------------------------------------------------------------------
    def abort(self, code: int, reason: str) -> None:
        """The tunnel is over: every stream ends (tunnel lost) and nothing more is sent."""
        self.alive = False
        streams = list(self.streams.values())
        self.streams.clear()
        self._outbox = None
        self.outbox_bytes = 0
        self._pong_payload = None
        end = StreamEnd(code, reason, tunnel_lost=True)
        for stream in streams:
            stream.end_with(end)

    def _not_reading(self, reason: str) -> None:
        if not self.alive:
            return
        queued = self.outbox_bytes
        self.abort(int(CloseCode.TUNNEL_GONE), _NOT_READING_REASON)
        self._event(PeerNotReading(reason, queued))

    def _flooded(self, what: str) -> None:
        self.abort(int(CloseCode.POLICY_VIOLATION), f"too many {what} frames")
        self._event(ControlFlood(what))

    # -- input --------------------------------------------------------------------------------
    def receive(self, data: bytes, now: float) -> None:
        """One inbound frame. Raises ProtocolViolation: the caller ends the tunnel (1002)."""
        if not self.alive:
            return  # a tunnel being cut: what the peer still sends is not worth a decode
        self.last_inbound = now
        self.bytes_in += len(data)
        ftype, flags, stream_id = frames.decode_header(data, self._settings.max_frame,
                                                       self.version)
        if ftype is FrameType.DATA:  # the hot path first
            stream = self.streams.get(stream_id)
            if stream is None:
                self._check_opened(stream_id, ftype)
                return  # raced with our CLOSE; the peer could not know yet
            # A view, not a copy: the stream copies the bytes once, when they are read.
            stream.receive_data(memoryview(data)[HEADER_SIZE:], flags)
            if stream.state is StreamState.CLOSED:
                self._forget(stream)
            return
        if ftype not in self.side.receives:
            raise ProtocolViolation(f"{ftype.name} sent to the {self.side.name}")
        payload = data[HEADER_SIZE:]
        if ftype is FrameType.WINDOW:
            increment = frames.parse_window(payload)
            stream = self._stream_for(stream_id, ftype)
            if stream is not None:
                stream.send_window.grant(increment)
                stream._on_credit()
        elif ftype is FrameType.CLOSE:
            code, reason = frames.parse_close(payload)
            stream = self._stream_for(stream_id, ftype)
            if stream is not None:
                del self.streams[stream_id]
                stream.end_with(StreamEnd(code, reason))
        elif ftype is FrameType.PING:
            if self._ping_budget is not None and not self._ping_budget.allow(now):
                self._flooded("PING")
                return
            self._queue_pong(payload)
        elif ftype is FrameType.PONG:
            self._on_pong(payload, now)
        elif ftype is FrameType.HEAD:
            stream = self._stream_for(stream_id, ftype)
            if stream is not None:
                head = Head.decode(payload, stream.kind.value)
                if stream.peer_head is not None:
                    raise ProtocolViolation(f"second HEAD on stream {stream_id}")
                stream.peer_head = head
                stream._on_head()
        elif ftype is FrameType.OPEN:
            self._receive_open(stream_id, flags, payload)
        elif ftype is FrameType.HELLO:
            self._event(Hello.decode(payload))
        elif ftype is FrameType.DRAIN:
            self._event(Drain.decode(payload))
        elif ftype is FrameType.RENEW:
            self._event(Renew.decode(payload))
        elif ftype is FrameType.RENEWED:
            self._event(Renewed.decode(payload))

    def _check_opened(self, stream_id: int, ftype: FrameType) -> None:
        """A frame for a stream not live: late (ignored) unless that id was never opened."""
        if stream_id % 2 == 0 or stream_id > self.last_stream_id:
            raise ProtocolViolation(
                f"{ftype.name} for stream {stream_id}, which was never opened")

    def _stream_for(self, stream_id: int, ftype: FrameType) -> S | None:
        stream = self.streams.get(stream_id)
        if stream is None:
            self._check_opened(stream_id, ftype)
        return stream

    def _receive_open(self, stream_id: int, flags: int, payload: bytes) -> None:
        if stream_id <= self.last_stream_id or stream_id % 2 == 0:
            raise ProtocolViolation(f"OPEN reuses or misnumbers stream {stream_id}")
        self.last_stream_id = stream_id
        head = Open.decode(payload)
        kind = StreamKind(head.kind)
        if kind is StreamKind.WS and flags & _FIN:
            raise ProtocolViolation(f"FIN on the OPEN of WebSocket stream {stream_id}")
        if len(self.streams) >= self._settings.max_streams:
            self._queue(frames.encode_close(stream_id, int(CloseCode.TRY_AGAIN_LATER),
                                            f"{self.side.name} stream limit"))
            return
        stream = self._new_stream(stream_id, kind, self._settings.window, False)
        self.streams[stream_id] = stream
        if flags & _FIN:
            stream.receive_open_fin()
        self._event(StreamOpened(stream, head))

    def _on_pong(self, payload: bytes, now: float) -> None:
        self.last_pong = now
        rtt = None
        if len(payload) == 16 and 0 < int.from_bytes(payload[:8], "big") <= self._pings_sent:
            sent = int.from_bytes(payload[8:], "big") / 1e9
            rtt = self.rtt_s = max(0.0, now - sent)
        self._event(PongReceived(rtt))

    def _forget(self, stream: S) -> None:
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]

    # -- streams, this side's actions ------------------------------------------------------------
    def open_stream(self, head: Open, *, fin: bool = False) -> S:
        """Open a stream for ``head``; raises :class:`CannotOpen` before allocating anything."""
        if not self.side.opens_streams:
            raise LocalProtocolError(f"the {self.side.name} does not open streams")
        if not self.alive:
            raise MuxClosed()
        if self.next_stream_id > MAX_STREAM_ID:
            # Ids are never reused: this tunnel can carry no new stream. The peer is told to
            # come back on a fresh one.
            if not self.ids_exhausted:
                self.ids_exhausted = True
                self.send_drain(Drain("stream ids exhausted", 0))
                self._event(StreamIdsExhausted())
            raise IdsExhausted()
        if len(self.streams) >= self._settings.max_streams:
            raise StreamLimit()
        kind = StreamKind(head.kind)
        if kind is StreamKind.WS and fin:
            raise LocalProtocolError("a WebSocket OPEN never carries FIN")
        stream_id = self.next_stream_id
        self.next_stream_id += 2
        self.last_stream_id = stream_id
        stream = self._new_stream(stream_id, kind, self._settings.window, True)
        self.streams[stream_id] = stream
        if fin:
            stream.state = transition(stream.state, StreamEvent.SEND_FIN)
        self._queue(frames.encode(FrameType.OPEN, stream_id, head.encode(), _FIN if fin else 0))
        return stream

    def send_head(self, stream: S, head: Head) -> None:
        if stream.end is not None:
            return  # the stream is over; the peer has forgotten it
        if FrameType.HEAD not in self.peer.receives:
            raise LocalProtocolError(f"the {self.side.name} sends no HEAD")
        if stream.head_sent:
            raise LocalProtocolError(f"second HEAD on stream {stream.id}")
        stream.head_sent = True
        self._queue(frames.encode(FrameType.HEAD, stream.id, head.encode()))

    def send_data(self, stream: S, data: bytes | memoryview, *, text: bool = False,
                  message: bool = False, fin: bool = False) -> int | None:
        """Send what credit allows of ``data`` as one DATA frame: the payload bytes it took, or
        None when the stream holds too little credit to send anything (nothing was sent).

        ``message``: ``data`` is (the rest of) one WebSocket message, so every piece but the
        last carries MORE. ``fin`` goes on the piece that takes the last byte.
        """
        if stream.end is not None or stream.state not in CAN_SEND:
            raise LocalProtocolError(f"stream {stream.id} cannot send")
        if not stream.awaits_head and not stream.head_sent:
            raise LocalProtocolError(f"DATA on stream {stream.id} before its HEAD")
        cost = stream.frame_cost
        if cost and fin:
            raise LocalProtocolError("a WebSocket channel ends with CLOSE, never FIN")
        size = len(data)
        credit = stream.send_window.credit
        if size == 0:
            if fin:
                flags = _FIN  # an empty FIN-only frame is free
            elif not cost:
                return 0  # nothing to send in a body
            elif credit < cost:
                return None
            else:
                flags = _TEXT if text else 0
            taken = 0
        else:
            room = credit - cost
            if room < 1:
                return None
            taken = min(size, self._settings.max_frame, room)
            flags = _TEXT if text and cost else 0
            if taken < size:
                if message:
                    flags |= _MORE
                data = data[:taken]
            elif fin:
                flags |= _FIN
        if size or not fin:
            stream.send_window.spend(taken + cost)
        stream.bytes_out += taken
        if flags & _FIN:
            stream.state = transition(stream.state, StreamEvent.SEND_FIN)
        self._queue(HEADER.pack(_DATA, flags, stream.id) + data)
        if stream.state is StreamState.CLOSED:
            self._forget(stream)
        return taken

    def consumed(self, stream: S, size: int) -> None:
        """``size`` bytes (plus frame costs) were handed on downstream: return credit."""
        if size <= 0 or stream.end is not None or stream.state not in CAN_RECEIVE:
            return  # the peer has sent its last byte: credit would be of no use to it
        increment = stream.recv_window.consume(size)
        if increment:
            self._queue(frames.encode_window(stream.id, increment))

    def close_stream(self, stream: S, code: int = int(CloseCode.NORMAL), reason: str = "",
                     *, even_if_finished: bool = False) -> None:
        """End the stream now; tells the peer unless the stream is already over (both FINs),
        or ``even_if_finished``: a verdict on what the peer sent (it ignores a late CLOSE)."""
        if stream.end is not None:
            return
        was_live = stream.state is not StreamState.CLOSED
        stream.end_with(StreamEnd(code, reason))
        self._forget(stream)
        if was_live or even_if_finished:
            self._queue(frames.encode_close(stream.id, code, reason))

    # -- connection messages --------------------------------------------------------------------
    def _send_control(self, ftype: FrameType, payload: bytes) -> None:
        if ftype not in self.peer.receives:
            raise LocalProtocolError(f"the {self.side.name} sends no {ftype.name}")
        self._queue(frames.encode(ftype, 0, payload))

    def send_hello(self, hello: Hello) -> None:
        self._send_control(FrameType.HELLO, hello.encode())

    def send_drain(self, drain: Drain) -> None:
        self._send_control(FrameType.DRAIN, drain.encode())

    def send_renew(self, renew: Renew) -> None:
        self._send_control(FrameType.RENEW, renew.encode())

    def send_renewed(self, renewed: Renewed) -> None:
        self._send_control(FrameType.RENEWED, renewed.encode())

    # -- keepalive ------------------------------------------------------------------------------
    def silent_for(self, now: float) -> float:
        return now - self.last_inbound

    def tick(self, now: float) -> bool:
        """Ping when due; the verdicts: a write stalled or the peer silent for
        ``keepalive_misses`` intervals. False once the tunnel is over or was declared dead."""
        if not self.alive or self._silence_reported:
            return False
        settings = self._settings
        limit = settings.silence_limit_s
        if self._write_since is not None and now - self._write_since > limit:
            # A write has waited this long for the peer to read: it is as dead as a silent one,
            # and whatever it makes us queue meanwhile must not pile up.
            self._not_reading("no write completed for the keepalive limit")
            return False
        if self._next_ping is None or now >= self._next_ping:
            # A sequence number (a PONG must answer a PING we sent) and when it was sent.
            self._pings_sent += 1
            stamp = max(0, int(now * 1e9)) & 0xFFFFFFFFFFFFFFFF
            self._queue(frames.encode_ping(
                FrameType.PING, self._pings_sent.to_bytes(8, "big") + stamp.to_bytes(8, "big")))
            self._next_ping = now + settings.ping_interval_s
        silent = now - self.last_inbound
        if silent > limit:
            self._silence_reported = True
            self._event(KeepaliveMissed(silent))
            return False
        return True
