"""The multiplexer's protocol rules, driven synchronously: no sockets, no loop, a fake clock.

Two muxes (a relay and an agent) are joined by moving each one's ``data_to_send()`` into the
other's ``receive()``; the test decides when, so every rule is checked frame by frame.
"""

from __future__ import annotations

import ast
import collections
import json
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest

from relay.errors import CloseCode, ProtocolViolation
from relay.protocol import frames
from relay.protocol.frames import WS_FRAME_COST, Flags, FrameType
from relay.protocol.messages import Drain, Head, Hello, Open, Renew, Renewed
from relay.protocol.mux import (
    AGENT_SIDE,
    OUTBOX_HIGH_WATER,
    RELAY_SIDE,
    ControlFlood,
    IdsExhausted,
    KeepaliveMissed,
    LocalProtocolError,
    Mux,
    MuxClosed,
    PeerNotReading,
    PongReceived,
    Role,
    SessionSettings,
    StreamIdsExhausted,
    StreamLimit,
    StreamOpened,
    min_outbox_bound,
)
from relay.protocol.streams import Stream, StreamEnd, StreamKind, StreamState
from tests.clock import FakeClock

SMALL = SessionSettings(window=4096, max_frame=1024, max_streams=8, max_ws_message=64 * 1024,
                        ping_interval_s=1.0, keepalive_misses=3)


class Recording(Stream):
    """A stream that notes each hook the mux calls, as an I/O layer would wake a waiter."""

    __slots__ = ("hooks",)

    def __init__(self, stream_id: int, kind: StreamKind, window: int, awaits_head: bool) -> None:
        super().__init__(stream_id, kind, window, awaits_head)
        self.hooks: list[str] = []

    def _on_input(self) -> None:
        self.hooks.append("input")

    def _on_credit(self) -> None:
        self.hooks.append("credit")

    def _on_head(self) -> None:
        self.hooks.append("head")

    def _on_end(self) -> None:
        self.hooks.append("end")

    def take_all(self) -> bytes:
        out = bytearray()
        while self.has_input:
            chunk = self.pop_input()
            if chunk is None:
                break
            out += chunk.data
        return bytes(out)


def mux(role: Role, settings: SessionSettings = SMALL, clock: FakeClock | None = None,
        **kwargs: int) -> Mux[Recording]:
    return Mux(role, settings, Recording, now=(clock or FakeClock())(), **kwargs)


class Pair:
    def __init__(self, relay_settings: SessionSettings = SMALL,
                 agent_settings: SessionSettings | None = None, version: int = 1) -> None:
        self.clock = FakeClock()
        self.relay = Mux(Role.RELAY, relay_settings, Recording, now=self.clock(),
                         version=version)
        self.agent = Mux(Role.AGENT, agent_settings or relay_settings, Recording,
                         now=self.clock(), version=version)
        self.to_agent: list[bytes] = []
        self.to_relay: list[bytes] = []

    def pump(self) -> None:
        """Move frames both ways until neither side has anything to send."""
        while self.relay.has_output or self.agent.has_output:
            for frame in self.relay.data_to_send():
                self.to_agent.append(frame)
                self.agent.receive(frame, self.clock())
            for frame in self.agent.data_to_send():
                self.to_relay.append(frame)
                self.relay.receive(frame, self.clock())

    def open(self, head: Open | None = None, *, fin: bool = False
             ) -> tuple[Recording, Recording, Open]:
        relay_stream = self.relay.open_stream(head or Open("http"), fin=fin)
        self.pump()
        event = self.agent.next_event()
        assert isinstance(event, StreamOpened)
        return relay_stream, event.stream, event.open


def sent(frames_out: list[bytes], ftype: FrameType) -> list[frames.Frame]:
    return [frames.decode(f, 1 << 20) for f in frames_out if f[0] == ftype]


def send_all(m: Mux[Recording], stream: Recording, data: bytes, **kwargs: bool) -> int:
    """Send as much of ``data`` as credit allows; the bytes that went."""
    view = memoryview(data)
    total = 0
    while view or not total:
        taken = m.send_data(stream, view, **kwargs)
        if taken is None:
            break
        total += taken
        view = view[taken:]
        if not data:
            break
    return total


# -- streams, both ways ---------------------------------------------------------------------------


