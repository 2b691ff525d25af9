"""``GET /tunnel``: accept an agent's WebSocket, register it (directory first), serve its frames.

An authorized tunnel is taken over from aiohttp (:func:`take_over`): the relay answers the
upgrade itself and serves the connection on a :class:`relay.tunnel.tunnel_socket.TunnelSocket`,
so an idle tunnel holds no HTTP request, handler task or WebSocketResponse. Refusals still go
through aiohttp's WebSocket (a close code is all a browser can read).

A tunnel lives no longer than its credential: it holds a lease that closes it 4401 at the
token's ``exp`` (plus the auth leeway) unless a v2 agent renews in-band (RENEW), and 4403 when
an operator revokes its subject or host. An agent that stops reading is cut off (1008), and so
is one that floods PINGs; its subject may then register no tunnel for ``tunnel.flood_lockout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog
from aiohttp import WSMsgType, web

from relay.auth.access import AccessRole
from relay.auth.hostid import parse_host_id
from relay.config import TunnelConfig
from relay.errors import (
    AccessUnavailable,
    BadRequest,
    CloseCode,
    Draining,
    Forbidden,
    LocalProtocolError,
    ProtocolViolation,
    RelayError,
    TooManyRequests,
)
from relay.metrics import DisconnectReason, QueueOutcome
from relay.protocol import frames
from relay.protocol.close import close_payload, fit_reason, reason_bytes
from relay.protocol.frames import SUPPORTED_VERSIONS, negotiate_version
from relay.protocol.messages import Hello, Renew, Renewed
from relay.server.edge import Authorized, authorize, require_param
from relay.server.httpedge import EdgeProtocol
from relay.server.registry import Tunnel
from relay.server.state import CLOSE_TIMEOUT_S as CLOSE_TIMEOUT_S  # the bound, where it is used
from relay.server.state import STATE, TUNNEL_CLOSE, TUNNEL_RELEASE, RelayState
from relay.server.throttle import FailureThrottle
from relay.tunnel.gate import StreamGate
from relay.tunnel.session import Role, TunnelSession
from relay.tunnel.tunnel_socket import SocketOwner, TunnelSocket, switching_protocols

log = structlog.get_logger("relay.tunnel")

# How long a refusal for a flood lockout is held back (at most): no longer than a refused
# close handshake may take anyway, so it holds a connection no longer than any refusal can.
FLOOD_REFUSAL_HOLD_S = CLOSE_TIMEOUT_S


async def close_refused(ws: web.WebSocketResponse, error: RelayError) -> web.WebSocketResponse:
    """Browsers cannot read a refused upgrade's status, so refusals are a close code + reason."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(
            ws.close(code=int(error.close_code), message=reason_bytes(error.message)),
            CLOSE_TIMEOUT_S,
        )
    return ws


async def hang_up_refused(ws: web.WebSocketResponse, error: RelayError,
                          transport: asyncio.Transport | None,
                          held: set[asyncio.Transport] | None = None,
                          ) -> web.WebSocketResponse:
    """Refuse a tunnel: the close frame, a grace for the agent to take it, then hang up, all
    without reading another byte from the agent.

    :func:`close_refused` (for browsers) waits for the peer's close frame by reading every
    message before it, for up to ``CLOSE_TIMEOUT_S``: a refused, even unauthenticated, peer
    that keeps sending made the relay read and decode all of it (tens of ms of CPU for each
    attempt). Here the socket stops being read once the close frame is written; the agent can
    still answer it (its reply lands in the kernel's buffer) before the relay drops the
    connection, which clients such as aiohttp need to report the code rather than 1006 — the
    lingering close nginx does for the same reason, minus the reading.
    """
    payload = close_payload(int(error.close_code), error.message)
    try:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.send_frame(
                payload.code.to_bytes(2, "big") + payload.reason_bytes, WSMsgType.CLOSE),
                CLOSE_TIMEOUT_S)
        if transport is not None and not transport.is_closing():
            transport.pause_reading()
            if held is not None:
                held.add(transport)
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        # Bounded; a paused socket reports no hang-up, but another close of ours would show.
        while (transport is not None and not transport.is_closing()  # noqa: ASYNC110
               and time.monotonic() < deadline):
            await asyncio.sleep(0.1)
    finally:
        if held is not None and transport is not None:
            held.discard(transport)
        if transport is not None and not transport.is_closing():
            transport.abort()  # what the agent sent after its upgrade was never read
    return ws


