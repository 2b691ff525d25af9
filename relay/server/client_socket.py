"""A client's WebSocket on a ``/hosts/<id>/...`` channel once the relay took it over from aiohttp.

Served by aiohttp, every message a client sent went through its parser, its reader queue, a
future, and a wake-up of the task reading the socket before it could go down the tunnel (bench
W3). After the host accepted the channel, :func:`take_over_client` writes the ``101`` itself and
moves the transport to a :class:`ClientSocket`: frames are parsed as they arrive and each whole
message goes to the socket's owner (the channel's bridge, :mod:`relay.server.ws_channel`)
synchronously, from the read.

It is a :class:`relay.tunnel.tunnel_socket.TunnelSocket` (the same RFC 6455 server-side parser
and close handshake, tests/test_tunnel_socket.py) with what a client's socket needs besides:

- text messages are passed on (with their type), not refused; their bytes are not decoded
  (as before: aiohttp ran with ``decode_text=False``; the host's WebSocket judges them);
- a message over ``tunnel.max_ws_message_bytes`` is 1009 with a reason naming the limit,
  refused from its frame header (the payload is never buffered); an unmasked frame and other
  framing RFC 6455 forbids are 1002;
- the client's CLOSE code and reason are kept for the host (an empty CLOSE is 1005, a reason
  that is not UTF-8 is passed on with replacement characters);
- messages are written whole (one FIN frame each, text or binary, unmasked);
  ``pause_writing`` makes :meth:`ClientSocket.try_message` answer False, so a client that does
  not read holds the channel's credit rather than the relay's memory;
- :meth:`~relay.tunnel.tunnel_socket.TunnelSocket.hold` stops reading while the channel has no
  credit for the client's next message (at most one read waits, unparsed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from aiohttp import web

from relay.errors import CloseCode
from relay.server.httpedge import EdgeProtocol
from relay.tunnel.sink import JOIN_BELOW, message_header
from relay.tunnel.tunnel_socket import SocketOwner, TunnelSocket, switching_protocols

_TEXT_FIN = 0x81
_BINARY_FIN = 0x82


class ClientOwner(SocketOwner, Protocol):
    """Who a client's socket reports to (the channel's bridge)."""

    def message(self, data: bytes, text: bool) -> None:
        """One whole message from the client."""


class ClientSocket(TunnelSocket):
    """One client WebSocket, server side, on a transport taken from aiohttp."""

    __slots__ = ("_too_big", "peer_reason", "refused_with")

    owner: ClientOwner

    def __init__(self, transport: asyncio.Transport, owner: ClientOwner, *,
                 max_message_bytes: int) -> None:
        # The parser refuses a message that *reaches* its bound; the limit is the largest that
        # passes.
        super().__init__(transport, owner, max_message=max_message_bytes + 1)
        self._too_big = f"message too big: the limit is {max_message_bytes} bytes".encode()
        self.peer_reason = ""  # the reason of the client's CLOSE (close_code: its code)
        self.refused_with: int | None = None  # the code of our CLOSE for framing we refused

    # -- reading --------------------------------------------------------------------------------
    def _message(self, message: bytes, text: bool) -> None:
        self.owner.message(message, text)

    def _close_received(self, payload: bytes | bytearray) -> None:
        if len(payload) > 2:
            self.peer_reason = bytes(payload[2:]).decode("utf-8", errors="replace")
        # Validates the code (close_code: 1005 for none), answers 1000, ends reading.
        super()._close_received(payload)

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
        head = message_header(len(data), 0, _TEXT_FIN if text else _BINARY_FIN)
        if len(data) < JOIN_BELOW:
            self.transport.write(head + data)
        else:
            self.transport.writelines((head, data))


def take_over_client(request: web.Request, owner: ClientOwner, protocol: str | None, *,
                     max_message_bytes: int, start: Callable[[ClientSocket], None],
                     ) -> ClientSocket:
    """Answer the client's upgrade with our own ``101`` (``protocol`` as the subprotocol) and
    move its connection to a :class:`ClientSocket` reporting to ``owner``; ``start`` sets the
    owner up on it before the first frame is parsed. The handshake must have been checked
    (``WebSocketResponse.can_prepare``). Raises ConnectionResetError, with nothing written,
    when the client already left or the connection is not the relay's edge."""
    edge = request.protocol
    if not isinstance(edge, EdgeProtocol):
        raise ConnectionResetError("a taken-over WebSocket needs the relay's connection edge")
    key = request.headers["Sec-WebSocket-Key"]
    transport, tail = edge.detach()
    transport.write(switching_protocols(key, protocol))
    socket = ClientSocket(transport, owner, max_message_bytes=max_message_bytes)
    transport.set_protocol(socket)
    start(socket)
    if tail:
        socket.data_received(tail)
    return socket
