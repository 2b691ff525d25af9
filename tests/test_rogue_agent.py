"""A hand-driven agent that breaks the tunnel protocol: the relay closes it with 1002, alone.

:class:`RawTunnel` speaks the tunnel protocol frame by frame with ``relay.protocol.frames``, so
tests can play an agent that misbehaves on purpose (here) or simply one whose every move the
test controls (tunnel lifecycle and WebSocket proxy tests import it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from relay.errors import CloseCode
from relay.protocol import frames
from relay.protocol.frames import Flags, Frame, FrameType
from tests.harness import RunningRelay, Stack, eventually


class RawTunnel:
    """One tunnel WebSocket driven by hand: the test decides every frame the 'agent' sends."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, host_id: str) -> None:
        self.ws = ws
        self.host_id = host_id
        self.hello: dict[str, Any] = {}
        self._heartbeat: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls, client: aiohttp.ClientSession, relay: RunningRelay, host_id: str,
        token: str | None = None, *, query: str | None = None, wait_hello: bool = True,
        heartbeat_s: float | None = 0.25,
    ) -> RawTunnel:
        """Open ``/tunnel`` for ``host_id``; with ``wait_hello``, read the relay's HELLO.

        With ``heartbeat_s`` the tunnel sends a PING that often without reading anything, so
        it stays alive while the test is busy elsewhere; ``None`` makes it silent.
        """
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        url = f"{relay.ws_url}/tunnel?" + (query if query is not None else f"hostId={host_id}&v=1")
        ws = await client.ws_connect(url, headers=headers, autoping=True, heartbeat=None)
        tunnel = cls(ws, host_id)
        if wait_hello:
            hello = await tunnel.expect(FrameType.HELLO)
            tunnel.hello = frames.decode_json(hello)
        if heartbeat_s is not None:
            tunnel._heartbeat = asyncio.ensure_future(tunnel._beat(heartbeat_s))
            tunnel._heartbeat.set_name(f"raw-tunnel-heartbeat:{host_id}")
        return tunnel

    async def _beat(self, interval: float) -> None:
        with contextlib.suppress(Exception):
            while not self.ws.closed:
                await self.send(frames.encode_ping(FrameType.PING, b"rawtunnl"))
                await asyncio.sleep(interval)

    async def stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(BaseException):
                await self._heartbeat
            self._heartbeat = None

    async def send(self, frame: bytes) -> None:
        await self.ws.send_bytes(frame)

    async def recv(self, within: float = 5.0, *, answer_pings: bool = True) -> Frame:
        """The next frame that is not liveness (PINGs are answered unless told not to)."""
        async with asyncio.timeout(within):
            while True:
                msg = await self.ws.receive()
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    raise AssertionError(f"expected a frame, got {msg.type.name} {msg.data!r}")
                frame = frames.decode(msg.data, 1 << 24)
                if frame.type is FrameType.PING:
                    if answer_pings:
                        await self.send(frames.encode_ping(FrameType.PONG, frame.payload))
                    continue
                if frame.type is FrameType.PONG:
                    continue
                return frame

    async def expect(self, ftype: FrameType, within: float = 5.0) -> Frame:
        frame = await self.recv(within)
        assert frame.type is ftype, f"expected {ftype.name}, got {frame.type.name}"
        return frame

    async def expect_close(self, within: float = 5.0) -> tuple[int | None, str]:
        """Read until the relay closes the tunnel; its close code and reason."""
        async with asyncio.timeout(within):
            while True:
                msg = await self.ws.receive()
                if msg.type is aiohttp.WSMsgType.CLOSE:
                    return int(msg.data), str(msg.extra or "")
                if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return self.ws.close_code, ""

    async def serve_http(self, body: bytes, status: int = 200) -> dict[str, Any]:
        """Answer the next HTTP OPEN with a fixed response; return the OPEN's head."""
        opened = await self.expect(FrameType.OPEN)
        head = frames.decode_json(opened)
        await self.send(frames.encode_json(FrameType.HEAD, opened.stream_id, {
            "status": status, "headers": [["Content-Type", "text/plain"]],
        }))
        await self.send(frames.encode(FrameType.DATA, opened.stream_id, body, Flags.FIN))
        return head

    def abort(self) -> None:
        """Vanish without a close handshake, like a host whose network died."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        conn = getattr(self.ws, "_conn", None)
        transport = getattr(conn, "transport", None)
        assert transport is not None
        transport.abort()

    async def close(self) -> None:
        await self.stop_heartbeat()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 2)


ROGUE_HOST = "acme:rogue"

Garbage = Callable[[RawTunnel, Stack], Awaitable[None]]


async def _text_frame(tunnel: RawTunnel, _: Stack) -> None:
    await tunnel.ws.send_str("hello, I am not a frame")


async def _unknown_frame_type(tunnel: RawTunnel, _: Stack) -> None:
    await tunnel.send(frames.HEADER.pack(0x7F, 0, 1) + b"?")


async def _short_frame(tunnel: RawTunnel, _: Stack) -> None:
    await tunnel.send(b"\x04\x00\x00")


async def _unknown_flags(tunnel: RawTunnel, _: Stack) -> None:
    await tunnel.send(frames.HEADER.pack(FrameType.PONG, 0x80, 0))


async def _ping_on_a_stream(tunnel: RawTunnel, _: Stack) -> None:
    await tunnel.send(frames.encode(FrameType.PING, 3, b"12345678"))


async def _data_on_stream_zero(tunnel: RawTunnel, _: Stack) -> None:
    await tunnel.send(frames.encode(FrameType.DATA, 0, b"x"))


async def _hello_to_the_relay(tunnel: RawTunnel, _: Stack) -> None:
    await tunnel.send(frames.encode_json(FrameType.HELLO, 0, {"version": 1}))


async def _open_to_the_relay(tunnel: RawTunnel, _: Stack) -> None:
    await tunnel.send(frames.encode_json(FrameType.OPEN, 2, {"kind": "http", "path": "/"}))


async def _drain_to_the_relay(tunnel: RawTunnel, _: Stack) -> None:
    await tunnel.send(frames.encode_json(FrameType.DRAIN, 0, {}))


async def _head_for_a_stream_never_offered(tunnel: RawTunnel, _: Stack) -> None:
    await tunnel.send(frames.encode_json(FrameType.HEAD, 7, {"status": 200}))


async def _head_on_an_even_stream(tunnel: RawTunnel, _: Stack) -> None:
    await tunnel.send(frames.encode_json(FrameType.HEAD, 2, {"status": 200}))


async def _data_for_a_stream_never_offered(tunnel: RawTunnel, _: Stack) -> None:
    await tunnel.send(frames.encode(FrameType.DATA, 9, b"unsolicited"))


async def _zero_window_increment(tunnel: RawTunnel, _: Stack) -> None:
    await tunnel.send(frames.encode_window(1, 0))


async def _close_without_a_code(tunnel: RawTunnel, _: Stack) -> None:
    await tunnel.send(frames.encode(FrameType.CLOSE, 1, b"\x03"))


async def _request_then(
    stack: Stack, then: Callable[[Frame], Awaitable[None]], tunnel: RawTunnel,
) -> None:
    """Make a client request to the rogue host, and misbehave once its OPEN arrives."""

    async def client_request() -> None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with stack.client.get(
                f"{stack.relay.url}/hosts/{ROGUE_HOST}/x", headers=stack.auth(),
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp:
                await resp.read()

    request = asyncio.ensure_future(client_request())
    try:
        opened = await tunnel.expect(FrameType.OPEN)
        await then(opened)
        await tunnel.expect_close()
    finally:
        request.cancel()
        with contextlib.suppress(BaseException):
            await request


async def _data_beyond_credit(tunnel: RawTunnel, stack: Stack) -> None:
    async def flood(opened: Frame) -> None:
        # No HEAD yet, so the relay consumes nothing: the fifth full frame exceeds the window.
        chunk = b"z" * stack.relay.state.settings.max_frame
        for _ in range(stack.relay.state.settings.window // len(chunk) + 1):
            await tunnel.send(frames.encode(FrameType.DATA, opened.stream_id, chunk))

    await _request_then(stack, flood, tunnel)


async def _second_head(tunnel: RawTunnel, stack: Stack) -> None:
    async def twice(opened: Frame) -> None:
        for _ in range(2):
            await tunnel.send(frames.encode_json(FrameType.HEAD, opened.stream_id,
                                                 {"status": 200, "headers": []}))

    await _request_then(stack, twice, tunnel)


async def _head_that_is_not_json(tunnel: RawTunnel, stack: Stack) -> None:
    async def broken(opened: Frame) -> None:
        await tunnel.send(frames.encode(FrameType.HEAD, opened.stream_id, b"{not json"))

    await _request_then(stack, broken, tunnel)


GARBAGE: dict[str, Garbage] = {
    "text_frame": _text_frame,
    "unknown_frame_type": _unknown_frame_type,
    "frame_shorter_than_header": _short_frame,
    "unknown_flags": _unknown_flags,
    "ping_on_a_stream": _ping_on_a_stream,
    "data_on_stream_zero": _data_on_stream_zero,
    "hello_to_the_relay": _hello_to_the_relay,
    "open_to_the_relay": _open_to_the_relay,
    "drain_to_the_relay": _drain_to_the_relay,
    "head_for_a_stream_never_offered": _head_for_a_stream_never_offered,
    "head_on_an_even_stream": _head_on_an_even_stream,
    "data_for_a_stream_never_offered": _data_for_a_stream_never_offered,
    "zero_window_increment": _zero_window_increment,
    "close_without_a_code": _close_without_a_code,
    "data_beyond_credit": _data_beyond_credit,
    "second_head": _second_head,
    "head_that_is_not_json": _head_that_is_not_json,
}


@pytest.mark.parametrize("garbage", list(GARBAGE))
async def test_rogue_agent_is_closed_with_1002_and_others_keep_working(
    full_stack: Stack, garbage: str
) -> None:
    state = full_stack.relay.state
    rogue = await RawTunnel.connect(full_stack.client, full_stack.relay, ROGUE_HOST,
                                    full_stack.agent_token(ROGUE_HOST))
    try:
        assert state.registry.get(ROGUE_HOST) is not None
        await GARBAGE[garbage](rogue, full_stack)
        code, _ = await rogue.expect_close()
        assert code == CloseCode.PROTOCOL_ERROR
        await eventually(lambda: state.registry.get(ROGUE_HOST) is None)
    finally:
        await rogue.close()
    # The well-behaved agent's tunnel is untouched and still serves.
    async with full_stack.client.get(full_stack.url("/"), headers=full_stack.auth()) as resp:
        assert resp.status == 200
        assert await resp.json() == {"hello": "from the host service"}
    violations = state.metrics.registry.get_sample_value(
        "relay_tunnel_disconnects_total", {"reason": "protocol_violation"})
    assert violations == 1


async def test_rogue_agent_request_in_flight_fails_with_502(full_stack: Stack) -> None:
    """A client whose exchange was on the rogue tunnel gets a clean 502, not a hang."""
    rogue = await RawTunnel.connect(full_stack.client, full_stack.relay, ROGUE_HOST,
                                    full_stack.agent_token(ROGUE_HOST))
    try:
        request = asyncio.ensure_future(full_stack.client.get(
            f"{full_stack.relay.url}/hosts/{ROGUE_HOST}/x", headers=full_stack.auth(),
            timeout=aiohttp.ClientTimeout(total=10),
        ))
        await rogue.expect(FrameType.OPEN)
        await rogue.ws.send_str("garbage")
        async with await request as resp:
            assert resp.status == 502
            assert json.loads(await resp.read())["error"]["code"] == "tunnel_closed"
    finally:
        await rogue.close()


async def test_well_behaved_raw_tunnel_is_served(full_stack: Stack) -> None:
    """The control for the garbage above: the same raw client, playing by the rules, works."""
    rogue = await RawTunnel.connect(full_stack.client, full_stack.relay, ROGUE_HOST,
                                    full_stack.agent_token(ROGUE_HOST))
    try:
        request = asyncio.ensure_future(full_stack.client.get(
            f"{full_stack.relay.url}/hosts/{ROGUE_HOST}/hello?x=1", headers=full_stack.auth(),
            timeout=aiohttp.ClientTimeout(total=10),
        ))
        head = await rogue.serve_http(b"served by hand")
        assert head["path"] == "/hello" and head["query"] == "x=1"
        async with await request as resp:
            assert resp.status == 200
            assert await resp.read() == b"served by hand"
        assert full_stack.relay.state.registry.get(ROGUE_HOST) is not None
    finally:
        await rogue.close()
