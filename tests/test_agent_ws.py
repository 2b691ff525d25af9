"""The agent's end of a WebSocket channel: the host service's socket, upgraded by hand
(relay.tunnel.dial.upgrade) and served on a client-mode ChannelSocket that the channel's bridge
(relay.tunnel.ws_channel, the relay's own for the client's socket) drives.

The host service is a server written here frame by frame on loopback, so what the agent offers,
masks, refuses and closes is checked against RFC 6455, not against the agent's own parser; the
client is tests/rawws.py through a real relay.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import relay.tunnel.ws_channel as ws_channel
from relay.config import load_config
from relay.errors import CloseCode
from relay.protocol.frames import WS_FRAME_COST
from relay.tunnel.channel_socket import ChannelSocket
from relay.tunnel.tunnel_socket import BINARY, CLOSE, PING, PONG, TEXT
from tests.harness import (
    LogCapture,
    RunningAgent,
    RunningRelay,
    eventually,
    start_agent,
    start_relay,
    write_config,
)
from tests.rawws import GUID, Message, RawWebSocket
from tests.test_link_dial import ClientFrame, read_client_frame, server_frame

HOST_ID = "acme:laptop"


@dataclass
class HostConnection:
    """One connection the agent opened to the host service, and its upgrade request."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    request: list[str]  # the request line, then each header line as sent

    def header(self, name: str) -> list[str]:
        prefix = name.lower() + ":"
        return [line.split(":", 1)[1].strip() for line in self.request[1:]
                if line.lower().startswith(prefix)]

    def switching_protocols(self, *extra: str) -> bytes:
        (key,) = self.header("Sec-WebSocket-Key")
        accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
        lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Accept: {accept}", *extra]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def accept(self, *extra: str, then: bytes = b"") -> None:
        self.writer.write(self.switching_protocols(*extra) + then)

    async def frame(self) -> ClientFrame:
        return await read_client_frame(self.reader)

    async def data_frame(self) -> ClientFrame:
        """The next frame that is not a PING/PONG."""
        while True:
            frame = await self.frame()
            if frame.opcode not in (PING, PONG):
                return frame

    async def eof(self, within: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.reader.read(), within)


Script = Callable[[HostConnection], Awaitable[None]]


@dataclass
class Host:
    """A host service that hands every connection to the test (a queue), upgrade unanswered."""

    connections: asyncio.Queue[HostConnection] = field(default_factory=asyncio.Queue)
    port: int = 0

    async def next(self, within: float = 5.0) -> HostConnection:
        return await asyncio.wait_for(self.connections.get(), within)


@dataclass
class Setup:
    relay: RunningRelay
    host: Host
    agent: RunningAgent

    async def client(self, path: str = "/ws", **headers: str) -> RawWebSocket:
        return await RawWebSocket.connect(
            self.relay.config.server.port, f"/hosts/{HOST_ID}{path}",
            {"Authorization": f"Bearer {self.relay.token()}", **headers})

    async def opened(self, path: str = "/ws", *extra: str,
                     **headers: str) -> tuple[RawWebSocket, HostConnection]:
        """A client's channel the host accepted (with ``extra`` lines in its 101)."""
        opening = asyncio.ensure_future(self.client(path, **headers))
        try:
            conn = await self.host.next()
            conn.accept(*extra)
            return await asyncio.wait_for(opening, 5), conn
        except BaseException:
            opening.cancel()
            raise

    def host_socket(self) -> ChannelSocket:
        """The agent's socket to the host on its one open channel."""
        session = self.agent.agent.session
        assert session is not None
        sockets = [s for s in ws_sockets() if s.owner.channel.session is session]
        assert len(sockets) == 1, sockets
        return sockets[0]


_LIVE: set[ChannelSocket] = set()


def ws_sockets() -> set[ChannelSocket]:
    return {s for s in _LIVE if not s.closed}


