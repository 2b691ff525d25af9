"""The WebSocket of one channel, on a raw transport: the client's socket on the relay (taken over
from aiohttp after the host accepted, :func:`relay.server.client_socket.take_over_client`) and,
with ``client=True``, the host service's socket on the agent (dialled by hand,
:func:`relay.tunnel.dial.upgrade`). Either way its owner is the channel's bridge
(:mod:`relay.tunnel.ws_channel`), and each whole message goes to it synchronously, from the read.

It is a :class:`relay.tunnel.tunnel_socket.TunnelSocket` (the same RFC 6455 parser and close
handshake, tests/test_tunnel_socket.py; on the client side the same masking with fresh keys and
refusal of a masked server frame, tests/test_link_dial.py) with what a channel needs besides:

- text messages are passed on (with their type), not refused; their bytes are not decoded
  (as aiohttp ran with ``decode_text=False``; the far end's WebSocket judges them);
- a message over ``max_message_bytes`` is 1009 with a reason naming the limit, refused from its
  frame header (the payload is never buffered); framing RFC 6455 forbids is 1002;
- the peer's CLOSE code and reason are kept for the channel (an empty CLOSE is 1005, a reason
  that is not UTF-8 is passed on with replacement characters);
- messages are written whole (one FIN frame each, text or binary; masked with a fresh key on
  the client side); ``pause_writing`` makes :meth:`ChannelSocket.try_message` answer False, so
  a peer that does not read holds the channel's credit rather than our memory;
- :meth:`~relay.tunnel.tunnel_socket.TunnelSocket.hold` stops reading while the channel has no
  credit for the peer's next message (at most one read waits, unparsed).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from relay.errors import CloseCode
from relay.tunnel.sink import write_messages
from relay.tunnel.tunnel_socket import SocketOwner, TunnelSocket, write_masked

_TEXT_FIN = 0x81
_BINARY_FIN = 0x82


class ChannelOwner(SocketOwner, Protocol):
    """Who a channel's socket reports to (the channel's bridge)."""

    def message(self, data: bytes, text: bool) -> None:
        """One whole message from the peer."""


class ChannelSocket(TunnelSocket):
    """One channel's WebSocket: the server's side by default, the client's with ``client``."""

    __slots__ = ("_too_big", "refused_with")

    owner: ChannelOwner

    def __init__(self, transport: asyncio.Transport, owner: ChannelOwner, *,
                 max_message_bytes: int, client: bool = False) -> None:
        # The parser refuses a message that *reaches* its bound; the limit is the largest that
        # passes.
        super().__init__(transport, owner, max_message=max_message_bytes + 1, client=client)
        self._too_big = f"message too big: the limit is {max_message_bytes} bytes".encode()
        self.refused_with: int | None = None  # the code of our CLOSE for framing we refused

    # -- reading --------------------------------------------------------------------------------
    def _message(self, message: bytes, text: bool) -> None:
        self.owner.message(message, text)

    @property
    def peer_reason(self) -> str:
        """The reason of the peer's CLOSE (``close_code``: its code), as text."""
        return self.close_reason.decode("utf-8", errors="replace")

    def _refuse(self, code: int, message: str, reason: bytes = b"") -> None:
        if code == CloseCode.MESSAGE_TOO_BIG and not reason:
            reason = self._too_big
        self.refused_with = code
        super()._refuse(code, message, reason)

    # -- writing --------------------------------------------------------------------------------
    def try_message(self, data: bytes, text: bool) -> bool:
        """Write one whole message now if the socket takes it at once: open, not closing, not
        full. False: nothing was written (the caller sends it with :meth:`send_message`)."""
        if self._closing or self._paused or self.transport.is_closing():
            return False
        self._write_message(data, text)
        return True

    async def send_message(self, data: bytes, text: bool) -> None:
        """Write one whole message once the socket takes more; raises ConnectionResetError when
        the socket is gone or closing."""
        while self._paused:
            await self.drain()
        self._check_open()
        self._write_message(data, text)

    def _write_message(self, data: bytes, text: bool) -> None:
        first = _TEXT_FIN if text else _BINARY_FIN
        if self._client:
            write_masked(self.transport, (data,), first)
            return
        write_messages(self.transport, (data,), first)
