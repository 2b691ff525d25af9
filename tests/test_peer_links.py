"""Relays forward to each other over one persistent, multiplexed peer link per owner relay.

Real parts: a real redis-server, three in-process relays on real sockets (A and B offer peer
links, C is configured as an older relay without them), a real agent and host service.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from relay.aio import cancel_and_wait
from relay.config import load_config
from relay.devhost import pattern_bytes
from relay.errors import CloseCode
from relay.metrics import Metrics
from relay.protocol.frames import MAX_STREAM_ID
from relay.protocol.messages import Open
from relay.server.drain import drain
from relay.server.peerlink import OWNER_CACHE_S, PeerLinks
from relay.server.peers import LINK_CORK_S, LINK_PATH, PeerSigner, sign_link, stream_claims
from relay.tunnel.session import ChannelClosed, TunnelSession
from tests.harness import (
    LogCapture,
    RunningAgent,
    RunningHost,
    RunningRelay,
    eventually,
    host_app_with_hold,
    start_agent,
    start_host,
    start_relay,
    write_config,
)
from tests.rawws import RawWebSocket
from tests.redis_server import RedisServer, free_port

SECRET = "a-peer-secret-for-the-link-tests"
OWNED = "acme:laptop"  # its agent is on A (links)
OLD = "acme:old"  # its agent is on C (no links)
MiB = 1 << 20

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Fleet:
    a: RunningRelay
    b: RunningRelay
    c: RunningRelay
    host: RunningHost
    release: asyncio.Event  # lets the host's /hold requests answer
    client: aiohttp.ClientSession
    token: str

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def url(self, relay: RunningRelay, host_id: str, path: str) -> str:
        return f"{relay.url}/hosts/{host_id}{path}"

    def links(self) -> PeerLinks:
        assert self.b.state.links is not None
        return self.b.state.links


def _metric(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def _relay(tmp_path: Path, name: str, redis: RedisServer, *, links: bool) -> RunningRelay:
    folder = tmp_path / name
    folder.mkdir()
    port = free_port()
    return await start_relay(load_config(write_config(folder, {
        "server": {"port": port},
        "auth": {"dev_state_dir": str(tmp_path / "shared-state")},
        "directory": {"backend": "redis", "redis_url": redis.url, "instance_id": f"relay-{name}",
                      "peer_secret": SECRET, "advertise_url": f"http://127.0.0.1:{port}",
                      "heartbeat_s": 0.5, "entry_ttl_s": 3, "peer_links": links},
        "log": {"level": "info"},
    }), env={}))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    tmp_path = tmp_path_factory.mktemp("links")
    release = asyncio.Event()
    host = await start_host(host_app_with_hold(release))
    agents: list[RunningAgent] = []
    async with RedisServer() as redis:
        relays = [await _relay(tmp_path, name, redis, links=name != "c") for name in "abc"]
        a, b, c = relays
        client = aiohttp.ClientSession(auto_decompress=False)
        try:
            agents.append(await start_agent(a.ws_url, OWNED, host.url,
                                            token=a.agent_token(OWNED)))
            agents.append(await start_agent(c.ws_url, OLD, host.url, token=c.agent_token(OLD)))
            fleet = Fleet(a, b, c, host, release, client, b.token())
            for host_id in (OWNED, OLD):
                await _routable(fleet, host_id)
            yield fleet
        finally:
            await client.close()
            for agent in agents:
                await agent.stop()
            for relay in relays:
                await relay.stop()
            await host.stop()


async def _routable(fleet: Fleet, host_id: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        async with fleet.client.get(fleet.url(fleet.b, host_id, "/"), headers=fleet.auth()) as r:
            if r.status == 200:
                return
        assert time.monotonic() < deadline, f"{host_id} not routable through B"
        await asyncio.sleep(0.05)


def _link_to_a(fleet: Fleet) -> TunnelSession:
    link = fleet.links().link(fleet.a.url)
    assert link is not None, "B holds no link to A"
    return link.session


async def test_requests_and_channels_through_b_share_one_link_and_stay_exact(
    fleet: Fleet,
) -> None:
    a, b = fleet.a, fleet.b
    opened = fleet.links().opened
    streams = _metric(a.state.metrics, "relay_peer_link_streams_total", side="owner",
                      kind="http")
    forwarded = _metric(b.state.metrics, "relay_forwarded_requests_total", kind="http")

    async def small(n: int) -> bytes:
        async with fleet.client.get(fleet.url(b, OWNED, f"/small?size={n}"),
                                    headers=fleet.auth()) as r:
            assert r.status == 200
            return await r.read()

    bodies = await asyncio.gather(*(small(100 + i) for i in range(40)))
    assert [len(body) for body in bodies] == [100 + i for i in range(40)]
    # Bodies byte-exact both ways, bigger than any window.
    async with fleet.client.get(fleet.url(b, OWNED, "/bytes/5000000"), headers=fleet.auth()) as r:
        assert r.status == 200
        assert hashlib.sha256(await r.read()).digest() == hashlib.sha256(
            pattern_bytes(5_000_000)).digest()
    upload = os.urandom(3_000_000)
    async with fleet.client.post(fleet.url(b, OWNED, "/digest"), headers=fleet.auth(),
                                 data=upload) as r:
        assert r.status == 200
        assert (await r.json())["sha256"] == hashlib.sha256(upload).hexdigest()
    # Server-sent events arrive as sent: the first before the host has written the last.
    async with fleet.client.get(fleet.url(b, OWNED, "/sse?count=3&interval=0.5"),
                                headers=fleet.auth()) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 0.9)
        assert first == b'id: 0\ndata: {"n": 0}\n\n'
        assert (await r.read()).count(b"data:") == 2
    # What the host sees is the client's view, without the relays' claims.
    async with fleet.client.get(fleet.url(b, OWNED, "/inspect"), headers=fleet.auth()) as r:
        seen = {k.lower(): v for k, v in (await r.json())["headers"]}
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-host"] == f"127.0.0.1:{b.config.server.port}"
    assert not any(name.startswith("x-relay-") for name in seen)
    assert "authorization" not in seen
    # Statuses and the host's error answers come back unchanged.
    async with fleet.client.get(fleet.url(b, OWNED, "/status/418"), headers=fleet.auth()) as r:
        assert r.status == 418
    # A WebSocket channel rides the same link: frames and the host's close code intact.
    async with fleet.client.ws_connect(fleet.url(b, OWNED, f"/ws?token={fleet.token}"),
                                       protocols=("chat",)) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "hello"
        blob = os.urandom(300_000)
        await ws.send_bytes(blob)
        assert (await ws.receive(timeout=5)).data == blob
        await ws.send_str("close:4321")
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 4321

    http_count = 40 + 5
    assert fleet.links().opened == opened  # the fixture's first forward opened it
    assert len(fleet.links()) == 1 and len(a.state.answered_links) == 1
    assert _metric(a.state.metrics, "relay_peer_link_streams_total", side="owner",
                   kind="http") == streams + http_count
    assert _metric(b.state.metrics, "relay_forwarded_requests_total",
                   kind="http") == forwarded + http_count
    assert _metric(b.state.metrics, "relay_peer_links", side="entry") == 1
    assert _metric(a.state.metrics, "relay_peer_links", side="owner") == 1
    # Both ends write a link's batches at most LINK_CORK_S apart; a tunnel waits for the
    # whole loop iteration (bench W5: a relay busy with a burst no longer holds it back).
    (answered,) = a.state.answered_links
    (entry_end,) = fleet.links()._links.values()
    assert answered.session.cork_s == entry_end.session.cork_s == LINK_CORK_S
    (tunnel,) = a.state.registry
    assert tunnel.session.cork_s is None


async def test_an_owner_without_peer_links_is_reached_by_the_http_forward(fleet: Fleet) -> None:
    """Rolling upgrade: C offers no links (404), so B forwards to it per request, as before,
    and does not ask C again for every request."""
    b, c = fleet.b, fleet.c
    forwarded = _metric(b.state.metrics, "relay_forwarded_requests_total", kind="http")
    for _ in range(3):
        async with fleet.client.get(fleet.url(b, OLD, "/bytes/300000"),
                                    headers=fleet.auth()) as r:
            assert r.status == 200
            assert await r.read() == pattern_bytes(300_000)
    async with fleet.client.ws_connect(fleet.url(b, OLD, f"/ws?token={fleet.token}")) as ws:
        await ws.send_str("old relay")
        assert (await ws.receive(timeout=5)).data == "old relay"
    assert _metric(b.state.metrics, "relay_forwarded_requests_total",
                   kind="http") == forwarded + 3
    # Asked once (in the fixture's first request), remembered as not offered since.
    assert _metric(b.state.metrics, "relay_peer_link_opens_total", outcome="not_offered") == 1
    assert fleet.links().link(c.url) is None
    assert not c.state.answered_links


async def test_a_forged_or_replayed_link_is_refused_401_and_logged(fleet: Fleet) -> None:
    a = fleet.a
    url = f"{a.ws_url}{LINK_PATH}"
    refused = _metric(a.state.metrics, "relay_peer_links_refused_total")
    answered = len(a.state.answered_links)
    with LogCapture() as logs:
        for headers in ({}, sign_link(PeerSigner("not-the-peer-secret-at-all", "relay-x"))):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refusal:
                await fleet.client.ws_connect(url, headers=headers)
            assert refusal.value.status == 401
        good = sign_link(PeerSigner(SECRET, "relay-x"))
        async with fleet.client.ws_connect(url, headers=good) as ws:
            assert not ws.closed  # accepted once...
        with pytest.raises(aiohttp.WSServerHandshakeError) as refusal:
            await fleet.client.ws_connect(url, headers=good)  # ...never twice
        assert refusal.value.status == 401
    assert _metric(a.state.metrics, "relay_peer_links_refused_total") == refused + 3
    assert logs.text.count('"peer.link_refused"') == 3
    assert "replayed" in logs.text
    assert fleet.token not in logs.text
    await eventually(lambda: len(a.state.answered_links) == answered)


async def test_bad_framing_on_an_answered_link_is_1002_and_logged_as_a_violation(
    fleet: Fleet,
) -> None:
    """A signed link whose peer then breaks RFC 6455 (an unmasked frame) is refused 1002, and
    the owner logs it as the peer's protocol violation, naming the rule."""
    a = fleet.a
    answered = len(a.state.answered_links)
    with LogCapture() as logs:
        ws = await RawWebSocket.connect(a.config.server.port, LINK_PATH,
                                        sign_link(PeerSigner(SECRET, "relay-x")))
        try:
            await eventually(lambda: len(a.state.answered_links) == answered + 1)
            await ws.send_raw(bytes((0x82, 1)) + b"x")  # FIN + binary, no mask bit
            closed = await ws.wait_closed(within=5)
            assert closed is not None and closed.close_code == 1002
        finally:
            ws.abort()
        await eventually(lambda: len(a.state.answered_links) == answered)
        await eventually(lambda: '"peer.link_down"' in logs.text)
    violations = [e for e in logs.events if e["event"] == "peer.link_protocol_violation"]
    assert [e["error"] for e in violations] == ["client frame not masked"]
    assert [e["reason"] for e in logs.events if e["event"] == "peer.link_down"] == [
        "protocol_violation"]


