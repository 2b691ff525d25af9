"""What a tunnel peer can make a session queue is bounded, through the driver's writer (the
rules themselves are in tests/test_mux.py).

The peer's socket is a writer that never completes (a peer that does not read), and time is a
FakeClock, so the bounds and the cut-off are exact.
"""

from __future__ import annotations

import asyncio

import pytest

from relay.errors import ProtocolViolation
from relay.protocol import frames
from relay.protocol.frames import FrameType
from relay.protocol.messages import Open, Renew
from relay.tunnel.session import (
    Role,
    SessionSettings,
    TunnelSession,
    min_outbox_bound,
)
from tests.clock import FakeClock

SETTINGS = SessionSettings(window=4096, max_frame=1024, max_streams=64, ping_interval_s=1,
                           keepalive_misses=3, max_outbox=min_outbox_bound(1024))


class StuckSocket:
    """Takes the first frame and then never finishes writing it: the peer stopped reading."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.release = asyncio.Event()

    async def send(self, data: bytes) -> None:
        self.written.append(data)
        await self.release.wait()


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def relay_session(socket: StuckSocket, clock: FakeClock, cut: list[str]) -> TunnelSession:
    session = TunnelSession(socket.send, SETTINGS, role=Role.RELAY, name="t", clock=clock,
                            on_backlog=cut.append)
    session.start(keepalive=False)
    return session


async def test_a_ping_flood_queues_one_pong_answering_the_latest_ping() -> None:
    socket, clock = StuckSocket(), FakeClock()
    cut: list[str] = []
    session = relay_session(socket, clock, cut)
    try:
        session.feed(frames.encode_ping(FrameType.PING, b"first"))
        await settle()  # the writer takes the first PONG and is stuck writing it
        for n in range(10_000):
            session.feed(frames.encode_ping(FrameType.PING, b"%05d" % n + b"x" * 1000))
        assert session.outbox_bytes < 2 * 1024  # one PONG's worth, not ten thousand
        assert session.pings_coalesced == 9_999
        socket.release.set()
        await settle()
        pongs = [frames.decode(f, 1024) for f in socket.written]
        assert [p.type for p in pongs] == [FrameType.PONG, FrameType.PONG]
        assert pongs[0].payload == b"first"
        assert pongs[1].payload.startswith(b"09999")  # the latest PING's payload
        assert cut == []
    finally:
        socket.release.set()
        await session.close()


async def test_control_replies_past_the_bound_cut_the_peer_off() -> None:
    """WINDOW/CLOSE/OPEN frames are queued without waiting: past the bound the peer is cut."""
    socket, clock = StuckSocket(), FakeClock()
    cut: list[str] = []
    session = relay_session(socket, clock, cut)
    try:
        channel = session.open_channel(Open("http", method="GET", path="/"))
        await settle()
        head = Open("http", method="GET", path="/" + "p" * 60_000)
        for _ in range(SETTINGS.outbox_bound // 60_000 + 2):
            if cut:
                break
            channel.close()
            channel = session.open_channel(head)
        assert cut == ["outgoing queue over its bound"]
        assert not session.alive
        assert session.outbox_bytes == 0  # what was queued for it is dropped, not kept
    finally:
        socket.release.set()
        await session.close()


async def test_a_write_stuck_for_the_keepalive_limit_cuts_the_peer_off() -> None:
    socket, clock = StuckSocket(), FakeClock()
    cut: list[str] = []
    session = relay_session(socket, clock, cut)
    try:
        session.feed(frames.encode_ping(FrameType.PING, b"x"))
        await settle()
        clock.advance(SETTINGS.silence_limit_s * 0.9)
        session.feed(frames.encode_ping(FrameType.PING, b"y"))  # it still sends: not silent
        assert session.keepalive_tick()
        assert cut == []
        clock.advance(SETTINGS.silence_limit_s * 0.2)
        session.feed(frames.encode_ping(FrameType.PING, b"z"))
        assert not session.keepalive_tick()
        assert cut == ["no write completed for the keepalive limit"]
    finally:
        socket.release.set()
        await session.close()


async def test_writes_that_complete_keep_the_stall_clock_at_zero() -> None:
    clock = FakeClock()
    cut: list[str] = []
    written: list[bytes] = []

    async def send(data: bytes) -> None:
        written.append(data)
        clock.advance(1.0)  # slow but moving
        await asyncio.sleep(0)

    session = TunnelSession(send, SETTINGS, role=Role.RELAY, name="t", clock=clock,
                            on_backlog=cut.append)
    session.start(keepalive=False)
    try:
        for n in range(10):
            session.feed(frames.encode_ping(FrameType.PING, b"%d" % n))
            await settle()
            assert session.keepalive_tick()
        assert cut == [] and len(written) >= 10
    finally:
        await session.close()


async def test_renew_reaches_the_relay_on_a_v2_session() -> None:
    seen: list[Renew] = []
    session = TunnelSession(StuckSocket().send, SETTINGS, role=Role.RELAY, name="t",
                            on_renew=seen.append, version=2)
    session.feed(frames.encode_json(FrameType.RENEW, 0, {"token": "t"}))
    assert seen == [Renew("t")]
    with pytest.raises(ProtocolViolation):
        session.feed(frames.encode(FrameType.RENEW, 0, b"not json"))
    with pytest.raises(ProtocolViolation, match="RENEWED sent to the relay"):
        session.feed(frames.encode_json(FrameType.RENEWED, 0, {}))