def test_open_head_data_fin_round_trip_in_order() -> None:
    p = Pair()
    relay_s, agent_s, opened = p.open(Open("http", method="POST", path="/up"))
    assert opened == Open("http", method="POST", path="/up")
    assert relay_s.id == agent_s.id == 1
    assert p.relay.send_data(relay_s, b"hello host", fin=True) == 10
    p.pump()
    assert agent_s.take_all() == b"hello host" and agent_s.state is StreamState.REMOTE_DONE
    p.agent.send_head(agent_s, Head(200, headers=(("X-A", "1"),)))
    p.agent.send_data(agent_s, b"hello client", fin=True)
    p.pump()
    assert relay_s.peer_head == Head(200, headers=(("X-A", "1"),))
    assert relay_s.hooks == ["head", "input"]
    assert relay_s.take_all() == b"hello client"
    assert p.relay.streams == {} and p.agent.streams == {}
    assert not p.relay.has_events and not p.agent.has_events


def test_stream_ids_are_odd_and_increasing() -> None:
    relay = mux(Role.RELAY)
    assert [relay.open_stream(Open("http"), fin=True).id for _ in range(4)] == [1, 3, 5, 7]


def test_open_with_fin_means_no_body_and_a_body_is_not_mistaken_for_none() -> None:
    p = Pair()
    _, bodiless, _ = p.open(fin=True)
    assert bodiless.fin_on_open and bodiless.has_input and bodiless.pop_input() is None
    relay_s = p.relay.open_stream(Open("http", method="POST"))
    p.relay.send_data(relay_s, b"tiny", fin=True)
    p.pump()  # OPEN, body and FIN in one go, before anyone looked at the stream
    event = p.agent.next_event()
    assert isinstance(event, StreamOpened) and not event.stream.fin_on_open
    assert event.stream.take_all() == b"tiny"


def test_data_never_exceeds_max_frame_or_credit_on_the_wire() -> None:
    p = Pair()
    relay_s, agent_s, _ = p.open()
    assert send_all(p.relay, relay_s, b"z" * 10_000) == SMALL.window  # one window, no more
    assert p.relay.send_data(relay_s, b"z") is None  # no credit: nothing sent
    p.pump()
    sizes = [len(f.payload) for f in sent(p.to_agent, FrameType.DATA)]
    assert sum(sizes) == SMALL.window and max(sizes) <= SMALL.max_frame
    assert agent_s.buffered == SMALL.window


def test_close_never_overtakes_the_data_before_it() -> None:
    p = Pair()
    _, agent_s, _ = p.open(fin=True)
    p.agent.send_head(agent_s, Head(200))
    p.agent.send_data(agent_s, b"partial body")
    p.agent.close_stream(agent_s, 4000, "host failed")
    assert [f[0] for f in p.agent.data_to_send()] == [FrameType.HEAD, FrameType.DATA,
                                                       FrameType.CLOSE]


def test_close_reaches_the_peer_with_its_code_and_a_reason_cut_at_a_character() -> None:
    p = Pair()
    relay_s, agent_s, _ = p.open(Open("ws"))
    p.relay.close_stream(relay_s, 4410, "é" * 100)
    p.pump()
    assert agent_s.end is not None and agent_s.end.code == 4410
    assert len(agent_s.end.reason.encode()) <= 123 and set(agent_s.end.reason) == {"é"}
    assert agent_s.hooks == ["end"] and not agent_s.end.tunnel_lost
    assert p.relay.streams == {} and p.agent.streams == {}


def test_a_finished_stream_sends_no_close() -> None:
    p = Pair()
    relay_s, agent_s, _ = p.open(fin=True)
    p.agent.send_head(agent_s, Head(204))
    p.agent.send_data(agent_s, b"", fin=True)
    p.pump()
    p.agent.close_stream(agent_s)
    p.relay.close_stream(relay_s)
    p.pump()
    assert sent(p.to_agent + p.to_relay, FrameType.CLOSE) == []


def test_late_frames_for_a_stream_that_ended_are_ignored() -> None:
    p = Pair()
    relay_s, agent_s, _ = p.open(fin=True)
    p.relay.close_stream(relay_s, 1001, "client went away")
    p.pump()
    for side, sid in ((p.relay, relay_s.id), (p.agent, agent_s.id)):
        side.receive(frames.encode(FrameType.DATA, sid, b"late"), 0)
        side.receive(frames.encode_window(sid, 10), 0)
        side.receive(frames.encode_close(sid, 1000), 0)
    p.relay.receive(frames.encode_json(FrameType.HEAD, relay_s.id, {"status": 200}), 0)
    assert p.relay.streams == {} and p.agent.streams == {} and not p.relay.has_output


