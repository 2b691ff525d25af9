"""Browser sessions across relays on one Redis: any relay opens a session any other started,
and a forwarded exchange is rewritten once (by the owner), not once per hop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from relay.config import load_config
from tests.browser_host import ORIGIN, SEEN, build_browser_host
from tests.harness import RunningRelay, start_agent, start_host, start_relay, write_config
from tests.redis_server import RedisServer

APP = "https://app.example.com"
NAV = {"Sec-Fetch-Mode": "navigate", "Accept": "text/html"}


async def _relay(tmp_path: Path, name: str, redis_url: str) -> RunningRelay:
    folder = tmp_path / name
    folder.mkdir()
    config = load_config(write_config(folder, {
        "auth": {"dev_state_dir": str(tmp_path / "shared-state")},
        "directory": {"backend": "redis", "redis_url": redis_url, "instance_id": f"relay-{name}",
                      "peer_secret": "a-shared-peer-secret-for-tests", "heartbeat_s": 0.4,
                      "entry_ttl_s": 2.0},
        "cors": {"allow_origins": [APP]},
    }), env={})
    return await start_relay(config)


async def test_a_session_started_on_one_relay_works_through_another(tmp_path: Path) -> None:
    async with RedisServer() as redis:
        owner = await _relay(tmp_path, "owner", redis.url)
        entry = await _relay(tmp_path, "entry", redis.url)
        host = await start_host(build_browser_host("laptop"))
        host.runner.app[ORIGIN].append(host.url)
        agent = await start_agent(owner.ws_url, "acme:laptop", host.url,
                                  token=owner.agent_token("acme:laptop"))
        client = aiohttp.ClientSession()
        try:
            base = f"{entry.url}/hosts/acme:laptop"
            deadline = time.monotonic() + 10
            while True:  # until the entry relay sees the owner's directory entry
                async with client.get(f"{base}/api",
                                      headers={"Authorization": f"Bearer {entry.token()}"}) as r:
                    if r.status == 200:
                        break
                assert time.monotonic() < deadline, "the entry relay never found the host"
                await asyncio.sleep(0.1)

            async with client.get(f"{base}/page?token={entry.token()}", headers=NAV,
                                  allow_redirects=False) as resp:
                assert resp.status == 303
                cookie = resp.cookies["relay_session"].value
            jar = {"Cookie": f"relay_session={cookie}; sid=laptop", "Origin": APP}
            for relay in (entry, owner):  # the key is derived from the shared peer secret
                async with client.get(f"{relay.url}/hosts/acme:laptop/api", headers=jar) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["cookie"] == "sid=laptop"
                    assert resp.headers.getall("Access-Control-Allow-Origin") == [APP]
                    assert resp.headers.getall("Vary") == ["Accept-Encoding, Origin"]
            async with client.get(f"{base}/page", headers=jar) as resp:
                assert resp.headers.getall("Set-Cookie")[0] == \
                    "sid=laptop; HttpOnly; Path=/hosts/acme:laptop/"
            async with client.get(f"{base}/redirect/own", headers=jar,
                                  allow_redirects=False) as resp:
                assert resp.headers["Location"] == "/hosts/acme:laptop/landing?from=own"
            async with client.get(f"{base}/redirect/relay", headers=jar,
                                  allow_redirects=False) as resp:
                # The owner saw the entry relay's public origin, as the client used it.
                assert resp.headers["Location"] == f"{base}/landing?from=relay"
            assert ("GET", "/page") in host.runner.app[SEEN]
            assert entry.state.registry.get("acme:laptop") is None  # all of it was forwarded
        finally:
            await client.close()
            await agent.stop()
            await entry.stop()
            await owner.stop()
            await host.stop()
