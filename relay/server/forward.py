"""Forward a request or bridge a WebSocket to the relay that owns the host's tunnel.

An HTTP redirect cannot carry a WebSocket upgrade (nor a streamed upload), so the entry relay
proxies: bodies stream both ways, statuses, error bodies and close codes come back unchanged.
The owner trusts the entry relay's signed headers (``relay.server.peers``) instead of
re-checking the client's token and access: the entry relay already did, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any

import aiohttp
import structlog
from aiohttp import WSMsgType, web
from yarl import URL

from relay.aio import cancel_and_wait
from relay.errors import UNSENDABLE_CLOSE_CODES, CloseCode, HostOffline, sendable_close_code
from relay.metrics import StreamKind
from relay.protocol.close import reason_bytes
from relay.protocol.headers import (
    CLIENT_CREDENTIALS,
    RELAY_INTERNAL_PREFIX,
    RELAY_SET,
    WS_HANDSHAKE,
    is_client_identity,
    strip_hop_by_hop,
    strip_session_cookie,
)
from relay.server.edge import send_continue
from relay.server.forwarded import client_view
from relay.server.peers import PeerSigner
from relay.server.state import RelayState
from relay.server.timing import timer_of
from relay.server.tunnels import CLOSE_TIMEOUT_S, credential_deadline
from relay.server.ws_proxy import client_ws, offered_protocols, refuse_ws, ws_size_limit

log = structlog.get_logger("relay.forward")

_SOCKET_ENDED = frozenset({WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR})




def _outbound_headers(request: web.Request, *, websocket: bool,
                      trust_forwarded: bool) -> list[tuple[str, str]]:
    handshake = WS_HANDSHAKE if websocket else frozenset()
    extra = CLIENT_CREDENTIALS | {"host"} | RELAY_SET | handshake
    # The session cookie is a credential like Authorization: this relay used it already.
    headers = [(n, v) for n, v in strip_session_cookie(
                   strip_hop_by_hop(request.headers.items(), extra=extra))
               if not n.lower().startswith(RELAY_INTERNAL_PREFIX)
               and (trust_forwarded or not is_client_identity(n))]
    view = client_view(request, trust_forwarded, websocket=websocket)
    # The owner reports what the client used, not the internal hop between relays.
    headers += [("X-Forwarded-Proto", view.scheme), ("X-Forwarded-Host", view.host)]
    return headers


def _target(host_id: str, path: str, query: str) -> str:
    return f"/hosts/{host_id}{path}" + (f"?{query}" if query else "")


def _signed_request(state: RelayState, signer: PeerSigner, request: web.Request, host_id: str,
                    path: str, query: str, subject: str,
                    *, websocket: bool) -> tuple[str, list[tuple[str, str]]]:
    """The owner-relative target and the headers (client's, forwarded, signed) to send."""
    target = _target(host_id, path, query)
    trust = state.config.server.trust_forwarded
    headers = _outbound_headers(request, websocket=websocket, trust_forwarded=trust)
    method = "GET" if websocket else request.method
    headers += list(signer.sign(method, target, host_id, subject,
                                client_view(request, trust).chain).items())
    timer = timer_of(request)
    if timer is not None:
        headers = timer.next_hop_headers(headers)  # the owner's span is a child of ours
    return target, headers


async def forward_http(state: RelayState, signer: PeerSigner, request: web.Request,
                       owner_url: str, host_id: str, path: str, query: str,
                       subject: str) -> web.StreamResponse:
    assert state.client is not None
    target, headers = _signed_request(state, signer, request, host_id, path, query, subject,
                                      websocket=False)
    started = time.monotonic()
    state.metrics.forwarded_requests_total.labels(kind=StreamKind.HTTP).inc()
    body = request.content if request.body_exists else None
    if body is not None:
        await send_continue(request)
    status = 502
    try:
        async with state.client.request(
            request.method, URL(owner_url + target, encoded=True), headers=headers,
            data=body, allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=5,
                                          sock_read=state.config.tunnel.request_timeout_s + 5),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        ) as upstream:
            status = upstream.status
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            length = upstream.headers.get("Content-Length")
            raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in upstream.raw_headers]
            for name, value in strip_hop_by_hop(raw, extra=frozenset({"content-length"})):
                response.headers.add(name, value)
            timer = timer_of(request)
            if timer is not None and (timing := timer.header(("auth", "access"))) is not None:
                # The owner measured the tunnel and the host; the client was checked here.
                response.headers.add("Server-Timing", timing)
            if length is not None and length.isdigit():
                response.content_length = int(length)
            await response.prepare(request)
            try:
                async for data in upstream.content.iter_any():
                    if request.method != "HEAD":  # never a body on a HEAD answer
                        await response.write(data)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
                # The owner cut the body short: cut ours too rather than end it cleanly.
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write_eof()
            return response
    except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, TimeoutError) as exc:
        log.warning("forward.failed", host_id=host_id, owner=owner_url, error=type(exc).__name__)
        # The owner is gone (crashed, partitioned): until its directory entry expires or the
        # agent re-registers elsewhere, the host is offline from here.
        raise HostOffline("the relay holding this host's tunnel is unreachable; retry") from None
    finally:
        log.info("forward.http", host_id=host_id, owner=owner_url, method=request.method,
                 status=status, duration_ms=round((time.monotonic() - started) * 1000, 2))