# -- flow control ---------------------------------------------------------------------------------


def test_credit_returns_as_the_consumer_takes_bytes_batched_by_half_windows() -> None:
    p = Pair()
    relay_s, agent_s, _ = p.open()
    total = 0
    for _ in range(40):
        total += send_all(p.relay, relay_s, b"w" * SMALL.window)
        p.pump()
        taken = agent_s.take_all()
        p.agent.consumed(agent_s, len(taken))
        p.pump()
    assert total == 40 * SMALL.window
    windows = sent(p.to_relay, FrameType.WINDOW)
    assert len(windows) <= 2 * 40 < len(sent(p.to_agent, FrameType.DATA))
    assert "credit" in relay_s.hooks


def test_no_credit_is_returned_once_the_peer_has_finished_sending() -> None:
    p = Pair()
    relay_s, agent_s, _ = p.open()
    send_all(p.relay, relay_s, b"q" * 3000, fin=True)
    p.pump()
    p.agent.consumed(agent_s, len(agent_s.take_all()))
    assert not p.agent.has_output  # the peer will send nothing more: credit is of no use


def test_peer_sending_beyond_its_credit_is_a_violation() -> None:
    p = Pair()
    relay_s, _, _ = p.open()
    for _ in range(SMALL.window // SMALL.max_frame):
        p.agent.receive(frames.encode(FrameType.DATA, relay_s.id, b"a" * SMALL.max_frame), 0)
    with pytest.raises(ProtocolViolation, match="credit"):
        p.agent.receive(frames.encode(FrameType.DATA, relay_s.id, b"a"), 0)


def test_peer_granting_credit_beyond_the_maximum_is_a_violation() -> None:
    relay = mux(Role.RELAY)
    stream = relay.open_stream(Open("http"))
    with pytest.raises(ProtocolViolation, match="maximum window"):
        relay.receive(frames.encode_window(stream.id, frames.MAX_WINDOW), 0)


def test_data_after_the_peers_fin_is_a_violation() -> None:
    p = Pair()
    relay_s, _, _ = p.open()
    p.relay.send_data(relay_s, b"", fin=True)
    p.pump()
    with pytest.raises(ProtocolViolation, match="after its FIN"):
        p.agent.receive(frames.encode(FrameType.DATA, relay_s.id, b"late"), 0)


def test_many_tiny_body_chunks_coalesce_in_the_receive_buffer() -> None:
    p = Pair()
    relay_s, agent_s, _ = p.open(fin=True)
    p.agent.send_head(agent_s, Head(200))
    for i in range(SMALL.window):
        assert p.agent.send_data(agent_s, bytes([i % 256])) == 1
    assert p.agent.send_data(agent_s, b"x") is None
    p.pump()
    assert relay_s.buffered == SMALL.window and relay_s.queued_items == 1


def test_tiny_body_frames_cost_their_bytes_not_an_object_each() -> None:
    """Bodies are held by reference to their frames; tiny frames must not be (memory bound)."""
    p = Pair()
    relay_s, agent_s, _ = p.open(fin=True)
    p.agent.send_head(agent_s, Head(200))
    for i in range(SMALL.window):
        assert p.agent.send_data(agent_s, bytes([i % 256])) == 1
    sent_frames = p.agent.data_to_send()
    relay_s.hooks = collections.deque(maxlen=1)  # the test's record of hooks is not measured
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for frame in sent_frames:
            p.relay.receive(frame, 0)
        sent_frames.clear()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert relay_s.buffered == SMALL.window
    assert held < 4 * SMALL.window  # a view per 1-byte frame held about 50 times that
    assert relay_s.take_all() == bytes(i % 256 for i in range(SMALL.window))


def test_a_body_of_large_and_small_frames_reads_back_byte_exact_in_one_piece() -> None:
    settings = replace(SMALL, window=64 * 1024, max_frame=16 * 1024)
    p = Pair(settings)
    relay_s, agent_s, _ = p.open(fin=True)
    p.agent.send_head(agent_s, Head(200))
    sizes = [16 * 1024, 1, 5000, 7, 3, 16 * 1024, 100, 16 * 1024]
    body = bytes((n * 7 + k) % 251 for n, size in enumerate(sizes) for k in range(size))
    at = 0
    for size in sizes:
        assert p.agent.send_data(agent_s, body[at:at + size]) == size
        at += size
    p.agent.send_data(agent_s, b"", fin=True)
    p.pump()
    assert relay_s.queued_items == 2  # the body, then the FIN
    chunk = relay_s.pop_input()
    assert chunk is not None and chunk.data == body and relay_s.buffered == 0
    assert relay_s.pop_input() is None


# -- WebSocket channels ---------------------------------------------------------------------------


def test_a_large_ws_message_is_fragmented_with_more_and_text_on_every_piece() -> None:
    p = Pair()
    relay_s, agent_s, _ = p.open(Open("ws"))
    text = ("héllo wörld " * 250).encode()  # multi-byte characters cut across pieces
    assert send_all(p.relay, relay_s, text, text=True, message=True) == len(text)
    p.pump()
    data = sent(p.to_agent, FrameType.DATA)
    assert len(data) > 1 and all(f.flags & Flags.TEXT for f in data)
    assert all(f.flags & Flags.MORE for f in data[:-1]) and not data[-1].flags & Flags.MORE
    assert agent_s.take_all() == text


def test_a_message_bigger_than_the_window_flows_when_credit_returns_per_fragment() -> None:
    """Decision 16: credit for each fragment as it is taken, or the message deadlocks."""
    p = Pair()
    relay_s, agent_s, _ = p.open(Open("ws"))
    message = bytes(range(256)) * (4 * SMALL.window // 256)
    view, received = memoryview(message), bytearray()
    while view:
        taken = p.relay.send_data(relay_s, view, message=True)
        assert taken is not None, "deadlock: no credit came back mid-message"
        view = view[taken:]
        p.pump()
        while agent_s.has_input:
            chunk = agent_s.pop_input()
            assert chunk is not None
            received += chunk.data
            p.agent.consumed(agent_s, len(chunk.data) + WS_FRAME_COST)
        p.pump()
    assert bytes(received) == message


def test_every_ws_frame_costs_credit_so_empty_messages_are_bounded() -> None:
    p = Pair()
    relay_s, agent_s, _ = p.open(Open("ws"))
    count = 0
    while p.relay.send_data(relay_s, b"", message=True) == 0:
        count += 1
    assert count == SMALL.window // WS_FRAME_COST
    p.pump()
    assert agent_s.queued_items == count
    with pytest.raises(ProtocolViolation, match="credit"):
        p.agent.receive(frames.encode(FrameType.DATA, relay_s.id, b""), 0)


def test_an_empty_ws_fragment_is_a_violation() -> None:
    p = Pair()
    relay_s, _, _ = p.open(Open("ws"))
    with pytest.raises(ProtocolViolation, match="empty DATA fragment"):
        p.agent.receive(frames.encode(FrameType.DATA, relay_s.id, b"", Flags.MORE), 0)


def test_a_fin_inside_a_fragmented_message_is_a_violation() -> None:
    p = Pair()
    relay_s, _, _ = p.open(Open("ws"))
    p.agent.receive(frames.encode(FrameType.DATA, relay_s.id, b"part", Flags.MORE), 0)
    with pytest.raises(ProtocolViolation, match="inside a fragmented message"):
        p.agent.receive(frames.encode(FrameType.DATA, relay_s.id, b"", Flags.FIN), 0)


def test_fin_on_a_ws_channel_is_taken_as_close_1000() -> None:
    """Decision 7: a ws channel ends with CLOSE; a FIN there means CLOSE 1000, empty reason."""
    p = Pair()
    relay_s, agent_s, _ = p.open(Open("ws"))
    p.relay.receive(frames.encode_json(FrameType.HEAD, relay_s.id, {"status": 101}), 0)
    p.relay.receive(frames.encode(FrameType.DATA, relay_s.id, b"bye", Flags.FIN), 0)
    assert relay_s.take_all() == b"bye"
    assert relay_s.end == StreamEnd(1000, "") and p.relay.streams == {}
    assert relay_s.hooks == ["head", "input", "end"]
    with pytest.raises(LocalProtocolError, match="CLOSE, never FIN"):
        p.agent.send_head(agent_s, Head(101))
        p.agent.send_data(agent_s, b"", fin=True)


def test_a_ws_open_never_carries_fin() -> None:
    """Decision 6, both ways: the relay cannot send one, the agent refuses one."""
    with pytest.raises(LocalProtocolError):
        mux(Role.RELAY).open_stream(Open("ws"), fin=True)
    with pytest.raises(ProtocolViolation, match="FIN on the OPEN of WebSocket"):
        mux(Role.AGENT).receive(frames.encode(FrameType.OPEN, 1, Open("ws").encode(), Flags.FIN),
                                0)


# -- HEAD -----------------------------------------------------------------------------------------


def test_data_before_head_is_a_violation_and_our_side_cannot_send_it() -> None:
    """Decision 4."""
    p = Pair()
    relay_s, agent_s, _ = p.open(fin=True)
    with pytest.raises(LocalProtocolError, match="before its HEAD"):
        p.agent.send_data(agent_s, b"body first")
    with pytest.raises(ProtocolViolation, match="before its HEAD"):
        p.relay.receive(frames.encode(FrameType.DATA, relay_s.id, b"body first"), 0)


def test_a_second_head_is_a_violation() -> None:
    relay = mux(Role.RELAY)
    stream = relay.open_stream(Open("http"), fin=True)
    relay.receive(frames.encode_json(FrameType.HEAD, stream.id, {"status": 200}), 0)
    with pytest.raises(ProtocolViolation, match="second HEAD"):
        relay.receive(frames.encode_json(FrameType.HEAD, stream.id, {"status": 200}), 0)


@pytest.mark.parametrize("body", [{"status": "abc"}, {"status": 200, "headers": 5},
                                  {"status": 99}, {"status": 101},
                                  {"status": 200, "headers": [["X", "1\r\nSet-Cookie: a=1"]]}])
def test_a_malformed_http_head_is_a_violation(body: dict[str, object]) -> None:
    relay = mux(Role.RELAY)
    stream = relay.open_stream(Open("http"), fin=True)
    with pytest.raises(ProtocolViolation):
        relay.receive(frames.encode(FrameType.HEAD, stream.id, json.dumps(body).encode()), 0)
    assert stream.peer_head is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (frames.encode(FrameType.HEAD, 1, b'{"status": 200}', Flags.FIN), "not allowed on HEAD"),
        (frames.encode(FrameType.DATA, 1, b"x", Flags.TEXT), "HTTP stream"),
        (frames.encode(FrameType.DATA, 1, b"x", Flags.MORE), "HTTP stream"),
        (frames.encode(FrameType.WINDOW, 1, b"\x00\x00\x00\x01", Flags.FIN), "not allowed"),
        (frames.encode(FrameType.CLOSE, 1, b"\x03\xe8", Flags.FIN), "not allowed"),
        (frames.encode(FrameType.PING, 0, b"", Flags.FIN), "not allowed"),
    ],
    ids=["fin-on-head", "text-on-http", "more-on-http", "fin-on-window", "fin-on-close",
         "fin-on-ping"],
)
def test_flags_a_frame_type_does_not_carry_are_violations(data: bytes, message: str) -> None:
    """Decision 1."""
    relay = mux(Role.RELAY)
    stream = relay.open_stream(Open("http"), fin=True)
    relay.receive(frames.encode_json(FrameType.HEAD, stream.id, {"status": 200}), 0)
    with pytest.raises(ProtocolViolation, match=message):
        relay.receive(data, 0)


