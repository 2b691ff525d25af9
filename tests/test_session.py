"""The asyncio driver (TunnelSession, Channel): a relay session and an agent session joined back
to back in memory (the waits: credit, reads, heads, the writer), and over a real WebSocket on
127.0.0.1. The protocol's rules themselves are tested synchronously in tests/test_mux.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import pytest

from relay.errors import CloseCode, Draining, Overloaded, ProtocolViolation
from relay.protocol import frames
from relay.protocol.frames import WS_FRAME_COST, Flags, FrameType
from relay.protocol.messages import Drain, Head, Hello, Open
from relay.tunnel.dial import dial
from relay.tunnel.session import (
    Channel,
    ChannelClosed,
    Role,
    SessionSettings,
    TunnelSession,
)
from relay.tunnel.tunnel_socket import TunnelSocket, switching_protocols
from tests.clock import FakeClock
from tests.harness import eventually

SMALL = SessionSettings(window=4096, max_frame=1024, max_streams=8, max_ws_message=64 * 1024)


@dataclass
class Link:
    """Two sessions whose writers feed each other, like the two ends of a tunnel WebSocket."""

    relay: TunnelSession
    agent: TunnelSession
    opened: asyncio.Queue[tuple[Channel, Open]]
    violations: list[tuple[str, ProtocolViolation]] = field(default_factory=list)
    frames_to_relay: list[bytes] = field(default_factory=list)
    frames_to_agent: list[bytes] = field(default_factory=list)
    cut_to_relay: bool = False
    cut_to_agent: bool = False

    async def accept(self) -> tuple[Channel, Open]:
        return await asyncio.wait_for(self.opened.get(), 5)

    async def close(self) -> None:
        await self.relay.close()
        await self.agent.close()


def sender(
    link: Callable[[], Link], to_relay: bool
) -> Callable[[bytes], Awaitable[None]]:
    async def send_frame(data: bytes) -> None:
        pipe = link()
        if to_relay:
            pipe.frames_to_relay.append(data)
            if pipe.cut_to_relay:
                return
            target, name = pipe.relay, "relay"
        else:
            pipe.frames_to_agent.append(data)
            if pipe.cut_to_agent:
                return
            target, name = pipe.agent, "agent"
        try:
            target.feed(data)
        except ProtocolViolation as violation:
            pipe.violations.append((name, violation))

    return send_frame


def make_link(
    relay_settings: SessionSettings = SMALL,
    agent_settings: SessionSettings | None = None,
    *,
    relay_clock: Callable[[], float] | None = None,
    on_silence: Callable[[], None] | None = None,
    start: bool = True,
) -> Link:
    holder: list[Link] = []
    opened: asyncio.Queue[tuple[Channel, Open]] = asyncio.Queue()
    extra: dict[str, Any] = {"clock": relay_clock} if relay_clock else {}
    relay = TunnelSession(sender(lambda: holder[0], to_relay=False), relay_settings,
                          role=Role.RELAY, name="relay", on_silence=on_silence, **extra)
    agent = TunnelSession(sender(lambda: holder[0], to_relay=True),
                          agent_settings or relay_settings, role=Role.AGENT, name="agent",
                          on_open=lambda ch, head: opened.put_nowait((ch, head)))
    holder.append(Link(relay, agent, opened))
    if start:
        relay.start()
        agent.start()
    return holder[0]


@pytest.fixture
async def link() -> AsyncIterator[Link]:
    pipe = make_link()
    try:
        yield pipe
    finally:
        await pipe.close()
    assert pipe.violations == []


async def read_all(channel: Channel) -> bytes:
    parts = []
    while (chunk := await asyncio.wait_for(channel.read(), 5)) is not None:
        parts.append(chunk.data)
        channel.consumed(len(chunk.data))
    return b"".join(parts)


async def settle() -> None:
    """Let queued frames cross the in-memory pipe."""
    for _ in range(20):
        await asyncio.sleep(0)


# -- one exchange ----------------------------------------------------------------------------------


async def test_open_head_data_fin_round_trip(link: Link) -> None:
    relay_ch = link.relay.open_channel(Open("http", method="POST", path="/up"))
    await relay_ch.write(b"hello ", fin=False)
    await relay_ch.write(b"host", fin=True)
    agent_ch, head = await link.accept()
    assert head == Open("http", method="POST", path="/up")
    assert agent_ch.id == relay_ch.id == 1
    assert await read_all(agent_ch) == b"hello host"

    agent_ch.send_head(Head(200, headers=(("X-A", "1"),)))
    await agent_ch.write(b"hello ")
    await agent_ch.write(b"client", fin=True)
    assert await asyncio.wait_for(relay_ch.head, 5) == Head(200, headers=(("X-A", "1"),))
    assert await read_all(relay_ch) == b"hello client"
    await settle()
    assert link.relay.channels == {} and link.agent.channels == {}


async def test_open_with_fin_means_no_request_body(link: Link) -> None:
    relay_ch = link.relay.open_channel(Open("http", method="GET"), fin=True)
    agent_ch, _ = await link.accept()
    assert agent_ch.fin_on_open
    assert await agent_ch.read() is None
    with pytest.raises(ChannelClosed):
        await relay_ch.write(b"late")


async def test_open_without_fin_is_not_mistaken_for_a_bodiless_request(link: Link) -> None:
    """Body and FIN may arrive before the agent's task looks at the stream."""
    relay_ch = link.relay.open_channel(Open("http", method="POST"))
    await relay_ch.write(b"tiny", fin=True)
    await settle()
    agent_ch, _ = await link.accept()
    assert not agent_ch.fin_on_open
    assert await read_all(agent_ch) == b"tiny"


