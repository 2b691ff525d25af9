"""A small WebSocket client written by hand over asyncio streams (RFC 6455, client side).

Tests use it to play a peer that owes nothing to aiohttp or to the relay's own code: the
handshake, masking, opcodes, fragmentation and close frames are all spelled out here, so what
the relay does is checked against the protocol, not against itself. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import struct
from dataclasses import dataclass

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


@dataclass(frozen=True, slots=True)
class Message:
    """One whole message (fragments joined), or a close frame (``opcode == CLOSE``)."""

    opcode: int
    data: bytes

    @property
    def close_code(self) -> int | None:
        return struct.unpack("!H", self.data[:2])[0] if len(self.data) >= 2 else None

    @property
    def close_reason(self) -> bytes:
        return self.data[2:]


class HandshakeFailed(Exception):
    def __init__(self, status: int, head: bytes) -> None:
        super().__init__(f"upgrade refused: {head[:200]!r}")
        self.status = status


class RawWebSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.closed_by_peer: Message | None = None

    @classmethod
    async def connect(cls, port: int, target: str, headers: dict[str, str] | None = None,
                      *, host: str = "127.0.0.1", timeout: float = 5.0) -> RawWebSocket:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        except BaseException:
            writer.transport.abort()
            raise
        status = int(head.split(b" ", 2)[1])
        accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest())
        if status != 101 or b"sec-websocket-accept: " + accept.lower() not in head.lower():
            writer.transport.abort()
            raise HandshakeFailed(status, head)
        return cls(reader, writer)

    # -- sending: client frames are always masked ------------------------------------------
    @staticmethod
    def encode(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
        """One masked client frame."""
        first = (0x80 if fin else 0) | opcode
        size = len(payload)
        if size < 126:
            header = struct.pack("!BB", first, 0x80 | size)
        elif size < 1 << 16:
            header = struct.pack("!BBH", first, 0x80 | 126, size)
        else:
            header = struct.pack("!BBQ", first, 0x80 | 127, size)
        mask = os.urandom(4)
        # XOR with the repeated mask, as one big integer operation (fast enough for MiBs).
        repeated = (mask * (size // 4 + 1))[:size]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
            size, "big") if size else b""
        return header + mask + masked

    async def send_raw(self, data: bytes) -> None:
        """Bytes as they are: several encoded frames in one write reach the peer together."""
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), 5)

    async def send_frame(self, opcode: int, payload: bytes = b"", *, fin: bool = True) -> None:
        await self.send_raw(self.encode(opcode, payload, fin=fin))

    async def send_binary(self, payload: bytes) -> None:
        await self.send_frame(BINARY, payload)

    async def send_text(self, text: str) -> None:
        await self.send_frame(TEXT, text.encode())

    async def send_close(self, code: int, reason: bytes = b"") -> None:
        await self.send_frame(CLOSE, struct.pack("!H", code) + reason)

    # -- receiving -------------------------------------------------------------------------
    async def _read_frame(self) -> tuple[bool, int, bytes]:
        first, second = await self.reader.readexactly(2)
        if second & 0x80:
            raise AssertionError("a server must not mask its frames")
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
        payload = await self.reader.readexactly(size) if size else b""
        return bool(first & 0x80), first & 0x0F, payload

    async def receive(self, within: float = 5.0) -> Message:
        """The next data message or close frame; pings are answered on the way."""
        async with asyncio.timeout(within):
            parts: list[bytes] = []
            opcode = None
            while True:
                fin, op, payload = await self._read_frame()
                if op == PING:
                    await self.send_frame(PONG, payload)
                    continue
                if op == PONG:
                    continue
                if op == CLOSE:
                    message = Message(CLOSE, payload)
                    self.closed_by_peer = message
                    return message
                if op != CONTINUATION:
                    opcode = op
                parts.append(payload)
                if fin:
                    assert opcode is not None, "a continuation without a first fragment"
                    return Message(opcode, b"".join(parts))

    async def wait_closed(self, within: float = 5.0) -> Message | None:
        """Read until the peer's close frame (answered) or the end of the connection."""
        try:
            async with asyncio.timeout(within):
                while True:
                    message = await self.receive(within)
                    if message.opcode == CLOSE:
                        with contextlib.suppress(ConnectionError, TimeoutError):
                            await self.send_frame(CLOSE, message.data[:2])
                        return message
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def abort(self) -> None:
        self.writer.transport.abort()