# -- who may send what ----------------------------------------------------------------------------


def test_roles_are_data() -> None:
    assert Role.RELAY.side is RELAY_SIDE and Role.RELAY.peer is AGENT_SIDE
    assert RELAY_SIDE.opens_streams and not AGENT_SIDE.opens_streams
    assert FrameType.HEAD in RELAY_SIDE.receives and FrameType.OPEN in AGENT_SIDE.receives
    assert RELAY_SIDE.receives & AGENT_SIDE.receives == {
        FrameType.DATA, FrameType.WINDOW, FrameType.CLOSE, FrameType.PING, FrameType.PONG}


@pytest.mark.parametrize(
    ("role", "data", "message"),
    [
        (Role.RELAY, frames.encode_json(FrameType.OPEN, 1, {"kind": "http"}),
         "OPEN sent to the relay"),
        (Role.RELAY, frames.encode_json(FrameType.HELLO, 0, {}), "HELLO sent to the relay"),
        (Role.RELAY, frames.encode_json(FrameType.DRAIN, 0, {}), "DRAIN sent to the relay"),
        (Role.RELAY, frames.encode_json(FrameType.RENEWED, 0, {}), "RENEWED sent to the relay"),
        (Role.AGENT, frames.encode_json(FrameType.HEAD, 1, {}), "HEAD sent to the agent"),
        (Role.AGENT, frames.encode_json(FrameType.RENEW, 0, {"token": "t"}),
         "RENEW sent to the agent"),
        (Role.AGENT, frames.encode_json(FrameType.OPEN, 2, {"kind": "http"}), "misnumbers"),
        (Role.AGENT, frames.encode_json(FrameType.OPEN, 1, {"kind": "ftp"}), "unknown kind"),
    ],
)
def test_frames_in_the_wrong_direction_are_violations(role: Role, data: bytes,
                                                      message: str) -> None:
    """Decision 10."""
    with pytest.raises(ProtocolViolation, match=message):
        mux(role, version=2).receive(data, 0)