async def test_stream_ids_are_odd_and_increasing(link: Link) -> None:
    ids = [link.relay.open_channel(Open("http"), fin=True).id for _ in range(4)]
    assert ids == [1, 3, 5, 7]


async def test_binary_payload_crosses_byte_exact(link: Link) -> None:
    payload = bytes(range(256)) * 100
    relay_ch = link.relay.open_channel(Open("http"))
    writer = asyncio.ensure_future(relay_ch.write(payload, fin=True))
    agent_ch, _ = await link.accept()
    assert await read_all(agent_ch) == payload
    await writer


async def test_data_never_exceeds_max_frame_on_the_wire(link: Link) -> None:
    relay_ch = link.relay.open_channel(Open("http"))
    writer = asyncio.ensure_future(relay_ch.write(b"z" * 10000, fin=True))
    agent_ch, _ = await link.accept()
    await read_all(agent_ch)
    await writer
    sizes = [len(f) - frames.HEADER_SIZE for f in link.frames_to_agent if f[0] == FrameType.DATA]
    assert sum(sizes) == 10000
    assert max(sizes) <= SMALL.max_frame


async def test_close_never_overtakes_the_data_before_it(link: Link) -> None:
    relay_ch = link.relay.open_channel(Open("http"), fin=True)
    agent_ch, _ = await link.accept()
    agent_ch.send_head(Head(200))
    await agent_ch.write(b"partial body")
    agent_ch.close(4000, "host failed")
    chunk = await asyncio.wait_for(relay_ch.read(), 5)
    assert chunk is not None and chunk.data == b"partial body"
    with pytest.raises(ChannelClosed) as info:
        await relay_ch.read()
    assert (info.value.code, info.value.reason, info.value.tunnel_lost) == (4000, "host failed",
                                                                            False)


# -- flow control ----------------------------------------------------------------------------------


async def test_a_reader_that_does_not_read_blocks_the_writer_at_one_window(link: Link) -> None:
    relay_ch = link.relay.open_channel(Open("http"))
    payload = bytes(i % 251 for i in range(5 * SMALL.window))
    writer = asyncio.ensure_future(relay_ch.write(payload, fin=True))
    agent_ch, _ = await link.accept()

    await eventually(lambda: agent_ch.buffered_bytes == SMALL.window)
    for _ in range(50):  # the writer stays stuck however long the reader waits
        await asyncio.sleep(0)
        assert not writer.done()
        assert agent_ch.buffered_bytes <= SMALL.window
        assert relay_ch.bytes_out - agent_ch.bytes_in == 0  # nothing else in flight

    received = bytearray()
    while len(received) < len(payload):
        chunk = await asyncio.wait_for(agent_ch.read(), 5)
        assert chunk is not None
        assert agent_ch.buffered_bytes <= SMALL.window
        received += chunk.data
        agent_ch.consumed(len(chunk.data))
    assert bytes(received) == payload
    assert await agent_ch.read() is None
    await asyncio.wait_for(writer, 5)


