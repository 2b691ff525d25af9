"""A tunnel's WebSocket on a raw transport: the relay's side of an agent's tunnel once the relay
took it over from aiohttp, the agent's side of it, and either end of a peer link between
relays. It knows neither side (it lives in relay.tunnel): each hands it its transport.

Served by aiohttp, an idle tunnel kept its whole HTTP machinery alive: the request handler and
its parser, the parsed upgrade request, the handler's tasks and the coroutine frames of the
middleware chain, the WebSocketResponse with its reader queue and parser: about half of an idle
tunnel's memory (bench W4). After an *authorized* upgrade :func:`relay.server.tunnels.take_over`
writes the ``101`` itself and moves the transport to a :class:`TunnelSocket`. Frames are parsed
in :meth:`TunnelSocket.data_received` and every binary message goes synchronously to the
socket's owner (the tunnel's session): no reader task, no queue.

What it keeps of aiohttp's server WebSocket (tests/test_tunnel_socket.py pins it):

- a PING is answered with a PONG carrying its payload; a PONG is ignored;
- fragments are joined into one message; a message reaching ``max_message`` bytes is 1009,
  refused from its frame header, before its payload is buffered;
- bad framing is 1002: reserved bits (no extension is negotiated), an unknown opcode, a
  control frame fragmented or over 125 bytes, a continuation with no message begun, a new
  message inside a fragmented one, a malformed close payload, and a client frame that is not
  masked (RFC 6455 5.1: the server must close; aiohttp let those through);
- the peer's CLOSE is answered with 1000 and the connection closed; after our own CLOSE
  nothing but the peer's CLOSE is read, and the caller bounds the wait for it;
- it is the session's :class:`relay.tunnel.sink.FrameSink`: a batch of frames leaves in one
  transport write, unmasked, one FIN binary message per frame; ``pause_writing`` makes
  :meth:`TunnelSocket.write` answer False and the session wait in :meth:`TunnelSocket.drain`
  (so its write-stall verdict, 1008 "not reading", still sees a peer that stops reading).

``client=True`` is the other side of the same socket (the agent's end of its tunnel and the
entry relay's end of a peer link, after :mod:`relay.tunnel.dial` made the upgrade): every frame
it writes is masked with a fresh key (RFC 6455 5.3; :func:`write_masked`), and a *masked*
frame from the server is 1002 (5.1). It replaces aiohttp's client WebSocket, whose reader
parsed into a queue that a task then drained. The peer's close reason is kept
(``close_reason``) for the agent's log, and so is the code of our own CLOSE (``sent_code``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import Sequence
from typing import Protocol

from aiohttp._websocket.helpers import websocket_mask

from relay.errors import CloseCode, PayloadTooLarge, ProtocolViolation
from relay.tunnel.sink import message_header, write_messages, write_parts

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA_OPCODES = frozenset((CONTINUATION, TEXT, BINARY))
_CONTROL_OPCODES = frozenset((CLOSE, PING, PONG))
MAX_CONTROL_PAYLOAD = 125
_LEN64 = struct.Struct("!BBQ")
_CODE = struct.Struct("!H")
_MASK_BIT = 0x80
# Close codes a peer may send (RFC 6455 7.4): the defined ones and the registered/private
# ranges; 1005, 1006 and 1015 must never appear on the wire.
_PEER_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012,
                               1013, 1014))


class _MaskKeys:
    """Masking keys from the OS's random source, read 4 KiB at a time and each used once: RFC
    6455 10.3 asks for keys a page script cannot predict (what masking protects proxies from),
    and a read per write was a system call on every write of the agent's tunnel."""

    __slots__ = ("_at", "_pool")

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def take(self, size: int) -> bytes:
        at = self._at
        end = at + size
        if end > len(self._pool):
            self._pool = os.urandom(max(4096, size))
            at, end = 0, size
        self._at = end
        return self._pool[at:end]


_keys = _MaskKeys()