def test_this_side_cannot_send_what_its_peer_may_not_receive() -> None:
    relay, agent = mux(Role.RELAY), mux(Role.AGENT)
    with pytest.raises(LocalProtocolError):
        agent.open_stream(Open("http"))
    with pytest.raises(LocalProtocolError):
        agent.send_hello(Hello())
    with pytest.raises(LocalProtocolError):
        relay.send_renew(Renew("t"))
    stream = relay.open_stream(Open("http"))
    with pytest.raises(LocalProtocolError):
        relay.send_head(stream, Head(200))


def test_an_open_reusing_or_below_the_last_id_is_a_violation() -> None:
    agent = mux(Role.AGENT)
    agent.receive(frames.encode_json(FrameType.OPEN, 5, {"kind": "http"}, Flags.FIN), 0)
    for stream_id in (5, 3):
        with pytest.raises(ProtocolViolation, match="reuses or misnumbers"):
            agent.receive(frames.encode_json(FrameType.OPEN, stream_id, {"kind": "http"}), 0)


@pytest.mark.parametrize(
    "frame",
    [
        frames.encode(FrameType.DATA, 3, b"unsolicited"),
        frames.encode(FrameType.DATA, 2, b"even"),
        frames.encode_window(3, 10),
        frames.encode_close(5, 1000),
        frames.encode_json(FrameType.HEAD, 7, {"status": 200}),
        frames.encode_json(FrameType.HEAD, 2, {"status": 200}),
    ],
    ids=["data", "data-even", "window", "close", "head", "head-even"],
)
def test_frames_for_a_stream_never_opened_are_violations(frame: bytes) -> None:
    p = Pair()
    p.open(fin=True)  # stream 1 exists
    with pytest.raises(ProtocolViolation, match="never opened"):
        p.relay.receive(frame, 0)
    if frame[0] != FrameType.HEAD:
        with pytest.raises(ProtocolViolation, match="never opened"):
            p.agent.receive(frame, 0)


