"""The tunnel frame codec: what goes on the wire, and everything malformed it refuses."""

from __future__ import annotations

import json

import pytest

from relay.errors import ProtocolViolation
from relay.protocol import frames
from relay.protocol.frames import (
    HEADER_SIZE,
    MAX_CLOSE_REASON,
    MAX_CONTROL_PAYLOAD,
    MAX_WINDOW,
    PROTOCOL_VERSION,
    Flags,
    Frame,
    FrameType,
)

MAX_FRAME = 65536
STREAM_FRAMES = [t for t in FrameType if t not in frames.CONNECTION_FRAMES]
CONNECTION_FRAMES = sorted(frames.CONNECTION_FRAMES)


def raw_frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return frames.HEADER.pack(ftype, flags, stream_id) + payload


# -- layout and round trips ----------------------------------------------------------------------


def test_header_is_type_flags_and_big_endian_stream_id() -> None:
    data = frames.encode(FrameType.DATA, 0x01020304, b"xyz", Flags.FIN | Flags.TEXT)
    assert HEADER_SIZE == 6
    assert data == bytes([0x04, 0x03, 0x01, 0x02, 0x03, 0x04]) + b"xyz"


@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
def test_every_frame_type_round_trips(ftype: FrameType) -> None:
    stream_id = 0 if ftype in frames.CONNECTION_FRAMES else 7
    payload = bytes(range(256)) * 3
    frame = frames.decode(frames.encode(ftype, stream_id, payload), MAX_FRAME)
    assert frame == Frame(ftype, stream_id, Flags.NONE, payload)


@pytest.mark.parametrize(
    "flags",
    [Flags.NONE, Flags.FIN, Flags.TEXT, Flags.MORE, Flags.TEXT | Flags.MORE,
     Flags.FIN | Flags.TEXT | Flags.MORE],
)
def test_data_flags_round_trip(flags: Flags) -> None:
    frame = frames.decode(frames.encode(FrameType.DATA, 3, b"\x00\xff", flags), MAX_FRAME)
    assert frame.flags == flags
    assert frame.fin is bool(flags & Flags.FIN)
    assert frame.payload == b"\x00\xff"


def test_the_header_carries_any_u32_stream_id_and_openers_stop_at_u31() -> None:
    frame = frames.decode(frames.encode(FrameType.DATA, 0xFFFFFFFF, b"a"), MAX_FRAME)
    assert frame.stream_id == 0xFFFFFFFF
    assert frames.MAX_STREAM_ID == 2**31 - 1


def test_decode_header_checks_the_whole_frame_without_building_one() -> None:
    data = frames.encode(FrameType.DATA, 7, b"abc", Flags.FIN)
    assert frames.decode_header(data, MAX_FRAME) == (FrameType.DATA, int(Flags.FIN), 7)
    with pytest.raises(ProtocolViolation, match="over"):
        frames.decode_header(data, 2)
    with pytest.raises(ProtocolViolation, match="not allowed on HEAD"):
        frames.decode_header(frames.encode(FrameType.HEAD, 1, b"{}", Flags.FIN), MAX_FRAME)


def test_binary_payload_is_carried_raw_without_encoding() -> None:
    payload = bytes(range(256))
    data = frames.encode(FrameType.DATA, 1, payload)
    assert len(data) == HEADER_SIZE + len(payload)
    assert data[HEADER_SIZE:] == payload


def test_decode_accepts_memoryview_and_bytearray_and_returns_bytes() -> None:
    data = frames.encode(FrameType.DATA, 1, b"hello")
    for buffer in (bytearray(data), memoryview(data)):
        frame = frames.decode(buffer, MAX_FRAME)  # type: ignore[arg-type]
        assert frame.payload == b"hello"
        assert type(frame.payload) is bytes


def test_json_round_trip() -> None:
    body = {"method": "GET", "path": "/a%20b", "headers": [["X-A", "é"]], "kind": "http"}
    frame = frames.decode(frames.encode_json(FrameType.OPEN, 5, body, Flags.FIN), MAX_FRAME)
    assert frame.fin
    assert frames.decode_json(frame) == body


def test_json_is_compact() -> None:
    data = frames.encode_json(FrameType.HEAD, 1, {"status": 200, "headers": []})
    assert data[HEADER_SIZE:] == b'{"status":200,"headers":[]}'


def test_window_round_trip() -> None:
    frame = frames.decode(frames.encode_window(9, 65536), MAX_FRAME)
    assert frame.type is FrameType.WINDOW
    assert frames.decode_window(frame) == 65536


def test_close_round_trip() -> None:
    frame = frames.decode(frames.encode_close(9, 4410, "tunnel gone"), MAX_FRAME)
    assert frames.decode_close(frame) == (4410, "tunnel gone")


def test_close_without_reason_round_trips() -> None:
    frame = frames.decode(frames.encode_close(9, 1000), MAX_FRAME)
    assert frame.payload == b"\x03\xe8"
    assert frames.decode_close(frame) == (1000, "")