def write_masked(transport: asyncio.WriteTransport, frames: Sequence[bytes | bytearray],
                 first: int = 0x80 | BINARY) -> None:
    """Each frame as one masked message (a client's side), in one transport write.

    Each payload is copied once, into the bytearray it is masked in (bytes cannot be masked in
    place, and aiohttp's mask works on a whole bytearray only).
    """
    keys = _keys.take(4 * len(frames))
    parts: list[bytes | bytearray] = []
    total = at = 0
    for frame in frames:
        size = len(frame)
        key = keys[at:at + 4]
        at += 4
        masked = bytearray(frame)
        if size:
            websocket_mask(key, masked)
        parts += (message_header(size, _MASK_BIT, first), key, masked)
        total += size
    write_parts(transport, parts, total)


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("latin-1") + WS_GUID).digest()).decode()


def switching_protocols(key: str, protocol: str | None = None) -> bytes:
    """The whole ``101`` answer: no extension (no compression), the subprotocol if one was
    chosen (a tunnel never has one)."""
    chosen = f"Sec-WebSocket-Protocol: {protocol}\r\n" if protocol else ""
    return ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(key)}\r\n{chosen}\r\n").encode("latin-1")


class SocketOwner(Protocol):
    """Who the socket reports to (the tunnel)."""

    def received(self, data: bytes) -> None:
        """One whole binary message."""

    def received_text(self) -> None:
        """A text message (which the tunnel protocol does not allow)."""

    def refused(self, message: str) -> None:
        """Framing the socket refused (``message`` says which rule): it has sent its CLOSE
        (1002, or 1009 for a message over the limit) and hung up; :meth:`ended` follows."""

    def ended(self, error: bool) -> None:
        """Nothing more will be read (called once): the peer's CLOSE, our own CLOSE, the
        connection closed or refused framing (``error`` False), or the connection failed
        under us, e.g. reset by the peer (True)."""


