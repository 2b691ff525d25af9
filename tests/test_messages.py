"""Typed tunnel messages: validated once at decode; a bad one is the peer's protocol violation."""

from __future__ import annotations

import json

import pytest

from relay.errors import ProtocolViolation
from relay.protocol import defaults
from relay.protocol.messages import Drain, Head, Hello, Open, Renew, Renewed


def j(body: object) -> bytes:
    return json.dumps(body).encode()


@pytest.mark.parametrize("body", [
    {"status": "abc"}, {"status": 99}, {"status": 101}, {"status": 600}, {"status": True},
    {"status": 200.5}, {"headers": [["A", "1"]]}, {"status": 200, "headers": 5},
    {"status": 200, "headers": [["A"]]}, {"status": 200, "headers": [["A", 1]]},
    {"status": 200, "headers": [["X-A", "1\r\nSet-Cookie: evil=1"]]},
    {"status": 200, "headers": [["X A", "1"]]}, {"status": 200, "headers": [["X-A", "a\x00"]]},
    {"status": 200, "reason": "OK\r\nX: y"}, {"status": 200, "reason": 5},
    [200], "200",
])
def test_a_malformed_http_head_is_a_violation(body: object) -> None:
    with pytest.raises(ProtocolViolation):
        Head.decode(j(body))


GOOD = [["X-A", "1"], ["Content-Type", "text/html; charset=utf-8"], ["x!#$%&'*+.^_`|~9", ""]]


@pytest.mark.parametrize(("bad", "says"), [
    ("not a pair", "string pairs"), ({"X-B": "2"}, "string pairs"), (["X-B"], "string pairs"),
    (["X-B", "2", "3"], "string pairs"), (["X-B", 2], "string pairs"),
    ([2, "X-B"], "string pairs"), (["X B", "2"], "not a token"), (["", "2"], "not a token"),
    (["X-B\n", "2"], "not a token"), (["\nX-B", "2"], "not a token"),
    (["X-B\r", "2"], "not a token"), (["X-B", "2\n"], "CR, LF or NUL"),
    (["X-B", "\r"], "CR, LF or NUL"), (["X-B", "a\x00b"], "CR, LF or NUL"),
])
@pytest.mark.parametrize("at", [0, 1, 3])
def test_a_bad_header_pair_anywhere_in_the_list_is_named(bad: object, says: str,
                                                          at: int) -> None:
    """Whichever pair breaks the list, the violation names what is wrong. A name with a
    trailing newline is not a token (``^...$`` matched before it: fails before)."""
    headers = [*GOOD[:at], bad, *GOOD[at:]]
    with pytest.raises(ProtocolViolation, match=says):
        Head.decode(j({"status": 200, "headers": headers}))
    with pytest.raises(ProtocolViolation, match=says):
        Open.decode(j({"kind": "http", "headers": headers}))


def test_good_headers_decode_in_order_as_tuples() -> None:
    head = Head.decode(j({"status": 200, "headers": [*GOOD, ["X-A", "again"]]}))
    assert head.headers == (*(tuple(pair) for pair in GOOD), ("X-A", "again"))
    assert Head.decode(j({"status": 200, "headers": []})).headers == ()


def test_a_good_head_decodes_and_round_trips() -> None:
    head = Head.decode(j({"status": 200.0, "reason": "OK", "headers": [["X-A", "1"]],
                          "future": {"ignored": True}}))
    assert head == Head(200, "OK", (("X-A", "1"),))
    assert Head.decode(head.encode()) == head


def test_websocket_heads_accept_101_and_refusals() -> None:
    assert Head.decode(j({"status": 101, "protocol": "chat"}), "ws").protocol == "chat"
    assert Head.decode(j({"status": 101, "protocol": None}), "ws").protocol is None
    assert Head.decode(j({"status": 404}), "ws").status == 404
    with pytest.raises(ProtocolViolation):
        Head.decode(j({"status": 102}), "ws")
    with pytest.raises(ProtocolViolation):
        Head.decode(j({"status": 101, "protocol": 5}), "ws")


def test_hello_defaults_fill_what_is_missing_and_integral_floats_pass() -> None:
    hello = Hello.decode(j({"version": 1.0, "window": 131072.0}))
    assert hello.version == 1 and hello.window == 131072
    assert hello.max_frame == defaults.MAX_FRAME and hello.max_streams == defaults.MAX_STREAMS
    assert hello.ping_interval_s == defaults.PING_INTERVAL_S
    assert hello.max_ws_message == defaults.MAX_WS_MESSAGE
    assert Hello.decode(b"{}").version == defaults.VERSION


@pytest.mark.parametrize("body", [
    {"window": 1.5}, {"window": "1"}, {"window": 0}, {"maxFrame": True},
    {"pingIntervalS": 0}, {"pingIntervalS": "10"}, {"renew": "yes"}, {"expiresAt": "soon"},
    {"openTimeoutS": -1},
])
def test_a_malformed_hello_is_a_violation(body: dict[str, object]) -> None:
    with pytest.raises(ProtocolViolation):
        Hello.decode(j(body))


def test_hello_goes_out_with_plain_integers() -> None:
    raw = json.loads(Hello(version=2, host_id="acme:a", renew=True, expires_at=1796198990.0,
                           open_timeout_s=10.0, request_timeout_s=2.5).encode())
    assert raw["pingIntervalS"] == 10 and isinstance(raw["pingIntervalS"], int)
    assert raw["expiresAt"] == 1796198990 and isinstance(raw["expiresAt"], int)
    assert raw["requestTimeoutS"] == 2.5 and raw["maxWsMessage"] == defaults.MAX_WS_MESSAGE
    assert Hello.decode(json.dumps(raw).encode()).expires_at == 1796198990


