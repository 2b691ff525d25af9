"""The tunnel endpoint: refusals, last write wins (4409), keepalive (4408) and the gauge."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from relay.config import load_config
from relay.errors import CloseCode
from relay.protocol import frames
from relay.protocol.frames import FrameType
from relay.server.drain import drain
from tests.clock import FakeClock
from tests.harness import (
    RunningRelay,
    Stack,
    eventually,
    start_relay,
    write_config,
)
from tests.test_rogue_agent import RawTunnel

HOST = "acme:laptop"


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[RunningRelay]:
    running = await start_relay(load_config(write_config(tmp_path), env={}))
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def sample(relay: RunningRelay, name: str, **labels: str) -> float | None:
    return relay.state.metrics.registry.get_sample_value(name, labels)


async def scrape_gauge(client: aiohttp.ClientSession, relay: RunningRelay) -> float:
    """``relay_tunnels_connected`` as an operator's scraper reads it from ``/metrics``."""
    async with client.get(f"{relay.url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("relay_tunnels_connected "):
            return float(line.split()[1])
    raise AssertionError("relay_tunnels_connected missing from /metrics")


async def get(
    client: aiohttp.ClientSession, relay: RunningRelay, path: str
) -> aiohttp.ClientResponse:
    return await client.get(f"{relay.url}/hosts/{HOST}{path}",
                            headers={"Authorization": f"Bearer {relay.token()}"},
                            timeout=aiohttp.ClientTimeout(total=10))


# -- refusals ----------------------------------------------------------------------------------

async def refused_with(client: aiohttp.ClientSession, relay: RunningRelay, query: str,
                       token: str | None) -> int | None:
    tunnel = await RawTunnel.connect(client, relay, HOST, token, query=query, wait_hello=False)
    code, reason = await tunnel.expect_close()
    assert reason, "a refusal says what to do"
    return code


async def test_tunnel_without_a_token_is_closed_4401(
    client: aiohttp.ClientSession, relay: RunningRelay
) -> None:
    assert await refused_with(client, relay, f"hostId={HOST}&v=1", None) == CloseCode.UNAUTHORIZED


async def test_tunnel_with_a_bad_token_is_closed_4401(
    client: aiohttp.ClientSession, relay: RunningRelay
) -> None:
    assert await refused_with(client, relay, f"hostId={HOST}&v=1", "bad.token.here") == 4401
    expired = relay.token(ttl_s=1, now=time.time() - 3600)
    assert await refused_with(client, relay, f"hostId={HOST}&v=1", expired) == 4401


async def test_tunnel_for_another_org_is_closed_4403(
    client: aiohttp.ClientSession, relay: RunningRelay
) -> None:
    token = relay.token(orgs=("globex",))
    assert await refused_with(client, relay, f"hostId={HOST}&v=1", token) == CloseCode.FORBIDDEN


@pytest.mark.parametrize("query", [
    "v=1", "hostId=&v=1", "hostId=acme&v=1", "hostId=acme/laptop&v=1", "hostId=acme%3Alaptop%3Ax",
    "hostId=acme:lap%0Atop&v=1", "hostId=acme:laptop&v=99", "hostId=acme:laptop&v=two",
])
async def test_tunnel_with_a_bad_request_is_closed_4400(
    client: aiohttp.ClientSession, relay: RunningRelay, query: str
) -> None:
    assert await refused_with(client, relay, query, relay.token()) == CloseCode.BAD_REQUEST
    assert relay.state.registry.get(HOST) is None


async def test_tunnel_offering_several_versions_gets_the_common_one(
    client: aiohttp.ClientSession, relay: RunningRelay
) -> None:
    tunnel = await RawTunnel.connect(client, relay, HOST, relay.agent_token(HOST),
                                     query=f"hostId={HOST}&v=99,1")
    assert tunnel.hello["version"] == 1
    await tunnel.close()


async def test_tunnel_on_a_draining_relay_is_closed_4503(
    client: aiohttp.ClientSession, relay: RunningRelay
) -> None:
    relay.state.draining = True
    try:
        assert await refused_with(client, relay, f"hostId={HOST}&v=1", relay.token()) == 4503
    finally:
        relay.state.draining = False


async def test_tunnel_token_in_the_query_is_accepted(
    client: aiohttp.ClientSession, relay: RunningRelay
) -> None:
    url = URL(f"{relay.ws_url}/tunnel").with_query({"hostId": HOST, "v": "1",
                                                    "token": relay.agent_token(HOST)})
    async with client.ws_connect(url) as ws:
        msg = await ws.receive(timeout=5)
        assert frames.decode(msg.data, 1 << 20).type is FrameType.HELLO


# -- last write wins ---------------------------------------------------------------------------

async def test_second_tunnel_replaces_the_first_which_gets_4409(
    client: aiohttp.ClientSession, relay: RunningRelay
) -> None:
    first = await RawTunnel.connect(client, relay, HOST, relay.agent_token(HOST))
    second = await RawTunnel.connect(client, relay, HOST, relay.agent_token(HOST, sub="bob"))
    try:
        code, _ = await first.expect_close()
        assert code == CloseCode.REPLACED
        current = relay.state.registry.get(HOST)
        assert current is not None and current.subject == "bob"
    finally:
        await first.close()
        await second.close()


async def test_rapid_reconnects_leave_only_the_newest(
    client: aiohttp.ClientSession, relay: RunningRelay
) -> None:
    tunnels = [await RawTunnel.connect(client, relay, HOST,
                                       relay.agent_token(HOST, sub=f"agent{i}"))
               for i in range(4)]
    try:
        for old in tunnels[:-1]:
            assert (await old.expect_close())[0] == CloseCode.REPLACED
        await eventually(lambda: sample(relay, "relay_tunnel_disconnects_total",
                                        reason="replaced") == 3)
        current = relay.state.registry.get(HOST)
        assert current is not None and current.subject == "agent3"
        request = asyncio.ensure_future(get(client, relay, "/"))
        await tunnels[-1].serve_http(b"newest")
        async with await request as resp:
            assert await resp.read() == b"newest"
        assert await scrape_gauge(client, relay) == 1
    finally:
        for tunnel in tunnels:
            await tunnel.close()


async def test_replaced_tunnel_close_does_not_remove_new_one(
    client: aiohttp.ClientSession, relay: RunningRelay
) -> None:
    first = await RawTunnel.connect(client, relay, HOST, relay.agent_token(HOST))
    second = await RawTunnel.connect(client, relay, HOST, relay.agent_token(HOST))
    try:
        assert (await first.expect_close())[0] == CloseCode.REPLACED
        await first.close()
        # The first tunnel's handler has finished its cleanup...
        await eventually(lambda: sample(relay, "relay_tunnel_disconnects_total",
                                        reason="replaced") == 1)
        # ...and left the second one registered, in the directory too, and serving.
        current = relay.state.registry.get(HOST)
        assert current is not None
        assert relay.state.directory is not None
        owner = await relay.state.directory.lookup(HOST)
        assert owner is not None and owner.epoch == current.epoch
        for n in range(3):
            request = asyncio.ensure_future(get(client, relay, f"/n/{n}"))
            head = await second.serve_http(f"second tunnel {n}".encode())
            assert head["path"] == f"/n/{n}"
            async with await request as resp:
                assert resp.status == 200
                assert await resp.read() == f"second tunnel {n}".encode()
        assert await scrape_gauge(client, relay) == 1
    finally:
        await second.close()


async def test_replaced_tunnel_that_never_answers_its_close_is_still_dropped(
    client: aiohttp.ClientSession, relay: RunningRelay
) -> None:
    """A dead-but-undetected old socket must not hold the new one back."""
    first = await RawTunnel.connect(client, relay, HOST, relay.agent_token(HOST), heartbeat_s=None)
    # The first "agent" is wedged: it never reads, so it never answers the close frame.
    started = time.monotonic()
    second = await RawTunnel.connect(client, relay, HOST, relay.agent_token(HOST))
    try:
        assert time.monotonic() - started < 1.0
        await eventually(lambda: sample(relay, "relay_tunnel_disconnects_total",
                                        reason="replaced") == 1, timeout=5)
        request = asyncio.ensure_future(get(client, relay, "/after"))
        await second.serve_http(b"new")
        async with await request as resp:
            assert await resp.read() == b"new"
    finally:
        await first.close()
        await second.close()


async def test_two_agents_for_one_host_the_newest_serves(full_stack: Stack) -> None:
    """A real agent replaced by a hand-driven one: requests go to the newest tunnel."""
    full_stack.agent.agent.backoff.cap = 30  # its slow retry must not come back mid-test
    raw = await RawTunnel.connect(full_stack.client, full_stack.relay, full_stack.host_id,
                                  full_stack.agent_token(full_stack.host_id))
    try:
        agent = full_stack.agent.agent
        await eventually(lambda: agent.last_outcome is not None)
        assert agent.last_outcome is not None and agent.last_outcome.code == CloseCode.REPLACED
        request = asyncio.ensure_future(full_stack.client.get(
            full_stack.url("/"), headers=full_stack.auth()))
        await raw.serve_http(b"from the newest tunnel")
        async with await request as resp:
            assert await resp.read() == b"from the newest tunnel"
    finally:
        await raw.close()


# -- keepalive ---------------------------------------------------------------------------------

@pytest.fixture
async def fast_ping_relay(tmp_path: Path) -> AsyncIterator[RunningRelay]:
    sections = {"tunnel": {"ping_interval_s": 0.2, "keepalive_misses": 3}}
    running = await start_relay(load_config(write_config(tmp_path, sections), env={}))
    try:
        yield running
    finally:
        await running.stop()


async def test_silent_tunnel_is_closed_4408_and_unregistered(
    client: aiohttp.ClientSession, fast_ping_relay: RunningRelay
) -> None:
    relay = fast_ping_relay
    tunnel = await RawTunnel.connect(client, relay, HOST, relay.agent_token(HOST), heartbeat_s=None)
    assert tunnel.hello["pingIntervalS"] == 0.2 and tunnel.hello["keepaliveMisses"] == 3
    started = time.monotonic()
    try:
        # The "agent" now reads nothing and answers nothing, not even the close frame.
        await eventually(lambda: relay.state.registry.get(HOST) is None, timeout=5,
                         interval=0.01)
        elapsed = time.monotonic() - started
        assert 0.5 <= elapsed < 0.6 + 0.5
        assert (await tunnel.expect_close())[0] == CloseCode.KEEPALIVE_MISSED
        assert sample(relay, "relay_tunnel_disconnects_total", reason="keepalive_missed") == 1
        assert await scrape_gauge(client, relay) == 0
        assert relay.state.directory is not None
        assert await relay.state.directory.lookup(HOST) is None
    finally:
        await tunnel.close()


async def next_frame(tunnel: RawTunnel) -> frames.Frame:
    """The next frame the relay sends, liveness included."""
    msg = await tunnel.ws.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.BINARY, msg
    return frames.decode(msg.data, 1 << 24)


async def test_tunnel_answering_pings_stays_registered(
    client: aiohttp.ClientSession, fast_ping_relay: RunningRelay
) -> None:
    relay = fast_ping_relay
    clock = FakeClock(time.monotonic())  # the tunnel's keepalive runs on it
    relay.state.clock = clock
    tunnel = await RawTunnel.connect(client, relay, HOST, relay.agent_token(HOST), heartbeat_s=None)
    try:
        registered = relay.state.registry.get(HOST)
        assert registered is not None
        session, interval = registered.session, relay.config.tunnel.ping_interval_s
        # Ten intervals on the relay's clock, over three times the silence limit (3 x 0.2 s):
        # each PING the relay sends when it is due is answered, and nothing else arrives.
        for _ in range(10):
            ping = await next_frame(tunnel)
            assert ping.type is FrameType.PING, ping.type
            await tunnel.send(frames.encode_ping(FrameType.PONG, ping.payload))
            await eventually(lambda: session.silent_for() == 0, interval=0.005)
            clock.advance(interval)
        assert (await next_frame(tunnel)).type is FrameType.PING  # the relay ticked on: alive
        assert relay.state.registry.get(HOST) is registered
    finally:
        await tunnel.close()


# -- what operators see ------------------------------------------------------------------------

async def test_tunnels_connected_gauge_follows_registrations(
    client: aiohttp.ClientSession, relay: RunningRelay
) -> None:
    assert await scrape_gauge(client, relay) == 0
    laptop = await RawTunnel.connect(client, relay, "acme:laptop",
                                     relay.agent_token("acme:laptop"))
    desktop = await RawTunnel.connect(client, relay, "acme:desktop",
                                      relay.agent_token("acme:desktop"))
    assert await scrape_gauge(client, relay) == 2
    replacement = await RawTunnel.connect(client, relay, "acme:laptop",
                                          relay.agent_token("acme:laptop"))
    await laptop.expect_close()
    await laptop.close()
    await eventually(lambda: sample(relay, "relay_tunnel_disconnects_total",
                                    reason="replaced") == 1)
    assert await scrape_gauge(client, relay) == 2
    await desktop.close()
    await eventually(lambda: relay.state.registry.get("acme:desktop") is None)
    assert await scrape_gauge(client, relay) == 1
    replacement.abort()
    await eventually(lambda: len(relay.state.registry) == 0)
    assert await scrape_gauge(client, relay) == 0
    assert sample(relay, "relay_tunnel_connects_total") == 3
    assert sample(relay, "relay_tunnel_rejections_total", code="unauthorized") is None


async def test_refused_tunnels_are_counted_by_code(
    client: aiohttp.ClientSession, relay: RunningRelay
) -> None:
    await refused_with(client, relay, f"hostId={HOST}&v=1", None)
    await refused_with(client, relay, f"hostId={HOST}&v=1", relay.token(orgs=("globex",)))
    assert sample(relay, "relay_tunnel_rejections_total", code="unauthorized") == 1
    assert sample(relay, "relay_tunnel_rejections_total", code="not_in_org") == 1
    assert await scrape_gauge(client, relay) == 0


async def test_drain_tells_every_tunnel_in_band_then_closes_4503(
    client: aiohttp.ClientSession, relay: RunningRelay
) -> None:
    tunnel = await RawTunnel.connect(client, relay, HOST, relay.agent_token(HOST))
    try:
        draining = asyncio.ensure_future(drain(relay.state, 0.1))
        notice = await tunnel.expect(FrameType.DRAIN)
        assert frames.decode_json(notice)["reconnectAfterS"] == 0
        assert (await tunnel.expect_close())[0] == CloseCode.DRAINING
        await asyncio.wait_for(draining, 5)
        await eventually(lambda: relay.state.registry.get(HOST) is None)
    finally:
        await tunnel.close()
