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
from collections.abc import Coroutine
from functools import partial
from typing import Any

import structlog

from relay.aio import KeyedSingleFlight, TaskGroup
from relay.auth.ttlcache import TTLCache
from relay.directory.base import Owner
from relay.errors import CloseCode, ProtocolViolation
from relay.metrics import LinkOpen, PeerSide
from relay.protocol import frames
from relay.protocol.close import reason_bytes
from relay.protocol.frames import MAX_STREAM_ID
from relay.protocol.messages import Hello
from relay.server.peers import LINK_CORK_S, LINK_PATH, sign_link
from relay.server.state import RelayState
from relay.server.tunnels import finish_close
from relay.tunnel.dial import HandshakeRefused, dial
from relay.tunnel.session import Role, SessionSettings, TunnelSession
from relay.tunnel.tunnel_socket import TunnelSocket

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


class PeerLink:
    """The entry's end of one link, on a client :class:`TunnelSocket` (its SocketOwner): the
    socket feeds the session synchronously, with no reader task."""

    def __init__(self, links: PeerLinks, owner_url: str) -> None:
        self.links = links
        self.owner_url = owner_url
        self.reason = "closed"
        self.counted = False  # in the relay_peer_links gauge
        self.started = False  # the upgrade went through: socket and session exist
        self.socket: TunnelSocket
        self.session: TunnelSession
        self._closing = False
        self._over = False

    def start(self, socket: TunnelSocket) -> None:
        """The upgrade is through: the session, and the HELLO that opens the link."""
        settings = link_settings(self.links.state.settings)
        self.socket = socket
        self.session = TunnelSession(
            socket, settings, role=Role.RELAY, name=f"peer-link:{self.owner_url}",
            cork_s=LINK_CORK_S,
            on_silence=lambda: self.close(int(CloseCode.KEEPALIVE_MISSED), "keepalive missed"),
            on_backlog=lambda why: self.close(int(CloseCode.POLICY_VIOLATION),
                                              "peer not reading"))
        self.session.send_hello(Hello(
            host_id="", window=settings.window, max_frame=settings.max_frame,
            max_streams=settings.max_streams, ping_interval_s=settings.ping_interval_s,
            keepalive_misses=settings.keepalive_misses, max_ws_message=settings.max_ws_message))
        self.session.start()
        self.started = True

    async def discard(self) -> None:
        """A link given up before it was offered: stop its session's tasks now."""
        if self.started:
            await self.session.close(int(CloseCode.GOING_AWAY), "relay stopping")

    def usable(self) -> bool:
        mux = self.session.mux
        return (mux.alive and not self._closing and not self.socket.closed
                and mux.next_stream_id <= MAX_STREAM_ID
                and len(mux.streams) < mux.settings.max_streams)

    @property
    def exhausted(self) -> bool:
        return self.session.mux.next_stream_id > MAX_STREAM_ID

    def close(self, code: int, reason: str) -> None:
        """Our CLOSE now; the bounded wait for the owner's in a task of the links'."""
        if self._closing:
            return
        self._closing = True
        self.socket.send_close(code, reason_bytes(reason))
        self.links.spawn(finish_close(self.socket, patient=True),
                         f"peer-link-close:{self.owner_url}")

    # -- the socket's reports (SocketOwner) ----------------------------------------------------
    def received(self, data: bytes) -> None:
        try:
            self.session.feed(data)
        except ProtocolViolation as exc:
            self._violation(exc.message)

    def received_text(self) -> None:
        self._violation("text message on a peer link")

    def _violation(self, message: str) -> None:
        self.reason = "protocol_violation"
        log.warning("peer.link_protocol_violation", owner=self.owner_url, error=message)
        self.close(int(CloseCode.PROTOCOL_ERROR), "protocol violation")

    def refused(self, message: str) -> None:
        self.reason = "protocol_violation"
        self._closing = True  # the socket sent its CLOSE and hung up itself
        log.warning("peer.link_protocol_violation", owner=self.owner_url, error=message)

    def ended(self, error: bool) -> None:
        if error:
            self.reason = "error"
        # Not from inside the socket's callback (a feed may be on the stack): next iteration.
        asyncio.get_running_loop().call_soon(self._disconnect)

    def _disconnect(self) -> None:
        """The link is over: its streams fail (the entry answers as for an unreachable owner)
        and the next forward opens a new one."""
        if self._over:
            return
        self._over = True
        self.session.fail_all(int(CloseCode.TUNNEL_GONE), "the peer link closed")
        self.links.ended(self)
        log.info("peer.link_down", side=str(PeerSide.ENTRY), owner=self.owner_url,
                 reason=self.reason, close_code=self.socket.close_code)
        self.links.spawn(self.session.close(), f"peer-link-end:{self.owner_url}")


