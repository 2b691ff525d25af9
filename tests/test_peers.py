"""Relay-to-relay signatures: what is signed cannot be forged, altered, replayed or aged."""

from __future__ import annotations

import pytest

from relay.errors import PeerRejected
from relay.server.peers import H_HOPS, H_SIGNATURE, H_SUBJECT, PeerSigner
from tests.clock import FakeClock

SECRET = "a-long-enough-shared-secret"


def test_signed_request_verifies_once_with_its_claims() -> None:
    clock = FakeClock(1_000_000.0)
    sender, receiver = PeerSigner(SECRET, "a", clock=clock), PeerSigner(SECRET, "b", clock=clock)
    headers = sender.sign("GET", "/hosts/acme:pc/x?y=1", "acme:pc", "alice", "203.0.113.5")
    claims = receiver.verify("GET", "/hosts/acme:pc/x?y=1", "acme:pc", headers)
    assert (claims.origin, claims.subject, claims.client_ip) == ("a", "alice", "203.0.113.5")
    with pytest.raises(PeerRejected, match="replayed"):
        receiver.verify("GET", "/hosts/acme:pc/x?y=1", "acme:pc", headers)


@pytest.mark.parametrize("change", ["method", "target", "host", "subject", "hops", "signature"])
def test_any_altered_field_fails_verification(change: str) -> None:
    clock = FakeClock(1_000_000.0)
    sender, receiver = PeerSigner(SECRET, "a", clock=clock), PeerSigner(SECRET, "b", clock=clock)
    headers = sender.sign("POST", "/hosts/acme:pc/x", "acme:pc", "alice", "203.0.113.5")
    method, target, host = "POST", "/hosts/acme:pc/x", "acme:pc"
    if change == "method":
        method = "DELETE"
    elif change == "target":
        target = "/hosts/acme:pc/admin"
    elif change == "host":
        host = "acme:other"
    elif change == "subject":
        headers[H_SUBJECT] = "mallory"
    elif change == "hops":
        headers[H_HOPS] = "0"
    else:
        headers[H_SIGNATURE] = "0" * 64
    with pytest.raises(PeerRejected):
        receiver.verify(method, target, host, headers)


def test_foreign_secret_is_refused() -> None:
    headers = PeerSigner("some-other-secret-value", "x").sign("GET", "/hosts/a:b/", "a:b", "", "")
    with pytest.raises(PeerRejected):
        PeerSigner(SECRET, "b").verify("GET", "/hosts/a:b/", "a:b", headers)


def test_stale_and_future_timestamps_are_refused() -> None:
    clock = FakeClock(1_000_000.0)
    sender = PeerSigner(SECRET, "a", clock=clock)
    receiver = PeerSigner(SECRET, "b", clock=clock, max_skew_s=30)
    old = sender.sign("GET", "/hosts/a:b/", "a:b", "", "")
    clock.now += 31
    with pytest.raises(PeerRejected, match="stale"):
        receiver.verify("GET", "/hosts/a:b/", "a:b", old)
    clock.now -= 62
    with pytest.raises(PeerRejected, match="stale"):
        receiver.verify("GET", "/hosts/a:b/", "a:b", old)


def test_missing_headers_are_refused_not_crashing() -> None:
    with pytest.raises(PeerRejected):
        PeerSigner(SECRET, "b").verify("GET", "/hosts/a:b/", "a:b", {H_SIGNATURE: "x"})


def test_replay_cache_is_bounded_and_forgets_only_expired_nonces() -> None:
    clock = FakeClock(1_000_000.0)
    sender = PeerSigner(SECRET, "a", clock=clock)
    receiver = PeerSigner(SECRET, "b", clock=clock, max_skew_s=10, max_nonces=50)
    for _ in range(200):
        headers = sender.sign("GET", "/hosts/a:b/", "a:b", "", "")
        receiver.verify("GET", "/hosts/a:b/", "a:b", headers)
    assert len(receiver._seen) <= 50
    recent = sender.sign("GET", "/hosts/a:b/", "a:b", "", "")
    receiver.verify("GET", "/hosts/a:b/", "a:b", recent)
    clock.now += 5
    with pytest.raises(PeerRejected, match="replayed"):
        receiver.verify("GET", "/hosts/a:b/", "a:b", recent)