@pytest.fixture(autouse=True)
def track_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every client-mode ChannelSocket made (the agent's sockets to the host), for the tests
    to look at: nothing in the agent lists them."""
    _LIVE.clear()
    init = ChannelSocket.__init__

    def tracked(self: ChannelSocket, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if kwargs.get("client"):
            _LIVE.add(self)

    monkeypatch.setattr(ChannelSocket, "__init__", tracked)


@contextlib.asynccontextmanager
async def setup(tmp_path: Path, sections: dict[str, dict[str, Any]] | None = None,
                **agent_options: Any) -> AsyncIterator[Setup]:
    host = Host()
    live: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        live.add(writer)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("utf-8", "surrogateescape").split("\r\n")[:-2]
        await host.connections.put(HostConnection(reader, writer, lines))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    host.port = server.sockets[0].getsockname()[1]
    relay = await start_relay(load_config(write_config(tmp_path, sections), env={}))
    try:
        agent = await start_agent(relay.ws_url, HOST_ID, f"http://127.0.0.1:{host.port}",
                                  token=relay.agent_token(), **agent_options)
        try:
            yield Setup(relay, host, agent)
        finally:
            await agent.stop()
    finally:
        await relay.stop()
        for writer in live:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


async def refusal(ws: RawWebSocket) -> Message:
    """The relay accepts a refused channel and closes it: its CLOSE."""
    message = await ws.receive()
    assert message.opcode == CLOSE
    return message


def upstream_failures(logs: LogCapture) -> list[dict[str, Any]]:
    return [e for e in logs.events if e.get("event") == "agent.upstream_ws_failed"]


# -- the upgrade ---------------------------------------------------------------------------------

async def test_the_upgrade_offers_the_clients_subprotocols_and_forwards_its_headers(
    tmp_path: Path,
) -> None:
    async with setup(tmp_path) as s:
        ws, conn = await s.opened("/ws/x%20y?a=1", "Sec-WebSocket-Protocol: superchat",
                                  **{"Sec-WebSocket-Protocol": "chat, superchat",
                                     "X-Custom": "one", "Sec-WebSocket-Extensions":
                                     "permessage-deflate"})
        assert conn.request[0] == "GET /ws/x%20y?a=1 HTTP/1.1"
        assert conn.header("Host") == [f"127.0.0.1:{s.host.port}"]
        assert conn.header("Sec-WebSocket-Protocol") == ["chat, superchat"]
        assert conn.header("X-Custom") == ["one"]
        assert conn.header("Sec-WebSocket-Version") == ["13"]
        assert [v.lower() for v in conn.header("Upgrade")] == ["websocket"]
        # No extension is offered (the client's is its own hop's), no credential is passed on.
        assert conn.header("Sec-WebSocket-Extensions") == []
        assert conn.header("Authorization") == []
        # The subprotocol the host chose is the client's.
        await ws.send_text("hi")
        frame = await conn.data_frame()
        assert (frame.opcode, frame.payload) == (TEXT, b"hi")
        ws.abort()


@pytest.mark.parametrize("answer", [
    "Sec-WebSocket-Protocol: evil",            # never offered
    "Sec-WebSocket-Protocol: chat, superchat",  # not one choice
    "Sec-WebSocket-Extensions: permessage-deflate",  # none was offered
])
async def test_a_101_that_accepts_what_was_not_offered_is_a_refusal(
    tmp_path: Path, answer: str,
) -> None:
    async with setup(tmp_path) as s:
        with LogCapture() as logs:
            offer = {"Sec-WebSocket-Protocol": "chat, superchat"}
            opening = asyncio.ensure_future(s.client(**offer))
            conn = await s.host.next()
            conn.accept(answer, then=server_frame(TEXT, b"never delivered"))
            ws = await asyncio.wait_for(opening, 5)
            close = await refusal(ws)
            assert close.close_code == CloseCode.INTERNAL_ERROR
            assert close.close_reason == b"the host refused the WebSocket with HTTP 502"
            assert await conn.eof() == b""  # the agent hung up on the host
        (failed,) = upstream_failures(logs)
        assert failed["error"] == "HandshakeRefused" and failed["status"] == 101


@pytest.mark.parametrize(("answer", "status"), [
    (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", 403),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200),
    (b"HTTP/1.1 100 Continue\r\n\r\n", 502),
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", 502),
])
async def test_a_refused_upgrade_is_the_hosts_status(
    tmp_path: Path, answer: bytes, status: int,
) -> None:
    async with setup(tmp_path) as s:
        opening = asyncio.ensure_future(s.client())
        conn = await s.host.next()
        conn.writer.write(answer)
        close = await refusal(await asyncio.wait_for(opening, 5))
        assert close.close_code == CloseCode.INTERNAL_ERROR
        assert close.close_reason == f"the host refused the WebSocket with HTTP {status}".encode()
        assert await conn.eof() == b""


async def test_a_host_that_hangs_up_during_the_upgrade_is_502_and_logged(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        with LogCapture() as logs:
            opening = asyncio.ensure_future(s.client())
            conn = await s.host.next()
            conn.writer.transport.abort()
            close = await refusal(await asyncio.wait_for(opening, 5))
        assert close.close_reason == b"the host refused the WebSocket with HTTP 502"
        (failed,) = upstream_failures(logs)
        assert failed["error"] == "ConnectionResetError" and failed["path"] == "/ws"


# -- frames ----------------------------------------------------------------------------------------

async def test_the_agents_frames_to_the_host_are_masked_with_fresh_keys(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        ws, conn = await s.opened()
        sent = [(TEXT, "ünï".encode()), (BINARY, b"\x00\xff" * 70), (BINARY, b"z" * 70_000),
                (BINARY, b"")]
        for opcode, payload in sent:
            await ws.send_frame(opcode, payload)
        frames = [await conn.data_frame() for _ in sent]
        assert [(f.opcode, f.payload) for f in frames] == sent
        assert all(f.fin and f.masked for f in frames)
        assert len({f.key for f in frames}) == len(frames)
        ws.abort()


async def test_frames_in_the_101s_segment_arrive_and_pings_are_answered_masked(
    tmp_path: Path,
) -> None:
    async with setup(tmp_path) as s:
        opening = asyncio.ensure_future(s.client())
        conn = await s.host.next()
        # The 101, a fragmented text message with a PING between its fragments, and a binary
        # one: all in one write, before the agent has even told the relay it accepted.
        conn.accept(then=server_frame(TEXT, b"one ", fin=False) + server_frame(PING, b"probe")
                    + server_frame(0x0, b"two") + server_frame(BINARY, b"\x01\x02"))
        ws = await asyncio.wait_for(opening, 5)
        assert await ws.receive() == Message(TEXT, b"one two")
        assert await ws.receive() == Message(BINARY, b"\x01\x02")
        pong = await conn.frame()
        assert (pong.opcode, pong.payload, pong.masked) == (PONG, b"probe", True)
        ws.abort()


async def test_a_masked_frame_from_the_host_is_closed_1002(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        ws, conn = await s.opened()
        conn.writer.write(server_frame(TEXT, b"masked", mask=b"\x01\x02\x03\x04"))
        close = await conn.frame()
        assert close.opcode == CLOSE and close.masked
        assert struct.unpack("!H", close.payload[:2])[0] == CloseCode.PROTOCOL_ERROR
        assert await conn.eof() == b""  # refused framing: no wait for an answer
        message = await ws.receive()
        assert message.opcode == CLOSE and message.close_code == CloseCode.PROTOCOL_ERROR


async def test_a_host_message_over_the_limit_is_refused_from_its_header_with_1009(
    tmp_path: Path,
) -> None:
    limit = 512 * 1024
    async with setup(tmp_path, max_ws_message=limit) as s:
        ws, conn = await s.opened()
        # A 1 MiB message: its header and a first slice only. The agent must not wait for
        # (or buffer) the rest to refuse it.
        conn.writer.write(struct.pack("!BBQ", 0x80 | BINARY, 127, 1 << 20) + b"y" * 4096)
        close = await conn.frame()
        assert close.opcode == CLOSE and close.masked
        assert struct.unpack("!H", close.payload[:2])[0] == CloseCode.MESSAGE_TOO_BIG
        assert close.payload[2:] == f"message too big: the limit is {limit} bytes".encode()
        assert await conn.eof() == b""
        message = await ws.receive()
        assert message.opcode == CLOSE and message.close_code == CloseCode.MESSAGE_TOO_BIG


async def test_a_host_message_at_the_limit_passes(tmp_path: Path) -> None:
    limit = 70_000
    async with setup(tmp_path, max_ws_message=limit) as s:
        ws, conn = await s.opened()
        conn.writer.write(server_frame(BINARY, b"a" * 40_000, fin=False)
                          + server_frame(0x0, b"b" * 30_000))
        assert await ws.receive(within=10) == Message(BINARY, b"a" * 40_000 + b"b" * 30_000)
        ws.abort()


# -- closing ---------------------------------------------------------------------------------------

async def test_close_codes_and_reasons_cross_both_ways(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        # The host closes: its code and reason reach the client, the agent answers 1000.
        ws, conn = await s.opened()
        conn.writer.write(server_frame(CLOSE, struct.pack("!H", 4321) + "bye ✓".encode()))
        message = await ws.receive()
        assert (message.close_code, message.close_reason) == (4321, "bye ✓".encode())
        answer = await conn.frame()
        assert (answer.opcode, answer.payload, answer.masked) == (CLOSE, b"\x03\xe8", True)
        assert await conn.eof() == b""
        ws.abort()
        # The client closes: the agent closes the host with the client's code and reason and
        # hangs up once the host answers.
        ws, conn = await s.opened()
        await ws.send_close(4000, b"done")
        close = await conn.data_frame()
        assert (close.opcode, close.payload) == (CLOSE, struct.pack("!H", 4000) + b"done")
        conn.writer.write(server_frame(CLOSE, struct.pack("!H", 4000)))
        assert await conn.eof() == b""
        ws.abort()


async def test_a_host_that_never_answers_the_close_is_hung_up_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ws_channel, "CLOSE_TIMEOUT_S", 0.3)
    async with setup(tmp_path) as s:
        ws, conn = await s.opened()
        await ws.send_close(1000)
        close = await conn.data_frame()
        assert close.opcode == CLOSE
        conn.writer.write(server_frame(TEXT, b"ignored"))  # anything but the answer
        assert await conn.eof(within=3) == b""
        ws.abort()


async def test_a_host_gone_without_a_close_gives_the_client_1011(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        ws, conn = await s.opened()
        conn.writer.transport.abort()
        message = await ws.receive()
        assert message.opcode == CLOSE and message.close_code == CloseCode.INTERNAL_ERROR


async def test_the_tunnel_lost_closes_the_host_1001(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        ws, conn = await s.opened()
        for tunnel in list(s.relay.state.tunnel_sockets):
            tunnel.abort()  # the relay side of the tunnel drops: the agent loses it
        close = await conn.data_frame()
        assert (close.opcode, close.payload) == (CLOSE, struct.pack("!H", 1001) + b"tunnel lost")
        conn.writer.write(server_frame(CLOSE, struct.pack("!H", 1001)))
        assert await conn.eof() == b""
        ws.abort()


async def test_a_stopping_agent_leaves_no_socket_to_the_host(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        ws, conn = await s.opened()
        await s.agent.stop()
        # The host is told (1001) or simply hung up on: either way nothing stays open.
        rest = await conn.eof()
        assert rest == b"" or rest[0] == 0x80 | CLOSE
        assert not ws_sockets()
        ws.abort()


# -- flow control ----------------------------------------------------------------------------------

def set_buffer(sock: socket.socket | None, option: int, size: int) -> None:
    assert sock is not None
    sock.setsockopt(socket.SOL_SOCKET, option, size)


async def test_a_host_that_does_not_read_holds_the_clients_messages_in_credit(
    tmp_path: Path,
) -> None:
    """The host reads nothing: the agent's socket to it fills and pauses, the agent returns no
    more credit, so what waits in the agent stays within the channel's window (and the relay
    stops reading the client); nothing is lost or reordered once the host reads."""
    async with setup(tmp_path, {"tunnel": {"stream_window_bytes": 65536}}) as s:
        ws, conn = await s.opened()
        host_side = s.host_socket()
        set_buffer(host_side.transport.get_extra_info("socket"), socket.SO_SNDBUF, 4096)
        size, count = 8 * 1024, 512  # 4 MiB: far more than the socket buffers and a window
        payloads = [n.to_bytes(4, "big") * (size // 4) for n in range(count)]
        sending = asyncio.ensure_future(ws.send_raw(b"".join(
            RawWebSocket.encode(BINARY, p) for p in payloads)))
        try:
            await eventually(lambda: host_side._paused, timeout=10)
            channel = host_side.owner.channel
            await eventually(lambda: channel.buffered_bytes > 0)
            assert channel.buffered_bytes <= 65536
            assert not sending.done()
            # Room again, so the rest crosses at loopback speed.
            set_buffer(host_side.transport.get_extra_info("socket"), socket.SO_SNDBUF, 1 << 20)
            for n in range(count):
                frame = await conn.data_frame()
                assert frame.payload == payloads[n], n
            await asyncio.wait_for(sending, 10)
        finally:
            sending.cancel()
            ws.abort()


async def test_a_channel_out_of_credit_stops_reading_the_hosts_socket(tmp_path: Path) -> None:
    """The client reads nothing: the relay stops returning credit, and the agent stops reading
    the host (its socket is held) instead of queueing the host's messages."""
    window = 65536
    async with setup(tmp_path, {"tunnel": {"stream_window_bytes": window}}) as s:
        ws, conn = await s.opened()
        (client_side,) = s.relay.state.ws_bridges
        assert client_side.socket is not None
        relay_socket = client_side.socket.transport.get_extra_info("socket")
        set_buffer(relay_socket, socket.SO_SNDBUF, 4096)
        host_side = s.host_socket()
        size, count = 16 * 1024, 256  # 4 MiB
        payloads = [n.to_bytes(4, "big") * (size // 4) for n in range(count)]
        conn.writer.write(b"".join(server_frame(BINARY, p) for p in payloads))
        channel = host_side.owner.channel
        # Held for want of credit (a full tunnel queue holds it too, for a moment).
        await eventually(lambda: host_side._held
                         and channel.send_window.credit < size + WS_FRAME_COST, timeout=10)
        assert len(host_side._buffer or b"") <= 256 * 1024 + size  # at most one read waits
        set_buffer(relay_socket, socket.SO_SNDBUF, 1 << 20)
        for n in range(count):
            assert (await ws.receive(within=10)).data == payloads[n], n
        await eventually(lambda: not host_side._held)
        ws.abort()
