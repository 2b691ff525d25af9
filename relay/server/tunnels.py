"""``GET /tunnel``: accept an agent's WebSocket, register it (directory first), serve its frames."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from aiohttp import WSMsgType, web

from relay.auth.access import AccessRole
from relay.errors import (
    BadRequest,
    CloseCode,
    Draining,
    ProtocolViolation,
    RelayError,
)
from relay.protocol.frames import HEADER_SIZE, PROTOCOL_VERSION, negotiate_version
from relay.server.edge import authorize, require_param
from relay.server.registry import Tunnel
from relay.server.state import STATE, RelayState
from relay.tunnel.session import Role, TunnelSession

log = structlog.get_logger("relay.tunnel")

CLOSE_TIMEOUT_S = 2.0  # a black-holed agent never answers our close frame


async def close_refused(ws: web.WebSocketResponse, error: RelayError) -> web.WebSocketResponse:
    """Browsers cannot read a refused upgrade's status, so refusals are a close code + reason."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(
            ws.close(code=int(error.close_code), message=error.message[:120].encode()),
            CLOSE_TIMEOUT_S,
        )
    return ws


def peer_address(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return f"{peer[0]}:{peer[1]}" if peer else "unknown"


async def handle_tunnel(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    config = state.config
    ws = web.WebSocketResponse(
        compress=False,
        autoping=True,
        timeout=CLOSE_TIMEOUT_S,
        max_msg_size=config.tunnel.max_frame_bytes + 64 * 1024 + HEADER_SIZE,
        writer_limit=1 << 20,
    )
    await ws.prepare(request)
    try:
        if state.draining:
            raise Draining()
        host_raw = require_param(request, "hostId")
        version = negotiate_version(request.query.get("v"))
        if version is None:
            raise BadRequest(f"unsupported protocol version; this relay speaks {PROTOCOL_VERSION}")
        auth = await authorize(state, request, host_raw, allow_query_token=True,
                               role=AccessRole.AGENT)
        assert state.directory is not None
        epoch = await state.directory.register(str(auth.host))
    except RelayError as error:
        state.metrics.tunnel_rejections_total.labels(code=str(error.code)).inc()
        log.info("tunnel.refused", code=str(error.code),
                 host_id=request.query.get("hostId", "")[:300], peer=peer_address(request))
        return await close_refused(ws, error)
    return await serve_tunnel(state, request, ws, str(auth.host), auth.identity.sub, epoch, version)


async def serve_tunnel(
    state: RelayState,
    request: web.Request,
    ws: web.WebSocketResponse,
    host_id: str,
    subject: str,
    epoch: str,
    version: int,
) -> web.WebSocketResponse:
    metrics = state.metrics
    closing: dict[str, object] = {}

    def request_close(code: int, reason: str) -> None:
        if closing:
            return
        closing.update(code=code, reason=reason)
        state.spawn(_close_socket(ws, code, reason, request.transport), f"tunnel-close:{host_id}")

    session = TunnelSession(
        ws.send_bytes,
        state.settings,
        role=Role.RELAY,
        name=host_id,
        on_silence=lambda: request_close(int(CloseCode.KEEPALIVE_MISSED), "keepalive missed"),
    )
    tunnel = Tunnel(host_id=host_id, session=session, peer=peer_address(request),
                    subject=subject, close=request_close, epoch=epoch)
    replaced = state.registry.register(tunnel)
    if replaced is not None:
        log.info("tunnel.replaced", host_id=host_id, old_peer=replaced.peer, new_peer=tunnel.peer)
        replaced.close(int(CloseCode.REPLACED), "replaced by a newer tunnel")
    metrics.tunnels_connected.set(len(state.registry))
    metrics.tunnel_connects_total.inc()
    session.send_hello({
        "version": version,
        "hostId": host_id,
        "pingIntervalS": state.settings.ping_interval_s,
        "keepaliveMisses": state.settings.keepalive_misses,
        "window": state.settings.window,
        "maxFrame": state.settings.max_frame,
        "maxStreams": state.settings.max_streams,
    })
    session.start(keepalive=False)  # the relay-wide keepalive loop pings it (app.py)
    log.info("tunnel.connected", host_id=host_id, peer=tunnel.peer, sub=subject)
    reason = "closed"
    try:
        async for msg in ws:
            if msg.type is WSMsgType.BINARY:
                session.feed(msg.data)
            elif msg.type is WSMsgType.TEXT:
                raise ProtocolViolation("text message on the tunnel")
            elif msg.type is WSMsgType.ERROR:
                reason = "error"
                break
        reason = str(closing.get("reason", reason)) if closing else "agent_closed"
    except ProtocolViolation as exc:
        reason = "protocol_violation"
        log.warning("tunnel.protocol_violation", host_id=host_id, error=exc.message)
        await _close_socket(ws, int(CloseCode.PROTOCOL_ERROR), exc.message[:120], request.transport)
    finally:
        # The handler is cancelled as soon as the agent's connection is gone (which our own
        # close causes), so everything that must happen runs before the first await, and the
        # asynchronous rest in a task the relay owns, which a cancelled handler cannot cut short.
        session.fail_all(int(CloseCode.TUNNEL_GONE), "the host's tunnel went away")
        still_current = state.registry.unregister(tunnel)
        metrics.tunnels_connected.set(len(state.registry))
        metrics.tunnel_disconnects_total.labels(reason=_reason_label(closing, reason)).inc()
        log.info("tunnel.disconnected", host_id=host_id, peer=tunnel.peer,
                 reason=_reason_label(closing, reason), replaced=not still_current)
        release = state.spawn(_release(state, session, host_id, epoch, still_current),
                              f"tunnel-release:{host_id}")
        await asyncio.shield(release)
    return ws


async def _release(
    state: RelayState, session: TunnelSession, host_id: str, epoch: str, still_current: bool
) -> None:
    """Stop the session's tasks and, if this tunnel was still current, its directory entry."""
    await session.close(int(CloseCode.TUNNEL_GONE), "the host's tunnel went away")
    if still_current and state.directory is not None:
        await state.directory.unregister(host_id, epoch)


def _reason_label(closing: dict[str, object], fallback: str) -> str:
    code = closing.get("code")
    return {
        int(CloseCode.REPLACED): "replaced",
        int(CloseCode.KEEPALIVE_MISSED): "keepalive_missed",
        int(CloseCode.DRAINING): "draining",
    }.get(code if isinstance(code, int) else -1, fallback)


async def _close_socket(
    ws: web.WebSocketResponse, code: int, reason: str, transport: asyncio.Transport | None
) -> None:
    """Close with a code, but never wait on a peer that may be gone for good."""
    clean = False
    try:
        await asyncio.wait_for(ws.close(code=code, message=reason.encode()), CLOSE_TIMEOUT_S)
        clean = True
    except Exception:
        pass
    finally:
        # On a black-holed path the close handshake never completes: drop the socket.
        if not clean and transport is not None and not transport.is_closing():
            transport.abort()
