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
from relay.protocol.close import fit_reason, reason_bytes
from relay.protocol.messages import Head, Hello, Open
from relay.protocol.streams import StreamKind, StreamState
from relay.server.edge import error_response
from relay.server.peers import (
    H_ORIGIN,
    LINK_CORK_S,
    StreamClaims,
    split_claims,
    verify_link,
)
from relay.server.registry import Tunnel
from relay.server.state import STATE, TUNNEL_CLOSE, TUNNEL_RELEASE, RelayState
from relay.server.tunnels import CLOSE_TIMEOUT_S, finish_close, peer_address, serve_upgraded
from relay.tracing import Tracing, trace_headers, with_trace_headers
from relay.tunnel.session import Channel, ChannelClosed, Role, SessionSettings
from relay.tunnel.splice import SplicedChannel, SplicingSession, copy_body, copy_messages
from relay.tunnel.tunnel_socket import TunnelSocket

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
    if not web.WebSocketResponse().can_prepare(request).ok:
        return error_response(BadRequest("a peer link is a WebSocket upgrade"))
    # Taken over from aiohttp as a tunnel is: frames parsed as they arrive, fed to the session
    # synchronously, many written per socket write.
    link = AnsweredLink(state, claims.origin, peer_address(request))
    max_message = frames.max_message(state.config.tunnel.max_frame_bytes) + frames.MESSAGE_SLACK
    return serve_upgraded(state, request, link, max_message, link.start)


class AnsweredLink:
    """The owner's end of one peer link, on its :class:`TunnelSocket` (a SocketOwner)."""

    def __init__(self, state: RelayState, origin: str, peer: str) -> None:
        self.state = state
        self.origin = origin
        self.peer = peer
        self.reason = "closed"
        self._closing = False
        self._over = False

    def start(self, socket: TunnelSocket) -> None:
        state = self.state
        self.socket = socket
        self.session = SplicingSession(
            socket, state.settings, role=Role.AGENT, name=f"peer-link:{self.origin}",
            clock=state.clock, on_open=self._on_open, on_hello=self._on_hello,
            cork_s=LINK_CORK_S,
            on_silence=lambda: self.close(int(CloseCode.KEEPALIVE_MISSED), "keepalive missed"),
            on_backlog=lambda why: self.close(int(CloseCode.POLICY_VIOLATION),
                                              "peer not reading"))
        state.answered_links.add(self)
        state.metrics.peer_links.labels(side=PeerSide.OWNER).inc()
        log.info("peer.link_up", side=str(PeerSide.OWNER), origin=self.origin, peer=self.peer)
        self.session.start()

    def _on_open(self, channel: Channel, head: Open) -> None:
        assert isinstance(channel, SplicedChannel)
        self.session.spawn(answer(self.state, channel, head),
                           f"peer-answer:{self.origin}:{channel.id}")

    def _on_hello(self, hello: Hello) -> None:
        self.session.settings = adopt_hello(self.session.settings, hello)

    def close(self, code: int, reason: str) -> None:
        """Our CLOSE now; the bounded wait for the entry's in a task drain and stop wait for."""
        if self._closing:
            return
        self._closing = True
        self.socket.send_close(code, reason_bytes(reason))
        self.state.tasks.spawn(TUNNEL_CLOSE, finish_close(self.socket, patient=True),
                               f"peer-link-close:{self.origin}")

    # -- the socket's reports ------------------------------------------------------------------
    def received(self, data: bytes) -> None:
        try:
            self.session.feed(data)
        except ProtocolViolation as exc:
            self._violation(exc.message)

    def received_text(self) -> None:
        self._violation("text message on a peer link")

    def _violation(self, message: str) -> None:
        self.reason = "protocol_violation"
        log.warning("peer.link_protocol_violation", origin=self.origin, error=message)
        self.close(int(CloseCode.PROTOCOL_ERROR), fit_reason(message))

    def refused(self, message: str) -> None:
        self.reason = "protocol_violation"
        self._closing = True  # the socket sent its CLOSE and hung up itself
        log.warning("peer.link_protocol_violation", origin=self.origin, error=message)

    def ended(self, error: bool) -> None:
        if error:
            self.reason = "error"
        # Not from inside the socket's callback (a feed may be on the stack): next iteration.
        asyncio.get_running_loop().call_soon(self._disconnect)

    def _disconnect(self) -> None:
        if self._over:
            return
        self._over = True
        state = self.state
        self.session.fail_all(int(CloseCode.TUNNEL_GONE), "the peer link closed")
        state.answered_links.discard(self)
        state.metrics.peer_links.labels(side=PeerSide.OWNER).dec()
        log.info("peer.link_down", side=str(PeerSide.OWNER), origin=self.origin,
                 reason=self.reason)
        state.tasks.spawn(TUNNEL_RELEASE, self.session.close(), f"peer-link-end:{self.origin}")


def close_answered_links(state: RelayState) -> None:
    """Stopping: every link other relays opened to this one is closed (1001); stop waits for
    the close handshakes (bounded) with the tunnels'."""
    for link in list(state.answered_links):
        link.close(int(CloseCode.GOING_AWAY), "relay stopping")


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
