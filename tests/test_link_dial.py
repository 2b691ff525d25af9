"""The entry relay's end of a peer link: the hand-made upgrade (relay.tunnel.dial) and the
client side of the lean WebSocket (relay.tunnel.tunnel_socket, ``client=True``).

The peer is a scripted server on loopback written here frame by frame, so masking, framing
and closing are checked against RFC 6455, not against the relay's own parser.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from relay.tunnel.dial import HandshakeRefused, check_response, dial, upgrade_request
from relay.tunnel.tunnel_socket import BINARY, CLOSE, PING, PONG, TEXT, TunnelSocket, accept_key
from tests.harness import eventually
from tests.rawws import GUID

MAX_MESSAGE = 1 << 20


# -- the pure parts -------------------------------------------------------------------------

def test_the_upgrade_request_asks_for_a_websocket_and_carries_the_headers() -> None:
    from yarl import URL

    request = upgrade_request(URL("ws://10.0.0.1:8080/peer-link"), "a2V5a2V5a2V5a2V5a2V5aw==",
                              {"X-Relay-Signature": "abc"})
    head, _, rest = request.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert rest == b""
    assert lines[0] == "GET /peer-link HTTP/1.1"
    assert {"Host: 10.0.0.1:8080", "Upgrade: websocket", "Connection: Upgrade",
            "Sec-WebSocket-Key: a2V5a2V5a2V5a2V5a2V5aw==", "Sec-WebSocket-Version: 13",
            "X-Relay-Signature: abc"} <= set(lines[1:])
    # The default port is left out of Host, an IPv6 literal is bracketed.
    assert b"Host: relay.example\r\n" in upgrade_request(
        URL("wss://relay.example:443/peer-link"), "k", {})
    assert b"Host: [::1]:9000\r\n" in upgrade_request(URL("ws://[::1]:9000/x"), "k", {})
    with pytest.raises(ValueError):
        upgrade_request(URL("ws://h/x"), "k", {"X-Bad": "one\r\nInjected: yes"})


def _answer(key: str, *extra: str, status: str = "101 Switching Protocols",
            accept: str | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Accept: {accept if accept is not None else accept_key(key)}",
             *extra]
    return "\r\n".join(lines).encode()


def test_only_a_101_with_our_accept_key_and_nothing_unasked_is_an_upgrade() -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    check_response(_answer(key), key)
    check_response(_answer(key).replace(b"Upgrade: websocket", b"upgrade: WebSocket")
                   .replace(b"Connection: Upgrade", b"connection: keep-alive, upgrade"), key)
    refusals = {
        _answer(key, status="404 Not Found"): 404,
        _answer(key, status="401 Unauthorized"): 401,
        _answer(key, accept="d3Jvbmc="): 101,
        _answer(key).replace(b"Upgrade: websocket", b"Upgrade: h2c"): 101,
        _answer(key).replace(b"Connection: Upgrade", b"Connection: close"): 101,
        _answer(key, "Sec-WebSocket-Extensions: permessage-deflate"): 101,
        _answer(key, "Sec-WebSocket-Protocol: chat"): 101,
        _answer(key, "no colon here"): 101,
        b"SSH-2.0-OpenSSH_9.2": 0,
    }
    for head, status in refusals.items():
        with pytest.raises(HandshakeRefused) as refused:
            check_response(head, key)
        assert refused.value.status == status, head



def test_offered_subprotocols_are_asked_for_and_only_one_of_them_is_accepted() -> None:
    from yarl import URL

    request = upgrade_request(URL("ws://127.0.0.1:3000/ws"), "k", [("X-A", "1"), ("X-A", "2")],
                              ("chat", "superchat"))
    lines = request.decode().split("\r\n")
    assert "Sec-WebSocket-Protocol: chat, superchat" in lines
    assert lines.index("X-A: 1") < lines.index("X-A: 2")  # a repeated name kept, in order
    assert b"Sec-WebSocket-Protocol" not in upgrade_request(URL("ws://h/x"), "k", {})
    key = base64.b64encode(os.urandom(16)).decode()
    offered = ("chat", "superchat")
    assert check_response(_answer(key), key, offered) is None
    assert check_response(_answer(key, "Sec-WebSocket-Protocol: superchat"), key,
                          offered) == "superchat"
    for answer in ("Sec-WebSocket-Protocol: evil", "Sec-WebSocket-Protocol: chat, superchat",
                   "Sec-WebSocket-Protocol: Chat", "Sec-WebSocket-Extensions: x-y"):
        with pytest.raises(HandshakeRefused) as refused:
            check_response(_answer(key, answer), key, offered)
        assert refused.value.status == 101, answer

# -- a scripted server ----------------------------------------------------------------------

@dataclass
class Recorder:
    """A SocketOwner that writes down what the socket reports."""

    messages: list[bytes] = field(default_factory=list)
    texts: int = 0
    refusals: list[str] = field(default_factory=list)
    ended_with: list[bool] = field(default_factory=list)

    def received(self, data: bytes) -> None:
        self.messages.append(data)

    def received_text(self) -> None:
        self.texts += 1

    def refused(self, message: str) -> None:
        self.refusals.append(message)

    def ended(self, error: bool) -> None:
        self.ended_with.append(error)


def server_frame(opcode: int, payload: bytes = b"", *, fin: bool = True,
                 mask: bytes | None = None) -> bytes:
    """A frame as a server writes it (unmasked), or masked with ``mask`` (which it must not)."""
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if mask is not None else 0
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", first, bit | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, bit | 126, size)
    else:
        header = struct.pack("!BBQ", first, bit | 127, size)
    if mask is None:
        return header + payload
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@dataclass
class ClientFrame:
    fin: bool
    opcode: int
    masked: bool
    key: bytes
    payload: bytes  # unmasked


async def read_client_frame(reader: asyncio.StreamReader) -> ClientFrame:
    first, second = await asyncio.wait_for(reader.readexactly(2), 5)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", await reader.readexactly(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", await reader.readexactly(8))[0]
    masked = bool(second & 0x80)
    key = await reader.readexactly(4) if masked else b""
    data = await asyncio.wait_for(reader.readexactly(size), 5)
    if masked:
        data = bytes(b ^ key[i % 4] for i, b in enumerate(data))
    return ClientFrame(bool(first & 0x80), first & 0x0F, masked, key, data)


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted(script: Script, *, answer: Callable[[str], bytes] | None = None,
                   ) -> AsyncIterator[tuple[str, list[BaseException]]]:
    """A server on loopback: it reads the upgrade, answers it (a 101 by default), then runs
    ``script``. Yields the ws:// URL and the script's failures (the test re-raises them)."""
    failures: list[BaseException] = []
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:")).decode()
            if answer is not None:
                writer.write(answer(key))
            else:
                accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                             + accept.encode() + b"\r\n\r\n")
            await script(reader, writer)
        except BaseException as exc:  # reported to the test
            failures.append(exc)
        finally:
            writer.transport.abort()
            done.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}/peer-link", failures
        await asyncio.wait_for(done.wait(), 5)
    finally:
        server.close()
        await server.wait_closed()