async def test_a_failed_link_fails_its_request_as_an_unreachable_owner_then_reopens(
    fleet: Fleet,
) -> None:
    a, b = fleet.a, fleet.b
    await _routable(fleet, OWNED)
    link = _link_to_a(fleet)
    opened = fleet.links().opened
    fleet.release.clear()

    async def held() -> tuple[int, bytes]:
        async with fleet.client.get(fleet.url(b, OWNED, "/hold"), headers=fleet.auth()) as r:
            return r.status, await r.read()

    pending = asyncio.ensure_future(held())
    try:
        tunnel = a.state.registry.get(OWNED)
        assert tunnel is not None
        # In flight: on the link and on A's tunnel to the host, which holds it.
        await eventually(lambda: bool(link.channels) and bool(tunnel.session.channels))
        for answered in list(a.state.answered_links):  # the owner's end of the link breaks
            answered.close(int(CloseCode.INTERNAL_ERROR), "broken on purpose")
        status, body = await asyncio.wait_for(pending, 10)
    finally:
        fleet.release.set()
    assert status == 503 and b"host_offline" in body
    assert not link.alive
    # The next forward opens a new link, and it works.
    async with fleet.client.get(fleet.url(b, OWNED, "/small"), headers=fleet.auth()) as r:
        assert r.status == 200
    assert fleet.links().opened == opened + 1
    assert _link_to_a(fleet) is not link


