"""The relay's per-instance state, shared by its handlers through one typed app key."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from relay.aio import TaskOwner
from relay.config import Config
from relay.metrics import Metrics
from relay.server.leases import LeaseWatch
from relay.server.registry import TunnelRegistry
from relay.tunnel.session import SessionSettings

if TYPE_CHECKING:
    from relay.auth.access import AccessPolicy
    from relay.auth.session import SessionCookies
    from relay.auth.tokens import TokenVerifier
    from relay.directory.base import Directory
    from relay.server.peerlink import PeerLinks
    from relay.server.peers import PeerSigner
    from relay.server.throttle import FailureThrottle
    from relay.server.tls import TlsContext
    from relay.tracing import Tracing
    from relay.tunnel.tunnel_socket import TunnelSocket
    from relay.tunnel.ws_channel import ChannelBridge


# The relay's task groups. Drain and stop wait for TUNNEL_CLOSE (the close handshakes they
# started); BACKGROUND holds the relay-wide loops, cancelled at stop.
TUNNEL_CLOSE = "tunnel-close"
TUNNEL_RELEASE = "tunnel-release"
BACKGROUND = "background"

CLOSE_TIMEOUT_S = 2.0  # a black-holed agent never answers our close frame


def session_settings(config: Config) -> SessionSettings:
    t = config.tunnel
    return SessionSettings(
        window=t.stream_window_bytes,
        max_frame=t.max_frame_bytes,
        max_streams=t.max_streams,
        max_ws_message=t.max_ws_message_bytes,
        ping_interval_s=t.ping_interval_s,
        keepalive_misses=t.keepalive_misses,
        max_outbox=t.max_outbox_bytes,
        max_pings_per_s=t.max_pings_per_s,
    )


@dataclass(eq=False)
class RelayState:
    config: Config
    metrics: Metrics
    registry: TunnelRegistry = field(default_factory=TunnelRegistry)
    leases: LeaseWatch = field(default_factory=LeaseWatch)  # credential deadlines, revocations
    settings: SessionSettings = field(default_factory=SessionSettings)
    verifier: TokenVerifier | None = None
    access: AccessPolicy | None = None
    directory: Directory | None = None
    client: aiohttp.ClientSession | None = None
    draining: bool = False
    inflight_http: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: TaskOwner = field(default_factory=TaskOwner)  # every task the relay starts
    notifier: Any = None
    signer: PeerSigner | None = None  # set when relays forward to each other
    links: PeerLinks | None = None  # the peer links this relay opened (relay.server.peerlink)
    # The peer links other relays opened to this one (relay.server.peer_answer), their sockets.
    answered_links: set[Any] = field(default_factory=set)
    # The tunnels' sockets, taken over from aiohttp's server (relay.server.tunnels): the relay's
    # stop hangs up what is left of them, as aiohttp's shutdown did for its connections.
    tunnel_sockets: set[TunnelSocket] = field(default_factory=set)
    # The clients' WebSocket channels, taken over from aiohttp too (relay.tunnel.ws_channel):
    # the stop waits for their close handshakes (bounded), then hangs up what is left.
    ws_bridges: set[ChannelBridge] = field(default_factory=set)
    # Refused tunnels in their lingering close (relay.server.tunnels.hang_up_refused): a
    # stopping relay hangs them up at once rather than wait out the grace.
    refusing: set[asyncio.Transport] = field(default_factory=set)
    sessions: SessionCookies | None = None  # browser navigation sessions (relay.auth.session)
    admin_throttle: FailureThrottle | None = None  # wrong admin secrets per peer address
    tracing: Tracing | None = None  # set when [tracing] otlp_endpoint is
    tls: TlsContext | None = None  # set when the relay serves TLS itself
    # Subjects whose tunnel was cut for a control flood, refused new tunnels for a while
    # (relay.server.tunnels; created with the first flood).
    flood_lockout: FailureThrottle | None = None
    # The monotonic clock that tunnels opened from now on (keepalive, stalled writes, the PING
    # budget) and the flood lockout read: a test moves a fake one instead of waiting it out.
    clock: Callable[[], float] = time.monotonic
    # The wall clock tokens' exp, nbf and iat are read against: the verifier, the credential
    # leases (LeaseWatch) and session cookies. A test sets the relay's time to just before a
    # token's exp rather than wait for it (build_app's wall_clock).
    wall_clock: Callable[[], float] = time.time
    # How long a tunnel's close handshake may wait for the agent's close frame before the relay
    # hangs up: a test lowers it rather than wait out the black-holed agent it plays.
    close_timeout_s: float = CLOSE_TIMEOUT_S

    def request_started(self) -> None:
        self.inflight_http += 1
        self.idle.clear()

    def request_finished(self) -> None:
        self.inflight_http -= 1
        if self.inflight_http <= 0:
            self.idle.set()


STATE: web.AppKey[RelayState] = web.AppKey("relay_state", RelayState)
