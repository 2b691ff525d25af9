"""Three relay processes on one real Redis behave, from the outside, like one relay."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from relay.auth.devissuer import mint_token
from relay.config import load_config
from relay.devhost import pattern_bytes
from relay.errors import CloseCode
from relay.server.peers import PeerSigner
from tests.harness import (
    RunningAgent,
    RunningHost,
    agent_token,
    spawn_relay_process,
    start_agent,
    start_host,
    write_config,
)
from tests.redis_server import RedisServer, free_port
from tests.tcp_balancer import FailoverBalancer

PEER_SECRET = "a-shared-peer-secret-for-tests"
HOST = "acme:laptop"
ENTRY_TTL_S = 2.0


@dataclass
class RelayProc:
    name: str
    port: int
    config_path: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = spawn_relay_process(self.config_path, log_file=self.log)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=5)


@dataclass
class Fleet:
    redis: RedisServer
    relays: list[RelayProc]
    host: RunningHost
    token: str
    client: aiohttp.ClientSession
    agent_token: str  # may serve every acme host

    def relay(self, name: str) -> RelayProc:
        return next(r for r in self.relays if r.name == name)

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def get(self, relay: RelayProc, path: str) -> tuple[int, bytes]:
        async with self.client.get(f"{relay.url}/hosts/{HOST}{path}", headers=self.auth(),
                                   timeout=aiohttp.ClientTimeout(total=20)) as resp:
            return resp.status, await resp.read()


async def _ready(relay: RelayProc, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as client:
        while time.monotonic() < deadline:
            try:
                async with client.get(f"{relay.url}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"{relay.name} not ready:\n{relay.log.read_text()[-3000:]}")


# One fleet for the whole module: starting Redis and three relay processes costs seconds, and
# every test leaves it as it found it (agents stopped; a relay or Redis a test killed is
# started again, and every relay is ready, before the next test begins).
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    tmp_path = tmp_path_factory.mktemp("fleet")
    async with RedisServer() as redis:
        shared_state = tmp_path / "shared-state"
        relays = []
        for name in ("a", "b", "c"):
            folder = tmp_path / name
            folder.mkdir()
            port = free_port()
            path = write_config(folder, {
                "server": {"port": port, "drain_grace_s": 2},
                "auth": {"dev_state_dir": str(shared_state)},
                "tunnel": {"ping_interval_s": 0.5, "request_timeout_s": 10},
                "directory": {
                    "backend": "redis", "redis_url": redis.url, "instance_id": f"relay-{name}",
                    "advertise_url": f"http://127.0.0.1:{port}", "peer_secret": PEER_SECRET,
                    "heartbeat_s": 0.4, "entry_ttl_s": ENTRY_TTL_S,
                },
                "log": {"level": "info"},
            })
            relays.append(RelayProc(name, port, path, folder / "relay.log"))
        token = mint_token(load_config(relays[0].config_path, env={}), "alice", ["acme"],
                           ttl_s=600)
        for relay in relays:
            relay.start()
        host = await start_host()
        client = aiohttp.ClientSession(auto_decompress=False)
        try:
            for relay in relays:
                await _ready(relay)
            yield Fleet(redis, relays, host, token, client,
                        agent_token(load_config(relays[0].config_path, env={}), "acme:*"))
        finally:
            await client.close()
            # Killed, not stopped: how they stop is not under test here (test_drain's), and a
            # refused tunnel's lingering close (2 s, test_redis_restart_...) would hold up a
            # SIGTERM's exit that long.
            for relay in relays:
                if relay.proc is not None and relay.proc.poll() is None:
                    relay.kill()
            await host.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def fleet(shared_fleet: Fleet) -> Fleet:
    """The shared fleet, whole again: Redis up and all three relays running and ready."""
    await shared_fleet.redis.start()
    for relay in shared_fleet.relays:
        if relay.proc is None or relay.proc.poll() is not None:
            relay.start()
    for relay in shared_fleet.relays:
        await _ready(relay, timeout=20)
    return shared_fleet


async def _agent_on(fleet: Fleet, relay_port: int) -> RunningAgent:
    return await start_agent(f"ws://127.0.0.1:{relay_port}", HOST, fleet.host.url,
                             token=fleet.agent_token)


async def _wait_routable(fleet: Fleet, relays: list[RelayProc], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    for relay in relays:
        while True:
            status, _ = await fleet.get(relay, "/")
            if status == 200:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{relay.name} cannot reach {HOST}: {status}")
            await asyncio.sleep(0.1)


async def test_http_through_a_non_owner_relay_is_byte_exact(fleet: Fleet) -> None:
    agent = await _agent_on(fleet, fleet.relay("a").port)
    try:
        await _wait_routable(fleet, fleet.relays)
        for name in ("b", "c"):
            status, body = await fleet.get(fleet.relay(name), "/bytes/5000000")
            assert status == 200
            expected = hashlib.sha256(pattern_bytes(5_000_000)).digest()
            assert hashlib.sha256(body).digest() == expected
        upload = os.urandom(3_000_000)
        async with fleet.client.post(f"{fleet.relay('b').url}/hosts/{HOST}/digest",
                                     headers=fleet.auth(), data=upload) as resp:
            assert resp.status == 200
            assert (await resp.json())["sha256"] == hashlib.sha256(upload).hexdigest()
        # The host sees the real client and the address it used, not the hop between relays.
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with (
            aiohttp.ClientSession(connector=connector) as from_elsewhere,
            from_elsewhere.get(f"{fleet.relay('b').url}/hosts/{HOST}/inspect",
                               headers=fleet.auth()) as resp,
        ):
            seen = {k.lower(): v for k, v in (await resp.json())["headers"]}
        assert seen["x-forwarded-for"] == "127.0.0.2"
        assert seen["x-forwarded-host"] == f"127.0.0.1:{fleet.relay('b').port}"
        assert seen["x-forwarded-proto"] == "http"
        assert not any(name.startswith("x-relay-") for name in seen)
        assert "authorization" not in seen
        # Errors keep their status and code end to end.
        async with fleet.client.get(f"{fleet.relay('c').url}/hosts/{HOST}/status/418",
                                    headers=fleet.auth()) as resp:
            assert resp.status == 418
        async with fleet.client.get(f"{fleet.relay('c').url}/hosts/other:box/",
                                    headers=fleet.auth()) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "not_in_org"
    finally:
        await agent.stop()


async def test_websocket_through_a_non_owner_relay_keeps_frames_and_close_codes(
    fleet: Fleet,
) -> None:
    agent = await _agent_on(fleet, fleet.relay("a").port)
    try:
        await _wait_routable(fleet, fleet.relays)
        url = f"{fleet.relay('b').url}/hosts/{HOST}/ws?token={fleet.token}"
        async with fleet.client.ws_connect(url, protocols=("chat",)) as ws:
            assert ws.protocol == "chat"
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "hello"
            blob = os.urandom(200_000)
            await ws.send_bytes(blob)
            assert (await ws.receive(timeout=5)).data == blob
            await ws.send_str("close:4321")
            msg = await ws.receive(timeout=5)
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 4321
        # A refusal at the entry relay is a close code, as on a single relay.
        async with fleet.client.ws_connect(
            f"{fleet.relay('c').url}/hosts/acme:nobody/ws?token={fleet.token}"
        ) as ws:
            await ws.receive(timeout=5)
            assert ws.close_code == 4404
    finally:
        await agent.stop()


async def test_killed_owner_is_reported_offline_within_expiry_and_agent_moves(
    fleet: Fleet,
) -> None:
    a, b, c = fleet.relays
    balancer = FailoverBalancer([a.port])
    await balancer.start()
    agent = await _agent_on(fleet, balancer.port)
    try:
        await _wait_routable(fleet, fleet.relays)
        a.kill()
        killed_at = time.monotonic()
        # Until the directory entry expires, B may still name A; afterwards it must say offline.
        while True:
            status, body = await fleet.get(b, "/")
            if status == 503 and b"host_offline" in body:
                break
            assert time.monotonic() - killed_at < ENTRY_TTL_S + 3, (status, body)
            await asyncio.sleep(0.1)
        # The load balancer now sends the agent to B; traffic resumes through B and C.
        balancer.backends = [b.port]
        await _wait_routable(fleet, [b, c], timeout=15)
        # A comes back empty; requests entering it reach the host on B.
        a.start()
        await _ready(a)
        await _wait_routable(fleet, [a, b, c])
    finally:
        await agent.stop()
        await balancer.stop()


async def test_redis_restart_heals_without_touching_local_traffic(fleet: Fleet) -> None:
    a, b, _ = fleet.relays
    agent = await _agent_on(fleet, a.port)
    try:
        await _wait_routable(fleet, fleet.relays)
        await fleet.redis.kill()
        async with aiohttp.ClientSession() as probe:
            async def not_ready() -> bool:
                async with probe.get(f"{b.url}/readyz") as resp:
                    return resp.status == 503
            deadline = time.monotonic() + 10
            while not await not_ready():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        # The owner keeps serving its own tunnel while Redis is down.
        status, _ = await fleet.get(a, "/")
        assert status == 200
        # New registrations are refused with a code that makes agents retry.
        async with fleet.client.ws_connect(
            f"ws://127.0.0.1:{b.port}/tunnel?hostId=acme:other&v=1&token={fleet.agent_token}"
        ) as ws:
            await ws.receive(timeout=10)
            assert ws.close_code == 1013
        await fleet.redis.start()
        for relay in fleet.relays:
            await _ready(relay, timeout=20)
        # The owner re-registered its tunnel: non-owners route to it again.
        await _wait_routable(fleet, fleet.relays, timeout=20)
    finally:
        await agent.stop()


def _signed(
    secret: str, relay: RelayProc, path: str, *, instance: str = "relay-x"
) -> dict[str, str]:
    signer = PeerSigner(secret, instance)
    return signer.sign("GET", f"/hosts/{HOST}{path}", HOST, "alice", "198.51.100.7")


async def test_forged_and_replayed_peer_requests_are_refused(fleet: Fleet) -> None:
    a, _b, _ = fleet.relays
    agent = await _agent_on(fleet, a.port)
    try:
        await _wait_routable(fleet, fleet.relays)
        url = f"{a.url}/hosts/{HOST}/"
        # A signature made with another secret: refused, and no token needed to learn that.
        async with fleet.client.get(url, headers=_signed("not-the-secret-at-all", a, "/")) as r:
            assert r.status == 401
        # Headers copied from a real forward and altered (another path) do not verify.
        headers = _signed(PEER_SECRET, a, "/")
        async with fleet.client.get(f"{a.url}/hosts/{HOST}/inspect", headers=headers) as r:
            assert r.status == 401
        # A valid signature is accepted once, never twice.
        headers = _signed(PEER_SECRET, a, "/")
        async with fleet.client.get(url, headers=headers) as r:
            assert r.status == 200
        async with fleet.client.get(url, headers=headers) as r:
            assert r.status == 401
            assert "replayed" in (await r.json())["error"]["message"]
        # A stale timestamp is refused even with a correct signature.
        old = PeerSigner(PEER_SECRET, "relay-x", clock=lambda: time.time() - 300)
        stale = old.sign("GET", f"/hosts/{HOST}/", HOST, "alice", "198.51.100.7")
        async with fleet.client.get(url, headers=stale) as r:
            assert r.status == 401
    finally:
        await agent.stop()


async def _forwarded_count(client: aiohttp.ClientSession, relay: RelayProc) -> float:
    async with client.get(f"{relay.url}/metrics") as r:
        metrics = await r.text()
    lines = [line for line in metrics.splitlines()
             if line.startswith('relay_forwarded_requests_total{kind="http"}')]
    return float(lines[0].split()[-1]) if lines else 0.0


async def test_loop_guard_never_forwards_a_forwarded_request(fleet: Fleet) -> None:
    a, b, _ = fleet.relays
    agent = await _agent_on(fleet, a.port)
    try:
        await _wait_routable(fleet, fleet.relays)
        before = await _forwarded_count(fleet.client, b)
        # A correctly signed forward that lands on B (not the owner) fails instead of hopping
        # on, even though B's directory knows the owner.
        headers = _signed(PEER_SECRET, b, "/")
        async with fleet.client.get(f"{b.url}/hosts/{HOST}/", headers=headers) as r:
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "host_offline"
        assert await _forwarded_count(fleet.client, b) == before
        # An ordinary client request entering B is forwarded (the counter does move).
        status, _ = await fleet.get(b, "/")
        assert status == 200
        assert await _forwarded_count(fleet.client, b) == before + 1
    finally:
        await agent.stop()


def _balanced_variant(port: int, redirect_port: int, relay_ports: list[int], log: Path) -> str:
    """deploy/nginx/relay.conf with its three upstream relays pointed at the test fleet."""
    from tests.test_nginx_config import ACCESS_LOG, CONF, substitute

    text = CONF.read_text()
    for index, relay_port in zip((1, 2, 3), relay_ports, strict=True):
        text = substitute(text, rf"^(\s*)server 10\.0\.0\.1{index}:8080\b",
                          rf"\1server 127.0.0.1:{relay_port}", 1)
    text = substitute(text, r"^(\s*)listen 80;", rf"\1listen 127.0.0.1:{redirect_port};", 1)
    text = substitute(text, r"^(\s*)listen 443 ssl http2;", rf"\1listen 127.0.0.1:{port};", 1)
    text = substitute(text, r"^\s*listen \[::\]:(80|443 ssl http2);\n", "", 2)
    text = substitute(text, r"^\s*ssl_\w+ [^;]*;\n", "", 7)
    return substitute(text, re.escape(ACCESS_LOG), str(log), 2)


async def test_nginx_example_balances_a_fleet_and_every_entry_reaches_the_host(
    fleet: Fleet, tmp_path: Path,
) -> None:
    from tests.test_nginx_config import running_nginx, wait_listening, wrapper

    port, redirect_port = free_port(), free_port()
    work = tmp_path / "nginx"
    work.mkdir()
    site = work / "relay.conf"
    site.write_text(_balanced_variant(port, redirect_port, [r.port for r in fleet.relays],
                                      work / "access.log"))
    conf = wrapper(work, site, extra="daemon off;\nmaster_process off;")
    before = [await _forwarded_count(fleet.client, relay) for relay in fleet.relays]
    with running_nginx(work, conf, port) as proc:
        await wait_listening(proc, port, work)
        # The agent, like every client, only knows the balancer's address.
        agent = await start_agent(f"ws://127.0.0.1:{port}", HOST, fleet.host.url,
                                  token=fleet.agent_token)
        try:
            base = f"http://127.0.0.1:{port}/hosts/{HOST}"
            for _ in range(12):  # least_conn spreads these over the three relays
                async with fleet.client.get(f"{base}/bytes/100000", headers=fleet.auth()) as r:
                    assert r.status == 200
                    assert await r.read() == pattern_bytes(100_000)
            for _ in range(3):
                async with fleet.client.ws_connect(f"{base}/ws?token={fleet.token}") as ws:
                    await ws.send_str("through the balancer")
                    assert (await ws.receive(timeout=5)).data == "through the balancer"
        finally:
            await agent.stop()
    # Every relay took part: the ones without the tunnel forwarded to its owner.
    forwarded = [await _forwarded_count(fleet.client, relay) for relay in fleet.relays]
    assert sum(1 for count, was in zip(forwarded, before, strict=True) if count > was) >= 1


# Last in the module: the relay it kills need not be started again for a test after it.
async def test_a_forwarded_channel_closes_4410_when_the_owner_relay_is_killed(
    fleet: Fleet,
) -> None:
    """The host's tunnel went away under the channel: the same 4410 as on a single relay, not
    the 1011 of a peer socket that died without a close frame."""
    a, b = fleet.relay("a"), fleet.relay("b")
    agent = await _agent_on(fleet, a.port)
    try:
        await _wait_routable(fleet, fleet.relays)
        url = f"{b.url}/hosts/{HOST}/ws?token={fleet.token}"
        async with fleet.client.ws_connect(url) as ws:
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "hello"
            a.kill()
            killed_at = time.monotonic()
            msg = await ws.receive(timeout=5)
            took = time.monotonic() - killed_at
            print(f"forwarded channel closed {msg.data} {took * 1000:.0f} ms after SIGKILL")
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert ws.close_code == CloseCode.TUNNEL_GONE
            assert msg.extra == "the host's tunnel went away"
    finally:
        await agent.stop()
