"""The tunnel's WebSocket once the relay took it over from aiohttp (relay.tunnel.tunnel_socket).

A hand-written WebSocket client (tests/rawws.py) plays the agent against a real relay on
loopback, so the framing rules are checked against RFC 6455, not against the relay's parser.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from relay.config import load_config
from relay.protocol import frames
from relay.server.drain import drain
from tests.harness import RunningRelay, eventually, start_relay, write_config
from tests.rawws import BINARY, CLOSE, CONTINUATION, GUID, PING, PONG, RawWebSocket
from tests.test_protocol_conformance import relay_with

HOST = "acme:lean"
HEADER = struct.Struct("!BBI")  # docs/protocol.md section 2
T_HELLO, T_PING, T_PONG = 1, 7, 8


def tunnel_frame(ftype: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(ftype, 0, 0) + payload


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[RunningRelay]:
    async with relay_with(tmp_path) as running:
        yield running


async def connect(relay: RunningRelay) -> RawWebSocket:
    ws = await RawWebSocket.connect(relay.config.server.port, f"/tunnel?hostId={HOST}&v=1",
                                    {"Authorization": f"Bearer {relay.agent_token(HOST)}"})
    hello = await ws.receive()
    assert hello.opcode == BINARY and hello.data[0] == T_HELLO
    await eventually(lambda: relay.state.registry.get(HOST) is not None)
    return ws


async def next_tunnel_frame(ws: RawWebSocket, ftype: int) -> bytes:
    """The payload of the relay's next tunnel frame of ``ftype`` (the relay's PINGs answered)."""
    while True:
        message = await ws.receive()
        assert message.opcode == BINARY, f"expected a binary message, got {message}"
        got, _, _ = HEADER.unpack_from(message.data)
        if got == T_PING and ftype != T_PING:
            await ws.send_binary(tunnel_frame(T_PONG, message.data[HEADER.size:]))
            continue
        if got == ftype:
            return message.data[HEADER.size:]


async def close_code(ws: RawWebSocket) -> int | None:
    """The code of the relay's close frame, skipping what comes before it."""
    message = await ws.wait_closed(within=5)
    assert message is not None, "the connection ended without a close frame"
    return message.close_code


async def assert_alive(ws: RawWebSocket) -> None:
    probe = os.urandom(8)
    await ws.send_binary(tunnel_frame(T_PING, probe))
    assert await next_tunnel_frame(ws, T_PONG) == probe


