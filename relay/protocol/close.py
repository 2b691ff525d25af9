"""Close payloads, built one way everywhere: a code we may send and a reason that fits.

A WebSocket close frame's payload is at most 125 bytes: two for the code, so the reason is at
most 123 bytes of UTF-8. Cutting by characters, or by bytes through a multi-byte sequence, makes
a control frame the peer must reject (it answers 1002 and the meaning of the close is lost).
The tunnel's CLOSE frame keeps the same bound, so a reason passes unchanged from a tunnel
stream to a client's WebSocket and back.
"""

from __future__ import annotations

from typing import NamedTuple

from relay.errors import sendable_close_code

MAX_REASON_BYTES = 123


def fit_reason(reason: str, limit: int = MAX_REASON_BYTES) -> str:
    """``reason`` cut to at most ``limit`` UTF-8 bytes, never inside a character."""
    raw = reason.encode("utf-8", errors="replace")
    if len(raw) <= limit:
        return reason
    return raw[:limit].decode("utf-8", errors="ignore")


def reason_bytes(reason: str, limit: int = MAX_REASON_BYTES) -> bytes:
    return fit_reason(reason, limit).encode("utf-8")


class ClosePayload(NamedTuple):
    """What to send: a code RFC 6455 allows on the wire and a reason that fits with it."""

    code: int
    reason: str

    @property
    def reason_bytes(self) -> bytes:
        return self.reason.encode("utf-8")


def close_payload(code: int | None, reason: str = "") -> ClosePayload:
    """The close to send for ``code``/``reason`` seen or chosen locally.

    1005/1006/1015 (and codes outside the ranges a peer may send) become 1011: forwarding
    them as 1000 would tell a client the exit was clean and stop it reconnecting.
    """
    return ClosePayload(sendable_close_code(code), fit_reason(reason))
