"""The agent's end of its tunnel: the client :class:`relay.tunnel.tunnel_socket.TunnelSocket`
that :func:`relay.tunnel.dial.dial` opened, and what it reports, in the terms the agent's loop
(relay.agent.client) acts on.

Under aiohttp's client WebSocket a reader task looped ``await ws.receive()`` and fed the
session: a queue, a future and a task wake-up per batch of frames, on every request (bench
W0-W3). Now the socket parses frames in its ``data_received`` and hands each binary message to
the session from that callback (:meth:`RelaySocket.received`); the session writes through the
socket (its FrameSink: masked with fresh keys, one transport write per batch). The loop only
waits for :attr:`RelaySocket.over`.

What the relay may not send is a protocol violation, logged as ``agent.protocol_violation``
and answered with 1002: a tunnel frame the session refuses, a text message, and framing the
socket refuses (a masked server frame, reserved bits, ...; a message over the limit is 1009).

:meth:`RelaySocket.code` is the close code the agent's outcome and log report, as they did
under aiohttp: the relay's CLOSE code; the code the socket refused framing with; otherwise
1006 (the connection ended without the relay's CLOSE, or its CLOSE had no code).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from relay.errors import CloseCode, ProtocolViolation
from relay.tunnel.session import TunnelSession
from relay.tunnel.tunnel_socket import TunnelSocket

log = structlog.get_logger("relay.agent")

_ABNORMAL = 1006  # RFC 6455 7.4.1: closed without a close frame
_NO_STATUS = 1005  # a close frame without a code


class RelaySocket:
    """One connection to the relay (a SocketOwner). The session is made by ``make_session`` in
    :meth:`start`, before the first frame is read: a HELLO may come in the 101's segment."""

    __slots__ = ("_close_by", "_make_session", "_refused", "over", "session", "socket")

    def __init__(self, make_session: Callable[[RelaySocket], TunnelSession]) -> None:
        self._make_session = make_session
        self.socket: TunnelSocket | None = None
        self.session: TunnelSession | None = None
        # Set once nothing more will be read: the relay's CLOSE, ours, refused framing, or the
        # connection's end.
        self.over: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._refused = False
        self._close_by: float | None = None  # when our CLOSE stops waiting for the relay's

    def start(self, socket: TunnelSocket) -> None:
        self.socket = socket
        self.session = self._make_session(self)

    # -- the socket's reports (SocketOwner) ----------------------------------------------------
    def received(self, data: bytes) -> None:
        assert self.session is not None
        try:
            self.session.feed(data)
        except ProtocolViolation as exc:
            self._violation(exc.message)

    def received_text(self) -> None:
        self._violation("text message on the tunnel")

    def refused(self, message: str) -> None:
        # The socket sent its CLOSE (1002, or 1009 for a message over the limit) and hung up.
        self._refused = True
        log.warning("agent.protocol_violation", error=message)

    def ended(self, error: bool) -> None:
        if not self.over.done():
            self.over.set_result(None)

    def _violation(self, message: str) -> None:
        log.warning("agent.protocol_violation", error=message)
        self.close(int(CloseCode.PROTOCOL_ERROR), b"", within=2.0)

    # -- the agent's side ----------------------------------------------------------------------
    def close(self, code: int, reason: bytes, *, within: float) -> None:
        """Our CLOSE now (once); :meth:`finish` waits up to ``within`` for the relay's."""
        socket = self.socket
        if socket is None or self._close_by is not None or self.over.done():
            return  # the relay closed first: its CLOSE was answered
        self._close_by = asyncio.get_running_loop().time() + within
        socket.send_close(code, reason)

    async def finish(self) -> None:
        """After :attr:`over`: the relay's answer to our CLOSE awaited (bounded), then whatever
        is still open dropped. Nothing is waited for when we did not close."""
        socket = self.socket
        if socket is None:
            return
        if self._close_by is not None:
            left = self._close_by - asyncio.get_running_loop().time()
            if left > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(socket.wait_closed(), left)
        if not socket.closed:
            socket.abort()

    def abort(self) -> None:
        """Drop the connection at once, with no close handshake (a black-holed relay)."""
        if self.socket is not None:
            self.socket.abort()

    @property
    def closed(self) -> bool:
        return self.socket is None or self.socket.closed

    def code(self) -> int:
        socket = self.socket
        if socket is not None and socket.close_code not in (None, _NO_STATUS):
            assert socket.close_code is not None
            return socket.close_code
        if self._refused and socket is not None and socket.sent_code is not None:
            return socket.sent_code
        return _ABNORMAL

    def close_reason(self) -> str:
        """The reason of the relay's CLOSE ("mint an agent token") when the relay closed first
        (its answer to ours says nothing), printable and bounded: it comes off the wire and
        goes to the log and the status line."""
        if self.socket is None or self._close_by is not None:
            return ""
        return _printable(self.socket.close_reason.decode("utf-8", "replace"))


def _printable(text: str, limit: int = 123) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])
