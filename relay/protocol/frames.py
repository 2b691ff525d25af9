"""Tunnel frame codec: one frame per WebSocket binary message, a 6-byte header, raw payloads.

Layout (network byte order)::

    0        1        2                 6
    +--------+--------+-----------------+------------------+
    |  type  | flags  | stream id (u32) | payload ...      |
    +--------+--------+-----------------+------------------+

Data payloads are raw bytes (no base64, no JSON per chunk). Control payloads that carry
structured fields (HELLO, OPEN, HEAD, DRAIN, RENEW, RENEWED) are compact JSON objects. See
docs/protocol.md. Pure code: no I/O, no clock.

Versions: 1 is the original protocol; 2 adds in-band credential renewal (RENEW/RENEWED). Frames
a version does not have are "unknown" on a tunnel that negotiated an older one.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any

from relay.errors import ProtocolViolation
from relay.protocol.close import MAX_REASON_BYTES, reason_bytes

PROTOCOL_VERSION = 1  # what an agent that offers no ``v`` speaks
LATEST_VERSION = 2
SUPPORTED_VERSIONS = frozenset({1, 2})
HEADER = struct.Struct("!BBI")
HEADER_SIZE = HEADER.size
_U32 = struct.Struct("!I")
_CLOSE = struct.Struct("!H")
# Stream ids are u31 (the header's field is u32): an opener never goes past this one.
MAX_STREAM_ID = 0x7FFFFFFF
MAX_WINDOW = 0x7FFFFFFF
# Every payload but DATA's (JSON objects, PING/PONG, CLOSE): OPEN/HEAD carry headers, which the
# edge bounds far below this.
MAX_CONTROL_PAYLOAD = 256 * 1024
MAX_CLOSE_REASON = MAX_REASON_BYTES  # what fits in a WebSocket close frame
# Flow-control credit a DATA frame on a WebSocket channel costs beyond its payload (an empty
# FIN-only frame is free), so many tiny messages are bounded by the window like bytes are.
WS_FRAME_COST = 64


class FrameType(IntEnum):
    HELLO = 0x01  # relay -> agent, stream 0: negotiated settings
    OPEN = 0x02  # relay -> agent: a new stream (HTTP exchange or WebSocket channel)
    HEAD = 0x03  # agent -> relay: response head / WebSocket accept or refusal
    DATA = 0x04  # either way: body bytes or a WebSocket message (fragment)
    WINDOW = 0x05  # either way: grant more flow-control credit on a stream
    CLOSE = 0x06  # either way: end the stream now, with a code and reason
    PING = 0x07  # either way, stream 0
    PONG = 0x08  # either way, stream 0, echoes the PING payload
    DRAIN = 0x09  # relay -> agent, stream 0: this relay is going away; reconnect at once
    RENEW = 0x0A  # v2, agent -> relay, stream 0: a fresh token for the same subject and host
    RENEWED = 0x0B  # v2, relay -> agent, stream 0: the answer to a RENEW


class Flags(IntFlag):
    NONE = 0
    FIN = 0x01  # DATA/OPEN: the sender's last bytes on this stream
    TEXT = 0x02  # DATA on a WebSocket channel: the message is text (UTF-8)
    MORE = 0x04  # DATA on a WebSocket channel: the message continues in the next frame


CONNECTION_FRAMES = frozenset({FrameType.HELLO, FrameType.PING, FrameType.PONG, FrameType.DRAIN,
                               FrameType.RENEW, FrameType.RENEWED})
# The protocol version that introduced each frame type newer than version 1.
INTRODUCED_IN: dict[FrameType, int] = {FrameType.RENEW: 2, FrameType.RENEWED: 2}


def max_message(max_frame: int) -> int:
    """The largest legal tunnel message: a full DATA frame or the largest control payload.

    The tunnel WebSocket must accept this much in one message, so every frame the protocol
    allows (a 256 KiB PING included) arrives and over-sized ones meet the codec's 1002.
    """
    return max(max_frame, MAX_CONTROL_PAYLOAD) + HEADER_SIZE


# How far beyond :func:`max_message` the WebSocket layer still reads a message, so a frame a
# little over its bound is refused by the codec as a protocol violation (1002), not by the
# WebSocket layer as "message too big" (1009).
MESSAGE_SLACK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    stream_id: int
    flags: Flags
    payload: bytes

    @property
    def fin(self) -> bool:
        return bool(self.flags & Flags.FIN)


def encode(ftype: FrameType, stream_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(ftype, flags, stream_id) + payload


# What each frame type may carry: FIN on OPEN (no request body) and on DATA; TEXT and MORE on
# DATA (of WebSocket channels: the stream checks the kind). Anything else, FIN on HEAD
# included, is a violation rather than silently ignored.
ALLOWED_FLAGS: dict[FrameType, int] = {
    FrameType.OPEN: int(Flags.FIN),
    FrameType.DATA: int(Flags.FIN | Flags.TEXT | Flags.MORE),
}


# Per type code, for a header decoded without enum lookups (every frame goes through here).
_TYPE_BY_CODE: tuple[FrameType | None, ...] = tuple(
    FrameType(code) if code in FrameType._value2member_map_ else None for code in range(256))
_ALLOWED_BY_CODE: tuple[int, ...] = tuple(
    ALLOWED_FLAGS.get(ftype, 0) if ftype is not None else 0 for ftype in _TYPE_BY_CODE)
_VERSION_BY_CODE: tuple[int, ...] = tuple(
    INTRODUCED_IN.get(ftype, 1) if ftype is not None else 0 for ftype in _TYPE_BY_CODE)
_CONNECTION_BY_CODE: tuple[bool, ...] = tuple(ftype in CONNECTION_FRAMES
                                              for ftype in _TYPE_BY_CODE)


def decode_header(data: bytes, max_payload: int, version: int = LATEST_VERSION
                  ) -> tuple[FrameType, int, int]:
    """Type, flags and stream id of one frame of protocol ``version``, the whole frame checked
    (its payload is ``data[HEADER_SIZE:]``); anything malformed is the peer's fault."""
    if len(data) < HEADER_SIZE:
        raise ProtocolViolation(f"frame shorter than its header ({len(data)} bytes)")
    raw_type, raw_flags, stream_id = HEADER.unpack_from(data)
    ftype = _TYPE_BY_CODE[raw_type]
    if ftype is None or _VERSION_BY_CODE[raw_type] > version:
        # A v1 peer never sees RENEW/RENEWED: to it they are simply unknown.
        raise ProtocolViolation(f"unknown frame type 0x{raw_type:02x}")
    if raw_flags & ~_ALLOWED_BY_CODE[raw_type]:
        raise ProtocolViolation(f"flags 0x{raw_flags:02x} not allowed on {ftype.name}")
    size = len(data) - HEADER_SIZE
    limit = max_payload if ftype is FrameType.DATA else MAX_CONTROL_PAYLOAD
    if size > limit:
        raise ProtocolViolation(f"{ftype.name} payload of {size} bytes over {limit}")
    if _CONNECTION_BY_CODE[raw_type] != (stream_id == 0):
        raise ProtocolViolation(f"{ftype.name} on the wrong stream id {stream_id}")
    return ftype, raw_flags, stream_id