def test_connection_messages_come_out_as_typed_events() -> None:
    agent = mux(Role.AGENT, version=2)
    agent.receive(frames.encode_json(FrameType.HELLO, 0, {"version": 1.0, "window": 8192.0}), 0)
    agent.receive(frames.encode_json(FrameType.DRAIN, 0, {"reason": "deploy"}), 0)
    agent.receive(frames.encode_json(FrameType.RENEWED, 0, {"expiresAt": 1800000000}), 0)
    assert agent.events() == [Hello(version=1, window=8192), Drain(reason="deploy"),
                              Renewed(expires_at=1800000000.0)]
    relay = mux(Role.RELAY, version=2)
    relay.receive(frames.encode_json(FrameType.RENEW, 0, {"token": "t"}), 0)
    assert relay.next_event() == Renew("t") and relay.next_event() is None


def test_renew_on_a_v1_tunnel_is_an_unknown_frame() -> None:
    with pytest.raises(ProtocolViolation, match="unknown frame type 0x0a"):
        mux(Role.RELAY).receive(frames.encode_json(FrameType.RENEW, 0, {"token": "t"}), 0)


# -- stream limits and ids ------------------------------------------------------------------------


def test_max_streams_refuses_one_more_locally_and_the_agent_refuses_with_1013() -> None:
    p = Pair(SMALL, replace(SMALL, max_streams=1))
    streams = [p.relay.open_stream(Open("http"), fin=True) for _ in range(SMALL.max_streams)]
    with pytest.raises(StreamLimit):
        p.relay.open_stream(Open("http"), fin=True)
    p.pump()
    assert len(p.agent.streams) == 1 and len(p.agent.events()) == 1
    refused = [s for s in streams if s.end is not None]
    assert len(refused) == SMALL.max_streams - 1
    assert {s.end.code for s in refused if s.end} == {int(CloseCode.TRY_AGAIN_LATER)}
    p.relay.close_stream(streams[0])
    p.relay.open_stream(Open("http"), fin=True)