async def dialled(url: str, owner: Recorder) -> TunnelSocket:
    started: list[TunnelSocket] = []
    socket = await asyncio.wait_for(dial(url, {"X-Test": "1"}, owner, max_message=MAX_MESSAGE,
                                         start=started.append), 5)
    assert started == [socket]
    return socket


async def test_client_frames_are_masked_with_fresh_keys_and_server_frames_arrive_whole() -> None:
    owner = Recorder()
    seen: list[ClientFrame] = []
    replies = [b"", b"x" * 125, os.urandom(126), os.urandom(70_000)]

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(3):
            seen.append(await read_client_frame(reader))
        # Everything at once (one segment holds several frames and a piece of the next),
        # then a message in fragments, a PING in between, and a CLOSE.
        writer.write(b"".join(server_frame(BINARY, r) for r in replies))
        writer.write(server_frame(BINARY, b"frag-", fin=False)
                     + server_frame(PING, b"are you there")
                     + server_frame(0, b"mented"))
        seen.append(await read_client_frame(reader))  # the PONG
        writer.write(server_frame(CLOSE, struct.pack("!H", 4000) + b"bye"))
        seen.append(await read_client_frame(reader))  # the answer to our CLOSE
        await writer.drain()

    async with scripted(script) as (url, failures):
        socket = await dialled(url, owner)
        payloads = [b"one", os.urandom(200), os.urandom(66_000)]
        assert socket.write(payloads[:2]) is True
        assert socket.write(payloads[2:]) is True
        await eventually(lambda: owner.ended_with == [False])
    for failure in failures:
        raise failure
    data_frames, pong, close = seen[:3], seen[3], seen[4]
    assert [(f.fin, f.opcode, f.payload) for f in data_frames] == [
        (True, BINARY, p) for p in payloads]
    assert all(f.masked for f in seen)
    assert len({f.key for f in seen}) == len(seen)  # a new key for every frame
    assert (pong.opcode, pong.payload) == (PONG, b"are you there")
    assert close.opcode == CLOSE and struct.unpack("!H", close.payload[:2])[0] == 1000
    assert owner.messages == [*replies, b"frag-mented"]
    assert socket.close_code == 4000 and socket.closed


@pytest.mark.parametrize(("garbage", "why"), [
    (server_frame(BINARY, b"masked!", mask=b"\x01\x02\x03\x04"), "a masked server frame"),
    (bytes((0x80 | 0x40 | BINARY, 3)) + b"abc", "a reserved bit"),
    (bytes((0x80 | 0x3, 0)), "an unknown opcode"),
    (server_frame(PING, b"p" * 126), "a control frame over 125 bytes"),
    (server_frame(0, b"continuation of nothing"), "a continuation with no message"),
    (b"\x82\x7f" + struct.pack("!Q", MAX_MESSAGE), "a message over the limit"),
    (server_frame(CLOSE, struct.pack("!H", 1005)), "a close code that must not be sent"),
])
async def test_a_peer_that_sends_garbage_is_refused_1002_or_1009_and_hung_up(
    garbage: bytes, why: str,
) -> None:
    owner = Recorder()
    closes: list[ClientFrame] = []
    hung_up = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(server_frame(BINARY, b"fine") + garbage + server_frame(BINARY, b"after"))
        closes.append(await read_client_frame(reader))
        assert await asyncio.wait_for(reader.read(), 5) == b""  # then the client hangs up
        hung_up.set()

    async with scripted(script) as (url, failures):
        await dialled(url, owner)
        await asyncio.wait_for(hung_up.wait(), 5)
        await eventually(lambda: owner.ended_with == [False])
    for failure in failures:
        raise failure
    assert len(owner.refusals) == 1, why  # the rule it broke, for the log
    expected = 1009 if "limit" in why else 1002
    assert closes[0].opcode == CLOSE and closes[0].masked, why
    assert struct.unpack("!H", closes[0].payload[:2])[0] == expected, why
    assert owner.messages == [b"fine"], why  # nothing after the garbage is read


