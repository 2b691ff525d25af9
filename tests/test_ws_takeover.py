"""A client's WebSocket channel once the relay took the connection over from aiohttp
(relay.server.client_socket, relay.server.ws_channel).

A hand-written client (tests/rawws.py) talks RFC 6455 to a real relay, agent and host service
on loopback, so framing, the close handshake and back-pressure are checked against the
protocol rather than against the relay's own parser or aiohttp's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import relay.tunnel.ws_channel as ws_channel
from relay.aio import cancel_and_wait
from relay.config import load_config
from relay.errors import CloseCode
from relay.protocol import frames
from relay.protocol.frames import WS_FRAME_COST, Flags, FrameType
from relay.tunnel.channel_socket import ChannelSocket
from tests.harness import (
    Stack,
    eventually,
    stack,
    start_agent,
    start_host,
    start_relay,
    write_config,
)
from tests.rawws import BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, Message, RawWebSocket
from tests.test_rogue_agent import RawTunnel
from tests.test_ws_proxy import host_app, host_closes


def set_buffer(transport: asyncio.BaseTransport | None, option: int, size: int) -> None:
    """Small: the kernel takes no megabytes for a peer that does not read. (A receive buffer
    is never shrunk: a tiny window makes loopback crawl.)"""
    assert transport is not None
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, option, size)


@pytest.fixture
async def s(tmp_path: Path) -> AsyncIterator[Stack]:
    # A small window, so a few messages use up a channel's credit.
    async with stack(tmp_path, sections={"tunnel": {"stream_window_bytes": 65536}},
                     host_app=host_app()) as running:
        yield running


async def connect(s: Stack, path: str = "/ws") -> RawWebSocket:
    ws = await RawWebSocket.connect(s.relay.config.server.port, f"/hosts/{s.host_id}{path}",
                                    s.auth())
    await eventually(lambda: len(s.relay.state.ws_bridges) > 0)
    return ws


def client_socket(s: Stack) -> ChannelSocket:
    (bridge,) = s.relay.state.ws_bridges
    assert bridge.socket is not None
    return bridge.socket


def unmasked(opcode: int, payload: bytes) -> bytes:
    assert len(payload) < 126
    return struct.pack("!BB", 0x80 | opcode, len(payload)) + payload


async def read_eof(ws: RawWebSocket, within: float = 5.0) -> bytes:
    """Whatever the relay still sends until it closes the connection."""
    return await asyncio.wait_for(ws.reader.read(), within)


async def no_channels_left(s: Stack) -> None:
    tunnel = s.relay.state.registry.get(s.host_id)
    assert tunnel is not None
    await eventually(lambda: not s.relay.state.ws_bridges and not tunnel.session.channels)


# -- the takeover ----------------------------------------------------------------------------

async def test_the_channel_is_served_on_the_relays_own_socket(s: Stack) -> None:
    ws = await connect(s)
    assert isinstance(client_socket(s), ChannelSocket)
    # aiohttp no longer lists the connection: its shutdown would not see it.
    server = s.relay.listeners.public.server
    assert server is not None and not server.connections
    await ws.send_text("ünï")
    assert await ws.receive() == Message(TEXT, "ünï".encode())
    await ws.send_binary(b"\x00\xff")
    assert (await ws.receive()).data == b"\x00\xff"
    await ws.send_close(1000)
    assert (await ws.receive()).opcode == CLOSE
    await no_channels_left(s)


async def test_fragments_are_joined_and_pings_answered_between_them(s: Stack) -> None:
    ws = await connect(s)
    await ws.send_frame(TEXT, b"one ", fin=False)
    await ws.send_frame(PING, b"probe")
    await ws.send_frame(CONTINUATION, b"two ", fin=False)
    await ws.send_frame(CONTINUATION, b"three")
    # The PONG comes first (rawws.receive skips it: read the frame itself).
    fin, opcode, payload = await asyncio.wait_for(ws._read_frame(), 5)
    assert (fin, opcode, payload) == (True, PONG, b"probe")
    assert await ws.receive() == Message(TEXT, b"one two three")
    # Several messages in one write come back in order.
    await ws.send_raw(b"".join(RawWebSocket.encode(BINARY, b"%d" % n) for n in range(50)))
    for n in range(50):
        assert (await ws.receive()).data == b"%d" % n
    ws.abort()


# -- refusals ----------------------------------------------------------------------------------

async def test_an_unmasked_client_frame_is_closed_1002(s: Stack) -> None:
    ws = await connect(s, "/ws-record")
    await ws.send_raw(unmasked(TEXT, b"hi"))
    rest = await read_eof(ws)
    assert rest[:2] == bytes((0x80 | CLOSE, 2)) and struct.unpack("!H", rest[2:4])[0] == 1002
    assert await asyncio.wait_for(host_closes(s).get(), 5) == (CloseCode.PROTOCOL_ERROR, "")
    await no_channels_left(s)


async def test_an_oversized_message_is_refused_from_its_header_with_1009(s: Stack) -> None:
    limit = s.relay.config.tunnel.max_ws_message_bytes
    ws = await connect(s, "/ws-record")
    # Only the header of a message one byte over the limit: refused before any payload.
    header = struct.pack("!BBQ", 0x80 | BINARY, 0x80 | 127, limit + 1) + os.urandom(4)
    await ws.send_raw(header)
    close = await ws.receive()
    assert close.opcode == CLOSE and close.close_code == CloseCode.MESSAGE_TOO_BIG
    assert close.close_reason == f"message too big: the limit is {limit} bytes".encode()
    assert await read_eof(ws) == b""
    seen = await asyncio.wait_for(host_closes(s).get(), 5)
    assert seen[0] == CloseCode.MESSAGE_TOO_BIG
    await no_channels_left(s)


async def test_a_message_at_the_limit_passes(tmp_path: Path) -> None:
    async with stack(tmp_path, sections={"tunnel": {"max_ws_message_bytes": 70000}},
                     host_app=host_app()) as small:
        ws = await connect(small)
        # Fragmented, so the joined size is what counts.
        await ws.send_frame(BINARY, b"a" * 40000, fin=False)
        await ws.send_frame(CONTINUATION, b"b" * 30000)
        assert (await ws.receive()).data == b"a" * 40000 + b"b" * 30000
        await ws.send_frame(BINARY, b"a" * 40000, fin=False)
        await ws.send_frame(CONTINUATION, b"b" * 30001)
        close = await ws.receive()
        assert close.opcode == CLOSE and close.close_code == CloseCode.MESSAGE_TOO_BIG


# -- the close handshake -----------------------------------------------------------------------

async def test_the_clients_close_is_answered_and_reaches_the_host(s: Stack) -> None:
    ws = await connect(s, "/ws-record")
    await ws.send_text("hi")
    assert (await ws.receive()).data == b"hi"
    await ws.send_close(4000, "bye ✓".encode())
    answer = await ws.receive()
    assert answer.opcode == CLOSE and answer.close_code == 1000
    assert await read_eof(ws) == b""  # the relay closes the connection after its answer
    assert await asyncio.wait_for(host_closes(s).get(), 5) == (4000, "bye ✓")
    await no_channels_left(s)


async def test_an_empty_close_reaches_the_host_as_1011_not_a_clean_1000(s: Stack) -> None:
    ws = await connect(s, "/ws-record")
    await ws.send_frame(CLOSE)
    assert (await ws.receive()).opcode == CLOSE
    seen, _ = await asyncio.wait_for(host_closes(s).get(), 5)
    assert seen == CloseCode.INTERNAL_ERROR


async def test_the_hosts_close_reaches_the_client_and_its_answer_ends_the_connection(
    s: Stack, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ws_channel, "CLOSE_TIMEOUT_S", 10.0)  # far longer than the answer takes
    ws = await connect(s)
    await ws.send_text("close:4321")
    close = await ws.receive()
    assert (close.close_code, close.close_reason) == (4321, b"asked to close")
    # Messages sent after the relay's CLOSE are dropped; the CLOSE answer ends it at once.
    await ws.send_text("late")
    started = time.monotonic()
    await ws.send_close(4321)
    assert await read_eof(ws) == b""
    assert time.monotonic() - started < 5.0
    await no_channels_left(s)


async def test_a_client_that_never_answers_the_close_is_hung_up_on(
    s: Stack, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ws_channel, "CLOSE_TIMEOUT_S", 0.3)
    ws = await connect(s)
    await ws.send_text("close:4000")
    close = await ws.receive()
    assert close.close_code == 4000
    started = time.monotonic()
    # The client keeps sending but never answers: the relay waits its close timeout only.
    await ws.send_text("still here")
    assert await read_eof(ws, within=3) == b""
    assert 0.2 <= time.monotonic() - started < 2.0
    await no_channels_left(s)


async def test_a_client_gone_without_a_close_is_no_clean_close_for_the_host(s: Stack) -> None:
    ws = await connect(s, "/ws-record")
    await ws.send_text("hi")
    assert (await ws.receive()).data == b"hi"
    ws.abort()
    seen, _ = await asyncio.wait_for(host_closes(s).get(), 5)
    assert seen == CloseCode.INTERNAL_ERROR
    await no_channels_left(s)


# -- back-pressure -----------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def raw_channel(s: Stack) -> AsyncIterator[tuple[RawTunnel, int, RawWebSocket]]:
    """A channel to a hand-driven agent: it grants no credit unless the test does."""
    raw = await RawTunnel.connect(s.client, s.relay, "acme:raw", s.agent_token("acme:raw"))
    try:
        opening = asyncio.ensure_future(RawWebSocket.connect(
            s.relay.config.server.port, "/hosts/acme:raw/ws", s.auth()))
        opened = await raw.expect(FrameType.OPEN)
        await raw.send(frames.encode_json(FrameType.HEAD, opened.stream_id, {"status": 101}))
        ws = await asyncio.wait_for(opening, 5)
        try:
            yield raw, opened.stream_id, ws
        finally:
            ws.abort()
    finally:
        await raw.close()


async def test_a_client_outrunning_the_channels_credit_is_held_not_buffered(s: Stack) -> None:
    """Once the channel's credit is spent the relay stops reading the client (its socket is
    held) rather than queue its messages; as credit comes back they all go, in order."""
    window = s.relay.state.settings.window
    size, count = 16 * 1024, 16  # four windows
    payloads = [n.to_bytes(4, "big") * (size // 4) for n in range(count)]
    async with raw_channel(s) as (raw, stream_id, ws):
        sending = asyncio.ensure_future(ws.send_raw(b"".join(
            RawWebSocket.encode(BINARY, p) for p in payloads)))
        held = client_socket(s)
        await eventually(lambda: held._held)
        (bridge,) = s.relay.state.ws_bridges
        assert bridge.channel.send_window.credit < size + WS_FRAME_COST
        assert len(held._buffer or b"") <= 256 * 1024 + size  # at most one read waits
        received: list[bytes] = []
        parts: list[bytes] = []
        while len(received) < count:
            frame = await raw.recv()
            assert frame.type is FrameType.DATA and frame.stream_id == stream_id
            parts.append(frame.payload)
            if not frame.flags & Flags.MORE:
                received.append(b"".join(parts))
                parts = []
            await raw.send(frames.encode_window(stream_id, len(frame.payload) + WS_FRAME_COST))
        assert received == payloads
        assert sum(map(len, received)) > 3 * window
        await asyncio.wait_for(sending, 5)
        await eventually(lambda: not held._held)


async def test_a_client_that_does_not_read_holds_the_agents_credit(s: Stack) -> None:
    """The client reads nothing: the relay's socket to it fills and pauses, the relay returns
    no more credit, so what waits stays within the channel's window; nothing is lost or
    reordered once the client reads."""
    window = s.relay.state.settings.window
    size, count = 8 * 1024, 512  # 4 MiB: far more than the socket buffers and a window
    async with raw_channel(s) as (raw, stream_id, ws):
        full = client_socket(s)
        set_buffer(full.transport, socket.SO_SNDBUF, 4096)
        credit = window
        sent = 0

        async def agent_sends() -> None:
            nonlocal credit, sent
            while sent < count:
                while credit >= size + WS_FRAME_COST and sent < count:
                    await raw.send(frames.encode(FrameType.DATA, stream_id,
                                                 sent.to_bytes(4, "big") * (size // 4)))
                    credit -= size + WS_FRAME_COST
                    sent += 1
                if sent < count:
                    frame = await raw.recv(within=30)
                    assert frame.type is FrameType.WINDOW
                    credit += frames.decode_window(frame)

        sender = asyncio.ensure_future(agent_sends())
        try:
            await eventually(lambda: full._paused, timeout=10)
            (bridge,) = s.relay.state.ws_bridges
            assert bridge.channel.buffered_bytes <= window
            assert not sender.done()
            # Room again, so the rest crosses at loopback speed.
            set_buffer(full.transport, socket.SO_SNDBUF, 1 << 20)
            for n in range(count):
                got = await ws.receive(within=10)
                assert got == Message(BINARY, n.to_bytes(4, "big") * (size // 4)), n
            await asyncio.wait_for(sender, 5)
        finally:
            await cancel_and_wait([sender])


# -- the relay's end ---------------------------------------------------------------------------

async def test_a_stopping_relay_closes_its_clients_channels(tmp_path: Path) -> None:
    """aiohttp's shutdown no longer sees a taken-over channel: the relay's own stop closes it
    (4410, its tunnel is gone), lets the client answer, and waits for nothing else."""
    relay = await start_relay(load_config(write_config(tmp_path), env={}))
    host = await start_host(host_app())
    agent = await start_agent(relay.ws_url, "acme:laptop", host.url, token=relay.agent_token())
    stopped = False
    try:
        ws = await RawWebSocket.connect(relay.config.server.port, "/hosts/acme:laptop/ws",
                                        {"Authorization": f"Bearer {relay.token()}"})
        await ws.send_text("hi")
        assert (await ws.receive()).data == b"hi"
        started = time.monotonic()
        stopping = asyncio.ensure_future(relay.listeners.cleanup())
        close = await ws.receive()
        assert close.opcode == CLOSE and close.close_code == CloseCode.TUNNEL_GONE
        await ws.send_close(1000)
        await asyncio.wait_for(stopping, 10)
        stopped = True
        assert time.monotonic() - started < 4.0
        assert not relay.state.ws_bridges
        assert await read_eof(ws) == b""
    finally:
        await agent.stop()
        if not stopped:
            await relay.stop()
        await host.stop()
