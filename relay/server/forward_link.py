"""A request for a host whose tunnel is on another relay: over the peer link to that relay when
there is one (relay.server.peerlink), else by the per-request HTTP forward (relay.server.forward).

Over a link the exchange is proxied exactly as on a local tunnel (relay.server.http_proxy,
ws_proxy: same statuses, bodies, close codes, leases), the link's stream standing in for a
tunnel channel; the stream's OPEN carries this relay's claims for the owner. The link failing
under a request is the owner being unreachable, as it is for the HTTP forward.
"""

from __future__ import annotations

import math

import structlog
from aiohttp import web

from relay.directory.base import Owner
from relay.errors import HostOffline, TunnelClosed
from relay.metrics import PeerSide, StreamKind
from relay.server.forward import forward_http, forward_ws
from relay.server.http_proxy import proxy_http
from relay.server.peers import stream_claims
from relay.server.state import RelayState
from relay.server.ws_proxy import proxy_ws
from relay.tunnel.session import TunnelSession

log = structlog.get_logger("relay.forward")


async def _link_session(state: RelayState, owner_url: str, kind: StreamKind
                        ) -> TunnelSession | None:
    links = state.links
    session = await links.session_for(owner_url) if links is not None else None
    if session is not None:
        metrics = state.metrics
        metrics.child(metrics.forwarded_requests_total, kind).inc()
        metrics.child(metrics.peer_link_streams_total, PeerSide.ENTRY, kind).inc()
    return session


async def lookup_owner(state: RelayState, host_id: str) -> Owner | None:
    """Which relay holds ``host_id``'s tunnel: the directory, or what a live link to the
    owner remembers of it from a moment ago (relay.server.peerlink)."""
    assert state.directory is not None
    links = state.links
    if links is not None and (known := links.owner(host_id)) is not None:
        return known
    owner = await state.directory.lookup(host_id)
    if owner is not None and links is not None:
        links.remember(host_id, owner)
    return owner


async def forward_request(state: RelayState, request: web.Request, owner_url: str,
                          host_id: str, path: str, query: str, subject: str,
                          expires_at: float = math.inf) -> web.StreamResponse:
    assert state.signer is not None
    session = await _link_session(state, owner_url, StreamKind.HTTP)
    if session is None:
        return await forward_http(state, state.signer, request, owner_url, host_id, path, query,
                                  subject)
    claims = stream_claims(state.signer, host_id, subject, expires_at)
    try:
        response = await proxy_http(state, request, session, path, query, host_id,
                                    claims=claims)
    except TunnelClosed:
        if session.alive:
            raise
        log.warning("forward.failed", host_id=host_id, owner=owner_url, error="PeerLinkLost")
        raise HostOffline("the relay holding this host's tunnel is unreachable; retry") from None
    if response.status == 503 and state.links is not None:
        # The owner may have said "not here" (a stale entry): ask the directory next time.
        state.links.forget(host_id)
    return response


async def forward_channel(state: RelayState, request: web.Request, owner_url: str,
                          host_id: str, path: str, query: str, subject: str,
                          expires_at: float = math.inf) -> web.StreamResponse:
    assert state.signer is not None
    session = await _link_session(state, owner_url, StreamKind.WS)
    if session is None:
        return await forward_ws(state, state.signer, request, owner_url, host_id, path, query,
                                subject, expires_at)
    # This relay holds the client's socket, so the channel's lease (4401 at the token's
    # expiry, 4403 on revocation) is held here, as for a channel on a local tunnel.
    return await proxy_ws(state, request, session, path, query, host_id, subject=subject,
                          expires_at=expires_at,
                          claims=stream_claims(state.signer, host_id, subject, expires_at))