def decode(data: bytes, max_payload: int, version: int = LATEST_VERSION) -> Frame:
    """Parse one frame of protocol ``version``, rejecting anything malformed as the peer's fault.
    """
    ftype, flags, stream_id = decode_header(data, max_payload, version)
    return Frame(ftype, stream_id, Flags(flags), bytes(data[HEADER_SIZE:]))


def encode_json(ftype: FrameType, stream_id: int, body: dict[str, Any], flags: int = 0) -> bytes:
    return encode(ftype, stream_id, json.dumps(body, separators=(",", ":")).encode(), flags)


def decode_json(frame: Frame) -> dict[str, Any]:
    try:
        body = json.loads(frame.payload)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolViolation(f"{frame.type.name} payload is not JSON") from None
    if not isinstance(body, dict):
        raise ProtocolViolation(f"{frame.type.name} payload is not a JSON object")
    return body


def encode_window(stream_id: int, increment: int) -> bytes:
    return encode(FrameType.WINDOW, stream_id, _U32.pack(increment))


def decode_window(frame: Frame) -> int:
    return parse_window(frame.payload)


def parse_window(payload: bytes) -> int:
    if len(payload) != 4:
        raise ProtocolViolation("WINDOW payload must be 4 bytes")
    increment: int = _U32.unpack(payload)[0]
    if not 0 < increment <= MAX_WINDOW:
        raise ProtocolViolation(f"WINDOW increment {increment} out of range")
    return increment


def encode_close(stream_id: int, code: int, reason: str = "") -> bytes:
    raw = reason_bytes(reason, MAX_CLOSE_REASON)
    return encode(FrameType.CLOSE, stream_id, _CLOSE.pack(code) + raw)


def decode_close(frame: Frame) -> tuple[int, str]:
    return parse_close(frame.payload)


def parse_close(payload: bytes) -> tuple[int, str]:
    if len(payload) < 2:
        raise ProtocolViolation("CLOSE payload must hold a 2-byte code")
    (code,) = _CLOSE.unpack_from(payload)
    return code, payload[2:].decode(errors="replace")


def encode_ping(ftype: FrameType, payload: bytes) -> bytes:
    return encode(ftype, 0, payload)


def negotiate_version(offered: str | None) -> int | None:
    """The highest version both sides speak, from the agent's comma-separated offer."""
    if not offered:
        return PROTOCOL_VERSION
    versions = set()
    for part in offered.split(",")[:16]:
        part = part.strip()
        # ASCII digits only: str.isdigit() also accepts superscripts (which int() refuses)
        # and other scripts' digits.
        if part.isascii() and part.isdigit() and len(part) <= 9:
            versions.add(int(part))
    common = versions & SUPPORTED_VERSIONS
    return max(common) if common else None
