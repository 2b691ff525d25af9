"""The asyncio layer of the tunnel: many flow-controlled channels over one WebSocket.

Shared by the relay and the agent. It only moves frames: the codec, stream states and windows
are the pure code in ``relay.protocol``. One writer task owns the socket's send side, so frames
leave in the order they were queued (a CLOSE never overtakes the DATA before it). Inbound frames
are dispatched synchronously by :meth:`TunnelSession.feed`, called from whoever reads the socket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any, NamedTuple

import structlog

from relay.aio import cancel_and_wait
from relay.errors import CloseCode, Draining, Overloaded, ProtocolViolation
from relay.protocol import defaults, frames
from relay.protocol.budget import RateBudget, ping_burst
from relay.protocol.frames import Flags, Frame, FrameType
from relay.protocol.messages import Drain, Head, Hello, Open, Renew, Renewed
from relay.protocol.streams import (
    CAN_RECEIVE,
    CAN_SEND,
    RecvWindow,
    SendWindow,
    StreamEvent,
    StreamState,
    transition,
)

log = structlog.get_logger("relay.tunnel")

# Frames queued for the writer beyond this many bytes make data senders wait.
OUTBOX_HIGH_WATER = 1 << 20
# What a peer can make us queue without reading (control replies: PONG, WINDOW, HEAD, CLOSE,
# OPEN) beyond the data senders' high-water mark; past it the peer is cut off, never buffered for.
DEFAULT_MAX_OUTBOX = 8 << 20


def min_outbox_bound(max_frame: int) -> int:
    """The smallest outgoing-queue bound that honest traffic cannot trip: the data high-water
    mark plus a few of the largest frames (a sender may overshoot the mark by one)."""
    return OUTBOX_HIGH_WATER + 4 * frames.max_message(max_frame)


class Role(Enum):
    RELAY = "relay"
    AGENT = "agent"


class ChannelKind(StrEnum):
    HTTP = "http"
    WS = "ws"


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


class Chunk(NamedTuple):
    data: bytes
    text: bool
    more: bool


class ChannelClosed(Exception):
    """The stream ended abnormally: the peer sent CLOSE, or the tunnel went away."""

    def __init__(self, code: int, reason: str, *, tunnel_lost: bool = False) -> None:
        super().__init__(f"{code} {reason}")
        self.code, self.reason, self.tunnel_lost = code, reason, tunnel_lost


class Flag:
    """A lean asyncio.Event: no deque until someone waits.

    A tunnel holds several of these and each stream two; asyncio.Event's always-allocated
    waiter deque made up a large share of an idle tunnel's memory (bench W4).
    """

    __slots__ = ("_set", "_waiters")

    def __init__(self, value: bool = False) -> None:
        self._set = value
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)


_FIN = object()


class Channel:
    """One stream of a session, as seen by the code serving it."""

    def __init__(self, session: TunnelSession, stream_id: int, kind: ChannelKind) -> None:
        self.session = session
        self.id = stream_id
        self.kind = kind
        self.state = StreamState.OPEN
        settings = session.settings
        self._send_window = SendWindow(settings.window)
        self._recv_window = RecvWindow(settings.window)
        self._credit = Flag()
        # HTTP: body bytes (bytes, or a bytearray coalescing frames the reader has not taken
        # yet); WS: one Chunk per message or fragment. _FIN last.
        self._inbox: collections.deque[Any] = collections.deque()
        self._buffered = 0
        self._readable = Flag()
        self._closed_with: ChannelClosed | None = None
        self.head: asyncio.Future[Head] = asyncio.get_running_loop().create_future()
        # Each WebSocket message (or fragment) costs credit beyond its payload, so a flood of
        # tiny or empty messages is bounded by the window like bytes are.
        self._frame_cost = frames.WS_FRAME_COST if kind is ChannelKind.WS else 0
        self.fin_on_open = False  # the OPEN carried FIN: the peer sends no body
        # The peer answers this stream with a HEAD before any DATA (the relay's side of it).
        self._answers = session.role is Role.RELAY
        self.bytes_in = 0
        self.bytes_out = 0

    # -- inbound, called by the session ------------------------------------------------------
    def _on_data(self, frame: Frame) -> None:
        if self.state not in CAN_RECEIVE:
            raise ProtocolViolation(f"DATA on stream {self.id} after its FIN")
        payload = frame.payload
        size = len(payload)
        more = bool(frame.flags & Flags.MORE)
        if self._frame_cost == 0 and frame.flags & (Flags.TEXT | Flags.MORE):
            raise ProtocolViolation(f"TEXT or MORE on stream {self.id}, an HTTP stream")
        if self._answers and not self.head.done():
            raise ProtocolViolation(f"DATA on stream {self.id} before its HEAD")
        if size == 0 and more:
            raise ProtocolViolation("empty DATA fragment")
        if self.kind is ChannelKind.WS:
            is_message = bool(size) or not frame.fin  # an empty FIN-only frame ends the stream
            self._recv_window.receive(size + self._frame_cost if is_message else 0)
            if is_message:
                self._inbox.append(Chunk(payload, bool(frame.flags & Flags.TEXT), more))
        else:
            self._recv_window.receive(size)
            if size:
                # Chunk boundaries mean nothing in a body: coalesce what the reader has not
                # taken yet, so many tiny frames cost one buffer, not one object each.
                last = self._inbox[-1] if self._inbox else None
                if isinstance(last, bytearray):
                    last += payload
                elif isinstance(last, bytes):
                    self._inbox[-1] = bytearray(last) + payload
                else:
                    self._inbox.append(payload)
        self._buffered += size
        self.bytes_in += size
        if frame.fin:
            self.state = transition(self.state, StreamEvent.RECV_FIN)
            self._inbox.append(_FIN)
        self._readable.set()

    def _on_window(self, increment: int) -> None:
        self._send_window.grant(increment)
        self._credit.set()

    def _on_head(self, head: Head) -> None:
        if self.head.done():
            raise ProtocolViolation(f"second HEAD on stream {self.id}")
        self.head.set_result(head)

    def _terminate(self, error: ChannelClosed) -> None:
        if self._closed_with is None:
            self._closed_with = error
        self.state = StreamState.CLOSED
        if not self.head.done():
            self.head.set_exception(error)
            # Nobody may be waiting on the head (the agent side never does).
            self.head.exception()
        self._readable.set()
        self._credit.set()

    # -- the serving side's API ----------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed_with is not None

    @property
    def buffered_bytes(self) -> int:
        """Payload bytes received and not yet read: at most one window."""
        return self._buffered

    async def read(self) -> Chunk | None:
        """Next chunk from the peer; None once the peer finished; raises ChannelClosed.

        On an HTTP channel a chunk holds whatever body bytes arrived since the last read.
        """
        while True:
            if self._inbox:
                item = self._inbox.popleft()
                if item is _FIN:
                    return None
                if not isinstance(item, Chunk):
                    item = Chunk(bytes(item), False, False)
                self._buffered -= len(item.data)
                return item
            if self._closed_with is not None:
                raise self._closed_with
            self._readable.clear()
            await self._readable.wait()

    def take_whole_body(self) -> bytes | None:
        """The peer's entire remaining HTTP body if it has all arrived (FIN queued), else None.

        Lets a small response go out as one write instead of head, chunks and end separately.
        """
        if self.kind is not ChannelKind.HTTP or not self._inbox or self._inbox[-1] is not _FIN:
            return None
        parts = [bytes(item) for item in list(self._inbox)[:-1]]
        self._inbox.clear()
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        self._buffered -= len(body)
        return body

    def unread(self, body: bytes) -> None:
        """Put back what :meth:`take_whole_body` took."""
        if body:
            self._inbox.append(body)
        self._inbox.append(_FIN)
        self._buffered += len(body)

    async def read_message(self) -> tuple[bytes, bool] | None:
        """A whole WebSocket message (fragments joined), bounded by max_ws_message."""
        parts: list[bytes] = []
        total = 0
        while True:
            chunk = await self.read()
            if chunk is None:
                if parts:
                    raise ProtocolViolation("stream finished inside a fragmented message")
                return None
            total += len(chunk.data)
            if total > self.session.settings.max_ws_message:
                raise ProtocolViolation("WebSocket message over the size limit")
            parts.append(chunk.data)
            self.consumed(len(chunk.data) + self._frame_cost)
            if not chunk.more:
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                return data, chunk.text

    def consumed(self, size: int) -> None:
        """The bytes were handed on downstream: return credit to the peer."""
        if size <= 0 or self.closed:
            return
        increment = self._recv_window.consume(size)
        if increment:
            self.session.send_nowait(frames.encode_window(self.id, increment))

    async def write(self, data: bytes | memoryview, *, text: bool = False,
                    message: bool = False, fin: bool = False) -> None:
        """Send bytes, waiting for credit; ``message`` marks one whole WebSocket message.

        On a WebSocket channel every frame but an empty FIN is a message (or fragment) and
        costs ``WS_FRAME_COST`` credit on top of its payload.
        """
        view = memoryview(data)
        max_frame = self.session.settings.max_frame
        flags = Flags.TEXT if text else Flags.NONE
        cost = self._frame_cost
        if not view and (fin or not cost):
            await self._send_data(b"", flags | (Flags.FIN if fin else Flags.NONE))
            return
        empty_message = not view
        while view or empty_message:
            while self._send_window.credit < cost + (1 if view else 0):
                self._check_writable()
                self._credit.clear()
                await self._credit.wait()
            self._check_writable()
            size = min(len(view), max_frame, self._send_window.credit - cost)
            piece, view = view[:size], view[size:]
            piece_flags = flags
            if view and message:
                piece_flags |= Flags.MORE
            if not view and fin:
                piece_flags |= Flags.FIN
            self._send_window.spend(size + cost)
            self.bytes_out += size
            empty_message = False
            await self._send_data(bytes(piece), piece_flags)

    async def finish(self) -> None:
        await self.write(b"", fin=True)

    async def _send_data(self, payload: bytes, flags: Flags) -> None:
        self._check_writable()
        if flags & Flags.FIN:
            self.state = transition(self.state, StreamEvent.SEND_FIN)
        await self.session.send(frames.encode(FrameType.DATA, self.id, payload, flags))
        if self.state is StreamState.CLOSED:
            self.session._forget(self)

    def _check_writable(self) -> None:
        if self._closed_with is not None:
            raise self._closed_with
        if self.state not in CAN_SEND:
            raise ChannelClosed(int(CloseCode.INTERNAL_ERROR), "stream already finished")

    def send_head(self, head: Head) -> None:
        if self._closed_with is not None:
            return  # the stream is over; the peer has forgotten it
        self.session.send_nowait(frames.encode(FrameType.HEAD, self.id, head.encode()))

    def close(self, code: int = int(CloseCode.NORMAL), reason: str = "") -> None:
        """End the stream now; tells the peer unless the stream is already over."""
        if self._closed_with is not None:
            return
        was_live = self.state is not StreamState.CLOSED
        self._terminate(ChannelClosed(code, reason))
        self.session._forget(self)
        if was_live and self.session.alive:
            self.session.send_nowait(frames.encode_close(self.id, code, reason))


OpenHandler = Callable[[Channel, Open], None]


class TunnelSession:
    """Frames in, frames out, channels multiplexed; one per tunnel WebSocket."""

    def __init__(
        self,
        send_frame: Callable[[bytes], Awaitable[None]],
        settings: SessionSettings,
        *,
        role: Role,
        name: str,
        on_open: OpenHandler | None = None,
        on_drain: Callable[[Drain], None] | None = None,
        on_silence: Callable[[], None] | None = None,
        on_hello: Callable[[Hello], None] | None = None,
        on_backlog: Callable[[str], None] | None = None,
        on_renew: Callable[[Renew], None] | None = None,
        on_renewed: Callable[[Renewed], None] | None = None,
        on_flood: Callable[[str], None] | None = None,
        on_exhausted: Callable[[], None] | None = None,
        version: int = frames.PROTOCOL_VERSION,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.role = role
        self.name = name
        self._send_frame = send_frame
        self._on_open = on_open
        self._on_drain = on_drain
        self._on_silence = on_silence
        self._on_hello = on_hello
        self._on_backlog = on_backlog
        self._on_renew = on_renew
        self._on_renewed = on_renewed
        self._on_flood = on_flood
        self._on_exhausted = on_exhausted
        self._ids_exhausted = False
        # The negotiated protocol version: frames newer than it are unknown (relay.protocol).
        # The agent learns it from HELLO, so it starts at the newest it offered.
        self.version = version
        self._clock = clock
        self.channels: dict[int, Channel] = {}
        self._next_id = 1  # the next stream id this side opens (the relay opens them all)
        self._peer_max_id = 0  # the highest stream id the peer opened
        self._outbox: collections.deque[bytes] = collections.deque()
        self._outbox_bytes = 0
        self._outbox_ready = Flag()
        self._outbox_room = Flag(True)
        self._flushed = Flag(True)  # nothing queued and nothing being written
        self._tasks: set[asyncio.Task[None]] = set()
        self.alive = True
        self._started = False
        # Writes handed to the socket and not finished (the writer task's, or a direct one from
        # send()); direct writes are only safe with none in progress and nothing queued.
        self._writes_active = 0
        # Since when the socket has taken no write to completion while one was in progress: a
        # peer that stops reading leaves it set, and the keepalive tick cuts it off.
        self._write_since: float | None = None
        # At most one PONG waits in the outbox (as an empty placeholder, encoded when written)
        # and it answers the latest PING: a peer that floods PINGs without reading cannot make
        # us queue one PONG per PING.
        self._pong_payload: bytes | None = None
        self.pings_coalesced = 0
        self._backlog_reported = False
        self._next_ping: float | None = None
        self._silence_reported = False
        self.last_inbound = clock()
        self.last_pong = clock()
        self.rtt_s: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = Flag()
        rate = settings.max_pings_per_s
        self._ping_budget = RateBudget(rate, ping_burst(rate), clock()) if rate > 0 else None
        self._flood_reported = False

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, *, keepalive: bool = True) -> None:
        """Start writing; ``keepalive=False`` when the owner calls :meth:`keepalive_tick`
        itself (the relay runs one loop for all its tunnels rather than a task each)."""
        self._started = True
        self._spawn(self._writer(), f"tunnel-writer:{self.name}")
        if keepalive:
            self._spawn(self._keepalive(), f"tunnel-keepalive:{self.name}")

    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        """Run work that belongs to this tunnel; it is cancelled when the tunnel ends."""
        return self._spawn(coro, name)

    async def close(
        self, code: int = int(CloseCode.TUNNEL_GONE), reason: str = "tunnel closed"
    ) -> None:
        """Fail every channel and stop every task this session owns."""
        self.fail_all(code, reason)
        current = asyncio.current_task()
        await cancel_and_wait([t for t in self._tasks if t is not current])

    def fail_all(self, code: int, reason: str) -> None:
        self.alive = False
        self.closed.set()
        for channel in list(self.channels.values()):
            channel._terminate(ChannelClosed(code, reason, tunnel_lost=True))
        self.channels.clear()
        self._outbox.clear()
        self._outbox_bytes = 0
        self._pong_payload = None
        self._outbox_room.set()
        self._flushed.set()

    def _backlogged(self, reason: str) -> None:
        """The peer is not reading: drop everything queued for it and have the owner cut it off."""
        if self._backlog_reported:
            return
        self._backlog_reported = True
        log.info("tunnel.peer_not_reading", tunnel=self.name, reason=reason,
                 queued_bytes=self._outbox_bytes)
        self.fail_all(int(CloseCode.TUNNEL_GONE), "the tunnel's peer stopped reading")
        if self._on_backlog is not None:
            self._on_backlog(reason)

    def _flooded(self, what: str) -> None:
        """The peer sends control frames far beyond any honest need: end the tunnel."""
        if self._flood_reported:
            return
        self._flood_reported = True
        log.info("tunnel.control_flood", tunnel=self.name, frame=what,
                 budget_per_s=self.settings.max_pings_per_s)
        self.fail_all(int(CloseCode.POLICY_VIOLATION), f"too many {what} frames")
        if self._on_flood is not None:
            self._on_flood(what)

    # -- sending -----------------------------------------------------------------------------
    def send_nowait(self, frame: bytes) -> None:
        if not self.alive:
            return
        self._outbox.append(frame)
        self._outbox_bytes += len(frame)
        self._outbox_ready.set()
        self._flushed.clear()
        if self._outbox_bytes > OUTBOX_HIGH_WATER:
            self._outbox_room.clear()
            if self._outbox_bytes > self.settings.outbox_bound:
                self._backlogged("outgoing queue over its bound")

    async def send(self, frame: bytes) -> None:
        while self._outbox_bytes > OUTBOX_HIGH_WATER and self.alive:
            self._outbox_room.clear()
            await self._outbox_room.wait()
        if not self.alive:
            raise ChannelClosed(int(CloseCode.TUNNEL_GONE), "tunnel closed", tunnel_lost=True)
        if self._started and not self._writes_active and not self._outbox:
            # Nothing queued ahead of this frame: write it now instead of waking the writer
            # task, which costs a loop iteration per frame (round-trip latency on echo loads).
            # Order holds because the socket takes the bytes before the first suspension point
            # (uncompressed aiohttp WebSocket writes are synchronous; only the drain awaits).
            self.bytes_out += len(frame)
            self._write_begin()
            try:
                await self._send_frame(frame)
            except (ConnectionError, RuntimeError) as exc:
                log.debug("tunnel.write_failed", tunnel=self.name, error=type(exc).__name__)
                self.fail_all(int(CloseCode.TUNNEL_GONE), "tunnel write failed")
                raise ChannelClosed(int(CloseCode.TUNNEL_GONE), "tunnel write failed",
                                    tunnel_lost=True) from None
            finally:
                self._write_end()
            return
        self.send_nowait(frame)

    def _queue_pong(self, payload: bytes) -> None:
        if not self.alive:
            return
        if self._pong_payload is not None:
            # A PONG is already queued: it will carry this newer payload instead.
            self.pings_coalesced += 1
            self._outbox_bytes += len(payload) - len(self._pong_payload)
            self._pong_payload = payload
            return
        self._pong_payload = payload
        self.send_nowait(b"")  # the placeholder costs nothing itself
        self._outbox_bytes += frames.HEADER_SIZE + len(payload)

    def _write_begin(self) -> None:
        self._writes_active += 1
        if self._write_since is None:
            self._write_since = self._clock()

    def _write_end(self) -> None:
        self._writes_active -= 1
        # A finished write is progress: the stall clock restarts for whatever is still going.
        self._write_since = self._clock() if self._writes_active else None

    async def _writer(self) -> None:
        try:
            while True:
                while not self._outbox:
                    self._outbox_ready.clear()
                    await self._outbox_ready.wait()
                frame = self._outbox.popleft()
                if not frame:  # the PONG placeholder: answer the latest PING
                    frame = frames.encode_ping(FrameType.PONG, self._pong_payload or b"")
                    self._pong_payload = None
                self._outbox_bytes -= len(frame)
                if self._outbox_bytes <= OUTBOX_HIGH_WATER:
                    self._outbox_room.set()
                self.bytes_out += len(frame)
                self._write_begin()
                try:
                    await self._send_frame(frame)
                finally:
                    self._write_end()
                if not self._outbox:
                    self._flushed.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket is gone; the reader will notice too
            log.debug("tunnel.write_failed", tunnel=self.name, error=type(exc).__name__)
            self.fail_all(int(CloseCode.TUNNEL_GONE), "tunnel write failed")

    def send_hello(self, hello: Hello) -> None:
        self.send_nowait(frames.encode(FrameType.HELLO, 0, hello.encode()))

    def send_drain(self, drain: Drain) -> None:
        self.send_nowait(frames.encode(FrameType.DRAIN, 0, drain.encode()))

    def send_renew(self, renew: Renew) -> None:
        self.send_nowait(frames.encode(FrameType.RENEW, 0, renew.encode()))

    def send_renewed(self, renewed: Renewed) -> None:
        self.send_nowait(frames.encode(FrameType.RENEWED, 0, renewed.encode()))

    async def flush(self, timeout: float) -> None:
        """Wait until every queued frame was handed to the socket (bounded)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._flushed.wait(), timeout)

    # -- channels ----------------------------------------------------------------------------
    def open_channel(self, head: Open, *, fin: bool = False) -> Channel:
        """Open a stream for ``head``; raises before anything is allocated when it cannot."""
        if not self.alive:
            raise ChannelClosed(int(CloseCode.TUNNEL_GONE), "tunnel closed", tunnel_lost=True)
        if self._next_id > frames.MAX_STREAM_ID:
            # Ids are never reused: this tunnel can carry no new stream. The owner drains it
            # so the agent comes back on a fresh one.
            if not self._ids_exhausted:
                self._ids_exhausted = True
                log.info("tunnel.stream_ids_exhausted", tunnel=self.name)
                if self._on_exhausted is not None:
                    self._on_exhausted()
            raise Draining("the host's tunnel is being renewed; retry shortly")
        if len(self.channels) >= self.settings.max_streams:
            raise Overloaded()
        kind = ChannelKind(head.kind)
        stream_id = self._next_id
        self._next_id += 2
        channel = Channel(self, stream_id, kind)
        self.channels[stream_id] = channel
        if fin:
            channel.state = transition(channel.state, StreamEvent.SEND_FIN)
        flags = Flags.FIN if fin else Flags.NONE
        self.send_nowait(frames.encode(FrameType.OPEN, stream_id, head.encode(), flags))
        return channel

    def _forget(self, channel: Channel) -> None:
        if self.channels.get(channel.id) is channel and (
            channel.state is StreamState.CLOSED or channel.closed
        ):
            del self.channels[channel.id]

    # -- inbound -----------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Dispatch one inbound frame. Raises ProtocolViolation: the caller ends the tunnel."""
        if self._flood_reported:
            return  # the tunnel is being cut: what the flooder still sends is not worth a decode
        self.last_inbound = self._clock()
        self.bytes_in += len(data)
        frame = frames.decode(data, self.settings.max_frame, self.version)
        ftype = frame.type
        if ftype is FrameType.DATA:
            channel = self._channel_for(frame)
            if channel is None:
                return  # raced with our CLOSE; the peer could not know yet
            channel._on_data(frame)
            if channel.state is StreamState.CLOSED:
                self._forget(channel)
        elif ftype is FrameType.WINDOW:
            increment = frames.decode_window(frame)
            channel = self._channel_for(frame)
            if channel is not None:
                channel._on_window(increment)
        elif ftype is FrameType.CLOSE:
            code, reason = frames.decode_close(frame)
            channel = self._channel_for(frame)
            if channel is not None:
                del self.channels[channel.id]
                channel._terminate(ChannelClosed(code, reason))
        elif ftype is FrameType.PING:
            if self._ping_budget is not None and not self._ping_budget.allow(self.last_inbound):
                self._flooded("PING")
                return
            self._queue_pong(frame.payload)
        elif ftype is FrameType.PONG:
            self._on_pong(frame.payload)
        elif ftype is FrameType.HEAD:
            if self.role is not Role.RELAY:
                raise ProtocolViolation("HEAD sent to the agent")
            channel = self._channel_for(frame)
            if channel is not None:
                channel._on_head(Head.decode(frame.payload, channel.kind.value))
        elif ftype is FrameType.OPEN:
            self._on_open_frame(frame)
        elif ftype is FrameType.HELLO:
            if self.role is not Role.AGENT:
                raise ProtocolViolation("HELLO sent to the relay")
            hello = Hello.decode(frame.payload)
            if self._on_hello is not None:
                self._on_hello(hello)
        elif ftype is FrameType.DRAIN:
            if self.role is not Role.AGENT:
                raise ProtocolViolation("DRAIN sent to the relay")
            drain = Drain.decode(frame.payload)
            if self._on_drain is not None:
                self._on_drain(drain)
        elif ftype is FrameType.RENEW:
            if self.role is not Role.RELAY or self._on_renew is None:
                raise ProtocolViolation("RENEW sent to the agent")
            self._on_renew(Renew.decode(frame.payload))
        elif ftype is FrameType.RENEWED:
            if self.role is not Role.AGENT:
                raise ProtocolViolation("RENEWED sent to the relay")
            renewed = Renewed.decode(frame.payload)
            if self._on_renewed is not None:
                self._on_renewed(renewed)

    def _channel_for(self, frame: Frame) -> Channel | None:
        """The live channel a stream frame is for; None for a stream that has since ended.

        A stream that was never opened (an even id, or one beyond the highest opened) is a
        protocol violation, not a late frame.
        """
        channel = self.channels.get(frame.stream_id)
        if channel is not None:
            return channel
        highest = self._next_id - 2 if self.role is Role.RELAY else self._peer_max_id
        if frame.stream_id % 2 == 0 or frame.stream_id > highest:
            raise ProtocolViolation(
                f"{frame.type.name} for stream {frame.stream_id}, which was never opened"
            )
        return None

    def _on_open_frame(self, frame: Frame) -> None:
        if self.role is not Role.AGENT or self._on_open is None:
            raise ProtocolViolation("OPEN sent to the relay")
        if frame.stream_id <= self._peer_max_id or frame.stream_id % 2 == 0:
            raise ProtocolViolation(f"OPEN reuses or misnumbers stream {frame.stream_id}")
        self._peer_max_id = frame.stream_id
        head = Open.decode(frame.payload)
        kind = ChannelKind(head.kind)
        if kind is ChannelKind.WS and frame.fin:
            raise ProtocolViolation(f"FIN on the OPEN of WebSocket stream {frame.stream_id}")
        channel = Channel(self, frame.stream_id, kind)
        if len(self.channels) >= self.settings.max_streams:
            channel.state = StreamState.CLOSED
            self.send_nowait(frames.encode_close(frame.stream_id, int(CloseCode.TRY_AGAIN_LATER),
                                                 "agent stream limit"))
            return
        self.channels[frame.stream_id] = channel
        if frame.fin:
            channel.state = transition(channel.state, StreamEvent.RECV_FIN)
            channel.fin_on_open = True
            channel._inbox.append(_FIN)
        self._on_open(channel, head)

    # -- liveness ----------------------------------------------------------------------------
    def _on_pong(self, payload: bytes) -> None:
        self.last_pong = self._clock()
        if len(payload) == 16:
            sent = int.from_bytes(payload[8:], "big") / 1e9
            self.rtt_s = max(0.0, time.monotonic() - sent)

    def silent_for(self) -> float:
        return self._clock() - self.last_inbound


    def keepalive_tick(self) -> bool:
        """Ping when due; declare the peer dead after ``keepalive_misses`` silent intervals.

        Returns False once the session is over or the peer was declared dead.
        """
        if not self.alive or self._silence_reported:
            return False
        now = self._clock()
        if (self._write_since is not None
                and now - self._write_since > self.settings.silence_limit_s):
            # A write has waited this long for the peer to read: it is as dead as a silent one,
            # and whatever it makes us queue meanwhile must not pile up.
            self._backlogged("no write completed for the keepalive limit")
            return False
        if self._next_ping is None or now >= self._next_ping:
            stamp = int(time.monotonic() * 1e9).to_bytes(8, "big")
            self.send_nowait(frames.encode_ping(FrameType.PING, os.urandom(8) + stamp))
            self._next_ping = now + self.settings.ping_interval_s
        if self.silent_for() > self.settings.silence_limit_s:
            self._silence_reported = True
            log.info("tunnel.keepalive_missed", tunnel=self.name,
                     silent_s=round(self.silent_for(), 1))
            if self._on_silence is not None:
                self._on_silence()
            return False
        return True

    async def _keepalive(self) -> None:
        while True:
            if not self.keepalive_tick():
                return
            await asyncio.sleep(self.settings.keepalive_check_s)

    def describe(self) -> dict[str, Any]:
        return {
            "streams": len(self.channels),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "rtt_ms": None if self.rtt_s is None else round(self.rtt_s * 1000, 2),
        }