async def test_a_refusal_by_the_owner_keeps_its_status_and_close_code(fleet: Fleet) -> None:
    """The directory names A for a host A does not hold (a stale entry): A answers over the
    link what it would answer a client itself, 503 host_offline (4404 on a socket)."""
    a, b = fleet.a, fleet.b
    signer = b.state.signer
    session = _link_to_a(fleet)
    assert signer is not None
    channel = session.open_channel(Open(kind="http", path="/", headers=stream_claims(
        signer, "acme:elsewhere", "alice", time.time() + 60)), fin=True)
    head = await asyncio.wait_for(channel.head, 5)
    assert head.status == 503
    body = b""
    while (chunk := await channel.read()) is not None:
        body += chunk.data
    assert b'"host_offline"' in body
    ws_channel = session.open_channel(Open(kind="ws", path="/ws", headers=stream_claims(
        signer, "acme:elsewhere", "alice", time.time() + 60)))
    assert (await asyncio.wait_for(ws_channel.head, 5)).status == 101
    with pytest.raises(ChannelClosed) as closed:
        await asyncio.wait_for(ws_channel.read(), 5)
    assert closed.value.code == CloseCode.HOST_NOT_CONNECTED
    assert a.state.registry.get("acme:elsewhere") is None


async def _held(progress: Callable[[], int], waiting: Callable[[], bool]) -> None:
    """Until ``progress`` stopped moving for 5 polls while ``waiting`` holds (bounded)."""
    deadline = time.monotonic() + 15
    last, still = -1, 0
    while still < 5:
        assert time.monotonic() < deadline, "the stream never stopped"
        now = progress()
        still = still + 1 if now == last and waiting() else 0
        last = now
        await asyncio.sleep(0.05)