class PeerLinks:
    """The links this relay opened, one per owner URL (owners come from the directory)."""

    def __init__(self, state: RelayState) -> None:
        self.state = state
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
        state = self.state
        assert state.signer is not None
        url = owner_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        max_message = (frames.max_message(link_settings(state.settings).max_frame)
                       + frames.MESSAGE_SLACK)
        link = PeerLink(self, owner_url)
        try:
            await asyncio.wait_for(dial(url + LINK_PATH, sign_link(state.signer), link,
                                        max_message=max_message, start=link.start),
                                   LINK_OPEN_TIMEOUT_S)
        except HandshakeRefused as exc:
            offered = exc.status not in (404, 405)
            self._failed(owner_url, LinkOpen.REFUSED if offered else LinkOpen.NOT_OFFERED,
                         status=exc.status)
            return None
        except (OSError, TimeoutError, ValueError) as exc:
            self._failed(owner_url, LinkOpen.UNREACHABLE, error=type(exc).__name__)
            return None
        except asyncio.CancelledError:
            await link.discard()  # stopping: the dial hung up; its session's tasks end too
            raise
        if self._closed:
            link.socket.abort()
            await link.discard()
            return None
        self._links[owner_url] = link
        self._failures.pop(owner_url, None)
        self._retry_at.pop(owner_url, None)
        self.opened += 1
        state.metrics.peer_link_opens_total.labels(outcome=LinkOpen.UP).inc()
        state.metrics.peer_links.labels(side=PeerSide.ENTRY).inc()
        link.counted = True
        log.info("peer.link_up", side=str(PeerSide.ENTRY), owner=owner_url)
        return link

    def _failed(self, owner_url: str, outcome: LinkOpen, **detail: object) -> None:
        failures = self._failures[owner_url] = self._failures.get(owner_url, 0) + 1
        wait = NOT_OFFERED_RETRY_S if outcome is LinkOpen.NOT_OFFERED else backoff_s(failures)
        self._retry_at[owner_url] = time.monotonic() + wait
        self.state.metrics.peer_link_opens_total.labels(outcome=outcome).inc()
        event = "peer.link_unavailable" if outcome is LinkOpen.NOT_OFFERED else "peer.link_failed"
        log.warning(event, owner=owner_url, outcome=str(outcome), retry_in_s=round(wait, 2),
                    **detail)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.spawn(coro, name)

    def ended(self, link: PeerLink) -> None:
        """``link`` is down: it is no longer offered, nor counted."""
        if self._links.get(link.owner_url) is link:
            del self._links[link.owner_url]
        if link.counted:
            link.counted = False
            self.state.metrics.peer_links.labels(side=PeerSide.ENTRY).dec()

    async def _retire(self, link: PeerLink) -> None:
        await link.session.wait_idle(self.state.config.tunnel.request_timeout_s)
        link.close(int(CloseCode.NORMAL), "stream ids exhausted")

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
            link.close(int(CloseCode.GOING_AWAY), "relay stopping")
        # Each close handshake is bounded (CLOSE_TIMEOUT_S, then a hang-up).
        await asyncio.gather(*(finish_close(link.socket, patient=True) for link in links))
        await self._tasks.cancel()
        for link in links:
            await link.session.close()
