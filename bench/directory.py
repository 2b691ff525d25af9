"""W7: what the Redis directory costs Redis, per relay, as its tunnel count grows.

One relay's :class:`RedisDirectory` (in this process, against the bench's own redis-server)
registers ``small`` hosts, then ``large`` in total. Over whole heartbeat windows (sweeps
included) it counts the commands Redis ran for it (``INFO commandstats``: each script call and
every command inside it) and the time Redis spent on them. Then it abandons the directory the
way a crash does (heartbeats stop, nothing is released) and times how long until another
relay's lookup reads its hosts as offline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog

from relay.config import DirectoryBackend, DirectoryConfig
from relay.directory import RedisDirectory

# The directory's own traffic: not the bench's INFO/CONFIG, nor the revocation subscriber's
# keepalive PINGs (one per heartbeat, the same at any tunnel count).
IGNORED = ("cmdstat_info", "cmdstat_ping", "cmdstat_config|resetstat")
# Every directory operation is one script call; its usec already includes the commands it ran
# (which commandstats lists again on their own), so Redis time is counted from these alone.
TIMED = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_script|load")


def _redis_usec(stats: dict[str, Any]) -> float:
    return sum(float(v["usec"]) for k, v in stats.items() if k in TIMED)


@dataclass
class Window:
    hosts: int
    beats: int
    seconds: float
    commands: int
    redis_usec: float

    @property
    def per_second(self) -> float:
        return self.commands / self.seconds

    @property
    def per_beat(self) -> float:
        return self.commands / self.beats

    @property
    def busy_us_per_second(self) -> float:
        return self.redis_usec / self.seconds


@dataclass
class Result:
    windows: list[Window]
    heartbeat_s: float
    entry_ttl_s: float
    offline_after_s: float
    register_per_s: float
    bytes_per_entry: float
    lookups_per_s: float
    redis_us_per_lookup: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "heartbeat_s": self.heartbeat_s, "entry_ttl_s": self.entry_ttl_s,
            "offline_after_s": self.offline_after_s, "register_per_s": self.register_per_s,
            "bytes_per_entry": self.bytes_per_entry, "lookups_per_s": self.lookups_per_s,
            "redis_us_per_lookup": self.redis_us_per_lookup,
            "windows": [
                {**vars(w), "per_second": w.per_second, "per_beat": w.per_beat}
                for w in self.windows
            ],
        }


def _config(url: str, instance: str, heartbeat_s: float, ttl_s: float) -> DirectoryConfig:
    return DirectoryConfig(
        backend=DirectoryBackend.REDIS, redis_url=url, instance_id=instance,
        peer_secret="bench-" * 4,
        advertise_url=f"http://{instance}.bench:8080", heartbeat_s=heartbeat_s, entry_ttl_s=ttl_s,
    )


async def _register(directory: RedisDirectory, start: int, stop: int) -> None:
    for base in range(start, stop, 500):
        hosts = [f"bench:h{i}" for i in range(base, min(base + 500, stop))]
        await asyncio.gather(*(directory.register(h) for h in hosts))


async def _window(directory: RedisDirectory, raw: aioredis.Redis, beats: int,
                  heartbeat_s: float) -> Window:
    """Commands over exactly ``beats`` heartbeats, counted from just after one."""

    def done() -> int:
        return int(directory.describe()["heartbeats"])

    async def until(target: int) -> None:
        deadline = time.monotonic() + heartbeat_s * (beats + 5)
        while True:
            if done() >= target:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("W7: the directory stopped heartbeating")
            await asyncio.sleep(0.005)  # polling a counter: one check per 5 ms is plenty

    await until(done() + 1)
    await raw.config_resetstat()
    first, started = done(), time.monotonic()
    await until(first + beats)
    elapsed = time.monotonic() - started
    stats = await raw.info("commandstats")
    if done() != first + beats:
        raise RuntimeError("W7: a heartbeat slipped into the window; the machine is too busy")
    mine = {k: v for k, v in stats.items() if k not in IGNORED}
    return Window(
        hosts=len(directory.registrations()), beats=beats, seconds=elapsed,
        commands=sum(int(v["calls"]) for v in mine.values()),
        redis_usec=_redis_usec(stats),
    )


async def _lookups(other: RedisDirectory, raw: aioredis.Redis, hosts: int,
                   seconds: float = 2.0, workers: int = 32) -> tuple[float, float]:
    """Lookups/s one relay gets from Redis (``workers`` at once), and Redis µs per lookup."""
    await raw.config_resetstat()
    count = 0
    stop = time.monotonic() + seconds

    async def worker(offset: int) -> None:
        nonlocal count
        i = offset
        while time.monotonic() < stop:
            if await other.lookup(f"bench:h{i % hosts}") is None:
                raise RuntimeError("W7: a registered host read offline")
            count += 1
            i += workers

    started = time.monotonic()
    await asyncio.gather(*(worker(n) for n in range(workers)))
    elapsed = time.monotonic() - started
    stats = await raw.info("commandstats")
    return count / elapsed, _redis_usec(stats) / max(1, count)


async def _used_memory(raw: aioredis.Redis) -> int:
    return int((await raw.info("memory"))["used_memory"])


async def measure(url: str, small: int, large: int, *, heartbeat_s: float = 1.0,
                  entry_ttl_s: float = 4.0) -> Result:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    sweep_every = max(1, round(entry_ttl_s / heartbeat_s))
    beats = 2 * sweep_every  # whole sweep periods: every window holds the same work
    raw = aioredis.Redis.from_url(url, decode_responses=True, protocol=2)
    relay = RedisDirectory(_config(url, "relay-w7", heartbeat_s, entry_ttl_s))
    # Another live relay: the sweep checks its lease; it also does the crash-time lookups.
    # Its own heartbeats are slow so that they stay out of the counted windows.
    other = RedisDirectory(_config(url, "relay-w7-other", 60.0, 240.0))
    try:
        await relay.start()
        await other.start()
        memory_before = await _used_memory(raw)
        await _register(relay, 0, small)
        await _window(relay, raw, sweep_every, heartbeat_s)  # warm-up: SCRIPT LOADs, once
        windows = [await _window(relay, raw, beats, heartbeat_s)]
        started = time.monotonic()
        await _register(relay, small, large)
        register_per_s = (large - small) / (time.monotonic() - started)
        windows.append(await _window(relay, raw, beats, heartbeat_s))
        bytes_per_entry = (await _used_memory(raw) - memory_before) / large
        lookups_per_s, us_per_lookup = await _lookups(other, raw, large)

        # A crash: heartbeats stop and nothing is released; the lease runs out.
        await relay.close(release=False)
        crashed = time.monotonic()
        deadline = crashed + 3 * entry_ttl_s
        while await other.lookup("bench:h0") is not None:
            if time.monotonic() > deadline:
                raise RuntimeError("W7: the crashed relay's hosts never read offline")
            await asyncio.sleep(0.02)
        offline_after = time.monotonic() - crashed
        return Result(windows, heartbeat_s, entry_ttl_s, offline_after, register_per_s,
                      bytes_per_entry, lookups_per_s, us_per_lookup)
    finally:
        await relay.close(release=False)
        await other.close()
        await raw.aclose()
