"""Bridge a client's WebSocket to a channel on the host's tunnel, frames and close codes intact.

A channel never outlives its token: it holds a lease that closes it 4401 at the token's expiry
(plus the auth leeway), and 4403 when its subject or host is revoked.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import structlog
from aiohttp import web

from relay.errors import CloseCode, RelayError, TunnelClosed
from relay.metrics import WsOutcome
from relay.protocol.messages import Open
from relay.server.client_socket import take_over_client
from relay.server.forwarded import host_request_head
from relay.server.state import RelayState
from relay.server.timing import timer_of, trace_next_hop
from relay.server.tunnels import CLOSE_TIMEOUT_S, TakenOver, close_refused, credential_deadline
from relay.tunnel.session import ChannelClosed, TunnelSession
from relay.tunnel.ws_channel import ChannelBridge

log = structlog.get_logger("relay.ws")


def ws_size_limit(max_message_bytes: int) -> int:
    """aiohttp's ``max_msg_size`` for a limit of ``max_message_bytes``.

    aiohttp refuses a message whose size is *equal* to ``max_msg_size``; the documented limit
    is the largest message that passes, so aiohttp is given one more.
    """
    return max_message_bytes + 1


class ClientWebSocket(web.WebSocketResponse):
    """The client's socket; an over-limit message is closed 1009 with a reason naming the limit.

    aiohttp fails such a socket with 1009 and an empty reason; the client then cannot tell a
    size limit from any other refusal.
    """

    def __init__(self, *, max_message_bytes: int, **kwargs: Any) -> None:
        super().__init__(max_msg_size=ws_size_limit(max_message_bytes), **kwargs)
        self._too_big = f"message too big: the limit is {max_message_bytes} bytes".encode()

    async def close(self, *, code: int = 1000, message: bytes = b"", drain: bool = True) -> bool:
        if code == CloseCode.MESSAGE_TOO_BIG and not message:
            message = self._too_big
        return await super().close(code=code, message=message, drain=drain)


def client_ws(state: RelayState, protocols: tuple[str, ...] = ()) -> web.WebSocketResponse:
    return ClientWebSocket(
        max_message_bytes=state.config.tunnel.max_ws_message_bytes,
        protocols=protocols,
        compress=False,
        timeout=CLOSE_TIMEOUT_S,
        decode_text=False,
    )


async def refuse_ws(
    state: RelayState, request: web.Request, error: RelayError
) -> web.WebSocketResponse:
    """Accept, then close with the error's code: browsers cannot read a refused upgrade."""
    ws = client_ws(state)
    await ws.prepare(request)
    state.metrics.ws_channels_total.labels(outcome=str(error.code)).inc()
    return await close_refused(ws, error)


def ws_open_head(request: web.Request, path: str, query: str, trust_forwarded: bool,
                 client_chain: str | None, host_id: str = "",
                 claims: tuple[tuple[str, str], ...] = ()) -> Open:
    return host_request_head(request, path, query, trust_forwarded, client_chain,
                             websocket=True, host_id=host_id,
                             protocols=tuple(offered_protocols(request)), claims=claims)


def offered_protocols(request: web.Request) -> list[str]:
    """The subprotocols the client offered, for the next hop to choose from."""
    raw = request.headers.get("Sec-WebSocket-Protocol", "")
    return [p.strip() for p in raw.split(",") if p.strip()]


async def proxy_ws(
    state: RelayState, request: web.Request, session: TunnelSession, path: str, query: str,
    host_id: str, client_chain: str | None = None, *, subject: str = "",
    expires_at: float = math.inf, claims: tuple[tuple[str, str], ...] = (),
) -> web.StreamResponse:
    metrics = state.metrics
    if not web.WebSocketResponse().can_prepare(request).ok:
        # Checked before the host is asked: the relay answers the upgrade itself (no aiohttp
        # prepare() would refuse a bad handshake later). This raises aiohttp's 400.
        await client_ws(state).prepare(request)
    open_head = ws_open_head(request, path, query, state.config.server.trust_forwarded,
                             client_chain, host_id, claims)
    timer = timer_of(request)
    if timer is not None:
        open_head = trace_next_hop(timer, open_head)
    try:
        channel = session.open_channel(open_head)
    except ChannelClosed:
        return await refuse_ws(state, request, TunnelClosed())
    except RelayError as error:
        return await refuse_ws(state, request, error)
    if timer is not None:
        timer.lap("tunnel")
    metrics.ws_streams.inc()
    started = time.monotonic()
    try:
        # The host must acknowledge the channel fast, or the client is failed at once:
        # never leave a client attached to a channel the host never opened.
        try:
            head = await asyncio.wait_for(
                asyncio.shield(channel.head), state.config.tunnel.open_timeout_s
            )
        except TimeoutError:
            channel.close(int(CloseCode.GOING_AWAY), "open timed out")
            refusal = TunnelClosed("the host did not open the channel")
            return await refuse_ws(state, request, refusal)
        except ChannelClosed as closed:
            refusal = TunnelClosed(f"the host refused the channel: {closed.reason or closed.code}")
            return await refuse_ws(state, request, refusal)
        if timer is not None:
            timer.lap("host")
        status = head.status
        if status != 101:
            channel.close(int(CloseCode.NORMAL), "")
            refusal = TunnelClosed(f"the host refused the WebSocket with HTTP {status}")
            refusal.close_code = CloseCode.INTERNAL_ERROR
            return await refuse_ws(state, request, refusal)
        chosen = head.protocol
        protocol = str(chosen) if chosen and str(chosen) in offered_protocols(request) else None
        bridge = ChannelBridge(channel, lost_code=_lost_code,
                               on_outbound=metrics.bytes_to_host.inc,
                               on_inbound=metrics.bytes_to_client.inc)
        take_over_client(request, bridge, protocol,
                         max_message_bytes=state.config.tunnel.max_ws_message_bytes,
                         start=bridge.attach)
        metrics.ws_channels_total.labels(outcome=WsOutcome.OPENED).inc()
        log.info("ws.opened", host_id=host_id, path=path, stream=channel.id)
        # Closing the channel with the lease's code ends the pump, which closes the client's
        # socket with the same code; the host's socket gets it through the agent.
        lease = state.leases.hold(subject, host_id, credential_deadline(state, expires_at),
                                  "channel", channel.close)
        state.ws_bridges.add(bridge)
        try:
            await bridge.run()
        finally:
            state.ws_bridges.discard(bridge)
            state.leases.end(lease)
        return TakenOver()
    finally:
        channel.close(int(CloseCode.GOING_AWAY), "client went away")
        metrics.ws_streams.dec()
        log.info("ws.closed", host_id=host_id, path=path,
                 duration_s=round(time.monotonic() - started, 3))


def _lost_code(closed: ChannelClosed) -> tuple[int, str]:
    # A draining relay tells clients to come back at once; any other loss is 4410.
    if closed.code == CloseCode.DRAINING:
        return int(CloseCode.DRAINING), closed.reason
    return int(CloseCode.TUNNEL_GONE), "the host's tunnel went away"

