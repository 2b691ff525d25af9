"""/readyz follows a dead Redis within about a second, not at the next heartbeat.

The second is the directory's clock (injected): the test moves it instead of waiting."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from relay.config import load_config
from relay.directory.redis import READY_MAX_AGE_S, RedisDirectory
from tests.clock import FakeClock
from tests.harness import start_relay, write_config
from tests.redis_server import RedisServer


async def _status(client: aiohttp.ClientSession, url: str) -> int:
    async with client.get(url, timeout=aiohttp.ClientTimeout(total=3)) as resp:
        return resp.status


async def test_readyz_goes_503_within_a_second_of_redis_dying(tmp_path: Path) -> None:
    async with RedisServer() as redis:
        config = load_config(write_config(tmp_path, {"directory": {
            "backend": "redis", "redis_url": redis.url, "instance_id": "relay-ready",
            "peer_secret": "p" * 32,
            # A heartbeat this slow would have left /readyz at 200 for up to 30 s.
            "heartbeat_s": 30, "entry_ttl_s": 90,
        }}), env={})
        relay = await start_relay(config)
        url = f"{relay.url}/readyz"
        directory = relay.state.directory
        assert isinstance(directory, RedisDirectory)
        clock = FakeClock(time.monotonic())
        directory._clock = clock  # the age of the last Redis success is read from it
        try:
            async with aiohttp.ClientSession() as client:
                deadline = time.monotonic() + 5
                while await _status(client, url) != 200:
                    assert time.monotonic() < deadline, "never ready"
                    await asyncio.sleep(0.05)
                clock.advance(READY_MAX_AGE_S + 0.2)  # the last Redis success is now stale
                assert await _status(client, url) == 200  # re-confirmed by a PING, still up
                await redis.kill()
                killed = time.monotonic()
                clock.advance(READY_MAX_AGE_S + 0.2)
                while await _status(client, url) != 503:
                    assert time.monotonic() - killed < 3, "readyz did not notice Redis died"
                    await asyncio.sleep(0.05)
                noticed_s = time.monotonic() - killed
        finally:
            await relay.stop()
    # Once the last success is older than the second, the first /readyz pings and answers 503:
    # no wait for the next heartbeat (30 s).
    assert noticed_s < 2.0, noticed_s