async def test_a_paused_download_through_a_link_keeps_every_buffer_bounded(
    fleet: Fleet,
) -> None:
    """The client stops reading: the entry's link stream, the owner's link stream and the
    owner's tunnel channel each hold at most a window, and the host is held back."""
    a, b = fleet.a, fleet.b
    window = a.config.tunnel.stream_window_bytes
    max_frame = a.config.tunnel.max_frame_bytes
    size = 64 * MiB
    await _routable(fleet, OWNED)
    link = _link_to_a(fleet)
    tunnel = a.state.registry.get(OWNED)
    assert tunnel is not None
    async with fleet.client.get(fleet.url(b, OWNED, f"/bytes/{size}"),
                                headers=fleet.auth()) as resp:
        assert resp.status == 200
        received = len(await resp.content.readexactly(MiB))
        assert len(link.channels) == 1 and len(tunnel.session.channels) == 1
        entry_ch = next(iter(link.channels.values()))
        owner_ch = next(iter(tunnel.session.channels.values()))  # A's side of the tunnel
        # Everything between the host and the client fills up, then waits on credit.
        # A takes a chunk from its tunnel channel only once the link stream took it, so what
        # A holds of this stream (buffered, or in hand) is what the agent may not send again.
        # (The kernel's socket buffers fill first: poll until the agent is held.)
        await _held(lambda: owner_ch.bytes_in, lambda: owner_ch.recv_window.available < max_frame)
        moved = []
        for _ in range(20):
            await asyncio.sleep(0.05)
            assert entry_ch.buffered_bytes <= window
            assert owner_ch.buffered_bytes <= window
            assert owner_ch.recv_window.available < max_frame  # the agent waits for credit
            assert link.outbox_bytes <= window
            assert tunnel.session.outbox_bytes <= window
            moved.append(owner_ch.bytes_in)
        assert moved[-1] == moved[-5]  # nothing moves while the client does not read
        assert moved[-1] < size // 2
        while data := await resp.content.read(MiB):
            received += len(data)
    assert received == size


async def test_an_owner_that_says_not_here_is_forgotten_and_the_host_found_where_it_went(
    fleet: Fleet,
) -> None:
    """B remembers where a host's tunnel is while its link to the owner is up. The tunnel
    leaves A: A answers 503 host_offline over the link (as B would with no owner), B forgets
    A, and once the agent is on C, B's next request reaches it there."""
    a, b, c = fleet.a, fleet.b, fleet.c
    links = fleet.links()
    mover = "acme:mover"
    links.owners.ttl = 60.0  # what is checked is the forgetting, not the expiry
    try:
        agent = await start_agent(a.ws_url, mover, fleet.host.url, token=a.agent_token(mover))
        try:
            await _routable(fleet, mover)
            owner = links.owner(mover)
            assert owner is not None and owner.url == a.url
        finally:
            await agent.stop()
        await eventually(lambda: a.state.registry.get(mover) is None)
        answered = _metric(a.state.metrics, "relay_peer_link_streams_total", side="owner",
                           kind="http")
        async with fleet.client.get(fleet.url(b, mover, "/"), headers=fleet.auth()) as r:
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "host_offline"
        assert _metric(a.state.metrics, "relay_peer_link_streams_total", side="owner",
                       kind="http") == answered + 1  # A said it, over the link
        assert links.owner(mover) is None
        agent = await start_agent(c.ws_url, mover, fleet.host.url, token=c.agent_token(mover))
        try:
            async with fleet.client.get(fleet.url(b, mover, "/"), headers=fleet.auth()) as r:
                assert r.status == 200
        finally:
            await agent.stop()
    finally:
        links.owners.ttl = OWNER_CACHE_S


