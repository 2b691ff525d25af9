"""Splice two tunnel channels: a stream that arrived on one session, answered by a stream on
another (the owner relay answers a peer link's stream from its own tunnel to the host).

Bytes are copied with credit both ways: a chunk is taken from one channel (its credit given
back) only once the other accepted it, so neither end holds more than a window per stream and
a slow reader on either side holds the other back, as on a single tunnel. Every CLOSE is
carried across with its code.
"""

from __future__ import annotations

from collections.abc import Callable

from relay.errors import CloseCode, ProtocolViolation
from relay.protocol.messages import Head
from relay.protocol.streams import StreamKind
from relay.tunnel.session import Channel, ChannelClosed, TunnelSession

# The code and reason to close the other channel with when ``closed``'s session went away.
LostCode = Callable[[ChannelClosed], tuple[int, str]]


class SplicedChannel(Channel):
    """A channel whose end (its peer's CLOSE, or its session lost) closes its partner at once,
    even while nothing reads it (the host has not answered yet, the request had no body)."""

    __slots__ = ("lost_code", "partner", "sent_status")

    def __init__(self, session: TunnelSession, stream_id: int, kind: StreamKind, window: int,
                 awaits_head: bool) -> None:
        super().__init__(session, stream_id, kind, window, awaits_head)
        self.partner: Channel | None = None
        self.lost_code: LostCode = _going_away
        self.sent_status: int | None = None  # the HEAD this side answered with

    def send_head(self, head: Head) -> None:
        super().send_head(head)
        self.sent_status = head.status

    def _on_end(self) -> None:
        super()._on_end()
        partner, end = self.partner, self.end
        if partner is not None and end is not None and not partner.closed:
            if end.tunnel_lost:
                partner.close(*self.lost_code(ChannelClosed(end.code, end.reason,
                                                            tunnel_lost=True)))
            else:
                partner.close(end.code, end.reason)


class SplicingSession(TunnelSession):
    """A session whose channels are :class:`SplicedChannel`: each can be given a partner."""

    def _new_channel(self, stream_id: int, kind: StreamKind, window: int,
                     awaits_head: bool) -> Channel:
        return SplicedChannel(self, stream_id, kind, window, awaits_head)


def _going_away(_: ChannelClosed) -> tuple[int, str]:
    return int(CloseCode.GOING_AWAY), "client went away"


def carry(closed: ChannelClosed, dst: Channel, lost: LostCode) -> None:
    """``closed`` ended the source: end ``dst`` the same way."""
    if closed.tunnel_lost:
        dst.close(*lost(closed))
    else:
        dst.close(closed.code, closed.reason)


async def copy_body(src: Channel, dst: Channel, lost: LostCode) -> None:
    """HTTP body bytes ``src`` → ``dst`` until ``src``'s FIN (then ``dst``'s), or an end."""
    while True:
        try:
            chunk = await src.read()
        except ChannelClosed as closed:
            carry(closed, dst, lost)
            return
        try:
            if chunk is None:
                await dst.finish()
                return
            await dst.write(chunk.data)
        except ChannelClosed:
            return  # dst ended: whoever waits on it reports why
        src.consumed(len(chunk.data))


async def copy_messages(src: Channel, dst: Channel, lost: LostCode) -> None:
    """WebSocket messages ``src`` → ``dst`` (fragments joined, bounded) until either ends."""
    while True:
        try:
            message = await src.read_message()
        except ChannelClosed as closed:
            carry(closed, dst, lost)
            return
        except ProtocolViolation as violation:
            src.close(int(CloseCode.INTERNAL_ERROR), violation.message)
            dst.close(int(CloseCode.INTERNAL_ERROR), "bad message on the tunnel")
            return
        if message is None:
            dst.close(int(CloseCode.NORMAL), "")
            return
        data, text = message
        try:
            await dst.write(data, text=text, message=True)
        except ChannelClosed:
            return