@pytest.mark.parametrize("ftype", [FrameType.PING, FrameType.PONG])
def test_ping_and_pong_carry_their_payload_on_stream_zero(ftype: FrameType) -> None:
    frame = frames.decode(frames.encode_ping(ftype, b"12345678abcdefgh"), MAX_FRAME)
    assert (frame.type, frame.stream_id, frame.payload) == (ftype, 0, b"12345678abcdefgh")


# -- rejection -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", range(HEADER_SIZE))
def test_frame_shorter_than_its_header_is_refused(size: int) -> None:
    with pytest.raises(ProtocolViolation, match="shorter"):
        frames.decode(b"\x04" * size, MAX_FRAME)


@pytest.mark.parametrize("raw_type", [0x00, 0x0C, 0x7F, 0xFF])
def test_unknown_frame_type_is_refused(raw_type: int) -> None:
    with pytest.raises(ProtocolViolation, match="unknown frame type"):
        frames.decode(raw_frame(raw_type, 0, 1), MAX_FRAME)


@pytest.mark.parametrize("raw_flags", [0x08, 0x10, 0x80, 0xFF])
def test_unknown_flags_are_refused(raw_flags: int) -> None:
    with pytest.raises(ProtocolViolation, match="not allowed on DATA"):
        frames.decode(raw_frame(FrameType.DATA, raw_flags, 1, b"x"), MAX_FRAME)


@pytest.mark.parametrize(("ftype", "stream_id", "flags"), [
    (FrameType.HEAD, 1, 0x01),  # FIN on HEAD used to be ignored silently
    (FrameType.OPEN, 1, 0x02),
    (FrameType.WINDOW, 1, 0x01),
    (FrameType.CLOSE, 1, 0x01),
    (FrameType.PING, 0, 0x01),
    (FrameType.HELLO, 0, 0x04),
])
def test_flags_a_frame_type_does_not_carry_are_refused(ftype: FrameType, stream_id: int,
                                                       flags: int) -> None:
    with pytest.raises(ProtocolViolation, match=f"not allowed on {ftype.name}"):
        frames.decode(raw_frame(ftype, flags, stream_id, b"{}"), MAX_FRAME)


def test_fin_on_open_and_data_pass() -> None:
    assert frames.decode(raw_frame(FrameType.OPEN, 0x01, 1, b"{}"), MAX_FRAME).fin
    assert frames.decode(raw_frame(FrameType.DATA, 0x07, 1, b"x"), MAX_FRAME).fin


def test_data_payload_at_the_limit_is_accepted_and_one_more_byte_refused() -> None:
    frames.decode(frames.encode(FrameType.DATA, 1, b"x" * MAX_FRAME), MAX_FRAME)
    with pytest.raises(ProtocolViolation, match="over"):
        frames.decode(frames.encode(FrameType.DATA, 1, b"x" * (MAX_FRAME + 1)), MAX_FRAME)


def test_control_payload_over_its_own_limit_is_refused() -> None:
    frames.decode(frames.encode(FrameType.OPEN, 1, b" " * MAX_CONTROL_PAYLOAD), MAX_FRAME)
    with pytest.raises(ProtocolViolation, match="over"):
        frames.decode(frames.encode(FrameType.OPEN, 1, b" " * (MAX_CONTROL_PAYLOAD + 1)),
                      MAX_FRAME)


@pytest.mark.parametrize("ftype", CONNECTION_FRAMES, ids=lambda t: t.name)
def test_connection_frame_on_a_stream_id_is_refused(ftype: FrameType) -> None:
    with pytest.raises(ProtocolViolation, match="wrong stream id"):
        frames.decode(frames.encode(ftype, 1, b"{}"), MAX_FRAME)


@pytest.mark.parametrize("ftype", STREAM_FRAMES, ids=lambda t: t.name)
def test_stream_frame_on_stream_zero_is_refused(ftype: FrameType) -> None:
    with pytest.raises(ProtocolViolation, match="wrong stream id"):
        frames.decode(frames.encode(ftype, 0, b"\x00\x00\x00\x01"), MAX_FRAME)


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x01", b"\x00\x00\x00\x01\x00"])
def test_window_payload_must_be_four_bytes(payload: bytes) -> None:
    frame = frames.decode(frames.encode(FrameType.WINDOW, 1, payload), MAX_FRAME)
    with pytest.raises(ProtocolViolation, match="4 bytes"):
        frames.decode_window(frame)


@pytest.mark.parametrize("increment", [0, MAX_WINDOW + 1, 0xFFFFFFFF])
def test_window_increment_out_of_range_is_refused(increment: int) -> None:
    frame = frames.decode(frames.encode_window(1, increment), MAX_FRAME)
    with pytest.raises(ProtocolViolation, match="out of range"):
        frames.decode_window(frame)


def test_window_increment_of_max_window_is_accepted() -> None:
    frame = frames.decode(frames.encode_window(1, MAX_WINDOW), MAX_FRAME)
    assert frames.decode_window(frame) == MAX_WINDOW


