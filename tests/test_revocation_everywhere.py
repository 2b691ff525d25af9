"""An admin revocation on one relay reaches every relay (Redis pub/sub): their access caches,
and the WebSocket channels they hold for what was revoked."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from relay.config import load_config
from relay.errors import CloseCode
from tests.harness import RunningRelay, start_agent, start_host, start_relay, write_config
from tests.redis_server import RedisServer, free_port
from tests.test_e2e_auth import CheckAccess

SECRET = "admin-secret-for-tests"


async def test_revocation_on_one_relay_takes_effect_on_every_relay(tmp_path: Path) -> None:
    check = CheckAccess()
    upstream = await start_host(check.app())
    host_service = await start_host()
    async with RedisServer() as redis:
        relays = []
        for name in ("a", "b"):
            folder = tmp_path / name
            folder.mkdir()
            port = free_port()
            config = load_config(write_config(folder, {
                "server": {"port": port},
                "auth": {"dev_state_dir": str(tmp_path / "shared-state")},
                "access": {"backend": "upstream", "upstream_url": f"{upstream.url}/check-access",
                           "allow_ttl_s": 600},
                "directory": {"backend": "redis", "redis_url": redis.url,
                              "instance_id": f"relay-{name}", "peer_secret": "p" * 24,
                              "advertise_url": f"http://127.0.0.1:{port}",
                              "heartbeat_s": 0.5, "entry_ttl_s": 3},
                "admin": {"secret": SECRET},
            }), env={})
            relays.append(await start_relay(config))
        a, b = relays
        agent = await start_agent(a.ws_url, "acme:laptop", host_service.url, token=a.agent_token())
        try:
            token = a.token(sub="zoe")
            headers = {"Authorization": f"Bearer {token}"}
            async with aiohttp.ClientSession() as client:
                for relay in (a, b):  # each relay caches its own allow for (zoe, acme:laptop)
                    async with client.get(f"{relay.url}/hosts/acme:laptop/",
                                          headers=headers) as resp:
                        assert resp.status == 200
                calls_before = len([c for c in check.calls if c[1] == "acme:laptop"])
                check.allowed = False
                async with client.get(f"{b.url}/hosts/acme:laptop/", headers=headers) as resp:
                    assert resp.status == 200  # still cached on B: revocation is what fixes it
                async with client.post(f"{a.url}/admin/revoke", json={"sub": "zoe"},
                                       headers={"Authorization": f"Bearer {SECRET}"}) as resp:
                    assert resp.status == 200
                deadline = time.monotonic() + 5
                while True:
                    async with client.get(f"{b.url}/hosts/acme:laptop/",
                                          headers=headers) as resp:
                        if resp.status == 403:
                            assert (await resp.json())["error"]["code"] == "not_registered"
                            break
                    assert time.monotonic() < deadline, "revocation did not reach relay B"
                    await asyncio.sleep(0.05)
                async with client.get(f"{a.url}/hosts/acme:laptop/", headers=headers) as resp:
                    assert resp.status == 403
                assert len([c for c in check.calls if c[1] == "acme:laptop"]) > calls_before
        finally:
            await agent.stop()
            for relay in relays:
                await relay.stop()
            await upstream.stop()
            await host_service.stop()


@contextlib.asynccontextmanager
async def two_relays(tmp_path: Path, redis: RedisServer) -> AsyncIterator[list[RunningRelay]]:
    relays = []
    try:
        for name in ("a", "b"):
            folder = tmp_path / name
            folder.mkdir()
            port = free_port()
            config = load_config(write_config(folder, {
                "server": {"port": port},
                "auth": {"dev_state_dir": str(tmp_path / "shared-state")},
                "directory": {"backend": "redis", "redis_url": redis.url,
                              "instance_id": f"relay-{name}", "peer_secret": "p" * 24,
                              "advertise_url": f"http://127.0.0.1:{port}",
                              "heartbeat_s": 0.5, "entry_ttl_s": 3},
                "admin": {"secret": SECRET},
            }), env={})
            relays.append(await start_relay(config))
        yield relays
    finally:
        for relay in relays:
            await relay.stop()


async def _echoing_channel(client: aiohttp.ClientSession, relay: RunningRelay,
                           token: str) -> aiohttp.ClientWebSocketResponse:
    deadline = time.monotonic() + 5
    while True:  # the directory entry may take a moment to reach the other relay
        ws = await client.ws_connect(f"{relay.ws_url}/hosts/acme:laptop/ws",
                                     headers={"Authorization": f"Bearer {token}"})
        await ws.send_str("hello")
        msg = await asyncio.wait_for(ws.receive(), 5)
        if msg.type is aiohttp.WSMsgType.TEXT:
            return ws
        assert time.monotonic() < deadline, f"no channel through {relay.url}: {msg}"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("agent_on", ["a", "b"])
async def test_a_revocation_on_one_relay_closes_channels_held_on_another_4403(
    tmp_path: Path, agent_on: str,
) -> None:
    """The client's socket is on relay B; the revocation is posted on relay A. With the agent
    on B the channel is B's own; with the agent on A it is forwarded from B to A."""
    host_service = await start_host()
    async with RedisServer() as redis, two_relays(tmp_path, redis) as (a, b):
        owner = a if agent_on == "a" else b
        agent = await start_agent(owner.ws_url, "acme:laptop", host_service.url,
                                  token=a.agent_token(sub="agent"))
        try:
            async with aiohttp.ClientSession() as client:
                zoe = await _echoing_channel(client, b, b.token(sub="zoe"))
                yan = await _echoing_channel(client, b, b.token(sub="yan"))
                revoked_at = time.monotonic()
                async with client.post(f"{a.url}/admin/revoke", json={"sub": "zoe"},
                                       headers={"Authorization": f"Bearer {SECRET}"}) as resp:
                    assert resp.status == 200
                async with asyncio.timeout(5):
                    msg = await zoe.receive()
                took = time.monotonic() - revoked_at
                print(f"agent on {agent_on}: channel on B closed {msg.data} "
                      f"{took * 1000:.0f} ms after the revoke on A")
                assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, CloseCode.FORBIDDEN)
                await yan.send_str("still here")
                assert (await asyncio.wait_for(yan.receive(), 5)).data == "still here"
                await yan.close()
        finally:
            await agent.stop()
    await host_service.stop()
