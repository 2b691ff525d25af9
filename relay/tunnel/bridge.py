"""Pump one WebSocket to and from a tunnel channel, carrying close codes across.

Used on both ends: the relay bridges a client's socket, the agent the host service's socket.
aiohttp's server and client WebSocket objects share the methods used here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType

from relay.aio import cancel_and_wait
from relay.errors import CloseCode, ProtocolViolation, sendable_close_code
from relay.protocol.close import reason_bytes
from relay.tunnel.session import Channel, ChannelClosed
from relay.tunnel.sink import WebSocketSink

CLOSE_TIMEOUT_S = 2.0

_SOCKET_ENDED = frozenset({WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR})

LostCode = Callable[[ChannelClosed], tuple[int, str]]


def _count(_: int) -> None:
    return None


async def _close(ws: Any, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(code=code, message=reason_bytes(reason)), CLOSE_TIMEOUT_S)


async def bridge(
    ws: Any,
    channel: Channel,
    *,
    lost_code: LostCode,
    on_outbound: Callable[[int], None] = _count,
    on_inbound: Callable[[int], None] = _count,
) -> None:
    """Run both directions until either side closes.

    ``on_outbound`` counts bytes read from ``ws`` and sent down the channel, ``on_inbound`` the
    reverse. ``lost_code`` picks the close code for ``ws`` when the tunnel itself went away.
    """

    async def socket_to_channel() -> None:
        reason = ""
        code: int | None = None
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                data = msg.data if isinstance(msg.data, bytes) else msg.data.encode()
                await channel.write(data, text=msg.type is WSMsgType.TEXT, message=True)
                on_outbound(len(data))
            elif msg.type is WSMsgType.CLOSE:
                reason = str(msg.extra or "")
                break
            elif msg.type is WSMsgType.ERROR:
                # The socket was failed with a code (1009 for a message over the limit); a
                # close handshake the peer then never completed leaves 1006 in close_code.
                code = getattr(msg.data, "code", None)
                break
            elif msg.type in _SOCKET_ENDED:
                break
        channel.close(sendable_close_code(code if code is not None else ws.close_code), reason)

    direct = WebSocketSink(ws)

    def deliver(data: bytes, text: bool) -> bool:
        # A message that arrives while the socket can take it goes out from the tunnel's read
        # (no wake-up of this direction's task); a full or closing socket takes the waiting way.
        if direct.try_message(data, text):
            on_inbound(len(data))
            return True
        return False

    async def channel_to_socket() -> None:
        try:
            while True:
                message = await channel.read_message(deliver)
                if message is None:
                    await _close(ws, int(CloseCode.NORMAL), "")
                    return
                data, is_text = message
                await ws.send_frame(data, WSMsgType.TEXT if is_text else WSMsgType.BINARY)
                on_inbound(len(data))
        except ChannelClosed as closed:
            if closed.tunnel_lost:
                code, reason = lost_code(closed)
            else:
                code, reason = sendable_close_code(closed.code), closed.reason
            await _close(ws, code, reason)
        except ProtocolViolation as violation:
            channel.close(int(CloseCode.INTERNAL_ERROR), violation.message)
            await _close(ws, int(CloseCode.INTERNAL_ERROR), "bad message on the tunnel")

    up = asyncio.ensure_future(socket_to_channel())
    down = asyncio.ensure_future(channel_to_socket())
    up.set_name(f"ws-up:{channel.session.name}:{channel.id}")
    down.set_name(f"ws-down:{channel.session.name}:{channel.id}")
    try:
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        # Let the other direction finish its close handshake (bounded), then stop it.
        await asyncio.wait({up, down}, timeout=CLOSE_TIMEOUT_S)
    finally:
        await cancel_and_wait([up, down])
