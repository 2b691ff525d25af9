"""A client's WebSocket on a ``/hosts/<id>/...`` channel, taken over by the relay from aiohttp.

Served by aiohttp, every message a client sent went through its parser, its reader queue, a
future, and a wake-up of the task reading the socket before it could go down the tunnel (bench
W3). After the host accepted the channel, :func:`take_over_client` writes the ``101`` itself and
moves the transport to a :class:`relay.tunnel.channel_socket.ChannelSocket` (server side: the
client's frames must be masked, ours are not): frames are parsed as they arrive and each whole
message goes to the socket's owner (the channel's bridge, :mod:`relay.tunnel.ws_channel`)
synchronously, from the read. The agent serves the host service's end of the channel on the
same socket and bridge, client side.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from relay.server.httpedge import EdgeProtocol
from relay.tunnel.channel_socket import ChannelOwner, ChannelSocket
from relay.tunnel.tunnel_socket import switching_protocols


def take_over_client(request: web.Request, owner: ChannelOwner, protocol: str | None, *,
                     max_message_bytes: int, start: Callable[[ChannelSocket], None],
                     ) -> ChannelSocket:
    """Answer the client's upgrade with our own ``101`` (``protocol`` as the subprotocol) and
    move its connection to a :class:`ChannelSocket` reporting to ``owner``; ``start`` sets the
    owner up on it before the first frame is parsed. The handshake must have been checked
    (``WebSocketResponse.can_prepare``). Raises ConnectionResetError, with nothing written,
    when the client already left or the connection is not the relay's edge."""
    edge = request.protocol
    if not isinstance(edge, EdgeProtocol):
        raise ConnectionResetError("a taken-over WebSocket needs the relay's connection edge")
    key = request.headers["Sec-WebSocket-Key"]
    transport, tail = edge.detach()
    transport.write(switching_protocols(key, protocol))
    socket = ChannelSocket(transport, owner, max_message_bytes=max_message_bytes)
    transport.set_protocol(socket)
    start(socket)
    if tail:
        socket.data_received(tail)
    return socket