def peer_address(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return f"{peer[0]}:{peer[1]}" if peer else "unknown"


async def handle_tunnel(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    config = state.config
    max_message = frames.max_message(config.tunnel.max_frame_bytes) + frames.MESSAGE_SLACK
    # Only a refusal is answered through aiohttp's WebSocket; an authorized tunnel is taken
    # over (take_over). The upgrade is checked first, so a request that is no WebSocket
    # handshake still meets aiohttp's 400 before anything else.
    ws = web.WebSocketResponse(
        compress=False,
        autoping=True,
        timeout=CLOSE_TIMEOUT_S,
        # Room for the largest legal frame (a 256 KiB PING too), and a little more so a frame
        # just over its bound meets the codec's 1002 rather than the WebSocket layer's 1009.
        max_msg_size=max_message,
        writer_limit=1 << 20,
    )
    if not ws.can_prepare(request).ok:
        await ws.prepare(request)  # raises aiohttp's refusal of the handshake
    try:
        if state.draining:
            raise Draining()
        host_raw = require_param(request, "hostId")
        version = negotiate_version(request.query.get("v"))
        if version is None:
            speaks = ",".join(str(v) for v in sorted(SUPPORTED_VERSIONS))
            raise BadRequest(f"unsupported protocol version; this relay speaks v={speaks}")
        auth = await authorize(state, request, host_raw, allow_query_token=True,
                               role=AccessRole.AGENT)
        _check_flood_lockout(state, auth.identity.sub)
        assert state.directory is not None
        epoch = await state.directory.register(str(auth.host))
    except RelayError as error:
        state.metrics.tunnel_rejections_total.labels(code=str(error.code)).inc()
        log.info("tunnel.refused", code=str(error.code),
                 host_id=request.query.get("hostId", "")[:300], peer=peer_address(request))
        await ws.prepare(request)
        if isinstance(error, TooManyRequests):  # the flood lockout
            # Held before the refusal (nothing is read meanwhile), like nginx's limit_req
            # delay: an agent looping on refusals gets one a while, not one per round trip.
            await asyncio.sleep(min(error.retry_after_s or 1, FLOOD_REFUSAL_HOLD_S))
        return await hang_up_refused(ws, error, request.transport, state.refusing)
    return take_over(state, request, auth, epoch, version, max_message)


class TakenOver(web.StreamResponse):
    """What the tunnel handler returns once the connection is the relay's: aiohttp has
    nothing left to write (the 101 is out) and no connection to write it to."""

    def __init__(self) -> None:
        super().__init__(status=101)

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def take_over(state: RelayState, request: web.Request, auth: Authorized, epoch: str,
              version: int, max_message: int) -> web.StreamResponse:
    """Answer the authorized upgrade ourselves and serve the tunnel on a :class:`TunnelSocket`:
    aiohttp's handler, parser, request and WebSocketResponse are all let go."""
    served = ServedTunnel(state, str(auth.host), epoch, peer_address(request))
    try:
        return serve_upgraded(state, request, served, max_message, lambda socket: served.start(
            socket, version, auth.identity.sub, auth.identity.expires_at))
    except ConnectionResetError:
        # The agent left while it was being authorized: only its directory entry is left.
        state.tasks.spawn(TUNNEL_RELEASE, _unregister(state, str(auth.host), epoch),
                          f"tunnel-release:{auth.host}")
        raise


def serve_upgraded(state: RelayState, request: web.Request, owner: SocketOwner,
                   max_message: int, start: Callable[[TunnelSocket], None]
                   ) -> web.StreamResponse:
    """Write the ``101`` ourselves and move the connection to a :class:`TunnelSocket` reporting
    to ``owner`` (a tunnel, or a peer link's answering end); ``start`` sets the owner up on it
    before the first frame is read. Raises ConnectionResetError when the peer already left."""
    protocol = request.protocol
    key = request.headers["Sec-WebSocket-Key"]
    if not isinstance(protocol, EdgeProtocol):
        raise ConnectionResetError("a taken-over WebSocket needs the relay's connection edge")
    transport, tail = protocol.detach()
    transport.write(switching_protocols(key))
    socket = TunnelSocket(transport, owner, max_message=max_message,
                          sockets=state.tunnel_sockets)
    transport.set_protocol(socket)
    start(socket)
    if tail:
        socket.data_received(tail)
    return TakenOver()


def _check_flood_lockout(state: RelayState, subject: str) -> None:
    lockout = state.flood_lockout
    retry = lockout.retry_after(subject) if lockout is not None else None
    if retry is not None:
        raise TooManyRequests(f"this agent's tunnel was cut for a PING flood; retry in {retry} s",
                             retry_after_s=retry)


def _strike_flood(state: RelayState, subject: str) -> None:
    """A tunnel of ``subject`` was cut for a control flood: lock the subject out.

    By subject, not host: a wildcard agent token could register another host id per attempt.
    """
    lockout_s = state.config.tunnel.flood_lockout_s
    if lockout_s <= 0:
        return
    lockout = state.flood_lockout
    if lockout is None or lockout.lockout_s != lockout_s:
        lockout = state.flood_lockout = FailureThrottle(
            max_failures=1, window_s=lockout_s, lockout_s=lockout_s, clock=state.clock)
    if lockout.failed(subject) is not None:
        log.info("tunnel.flood_lockout", sub=subject, lockout_s=lockout_s)


def credential_deadline(state: RelayState, expires_at: float) -> float:
    """When a connection authorised by a token expiring at ``expires_at`` must close."""
    return expires_at + state.config.auth.leeway_s


class ServedTunnel:
    """One authorized tunnel on its :class:`TunnelSocket`: the session fed from the socket, its
    registration and lease, and what its end releases. It replaces the handler coroutine that
    lived as long as the tunnel (with aiohttp's request around it)."""

    __slots__ = ("_close_code", "_close_label", "_close_reason", "_closing", "_over", "_seen",
                 "epoch", "gate", "host_id", "peer", "renewal", "session", "socket", "state",
                 "tunnel")

    def __init__(self, state: RelayState, host_id: str, epoch: str, peer: str) -> None:
        self.state = state
        self.host_id = host_id
        self.epoch = epoch
        self.peer = peer
        self._close_code: int | None = None  # what request_close asked for (the label's source)
        self._close_reason = ""
        self._close_label: DisconnectReason | None = None
        self._closing = False  # our CLOSE is out (whoever sent it)
        self._over = False  # the disconnect ran
        self._seen = DisconnectReason.AGENT_CLOSED  # why, when nobody on this side closed it
        self.renewal: asyncio.Task[None] | None = None

    def start(self, socket: TunnelSocket, version: int, subject: str, expires_at: float) -> None:
        state, host_id = self.state, self.host_id
        metrics = state.metrics
        self.socket = socket
        self.session = session = TunnelSession(
            socket,
            state.settings,
            role=Role.RELAY,
            name=host_id,
            version=version,
            clock=state.clock,
            on_silence=self._on_silence,
            on_backlog=self._on_backlog,
            on_renew=self._on_renew,
            on_flood=self._on_flood,
            on_exhausted=self._on_exhausted,
        )
        tunnel_config = state.config.tunnel
        self.gate = StreamGate.build(tunnel_config.max_streams,
                                     per_subject=tunnel_config.max_streams_per_subject,
                                     max_queued=tunnel_config.max_queued,
                                     queue_timeout_s=tunnel_config.queue_timeout_s,
                                     observe=_queue_observer(state))
        self.tunnel = tunnel = Tunnel(host_id=host_id, session=session, peer=self.peer,
                                      subject=subject, close=self.request_close, gate=self.gate,
                                      epoch=self.epoch)
        deadline = credential_deadline(state, expires_at)
        tunnel.lease = state.leases.hold(subject, host_id, deadline, "tunnel", self.request_close)
        replaced = state.registry.register(tunnel)
        if replaced is not None:
            log.info("tunnel.replaced", host_id=host_id, old_peer=replaced.peer,
                     new_peer=tunnel.peer)
            replaced.close(int(CloseCode.REPLACED), "replaced by a newer tunnel")
        metrics.tunnels_connected.set(len(state.registry))
        metrics.tunnel_connects_total.inc()
        settings = state.settings
        session.send_hello(Hello(
            version=version, host_id=host_id, window=settings.window,
            max_frame=settings.max_frame, max_streams=settings.max_streams,
            ping_interval_s=settings.ping_interval_s, keepalive_misses=settings.keepalive_misses,
            max_ws_message=settings.max_ws_message,
            open_timeout_s=tunnel_config.open_timeout_s,
            request_timeout_s=tunnel_config.request_timeout_s,
            # What v2 adds: RENEW, and when this tunnel closes (4401) unless it renews.
            renew=version >= 2, expires_at=deadline if version >= 2 else None,
        ))
        session.start(keepalive=False)  # the relay-wide keepalive loop pings it (app.py)
        log.info("tunnel.connected", host_id=host_id, peer=tunnel.peer, sub=subject)

    # -- closing ---------------------------------------------------------------------------------
    def request_close(self, code: int, reason: str, *, label: DisconnectReason | None = None,
                      patient: bool = True) -> None:
        if self._close_code is not None:
            return
        self._close_code, self._close_reason, self._close_label = code, reason, label
        self._close(code, reason, patient=patient)

    def _close(self, code: int, reason: str, *, patient: bool = True) -> None:
        """Our CLOSE now; the wait for the agent's (bounded, then a hang-up) in a task of the
        relay's, which drain and stop wait for."""
        if self._closing:
            return
        self._closing = True
        self.socket.send_close(code, reason_bytes(reason))
        self.state.tasks.spawn(
            TUNNEL_CLOSE,
            finish_close(self.socket, patient=patient, timeout_s=self.state.close_timeout_s),
            f"tunnel-close:{self.host_id}")

    def _on_silence(self) -> None:
        self.request_close(int(CloseCode.KEEPALIVE_MISSED), "keepalive missed")

    def _on_backlog(self, why: str) -> None:
        self.request_close(int(CloseCode.POLICY_VIOLATION), "tunnel peer not reading")

    def _on_exhausted(self) -> None:
        # No id is left for a new stream: the session sent DRAIN so the agent comes back on a
        # fresh tunnel. It leaves once its streams are done; if not, the tunnel closes 4503.
        self.session.spawn(_close_when_idle(self.session, self.request_close,
                                            self.state.config.tunnel),
                           f"tunnel-exhausted:{self.host_id}")

    def _on_flood(self, frame: str) -> None:
        # A flooder is not owed a close handshake: every frame it sends meanwhile costs a read.
        self.request_close(int(CloseCode.POLICY_VIOLATION), f"too many {frame} frames",
                           label=DisconnectReason.CONTROL_FLOOD, patient=False)

    def _on_renew(self, renew: Renew) -> None:
        if self.renewal is not None and not self.renewal.done():
            # The agent gave up waiting and sent a newer one: only the latest is answered, so
            # one tunnel never has more than one check running.
            self.renewal.cancel()
        self.renewal = self.session.spawn(_renew(self.state, self.tunnel, renew.token),
                                          f"tunnel-renew:{self.host_id}")

    # -- the socket's reports (SocketOwner) ------------------------------------------------------
    def received(self, data: bytes) -> None:
        try:
            self.session.feed(data)
        except ProtocolViolation as exc:
            self._violation(exc.message)
        except LocalProtocolError as exc:
            # Our own bug, not the agent's: 1011, and the traceback for whoever fixes it.
            self._seen = DisconnectReason.INTERNAL_ERROR
            log.error("tunnel.local_protocol_error", host_id=self.host_id, error=exc.message,
                      exc_info=exc)
            self._close(int(CloseCode.INTERNAL_ERROR), "internal error")

    def received_text(self) -> None:
        self._violation("text message on the tunnel")

    def _violation(self, message: str) -> None:
        self._seen = DisconnectReason.PROTOCOL_VIOLATION
        log.warning("tunnel.protocol_violation", host_id=self.host_id, error=message)
        self._close(int(CloseCode.PROTOCOL_ERROR), fit_reason(message))

    def refused(self, message: str) -> None:
        self._seen = DisconnectReason.PROTOCOL_VIOLATION
        self._closing = True  # the socket sent its CLOSE and hung up itself
        log.warning("tunnel.protocol_violation", host_id=self.host_id, error=message)

    def ended(self, error: bool) -> None:
        if error:
            self._seen = DisconnectReason.ERROR
        # Not from inside the socket's callback (a feed may be on the stack): next iteration.
        asyncio.get_running_loop().call_soon(self._disconnect)

    def _disconnect(self) -> None:
        """The tunnel is over: everything that must happen, now; the asynchronous rest in a
        task the relay owns."""
        if self._over:
            return
        self._over = True
        state, session, tunnel = self.state, self.session, self.tunnel
        metrics = state.metrics
        session.fail_all(int(CloseCode.TUNNEL_GONE), "the host's tunnel went away")
        self.gate.close()
        state.leases.end(tunnel.lease)
        still_current = state.registry.unregister(tunnel)
        metrics.tunnels_connected.set(len(state.registry))
        why = _reason_label(self._close_code, self._close_label, self._seen)
        metrics.tunnel_disconnects_total.labels(reason=why).inc()
        if why is DisconnectReason.CONTROL_FLOOD:
            _strike_flood(state, tunnel.subject)
        log.info("tunnel.disconnected", host_id=self.host_id, peer=tunnel.peer, reason=str(why),
                 close_reason=self._close_reason, replaced=not still_current)
        state.tasks.spawn(TUNNEL_RELEASE,
                          _release(state, session, self.host_id, self.epoch, still_current),
                          f"tunnel-release:{self.host_id}")


async def _close_when_idle(session: TunnelSession, close: Callable[[int, str], None],
                           tunnel_config: TunnelConfig) -> None:
    """Close a tunnel that can open no more streams once its last one ends (bounded)."""
    await session.wait_idle(tunnel_config.request_timeout_s)
    close(int(CloseCode.DRAINING), "stream ids exhausted; reconnect")


def _queue_observer(state: RelayState) -> Callable[[str, float], None]:
    metrics = state.metrics

    def observe(outcome: str, waited_s: float) -> None:
        metrics.stream_queue_total.labels(outcome=outcome).inc()
        if outcome != QueueOutcome.QUEUE_FULL:
            metrics.stream_queue_wait_seconds.observe(waited_s)

    return observe


async def _renew(state: RelayState, tunnel: Tunnel, token: str) -> None:
    """Check a RENEW's token like a new registration (same subject, role agent): move the
    tunnel's deadline and answer RENEWED, or close the tunnel (4401 bad token, 4403 refused)."""
    assert state.verifier is not None and state.access is not None
    session = tunnel.session
    try:
        identity = await state.verifier.verify(token)
        if identity.sub != tunnel.subject:
            raise Forbidden("a renewal must carry a token for the tunnel's own subject")
        await state.access.check(identity, parse_host_id(tunnel.host_id), token,
                                 role=AccessRole.AGENT)
    except AccessUnavailable as error:
        # Not the agent's fault: keep the tunnel and its current deadline; it retries.
        log.info("tunnel.renew_deferred", host_id=tunnel.host_id, code=str(error.code))
        session.send_renewed(Renewed(error_code=str(error.code), error_message=error.message,
                                     retry_after_s=error.retry_after_s or 1))
        return
    except RelayError as error:
        log.info("tunnel.renew_refused", host_id=tunnel.host_id, code=str(error.code),
                 close_code=int(error.close_code))
        tunnel.close(int(error.close_code), fit_reason(error.message))
        return
    deadline = credential_deadline(state, identity.expires_at)
    if tunnel.lease is not None:
        state.leases.move(tunnel.lease, deadline)
    session.send_renewed(Renewed(expires_at=deadline))
    log.info("tunnel.renewed", host_id=tunnel.host_id, sub=tunnel.subject,
             expires_in_s=round(deadline - state.wall_clock(), 1))


async def _unregister(state: RelayState, host_id: str, epoch: str) -> None:
    if state.directory is not None:
        await state.directory.unregister(host_id, epoch)


async def _release(
    state: RelayState, session: TunnelSession, host_id: str, epoch: str, still_current: bool
) -> None:
    """Stop the session's tasks and, if this tunnel was still current, its directory entry."""
    await session.close(int(CloseCode.TUNNEL_GONE), "the host's tunnel went away")
    if still_current:
        await _unregister(state, host_id, epoch)


_REASON_BY_CODE = {
    int(CloseCode.REPLACED): DisconnectReason.REPLACED,
    int(CloseCode.KEEPALIVE_MISSED): DisconnectReason.KEEPALIVE_MISSED,
    int(CloseCode.DRAINING): DisconnectReason.DRAINING,
    int(CloseCode.UNAUTHORIZED): DisconnectReason.UNAUTHORIZED,
    int(CloseCode.FORBIDDEN): DisconnectReason.FORBIDDEN,
    int(CloseCode.POLICY_VIOLATION): DisconnectReason.NOT_READING,
    int(CloseCode.GOING_AWAY): DisconnectReason.STOPPING,
}


def _reason_label(code: int | None, label: DisconnectReason | None,
                  fallback: DisconnectReason) -> DisconnectReason:
    """Why the tunnel ended: the label its closer gave, else its close code's, else ``fallback``
    (what the socket saw when nobody on this side closed it)."""
    if label is not None:
        return label
    if code is None:
        return fallback
    return _REASON_BY_CODE.get(code, DisconnectReason.OTHER)


async def finish_close(socket: TunnelSocket, *, patient: bool,
                       timeout_s: float = CLOSE_TIMEOUT_S) -> None:
    """After our CLOSE: wait for the agent's (``timeout_s`` at most), but never on a peer that
    may be gone for good.

    ``patient=False``: drop the connection at once.
    """
    clean = False
    try:
        if patient:
            clean = await asyncio.wait_for(socket.wait_closed(), timeout_s)
    except TimeoutError:
        pass
    finally:
        # On a black-holed path the close handshake never completes: drop the socket.
        if not clean:
            socket.abort()