@pytest.mark.parametrize("body", [
    {"kind": "ftp"}, {}, {"kind": "http", "method": "GE T"}, {"kind": "http", "path": "x"},
    {"kind": "http", "path": "/a b"}, {"kind": "http", "path": "/a\r\n"},
    {"kind": "http", "query": "a=1#frag"}, {"kind": "ws", "protocols": "chat"},
    {"kind": "http", "headers": [["Host", "a\nb"]]}, {"kind": "http", "method": "GET\n"},
])
def test_a_malformed_open_is_a_violation(body: dict[str, object]) -> None:
    with pytest.raises(ProtocolViolation):
        Open.decode(j(body))


def test_open_round_trips() -> None:
    ws = Open("ws", path="/socket", query="a=1", headers=(("X-F", "1"),), protocols=("chat",))
    assert Open.decode(ws.encode()) == ws
    http = Open("http", method="POST", path="/up%20x")
    assert Open.decode(http.encode()) == http
    assert "protocols" not in json.loads(http.encode())


def test_drain_renew_and_renewed() -> None:
    assert Drain.decode(Drain("deploy", 0).encode()) == Drain("deploy", 0.0)
    assert Drain.decode(b"{}").reconnect_after_s == 0
    with pytest.raises(ProtocolViolation):
        Drain.decode(j({"reconnectAfterS": -1}))
    assert Renew.decode(Renew("tok").encode()).token == "tok"
    for bad in ({}, {"token": ""}, {"token": 5}):
        with pytest.raises(ProtocolViolation):
            Renew.decode(j(bad))
    assert Renewed.decode(j({"expiresAt": 5})).expires_at == 5
    deferred = Renewed.decode(j({"error": {"code": "access_unavailable", "message": "x"},
                                 "retryAfterS": 2}))
    assert deferred.expires_at is None and deferred.retry_after_s == 2
    assert Renewed.decode(deferred.encode()) == deferred
    with pytest.raises(ProtocolViolation):
        Renewed.decode(b"{}")


def test_a_header_pair_seen_before_is_still_checked_for_its_exact_text() -> None:
    good = j({"status": 200, "headers": [["X-A", "1"], ["Content-Type", "text/plain"]]})
    assert Head.decode(good) == Head.decode(good)  # the second decode is served by the cache
    # The same name with a bad value, and a look-alike name, are refused after the good pair.
    for bad in ([["X-A", "1\r\nX: y"]], [["X-A ", "1"]], [["X-A", 1]], [("X-A", "1", "2")]):
        with pytest.raises(ProtocolViolation):
            Head.decode(j({"status": 200, "headers": bad}))
    assert Head.decode(good).headers == (("X-A", "1"), ("Content-Type", "text/plain"))


def test_the_validated_pair_cache_stays_bounded() -> None:
    from relay.protocol import messages

    for index in range(messages._VALID_MAX + 10):
        Head.decode(j({"status": 200, "headers": [["X-N", str(index)]]}))
    big = "v" * messages._VALID_MAX_CHARS
    Head.decode(j({"status": 200, "headers": [["X-Big", big]]}))
    assert len(messages._VALID_PAIRS) <= messages._VALID_MAX
    assert ("X-Big", big) not in messages._VALID_PAIRS


@pytest.mark.parametrize("payload", [
    b'{"status":200}', b'{"status":200}  \r\n\t', b'{"status":200} x', b'{"status":200}{}',
    b'{"status":', b"{", b"{}", b'{"status":200,"reason":"\xff"}', b' {"status":200}',
    b'{"status":200}\x00', b'{"status":200}\xc2\xa0', b'{"status":NaN}', b"[200]",
    '{"status":200,"reason":"\u00e9"}'.encode(), b'\xef\xbb\xbf{"status":200}',
    '{"status":200}'.encode("utf-16"), '{"status":200}'.encode("utf-16-le"),
    '{"status":200}'.encode("utf-32"), b'{"status":200,"reason":"\xed\xa0\x80"}',
])
def test_frames_decode_exactly_as_json_loads_reads_them(payload: bytes) -> None:
    from relay.protocol.messages import _loads

    try:
        expected: object = json.loads(payload)
    except ValueError:  # UnicodeDecodeError included
        with pytest.raises(ValueError):
            _loads(payload)
        return
    got = _loads(payload)
    assert repr(got) == repr(expected)  # repr: NaN != NaN


@pytest.mark.parametrize("head", [
    Open(kind="http"),
    Open(kind="http", method="POST", path="/a\"b\\c", query="x=\u00e9&y=%20",
         headers=(("Host", "h:1"), ("X-U", "\u2028\x01\u00ff"), ("Cookie", ""))),
    Open(kind="ws", path="/ws", protocols=("chat", "v2.\u00e9")),
    Open(kind="ws"),
])
def test_open_encodes_to_the_json_text_of_its_fields(head: Open) -> None:
    body: dict[str, object] = {"kind": head.kind, "method": head.method, "path": head.path,
                               "query": head.query, "headers": [list(h) for h in head.headers]}
    if head.kind == "ws":
        body["protocols"] = list(head.protocols)
    assert head.encode() == json.dumps(body, separators=(",", ":")).encode()
    assert Open.decode(head.encode()) == head