async def test_unacknowledged_bytes_never_exceed_the_window(link: Link) -> None:
    relay_ch = link.relay.open_channel(Open("http"))
    writer = asyncio.ensure_future(relay_ch.write(b"q" * 100_000, fin=True))
    agent_ch, _ = await link.accept()
    consumed = 0
    while (chunk := await asyncio.wait_for(agent_ch.read(), 5)) is not None:
        assert relay_ch.bytes_out - consumed <= SMALL.window
        await asyncio.sleep(0)  # a slow consumer: the writer gets every chance to overrun
        assert relay_ch.bytes_out - consumed <= SMALL.window
        agent_ch.consumed(len(chunk.data))
        consumed += len(chunk.data)
    assert consumed == 100_000
    await writer


async def test_window_updates_are_batched(link: Link) -> None:
    relay_ch = link.relay.open_channel(Open("http"))
    writer = asyncio.ensure_future(relay_ch.write(b"w" * 40 * SMALL.window, fin=True))
    agent_ch, _ = await link.accept()
    await read_all(agent_ch)
    await writer
    windows = [f for f in link.frames_to_relay if f[0] == FrameType.WINDOW]
    data = [f for f in link.frames_to_agent if f[0] == FrameType.DATA]
    assert len(windows) <= 2 * 40  # one per half window, not one per chunk
    assert len(windows) < len(data)


async def test_many_tiny_body_chunks_to_a_slow_reader_stay_within_one_window(link: Link) -> None:
    """A host writing a byte at a time to a slow client must not break the tunnel."""
    relay_ch = link.relay.open_channel(Open("http"), fin=True)
    agent_ch, _ = await link.accept()
    agent_ch.send_head(Head(200))

    async def trickle() -> None:
        for i in range(3 * SMALL.window):
            await agent_ch.write(bytes([i % 256]))
        await agent_ch.finish()

    writer = asyncio.ensure_future(trickle())
    await eventually(lambda: relay_ch.buffered_bytes == SMALL.window)
    assert not writer.done()
    assert relay_ch.queued_items <= 2  # coalesced, not one object per frame
    body = await read_all(relay_ch)
    assert body == bytes(i % 256 for i in range(3 * SMALL.window))
    await writer


async def test_writer_blocked_on_credit_fails_when_the_peer_closes(link: Link) -> None:
    relay_ch = link.relay.open_channel(Open("http"))
    writer = asyncio.ensure_future(relay_ch.write(b"x" * 3 * SMALL.window))
    agent_ch, _ = await link.accept()
    await eventually(lambda: agent_ch.buffered_bytes == SMALL.window)
    agent_ch.close(1001, "client went away")
    with pytest.raises(ChannelClosed) as info:
        await asyncio.wait_for(writer, 5)
    assert info.value.code == 1001


# -- WebSocket messages ------------------------------------------------------------------------


async def test_large_ws_message_is_fragmented_with_more_and_reassembled(link: Link) -> None:
    relay_ch = link.relay.open_channel(Open("ws", path="/ws"))
    text = ("héllo wörld " * 1000).encode()  # multi-byte characters cut across fragments
    writer = asyncio.ensure_future(relay_ch.write(text, text=True, message=True))
    agent_ch, _ = await link.accept()
    assert await asyncio.wait_for(agent_ch.read_message(), 5) == (text, True)
    await writer
    data = [frames.decode(f, SMALL.max_frame) for f in link.frames_to_agent
            if f[0] == FrameType.DATA]
    assert len(data) > 1
    assert all(f.flags & Flags.MORE for f in data[:-1])
    assert not data[-1].flags & Flags.MORE
    assert all(f.flags & Flags.TEXT for f in data)


async def test_ws_messages_keep_their_boundaries_and_types(link: Link) -> None:
    relay_ch = link.relay.open_channel(Open("ws"))
    sent = [(b"one", True), (b"", False), (b"\x00\x01", False), (b"", True), (b"x" * 5000, False)]

    async def send_all() -> None:
        for data, is_text in sent:
            await relay_ch.write(data, text=is_text, message=True)

    writer = asyncio.ensure_future(send_all())
    agent_ch, _ = await link.accept()
    for expected in sent:
        assert await asyncio.wait_for(agent_ch.read_message(), 5) == expected
    await writer


