"""Relay-to-relay authentication: HMAC-signed, timestamped, single-use forwarding headers.

A relay that forwards a request to the tunnel's owner signs what it vouches for (method, path,
host, the caller's subject and address, a timestamp and a nonce) with the shared
``directory.peer_secret``. The owner accepts the request without re-checking the client's token
only if the signature matches, the timestamp is fresh and the nonce was not seen before, so a
captured header set can be neither forged, altered nor replayed. Pure: clock injected.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from relay.errors import PeerRejected

H_SIGNATURE = "X-Relay-Signature"
H_TIMESTAMP = "X-Relay-Timestamp"
H_NONCE = "X-Relay-Nonce"
H_ORIGIN = "X-Relay-Origin"  # instance id of the relay that forwarded
H_SUBJECT = "X-Relay-Subject"
H_CLIENT_IP = "X-Relay-Client-Ip"
H_HOPS = "X-Relay-Hops"  # the loop guard: a forwarded request is never forwarded again
PEER_HEADERS = (H_SIGNATURE, H_TIMESTAMP, H_NONCE, H_ORIGIN, H_SUBJECT, H_CLIENT_IP, H_HOPS)


@dataclass(frozen=True, slots=True)
class PeerClaims:
    origin: str
    subject: str
    client_ip: str


def _message(method: str, target: str, host_id: str, timestamp: str, nonce: str, origin: str,
             subject: str, client_ip: str, hops: str) -> bytes:
    return "\n".join(
        ("relay-peer-v1", method.upper(), target, host_id, timestamp, nonce, origin, subject,
         client_ip, hops)
    ).encode()


class PeerSigner:
    """Signs outgoing forwards and verifies incoming ones, with a bounded replay cache."""

    def __init__(self, secret: str, instance_id: str, *, max_skew_s: float = 30.0,
                 clock: Callable[[], float] = time.time, max_nonces: int = 100_000) -> None:
        self._key = secret.encode()
        self.instance_id = instance_id
        self.max_skew_s = max_skew_s
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._max_nonces = max_nonces

    def sign(self, method: str, target: str, host_id: str, subject: str,
             client_ip: str) -> dict[str, str]:
        timestamp = f"{self._clock():.3f}"
        nonce = secrets.token_hex(16)
        hops = "1"
        mac = hmac.new(self._key, _message(method, target, host_id, timestamp, nonce,
                                           self.instance_id, subject, client_ip, hops),
                       hashlib.sha256).hexdigest()
        return {
            H_SIGNATURE: mac, H_TIMESTAMP: timestamp, H_NONCE: nonce, H_ORIGIN: self.instance_id,
            H_SUBJECT: subject, H_CLIENT_IP: client_ip, H_HOPS: hops,
        }

    def verify(self, method: str, target: str, host_id: str,
               headers: Mapping[str, str]) -> PeerClaims:
        """The forwarding relay's claims, or :class:`PeerRejected`."""
        try:
            mac = headers[H_SIGNATURE]
            timestamp = headers[H_TIMESTAMP]
            nonce = headers[H_NONCE]
            origin = headers[H_ORIGIN]
            subject = headers.get(H_SUBJECT, "")
            client_ip = headers.get(H_CLIENT_IP, "")
            hops = headers.get(H_HOPS, "")
        except KeyError:
            raise PeerRejected("incomplete relay-to-relay headers") from None
        try:
            sent_at = float(timestamp)
        except ValueError:
            raise PeerRejected() from None
        now = self._clock()
        if abs(now - sent_at) > self.max_skew_s:
            raise PeerRejected("stale relay-to-relay request")
        expected = hmac.new(self._key, _message(method, target, host_id, timestamp, nonce, origin,
                                                subject, client_ip, hops),
                            hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, mac):
            raise PeerRejected()
        self._expire(now)
        if nonce in self._seen:
            raise PeerRejected("replayed relay-to-relay request")
        self._seen[nonce] = now
        if len(self._seen) > self._max_nonces:
            self._seen.popitem(last=False)
        return PeerClaims(origin=origin, subject=subject, client_ip=client_ip)

    def _expire(self, now: float) -> None:
        # Nonces only need remembering while their timestamp could still pass the skew check.
        horizon = now - 2 * self.max_skew_s
        while self._seen:
            _nonce, seen_at = next(iter(self._seen.items()))
            if seen_at >= horizon:
                break
            self._seen.popitem(last=False)


# -- peer links (relay.server.peerlink, relay.server.peer_answer) ---------------------------------
# The link is authenticated once, at its upgrade, by the signed headers above (method GET, this
# target, no host); its streams are trusted because the link is. Their claims ride in each
# stream's OPEN as these headers, which the owner takes out before the host sees the request
# (a client's own X-Relay-* headers never get that far: request_headers_for_host drops them).
LINK_PATH = "/peer-link"
# How long frames queued on a link after one of its writes may wait for more to join them
# (both ends; a tunnel waits for the next loop iteration however long that takes). A relay
# serving 32 requests in one iteration held 31 of them for the whole iteration, while the
# relay at the other end sat idle, then sent them on as a burst: the hops took turns instead
# of overlapping, and bench W5's non-owner path used about 1.5 of the 2 cores. Written at
# least every millisecond of the relay's CPU time instead, W5 through the non-owner went from
# about 0.6x to about 0.8x of the owner (bench/profile.md). CPU time, not wall time: on a
# machine too busy to run the relay, a wall-clock bound wrote nearly every frame on its own
# and cost both relays a fifth more CPU per request. Not for tunnels: there the relay is the
# one busy process, and more writes would only cost it CPU.
LINK_CORK_S = 0.001
H_HOST = "X-Relay-Host"
H_EXPIRES = "X-Relay-Expires"  # the caller's token expiry (Unix seconds), held by the entry


@dataclass(frozen=True, slots=True)
class StreamClaims:
    host_id: str
    subject: str
    origin: str
    expires_at: float | None


def sign_link(signer: PeerSigner) -> dict[str, str]:
    return signer.sign("GET", LINK_PATH, "", "", "")


def verify_link(signer: PeerSigner, target: str, headers: Mapping[str, str]) -> PeerClaims:
    return signer.verify("GET", target, "", headers)


def stream_claims(signer: PeerSigner, host_id: str, subject: str,
                  expires_at: float) -> tuple[tuple[str, str], ...]:
    claims = [(H_HOST, host_id), (H_SUBJECT, subject), (H_ORIGIN, signer.instance_id),
              (H_HOPS, "1")]
    if math.isfinite(expires_at):
        claims.append((H_EXPIRES, f"{expires_at:.3f}"))
    return tuple(claims)


def split_claims(headers: tuple[tuple[str, str], ...]
                 ) -> tuple[StreamClaims, tuple[tuple[str, str], ...]]:
    """A link stream's claims and the host's headers (every X-Relay-* header taken out)."""
    found: dict[str, str] = {}
    rest = []
    for name, value in headers:
        lower = name.lower()
        if lower.startswith("x-relay-"):
            found[lower] = value
        else:
            rest.append((name, value))
    host_id = found.get(H_HOST.lower(), "")
    if not host_id or found.get(H_HOPS.lower()) != "1":
        raise PeerRejected("a peer link stream without its host or with another hop count")
    expires = found.get(H_EXPIRES.lower())
    try:
        expires_at = float(expires) if expires is not None else None
    except ValueError:
        raise PeerRejected("a peer link stream with a malformed expiry") from None
    return StreamClaims(host_id, found.get(H_SUBJECT.lower(), ""),
                        found.get(H_ORIGIN.lower(), ""), expires_at), tuple(rest)
