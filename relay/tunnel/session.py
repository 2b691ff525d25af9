"""The asyncio driver of the tunnel: many flow-controlled channels over one WebSocket.

Shared by the relay and the agent. The protocol is the sans-I/O :class:`relay.protocol.mux.Mux`
(stream ids and states, windows, keepalive verdicts, the outgoing queue); this layer only moves
frames and wakes waiters. Inbound frames are dispatched synchronously by
:meth:`TunnelSession.feed`, called by whoever reads the socket. Time comes from one injected
clock, keepalive round trips included.

Writing: every write takes the mux's whole queue, in order (a CLOSE never overtakes the DATA
before it), to the sink (:mod:`relay.tunnel.sink`) in one socket write. The first frame queued
in a loop iteration is written at once (latency); what the rest of that iteration queues waits
for one flush at the start of the next, so 16 channels answering in the same iteration cost
two writes, not 16. A HEAD waits for that flush too: the DATA that follows it in the same task
carries it out in its own write. A session given ``cork_s`` (a peer link's, both ends) waits for
the flush for at most that much CPU time after its last write: the first frame queued later
takes everything out at once, so a peer relay can work on the first requests of a long
iteration while this one is still busy with the rest. When the socket is full, the writer
task waits for it to drain and writes what queued meanwhile; data senders wait once the queue
passes its high-water mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import structlog

from relay.aio import cancel_and_wait
from relay.errors import CloseCode, Draining, Overloaded, ProtocolViolation
from relay.protocol.frames import PROTOCOL_VERSION
from relay.protocol.messages import Drain, Head, Hello, Open, Renew, Renewed
from relay.protocol.mux import (
    DEFAULT_MAX_OUTBOX,
    OUTBOX_HIGH_WATER,
    ControlFlood,
    IdsExhausted,
    KeepaliveMissed,
    LocalProtocolError,
    Mux,
    MuxClosed,
    PeerNotReading,
    Role,
    SessionSettings,
    StreamIdsExhausted,
    StreamLimit,
    StreamOpened,
    min_outbox_bound,
)
from relay.protocol.streams import CAN_SEND, Chunk, Stream, StreamKind
from relay.tunnel.sink import CallbackSink, FrameSink

__all__ = [
    "DEFAULT_MAX_OUTBOX", "OUTBOX_HIGH_WATER", "Channel", "ChannelClosed", "ChannelKind",
    "Chunk", "Flag", "Role", "SessionSettings", "TunnelSession", "min_outbox_bound",
]

log = structlog.get_logger("relay.tunnel")

# One socket write takes at most this much of the queue, so a write never parks much more than
# this beyond the transport's own high-water mark.
WRITE_BATCH_BYTES = 256 * 1024

ChannelKind = StreamKind


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


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Channel(Stream):
    """One stream of a session, as seen by the code serving it: the mux's stream state plus
    the waits (data to read, credit to write, the peer's HEAD)."""

    __slots__ = ("_closed_with", "_credit", "_deliver", "_head_waiter", "_readable", "head",
                 "session")

    def __init__(self, session: TunnelSession, stream_id: int, kind: StreamKind, window: int,
                 awaits_head: bool) -> None:
        super().__init__(stream_id, kind, window, awaits_head)
        self.session = session
        self._credit = Flag()
        self._readable = Flag()
        self._closed_with: ChannelClosed | None = None
        self.head: asyncio.Future[Head] = session.loop.create_future()
        self._head_waiter: asyncio.Future[None] | None = None  # see wait_head
        self._deliver: Deliver | None = None  # see read_message

    # -- the mux's hooks ------------------------------------------------------------------------
    def _on_input(self) -> None:
        deliver = self._deliver
        if deliver is not None and len(self._inbox) == 1:
            # The reader is parked between messages and this one is whole: hand it on from
            # here, in the tunnel's read, instead of waking the reader for it.
            chunk = self._inbox[0]
            if (type(chunk) is Chunk and not chunk.more
                    and len(chunk.data) <= self.session.settings.max_ws_message
                    and deliver(chunk.data, chunk.text)):
                self._inbox.popleft()
                self.buffered -= len(chunk.data)
                # Only queued: feed() writes it once the frame is processed.
                self.session._mux.consumed(self, len(chunk.data) + self.frame_cost)
                return
        self._readable.set()

    def _on_credit(self) -> None:
        self._credit.set()

    def _on_head(self) -> None:
        if not self.head.done() and self.peer_head is not None:
            self.head.set_result(self.peer_head)
            self._wake_head_waiter()

    def _on_end(self) -> None:
        end = self.end
        assert end is not None
        error = ChannelClosed(end.code, end.reason, tunnel_lost=end.tunnel_lost)
        self._closed_with = error
        if not self.head.done():
            self.head.set_exception(error)
            # Nobody may be waiting on the head (the agent side never does).
            self.head.exception()
            self._wake_head_waiter()
        self._readable.set()
        self._credit.set()

    def _wake_head_waiter(self) -> None:
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the serving side's API ----------------------------------------------------------------
    async def wait_head(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the peer's HEAD (or the stream's end, which
        fails :attr:`head`); True once ``head`` is done.

        The hooks wake this waiter directly: ``asyncio.wait`` on ``head`` would take one more
        loop iteration (its done-callback runs first) and build sets every time.
        """
        if self.head.done():
            return True
        loop = self.session.loop
        waiter: asyncio.Future[None] = loop.create_future()
        self._head_waiter = waiter
        timer = loop.call_later(timeout, _release, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._head_waiter = None
        return self.head.done()

    @property
    def buffered_bytes(self) -> int:
        """Payload bytes received and not yet read: at most one window."""
        return self.buffered

    async def read(self) -> Chunk | None:
        """Next chunk from the peer; None once the peer finished; raises ChannelClosed.

        On an HTTP channel a chunk holds whatever body bytes arrived since the last read.
        """
        while True:
            if self._inbox:
                return self.pop_input()
            if self._closed_with is not None:
                raise self._closed_with
            self._readable.clear()
            await self._readable.wait()

    async def read_message(self, deliver: Deliver | None = None) -> tuple[bytes, bool] | None:
        """A whole WebSocket message (fragments joined), bounded by max_ws_message.

        Credit goes back per fragment, as it is taken: a message bigger than the window would
        otherwise deadlock.

        ``deliver(data, text)``: while this waits between messages, each whole message that
        arrives is offered to it first, synchronously, as it is received; True means it was
        sent on (its credit goes back at once) and this keeps waiting. False leaves the
        message to be returned here, in order: what follows waits behind it.
        """
        parts: list[bytes] = []
        total = 0
        limit = self.session.settings.max_ws_message
        while True:
            if deliver is not None and not parts and not self._inbox:
                self._deliver = deliver
                try:
                    chunk = await self.read()
                finally:
                    self._deliver = None
            else:
                chunk = await self.read()
            if chunk is None:
                if parts:
                    raise ProtocolViolation("stream finished inside a fragmented message")
                return None
            total += len(chunk.data)
            if total > limit:
                raise ProtocolViolation("WebSocket message over the size limit")
            parts.append(chunk.data)
            self.consumed(len(chunk.data) + self.frame_cost)
            if not chunk.more:
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                return data, chunk.text

    def consumed(self, size: int) -> None:
        """The bytes were handed on downstream: return credit to the peer."""
        session = self.session
        session._mux.consumed(self, size)
        session._queued()

    async def write(self, data: bytes | memoryview, *, text: bool = False,
                    message: bool = False, fin: bool = False) -> None:
        """Send bytes, waiting for credit; ``message`` marks one whole WebSocket message.

        On a WebSocket channel every frame is a message (or fragment) and costs
        ``WS_FRAME_COST`` credit on top of its payload.
        """
        session = self.session
        mux = session._mux
        view = memoryview(data)
        while True:
            self._check_writable()
            if mux.outbox_bytes > OUTBOX_HIGH_WATER:
                await session._room()
                self._check_writable()
            taken = self._send(view, text, message, fin)
            if taken is None:
                self._credit.clear()
                await self._credit.wait()
                continue
            view = view[taken:]
            if not view:
                return

    def send_now(self, data: bytes, *, text: bool) -> memoryview | None:
        """Queue one whole WebSocket message as far as credit and the queue's high-water mark
        allow, without waiting: None once all of it is queued, else the rest (the whole message
        when nothing went), which must follow through ``await write(rest, text=text,
        message=True)`` before anything else is sent on this channel.

        The socket's read hands a client's message on with this, so no task wakes for it.
        Raises ChannelClosed as :meth:`write` does.
        """
        session = self.session
        mux = session._mux
        view = memoryview(data)
        while True:
            self._check_writable()
            if mux.outbox_bytes > OUTBOX_HIGH_WATER:
                return view
            taken = self._send(view, text, True, False)
            if taken is None:
                return view
            view = view[taken:]
            if not view:
                return None

    def _send(self, view: memoryview, text: bool, message: bool, fin: bool) -> int | None:
        """One step of :meth:`write` and :meth:`send_now`: what the credit lets through is
        queued and its flush scheduled; returns how many bytes went, None when no credit."""
        session = self.session
        mux = session._mux
        try:
            taken = mux.send_data(self, view, text=text, message=message, fin=fin)
        except LocalProtocolError as exc:
            raise ChannelClosed(int(CloseCode.INTERNAL_ERROR), str(exc)) from None
        if taken is None:
            return None
        session._queued()
        if not mux.alive:  # the write failed (or the peer was cut off): nothing arrives
            raise self._closed_with or ChannelClosed(
                int(CloseCode.TUNNEL_GONE), "tunnel write failed", tunnel_lost=True)
        return taken

    async def finish(self) -> None:
        await self.write(b"", fin=True)

    def _check_writable(self) -> None:
        if self._closed_with is not None:
            raise self._closed_with
        if self.state not in CAN_SEND:
            raise ChannelClosed(int(CloseCode.INTERNAL_ERROR), "stream already finished")

    def send_head(self, head: Head) -> None:
        """Queue the HEAD; it leaves with the first DATA (or whatever else) written next, at
        the latest at the start of the next loop iteration."""
        self.session._mux.send_head(self, head)
        self.session._queued(defer=True)

    def close(self, code: int = int(CloseCode.NORMAL), reason: str = "", *,
              even_if_finished: bool = False) -> None:
        """End the stream now; tells the peer unless the stream is already over (both FINs) or
        ``even_if_finished`` (a verdict on what the peer sent)."""
        self.session._mux.close_stream(self, code, reason, even_if_finished=even_if_finished)
        self.session._queued()


OpenHandler = Callable[[Channel, Open], None]
Deliver: TypeAlias = Callable[[bytes, bool], bool]
SendFrame: TypeAlias = Callable[[bytes], Awaitable[None]]


class TunnelSession:
    """Frames in, frames out, channels multiplexed; one per tunnel WebSocket."""

    def __init__(
        self,
        sink: FrameSink | SendFrame,
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
        version: int = PROTOCOL_VERSION,
        clock: Callable[[], float] = time.monotonic,
        cork_s: float | None = None,
        cork_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.role = role
        self.name = name
        # A plain ``async send(frame)`` (test doubles) writes one frame at a time.
        self._sink: FrameSink = CallbackSink(sink) if callable(sink) else sink
        self.loop = asyncio.get_running_loop()
        self._on_open = on_open
        self._on_drain = on_drain
        self._on_silence = on_silence
        self._on_hello = on_hello
        self._on_backlog = on_backlog
        self._on_renew = on_renew
        self._on_renewed = on_renewed
        self._on_flood = on_flood
        self._on_exhausted = on_exhausted
        self._clock = clock
        self.mux: Mux[Channel] = Mux(role, settings, self._new_channel, now=clock(),
                                     version=version)
        self._mux = self.mux
        self._outbox_room = Flag(True)
        self._flushed = Flag(True)  # nothing queued and nothing being written
        # The flush at the start of the next loop iteration, when one is due.
        self._flush_handle: asyncio.Handle | None = None
        self._corked = False  # a write went out in this iteration: the rest waits for the flush
        # None: frames queued after a write wait for the flush however long the iteration
        # runs; else for at most this much of the loop thread's CPU time after it (see
        # _queued). CPU time, not wall time: a relay that other processes keep off the CPU is
        # not holding its peer up meanwhile, and writing more often then would only add work.
        self._cork_s = cork_s
        self._cork_clock = cork_clock
        self._cork_until = 0.0
        self._draining = False  # the socket is full: the writer task waits for it
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self.bytes_out = 0
        self.closed = Flag()

    def _new_channel(self, stream_id: int, kind: StreamKind, window: int,
                     awaits_head: bool) -> Channel:
        return Channel(self, stream_id, kind, window, awaits_head)

    # -- the mux's state, as the rest of the relay reads it ------------------------------------
    @property
    def sink(self) -> FrameSink:
        return self._sink

    @property
    def cork_s(self) -> float | None:
        return self._cork_s

    @property
    def settings(self) -> SessionSettings:
        return self._mux.settings

    @settings.setter
    def settings(self, settings: SessionSettings) -> None:
        self._mux.settings = settings

    @property
    def version(self) -> int:
        return self._mux.version

    @version.setter
    def version(self, version: int) -> None:
        self._mux.version = version

    @property
    def channels(self) -> dict[int, Channel]:
        return self._mux.streams

    @property
    def alive(self) -> bool:
        return self._mux.alive

    @property
    def outbox_bytes(self) -> int:
        return self._mux.outbox_bytes

    @property
    def pings_coalesced(self) -> int:
        return self._mux.pings_coalesced

    @property
    def bytes_in(self) -> int:
        return self._mux.bytes_in

    @property
    def last_inbound(self) -> float:
        return self._mux.last_inbound

    @property
    def last_pong(self) -> float:
        return self._mux.last_pong

    @property
    def rtt_s(self) -> float | None:
        return self._mux.rtt_s

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, *, keepalive: bool = True) -> None:
        """Start writing; ``keepalive=False`` when the owner calls :meth:`keepalive_tick`
        itself (the relay runs one loop for all its tunnels rather than a task each)."""
        self._started = True
        if keepalive:
            self._spawn(self._keepalive(), f"tunnel-keepalive:{self.name}")
        if self._mux.has_output:
            self._schedule_flush()

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
        self._mux.abort(code, reason)
        self._ended()

    def _ended(self) -> None:
        """The mux is over: release everyone waiting on the socket."""
        self.closed.set()
        self._outbox_room.set()
        self._flushed.set()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    # -- events ------------------------------------------------------------------------------
    def _queued(self, *, defer: bool = False) -> None:
        """The mux may have queued frames or events: dispatch the events, write the frames
        (``defer``: at the next flush, unless something else writes first)."""
        mux = self._mux
        if mux.has_events:
            self._dispatch()
        if not mux.has_output:
            return
        self._flushed.clear()
        if not self._started or self._draining:
            return  # start() flushes; the writer task writes once the socket drained
        if defer:
            self._schedule_flush()
            return
        cork_s = self._cork_s
        if self._corked and (cork_s is None or self._cork_clock() < self._cork_until):
            self._schedule_flush()
            return
        self._corked = True
        if cork_s is not None:
            self._cork_until = self._cork_clock() + cork_s
        self._schedule_flush()
        self._write_out()

    def _dispatch(self) -> None:
        mux = self._mux
        while (event := mux.next_event()) is not None:
            if isinstance(event, StreamOpened):
                if self._on_open is not None:
                    self._on_open(event.stream, event.open)
                else:
                    event.stream.close(int(CloseCode.INTERNAL_ERROR), "nobody serves streams")
            elif isinstance(event, Hello):
                if self._on_hello is not None:
                    self._on_hello(event)
            elif isinstance(event, Drain):
                if self._on_drain is not None:
                    self._on_drain(event)
            elif isinstance(event, Renew):
                if self._on_renew is not None:
                    self._on_renew(event)
            elif isinstance(event, Renewed):
                if self._on_renewed is not None:
                    self._on_renewed(event)
            elif isinstance(event, KeepaliveMissed):
                log.info("tunnel.keepalive_missed", tunnel=self.name,
                         silent_s=round(event.silent_s, 1))
                if self._on_silence is not None:
                    self._on_silence()
            elif isinstance(event, PeerNotReading):
                log.info("tunnel.peer_not_reading", tunnel=self.name, reason=event.reason,
                         queued_bytes=event.queued_bytes)
                self._ended()
                if self._on_backlog is not None:
                    self._on_backlog(event.reason)
            elif isinstance(event, ControlFlood):
                log.info("tunnel.control_flood", tunnel=self.name, frame=event.frame,
                         budget_per_s=self.settings.max_pings_per_s)
                self._ended()
                if self._on_flood is not None:
                    self._on_flood(event.frame)
            elif isinstance(event, StreamIdsExhausted):
                log.info("tunnel.stream_ids_exhausted", tunnel=self.name)
                if self._on_exhausted is not None:
                    self._on_exhausted()

    # -- sending -----------------------------------------------------------------------------
    async def _room(self) -> None:
        """Wait until the queue is below the data senders' high-water mark."""
        mux = self._mux
        while mux.outbox_bytes > OUTBOX_HIGH_WATER and mux.alive:
            self._outbox_room.clear()
            await self._outbox_room.wait()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and self._mux.alive:
            self._flush_handle = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """The start of a loop iteration after frames were queued: write them all."""
        self._flush_handle = None
        self._corked = False
        if not self._draining and self._mux.alive:
            self._write_out()

    def _write_out(self) -> None:
        """Hand everything queued to the sink, a batch a write, until the socket is full."""
        mux = self._mux
        sink = self._sink
        while True:
            batch = mux.data_to_send(WRITE_BATCH_BYTES)
            if not batch:
                self._flushed.set()
                return
            if mux.outbox_bytes <= OUTBOX_HIGH_WATER:
                self._outbox_room.set()
            self.bytes_out += sum(map(len, batch))
            now = self._clock()
            mux.write_began(now)
            try:
                ready = sink.write(batch)
            except (ConnectionError, RuntimeError) as exc:
                mux.write_ended(now)
                log.debug("tunnel.write_failed", tunnel=self.name, error=type(exc).__name__)
                self.fail_all(int(CloseCode.TUNNEL_GONE), "tunnel write failed")
                return
            if not ready:
                # The write is in progress until the socket drains (the mux's stall clock
                # runs meanwhile); a writer task finishes it. Only then: an idle tunnel's
                # parked writer task was a kilobyte of its memory (bench W4).
                self._draining = True
                self._spawn(self._writer(), f"tunnel-writer:{self.name}")
                return
            mux.write_ended(now)

    async def _writer(self) -> None:
        """Wait out a full socket, then write what queued meanwhile (which may start the next
        writer task, when the socket fills up again)."""
        mux = self._mux
        try:
            try:
                await self._sink.drain()
            finally:
                mux.write_ended(self._clock())
            self._draining = False
            if mux.alive:
                self._write_out()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket is gone; the reader will notice too
            log.debug("tunnel.write_failed", tunnel=self.name, error=type(exc).__name__)
            self.fail_all(int(CloseCode.TUNNEL_GONE), "tunnel write failed")

    def send_hello(self, hello: Hello) -> None:
        self._mux.send_hello(hello)
        self._queued()

    def send_drain(self, drain: Drain) -> None:
        self._mux.send_drain(drain)
        self._queued()

    def send_renew(self, renew: Renew) -> None:
        self._mux.send_renew(renew)
        self._queued()

    def send_renewed(self, renewed: Renewed) -> None:
        self._mux.send_renewed(renewed)
        self._queued()

    async def flush(self, timeout: float) -> None:
        """Wait until every queued frame was handed to the socket (bounded)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._flushed.wait(), timeout)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait (bounded) until no stream is open; True when none is. Drains wait on it."""
        deadline = self._clock() + timeout
        while self.channels and self._clock() < deadline:  # noqa: ASYNC110 (no idle event)
            await asyncio.sleep(0.05)
        return not self.channels

    # -- channels ----------------------------------------------------------------------------
    def open_channel(self, head: Open, *, fin: bool = False) -> Channel:
        """Open a stream for ``head``; raises before anything is allocated when it cannot."""
        try:
            channel = self._mux.open_stream(head, fin=fin)
        except MuxClosed:
            raise ChannelClosed(int(CloseCode.TUNNEL_GONE), "tunnel closed",
                                tunnel_lost=True) from None
        except IdsExhausted:
            # Ids are never reused: the mux told the agent to come back on a fresh tunnel.
            self._queued()
            raise Draining("the host's tunnel is being renewed; retry shortly") from None
        except StreamLimit:
            raise Overloaded() from None
        self._queued()
        return channel

    # -- inbound -----------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Dispatch one inbound frame. Raises ProtocolViolation: the caller ends the tunnel."""
        self._mux.receive(data, self._clock())
        self._queued()

    # -- liveness ----------------------------------------------------------------------------
    def silent_for(self) -> float:
        return self._mux.silent_for(self._clock())

    def keepalive_tick(self) -> bool:
        """Ping when due; declare the peer dead after ``keepalive_misses`` silent intervals.

        Returns False once the session is over or the peer was declared dead.
        """
        alive = self._mux.tick(self._clock())
        self._queued()
        return alive

    async def _keepalive(self) -> None:
        while True:
            if not self.keepalive_tick():
                return
            await asyncio.sleep(self.settings.keepalive_check_s)

    def describe(self) -> dict[str, Any]:
        rtt = self.rtt_s
        return {
            "streams": len(self.channels),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "rtt_ms": None if rtt is None else round(rtt * 1000, 2),
        }