async def test_ws_message_over_max_ws_message_is_refused_by_the_reader() -> None:
    settings = replace(SMALL, max_ws_message=4096)
    link = make_link(settings)
    try:
        relay_ch = link.relay.open_channel(Open("ws"))
        writer = asyncio.ensure_future(relay_ch.write(b"m" * 4096, message=True))
        agent_ch, _ = await link.accept()
        assert await asyncio.wait_for(agent_ch.read_message(), 5) == (b"m" * 4096, False)
        await writer
        writer = asyncio.ensure_future(relay_ch.write(b"m" * 4097, message=True))
        with pytest.raises(ProtocolViolation, match="size limit"):
            await asyncio.wait_for(agent_ch.read_message(), 5)
        writer.cancel()
    finally:
        await link.close()


async def test_a_flood_of_empty_ws_messages_is_bounded_by_credit(link: Link) -> None:
    relay_ch = link.relay.open_channel(Open("ws"))
    count = 10 * SMALL.window // WS_FRAME_COST

    async def flood() -> None:
        for _ in range(count):
            await relay_ch.write(b"", message=True)

    writer = asyncio.ensure_future(flood())
    agent_ch, _ = await link.accept()
    bound = SMALL.window // WS_FRAME_COST
    await eventually(lambda: agent_ch.queued_items == bound)
    for _ in range(50):
        await asyncio.sleep(0)
        assert agent_ch.queued_items <= bound
        assert not writer.done()
    for _ in range(count):
        assert await asyncio.wait_for(agent_ch.read_message(), 5) == (b"", False)
    await asyncio.wait_for(writer, 5)


async def test_a_flood_of_tiny_ws_messages_is_bounded_by_credit(link: Link) -> None:
    relay_ch = link.relay.open_channel(Open("ws"))
    count = 2000

    async def flood() -> None:
        for i in range(count):
            await relay_ch.write(bytes([i % 256]), message=True)

    writer = asyncio.ensure_future(flood())
    agent_ch, _ = await link.accept()
    bound = SMALL.window // (WS_FRAME_COST + 1)
    await eventually(lambda: agent_ch.queued_items == bound)
    assert not writer.done()
    for i in range(count):
        assert await asyncio.wait_for(agent_ch.read_message(), 5) == (bytes([i % 256]), False)
    await asyncio.wait_for(writer, 5)


# -- ending streams and tunnels ----------------------------------------------------------------


async def test_close_ends_the_peers_reader_with_its_code_and_reason(link: Link) -> None:
    relay_ch = link.relay.open_channel(Open("ws"))
    agent_ch, _ = await link.accept()
    reader = asyncio.ensure_future(agent_ch.read_message())
    await settle()
    relay_ch.close(4410, "tunnel gone")
    with pytest.raises(ChannelClosed) as info:
        await asyncio.wait_for(reader, 5)
    assert (info.value.code, info.value.reason, info.value.tunnel_lost) == (4410, "tunnel gone",
                                                                            False)
    assert agent_ch.closed and relay_ch.closed
    assert link.relay.channels == {} and link.agent.channels == {}


async def test_close_before_head_fails_the_waiter_on_the_head(link: Link) -> None:
    relay_ch = link.relay.open_channel(Open("http"), fin=True)
    agent_ch, _ = await link.accept()
    agent_ch.close(int(CloseCode.TRY_AGAIN_LATER), "busy")
    with pytest.raises(ChannelClosed) as info:
        await asyncio.wait_for(relay_ch.head, 5)
    assert info.value.code == 1013


async def test_a_finished_stream_sends_no_close(link: Link) -> None:
    relay_ch = link.relay.open_channel(Open("http"), fin=True)
    agent_ch, _ = await link.accept()
    agent_ch.send_head(Head(204))
    await agent_ch.finish()
    assert await asyncio.wait_for(relay_ch.read(), 5) is None
    agent_ch.close()
    relay_ch.close()
    await settle()
    assert [f for f in link.frames_to_agent + link.frames_to_relay
            if f[0] == FrameType.CLOSE] == []