@contextlib.asynccontextmanager
async def _pair(tmp_path: Path, host: RunningHost) -> AsyncIterator[tuple[RunningRelay, ...]]:
    """A fresh owner and entry on their own Redis, the agent for OWNED on the owner."""
    async with RedisServer() as redis:
        relays = [await _relay(tmp_path, name, redis, links=True) for name in ("owner", "entry")]
        owner, _entry = relays
        agent = await start_agent(owner.ws_url, OWNED, host.url, token=owner.agent_token(OWNED))
        try:
            yield tuple(relays)
        finally:
            await agent.stop()
            for relay in relays:
                await relay.stop()


async def _wait_routable(client: aiohttp.ClientSession, entry: RunningRelay,
                         headers: dict[str, str]) -> None:
    deadline = time.monotonic() + 10
    while True:
        async with client.get(f"{entry.url}/hosts/{OWNED}/", headers=headers) as r:
            if r.status == 200:
                return
        assert time.monotonic() < deadline, "the entry relay cannot reach the host"
        await asyncio.sleep(0.05)


async def test_a_draining_owner_finishes_its_link_requests_and_refuses_new_ones(
    tmp_path: Path, fleet: Fleet,
) -> None:
    async with _pair(tmp_path, fleet.host) as (owner, entry):
        headers = {"Authorization": f"Bearer {entry.token()}"}
        await _wait_routable(fleet.client, entry, headers)
        fleet.release.clear()

        async def held() -> tuple[int, bytes]:
            async with fleet.client.get(f"{entry.url}/hosts/{OWNED}/hold",
                                        headers=headers) as r:
                return r.status, await r.read()

        pending = asyncio.ensure_future(held())
        draining = None
        try:
            tunnel = owner.state.registry.get(OWNED)
            assert tunnel is not None
            await eventually(lambda: bool(tunnel.session.channels))
            draining = asyncio.ensure_future(drain(owner.state, grace_s=10))
            await eventually(lambda: owner.state.draining)
            async with fleet.client.get(f"{entry.url}/hosts/{OWNED}/",
                                        headers=headers) as r:
                assert r.status == 503
                assert (await r.json())["error"]["code"] == "draining"
            fleet.release.set()
            assert await asyncio.wait_for(pending, 10) == (200, b"finally\n")
            await asyncio.wait_for(draining, 15)
        finally:
            fleet.release.set()
            await cancel_and_wait([t for t in (pending, draining) if t is not None])


async def test_a_draining_entry_closes_the_channels_it_forwards_4503(
    tmp_path: Path, fleet: Fleet,
) -> None:
    async with _pair(tmp_path, fleet.host) as (_owner, entry):
        token = entry.token()
        await _wait_routable(fleet.client, entry, {"Authorization": f"Bearer {token}"})
        async with fleet.client.ws_connect(
                f"{entry.ws_url}/hosts/{OWNED}/ws?token={token}") as ws:
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "hello"
            await asyncio.wait_for(drain(entry.state, grace_s=0.1), 10)
            msg = await ws.receive(timeout=5)
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert ws.close_code == CloseCode.DRAINING


async def test_a_link_out_of_stream_ids_is_replaced_and_retired_once_idle(fleet: Fleet) -> None:
    """Stream ids are never reused: a link that has used them all hands over to a new one."""
    await _routable(fleet, OWNED)
    old = _link_to_a(fleet)
    opened = fleet.links().opened
    old.mux.next_stream_id = MAX_STREAM_ID + 2  # as after 2^30 streams
    async with fleet.client.get(fleet.url(fleet.b, OWNED, "/small"), headers=fleet.auth()) as r:
        assert r.status == 200
    assert fleet.links().opened == opened + 1 and _link_to_a(fleet) is not old
    await eventually(lambda: not old.alive)  # it had no stream left: closed at once
