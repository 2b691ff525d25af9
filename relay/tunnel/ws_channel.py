"""One WebSocket channel's socket bridged to its tunnel channel: the client's socket on the relay,
the host service's socket on the agent, by the same code (a
:class:`relay.tunnel.channel_socket.ChannelSocket`, server side on the relay, client side on the
agent).

Both directions are driven from the sockets' reads, so a message costs no task wake-up:

- socket to channel: each whole message the socket parses goes down the channel from that read
  (:meth:`relay.tunnel.session.Channel.send_now`). When the channel lacks credit, or the
  tunnel's queue is past its high-water mark, the socket stops being read (``hold``) and the
  rest of that message is sent the waiting way; reading resumes after it. So a peer never has
  more than one message in this process beyond what credit allows.
- channel to socket: a whole message arriving from the tunnel goes to the socket from the
  tunnel's read while the socket takes it at once (``Channel.read_message(deliver)``); the
  pump (:meth:`ChannelBridge.run`, the serving task) sends the rest, waiting for a full socket
  to drain, and credit goes back only as messages leave.

Close codes cross as aiohttp's WebSocket carried them before: the socket's CLOSE code and reason
go down the channel (1005/1006 become 1011, framing we refused its 1002/1009); the channel's
CLOSE, the tunnel's loss (``lost_code``: 4410 or 4503 to a client, 1001 "tunnel lost" to a host)
or a bad message on the tunnel (1011) close the socket, whose CLOSE answer is waited for
``CLOSE_TIMEOUT_S`` before we hang up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from relay.aio import cancel_and_wait
from relay.errors import CloseCode, ProtocolViolation, sendable_close_code
from relay.protocol.close import reason_bytes
from relay.tunnel.channel_socket import ChannelSocket
from relay.tunnel.session import Channel, ChannelClosed

# How long a closed socket's CLOSE answer is waited for before the connection is dropped.
CLOSE_TIMEOUT_S = 2.0

# The close code and reason for the socket when the tunnel itself went away.
LostCode = Callable[[ChannelClosed], tuple[int, str]]


def _count(_: int) -> None:
    return None


class ChannelBridge:
    """The owner of one channel's socket, and the pump of the channel toward it."""

    __slots__ = ("_lost_code", "_sender", "_to_channel", "_to_socket", "channel", "socket", "task")

    def __init__(self, channel: Channel, *, lost_code: LostCode,
                 on_outbound: Callable[[int], None] = _count,
                 on_inbound: Callable[[int], None] = _count) -> None:
        self.channel = channel
        self._lost_code = lost_code
        self._to_channel = on_outbound  # bytes read from the socket and sent down the channel
        self._to_socket = on_inbound
        self.socket: ChannelSocket | None = None
        self._sender: asyncio.Task[None] | None = None  # a message waiting for credit
        self.task: asyncio.Task[object] | None = None  # the task running the pump

    def attach(self, socket: ChannelSocket) -> None:
        self.socket = socket

    # -- the socket's reports (ChannelOwner) ----------------------------------------------------
    def message(self, data: bytes, text: bool) -> None:
        try:
            rest = self.channel.send_now(data, text=text)
        except ChannelClosed:
            return  # the channel is over: the pump closes the socket
        if rest is None:
            self._to_channel(len(data))
            return
        socket = self.socket
        assert socket is not None
        socket.hold()
        self._sender = asyncio.ensure_future(self._send_rest(rest, text, len(data)))
        self._sender.set_name(f"ws-up:{self.channel.session.name}:{self.channel.id}")

    async def _send_rest(self, rest: memoryview, text: bool, size: int) -> None:
        try:
            await self.channel.write(rest, text=text, message=True)
        except ChannelClosed:
            return
        self._to_channel(size)
        self._sender = None
        if self.socket is not None:
            self.socket.release()  # may hand on the next message, or hold again

    def received(self, data: bytes) -> None:
        self.message(data, False)

    def received_text(self) -> None:
        raise AssertionError("a channel's socket reports text through message()")

    def refused(self, message: str) -> None:
        """Framing the socket refused (its 1002/1009 is out): ended() closes the channel with
        that code."""

    def ended(self, error: bool) -> None:
        """Nothing more comes from the socket: the peer's CLOSE, framing refused, the
        connection lost, or our own CLOSE (the channel is over already then, and this changes
        nothing)."""
        socket = self.socket
        assert socket is not None
        if socket.close_code is not None:
            code, reason = sendable_close_code(socket.close_code), socket.peer_reason
        elif socket.refused_with is not None:
            code, reason = socket.refused_with, ""
        else:  # gone without a CLOSE: 1006, which must never reach the far end as a clean 1000
            code, reason = sendable_close_code(None), ""
        self.channel.close(code, reason)

    # -- the pump ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Pump the channel to the socket until either side ends, then close the socket
        (bounded). The socket is hung up when this returns, however it returns."""
        channel, socket = self.channel, self.socket
        assert socket is not None
        self.task = asyncio.current_task()
        try_message, to_socket = socket.try_message, self._to_socket

        def deliver(data: bytes, text: bool) -> bool:
            if try_message(data, text):
                to_socket(len(data))
                return True
            return False

        clean = False
        try:
            code: int | None = None
            reason = ""
            try:
                while True:
                    message = await channel.read_message(deliver)
                    if message is None:
                        code = int(CloseCode.NORMAL)
                        break
                    data, is_text = message
                    await socket.send_message(data, is_text)
                    to_socket(len(data))
            except ChannelClosed as closed:
                if closed.tunnel_lost:
                    code, reason = self._lost_code(closed)
                else:
                    code, reason = sendable_close_code(closed.code), closed.reason
            except ProtocolViolation as violation:
                channel.close(int(CloseCode.INTERNAL_ERROR), violation.message)
                code, reason = int(CloseCode.INTERNAL_ERROR), "bad message on the tunnel"
            except ConnectionResetError:
                pass  # the socket is gone or closing: ended() closed the channel
            if code is not None:
                socket.send_close(code, reason_bytes(reason))
            with contextlib.suppress(TimeoutError):  # a peer that never answers our CLOSE
                clean = await asyncio.wait_for(socket.wait_closed(), CLOSE_TIMEOUT_S)
        except asyncio.CancelledError:
            # Stopped from outside (the tunnel's session ended and stops its tasks, the process
            # is stopping): the peer still learns why when the socket takes our CLOSE at once
            # (no wait: the hang-up follows).
            code, reason = self._end_code()
            socket.send_close(code, reason_bytes(reason))
            raise
        finally:
            if self._sender is not None:
                await cancel_and_wait([self._sender])
            if not clean:
                socket.abort()

    def _end_code(self) -> tuple[int, str]:
        """The close code and reason for the socket as the channel ended (or 1001 while it
        has not)."""
        end = self.channel.end
        if end is None:
            return int(CloseCode.GOING_AWAY), ""
        if end.tunnel_lost:
            return self._lost_code(ChannelClosed(end.code, end.reason, tunnel_lost=True))
        return sendable_close_code(end.code), end.reason

    def abort(self) -> None:
        """Hang up now (the relay is stopping)."""
        if self.socket is not None:
            self.socket.abort()