def masked_header(opcode: int, size: int, *, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        return struct.pack("!BB", first, 0x80 | size)
    if size < 1 << 16:
        return struct.pack("!BBH", first, 0x80 | 126, size)
    return struct.pack("!BBQ", first, 0x80 | 127, size)


def max_message(relay: RunningRelay) -> int:
    return frames.max_message(relay.config.tunnel.max_frame_bytes) + frames.MESSAGE_SLACK


def aiohttp_request_tasks() -> list[asyncio.Task[object]]:
    """aiohttp's per-connection tasks: its request loop and the handler task it starts."""
    names = ("RequestHandler.start", "RequestHandler._handle_request")
    return [task for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__qualname__", "").endswith(names)]


async def test_aiohttps_server_forgets_the_tunnels_connection(relay: RunningRelay) -> None:
    server = relay.listeners.public.server
    assert server is not None
    ws = await connect(relay)
    # Only the relay holds it now: aiohttp neither lists nor waits for it, and the request
    # that carried the upgrade is over (its handler returned, its loop ended).
    assert server.connections == []
    await eventually(lambda: not aiohttp_request_tasks())
    assert len(relay.state.tunnel_sockets) == 1
    await assert_alive(ws)
    ws.abort()
    await eventually(lambda: relay.state.registry.get(HOST) is None)
    await eventually(lambda: not relay.state.tunnel_sockets)


async def test_a_websocket_ping_is_answered_with_its_payload(relay: RunningRelay) -> None:
    ws = await connect(relay)
    await ws.send_frame(PING, b"are you there")
    while True:
        fin, opcode, payload = await asyncio.wait_for(ws._read_frame(), 5)
        if opcode == PONG:
            break
    assert fin and payload == b"are you there"
    await assert_alive(ws)
    ws.abort()


async def test_fragments_are_joined_into_one_message_around_a_ping(relay: RunningRelay) -> None:
    ws = await connect(relay)
    probe = os.urandom(3000)
    message = tunnel_frame(T_PING, probe)
    await ws.send_raw(ws.encode(BINARY, message[:5], fin=False)
                      + ws.encode(CONTINUATION, message[5:1000], fin=False)
                      + ws.encode(PING, b"between")  # control frames may come between
                      + ws.encode(CONTINUATION, message[1000:]))
    assert await next_tunnel_frame(ws, T_PONG) == probe
    ws.abort()


async def test_frames_split_across_reads_and_sent_with_the_upgrade_arrive(
    relay: RunningRelay,
) -> None:
    port = relay.config.server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    probe = os.urandom(200_000)  # several reads on the relay's side
    head = (f"GET /tunnel?hostId={HOST}&v=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {relay.agent_token(HOST)}\r\n\r\n").encode()
    # A tunnel PING right behind the upgrade request, before the 101 was read.
    writer.write(head + RawWebSocket.encode(BINARY, tunnel_frame(T_PING, b"early")))
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
    assert answer.startswith(b"HTTP/1.1 101 ")
    assert f"Sec-WebSocket-Accept: {accept}\r\n".encode() in answer
    assert b"sec-websocket-extensions" not in answer.lower()  # no compression, as before
    ws = RawWebSocket(reader, writer)
    assert (await ws.receive()).data[0] == T_HELLO
    assert await next_tunnel_frame(ws, T_PONG) == b"early"
    encoded = ws.encode(BINARY, tunnel_frame(T_PING, probe[:60_000]))
    for start in range(0, len(encoded), 7_000):  # a frame in many small writes
        await ws.send_raw(encoded[start:start + 7_000])
    assert await next_tunnel_frame(ws, T_PONG) == probe[:60_000]
    ws.abort()


def disconnects(relay: RunningRelay, reason: str) -> float:
    value = relay.state.metrics.registry.get_sample_value(
        "relay_tunnel_disconnects_total", {"reason": reason})
    return value or 0.0


async def test_an_unmasked_client_frame_is_1002(relay: RunningRelay) -> None:
    ws = await connect(relay)
    payload = tunnel_frame(T_PING, b"x")
    with capture_logs() as logs:
        await ws.send_raw(struct.pack("!BB", 0x80 | BINARY, len(payload)) + payload)
        assert await close_code(ws) == 1002
        await eventually(lambda: relay.state.registry.get(HOST) is None)
        await eventually(lambda: disconnects(relay, "protocol_violation") == 1)
    # Counted and logged as the agent's violation, naming the rule, not as a failed connection.
    assert disconnects(relay, "error") == 0
    violations = [(e["log_level"], e["error"]) for e in logs
                  if e["event"] == "tunnel.protocol_violation"]
    assert violations == [("warning", "client frame not masked")]
    assert [e["reason"] for e in logs if e["event"] == "tunnel.disconnected"] == [
        "protocol_violation"]


async def test_a_tunnel_reset_by_the_agent_is_counted_as_an_error(relay: RunningRelay) -> None:
    ws = await connect(relay)
    sock = ws.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with capture_logs() as logs:
        ws.abort()  # with a zero linger: a reset, not a FIN
        await eventually(lambda: relay.state.registry.get(HOST) is None)
        await eventually(lambda: disconnects(relay, "error") == 1)
    assert disconnects(relay, "agent_closed") == 0
    assert [e["reason"] for e in logs if e["event"] == "tunnel.disconnected"] == ["error"]


async def test_a_tunnel_the_agent_hangs_up_is_agent_closed(relay: RunningRelay) -> None:
    ws = await connect(relay)
    ws.abort()  # a FIN without a CLOSE frame: the agent went away, nothing failed
    await eventually(lambda: relay.state.registry.get(HOST) is None)
    await eventually(lambda: disconnects(relay, "agent_closed") == 1)
    assert disconnects(relay, "error") == 0


@pytest.mark.parametrize("case", ["reserved bit", "unknown opcode", "continuation of nothing",
                                  "message inside a message", "fragmented ping",
                                  "ping over 125 bytes", "one-byte close"])
async def test_bad_framing_is_1002(relay: RunningRelay, case: str) -> None:
    ws = await connect(relay)
    data = {
        "reserved bit": bytes((0xC2,)) + ws.encode(BINARY, b"x")[1:],
        "unknown opcode": ws.encode(0x3, b"x"),
        "continuation of nothing": ws.encode(CONTINUATION, b"x"),
        "message inside a message": ws.encode(BINARY, b"x", fin=False) + ws.encode(BINARY, b"y"),
        "fragmented ping": ws.encode(PING, b"x", fin=False),
        "ping over 125 bytes": ws.encode(PING, b"p" * 126),
        "one-byte close": ws.encode(CLOSE, b"\x03"),
    }[case]
    await ws.send_raw(data)
    assert await close_code(ws) == 1002
    await eventually(lambda: relay.state.registry.get(HOST) is None)
    await eventually(lambda: disconnects(relay, "protocol_violation") == 1)


async def test_a_message_of_the_size_limit_is_1009_from_its_header(relay: RunningRelay) -> None:
    ws = await connect(relay)
    # Only the header: the relay refuses before buffering any of the payload.
    await ws.send_raw(masked_header(BINARY, max_message(relay)) + b"\0\0\0\0")
    assert await close_code(ws) == 1009
    await eventually(lambda: relay.state.registry.get(HOST) is None)
    await eventually(lambda: disconnects(relay, "protocol_violation") == 1)


async def test_fragments_adding_up_to_the_size_limit_are_1009(relay: RunningRelay) -> None:
    ws = await connect(relay)
    half = max_message(relay) // 2
    await ws.send_raw(ws.encode(BINARY, b"\0" * half, fin=False))
    await ws.send_raw(masked_header(CONTINUATION, max_message(relay) - half) + b"\0\0\0\0")
    assert await close_code(ws) == 1009


async def test_a_message_just_under_the_limit_reaches_the_tunnel_codec(relay: RunningRelay) -> None:
    ws = await connect(relay)
    # Over the tunnel's frame bound, so the codec (not the WebSocket layer) refuses it: 1002.
    await ws.send_binary(tunnel_frame(T_PING, b"\0" * (max_message(relay) - 1 - HEADER.size)))
    assert await close_code(ws) == 1002


async def test_the_agents_close_is_answered_and_the_tunnel_ends(relay: RunningRelay) -> None:
    ws = await connect(relay)
    await ws.send_close(1000, b"bye")
    message = await ws.receive()
    assert message.opcode == CLOSE and message.close_code == 1000
    assert await asyncio.wait_for(ws.reader.read(), 5) == b""  # then the relay hangs up
    await eventually(lambda: relay.state.registry.get(HOST) is None)
    await eventually(lambda: not relay.state.tunnel_sockets)


async def test_a_stopping_relay_closes_its_tunnels_1001_within_its_bound(tmp_path: Path) -> None:
    relay = await start_relay(load_config(write_config(tmp_path), env={}))
    agents = []
    try:
        agents = [await connect(relay)]
        # Not relay.stop(), which drops every connection first: the relay's own shutdown.
        started = time.monotonic()
        stopping = asyncio.ensure_future(relay.listeners.cleanup())
        assert await close_code(agents[0]) == 1001
        await asyncio.wait_for(stopping, 10)
        assert time.monotonic() - started < 5
        assert not relay.state.tunnel_sockets
    finally:
        for ws in agents:
            ws.abort()
        with contextlib.suppress(Exception):
            await relay.stop()


async def test_a_draining_relay_closes_its_tunnels_4503(relay: RunningRelay) -> None:
    ws = await connect(relay)
    draining = asyncio.ensure_future(drain(relay.state, 0.5))
    message = await ws.wait_closed(within=5)
    assert message is not None and message.close_code == 4503
    await asyncio.wait_for(draining, 10)
    await eventually(lambda: not relay.state.tunnel_sockets)


async def test_an_agent_that_never_answers_our_close_is_dropped_in_time(
    relay: RunningRelay,
) -> None:
    # The close timeout lowered from its 2 s: the relay must hang up once it has passed.
    relay.state.close_timeout_s = 0.2
    ws = await connect(relay)
    tunnel = relay.state.registry.get(HOST)
    assert tunnel is not None
    started = time.monotonic()
    tunnel.close(4000, "test")
    # Read everything, answer nothing: the relay must hang up after its close timeout.
    while await asyncio.wait_for(ws.reader.read(65536), 10):
        pass
    waited = time.monotonic() - started
    assert 0.2 <= waited < 2.0, waited
    await eventually(lambda: not relay.state.tunnel_sockets)


class _Owner:
    def received(self, data: bytes) -> None:
        pass

    def received_text(self) -> None:
        pass

    def refused(self, message: str) -> None:
        pass

    def ended(self, error: bool) -> None:
        pass


async def test_a_drain_given_up_before_the_connection_is_lost_logs_nothing() -> None:
    """A peer that stops reading pauses our writes; a drainer that gave up on it (the session's
    write-stall bound) must not leave asyncio an exception 'never retrieved' when the
    connection is then lost."""
    import gc

    from relay.tunnel.tunnel_socket import TunnelSocket

    loop = asyncio.get_running_loop()
    problems: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: problems.append(context))
    # Small kernel buffers both ways and a peer that never reads: the writes stay paused.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    try:
        client.connect(listener.getsockname())
        peer, _ = listener.accept()
        client.setblocking(False)
        # As relay.tunnel.dial hands a connection over once its upgrade is done.
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=client)
        sock = TunnelSocket(transport, _Owner(), max_message=1 << 20, client=True)
        transport.set_protocol(sock)
        assert not sock.write([b"x" * 262144])
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sock.drain(), 0.2)  # gave up: the waiter stays unawaited
        transport.abort()
        await eventually(lambda: sock.transport.is_closing())
        await asyncio.sleep(0.01)  # connection_lost runs in a later iteration
        with pytest.raises(ConnectionResetError):
            await sock.drain()
        gc.collect()
        await asyncio.sleep(0)
        assert not [p for p in problems if "never retrieved" in str(p.get("message"))]
        peer.close()
    finally:
        loop.set_exception_handler(None)
        listener.close()
        client.close()