def test_running_out_of_stream_ids_drains_once_and_allocates_nothing() -> None:
    """Decision 13."""
    relay = mux(Role.RELAY, first_stream_id=frames.MAX_STREAM_ID)
    last = relay.open_stream(Open("http"), fin=True)
    assert last.id == frames.MAX_STREAM_ID == 2**31 - 1
    relay.data_to_send()
    for _ in range(3):
        with pytest.raises(IdsExhausted):
            relay.open_stream(Open("http"), fin=True)
    drains = sent(relay.data_to_send(), FrameType.DRAIN)
    assert [json.loads(d.payload) for d in drains] == [
        {"reason": "stream ids exhausted", "reconnectAfterS": 0}]
    assert relay.events() == [StreamIdsExhausted()]
    assert list(relay.streams) == [last.id]  # nothing leaked for the failed opens


# -- the end of a tunnel --------------------------------------------------------------------------


def test_abort_ends_every_stream_as_tunnel_lost_and_the_mux_takes_nothing_more() -> None:
    p = Pair()
    relay_s, _, _ = p.open()
    p.relay.send_data(relay_s, b"queued")
    p.relay.abort(4410, "tunnel gone")
    assert relay_s.end == StreamEnd(4410, "tunnel gone", tunnel_lost=True)
    assert p.relay.streams == {} and not p.relay.has_output and not p.relay.alive
    with pytest.raises(MuxClosed):
        p.relay.open_stream(Open("http"))
    p.relay.receive(b"garbage", 0)  # ignored: the tunnel is being cut
    p.relay.close_stream(relay_s)
    assert not p.relay.has_output


# -- keepalive, on the fake clock -----------------------------------------------------------------


def test_tick_pings_each_interval_and_a_pong_gives_the_round_trip() -> None:
    p = Pair()
    assert p.relay.tick(p.clock())
    pings = sent(p.relay.data_to_send(), FrameType.PING)
    assert len(pings) == 1 and len(pings[0].payload) == 16
    assert p.relay.tick(p.clock()) and not p.relay.has_output  # not due yet
    p.clock.advance(0.25)
    p.agent.receive(frames.encode_ping(FrameType.PING, pings[0].payload), p.clock())
    p.relay.receive(p.agent.data_to_send()[0], p.clock())  # the agent's PONG
    assert p.relay.events() == [PongReceived(0.25)] and p.relay.rtt_s == 0.25
    p.clock.advance(SMALL.ping_interval_s)
    assert p.relay.tick(p.clock()) and len(sent(p.relay.data_to_send(), FrameType.PING)) == 1


def test_a_pong_answering_no_ping_of_ours_sets_no_round_trip() -> None:
    relay = mux(Role.RELAY)
    relay.receive(frames.encode_ping(FrameType.PONG, bytes(16)), 5.0)
    assert relay.events() == [PongReceived(None)] and relay.rtt_s is None


def test_keepalive_holds_while_frames_flow_and_fires_once_after_the_silence_limit() -> None:
    clock = FakeClock()
    relay = mux(Role.RELAY, clock=clock)
    for _ in range(30):  # ten times the silence limit, with the peer answering
        clock.advance(SMALL.ping_interval_s)
        assert relay.tick(clock())
        relay.receive(frames.encode_ping(FrameType.PONG, b"x"), clock())  # any frame is life
        assert relay.silent_for(clock()) == 0
    relay.events()
    clock.advance(SMALL.silence_limit_s * 0.9)
    assert relay.tick(clock()) and not relay.has_events
    clock.advance(SMALL.silence_limit_s * 0.2)
    assert not relay.tick(clock())
    events = relay.events()
    assert len(events) == 1 and isinstance(events[0], KeepaliveMissed)
    assert events[0].silent_s > SMALL.silence_limit_s
    assert not relay.tick(clock()) and not relay.has_events  # a verdict comes once


