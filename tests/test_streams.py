"""Stream states and flow-control windows: the pure rules both ends of a tunnel follow."""

from __future__ import annotations

import itertools

import pytest

from relay.errors import ProtocolViolation
from relay.protocol.frames import MAX_WINDOW
from relay.protocol.streams import (
    CAN_RECEIVE,
    CAN_SEND,
    TRANSITIONS,
    RecvWindow,
    SendWindow,
    StreamEvent,
    StreamState,
    transition,
)

S, E = StreamState, StreamEvent

ALLOWED = {
    (S.OPEN, E.SEND_FIN): S.LOCAL_DONE,
    (S.OPEN, E.RECV_FIN): S.REMOTE_DONE,
    (S.LOCAL_DONE, E.RECV_FIN): S.CLOSED,
    (S.REMOTE_DONE, E.SEND_FIN): S.CLOSED,
    (S.OPEN, E.SEND_CLOSE): S.CLOSED,
    (S.OPEN, E.RECV_CLOSE): S.CLOSED,
    (S.LOCAL_DONE, E.SEND_CLOSE): S.CLOSED,
    (S.LOCAL_DONE, E.RECV_CLOSE): S.CLOSED,
    (S.REMOTE_DONE, E.SEND_CLOSE): S.CLOSED,
    (S.REMOTE_DONE, E.RECV_CLOSE): S.CLOSED,
    (S.CLOSED, E.SEND_CLOSE): S.CLOSED,
    (S.CLOSED, E.RECV_CLOSE): S.CLOSED,
}
DISALLOWED = sorted(
    set(itertools.product(StreamState, StreamEvent)) - set(ALLOWED),
    key=lambda pair: (pair[0].value, pair[1].value),
)


def _id(pair: tuple[StreamState, StreamEvent]) -> str:
    return f"{pair[0].value}+{pair[1].value}"


# -- transitions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", sorted(ALLOWED, key=_id), ids=_id)
def test_allowed_transition_reaches_its_state(pair: tuple[StreamState, StreamEvent]) -> None:
    assert transition(*pair) is ALLOWED[pair]


@pytest.mark.parametrize("pair", DISALLOWED, ids=_id)
def test_disallowed_transition_is_a_protocol_violation(
    pair: tuple[StreamState, StreamEvent]
) -> None:
    with pytest.raises(ProtocolViolation, match="not allowed"):
        transition(*pair)


def test_the_table_holds_exactly_the_allowed_transitions() -> None:
    assert TRANSITIONS == ALLOWED
    assert DISALLOWED == [
        (S.CLOSED, E.RECV_FIN), (S.CLOSED, E.SEND_FIN),
        (S.LOCAL_DONE, E.SEND_FIN), (S.REMOTE_DONE, E.RECV_FIN),
    ]


def test_both_fins_in_either_order_close_the_stream() -> None:
    assert transition(transition(S.OPEN, E.SEND_FIN), E.RECV_FIN) is S.CLOSED
    assert transition(transition(S.OPEN, E.RECV_FIN), E.SEND_FIN) is S.CLOSED


def test_which_states_may_send_and_receive() -> None:
    assert set(CAN_SEND) == {S.OPEN, S.REMOTE_DONE}
    assert set(CAN_RECEIVE) == {S.OPEN, S.LOCAL_DONE}


# -- send window ----------------------------------------------------------------------------------


def test_send_window_spends_down_to_zero() -> None:
    window = SendWindow(100)
    window.spend(60)
    window.spend(40)
    assert window.credit == 0


def test_spending_more_than_the_credit_is_refused() -> None:
    window = SendWindow(100)
    window.spend(99)
    with pytest.raises(ValueError, match="only 1 of credit"):
        window.spend(2)
    assert window.credit == 1  # a refused spend changes nothing


def test_grant_restores_credit() -> None:
    window = SendWindow(100)
    window.spend(100)
    window.grant(50)
    assert window.credit == 50


def test_grant_up_to_the_maximum_window_is_fine_and_beyond_is_a_violation() -> None:
    window = SendWindow(100)
    window.grant(MAX_WINDOW - 100)
    assert window.credit == MAX_WINDOW
    with pytest.raises(ProtocolViolation, match="beyond the maximum"):
        window.grant(1)
    assert window.credit == MAX_WINDOW


# -- receive window -------------------------------------------------------------------------------


def test_peer_may_send_exactly_one_window_without_a_grant() -> None:
    window = RecvWindow(1000)
    window.receive(600)
    window.receive(400)
    assert window.available == 0
    with pytest.raises(ProtocolViolation, match="only 0 of credit"):
        window.receive(1)


def test_peer_exceeding_its_credit_is_a_protocol_violation() -> None:
    window = RecvWindow(1000)
    with pytest.raises(ProtocolViolation, match="1001 bytes with only 1000"):
        window.receive(1001)


def test_window_updates_are_batched_until_half_a_window_is_consumed() -> None:
    window = RecvWindow(1000)
    window.receive(1000)
    assert window.consume(100) == 0
    assert window.consume(399) == 0
    assert window.available == 0
    assert window.consume(1) == 500  # half the window: grant it all back at once
    assert window.available == 500
    assert window.pending == 0


def test_many_small_consumptions_cost_one_update_per_half_window() -> None:
    window = RecvWindow(1024)
    updates = []
    for _ in range(8):
        window.receive(128)
        updates.append(window.consume(128))
    assert updates == [0, 0, 0, 512, 0, 0, 0, 512]
    assert window.available == 1024


def test_credit_after_grants_lets_the_peer_send_more() -> None:
    window = RecvWindow(1000)
    window.receive(1000)
    window.consume(1000)
    window.receive(1000)
    with pytest.raises(ProtocolViolation):
        window.receive(1)


def test_send_and_recv_windows_agree_over_a_long_exchange() -> None:
    """Sender and receiver driven in lockstep never disagree about the credit."""
    size = 4096
    send, recv = SendWindow(size), RecvWindow(size)
    buffered = 0
    for step in range(2000):
        chunk = min(send.credit, 1 + (step * 37) % 700)
        if chunk:
            send.spend(chunk)
            recv.receive(chunk)
            buffered += chunk
        assert buffered <= size
        assert send.credit == recv.available
        drained = min(buffered, (step * 53) % 900)
        buffered -= drained
        increment = recv.consume(drained) if drained else 0
        if increment:
            send.grant(increment)
        assert send.credit == recv.available
        assert recv.buffered_limit == size
