"""How a session's frames reach the socket: batched per loop iteration, in order, and held
while the socket is full (relay/tunnel/session.py, relay/tunnel/sink.py).

The sink here records every write it is handed (one list of frames = one socket write); the
last tests run the real WebSocket sink over real sockets, with frames past every length form
of RFC 6455 (7-bit, 16-bit and 64-bit) in both directions, so masking and framing are checked
byte for byte by aiohttp's own reader.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import pytest

from relay.protocol import frames
from relay.protocol.frames import FrameType
from relay.protocol.messages import Head, Open
from relay.tunnel.session import ChannelClosed, Role, SessionSettings, TunnelSession
from tests.test_session import read_all, socket_link

SETTINGS = SessionSettings(window=1 << 20, max_frame=1024, max_streams=64)


class RecordingSink:
    """A socket that takes everything (or, while ``full``, reports itself full)."""

    def __init__(self) -> None:
        self.writes: list[list[bytes]] = []
        self.full = False
        self.drained = asyncio.Event()

    def write(self, batch: Sequence[bytes]) -> bool:
        self.writes.append(list(batch))
        return not self.full

    async def drain(self) -> None:
        await self.drained.wait()
        self.full = False

    def types(self) -> list[list[FrameType]]:
        return [[frames.decode(f, 1 << 20).type for f in batch] for batch in self.writes]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def agent(sink: RecordingSink, *, http_stream: bool = True
                ) -> AsyncIterator[TunnelSession]:
    """An agent's session that leaves its streams to the test; with stream 1 (an HTTP GET
    the relay opened) unless ``http_stream`` is False. Closed at the end."""
    session = TunnelSession(sink, SETTINGS, role=Role.AGENT, name="agent",
                            on_open=lambda channel, head: None)
    session.start(keepalive=False)
    if http_stream:
        session.feed(frames.encode(FrameType.OPEN, 1, Open("http", path="/").encode(),
                                   int(frames.Flags.FIN)))
    try:
        yield session
    finally:
        await session.close()


async def test_a_head_and_the_data_after_it_leave_in_one_write() -> None:
    sink = RecordingSink()
    async with agent(sink) as session:
        channel = session.channels[1]
        channel.send_head(Head(200))
        assert sink.writes == []  # the HEAD waits for what follows it
        await channel.write(b"body", fin=True)
        assert sink.types() == [[FrameType.HEAD, FrameType.DATA]]
        await settle()
        assert len(sink.writes) == 1  # the flush found nothing left


async def test_a_head_alone_leaves_at_the_next_flush() -> None:
    sink = RecordingSink()
    async with agent(sink) as session:
        session.channels[1].send_head(Head(101))
        await settle()
        assert sink.types() == [[FrameType.HEAD]]


async def test_frames_queued_in_one_iteration_cost_two_writes_in_order() -> None:
    """The first frame leaves at once; the other channels' frames join one flush."""
    sink = RecordingSink()
    async with agent(sink, http_stream=False) as session:
        ids = list(range(1, 33, 2))
        for stream_id in ids:
            session.feed(frames.encode(FrameType.OPEN, stream_id,
                                       Open("ws", path="/").encode()))
        for stream_id in ids:
            session.channels[stream_id].send_head(Head(101))
        await settle()
        sink.writes.clear()

        async def answer(stream_id: int) -> None:
            await session.channels[stream_id].write(b"%d" % stream_id, message=True)

        await asyncio.gather(*(answer(i) for i in ids))
        await settle()
        assert len(sink.writes) == 2
        sent = [frames.decode(f, 1024) for batch in sink.writes for f in batch]
        assert [(f.stream_id, f.payload) for f in sent] == [(i, b"%d" % i) for i in ids]


async def test_a_bounded_cork_writes_what_waited_longer_than_the_bound() -> None:
    """A peer link's session (``cork_s``): frames queued after a write wait for the flush
    only while the bound lasts (in CPU time: ``cork_clock``); the first one queued past it
    takes them all out at once, in the same iteration, while the peer would otherwise wait
    for the iteration to end."""
    now = [100.0]
    sink = RecordingSink()
    session = TunnelSession(sink, SETTINGS, role=Role.AGENT, name="link",
                            on_open=lambda channel, head: None, cork_s=0.001,
                            cork_clock=lambda: now[0])
    session.start(keepalive=False)
    try:
        ids = (1, 3, 5, 7)
        for stream_id in ids:
            session.feed(frames.encode(FrameType.OPEN, stream_id, Open("ws", path="/").encode()))
            session.channels[stream_id].send_head(Head(101))
        await settle()
        sink.writes.clear()
        first, second, third, fourth = (session.channels[i] for i in ids)
        first.send_now(b"1", text=False)  # written at once, as ever: the cork starts
        second.send_now(b"2", text=False)  # within the bound: it waits
        assert [len(batch) for batch in sink.writes] == [1]
        now[0] += 0.0011
        third.send_now(b"3", text=False)  # past it: out now, with the one that waited
        assert [len(batch) for batch in sink.writes] == [1, 2]
        fourth.send_now(b"4", text=False)  # a new bound began with that write
        assert [len(batch) for batch in sink.writes] == [1, 2]
        await settle()
        sent = [frames.decode(f, 1024) for batch in sink.writes for f in batch]
        assert [f.payload for f in sent] == [b"1", b"2", b"3", b"4"]  # in order, each once
        assert [len(batch) for batch in sink.writes] == [1, 2, 1]  # the flush took the last
    finally:
        await session.close()