async def test_fail_all_marks_every_channel_tunnel_lost(link: Link) -> None:
    waiting_head = link.relay.open_channel(Open("http"), fin=True)
    reading = link.relay.open_channel(Open("ws"))
    writing = link.relay.open_channel(Open("http"))
    reader = asyncio.ensure_future(reading.read())
    writer = asyncio.ensure_future(writing.write(b"x" * 3 * SMALL.window))
    for _ in range(3):
        await link.accept()
    await settle()
    link.relay.fail_all(4410, "tunnel gone")
    for pending in (waiting_head.head, reader, writer):
        with pytest.raises(ChannelClosed) as info:
            await asyncio.wait_for(pending, 5)
        assert info.value.tunnel_lost
        assert info.value.code == 4410
    assert link.relay.channels == {}
    assert not link.relay.alive
    with pytest.raises(ChannelClosed) as opened:
        link.relay.open_channel(Open("http"))
    assert opened.value.tunnel_lost


async def test_session_close_stops_its_tasks(link: Link) -> None:
    task = link.relay.spawn(asyncio.sleep(3600), "owned")
    await link.relay.close()
    assert task.cancelled()
    assert link.relay.closed.is_set()


async def test_writer_failure_fails_the_session() -> None:
    async def broken(_: bytes) -> None:
        raise ConnectionResetError

    session = TunnelSession(broken, SMALL, role=Role.RELAY, name="broken")
    session.start()
    channel = session.open_channel(Open("http"), fin=True)
    with pytest.raises(ChannelClosed) as info:
        await asyncio.wait_for(channel.head, 5)
    assert info.value.tunnel_lost
    await session.close()


# -- stream limits -----------------------------------------------------------------------------


async def test_max_streams_refuses_one_more_with_overloaded() -> None:
    link = make_link(replace(SMALL, max_streams=2))
    try:
        first = link.relay.open_channel(Open("http"), fin=True)
        link.relay.open_channel(Open("http"), fin=True)
        with pytest.raises(Overloaded):
            link.relay.open_channel(Open("http"), fin=True)
        first.close(1001, "done")
        link.relay.open_channel(Open("http"), fin=True)
    finally:
        await link.close()


async def test_agent_over_its_stream_limit_refuses_the_open_with_1013() -> None:
    link = make_link(SMALL, replace(SMALL, max_streams=1))
    try:
        link.relay.open_channel(Open("http"), fin=True)
        refused = link.relay.open_channel(Open("http"), fin=True)
        with pytest.raises(ChannelClosed) as info:
            await asyncio.wait_for(refused.head, 5)
        assert info.value.code == 1013
        assert link.opened.qsize() == 1
    finally:
        await link.close()


# -- connection messages reach the callbacks -----------------------------------------------------


async def test_hello_and_drain_reach_the_agents_callbacks() -> None:
    hellos: list[Hello] = []
    drains: list[Drain] = []
    agent = TunnelSession(lambda _: asyncio.sleep(0), SMALL, role=Role.AGENT, name="a",
                          on_hello=hellos.append, on_drain=drains.append)
    agent.feed(frames.encode_json(FrameType.HELLO, 0, {"version": 1}))
    agent.feed(frames.encode_json(FrameType.DRAIN, 0, {"reason": "deploy"}))
    assert hellos == [Hello(version=1)] and drains == [Drain(reason="deploy")]


# -- keepalive ----------------------------------------------------------------------------------


async def test_keepalive_does_not_fire_while_pongs_flow() -> None:
    clock = FakeClock()
    fired: list[bool] = []
    settings = replace(SMALL, ping_interval_s=0.01, keepalive_misses=3)
    link = make_link(settings, replace(settings, ping_interval_s=3600), relay_clock=clock,
                     on_silence=lambda: fired.append(True))
    try:
        for _ in range(30):  # 30 intervals: ten times the silence limit
            clock.now += settings.ping_interval_s
            # Polled finely: each round is one keepalive tick (10 ms) of the relay's session.
            await eventually(lambda: link.relay.last_pong == clock.now, interval=0.002)
            assert link.relay.silent_for() == 0
        assert fired == []
        assert link.relay.rtt_s is not None
    finally:
        await link.close()


