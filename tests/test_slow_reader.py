"""A slow client must slow the host down, not grow the relay's or the agent's memory."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

from relay.devhost import STREAMS, pattern_bytes
from relay.tunnel.session import Channel
from tests.harness import Stack, eventually, host_app_with_hold, stack

MiB = 1 << 20
SIZE = 64 * MiB


def only_channel(channels: dict[int, Channel]) -> Channel:
    assert len(channels) == 1
    return next(iter(channels.values()))


async def stalled(sender: Channel, max_frame: int, timeout: float = 10.0) -> None:
    """Until ``sender`` is out of credit and has sent nothing for 0.1 s. Credit first runs out
    while the kernel's socket buffers further down still take bytes: the credit those bytes
    return must be spent before what is asserted next holds (polled, bounded)."""
    deadline = time.monotonic() + timeout
    sent = sender.bytes_out
    while True:
        await asyncio.sleep(0.1)
        if sender.bytes_out == sent and sender.send_window.credit < max_frame:
            return
        assert time.monotonic() < deadline, "the stream never stalled"
        sent = sender.bytes_out


async def test_paused_download_keeps_buffers_bounded_and_the_agent_waits_on_credit(
    full_stack: Stack,
) -> None:
    s = full_stack
    window = s.relay.config.tunnel.stream_window_bytes
    max_frame = s.relay.config.tunnel.max_frame_bytes
    tunnel = s.relay.state.registry.get(s.host_id)
    assert tunnel is not None and s.agent.agent.session is not None
    agent_session = s.agent.agent.session
    expected = hashlib.sha256()
    for start in range(0, SIZE, 4 * MiB):
        expected.update(pattern_bytes(4 * MiB, start))
    received = hashlib.sha256()
    size = 0

    async with s.client.get(s.url(f"/bytes/{SIZE}"), headers=s.auth()) as resp:
        assert resp.status == 200
        first = await resp.content.readexactly(MiB)
        received.update(first)
        size += len(first)
        relay_ch = only_channel(tunnel.session.channels)
        agent_ch = only_channel(agent_session.channels)

        # Stop reading for a while: everything between the host and the client fills up.
        await stalled(agent_ch, max_frame)
        sent_by_agent = []
        for _ in range(20):
            await asyncio.sleep(0.05)
            assert relay_ch.buffered_bytes <= window
            # Bytes the agent sent that the relay has not handed on to the client yet.
            handed_on = relay_ch.bytes_in - relay_ch.buffered_bytes
            assert agent_ch.bytes_out - handed_on <= window
            assert agent_ch.send_window.credit < max_frame  # waiting for credit...
            assert agent_session.outbox_bytes <= window  # ...not piling frames up
            assert tunnel.session.outbox_bytes <= window
            assert s.host.runner.app[STREAMS].active == 1
            sent_by_agent.append(agent_ch.bytes_out)
        # The host is held back: nothing moves while the client is not reading.
        assert sent_by_agent[-1] == sent_by_agent[-5]
        assert sent_by_agent[-1] < SIZE // 2

        # Read the rest slowly, checking the bounds as the stream moves.
        while True:
            data = await resp.content.read(256 * 1024)
            if not data:
                break
            received.update(data)
            size += len(data)
            if size % (8 * MiB) < 256 * 1024:
                assert relay_ch.buffered_bytes <= window
                await asyncio.sleep(0.01)

    assert size == SIZE
    assert received.hexdigest() == expected.hexdigest()
    await eventually(lambda: s.host.runner.app[STREAMS].finished == 1)


async def test_host_reading_an_upload_slowly_holds_the_client_back(tmp_path: Path) -> None:
    release = asyncio.Event()  # the host stops reading the upload until the checks are done
    async with stack(tmp_path, host_app=host_app_with_hold(release)) as s:
        await _upload_to_a_host_not_reading(s, release)


async def _upload_to_a_host_not_reading(s: Stack, release: asyncio.Event) -> None:
    window = s.relay.config.tunnel.stream_window_bytes
    max_frame = s.relay.config.tunnel.max_frame_bytes
    tunnel = s.relay.state.registry.get(s.host_id)
    assert tunnel is not None and s.agent.agent.session is not None
    agent_session = s.agent.agent.session
    size = 32 * MiB
    produced = 0
    payload_hash = hashlib.sha256()

    async def upload() -> AsyncIterator[bytes]:
        nonlocal produced
        while produced < size:
            piece = pattern_bytes(256 * 1024, produced)
            payload_hash.update(piece)
            produced += len(piece)
            yield piece

    request = asyncio.ensure_future(
        s.client.post(s.url("/hold-sink"), data=upload(), headers=s.auth()))
    await eventually(lambda: len(tunnel.session.channels) == 1)
    relay_ch = only_channel(tunnel.session.channels)
    await eventually(lambda: len(agent_session.channels) == 1)
    agent_ch = only_channel(agent_session.channels)
    await stalled(relay_ch, max_frame)
    sent_by_relay = []
    for _ in range(12):  # while the host is not reading
        await asyncio.sleep(0.05)
        assert agent_ch.buffered_bytes <= window
        assert relay_ch.send_window.credit < max_frame  # the relay waits for credit...
        assert tunnel.session.outbox_bytes <= window  # ...instead of queueing frames
        sent_by_relay.append(relay_ch.bytes_out)
    assert sent_by_relay[-1] == sent_by_relay[-5]
    assert produced < size // 2  # the client itself was held back

    release.set()
    async with await request as resp:
        assert resp.status == 200
        assert await resp.json() == {"sha256": payload_hash.hexdigest(), "size": size}