class TunnelSocket(asyncio.Protocol):
    """One tunnel WebSocket on a raw transport: the server's side (a transport taken from
    aiohttp), or with ``client=True`` the client's (a peer link the entry relay dialled)."""

    __slots__ = ("_buffer", "_client", "_close_waiter", "_closing", "_drain_waiter", "_ended",
                 "_fragments", "_fragments_size", "_held", "_lost", "_max_message", "_paused",
                 "_peer_closed", "_sockets", "_stopped", "_text", "close_code",
                 "close_reason", "owner", "sent_code", "transport")

    def __init__(self, transport: asyncio.Transport, owner: SocketOwner, *, max_message: int,
                 sockets: set[TunnelSocket] | None = None, client: bool = False) -> None:
        self.transport = transport
        self.owner = owner
        self._max_message = max_message
        self._sockets = sockets
        self._client = client
        self.close_code: int | None = None  # the code of the peer's CLOSE, once it came
        self.close_reason = b""  # and its reason (raw: whoever shows it decodes and bounds it)
        self.sent_code: int | None = None  # the code of our own CLOSE, once it was sent
        self._buffer: bytearray | None = None  # an incomplete frame (none, mostly)
        self._fragments: list[bytes | bytearray] | None = None  # a message being joined
        self._fragments_size = 0
        self._text = False
        self._closing = False  # our CLOSE was sent: nothing more may be written
        self._peer_closed = False
        self._ended = False  # the owner was told nothing more will be read
        self._stopped = False  # nothing more is parsed: the peer's CLOSE, bad framing, or lost
        self._lost = False
        self._paused = False
        self._held = False  # see hold(): parsing stops at the next frame boundary
        self._drain_waiter: asyncio.Future[None] | None = None
        self._close_waiter: asyncio.Future[bool] | None = None
        if sockets is not None:
            sockets.add(self)

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        buffer = self._buffer
        if buffer is not None:
            buffer += data
            self._parse_buffer(buffer)
            return
        used = self._parse(data)
        if used < len(data) and not self._stopped:
            self._buffer = bytearray(memoryview(data)[used:])

    def _parse_buffer(self, buffer: bytearray) -> None:
        used = self._parse(buffer)
        if self._buffer is buffer:  # not dropped meanwhile
            del buffer[:used]
            if not buffer:
                self._buffer = None

    def hold(self) -> None:
        """Stop parsing after the frame being handled and stop reading: the owner cannot take
        another message yet. What was read and not parsed waits (at most one read's worth)."""
        if not self._held:
            self._held = True
            if not self._lost:
                self.transport.pause_reading()

    def release(self) -> None:
        """Parse what waited since :meth:`hold`, then read again."""
        if not self._held:
            return
        self._held = False
        if self._stopped:
            return
        buffer = self._buffer
        if buffer is not None:
            self._parse_buffer(buffer)
        if not self._held and not self._stopped:
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost follows

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = self._stopped = True
        self._buffer = self._fragments = None
        if self._sockets is not None:
            self._sockets.discard(self)
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("the tunnel's connection is gone"))
            # Drainers wait through a shield: one that gave up (its write-stall bound) leaves
            # the waiter unawaited, and asyncio would log its exception as never retrieved. A
            # drainer still waiting raises it all the same.
            waiter.exception()
        self._wake_closer()
        self._end(error=exc is not None)

    # -- reading --------------------------------------------------------------------------------
    def _parse(self, data: bytes | bytearray) -> int:
        """Handle every whole frame in ``data``; returns how many bytes were used."""
        pos, size = 0, len(data)
        try:
            while not self._stopped and not self._held and size - pos >= 2:
                first, second = data[pos], data[pos + 1]
                length = second & 0x7F
                head = 2
                if length == 126:
                    if size - pos < 4:
                        break
                    length = _CODE.unpack_from(data, pos + 2)[0]
                    head = 4
                elif length == 127:
                    if size - pos < 10:
                        break
                    length = _LEN64.unpack_from(data, pos)[2]
                    head = 10
                opcode = first & 0x0F
                self._check_header(first, second, opcode, length)
                payload: bytes | bytearray
                if self._client:  # a server's frames are never masked (checked above)
                    end = pos + head + length
                    if end > size:
                        break
                    payload = data[pos + head:end]
                else:
                    end = pos + head + 4 + length
                    if end > size:
                        break
                    key = bytes(data[pos + head:pos + head + 4])
                    payload = bytearray(memoryview(data)[pos + head + 4:end])
                    if length:
                        websocket_mask(key, payload)
                pos = end
                self._frame(first & 0x80 != 0, opcode, payload)
        except (ProtocolViolation, PayloadTooLarge) as exc:
            self._buffer = self._fragments = None
            self._refuse(int(exc.close_code), exc.message)
            return size
        return pos

    def _check_header(self, first: int, second: int, opcode: int, length: int) -> None:
        if first & 0x70:
            raise ProtocolViolation("reserved bits set")
        if self._client:
            if second & 0x80:
                raise ProtocolViolation("server frame masked")
        elif not second & 0x80:
            raise ProtocolViolation("client frame not masked")
        if opcode in _CONTROL_OPCODES:
            if not first & 0x80 or length > MAX_CONTROL_PAYLOAD:
                raise ProtocolViolation("bad control frame")
        elif opcode not in _DATA_OPCODES:
            raise ProtocolViolation(f"unknown opcode {opcode}")
        elif length >= self._max_message - self._fragments_size:
            raise PayloadTooLarge("WebSocket message too big")

    def _frame(self, fin: bool, opcode: int, payload: bytes | bytearray) -> None:
        if opcode == PING:
            if not self._closing and not self.transport.is_closing():
                self._write_control(PONG, payload)
            return
        if opcode == PONG:
            return
        if opcode == CLOSE:
            self._close_received(payload)
            return
        fragments = self._fragments
        if opcode == CONTINUATION:
            if fragments is None:
                raise ProtocolViolation("continuation of nothing")
            fragments.append(payload)
            self._fragments_size += len(payload)
            if not fin:
                return
            message: bytes = b"".join(fragments)
            text = self._text
            self._fragments, self._fragments_size = None, 0
        else:
            if fragments is not None:
                raise ProtocolViolation("message inside a message")
            if not fin:
                self._fragments, self._fragments_size = [payload], len(payload)
                self._text = opcode == TEXT
                return
            message, text = bytes(payload), opcode == TEXT
        if self._closing:
            return  # after our CLOSE, messages are dropped unread until the peer's CLOSE
        self._message(message, text)

    def _message(self, message: bytes, text: bool) -> None:
        """One whole message for the owner."""
        if text:
            self.owner.received_text()
        else:
            self.owner.received(message)

    def _close_received(self, payload: bytes | bytearray) -> None:
        code = _CODE.unpack_from(payload)[0] if len(payload) >= 2 else None
        if len(payload) == 1 or (code is not None and not _valid_peer_code(code)):
            raise ProtocolViolation("bad close frame")
        self.close_code = 1005 if code is None else code  # 1005: a CLOSE without a code
        self.close_reason = bytes(payload[2:])
        self._peer_closed = self._stopped = True
        if not self._closing:
            self._send_close(int(CloseCode.NORMAL), b"")  # the answer, as aiohttp's autoclose
        self.transport.close()  # the handshake is complete; what is buffered still leaves
        self._wake_closer()
        self._end(error=False)

    def _refuse(self, code: int, message: str, reason: bytes = b"") -> None:
        """Framing the socket refuses: close with ``code`` (and ``reason``) and hang up without
        waiting for the peer's CLOSE, as aiohttp did: the stream cannot be parsed any further."""
        self._stopped = True
        if not self._closing:
            self._send_close(code, reason)
        self.transport.close()
        if not self._ended:
            self.owner.refused(message)
        self._end(error=False)

    def _end(self, *, error: bool) -> None:
        if not self._ended:
            self._ended = True
            self.owner.ended(error)

    # -- writing --------------------------------------------------------------------------------
    def _write_control(self, opcode: int, payload: bytes | bytearray) -> None:
        """A PONG or CLOSE: FIN, at most 125 bytes (so a one-byte length), masked by a client."""
        if self._client:
            write_masked(self.transport, (payload,), 0x80 | opcode)
        else:
            self.transport.write(bytes((0x80 | opcode, len(payload))) + payload)

    def _check_open(self) -> None:
        if self._closing or self.transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")

    def write(self, frames: Sequence[bytes]) -> bool:
        """Each frame as one binary message, in one write (a FrameSink); False when the socket
        is full: the session waits for :meth:`drain` before it writes more."""
        self._check_open()
        if self._client:
            write_masked(self.transport, frames)
        else:
            write_messages(self.transport, frames)
        return not self._paused

    async def drain(self) -> None:
        """Wait until the socket takes more (returns at once when it does)."""
        if self._lost:
            raise ConnectionResetError("the tunnel's connection is gone")
        if not self._paused:
            return
        waiter = self._drain_waiter
        if waiter is None:
            waiter = self._drain_waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(waiter)

    # -- closing --------------------------------------------------------------------------------
    def _send_close(self, code: int, reason: bytes) -> None:
        self._closing = True
        self.sent_code = code
        if not self.transport.is_closing():
            self._write_control(CLOSE, _CODE.pack(code) + reason)

    def send_close(self, code: int, reason: bytes) -> None:
        """Send our CLOSE now (once); nothing is read or written after it but the peer's."""
        if not self._closing:
            self._send_close(code, reason)
        self._end(error=False)

    async def wait_closed(self) -> bool:
        """After :meth:`send_close`: wait for the peer's CLOSE (True) or the connection's end
        (False). Unbounded: the caller bounds it and aborts."""
        if self._peer_closed or self._lost:
            return self._peer_closed
        waiter = self._close_waiter
        if waiter is None:
            waiter = self._close_waiter = asyncio.get_running_loop().create_future()
        return await asyncio.shield(waiter)

    def _wake_closer(self) -> None:
        waiter, self._close_waiter = self._close_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self._peer_closed)

    def abort(self) -> None:
        """Drop the connection at once (connection_lost follows)."""
        if not self._lost:
            self.transport.abort()

    @property
    def closed(self) -> bool:
        return self._lost or self.transport.is_closing()


def _valid_peer_code(code: int) -> bool:
    return code in _PEER_CLOSE_CODES or 3000 <= code <= 4999