async def test_any_inbound_frame_counts_as_life() -> None:
    clock = FakeClock()
    session = TunnelSession(lambda _: asyncio.sleep(0), SMALL, role=Role.RELAY, name="r",
                            clock=clock)
    clock.now += 100
    assert session.silent_for() == 100
    session.feed(frames.encode_ping(FrameType.PING, b"x"))
    assert session.silent_for() == 0


async def test_ping_is_answered_with_a_pong_echoing_its_payload(link: Link) -> None:
    link.relay.feed(frames.encode_ping(FrameType.PING, b"echo me"))
    await settle()
    assert frames.encode_ping(FrameType.PONG, b"echo me") in link.frames_to_agent


async def test_the_keepalive_task_declares_silence_on_the_injected_clock() -> None:
    """The task only ticks; when the peer is dead is the clock's say (no waiting it out)."""
    clock = FakeClock()
    fired: list[bool] = []
    settings = replace(SMALL, ping_interval_s=0.01, keepalive_misses=3)
    link = make_link(settings, replace(settings, ping_interval_s=3600), relay_clock=clock,
                     on_silence=lambda: fired.append(True))
    try:
        await eventually(lambda: link.relay.last_pong == clock.now)
        link.cut_to_relay = True  # the agent's answers are lost from now on
        clock.advance(settings.silence_limit_s * 1.1)
        await eventually(lambda: fired == [True])
        assert link.relay.alive  # the owner closes the socket; the session only reports
    finally:
        await link.close()


async def test_running_out_of_stream_ids_raises_draining_and_tells_the_owner_once(
    link: Link,
) -> None:
    exhausted: list[bool] = []
    link.relay._on_exhausted = lambda: exhausted.append(True)
    link.relay.mux.next_stream_id = frames.MAX_STREAM_ID
    last = link.relay.open_channel(Open("http"), fin=True)
    await link.accept()
    for _ in range(2):
        with pytest.raises(Draining):
            link.relay.open_channel(Open("http"), fin=True)
    await settle()
    assert exhausted == [True]
    drains = [f for f in link.frames_to_agent if f[0] == FrameType.DRAIN]
    assert len(drains) == 1 and list(link.relay.channels) == [last.id]


# -- the driver over a real WebSocket ------------------------------------------------------------


@dataclass
class SocketLink:
    relay: TunnelSession
    agent: TunnelSession
    opened: asyncio.Queue[tuple[Channel, Open]]
    relay_socket: TunnelSocket
    agent_socket: TunnelSocket


class _Feeds:
    """A SocketOwner feeding one session; the socket's end fails its channels."""

    def __init__(self) -> None:
        self.session: TunnelSession | None = None

    def received(self, data: bytes) -> None:
        assert self.session is not None
        self.session.feed(data)

    def received_text(self) -> None:
        raise AssertionError("text on the tunnel")

    def refused(self, message: str) -> None:
        raise AssertionError(message)

    def ended(self, error: bool) -> None:
        if self.session is not None:
            self.session.fail_all(int(CloseCode.TUNNEL_GONE), "the tunnel's socket closed")


class _Accepting(asyncio.Protocol):
    """The relay's end: the upgrade answered by hand, then the connection a TunnelSocket's, as
    relay.server.tunnels.serve_upgraded hands it over."""

    def __init__(self, settings: SessionSettings,
                 served: asyncio.Future[tuple[TunnelSession, TunnelSocket]]) -> None:
        self._settings = settings
        self._served = served
        self._head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._head += data
        if b"\r\n\r\n" not in self._head:
            return
        head, tail = self._head.split(b"\r\n\r\n", 1)
        key = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        self._transport.write(switching_protocols(key))
        owner = _Feeds()
        ws = TunnelSocket(self._transport, owner,
                          max_message=frames.max_message(self._settings.max_frame))
        owner.session = TunnelSession(ws, self._settings, role=Role.RELAY, name="relay")
        self._transport.set_protocol(ws)
        owner.session.start()
        self._served.set_result((owner.session, ws))
        if tail:
            ws.data_received(tail)