async def forward_ws(state: RelayState, signer: PeerSigner, request: web.Request,
                     owner_url: str, host_id: str, path: str, query: str,
                     subject: str, expires_at: float = math.inf) -> web.StreamResponse:
    """Bridge the client's WebSocket to the owner relay's WebSocket for the same channel.

    This relay holds the client's socket and verified its token, so the channel's lease (close
    4401 at expiry, 4403 on revocation) is held here; the owner only sees signed claims.
    """
    assert state.client is not None
    target, headers = _signed_request(state, signer, request, host_id, path, query, subject,
                                      websocket=True)
    offered = offered_protocols(request)
    state.metrics.forwarded_requests_total.labels(kind=StreamKind.WS).inc()
    ws_url = owner_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + target
    try:
        upstream = await asyncio.wait_for(state.client.ws_connect(
            URL(ws_url, encoded=True), headers=headers, protocols=offered,
            compress=0, autoping=True, decode_text=False,
            max_msg_size=ws_size_limit(state.config.tunnel.max_ws_message_bytes),
            timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S),
        ), state.config.tunnel.open_timeout_s)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("forward.ws_failed", host_id=host_id, owner=owner_url, error=type(exc).__name__)
        error = HostOffline("the relay holding this host did not answer")
        return await refuse_ws(state, request, error)
    try:
        ws = client_ws(state, (upstream.protocol,) if upstream.protocol else ())
        await ws.prepare(request)
        verdict: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

        def end(code: int, reason: str) -> None:
            if not verdict.done():
                verdict.set_result((code, reason))

        lease = state.leases.hold(subject, host_id, credential_deadline(state, expires_at),
                                  "channel", end)
        try:
            await _pump_sockets(ws, upstream, verdict)
        finally:
            state.leases.end(lease)
        return ws
    finally:
        if not upstream.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(upstream.close(), CLOSE_TIMEOUT_S)


def _owner_lost(owner: Any) -> bool:
    """The owner relay's socket ended without a close frame: it died (crash, kill, network)."""
    return owner.close_code is None or owner.close_code in UNSENDABLE_CLOSE_CODES


async def _pump_sockets(client: web.WebSocketResponse, owner: Any,
                        verdict: asyncio.Future[tuple[int, str]]) -> None:
    """Relay frames both ways; whoever closes first, the other side gets the same code.

    ``verdict`` ends the channel from here (the lease: token expired, access revoked): both
    sockets are closed with its code. When the owner relay dies under the channel, the client
    gets 4410 (the host's tunnel went away), as for a channel on a tunnel of this relay.
    """

    async def pump(source: object, sink: object) -> tuple[int, str]:
        while True:
            msg = await source.receive()  # type: ignore[attr-defined]
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                data = msg.data if isinstance(msg.data, bytes) else msg.data.encode()
                await sink.send_frame(data, msg.type)  # type: ignore[attr-defined]
            elif msg.type in _SOCKET_ENDED:
                reason = str(msg.extra or "") if msg.type is WSMsgType.CLOSE else ""
                return sendable_close_code(source.close_code), reason  # type: ignore[attr-defined]

    to_owner = asyncio.ensure_future(pump(client, owner))
    to_client = asyncio.ensure_future(pump(owner, client))
    to_owner.set_name("forward-ws-up")
    to_client.set_name("forward-ws-down")
    try:
        done, _ = await asyncio.wait({to_owner, to_client, verdict},
                                     return_when=asyncio.FIRST_COMPLETED)
        if verdict in done:
            code, reason = verdict.result()
            sockets = [client, owner]
        else:
            first = done.pop()
            from_owner = first is to_client
            try:
                code, reason = first.result()
            except Exception:
                code, reason = int(CloseCode.INTERNAL_ERROR), ""
            if from_owner and _owner_lost(owner):
                code, reason = int(CloseCode.TUNNEL_GONE), "the host's tunnel went away"
            sockets = [client if from_owner else owner]
        for socket in sockets:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(socket.close(code=code, message=reason_bytes(reason)),
                                       CLOSE_TIMEOUT_S)
    finally:
        await cancel_and_wait([to_owner, to_client])
