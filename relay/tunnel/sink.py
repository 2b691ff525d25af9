"""Where a tunnel session's frames go: the tunnel's WebSocket, many messages per socket write.

A session hands its sink every frame queued since the last write at once. On loopback a
``send()`` costs the sender the receiver's TCP work too, so one write of 16 frames is far
cheaper than 16 writes (bench W3), and the agent's HEAD and its last DATA leave in one
segment, which the relay reads in one go (bench W0).

- :class:`relay.tunnel.tunnel_socket.TunnelSocket` (the relay's and the agent's tunnel, the
  peer links) is the sink in production: it frames the messages itself with
  :func:`message_header` and :func:`write_parts`, masked on the client's side.
- :class:`CallbackSink` adapts any ``async send(frame)`` (test doubles): every write waits
  for :meth:`drain`, which sends the frames one at a time.
"""

from __future__ import annotations

import asyncio
import collections
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

_BINARY_FIN = 0x82  # FIN + opcode 2 (binary): one whole message per frame, never fragmented
_TEXT_FIN = 0x81
_LEN7 = struct.Struct("!BB")
_LEN16 = struct.Struct("!BBH")
_LEN64 = struct.Struct("!BBQ")
# Past this, the pieces go to the transport as they are (writelines) rather than joined: a
# copy of a few small frames is cheaper than a vector of them, a copy of big DATA frames not.
JOIN_BELOW = 64 * 1024


class FrameSink(Protocol):
    def write(self, frames: Sequence[bytes]) -> bool:
        """Send each frame as one WebSocket message, in order, now. False: the socket is
        full, and nothing more may be written before :meth:`drain` returns.

        Raises ConnectionError (or RuntimeError) when the socket is gone or closing."""

    async def drain(self) -> None:
        """Wait until the socket takes more (bounded by the session's keepalive verdicts)."""


def message_header(size: int, mask_bit: int = 0, first: int = _BINARY_FIN) -> bytes:
    if size < 126:
        return _LEN7.pack(first, size | mask_bit)
    if size < 65536:
        return _LEN16.pack(first, 126 | mask_bit, size)
    return _LEN64.pack(first, 127 | mask_bit, size)


def write_messages(transport: asyncio.WriteTransport, frames: Sequence[bytes],
                   first: int = _BINARY_FIN) -> None:
    """Each frame as one unmasked message (a server's side; binary unless ``first`` says
    otherwise), in one transport write."""
    parts: list[bytes | bytearray] = []
    size = 0
    for frame in frames:
        parts += (message_header(len(frame), 0, first), frame)
        size += len(frame)
    write_parts(transport, parts, size)


def write_parts(transport: asyncio.WriteTransport, parts: list[bytes | bytearray],
                 size: int) -> None:
    if size < JOIN_BELOW:
        transport.write(b"".join(parts))
    else:
        transport.writelines(parts)


class CallbackSink:
    """An ``async send(frame)`` as a sink; frames wait in a deque until :meth:`drain`."""

    __slots__ = ("_pending", "_send")

    def __init__(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        self._send = send
        self._pending: collections.deque[bytes] = collections.deque()

    def write(self, frames: Sequence[bytes]) -> bool:
        self._pending.extend(frames)
        return False

    async def drain(self) -> None:
        while self._pending:
            await self._send(self._pending.popleft())