@pytest.mark.parametrize("payload", [b"", b"\x03"])
def test_close_payload_without_a_code_is_refused(payload: bytes) -> None:
    frame = frames.decode(frames.encode(FrameType.CLOSE, 1, payload), MAX_FRAME)
    with pytest.raises(ProtocolViolation, match="2-byte code"):
        frames.decode_close(frame)


def test_close_reason_that_is_not_utf8_decodes_with_replacement() -> None:
    frame = frames.decode(frames.encode(FrameType.CLOSE, 1, b"\x03\xe8\xff\xfe"), MAX_FRAME)
    code, reason = frames.decode_close(frame)
    assert code == 1000
    assert "\ufffd" in reason


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"\xff\xfe", b"[1, 2]", b'"text"', b"42", b"null", b'{"a": 1'],
    ids=["empty", "garbage", "bad-utf8", "list", "string", "number", "null", "truncated"],
)
def test_json_payload_that_is_not_a_json_object_is_refused(payload: bytes) -> None:
    frame = frames.decode(frames.encode(FrameType.HEAD, 1, payload), MAX_FRAME)
    with pytest.raises(ProtocolViolation, match="JSON"):
        frames.decode_json(frame)


# -- close reason truncation --------------------------------------------------------------------


def test_long_ascii_close_reason_is_cut_to_the_websocket_limit() -> None:
    data = frames.encode_close(1, 1011, "x" * 500)
    assert len(data) == HEADER_SIZE + 2 + MAX_CLOSE_REASON
    assert MAX_CLOSE_REASON == 123  # 125-byte control frame minus the 2-byte code


@pytest.mark.parametrize("char", ["é", "€", "😀"], ids=["2-byte", "3-byte", "4-byte"])
@pytest.mark.parametrize("prefix", range(4))
def test_close_reason_truncation_never_splits_a_utf8_sequence(char: str, prefix: int) -> None:
    reason = "a" * prefix + char * 100
    data = frames.encode_close(1, 1000, reason)
    raw = data[HEADER_SIZE + 2:]
    assert len(raw) <= MAX_CLOSE_REASON
    text = raw.decode("utf-8")  # strict: raises on a cut sequence
    assert reason.startswith(text)
    assert len(raw) > MAX_CLOSE_REASON - len(char.encode())  # cut at the last whole character


def test_short_non_ascii_close_reason_is_kept_whole() -> None:
    frame = frames.decode(frames.encode_close(1, 4403, "accès refusé"), MAX_FRAME)
    assert frames.decode_close(frame) == (4403, "accès refusé")


# -- version negotiation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        (None, PROTOCOL_VERSION),
        ("", PROTOCOL_VERSION),
        ("1", 1),
        ("1,2", 2),
        (" 2 , 1 ", 2),
        ("2", 2),
        ("1,3", 1),
        ("3", None),
        ("0", None),
        ("abc", None),
        ("1.0", None),
        (",,,", None),
        ("-1", None),
    ],
)
def test_version_negotiation_picks_the_highest_common_version(
    offered: str | None, expected: int | None
) -> None:
    assert frames.negotiate_version(offered) == expected


def test_json_payload_survives_non_ascii_headers() -> None:
    body = {"headers": [["X-Name", "Zoë ✓"]]}
    frame = frames.decode(frames.encode_json(FrameType.OPEN, 1, body), MAX_FRAME)
    assert frames.decode_json(frame) == body
    assert json.loads(frame.payload) == body


@pytest.mark.parametrize("offered", ["\u00b2", "\u0661", "9" * 5000, "1" * 10, "\u0662,\u00b2"])
def test_version_offer_with_odd_digits_is_refused_not_crashed(offered: str) -> None:
    assert frames.negotiate_version(offered) is None


@pytest.mark.parametrize("ftype", [FrameType.RENEW, FrameType.RENEWED])
def test_v2_frames_are_unknown_to_a_v1_tunnel(ftype: FrameType) -> None:
    data = frames.encode_json(ftype, 0, {"token": "t"})
    with pytest.raises(ProtocolViolation, match="unknown frame type"):
        frames.decode(data, MAX_FRAME, version=1)
    assert frames.decode(data, MAX_FRAME, version=2).type is ftype


def test_renew_on_a_stream_is_a_violation() -> None:
    with pytest.raises(ProtocolViolation, match="wrong stream"):
        frames.decode(frames.encode_json(FrameType.RENEW, 1, {"token": "t"}), MAX_FRAME)


def test_the_tunnel_message_bound_covers_the_largest_legal_frame() -> None:
    # A 256 KiB PING is legal whatever maxFrame is; a big maxFrame raises the bound.
    assert frames.max_message(65536) == 256 * 1024 + frames.HEADER_SIZE
    assert frames.max_message(1 << 20) == (1 << 20) + frames.HEADER_SIZE
    ping = frames.encode_ping(FrameType.PING, b"p" * (256 * 1024))
    assert len(ping) == frames.max_message(65536)
    assert frames.decode(ping, 65536).type is FrameType.PING
    with pytest.raises(ProtocolViolation):
        frames.decode(frames.encode_ping(FrameType.PING, b"p" * (256 * 1024 + 1)), 65536)
