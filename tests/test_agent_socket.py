"""The agent's tunnel on its own client socket (relay.tunnel.dial + TunnelSocket, fed from its
callbacks): what a relay may and may not send it, how the connection's end reads, and how a
failed upgrade is logged.

The relay here is a script on a raw asyncio server, so it can send what no real relay would: a
text message, a masked frame, reserved bits, a message over the limit, a broken 101. What the
agent writes back is read and unmasked by hand.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

import relay.agent.client as agent_client
from relay.agent.backoff import Backoff
from relay.agent.client import MAX_MESSAGE
from relay.connect_errors import connect_error_cause, connect_error_name
from relay.protocol import frames
from relay.protocol.frames import FrameType
from relay.tunnel.dial import HandshakeRefused
from tests.harness import LogCapture, RunningAgent, eventually, start_agent

HOST = "acme:laptop"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE = 0x1, 0x2, 0x8


def accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def switching(key: str, *, accept_key: str | None = None, upgrade: str = "websocket") -> bytes:
    return (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: {upgrade}\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key or accept(key)}\r\n\r\n").encode()


def server_frame(payload: bytes, opcode: int = BINARY, *, first: int | None = None,
                 masked: bool = False) -> bytes:
    """One frame as a server writes it (unmasked), or as one must not (``masked``)."""
    size = len(payload)
    mask_bit = 0x80 if masked else 0
    byte0 = 0x80 | opcode if first is None else first
    head = (struct.pack("!BB", byte0, size | mask_bit) if size < 126
            else struct.pack("!BBH", byte0, 126 | mask_bit, size))
    if not masked:
        return head + payload
    key = b"\x01\x02\x03\x04"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def hello_frame(version: int = 2) -> bytes:
    return server_frame(frames.encode_json(FrameType.HELLO, 0, {
        "version": version, "hostId": HOST, "pingIntervalS": 5, "keepaliveMisses": 2,
        "window": 262144, "maxFrame": 65536, "maxStreams": 256}))


def close_frame(code: int | None, reason: bytes = b"") -> bytes:
    return server_frame(b"" if code is None else struct.pack("!H", code) + reason, CLOSE)


@dataclass
class Received:
    """What the agent wrote after the upgrade: whole messages, each checked to be masked."""

    messages: list[tuple[int, bytes]] = field(default_factory=list)
    buffer: bytearray = field(default_factory=bytearray)
    eof: bool = False

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 2:
            byte0, byte1 = self.buffer[0], self.buffer[1]
            assert byte1 & 0x80, "a client frame must be masked"
            size, at = byte1 & 0x7F, 2
            if size == 126:
                size, at = struct.unpack_from("!H", self.buffer, 2)[0], 4
            elif size == 127:
                size, at = struct.unpack_from("!Q", self.buffer, 2)[0], 10
            if len(self.buffer) < at + 4 + size:
                return
            key = self.buffer[at:at + 4]
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(self.buffer[at + 4:at + 4 + size]))
            del self.buffer[:at + 4 + size]
            self.messages.append((byte0 & 0x0F, payload))

    @property
    def close_codes(self) -> list[int]:
        return [struct.unpack("!H", payload[:2])[0] for opcode, payload in self.messages
                if opcode == CLOSE and len(payload) >= 2]


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, str], Awaitable[None]]


@dataclass
class ScriptedRelay:
    script: Script
    port: int = 0
    connections: int = 0
    received: list[Received] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        received = Received()
        self.received.append(received)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            key = next(line.split(":", 1)[1].strip() for line in head.decode().split("\r\n")
                       if line.lower().startswith("sec-websocket-key:"))
            await self.script(reader, writer, key)
            while data := await asyncio.wait_for(reader.read(65536), 5):
                received.feed(data)
            received.eof = True
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[ScriptedRelay]:
    relay = ScriptedRelay(script)
    server = await asyncio.start_server(relay.serve, "127.0.0.1", 0)
    relay.port = server.sockets[0].getsockname()[1]
    try:
        yield relay
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


@contextlib.asynccontextmanager
async def agent_on(relay: ScriptedRelay) -> AsyncIterator[RunningAgent]:
    agent = await start_agent(relay.url, HOST, "http://127.0.0.1:9", token="t", wait=False,
                              backoff=Backoff(base=30, cap=30))  # one attempt per test
    try:
        yield agent
    finally:
        await agent.stop()


def events(logs: LogCapture, name: str) -> list[dict[str, Any]]:
    return [e for e in logs.events if e.get("event") == name]


async def ended(agent: RunningAgent) -> None:
    await eventually(lambda: agent.agent.last_outcome is not None, timeout=8)


# -- what the relay may not send ---------------------------------------------------------------

@pytest.mark.parametrize("after_hello", [True, False], ids=["after-hello", "before-hello"])
@pytest.mark.parametrize(("sent", "error", "code"), [
    (server_frame(b"hi", TEXT), "text message on the tunnel", 1002),
    (server_frame(frames.encode(FrameType.PING, 0, b"12345678"), masked=True),
     "server frame masked", 1002),
    (server_frame(b"xx", first=0xC2), "reserved bits set", 1002),
    (struct.pack("!BBQ", 0x82, 127, MAX_MESSAGE + 1), "WebSocket message too big", 1009),
    (server_frame(b"\x7f\x00\x00\x00\x00\x00"), "unknown frame type 0x7f", 1002),
], ids=["text", "masked", "reserved-bits", "too-big", "bad-tunnel-frame"])
async def test_what_the_relay_may_not_send_is_a_protocol_violation_closed_with_its_code(
    after_hello: bool, sent: bytes, error: str, code: int
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     key: str) -> None:
        writer.write(switching(key) + (hello_frame() if after_hello else b""))
        await asyncio.sleep(0)
        writer.write(sent)

    with LogCapture() as logs:
        async with scripted(script) as relay, agent_on(relay) as agent:
            await ended(agent)
            await eventually(lambda: relay.received[0].eof)
    assert [e["error"] for e in events(logs, "agent.protocol_violation")] == [error]
    assert relay.received[0].close_codes == [code]
    outcome = agent.agent.last_outcome
    assert outcome is not None and outcome.hello is after_hello
    # The relay never answered the CLOSE: a refused frame is the code the agent sent, a frame
    # the session refused waits for an answer that does not come (1006).
    assert outcome.code == (1006 if code == 1002 and error in (
        "text message on the tunnel", "unknown frame type 0x7f") else code)
    assert events(logs, "agent.disconnected")[0]["code"] == outcome.code


async def test_a_message_at_the_limit_is_taken_whole() -> None:
    """One byte short of the refusal above: the socket takes it and the session judges it (a
    PING of 16 MiB is the session's violation, 1002, not the socket's 1009)."""
    ping = frames.encode(FrameType.PING, 0)
    message = ping + bytes(MAX_MESSAGE - len(ping))

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     key: str) -> None:
        writer.write(switching(key) + hello_frame())
        writer.write(struct.pack("!BBQ", 0x82, 127, len(message)) + message)

    with LogCapture() as logs:
        async with scripted(script) as relay, agent_on(relay) as agent:
            await ended(agent)
    (violation,) = events(logs, "agent.protocol_violation")
    assert violation["error"] != "WebSocket message too big"
    assert relay.received[0].close_codes == [1002]


# -- how the connection ends -------------------------------------------------------------------

@pytest.mark.parametrize(("end", "code", "reason"), [
    (close_frame(4403, "no access to org \u00b4x\u00b4\x01".encode()), 4403,
     "no access to org ?x??"),
    (close_frame(4401, b"x" * 123), 4401, "x" * 123),  # the longest a CLOSE carries
    (close_frame(None), 1006, ""),
    (b"", 1006, ""),  # the connection closed without a CLOSE
], ids=["4403-printable", "longest-reason", "close-without-code", "no-close"])
async def test_the_relays_close_code_and_reason_are_the_outcome(
    end: bytes, code: int, reason: str
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     key: str) -> None:
        # The HELLO in the 101's own segment: taken before the dial even returned.
        writer.write(switching(key) + hello_frame())
        await asyncio.sleep(0.05)
        if end:
            writer.write(end)
        else:
            writer.close()

    with LogCapture() as logs:
        async with scripted(script) as relay, agent_on(relay) as agent:
            await ended(agent)
    outcome = agent.agent.last_outcome
    assert outcome is not None and outcome.hello
    assert (outcome.code, outcome.close_reason) == (code, reason)
    (disconnected,) = events(logs, "agent.disconnected")
    assert (disconnected["code"], disconnected["close_reason"]) == (code, reason)
    if end:  # the relay's CLOSE is answered (1000), as aiohttp's autoclose did
        assert relay.received[0].close_codes == [1000]


async def test_a_stopping_agent_closes_with_1001_and_waits_for_the_answer_boundedly() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     key: str) -> None:
        writer.write(switching(key) + hello_frame())

    async with scripted(silent) as relay:
        agent = await start_agent(relay.url, HOST, "http://127.0.0.1:9", token="t")
        await agent.wait_connected()
        agent.stop_event.set()
        await asyncio.wait_for(agent.task, 4)  # 2 s for the answer that never comes
        await eventually(lambda: relay.received[0].eof)
    assert relay.received[0].close_codes == [1001]
    assert agent.agent.last_outcome is not None
    assert agent.agent.last_outcome.reason == "stopped"


async def test_a_hello_with_a_version_not_offered_is_refused_with_1002() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     key: str) -> None:
        writer.write(switching(key) + hello_frame(version=7))
        # The agent's CLOSE is answered: the agent leaves without waiting out its bound.
        while not relay.received[0].close_codes:
            relay.received[0].feed(await asyncio.wait_for(reader.read(65536), 5))
        writer.write(close_frame(1002))

    with LogCapture() as logs:
        async with scripted(script) as relay, agent_on(relay) as agent:
            await ended(agent)
    assert relay.received[0].close_codes == [1002]
    assert agent.agent.last_outcome is not None
    assert agent.agent.last_outcome.reason == "protocol_violation"
    assert "not offered" in events(logs, "agent.protocol_violation")[0]["error"]


# -- a failed upgrade, in the log's words ------------------------------------------------------

@pytest.mark.parametrize(("answer", "error", "cause"), [
    (lambda key: b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n",
     "WSServerHandshakeError",
     "the server answered HTTP 401 to the WebSocket upgrade (Invalid response status)"),
    (lambda key: switching(key, accept_key="d3Jvbmc="), "WSServerHandshakeError",
     "the server answered HTTP 101 to the WebSocket upgrade (Invalid challenge response)"),
    (lambda key: switching(key, upgrade="h2c"), "WSServerHandshakeError",
     "the server answered HTTP 101 to the WebSocket upgrade (Invalid upgrade header)"),
    (lambda key: b"SSH-2.0-OpenSSH\r\n\r\n", "ClientResponseError",
     "the server's answer to the WebSocket upgrade is not HTTP "
     "(not an HTTP response: 'SSH-2.0-OpenSSH')"),
    (lambda key: b"", "ServerDisconnectedError", "Server disconnected"),
], ids=["401", "wrong-accept", "wrong-upgrade", "not-http", "hung-up"])
async def test_a_failed_upgrade_names_its_cause(
    answer: Callable[[str], bytes], error: str, cause: str
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     key: str) -> None:
        writer.write(answer(key))
        await writer.drain()
        writer.close()

    with LogCapture() as logs:
        async with scripted(script) as relay, agent_on(relay) as agent:
            await ended(agent)
    (failed,) = events(logs, "agent.connect_failed")
    assert (failed["error"], failed["cause"]) == (error, cause)
    assert failed["address"] == f"127.0.0.1:{relay.port}"
    assert agent.agent.last_outcome is not None
    assert agent.agent.last_outcome.reason == "connect_failed"


async def test_an_upgrade_never_answered_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_client, "CONNECT_TIMEOUT_S", 0.2)

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   key: str) -> None:
        await reader.read()  # until the agent gives up and hangs up

    with LogCapture() as logs:
        async with scripted(mute) as relay, agent_on(relay) as agent:
            await ended(agent)
            await eventually(lambda: relay.received[0].eof or relay.connections == 1)
    (failed,) = events(logs, "agent.connect_failed")
    assert (failed["error"], failed["cause"]) == ("TimeoutError", "timed out")


def test_failure_names_and_causes_read_as_they_did_under_aiohttp() -> None:
    """The log's vocabulary for what the dial raises (relay.connect_errors)."""
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9)")
    assert (connect_error_name(refused), connect_error_cause(refused)) == (
        "ClientConnectorError", "connection refused")
    unknown = socket.gaierror(-2, "Name or service not known")
    assert (connect_error_name(unknown), connect_error_cause(unknown)) == (
        "ClientConnectorDNSError", "name or service not known")
    assert connect_error_name(ssl.SSLError(1, "wrong version number")) == (
        "ClientConnectorSSLError")
    rejected = ssl.SSLCertVerificationError(1, "certificate verify failed")
    assert connect_error_name(rejected) == "ClientConnectorCertificateError"
    assert connect_error_cause(rejected).startswith("TLS certificate rejected: ")
    lost = ConnectionResetError("the peer closed the connection during the upgrade")
    assert (connect_error_name(lost), connect_error_cause(lost)) == (
        "ServerDisconnectedError", "Server disconnected")
    reset = ConnectionResetError(104, "Connection reset by peer")  # while connecting
    assert (connect_error_name(reset), connect_error_cause(reset)) == (
        "ClientConnectorError", "connection reset by peer")
    assert connect_error_name(HandshakeRefused(404, "Not Found")) == "WSServerHandshakeError"
    assert connect_error_cause(HandshakeRefused(101, "no 'Connection: upgrade'")).endswith(
        "(Invalid connection header)")
    assert connect_error_cause(HandshakeRefused(101, "something new")).endswith(
        "(something new)")
    assert (connect_error_name(TimeoutError()), connect_error_cause(TimeoutError())) == (
        "TimeoutError", "timed out")


def test_the_agents_tunnel_works_on_uvloop_as_relay_agent_runs() -> None:
    """`relay agent` runs on uvloop: a masked frame is refused there too, and the reconnect
    that follows is served."""
    import uvloop

    async def scenario() -> tuple[list[str], list[int], bool]:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         key: str) -> None:
            writer.write(switching(key) + hello_frame())
            if relay.connections == 1:
                writer.write(server_frame(b"x" * 10, masked=True))

        with LogCapture() as logs:
            async with scripted(script) as relay:
                agent = await start_agent(relay.url, HOST, "http://127.0.0.1:9", token="t",
                                          wait=False, backoff=Backoff(base=0.01, cap=0.02))
                try:
                    await eventually(lambda: agent.agent.connects >= 2)
                finally:
                    await agent.stop()
        errors = [e["error"] for e in events(logs, "agent.protocol_violation")]
        return errors, relay.received[0].close_codes, agent.agent.connects >= 2

    assert uvloop.run(asyncio.wait_for(scenario(), 20)) == (["server frame masked"], [1002],
                                                            True)
