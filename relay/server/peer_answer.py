"""The owner's side of a peer link: ``GET /peer-link``, authenticated once at the upgrade, then
every stream the entry relay opens on it answered from this relay's own tunnel to the host.

A stream's OPEN is the host's request as the entry relay built it (the client's view of it),
plus the entry's claims (relay.server.peers); the stream is spliced into a channel of the
local tunnel (relay.tunnel.splice), through the tunnel's stream gate as a local request would
be. What cannot be served is answered as this relay would answer the client itself: an HTTP
stream gets the JSON error response (503 ``host_offline`` when the directory named the wrong
relay, ``draining``, ``overloaded``), a WebSocket stream is accepted and closed with the code.
Streams are never forwarded again: the loop guard is that only local tunnels answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import structlog
from aiohttp import web

from relay.aio import cancel_and_wait
from relay.errors import (
    BadRequest,
    CloseCode,
    Draining,
    HostOffline,
    PeerRejected,
    ProtocolViolation,
    RelayError,
    TunnelClosed,
)
from relay.metrics import PeerSide
from relay.protocol import frames
from relay.protocol.close import fit_reason
from relay.protocol.messages import Head, Hello, Open
from relay.protocol.streams import StreamKind, StreamState
from relay.server.edge import error_response
from relay.server.peers import H_ORIGIN, StreamClaims, split_claims, verify_link
from relay.server.registry import Tunnel
from relay.server.state import STATE, TUNNEL_RELEASE, RelayState
from relay.server.tunnels import CLOSE_TIMEOUT_S, peer_address
from relay.tracing import Tracing, trace_headers, with_trace_headers
from relay.tunnel.feed import close_ws, feed_from
from relay.tunnel.session import Channel, ChannelClosed, Role, SessionSettings
from relay.tunnel.sink import WebSocketSink
from relay.tunnel.splice import SplicedChannel, SplicingSession, copy_body, copy_messages

log = structlog.get_logger("relay.peer")


def tunnel_lost_code(closed: ChannelClosed) -> tuple[int, str]:
    """What the entry hears when this relay's tunnel to the host went away under a stream:
    what a client of this relay would (4503 draining, else 4410)."""
    if closed.code == CloseCode.DRAINING:
        return int(CloseCode.DRAINING), closed.reason
    return int(CloseCode.TUNNEL_GONE), "the host's tunnel went away"


def adopt_hello(settings: SessionSettings, hello: Hello) -> SessionSettings:
    """The link's settings are the opener's (both ends must count credit alike)."""
    return dataclasses.replace(
        settings, window=hello.window, max_frame=hello.max_frame, max_streams=hello.max_streams,
        ping_interval_s=hello.ping_interval_s, keepalive_misses=hello.keepalive_misses,
        max_ws_message=hello.max_ws_message)


async def handle_peer_link(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    assert state.signer is not None  # the route exists only with a signer
    try:
        claims = verify_link(state.signer, request.raw_path, request.headers)
        if state.draining:
            raise Draining()
    except PeerRejected as error:
        state.metrics.peer_links_refused_total.inc()
        log.warning("peer.link_refused", peer=peer_address(request), reason=error.message,
                    origin=request.headers.get(H_ORIGIN, "")[:100])
        return error_response(error)
    except RelayError as error:
        return error_response(error)
    ws = web.WebSocketResponse(
        compress=False, autoping=True, timeout=CLOSE_TIMEOUT_S, writer_limit=1 << 20,
        max_msg_size=frames.max_message(state.config.tunnel.max_frame_bytes)
        + frames.MESSAGE_SLACK)
    if not ws.can_prepare(request).ok:
        return error_response(BadRequest("a peer link is a WebSocket upgrade"))
    await ws.prepare(request)
    return await _serve_link(state, ws, claims.origin, peer_address(request))


async def _serve_link(state: RelayState, ws: web.WebSocketResponse, origin: str,
                      peer: str) -> web.WebSocketResponse:
    metrics = state.metrics
    closing: list[asyncio.Task[Any]] = []

    def close(code: int, reason: str) -> None:
        if not closing:
            closing.append(state.tasks.spawn(TUNNEL_RELEASE, close_ws(ws, code, reason),
                                             f"peer-link-close:{origin}"))

    def on_open(channel: Channel, head: Open) -> None:
        assert isinstance(channel, SplicedChannel)
        session.spawn(answer(state, channel, head), f"peer-answer:{origin}:{channel.id}")

    def on_hello(hello: Hello) -> None:
        session.settings = adopt_hello(session.settings, hello)

    session = SplicingSession(
        WebSocketSink(ws), state.settings, role=Role.AGENT, name=f"peer-link:{origin}",
        on_open=on_open, on_hello=on_hello,
        on_silence=lambda: close(int(CloseCode.KEEPALIVE_MISSED), "keepalive missed"),
        on_backlog=lambda why: close(int(CloseCode.POLICY_VIOLATION), "peer not reading"))
    state.answered_links.add(ws)
    metrics.peer_links.labels(side=PeerSide.OWNER).inc()
    log.info("peer.link_up", side=str(PeerSide.OWNER), origin=origin, peer=peer)
    session.start()
    reason = "closed"
    try:
        if await feed_from(ws, session, "a peer link"):
            reason = "error"
    except ProtocolViolation as exc:
        reason = "protocol_violation"
        log.warning("peer.link_protocol_violation", origin=origin, error=exc.message)
        close(int(CloseCode.PROTOCOL_ERROR), fit_reason(exc.message))
    finally:
        # As for a tunnel: what must happen runs before the first await (the handler is
        # cancelled once the connection is gone), the rest in a task the relay owns.
        session.fail_all(int(CloseCode.TUNNEL_GONE), "the peer link closed")
        state.answered_links.discard(ws)
        metrics.peer_links.labels(side=PeerSide.OWNER).dec()
        log.info("peer.link_down", side=str(PeerSide.OWNER), origin=origin, reason=reason)
        release = state.tasks.spawn(TUNNEL_RELEASE, session.close(), f"peer-link-end:{origin}")
        await asyncio.shield(release)
    return ws


async def close_answered_links(state: RelayState) -> None:
    """Stopping: every link other relays opened to this one is closed (1001), bounded."""
    await asyncio.gather(*(close_ws(ws, int(CloseCode.GOING_AWAY), "relay stopping")
                           for ws in list(state.answered_links)))


# -- one stream ----------------------------------------------------------------------------

async def answer(state: RelayState, link: SplicedChannel, head: Open) -> None:
    """Serve one stream of a link from the local tunnel to its host, or refuse it."""
    kind = StreamKind(head.kind)
    metrics = state.metrics
    metrics.child(metrics.peer_link_streams_total, PeerSide.OWNER, kind).inc()
    link.lost_code = _client_gone
    tracing = state.tracing
    span = None
    error: RelayError | None = None
    try:
        claims, headers = split_claims(head.headers)
        if tracing is not None:
            # This relay's span is a child of the entry's, and the host's parent, as for a
            # request the entry forwarded by HTTP.
            span = tracing.start_server_span(
                "relay.ws" if kind is StreamKind.WS else "relay.http", trace_headers(headers),
                {"http.request.method": head.method, "relay.host_id": claims.host_id})
            headers = tuple(with_trace_headers(headers, tracing.inject(span)))
        host_head = dataclasses.replace(head, headers=headers)
        tunnel = _local_tunnel(state, claims)
        if kind is StreamKind.HTTP:
            await _answer_http(state, link, host_head, tunnel, claims)
        else:
            await _answer_ws(state, link, host_head, tunnel, claims)
    except RelayError as refused:
        error = refused
        if not link.closed and not link.head_sent:
            await _refuse(link, refused)
    finally:
        if not link.closed and link.state is not StreamState.CLOSED:
            link.close(int(CloseCode.NORMAL), "exchange complete")
        if span is not None:
            status = error.status if error is not None else link.sent_status
            Tracing.end_span(span, status, str(error.code) if error is not None else None)


def _client_gone(_: ChannelClosed) -> tuple[int, str]:
    # The link under the stream went away: for the host, the client did.
    return int(CloseCode.GOING_AWAY), "client went away"


def _local_tunnel(state: RelayState, claims: StreamClaims) -> Tunnel:
    if state.draining:
        raise Draining()
    tunnel = state.registry.get(claims.host_id)
    if tunnel is None:
        raise HostOffline("the host's tunnel is not on the relay the directory named; retry")
    return tunnel


async def _refuse(link: Channel, error: RelayError) -> None:
    """This relay's own answer to the client, carried back: the JSON error response, or on a
    WebSocket the accept-then-close every relay refusal is (browsers cannot read a status)."""
    if link.kind is StreamKind.WS:
        link.send_head(Head(status=101))
        link.close(int(error.close_code), fit_reason(error.message))
        return
    response = error_response(error)
    body = response.body
    assert isinstance(body, bytes)
    headers = (*response.headers.items(), ("Content-Length", str(len(body))))
    link.send_head(Head(status=response.status, reason=response.reason, headers=headers))
    with contextlib.suppress(ChannelClosed):
        await link.write(body, fin=True)


async def _answer_http(state: RelayState, link: SplicedChannel, head: Open, tunnel: Tunnel,
                       claims: StreamClaims) -> None:
    state.request_started()  # a drain waits for it like for a request of this relay's own
    try:
        async with tunnel.gate.http_slot(claims.subject):
            if link.closed:
                return  # the entry gave up while the exchange waited for a stream
            try:
                host = tunnel.session.open_channel(head, fin=link.fin_on_open)
            except ChannelClosed:
                raise HostOffline() from None
            link.partner = host
            upload = None
            if not link.fin_on_open:
                upload = asyncio.ensure_future(copy_body(link, host, _client_gone))
                upload.set_name(f"peer-upload:{claims.host_id}:{host.id}")
            try:
                await _respond(link, host)
            finally:
                if upload is not None:
                    await cancel_and_wait([upload])
                if not host.closed and host.state is not StreamState.CLOSED:
                    host.close(int(CloseCode.NORMAL), "exchange complete")
    finally:
        state.request_finished()


async def _respond(link: SplicedChannel, host: Channel) -> None:
    """The host's response head and body, back down the link."""
    try:
        head = await host.head  # bounded: by the entry's request timeout (it then closes the
        # stream, which closes this channel) and by the link's and the tunnel's keepalives
    except ChannelClosed as closed:
        if link.closed:
            return  # the entry ended the stream; its close already reached the host
        if closed.tunnel_lost:
            lost = Draining() if closed.code == CloseCode.DRAINING else TunnelClosed()
            raise lost from None
        link.close(closed.code, closed.reason)  # the agent's refusal: the entry reads it
        return
    link.send_head(head)
    whole = host.take_whole_body()
    if whole is not None:  # all here already (a small response): one frame, FIN on it
        with contextlib.suppress(ChannelClosed):
            await link.write(whole, fin=True)
        return
    await copy_body(host, link, tunnel_lost_code)


