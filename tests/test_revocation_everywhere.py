"""An admin revocation on one relay reaches every relay's access cache (Redis pub/sub)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from relay.config import load_config
from tests.harness import start_agent, start_host, start_relay, write_config
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
