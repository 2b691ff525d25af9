"""The tunnel core's defects, end to end against a real relay: malformed HEADs from a rogue
agent (a raw WebSocket peer speaking hand-built frames), stream-id exhaustion with a real agent,
and a long UTF-8 refusal reason reaching a client's WebSocket intact."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from relay.errors import CloseCode
from relay.protocol import frames
from relay.protocol.frames import Flags, FrameType
from tests.harness import Stack, eventually
from tests.test_rogue_agent import ROGUE_HOST, RawTunnel

BAD_HEADS: list[Any] = [
    {"status": "abc"},
    {"status": 200, "headers": 5},
    {"status": 99},
    {"status": 200, "headers": [["X-Evil", "1\r\nSet-Cookie: stolen=1"]]},
]


@pytest.mark.parametrize("head", BAD_HEADS, ids=["status-abc", "headers-5", "status-99", "crlf"])
async def test_a_malformed_head_is_a_json_502_and_the_rogue_tunnel_is_dropped(
    full_stack: Stack, head: dict[str, Any]
) -> None:
    tunnel = await RawTunnel.connect(full_stack.client, full_stack.relay, ROGUE_HOST,
                                     full_stack.agent_token(ROGUE_HOST))
    registry = full_stack.relay.state.registry
    try:
        request = asyncio.ensure_future(full_stack.client.get(
            f"{full_stack.relay.url}/hosts/{ROGUE_HOST}/x", headers=full_stack.auth(),
            timeout=aiohttp.ClientTimeout(total=10)))
        opened = await tunnel.expect(FrameType.OPEN)
        await tunnel.send(frames.encode(FrameType.HEAD, opened.stream_id,
                                        json.dumps(head).encode()))
        code, _ = await tunnel.expect_close()
        async with await request as resp:
            body = await resp.read()
            assert resp.status == 502, body
            assert resp.headers["Content-Type"].startswith("application/json")
            assert json.loads(body)["error"]["code"] == "tunnel_closed"
            assert "Set-Cookie" not in resp.headers and b"HTTP/1.1 99" not in body
        assert code == int(CloseCode.PROTOCOL_ERROR)
        await eventually(lambda: registry.get(ROGUE_HOST) is None)
    finally:
        await tunnel.close()


async def _answer_with(stack: Stack, answer: Callable[[int], bytes]) -> int | None:
    """Send a client request to the rogue host, answer its OPEN with ``answer(stream_id)``;
    the tunnel's close code, once the client has its (502) answer."""
    tunnel = await RawTunnel.connect(stack.client, stack.relay, ROGUE_HOST,
                                     stack.agent_token(ROGUE_HOST))
    try:
        request = asyncio.ensure_future(stack.client.get(
            f"{stack.relay.url}/hosts/{ROGUE_HOST}/x", headers=stack.auth(),
            timeout=aiohttp.ClientTimeout(total=10)))
        opened = await tunnel.expect(FrameType.OPEN)
        await tunnel.send(answer(opened.stream_id))
        code, _ = await tunnel.expect_close()
        async with await request as resp:
            assert resp.status == 502
        return code
    finally:
        await tunnel.close()


async def test_fin_on_a_head_is_a_violation_not_silently_ignored(full_stack: Stack) -> None:
    code = await _answer_with(full_stack, lambda stream: frames.encode_json(
        FrameType.HEAD, stream, {"status": 200}, Flags.FIN))
    assert code == int(CloseCode.PROTOCOL_ERROR)


async def test_data_before_head_is_a_violation(full_stack: Stack) -> None:
    code = await _answer_with(full_stack, lambda stream: frames.encode(
        FrameType.DATA, stream, b"body first"))
    assert code == int(CloseCode.PROTOCOL_ERROR)


async def test_running_out_of_stream_ids_drains_the_tunnel_and_the_agent_comes_back(
    full_stack: Stack,
) -> None:
    """Before: past 2^32 ids OPEN raised struct.error and leaked the channel, until the host
    was `overloaded` for good. Now the tunnel drains and the agent reconnects."""
    registry = full_stack.relay.state.registry
    old = registry.get(full_stack.host_id)
    assert old is not None
    old.session.mux.next_stream_id = frames.MAX_STREAM_ID  # one id left: a test cannot open 2^30
    async with full_stack.client.get(full_stack.url("/small?size=10"),
                                     headers=full_stack.auth()) as resp:
        assert resp.status == 200  # the last id
    async with full_stack.client.get(full_stack.url("/small?size=10"),
                                     headers=full_stack.auth()) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "draining"
        assert "Retry-After" in resp.headers
    assert not old.session.channels  # nothing leaked
    await eventually(lambda: (current := registry.get(full_stack.host_id)) is not None
                     and current is not old, timeout=10)
    async with full_stack.client.get(full_stack.url("/small?size=10"),
                                     headers=full_stack.auth()) as resp:
        assert resp.status == 200


async def test_an_agents_120_byte_utf8_refusal_reaches_the_client_as_4410(
    full_stack: Stack,
) -> None:
    """Before: the reason went out over 125 bytes and the client got 1002 instead."""
    tunnel = await RawTunnel.connect(full_stack.client, full_stack.relay, ROGUE_HOST,
                                     full_stack.agent_token(ROGUE_HOST))
    reason = "é" * 60 + "ü" * 10  # 140 bytes of UTF-8: over the bound, cut at a character
    try:
        connecting = asyncio.ensure_future(full_stack.client.ws_connect(
            f"{full_stack.relay.ws_url}/hosts/{ROGUE_HOST}/ws", headers=full_stack.auth()))
        opened = await tunnel.expect(FrameType.OPEN)
        await tunnel.send(frames.encode_json(FrameType.HEAD, opened.stream_id,
                                             {"status": 101, "protocol": None}))
        ws = await connecting
        await tunnel.send(frames.HEADER.pack(FrameType.CLOSE, 0, opened.stream_id)
                          + int(CloseCode.TUNNEL_GONE).to_bytes(2, "big")
                          + reason.encode()[:120])
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == int(CloseCode.TUNNEL_GONE)
        got = str(msg.extra)
        assert len(got.encode()) <= 123 and reason.startswith(got) and got
        await ws.close()
    finally:
        await tunnel.close()


async def test_a_refusal_before_the_head_with_a_long_utf8_reason_is_4410(
    full_stack: Stack,
) -> None:
    """The refusal path adds its own words to the agent's reason: still within 123 bytes."""
    tunnel = await RawTunnel.connect(full_stack.client, full_stack.relay, ROGUE_HOST,
                                     full_stack.agent_token(ROGUE_HOST))
    try:
        connecting = asyncio.ensure_future(full_stack.client.ws_connect(
            f"{full_stack.relay.ws_url}/hosts/{ROGUE_HOST}/ws", headers=full_stack.auth()))
        opened = await tunnel.expect(FrameType.OPEN)
        await tunnel.send(frames.HEADER.pack(FrameType.CLOSE, 0, opened.stream_id)
                          + int(CloseCode.TUNNEL_GONE).to_bytes(2, "big")
                          + ("é" * 60).encode())
        ws = await connecting
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type is aiohttp.WSMsgType.CLOSE, msg
        assert ws.close_code == int(CloseCode.TUNNEL_GONE)
        assert len(str(msg.extra).encode()) <= 123 and "é" in str(msg.extra)
        await ws.close()
    finally:
        await tunnel.close()