def test_a_write_stalled_for_the_silence_limit_is_a_peer_not_reading() -> None:
    clock = FakeClock()
    relay = mux(Role.RELAY, clock=clock)
    stream = relay.open_stream(Open("http"))
    relay.next_frame()
    relay.write_began(clock())  # handed to the socket and never finished
    clock.advance(SMALL.silence_limit_s * 0.9)
    relay.receive(frames.encode_ping(FrameType.PING, b"y"), clock())  # it still sends
    assert relay.tick(clock())
    clock.advance(SMALL.silence_limit_s * 0.2)
    relay.receive(frames.encode_ping(FrameType.PING, b"z"), clock())
    assert not relay.tick(clock())
    events = relay.events()
    assert len(events) == 1 and isinstance(events[0], PeerNotReading)
    assert events[0].reason == "no write completed for the keepalive limit"
    assert stream.end is not None and stream.end.code == 4410 and stream.end.tunnel_lost


def test_writes_that_complete_keep_the_stall_clock_at_zero() -> None:
    clock = FakeClock()
    relay = mux(Role.RELAY, clock=clock)
    for _ in range(20):
        relay.receive(frames.encode_ping(FrameType.PING, b"p"), clock())
        relay.write_began(clock())
        clock.advance(1.0)  # slow but moving
        relay.write_ended(clock())
        assert relay.tick(clock())
    assert not relay.has_events


# -- what a peer can make us queue ----------------------------------------------------------------


def test_a_ping_flood_queues_one_pong_answering_the_latest_ping() -> None:
    relay = mux(Role.RELAY)
    for n in range(10_000):
        relay.receive(frames.encode_ping(FrameType.PING, b"%05d" % n + b"x" * 1000), 0)
    assert relay.outbox_bytes < 2 * 1024 and relay.pings_coalesced == 9_999
    pongs = sent(relay.data_to_send(), FrameType.PONG)
    assert len(pongs) == 1 and pongs[0].payload.startswith(b"09999")
    assert relay.outbox_bytes == 0


def test_control_replies_past_the_bound_cut_the_peer_off() -> None:
    settings = replace(SMALL, max_outbox=min_outbox_bound(SMALL.max_frame))
    relay = mux(Role.RELAY, settings)
    head = Open("http", path="/" + "p" * 60_000)
    for _ in range(settings.outbox_bound // 60_000 + 2):
        stream = relay.open_stream(head)
        relay.close_stream(stream)
        if relay.has_events:
            break
    events = relay.events()
    assert len(events) == 1 and isinstance(events[0], PeerNotReading)
    assert events[0].reason == "outgoing queue over its bound"
    assert events[0].queued_bytes > settings.outbox_bound
    assert not relay.alive and relay.outbox_bytes == 0 and not relay.has_output


def test_the_outbox_bound_never_undercuts_honest_traffic() -> None:
    assert SessionSettings(max_frame=1 << 20, max_outbox=1).outbox_bound >= (
        OUTBOX_HIGH_WATER + 2 * (1 << 20))


def test_a_ping_flood_beyond_the_budget_ends_the_tunnel_1008() -> None:
    clock = FakeClock()
    relay = mux(Role.RELAY, replace(SMALL, max_pings_per_s=8), clock=clock)
    stream = relay.open_stream(Open("http"))
    for _ in range(16):  # the burst passes
        relay.receive(frames.encode_ping(FrameType.PING, b"p"), clock())
    assert not relay.has_events
    relay.receive(frames.encode_ping(FrameType.PING, b"p"), clock())
    assert relay.events() == [ControlFlood("PING")]
    assert stream.end == StreamEnd(1008, "too many PING frames", tunnel_lost=True)
    relay.receive(frames.encode_ping(FrameType.PING, b"p"), clock())  # not even decoded
    assert not relay.has_events and not relay.has_output


def test_honest_pings_stay_within_the_budget() -> None:
    clock = FakeClock()
    relay = mux(Role.RELAY, replace(SMALL, max_pings_per_s=8), clock=clock)
    for _ in range(1000):
        clock.advance(0.2)
        relay.receive(frames.encode_ping(FrameType.PING, b"p"), clock())
    assert relay.alive and not relay.has_events


# -- pure -----------------------------------------------------------------------------------------


def test_the_mux_reads_no_clock_randomness_or_loop() -> None:
    path = Path(__file__).resolve().parent.parent / "relay" / "protocol" / "mux.py"
    tree = ast.parse(path.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"time", "os", "random", "asyncio", "secrets", "datetime"}