async def test_a_text_message_is_reported_to_the_owner() -> None:
    owner = Recorder()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(server_frame(TEXT, b"not binary"))
        await writer.drain()
        await asyncio.wait_for(reader.read(), 5)

    async with scripted(script) as (url, failures):
        socket = await dialled(url, owner)
        await eventually(lambda: owner.texts == 1)
        socket.abort()
        await eventually(lambda: owner.ended_with == [False])
    for failure in failures:
        raise failure
    assert owner.messages == []


async def test_a_peer_that_closes_mid_frame_ends_the_socket_and_delivers_no_part() -> None:
    owner = Recorder()
    whole = server_frame(BINARY, os.urandom(5000))

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(server_frame(BINARY, b"complete") + whole[:1234])
        await writer.drain()

    async with scripted(script) as (url, failures):
        socket = await dialled(url, owner)
        await eventually(lambda: owner.ended_with == [False])
    for failure in failures:
        raise failure
    assert owner.messages == [b"complete"]
    assert socket.closed and socket.close_code is None  # no CLOSE came: the connection ended
    with pytest.raises(ConnectionResetError):
        socket.write([b"too late"])


async def test_frames_in_the_same_segment_as_the_101_are_not_lost() -> None:
    owner = Recorder()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.wait_for(reader.read(), 5)

    def answer(key: str) -> bytes:
        return (_answer(key) + b"\r\n\r\n" + server_frame(BINARY, b"early")
                + server_frame(BINARY, b"bird"))

    async with scripted(script, answer=answer) as (url, failures):
        socket = await dialled(url, owner)
        # The owner was set up (start) before the tail was parsed.
        assert owner.messages == [b"early", b"bird"]
        socket.abort()
    for failure in failures:
        raise failure


async def test_a_refused_or_broken_upgrade_raises_and_leaves_nothing_open() -> None:
    async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.wait_for(reader.read(), 5)  # until the client hangs up

    cases: list[tuple[Callable[[str], bytes], type[Exception], int | None]] = [
        (lambda key: b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", HandshakeRefused,
         404),
        (lambda key: _answer(key, accept="d3Jvbmc=") + b"\r\n\r\n", HandshakeRefused, 101),
        (lambda key: b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 20_000, HandshakeRefused, 0),
        (lambda key: b"HTTP/1.1 101 Switching", ConnectionResetError, None),
    ]
    for answer, error, status in cases:
        owner = Recorder()

        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await writer.drain()

        script = hang_up if error is ConnectionResetError else idle
        async with scripted(script, answer=answer) as (url, failures):
            with pytest.raises(error) as raised:
                await dialled(url, owner)
        for failure in failures:
            raise failure
        if status is not None:
            assert isinstance(raised.value, HandshakeRefused) and raised.value.status == status
        assert owner.ended_with == [] and owner.messages == []


async def test_a_dial_given_up_during_the_upgrade_hangs_up() -> None:
    hung_up = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await asyncio.wait_for(reader.read(), 5) == b""
        hung_up.set()

    async with scripted(script, answer=lambda key: b"HTTP/1.1 101 Swi") as (url, failures):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(dial(url, {}, Recorder(), max_message=MAX_MESSAGE,
                                        start=lambda socket: None), 0.3)
        await asyncio.wait_for(hung_up.wait(), 5)
    for failure in failures:
        raise failure


def test_the_dial_and_the_socket_work_on_uvloop_as_the_relay_runs() -> None:
    """`relay serve` runs on uvloop, whose transports are no asyncio.Transport subclasses."""
    import uvloop

    async def round_trip() -> tuple[list[bytes], ClientFrame]:
        owner = Recorder()
        frames: list[ClientFrame] = []

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            frames.append(await read_client_frame(reader))
            writer.write(server_frame(BINARY, b"back"))
            await asyncio.wait_for(reader.read(), 5)

        async with scripted(script) as (url, failures):
            socket = await dialled(url, owner)
            socket.write([b"out"])
            await eventually(lambda: owner.messages == [b"back"])
            socket.abort()
        for failure in failures:
            raise failure
        return owner.messages, frames[0]

    messages, frame = uvloop.run(asyncio.wait_for(round_trip(), 10))
    assert messages == [b"back"]
    assert frame.masked and frame.payload == b"out"