async def test_without_a_bound_the_cork_lasts_the_whole_iteration() -> None:
    now = [100.0]
    sink = RecordingSink()
    session = TunnelSession(sink, SETTINGS, role=Role.AGENT, name="tunnel",
                            cork_clock=lambda: now[0], on_open=lambda channel, head: None)
    session.start(keepalive=False)
    try:
        for stream_id in (1, 3):
            session.feed(frames.encode(FrameType.OPEN, stream_id, Open("ws", path="/").encode()))
            session.channels[stream_id].send_head(Head(101))
        await settle()
        sink.writes.clear()
        session.channels[1].send_now(b"1", text=False)
        now[0] += 60.0
        session.channels[3].send_now(b"3", text=False)
        assert [len(batch) for batch in sink.writes] == [1]
        await settle()
        assert [len(batch) for batch in sink.writes] == [1, 1]
    finally:
        await session.close()


async def test_a_full_socket_holds_every_write_until_it_drains() -> None:
    sink = RecordingSink()
    async with agent(sink) as session:
        channel = session.channels[1]
        channel.send_head(Head(200))
        sink.full = True
        await channel.write(b"first")
        assert sink.types() == [[FrameType.HEAD, FrameType.DATA]]
        for n in range(5):
            await channel.write(b"more %d" % n)
        session.feed(frames.encode_ping(FrameType.PING, b"p"))
        await settle()
        assert len(sink.writes) == 1  # nothing more while the socket is full
        assert session.mux.writes_in_progress == 1  # the stall clock runs meanwhile
        assert not session._flushed.is_set()
        sink.drained.set()
        await asyncio.wait_for(session.flush(timeout=5), 6)
        assert len(sink.writes) == 2  # what queued meanwhile: one write, in order
        rest = [frames.decode(f, 1024) for f in sink.writes[1]]
        assert [f.payload for f in rest] == [b"more %d" % n for n in range(5)] + [b"p"]
        assert rest[-1].type is FrameType.PONG
        assert session.mux.writes_in_progress == 0


async def test_a_failed_write_fails_the_writer_and_every_channel() -> None:
    class Broken(RecordingSink):
        def write(self, batch: Sequence[bytes]) -> bool:
            raise ConnectionResetError

    async with agent(Broken()) as session:
        channel = session.channels[1]
        channel.send_head(Head(200))
        with pytest.raises(ChannelClosed) as info:
            await channel.write(b"x", fin=True)  # its last frame: no later write would tell
        assert info.value.tunnel_lost
        assert not session.alive and session.closed.is_set()


async def test_every_websocket_length_form_crosses_a_real_socket_byte_exact() -> None:
    """Frames of 7-bit, 16-bit and 64-bit lengths, many per write, masked from the agent."""
    settings = SessionSettings(window=1 << 20, max_frame=100_000)
    payload = bytes(i % 253 for i in range(700_000))
    async with socket_link(settings) as s:
        relay_ch = s.relay.open_channel(Open("http", method="POST", path="/up"))
        upload = asyncio.ensure_future(relay_ch.write(payload, fin=True))
        agent_ch, _ = await asyncio.wait_for(s.opened.get(), 5)
        assert await read_all(agent_ch) == payload
        await asyncio.wait_for(upload, 5)
        agent_ch.send_head(Head(200))
        for size in (0, 1, 125, 126, 65535, 65536, 99_999):
            await agent_ch.write(payload[:size])
        await agent_ch.write(payload, fin=True)
        assert await asyncio.wait_for(relay_ch.head, 5) == Head(200)
        sizes = (0, 1, 125, 126, 65535, 65536, 99_999)
        expected = b"".join(payload[:n] for n in sizes) + payload
        assert await read_all(relay_ch) == expected