async def _answer_ws(state: RelayState, link: SplicedChannel, head: Open, tunnel: Tunnel,
                     claims: StreamClaims) -> None:
    ticket = tunnel.gate.open_channel(claims.subject)
    try:
        if link.closed:
            return
        try:
            host = tunnel.session.open_channel(head)
        except ChannelClosed:
            raise TunnelClosed() from None
        link.partner = host
        try:
            host_head = await asyncio.wait_for(asyncio.shield(host.head),
                                               state.config.tunnel.open_timeout_s)
        except TimeoutError:
            host.close(int(CloseCode.GOING_AWAY), "open timed out")
            raise TunnelClosed("the host did not open the channel") from None
        except ChannelClosed as closed:
            if link.closed:
                return
            raise TunnelClosed(
                f"the host refused the channel: {closed.reason or closed.code}") from None
        link.send_head(host_head)
        if host_head.status != 101:  # the entry refuses the client as it would locally
            host.close(int(CloseCode.NORMAL), "")
            return
        down = asyncio.ensure_future(copy_messages(host, link, tunnel_lost_code))
        down.set_name(f"peer-ws-down:{claims.host_id}:{host.id}")
        try:
            await copy_messages(link, host, _client_gone)
            # Either end's close closes the other: the host side ends right after.
            await asyncio.wait({down}, timeout=CLOSE_TIMEOUT_S)
        finally:
            await cancel_and_wait([down])
            host.close(int(CloseCode.GOING_AWAY), "client went away")
    finally:
        tunnel.gate.release(ticket)