@contextlib.asynccontextmanager
async def socket_link(settings: SessionSettings = SMALL) -> AsyncIterator[SocketLink]:
    """A relay session and an agent session over a real WebSocket on 127.0.0.1, on the
    sockets the relay and the agent run (relay.tunnel.tunnel_socket, relay.tunnel.dial)."""
    loop = asyncio.get_running_loop()
    served: asyncio.Future[tuple[TunnelSession, TunnelSocket]] = loop.create_future()
    opened: asyncio.Queue[tuple[Channel, Open]] = asyncio.Queue()
    server = await loop.create_server(lambda: _Accepting(settings, served), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    owner = _Feeds()

    def start(ws: TunnelSocket) -> None:
        owner.session = TunnelSession(
            ws, settings, role=Role.AGENT, name="agent",
            on_open=lambda ch, head: opened.put_nowait((ch, head)))
        owner.session.start()

    try:
        agent_socket = await asyncio.wait_for(dial(
            f"ws://127.0.0.1:{port}/tunnel", {}, owner,
            max_message=frames.max_message(settings.max_frame), start=start), 5)
        assert owner.session is not None
        relay, relay_socket = await asyncio.wait_for(served, 5)
        try:
            yield SocketLink(relay, owner.session, opened, relay_socket, agent_socket)
        finally:
            await owner.session.close()
            await relay.close()
            agent_socket.abort()
            relay_socket.abort()
    finally:
        server.close()
        await server.wait_closed()


async def test_an_exchange_crosses_a_real_socket_byte_exact_under_flow_control() -> None:
    payload = bytes(i % 251 for i in range(300_000))  # many windows, many frames
    async with socket_link() as s:
        relay_ch = s.relay.open_channel(Open("http", method="POST", path="/up"))
        upload = asyncio.ensure_future(relay_ch.write(payload, fin=True))
        agent_ch, head = await asyncio.wait_for(s.opened.get(), 5)
        assert head.path == "/up"
        assert await read_all(agent_ch) == payload
        await asyncio.wait_for(upload, 5)
        agent_ch.send_head(Head(200))
        download = asyncio.ensure_future(agent_ch.write(payload[::-1], fin=True))
        assert await asyncio.wait_for(relay_ch.head, 5) == Head(200)
        assert await read_all(relay_ch) == payload[::-1]
        await asyncio.wait_for(download, 5)
        await eventually(lambda: s.relay.channels == {} and s.agent.channels == {})
        assert s.relay.bytes_in == s.agent.bytes_out and s.agent.bytes_in == s.relay.bytes_out


async def test_ws_messages_cross_a_real_socket_and_a_ping_gets_its_pong() -> None:
    async with socket_link() as s:
        relay_ch = s.relay.open_channel(Open("ws", path="/ws"))
        agent_ch, _ = await asyncio.wait_for(s.opened.get(), 5)
        agent_ch.send_head(Head(101))
        await asyncio.wait_for(relay_ch.head, 5)
        for size in (0, 1, 5000, 3 * SMALL.window):
            sending = asyncio.ensure_future(relay_ch.write(b"m" * size, message=True))
            assert await asyncio.wait_for(agent_ch.read_message(), 5) == (b"m" * size, False)
            await sending
        assert s.relay.keepalive_tick()
        await eventually(lambda: s.relay.rtt_s is not None)


async def test_the_socket_going_away_fails_every_channel_as_tunnel_lost() -> None:
    async with socket_link() as s:
        relay_ch = s.relay.open_channel(Open("http"), fin=True)
        agent_ch, _ = await asyncio.wait_for(s.opened.get(), 5)
        reading = asyncio.ensure_future(agent_ch.read())
        assert await asyncio.wait_for(reading, 5) is None  # the OPEN's FIN
        s.agent_socket.send_close(1000, b"")
        with pytest.raises(ChannelClosed) as info:
            await asyncio.wait_for(relay_ch.head, 5)
        assert info.value.tunnel_lost
        await eventually(lambda: not s.agent.alive)
        with pytest.raises(ChannelClosed):
            await agent_ch.write(b"late")


async def test_flush_returns_once_queued_frames_reached_the_socket() -> None:
    async with socket_link() as s:
        for _ in range(50):
            s.relay.send_drain(Drain("deploy", 0))
        await asyncio.wait_for(s.relay.flush(timeout=5), 6)
        assert s.relay.outbox_bytes == 0 and s.relay._flushed.is_set()


async def test_wait_head_is_bounded_and_wakes_on_the_head_or_the_end(link: Link) -> None:
    channel = link.relay.open_channel(Open("http"), fin=True)
    agent_ch, _ = await asyncio.wait_for(link.opened.get(), 5)
    assert not await channel.wait_head(0.01)  # nothing yet: the bound holds
    waiting = asyncio.ensure_future(channel.wait_head(5))
    await settle()
    assert not waiting.done()
    agent_ch.send_head(Head(204))
    assert await asyncio.wait_for(waiting, 5)
    assert channel.head.result() == Head(204)
    ended = link.relay.open_channel(Open("http"), fin=True)
    waiting = asyncio.ensure_future(ended.wait_head(5))
    await settle()
    ended.close(1001, "gone")
    assert await asyncio.wait_for(waiting, 5)
    with pytest.raises(ChannelClosed):
        ended.head.result()


async def test_whole_messages_go_to_deliver_while_the_reader_waits(link: Link) -> None:
    """Offered in the tunnel's read, in order; refused ones come back from read_message and
    the messages after them wait behind it; fragments are always the reader's to join."""
    relay_ch = link.relay.open_channel(Open("ws"))
    agent_ch, _ = await link.accept()
    delivered: list[tuple[bytes, bool]] = []
    accepting = True

    def deliver(data: bytes, text: bool) -> bool:
        if accepting:
            delivered.append((data, text))
        return accepting

    reading = asyncio.ensure_future(agent_ch.read_message(deliver))
    # Several windows' worth: the writes complete only if credit goes back as each message is
    # handed on (nobody reads them).
    count = 4 * SMALL.window // WS_FRAME_COST
    for n in range(count):
        await asyncio.wait_for(relay_ch.write(b"m%d" % n, text=n % 2 == 0, message=True), 5)
    await eventually(lambda: len(delivered) == count)
    assert delivered == [(b"m%d" % n, n % 2 == 0) for n in range(count)]
    assert not reading.done()  # never woken for them
    accepting = False
    await relay_ch.write(b"refused", message=True)
    assert await asyncio.wait_for(reading, 5) == (b"refused", False)
    accepting = True
    for n in range(3):
        await relay_ch.write(b"after %d" % n, message=True)
    await settle()
    assert len(delivered) == count  # the reader is not waiting: they queue for it, in order
    for n in range(3):
        assert await asyncio.wait_for(agent_ch.read_message(deliver), 5) == (b"after %d" % n,
                                                                              False)
    big = b"f" * (3 * link.relay.settings.max_frame)  # crosses as MORE fragments
    sending = asyncio.ensure_future(relay_ch.write(big, message=True))
    assert await asyncio.wait_for(agent_ch.read_message(deliver), 5) == (big, False)
    await sending
    assert len(delivered) == count


async def test_send_now_queues_what_credit_allows_and_hands_back_the_rest(link: Link) -> None:
    """The client socket's read sends with send_now: whole messages go at once while credit
    lasts; past it the rest comes back, and finishes through write() once credit returns."""
    relay_ch = link.relay.open_channel(Open("ws"))
    agent_ch, _ = await link.accept()
    assert relay_ch.send_now(b"", text=True) is None  # an empty message is a message too
    assert relay_ch.send_now(b"hello", text=False) is None
    assert await asyncio.wait_for(agent_ch.read_message(), 5) == (b"", True)
    assert await asyncio.wait_for(agent_ch.read_message(), 5) == (b"hello", False)
    # Nobody reads: the window runs out part-way through a message.
    big = bytes(range(256)) * (2 * SMALL.window // 256)
    rest = relay_ch.send_now(big, text=False)
    assert rest is not None and 0 < len(rest) < len(big)
    finishing = asyncio.ensure_future(relay_ch.write(rest, message=True))
    assert await asyncio.wait_for(agent_ch.read_message(), 5) == (big, False)
    await asyncio.wait_for(finishing, 5)
    agent_ch.close(4000, "done")
    await settle()
    with pytest.raises(ChannelClosed):
        relay_ch.send_now(b"x", text=False)
