"""A tunnel's WebSocket: read into its session (one binary message is one tunnel frame), and
closed with a bound.

Shared by both ends of a peer link (aiohttp's server and client WebSocket objects iterate and
close alike).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import WSMsgType

from relay.errors import ProtocolViolation
from relay.protocol.close import reason_bytes
from relay.tunnel.bridge import CLOSE_TIMEOUT_S
from relay.tunnel.session import TunnelSession


async def feed_from(ws: Any, session: TunnelSession, what: str) -> bool:
    """Feed every frame until the socket ends; True when it ended on an error.

    Raises ProtocolViolation: a text message on ``what``, or a frame the session refused.
    """
    async for msg in ws:
        if msg.type is WSMsgType.BINARY:
            session.feed(msg.data)
        elif msg.type is WSMsgType.TEXT:
            raise ProtocolViolation(f"text message on {what}")
        elif msg.type is WSMsgType.ERROR:
            return True
    return False


async def close_ws(ws: Any, code: int, reason: str, timeout: float = CLOSE_TIMEOUT_S) -> None:
    """Close with ``code``, waiting at most ``timeout`` for a peer that may be gone."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(code=code, message=reason_bytes(reason)), timeout)
