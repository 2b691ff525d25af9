"""The entry side of peer links: one persistent, multiplexed link per owner relay.

A request whose host's tunnel is on another relay rides a stream of the link to that relay
instead of a new HTTP request. The link speaks the tunnel protocol: this relay opens streams on
it as on an agent's tunnel (relay role) and the owner answers each from its own tunnel
(relay.server.peer_answer). A link is opened on the first forward to an owner (single-flight),
reused by every later request and channel, and opened again after it fails, with a bounded
backoff meanwhile. While an owner has no usable link (it offers none — an older relay — or it
cannot be reached, or the link is at its stream limit) requests go by the per-request HTTP
forward (relay.server.forward): :meth:`PeerLinks.session_for` answers None.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from functools import partial

import aiohttp
import structlog
from yarl import URL

from relay.aio import KeyedSingleFlight, TaskGroup
from relay.auth.ttlcache import TTLCache
from relay.directory.base import Owner
from relay.errors import CloseCode, ProtocolViolation
from relay.metrics import LinkOpen, PeerSide
from relay.protocol import frames
from relay.protocol.frames import MAX_STREAM_ID
from relay.protocol.messages import Hello
from relay.server.peers import LINK_PATH, sign_link
from relay.server.state import RelayState
from relay.server.tunnels import CLOSE_TIMEOUT_S
from relay.tunnel.feed import close_ws, feed_from
from relay.tunnel.session import Role, SessionSettings, TunnelSession
from relay.tunnel.sink import WebSocketSink

log = structlog.get_logger("relay.peer")

# Streams one link carries at once (every host of its owner together); past it a request
# goes by the HTTP forward rather than waiting.
LINK_MAX_STREAMS = 1024
LINK_OPEN_TIMEOUT_S = 5.0
# An owner that offers no links (404: an older relay, or directory.peer_links = false) is asked
# again this much later, so a rolling upgrade picks links up without a restart.
NOT_OFFERED_RETRY_S = 60.0
BACKOFF_FIRST_S = 0.25
# Where a host's tunnel is, remembered this long while the link to its owner is up: a
# directory round trip per forwarded request was a sixth of the entry relay's CPU. A tunnel
# that moved meanwhile is reached at the latest this much later (the old owner answers
# host_offline at once and that forgets the entry, as does its link going down).
OWNER_CACHE_S = 1.0
OWNER_CACHE_SIZE = 10_000
BACKOFF_MAX_S = 30.0


def link_settings(settings: SessionSettings) -> SessionSettings:
    return dataclasses.replace(settings, max_streams=LINK_MAX_STREAMS)


def backoff_s(failures: int) -> float:
    return float(min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, failures - 1)))


@dataclasses.dataclass(eq=False)
class PeerLink:
    owner_url: str
    session: TunnelSession
    ws: aiohttp.ClientWebSocketResponse

    def usable(self) -> bool:
        mux = self.session.mux
        return (mux.alive and not self.ws.closed and mux.next_stream_id <= MAX_STREAM_ID
                and len(mux.streams) < mux.settings.max_streams)

    @property
    def exhausted(self) -> bool:
        return self.session.mux.next_stream_id > MAX_STREAM_ID


class PeerLinks:
    """The links this relay opened, one per owner URL (owners come from the directory)."""

    def __init__(self, state: RelayState) -> None:
        self._state = state
        self._links: dict[str, PeerLink] = {}
        self._opening: KeyedSingleFlight[str, PeerLink | None] = KeyedSingleFlight(
            "peer-link-open")
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self._tasks = TaskGroup("peer-links")
        self._closed = False
        self.owners: TTLCache[str, Owner] = TTLCache(OWNER_CACHE_SIZE, OWNER_CACHE_S)
        self.opened = 0  # links opened since start (a test reads it)

    def __len__(self) -> int:
        return len(self._links)

    def link(self, owner_url: str) -> PeerLink | None:
        return self._links.get(owner_url)

    def owner(self, host_id: str) -> Owner | None:
        """The owner remembered for ``host_id``, while fresh and its link is up."""
        owner = self.owners.get(host_id)
        if owner is None:
            return None
        link = self._links.get(owner.url)
        if link is None or not link.session.alive:
            self.owners.pop(host_id)
            return None
        return owner

    def remember(self, host_id: str, owner: Owner) -> None:
        if owner.url in self._links:
            self.owners.set(host_id, owner)

    def forget(self, host_id: str) -> None:
        self.owners.pop(host_id)

    async def session_for(self, owner_url: str) -> TunnelSession | None:
        """The live link's session to ``owner_url`` (opened now if need be), or None: use HTTP."""
        link = self._links.get(owner_url)
        if link is not None:
            if link.usable():
                return link.session
            if not link.exhausted:
                return None  # at its stream limit: this one request goes by HTTP
            # Stream ids are never reused: a fresh link takes over; the old one ends when idle.
            del self._links[owner_url]
            self._tasks.spawn(self._retire(link), f"peer-link-retire:{owner_url}")
        if self._closed or time.monotonic() < self._retry_at.get(owner_url, 0.0):
            return None
        link = await self._opening(owner_url, partial(self._open, owner_url))
        return link.session if link is not None and link.usable() else None

    async def _open(self, owner_url: str) -> PeerLink | None:
        state = self._state
        assert state.client is not None and state.signer is not None
        metrics = state.metrics
        url = owner_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        settings = link_settings(state.settings)
        try:
            ws = await asyncio.wait_for(state.client.ws_connect(
                URL(url + LINK_PATH, encoded=True), headers=sign_link(state.signer),
                compress=0, autoping=True,
                max_msg_size=frames.max_message(settings.max_frame) + frames.MESSAGE_SLACK,
                timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S),
            ), LINK_OPEN_TIMEOUT_S)
        except aiohttp.WSServerHandshakeError as exc:
            offered = exc.status not in (404, 405)
            self._failed(owner_url, LinkOpen.REFUSED if offered else LinkOpen.NOT_OFFERED,
                         status=exc.status)
            return None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._failed(owner_url, LinkOpen.UNREACHABLE, error=type(exc).__name__)
            return None
        if self._closed:
            await close_ws(ws, int(CloseCode.GOING_AWAY), "relay stopping")
            return None
        link = PeerLink(owner_url, TunnelSession(
            WebSocketSink(ws), settings, role=Role.RELAY, name=f"peer-link:{owner_url}",
            on_silence=lambda: self._close_soon(link, int(CloseCode.KEEPALIVE_MISSED),
                                                "keepalive missed"),
            on_backlog=lambda why: self._close_soon(link, int(CloseCode.POLICY_VIOLATION),
                                                    "peer not reading"),
        ), ws)
        link.session.send_hello(Hello(
            host_id="", window=settings.window, max_frame=settings.max_frame,
            max_streams=settings.max_streams, ping_interval_s=settings.ping_interval_s,
            keepalive_misses=settings.keepalive_misses, max_ws_message=settings.max_ws_message))
        link.session.start()
        self._links[owner_url] = link
        self._failures.pop(owner_url, None)
        self._retry_at.pop(owner_url, None)
        self.opened += 1
        metrics.peer_link_opens_total.labels(outcome=LinkOpen.UP).inc()
        metrics.peer_links.labels(side=PeerSide.ENTRY).inc()
        log.info("peer.link_up", side=str(PeerSide.ENTRY), owner=owner_url)
        self._tasks.spawn(self._serve(link), f"peer-link:{owner_url}")
        return link

    def _failed(self, owner_url: str, outcome: LinkOpen, **detail: object) -> None:
        failures = self._failures[owner_url] = self._failures.get(owner_url, 0) + 1
        wait = NOT_OFFERED_RETRY_S if outcome is LinkOpen.NOT_OFFERED else backoff_s(failures)
        self._retry_at[owner_url] = time.monotonic() + wait
        self._state.metrics.peer_link_opens_total.labels(outcome=outcome).inc()
        event = "peer.link_unavailable" if outcome is LinkOpen.NOT_OFFERED else "peer.link_failed"
        log.warning(event, owner=owner_url, outcome=str(outcome), retry_in_s=round(wait, 2),
                    **detail)

    async def _serve(self, link: PeerLink) -> None:
        """Read the link until it ends; then its streams fail (the entry answers as for an
        unreachable owner) and the next forward opens a new one."""
        reason = "closed"
        try:
            if await feed_from(link.ws, link.session, "a peer link"):
                reason = "error"
        except ProtocolViolation as exc:
            reason = "protocol_violation"
            log.warning("peer.link_protocol_violation", owner=link.owner_url, error=exc.message)
            await close_ws(link.ws, int(CloseCode.PROTOCOL_ERROR), "protocol violation")
        finally:
            link.session.fail_all(int(CloseCode.TUNNEL_GONE), "the peer link closed")
            if self._links.get(link.owner_url) is link:
                del self._links[link.owner_url]
            self._state.metrics.peer_links.labels(side=PeerSide.ENTRY).dec()
            log.info("peer.link_down", side=str(PeerSide.ENTRY), owner=link.owner_url,
                     reason=reason, close_code=link.ws.close_code)
            await asyncio.shield(link.session.close())

    def _close_soon(self, link: PeerLink, code: int, reason: str) -> None:
        self._tasks.spawn(close_ws(link.ws, code, reason), f"peer-link-close:{link.owner_url}")

    async def _retire(self, link: PeerLink) -> None:
        await link.session.wait_idle(self._state.config.tunnel.request_timeout_s)
        await close_ws(link.ws, int(CloseCode.NORMAL), "stream ids exhausted")

    def fail_all(self, code: int, reason: str) -> None:
        """End every stream of every link now (a drain's end: 4503 to forwarded channels)."""
        for link in list(self._links.values()):
            link.session.fail_all(code, reason)

    async def close(self) -> None:
        """Stopping: close every link (1001) and stop every task of theirs, bounded."""
        self._closed = True
        await self._opening.cancel()
        links = list(self._links.values())
        for link in links:
            link.session.fail_all(int(CloseCode.GOING_AWAY), "relay stopping")
        await asyncio.gather(*(close_ws(link.ws, int(CloseCode.GOING_AWAY), "relay stopping")
                               for link in links))
        await self._tasks.cancel()
        for link in links:
            await link.session.close()
