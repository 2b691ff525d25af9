"""HTTP stream rules end to end, a real relay against a raw misbehaving agent (hand-built
frames): a body that does not match its Content-Length never looks complete to the client, and
a response that ends before the request body stops that body with CLOSE 1000."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from relay.errors import CloseCode
from relay.protocol import frames
from relay.protocol.frames import Flags, FrameType
from tests.harness import Stack
from tests.test_rogue_agent import ROGUE_HOST, RawTunnel

TIMEOUT = aiohttp.ClientTimeout(total=10)


def _head(stream: int, length: int) -> bytes:
    return frames.encode_json(FrameType.HEAD, stream, {"status": 200, "headers": [
        ["Content-Type", "text/plain"], ["Content-Length", str(length)]]})


async def _tunnel_still_serves(stack: Stack, tunnel: RawTunnel) -> None:
    request = asyncio.ensure_future(stack.client.get(
        f"{stack.relay.url}/hosts/{ROGUE_HOST}/again", headers=stack.auth(), timeout=TIMEOUT))
    await tunnel.serve_http(b"fine")
    async with await request as resp:
        assert resp.status == 200 and await resp.read() == b"fine"


async def test_a_body_longer_than_its_content_length_aborts_the_client_and_closes_1002(
    full_stack: Stack,
) -> None:
    tunnel = await RawTunnel.connect(full_stack.client, full_stack.relay, ROGUE_HOST,
                                     full_stack.agent_token(ROGUE_HOST))
    try:
        request = asyncio.ensure_future(full_stack.client.get(
            f"{full_stack.relay.url}/hosts/{ROGUE_HOST}/x", headers=full_stack.auth(),
            timeout=TIMEOUT))
        opened = await tunnel.expect(FrameType.OPEN)
        await tunnel.send(_head(opened.stream_id, 5))
        await tunnel.send(frames.encode(FrameType.DATA, opened.stream_id, b"0123456789",
                                        Flags.FIN))
        closed = await tunnel.expect(FrameType.CLOSE)
        assert closed.stream_id == opened.stream_id
        assert frames.decode_close(closed) == (int(CloseCode.PROTOCOL_ERROR),
                                               "body longer than Content-Length")
        with pytest.raises(aiohttp.ClientError):
            async with await request as resp:
                await resp.read()
        await _tunnel_still_serves(full_stack, tunnel)  # only that stream was wrong
    finally:
        await tunnel.close()


async def test_a_body_shorter_than_its_content_length_aborts_the_client(
    full_stack: Stack,
) -> None:
    tunnel = await RawTunnel.connect(full_stack.client, full_stack.relay, ROGUE_HOST,
                                     full_stack.agent_token(ROGUE_HOST))
    try:
        request = asyncio.ensure_future(full_stack.client.get(
            f"{full_stack.relay.url}/hosts/{ROGUE_HOST}/x", headers=full_stack.auth(),
            timeout=TIMEOUT))
        opened = await tunnel.expect(FrameType.OPEN)
        await tunnel.send(_head(opened.stream_id, 100))
        await tunnel.send(frames.encode(FrameType.DATA, opened.stream_id, b"short", Flags.FIN))
        with pytest.raises(aiohttp.ClientPayloadError):
            async with await request as resp:
                assert resp.status == 200
                await resp.read()
        await _tunnel_still_serves(full_stack, tunnel)
    finally:
        await tunnel.close()


async def test_a_response_that_ends_before_the_request_body_stops_it_with_close_1000(
    full_stack: Stack,
) -> None:
    tunnel = await RawTunnel.connect(full_stack.client, full_stack.relay, ROGUE_HOST,
                                     full_stack.agent_token(ROGUE_HOST))
    more_body = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"first part of a long upload"
        await more_body.wait()
        yield b"never needed"

    try:
        request = asyncio.ensure_future(full_stack.client.post(
            f"{full_stack.relay.url}/hosts/{ROGUE_HOST}/up", data=body(),
            headers=full_stack.auth(), timeout=TIMEOUT))
        opened = await tunnel.expect(FrameType.OPEN)
        assert not opened.fin
        first = await tunnel.expect(FrameType.DATA)
        assert first.payload == b"first part of a long upload"
        await tunnel.send(_head(opened.stream_id, 2))
        await tunnel.send(frames.encode(FrameType.DATA, opened.stream_id, b"ok", Flags.FIN))
        async with await request as resp:
            assert resp.status == 200 and await resp.read() == b"ok"
        closed = await tunnel.expect(FrameType.CLOSE)
        assert (closed.stream_id, frames.decode_close(closed)[0]) == (
            opened.stream_id, int(CloseCode.NORMAL))
        more_body.set()
        await _tunnel_still_serves(full_stack, tunnel)
    finally:
        more_body.set()
        await tunnel.close()
