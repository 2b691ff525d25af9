"""Minimal RFC 6455 framing for the bench's own host service and load generators.

Only what a fast echo server and a fast client need: build a frame, (un)mask a payload, parse
frames out of a byte buffer, compute the handshake's accept key. No extensions, no compression.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_LEN16 = struct.Struct("!H")
_LEN64 = struct.Struct("!Q")


def accept_key(key: bytes | str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a client's ``Sec-WebSocket-Key``."""
    raw = key.encode() if isinstance(key, str) else key
    return base64.b64encode(hashlib.sha1(raw.strip() + GUID).digest()).decode()


def new_key() -> str:
    """A fresh ``Sec-WebSocket-Key``."""
    return base64.b64encode(os.urandom(16)).decode()


def apply_mask(payload: bytes, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask`` (masking and unmasking are the same)."""
    size = len(payload)
    if not size:
        return payload
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        size, "little"
    )


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None) -> bytes:
    """One frame; clients must pass a 4-byte ``mask``, servers must not."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    mask_bit = 0x80 if mask is not None else 0
    if size < 126:
        head = bytes((first, mask_bit | size))
    elif size < 65536:
        head = bytes((first, mask_bit | 126)) + _LEN16.pack(size)
    else:
        head = bytes((first, mask_bit | 127)) + _LEN64.pack(size)
    if mask is None:
        return head + payload
    return head + mask + apply_mask(payload, mask)


def parse(buf: bytearray) -> list[tuple[int, bytes]]:
    """Take every complete frame off the front of ``buf``: ``(first byte, unmasked payload)``.

    The first byte keeps FIN and the opcode together so an echo can send it back unchanged.
    """
    out: list[tuple[int, bytes]] = []
    pos = 0
    end = len(buf)
    while end - pos >= 2:
        first = buf[pos]
        second = buf[pos + 1]
        size = second & 0x7F
        head = pos + 2
        if size == 126:
            if end - head < 2:
                break
            size = _LEN16.unpack_from(buf, head)[0]
            head += 2
        elif size == 127:
            if end - head < 8:
                break
            size = _LEN64.unpack_from(buf, head)[0]
            head += 8
        mask = None
        if second & 0x80:
            if end - head < 4:
                break
            mask = bytes(buf[head:head + 4])
            head += 4
        if end - head < size:
            break
        payload = bytes(buf[head:head + size])
        if mask is not None:
            payload = apply_mask(payload, mask)
        out.append((first, payload))
        pos = head + size
    if pos:
        del buf[:pos]
    return out


def close_payload(code: int, reason: str = "") -> bytes:
    """A close frame's payload: the 2-byte code and a UTF-8 reason."""
    return _LEN16.pack(code) + reason.encode()[:120]


def close_code(payload: bytes) -> int | None:
    """The code in a close frame's payload, or None when it carries none."""
    return _LEN16.unpack_from(payload)[0] if len(payload) >= 2 else None
