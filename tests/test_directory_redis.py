"""RedisDirectory against a real redis-server: ownership, epochs, leases, outages, revocations.

The lease tests at the end check what the layout is for: Redis cost per heartbeat independent
of the tunnel count, a crashed relay (a real child process killed with SIGKILL) read offline
within entry_ttl_s, bounded lazy sweeping, restarts with the same instance id, and a flushed
Redis refilled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from relay.config import DirectoryConfig
from relay.directory import Owner, RedisDirectory
from relay.errors import CloseCode, DirectoryUnavailable
from relay.metrics import Metrics
from tests.clock import SteppedSleep
from tests.redis_server import RedisServer

PREFIX = "test:"
HEARTBEAT_S = 0.3
TTL_S = 1.2
# For tests that wait out lease lifetimes: half as long, the same four beats to a lease.
QUICK_HEARTBEAT_S = 0.15
QUICK_TTL_S = 0.6
# For a test that waits for a killed relay's lease to lapse: shorter again, still four beats to a
# lease (a live one keeps 0.3 s of slack between renewals).
LAPSING_HEARTBEAT_S = 0.1
LAPSING_TTL_S = 0.4


# A directory's wait between heartbeats, replaced: each step is one heartbeat interval passing.
# Redis-side TTLs stay real: a stepped directory's lease lapses after entry_ttl_s unless the
# test steps it.
Beats = SteppedSleep


class MakeDirectory(Protocol):
    def __call__(
        self, instance_id: str = ..., *, start: bool = ..., metrics: Metrics | None = ...,
        heartbeat_s: float = ..., entry_ttl_s: float = ..., sweep_batch: int = ...,
        op_timeout_s: float = ..., beats: Beats | None = ...,
    ) -> Awaitable[RedisDirectory]: ...


def url_of(instance_id: str) -> str:
    return f"http://{instance_id}.internal:8080"


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str
) -> float:
    """Poll ``predicate`` until true; return the time it took. Fails after ``timeout_s``."""
    started = time.monotonic()
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"timed out after {timeout_s}s waiting for: {what}")
        await asyncio.sleep(0.02)


# One redis-server for the module (a start per test cost more than most tests): each test
# gets it running, answering, and as empty as a fresh one.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_redis() -> AsyncIterator[RedisServer]:
    async with RedisServer() as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module")
async def redis_server(shared_redis: RedisServer) -> RedisServer:
    await shared_redis.resume()  # a test may have left it paused, killed or stopped
    await shared_redis.start()
    client = aioredis.Redis.from_url(shared_redis.url, decode_responses=True, protocol=2)
    try:
        await client.flushall()
        for user in await client.acl_users():
            if user != "default":
                await client.acl_deluser(str(user))
        await client.config_resetstat()
    finally:
        await client.aclose()
    return shared_redis


@pytest_asyncio.fixture(loop_scope="module")
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client to look at (and tamper with) what the directory wrote."""
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True, protocol=2)
    yield client
    await client.aclose()


@pytest_asyncio.fixture(loop_scope="module")
async def make_directory(redis_server: RedisServer) -> AsyncIterator[MakeDirectory]:
    created: list[RedisDirectory] = []

    async def make(
        instance_id: str = "relay-a", *, start: bool = True, metrics: Metrics | None = None,
        heartbeat_s: float = HEARTBEAT_S, entry_ttl_s: float = TTL_S, sweep_batch: int = 500,
        op_timeout_s: float = 0.5, beats: Beats | None = None,
    ) -> RedisDirectory:
        config = DirectoryConfig(
            backend="redis", redis_url=redis_server.url, instance_id=instance_id,
            advertise_url=url_of(instance_id), peer_secret="s" * 16,
            heartbeat_s=heartbeat_s, entry_ttl_s=entry_ttl_s,
        )
        directory = RedisDirectory(
            config, metrics, key_prefix=PREFIX, op_timeout_s=op_timeout_s,
            sweep_batch=sweep_batch,
            heartbeat_sleep=asyncio.sleep if beats is None else beats.sleep,
        )
        created.append(directory)
        if start:
            await directory.start()
        return directory

    yield make
    for directory in created:
        await directory.close(release=False)


async def entry(raw: aioredis.Redis, host: str) -> dict[str, Any]:
    return await raw.hgetall(f"{PREFIX}host:{host}")


# ---------------------------------------------------------------- ownership


async def test_register_then_lookup_returns_this_relay(
    make_directory: MakeDirectory, raw: aioredis.Redis
) -> None:
    a = await make_directory("relay-a")
    assert a.healthy

    epoch = await a.register("org:m1")

    assert await a.lookup("org:m1") == Owner("relay-a", url_of("relay-a"), epoch)
    # Liveness is the relay's lease, with the TTL; the entry names the lease and has none.
    assert 0 < await raw.pttl(f"{PREFIX}lease:relay-a") <= TTL_S * 1000
    assert await raw.pttl(f"{PREFIX}host:org:m1") == -1
    lease = await raw.get(f"{PREFIX}lease:relay-a")
    assert await entry(raw, "org:m1") == {
        "instance": "relay-a", "url": url_of("relay-a"), "epoch": epoch, "lease": lease,
    }
    assert await raw.smembers(f"{PREFIX}instance:relay-a") == {"org:m1"}
    assert await raw.smembers(f"{PREFIX}instances") == {"relay-a"}
    assert a.registrations() == {"org:m1": epoch}


async def test_lookup_of_unregistered_host_is_none(make_directory: MakeDirectory) -> None:
    a = await make_directory("relay-a")
    assert await a.lookup("org:nobody") is None


async def test_last_write_wins_across_relays(make_directory: MakeDirectory) -> None:
    a = await make_directory("relay-a")
    b = await make_directory("relay-b")

    epoch_a = await a.register("org:m1")
    epoch_b = await b.register("org:m1")

    assert epoch_a != epoch_b
    expected = Owner("relay-b", url_of("relay-b"), epoch_b)
    assert await a.lookup("org:m1") == expected
    assert await b.lookup("org:m1") == expected


async def test_stale_unregister_does_not_delete_new_owner(make_directory: MakeDirectory) -> None:
    a = await make_directory("relay-a")
    b = await make_directory("relay-b")
    old = await a.register("org:m1")
    new = await b.register("org:m1")

    assert await a.unregister("org:m1", old) is False
    owner = await a.lookup("org:m1")
    assert owner is not None and owner.instance_id == "relay-b" and owner.epoch == new

    assert await b.unregister("org:m1", new) is True
    assert await a.lookup("org:m1") is None
    assert await b.unregister("org:m1", new) is False  # already gone


async def test_replaced_local_registration_survives_old_unregister(
    make_directory: MakeDirectory,
) -> None:
    a = await make_directory("relay-a")
    first = await a.register("org:m1")
    second = await a.register("org:m1")  # the agent reconnected to the same relay

    assert await a.unregister("org:m1", first) is False  # the replaced tunnel's close handler
    owner = await a.lookup("org:m1")
    assert owner is not None and owner.epoch == second
    assert a.registrations() == {"org:m1": second}


# ---------------------------------------------------------------- heartbeats and expiry


async def test_heartbeat_keeps_entries_alive_past_ttl(make_directory: MakeDirectory) -> None:
    a = await make_directory("relay-a", heartbeat_s=QUICK_HEARTBEAT_S, entry_ttl_s=QUICK_TTL_S)
    b = await make_directory("relay-b")
    epoch = await a.register("org:m1")
    beats = a.describe()["heartbeats"]

    # Past the lease's lifetime, by half of one again: only its renewals kept the entry alive.
    await wait_until(
        lambda: a.describe()["heartbeats"] >= beats + 1.5 * QUICK_TTL_S / QUICK_HEARTBEAT_S,
        4 * QUICK_TTL_S, "a lease lifetime and a half of heartbeats",
    )

    owner = await b.lookup("org:m1")
    assert owner is not None and owner.epoch == epoch


async def test_heartbeat_and_audit_cannot_resurrect_a_deleted_entry(
    make_directory: MakeDirectory, raw: aioredis.Redis
) -> None:
    a = await make_directory("relay-a", heartbeat_s=5, entry_ttl_s=20)  # no background beats
    b = await make_directory("relay-b", heartbeat_s=5, entry_ttl_s=20)
    gone = await a.register("org:gone")
    taken = await a.register("org:taken")
    kept = await a.register("org:kept")
    await raw.delete(f"{PREFIX}host:org:gone")
    await b.register("org:taken")

    beat = await a.heartbeat()
    result = await a.audit({"org:gone": gone, "org:taken": taken, "org:kept": kept})

    assert beat.lease == "renewed"
    assert beat.lost == (("org:taken", taken),)  # relay-b told us through our lost list
    assert beat.entries == 2  # relay-b's registration dropped org:taken from our index
    assert result.missing == ("org:gone",)
    assert result.taken == ("org:taken",)
    assert result.present == 1
    assert not await raw.exists(f"{PREFIX}host:org:gone")
    assert (await entry(raw, "org:taken"))["instance"] == "relay-b"
    assert (await entry(raw, "org:kept"))["epoch"] == kept


async def test_relay_reregisters_an_entry_that_vanished_while_it_holds_the_tunnel(
    make_directory: MakeDirectory, raw: aioredis.Redis
) -> None:
    beats = Beats()
    a = await make_directory("relay-a", beats=beats)
    epoch = await a.register("org:m1")
    await a.register("org:m2")

    # The entry and its index membership vanish together, as when a Redis failover loses the
    # last writes: the heartbeat's index size no longer matches what the relay holds.
    await raw.delete(f"{PREFIX}host:org:m1")
    await raw.srem(f"{PREFIX}instance:relay-a", "org:m1")

    await beats.step()
    assert await raw.exists(f"{PREFIX}host:org:m1")  # re-registered by that one heartbeat
    assert (await entry(raw, "org:m1"))["epoch"] == epoch  # same epoch: unregister still works
    assert await a.unregister("org:m1", epoch) is True


async def test_taken_entry_is_reported_lost_and_never_overwritten(
    make_directory: MakeDirectory, raw: aioredis.Redis
) -> None:
    beats = Beats()
    a = await make_directory("relay-a", beats=beats)
    b = await make_directory("relay-b")
    lost: list[tuple[str, str]] = []
    a.on_lost(lambda host, epoch: lost.append((host, epoch)))
    old = await a.register("org:m1")

    new = await b.register("org:m1")

    await beats.step()  # relay-a's next heartbeat reads its lost list
    assert lost == [("org:m1", old)]
    assert "org:m1" not in a.registrations()
    await beats.step(2)
    owner = await a.lookup("org:m1")
    assert owner is not None and owner.epoch == new


async def test_crashed_relay_entries_expire_within_ttl(
    make_directory: MakeDirectory, raw: aioredis.Redis
) -> None:
    a = await make_directory("relay-a", heartbeat_s=QUICK_HEARTBEAT_S, entry_ttl_s=QUICK_TTL_S)
    b = await make_directory("relay-b", heartbeat_s=QUICK_HEARTBEAT_S, entry_ttl_s=QUICK_TTL_S)
    await a.register("org:m1")
    await a.register("org:m2")

    await a.close(release=False)  # heartbeats stop, nothing is deleted: a crash
    assert await b.lookup("org:m1") is not None

    async def offline() -> bool:
        return await b.lookup("org:m1") is None

    await wait_until(offline, QUICK_TTL_S + 0.3, "the crashed relay's hosts read offline")
    assert await b.lookup("org:m2") is None
    assert not await raw.exists(f"{PREFIX}lease:relay-a")

    async def all_gone() -> bool:
        keys = [f"{PREFIX}host:org:m1", f"{PREFIX}host:org:m2", f"{PREFIX}instance:relay-a"]
        return await raw.exists(*keys) == 0

    # The lookups deleted what they read (and emptied the index); relay-b's next sweep, due
    # within a lease lifetime, forgets the dead relay.
    await wait_until(all_gone, 0.1, "the crashed relay's entries and index are gone")
    async def forgotten() -> bool:
        return await raw.smembers(f"{PREFIX}instances") == {"relay-b"}

    await wait_until(forgotten, QUICK_TTL_S + QUICK_HEARTBEAT_S, "relay-b's sweep forgets relay-a")


async def test_graceful_close_releases_entries_at_once(
    make_directory: MakeDirectory, raw: aioredis.Redis
) -> None:
    a = await make_directory("relay-a")
    b = await make_directory("relay-b")
    await a.register("org:m1")
    await b.register("org:m2")

    await a.close()

    assert await b.lookup("org:m1") is None
    assert await b.lookup("org:m2") is not None
    assert not await raw.exists(f"{PREFIX}instance:relay-a", f"{PREFIX}lease:relay-a")
    assert await raw.smembers(f"{PREFIX}instances") == {"relay-b"}


async def test_startup_clear_removes_own_leftovers_in_one_script_call(
    make_directory: MakeDirectory, raw: aioredis.Redis
) -> None:
    before = await make_directory("relay-a", heartbeat_s=5, entry_ttl_s=20)
    b = await make_directory("relay-b", heartbeat_s=5, entry_ttl_s=20)
    await before.register("org:m1")
    await before.register("org:m2")
    await before.register("org:m3")
    taken = await b.register("org:m3")  # taken over since: not ours to clear
    await before.close(release=False)  # crash; restart within the TTL with the same id
    await b.close(release=False)
    after = await make_directory("relay-a", start=False, heartbeat_s=5, entry_ttl_s=20)
    await raw.config_resetstat()

    await after.start()

    stats = await raw.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1  # the whole clear: one round trip
    assert not await raw.exists(f"{PREFIX}host:org:m1", f"{PREFIX}host:org:m2")
    assert not await raw.exists(f"{PREFIX}instance:relay-a")
    assert (await entry(raw, "org:m3"))["epoch"] == taken
    assert after.healthy


async def test_clear_instance_reports_what_it_deleted(
    make_directory: MakeDirectory, raw: aioredis.Redis
) -> None:
    a = await make_directory("relay-a", heartbeat_s=5, entry_ttl_s=20)
    await a.register("org:m1")
    await a.register("org:m2")

    assert await a.clear_instance() == 2
    assert await raw.exists(f"{PREFIX}host:org:m1", f"{PREFIX}host:org:m2") == 0


async def test_index_drops_members_whose_entry_is_gone_or_taken(
    make_directory: MakeDirectory, raw: aioredis.Redis
) -> None:
    beats = Beats()
    a = await make_directory("relay-a", beats=beats)
    b = await make_directory("relay-b")
    kept = await a.register("org:m1")
    await a.register("org:m2")

    await b.register("org:m2")  # the taker drops the host from relay-a's index at once
    assert await raw.smembers(f"{PREFIX}instance:relay-a") == {"org:m1"}

    # A member relay-a does not hold (a compare-and-delete lost in an outage): the next
    # heartbeat sees the index size disagree and prunes it, and the entry it names.
    await raw.hset(
        f"{PREFIX}host:org:leftover",
        mapping={"instance": "relay-a", "url": url_of("relay-a"), "epoch": "old"},
    )
    await raw.sadd(f"{PREFIX}instance:relay-a", "org:leftover", "org:expired")

    await beats.step()
    assert await raw.smembers(f"{PREFIX}instance:relay-a") == {"org:m1"}
    assert not await raw.exists(f"{PREFIX}host:org:leftover")
    assert (await entry(raw, "org:m1"))["epoch"] == kept


# ---------------------------------------------------------------- Redis trouble


async def test_redis_crash_marks_unhealthy_and_refuses_registration_quickly(
    make_directory: MakeDirectory, redis_server: RedisServer
) -> None:
    metrics = Metrics()
    a = await make_directory("relay-a", metrics=metrics)
    epoch = await a.register("org:m1")

    await redis_server.kill()
    started = time.monotonic()
    with pytest.raises(DirectoryUnavailable) as refused:
        await a.register("org:m2")
    assert time.monotonic() - started < 3.0

    assert refused.value.status == 503
    assert refused.value.close_code == CloseCode.TRY_AGAIN_LATER
    assert refused.value.message == "relay directory unavailable; retry shortly"
    await wait_until(lambda: not a.healthy, 3 * HEARTBEAT_S, "directory reports unhealthy")
    with pytest.raises(DirectoryUnavailable):
        await a.lookup("org:m1")
    assert await a.unregister("org:other", "no-such-epoch") is False  # logs, never raises
    assert a.registrations() == {"org:m1": epoch}  # the local tunnel is still held
    assert a.describe()["healthy"] is False
    failures = metrics.directory_errors_total.labels(op="register")._value.get()
    assert failures >= 1


async def test_hung_redis_is_bounded_by_timeouts_and_recovers_on_resume(
    make_directory: MakeDirectory, redis_server: RedisServer
) -> None:
    # Short operation timeouts: the bound is what is tested, not its length.
    a = await make_directory("relay-a", op_timeout_s=0.2)
    epoch = await a.register("org:m1")

    await redis_server.pause()  # connections hang instead of being refused
    started = time.monotonic()
    with pytest.raises(DirectoryUnavailable):
        await a.register("org:m2")
    assert time.monotonic() - started < 3.0
    assert not a.healthy
    started = time.monotonic()
    with pytest.raises(DirectoryUnavailable):
        await a.lookup("org:m1")
    assert time.monotonic() - started < 0.1  # known down: fail fast, do not pile up waiters

    await redis_server.resume()

    await wait_until(lambda: a.healthy, 3.0, "directory recovers after the hang")
    owner = await a.lookup("org:m1")
    assert owner is not None and owner.epoch == epoch
    assert await a.lookup("org:m2") is None  # the refused registration left nothing behind


async def test_redis_restart_recovers_and_reregisters_held_tunnels(
    make_directory: MakeDirectory, redis_server: RedisServer, raw: aioredis.Redis
) -> None:
    beats_a, beats_b = Beats(), Beats()
    a = await make_directory("relay-a", beats=beats_a)
    b = await make_directory("relay-b", beats=beats_b)
    kept = await a.register("org:m1")
    closed = await a.register("org:m2")
    await b.register("org:m3")

    await redis_server.kill()
    await beats_a.step()
    await beats_b.step()
    assert not a.healthy and not b.healthy  # each heartbeat noticed the outage
    assert await a.unregister("org:m2", closed) is False  # tunnel closed during the outage
    await redis_server.start()  # back on the same port, empty

    await wait_until(lambda: a.healthy and b.healthy, 3.0, "both relays recover")
    owner = await b.lookup("org:m1")
    assert owner == Owner("relay-a", url_of("relay-a"), kept)
    assert await b.lookup("org:m2") is None  # not resurrected
    assert await a.lookup("org:m3") is not None  # relay-b's tunnel is back too
    assert await b.lookup("org:new") is None
    assert await a.register("org:new")


async def test_relay_cut_off_from_redis_does_not_steal_back_a_host_that_moved(
    redis_server: RedisServer, raw: aioredis.Redis, make_directory: MakeDirectory
) -> None:
    # relay-a logs in as its own ACL user, so it alone can be cut off: a network partition.
    await raw.acl_setuser(
        "relay-a", enabled=True, passwords=["+pw-a"], keys=["*"], channels=["*"],
        commands=["+@all"],
    )
    config = DirectoryConfig(
        backend="redis", redis_url=f"redis://relay-a:pw-a@127.0.0.1:{redis_server.port}/0",
        instance_id="relay-a", advertise_url=url_of("relay-a"), peer_secret="s" * 16,
        heartbeat_s=HEARTBEAT_S, entry_ttl_s=TTL_S,
    )
    beats = Beats()
    a = RedisDirectory(config, key_prefix=PREFIX, op_timeout_s=0.5, heartbeat_sleep=beats.sleep)
    await a.start()
    b = await make_directory("relay-b")
    lost: list[tuple[str, str]] = []
    a.on_lost(lambda host, epoch: lost.append((host, epoch)))
    try:
        old = await a.register("org:m1")
        await raw.acl_setuser("relay-a", enabled=False)
        await raw.client_kill_filter(user="relay-a")
        await beats.step()
        assert not a.healthy  # its heartbeat found itself cut off
        # Its lease lapsed meanwhile and a lookup swept its entry ...
        await raw.delete(f"{PREFIX}lease:relay-a", f"{PREFIX}host:org:m1")
        new = await b.register("org:m1")  # ... and the agent reconnected to relay-b

        await raw.acl_setuser("relay-a", enabled=True)
        await wait_until(lambda: a.healthy, 3.0, "relay-a reconnects")

        owner = await a.lookup("org:m1")
        assert owner is not None and (owner.instance_id, owner.epoch) == ("relay-b", new)
        assert lost == [("org:m1", old)]
        assert "org:m1" not in a.registrations()
    finally:
        await a.close(release=False)


async def test_relay_started_while_redis_is_down_becomes_ready_when_it_appears(
    make_directory: MakeDirectory, redis_server: RedisServer
) -> None:
    await redis_server.kill()
    started = time.monotonic()
    a = await make_directory("relay-a")
    assert time.monotonic() - started < 2.0
    assert not a.healthy
    with pytest.raises(DirectoryUnavailable):
        await a.register("org:m1")

    await redis_server.start()

    await wait_until(lambda: a.healthy, 3.0, "directory becomes healthy")
    epoch = await a.register("org:m1")
    owner = await a.lookup("org:m1")
    assert owner is not None and owner.epoch == epoch


# ---------------------------------------------------------------- revocations


async def test_revocation_reaches_every_relay_exactly_once(make_directory: MakeDirectory) -> None:
    a = await make_directory("relay-a")
    b = await make_directory("relay-b")
    seen_a: list[tuple[str | None, str | None]] = []
    seen_b: list[tuple[str | None, str | None]] = []
    a.on_revocation(lambda sub, host: seen_a.append((sub, host)))
    b.on_revocation(lambda sub, host: seen_b.append((sub, host)))
    await wait_until(
        lambda: a.describe()["revocations_subscribed"] and b.describe()["revocations_subscribed"],
        2.0, "both relays subscribed",
    )

    await a.publish_revocation("user-1", "org:m1")
    assert seen_a == [("user-1", "org:m1")]  # delivered locally at once
    await wait_until(lambda: bool(seen_b), 2.0, "relay-b receives the revocation")
    await b.publish_revocation(None, "org:m2")
    await wait_until(lambda: len(seen_a) == 2, 2.0, "relay-a receives relay-b's revocation")
    # Fences: a subscriber gets a channel's messages in publish order, so a duplicate echo of
    # anything published before a relay's fence arrived would have arrived before it.
    await a.publish_revocation("fence-a", None)
    await wait_until(lambda: len(seen_b) == 3, 2.0, "relay-b receives relay-a's fence")
    await b.publish_revocation("fence-b", None)
    await wait_until(lambda: len(seen_a) == 4, 2.0, "relay-a receives relay-b's fence")

    sent = [("user-1", "org:m1"), (None, "org:m2"), ("fence-a", None), ("fence-b", None)]
    assert seen_a == sent
    assert seen_b == sent


async def test_malformed_revocations_are_ignored(
    make_directory: MakeDirectory, raw: aioredis.Redis
) -> None:
    a = await make_directory("relay-a")
    seen: list[tuple[str | None, str | None]] = []
    a.on_revocation(lambda sub, host: seen.append((sub, host)))
    await wait_until(lambda: a.describe()["revocations_subscribed"], 2.0, "subscribed")

    await raw.publish(f"{PREFIX}revocations", "not json")
    await raw.publish(f"{PREFIX}revocations", json.dumps({"sub": 5, "host": None}))
    await raw.publish(f"{PREFIX}revocations", json.dumps({"sub": "u", "host": "org:m"}))

    await wait_until(lambda: bool(seen), 2.0, "the valid revocation arrives")
    assert seen == [("u", "org:m")]


async def test_revocations_resume_after_redis_restart_with_a_full_flush(
    make_directory: MakeDirectory, redis_server: RedisServer
) -> None:
    a = await make_directory("relay-a")
    b = await make_directory("relay-b")
    seen_b: list[tuple[str | None, str | None]] = []
    b.on_revocation(lambda sub, host: seen_b.append((sub, host)))
    await wait_until(lambda: b.describe()["revocations_subscribed"], 2.0, "relay-b subscribed")

    await redis_server.kill()
    await wait_until(lambda: not b.describe()["revocations_subscribed"], 3.0, "relay-b notices")
    await redis_server.start()
    await wait_until(lambda: b.describe()["revocations_subscribed"], 3.0, "relay-b resubscribes")

    # Anything sent during the gap is lost, so relay-b drops every cached decision.
    assert seen_b == [(None, None)]
    await wait_until(lambda: a.healthy, 3.0, "relay-a recovers")
    await a.publish_revocation("user-2", None)
    await wait_until(lambda: len(seen_b) == 2, 2.0, "relay-b receives revocations again")
    assert seen_b[1] == ("user-2", None)


async def test_dropped_subscription_is_noticed_and_flushes_everything(
    make_directory: MakeDirectory, raw: aioredis.Redis
) -> None:
    b = await make_directory("relay-b")
    seen: list[tuple[str | None, str | None]] = []
    b.on_revocation(lambda sub, host: seen.append((sub, host)))
    await wait_until(lambda: b.describe()["revocations_subscribed"], 2.0, "subscribed")

    # A brief connection drop, Redis itself stays up: a reconnect must not be silent.
    assert await raw.client_kill_filter(_type="pubsub") >= 1

    await wait_until(lambda: bool(seen), 2.0, "relay-b flushes after resubscribing")
    assert seen == [(None, None)]


async def test_publish_while_redis_is_down_revokes_locally_then_raises(
    make_directory: MakeDirectory, redis_server: RedisServer
) -> None:
    a = await make_directory("relay-a")
    seen: list[tuple[str | None, str | None]] = []
    a.on_revocation(lambda sub, host: seen.append((sub, host)))
    await redis_server.kill()

    with pytest.raises(DirectoryUnavailable):
        await a.publish_revocation("user-1", None)
    assert seen == [("user-1", None)]


# ---------------------------------------------------------------- status


async def test_describe_never_shows_the_redis_url(redis_server: RedisServer) -> None:
    config = DirectoryConfig(
        backend="redis", redis_url="redis://:hunter2-secret@127.0.0.1:1/0",
        instance_id="relay-a", advertise_url=url_of("relay-a"), peer_secret="s" * 16,
    )
    directory = RedisDirectory(config)

    status = directory.describe()

    assert "hunter2" not in json.dumps(status)
    assert status["instance_id"] == "relay-a" and status["healthy"] is False


# ---------------------------------------------------------------- the lease layout


REPO = Path(__file__).resolve().parent.parent

# A relay's directory in its own process: registers `count` hosts, prints their epochs and
# its lease token, then heartbeats until it is killed.
CHILD = """
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
from relay.config import DirectoryConfig
from relay.directory import RedisDirectory

async def main():
    url, instance, prefix = sys.argv[2:5]
    heartbeat_s, ttl_s, count = float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
    config = DirectoryConfig(
        backend="redis", redis_url=url, instance_id=instance, peer_secret="s" * 16,
        advertise_url=f"http://{instance}.internal:8080", heartbeat_s=heartbeat_s,
        entry_ttl_s=ttl_s,
    )
    directory = RedisDirectory(config, key_prefix=prefix, op_timeout_s=0.5)
    await directory.start()
    epochs = {}
    for i in range(count):
        epochs[f"org:c{i}"] = await directory.register(f"org:c{i}")
    print("READY " + json.dumps(epochs), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@dataclass
class ChildRelay:
    proc: asyncio.subprocess.Process
    epochs: dict[str, str]

    async def kill(self) -> None:
        """SIGKILL: no close, no release, the heartbeats just stop."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        async with asyncio.timeout(5):
            await self.proc.wait()


@contextlib.asynccontextmanager
async def child_relay(
    server: RedisServer, instance: str, count: int, *, ttl_s: float = TTL_S,
    heartbeat_s: float = HEARTBEAT_S,
) -> AsyncIterator[ChildRelay]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(REPO), server.url, instance, PREFIX,
        str(heartbeat_s), str(ttl_s), str(count),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    child = ChildRelay(proc, {})
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            while True:
                line = await proc.stdout.readline()
                if not line:
                    pytest.fail(f"the child relay exited early ({await proc.wait()})")
                if line.startswith(b"READY "):
                    child.epochs = json.loads(line[6:])
                    break
        yield child
    finally:
        await child.kill()


def directory_commands(stats: dict[str, Any]) -> int:
    """Commands the directory sent (scripts and what they ran), not the test's own INFO or
    CONFIG, nor the revocation subscriber's keepalive PINGs."""
    ignored = ("cmdstat_info", "cmdstat_ping", "cmdstat_config|resetstat")
    return sum(int(v["calls"]) for k, v in stats.items() if k not in ignored)


async def commands_per_beat(beats: Beats, raw: aioredis.Redis, count: int) -> float:
    """Redis commands over ``count`` whole heartbeat periods (sweeps included), per beat."""
    await raw.config_resetstat()
    await beats.step(count)
    return directory_commands(await raw.info("commandstats")) / count


async def register_many(directory: RedisDirectory, count: int, start: int = 0) -> None:
    for base in range(start, start + count, 200):
        hosts = [f"org:h{i}" for i in range(base, min(base + 200, start + count))]
        await asyncio.gather(*(directory.register(h) for h in hosts))


# ---------------------------------------------------------------- cost


async def test_heartbeat_cost_does_not_grow_with_the_number_of_tunnels(
    make_directory: MakeDirectory, raw: aioredis.Redis
) -> None:
    # Stepped beats: each counted window is a lease lifetime of them (a sweep in each). The
    # intervals are long in real time, so the lease cannot lapse between steps (a lapse would
    # add a resync to a window).
    heartbeat_s, ttl_s = 10.0, 60.0
    sweep_every = round(ttl_s / heartbeat_s)
    beats = Beats()
    a = await make_directory("relay-a", heartbeat_s=heartbeat_s, entry_ttl_s=ttl_s, beats=beats)
    # Another live relay, so relay-a's sweep has a lease to check; it never beats.
    await make_directory("relay-b", heartbeat_s=heartbeat_s, entry_ttl_s=ttl_s, beats=Beats())
    await register_many(a, 20)
    # Warm-up: the first run of each script costs a SCRIPT LOAD once.
    await commands_per_beat(beats, raw, count=sweep_every)

    small = await commands_per_beat(beats, raw, count=sweep_every)
    await register_many(a, 1_980, start=20)
    assert len(a.registrations()) == 2_000
    big = await commands_per_beat(beats, raw, count=sweep_every)
    assert a.describe()["heartbeats"] == 3 * sweep_every

    # The same fixed handful of commands per beat for 20 and for 2,000 tunnels (one TTL
    # refresh per tunnel per beat would be ≥ 2,000).
    assert big == small
    assert small <= 8


# ---------------------------------------------------------------- crashes and sweeping


async def test_killed_relay_reads_offline_within_ttl_and_is_swept_in_bounded_batches(
    make_directory: MakeDirectory, raw: aioredis.Redis, redis_server: RedisServer
) -> None:
    # relay-b's own loop stays out of the way (long intervals): the test drives its sweep.
    b = await make_directory("relay-b", heartbeat_s=5, entry_ttl_s=20, sweep_batch=10)
    async with child_relay(redis_server, "relay-dead", 45, ttl_s=LAPSING_TTL_S,
                           heartbeat_s=LAPSING_HEARTBEAT_S) as child:
        assert (await b.sweep()).removed == 0  # alive: nothing to sweep
        owner = await b.lookup("org:c0")
        assert owner is not None and owner.epoch == child.epochs["org:c0"]

        await child.kill()
        killed = time.monotonic()

        async def offline() -> bool:
            return await b.lookup("org:c0") is None

        await wait_until(offline, LAPSING_TTL_S + 0.5, "the killed relay's host reads offline")
        assert time.monotonic() - killed <= LAPSING_TTL_S + 0.5
        assert not await raw.exists(f"{PREFIX}host:org:c0")  # the lookup deleted it

    assert await raw.scard(f"{PREFIX}instance:relay-dead") == 44
    removed = []
    while True:
        swept = await b.sweep()
        removed.append(swept.removed)
        if not swept.more:
            break
        assert len(removed) < 10, "the sweep must finish"
    assert removed == [10, 10, 10, 10, 4]  # bounded batches, one round trip each
    assert await raw.keys(f"{PREFIX}host:*") == []
    assert not await raw.exists(f"{PREFIX}instance:relay-dead")
    assert await raw.smembers(f"{PREFIX}instances") == {"relay-b"}


async def test_background_sweep_clears_a_dead_relay_nobody_looks_up(
    make_directory: MakeDirectory, raw: aioredis.Redis, redis_server: RedisServer
) -> None:
    # Its heartbeat loop does the sweeping, stepped by the test; a sweep is due every fourth
    # beat, and every beat while work remains.
    beats = Beats()
    b = await make_directory("relay-b", sweep_batch=8, heartbeat_s=5, entry_ttl_s=20,
                             beats=beats)
    # The dead relay's lease only has to outlive its start-up.
    async with child_relay(redis_server, "relay-dead", 30, ttl_s=0.3, heartbeat_s=0.1) as child:
        await child.kill()

    async def lease_expired() -> bool:
        return await raw.exists(f"{PREFIX}lease:relay-dead") == 0

    await wait_until(lease_expired, 0.3 + 0.5, "the dead relay's lease expires")
    # Four batches of eight, at one per beat once the due sweep found work: seven beats.
    await beats.step(7)
    assert await raw.exists(f"{PREFIX}instance:relay-dead") == 0
    assert await raw.keys(f"{PREFIX}host:*") == []
    assert b.describe()["heartbeats"] == 7


async def test_restart_with_the_same_instance_id_does_not_resurrect_old_entries(
    make_directory: MakeDirectory, raw: aioredis.Redis, redis_server: RedisServer
) -> None:
    b = await make_directory("relay-b")
    async with child_relay(redis_server, "relay-a", 3, ttl_s=20) as child:
        old_lease = await raw.get(f"{PREFIX}lease:relay-a")
        await child.kill()
    assert old_lease is not None

    # Back at once with the same id, long before the old lease would expire.
    a = await make_directory("relay-a")
    for host in child.epochs:
        assert await b.lookup(host) is None
    assert await raw.get(f"{PREFIX}lease:relay-a") not in (None, old_lease)

    # An entry of the previous run that the start-up clear missed (its write landed late):
    # it names the old lease token, so it is dead although relay-a's lease is live.
    await raw.hset(
        f"{PREFIX}host:org:late",
        mapping={"instance": "relay-a", "url": url_of("relay-a"), "epoch": "e", "lease": old_lease},
    )
    assert await b.lookup("org:late") is None
    assert not await raw.exists(f"{PREFIX}host:org:late")
    epoch = await a.register("org:c0")  # the new run's registrations are alive
    owner = await b.lookup("org:c0")
    assert owner is not None and owner.epoch == epoch


# ---------------------------------------------------------------- Redis losing data


async def test_flushed_redis_gets_every_held_entry_back(
    make_directory: MakeDirectory, raw: aioredis.Redis
) -> None:
    beats_a, beats_b = Beats(), Beats()
    a = await make_directory("relay-a", beats=beats_a)
    b = await make_directory("relay-b", beats=beats_b)
    epochs = {h: await a.register(h) for h in ("org:m1", "org:m2", "org:m3")}
    other = await b.register("org:m4")

    await raw.flushall()  # no disconnect: only the vanished lease tells the relays

    await beats_a.step()
    await beats_b.step()
    for host in (*epochs, "org:m4"):
        assert await b.lookup(host) is not None, f"{host} is reclaimed by one heartbeat"
    for host, epoch in epochs.items():
        assert await b.lookup(host) == (await a.lookup(host))
        assert (await entry(raw, host))["epoch"] == epoch  # same epoch: unregister still works
    assert (await entry(raw, "org:m4"))["epoch"] == other
    assert await a.unregister("org:m1", epochs["org:m1"]) is True


async def test_lapsed_lease_noticed_by_a_register_still_resyncs(
    make_directory: MakeDirectory, raw: aioredis.Redis
) -> None:
    beats = Beats()
    a = await make_directory("relay-a", beats=beats)
    b = await make_directory("relay-b")
    epoch = await a.register("org:m1")

    # relay-a stalled past its lease; relay-b's lookup swept its entry meanwhile ...
    await raw.delete(f"{PREFIX}lease:relay-a")
    assert await b.lookup("org:m1") is None
    # ... and a new tunnel's registration, landing first, writes the lease back.
    await a.register("org:m2")

    await beats.step()
    assert await b.lookup("org:m1") is not None  # the next heartbeat reclaimed it
    assert (await entry(raw, "org:m1"))["epoch"] == epoch


async def test_mass_takeover_is_reported_in_full(
    make_directory: MakeDirectory, raw: aioredis.Redis
) -> None:
    a = await make_directory("relay-a", heartbeat_s=QUICK_HEARTBEAT_S)
    b = await make_directory("relay-b")
    lost: list[str] = []
    a.on_lost(lambda host, epoch: lost.append(host))
    await register_many(a, 1_200)  # more than one lost-list batch (500)

    await register_many(b, 1_200)

    await wait_until(lambda: len(lost) == 1_200, 10 * HEARTBEAT_S, "every takeover reported")
    assert a.registrations() == {}
    assert not await raw.exists(f"{PREFIX}instance:relay-a", f"{PREFIX}lost:relay-a")


async def test_entry_of_the_older_layout_reads_alive_until_its_own_ttl(
    make_directory: MakeDirectory, raw: aioredis.Redis
) -> None:
    # A relay of the per-entry-TTL layout, during a rolling upgrade: no lease field.
    b = await make_directory("relay-b")
    key = f"{PREFIX}host:org:legacy"
    await raw.hset(key, mapping={"instance": "relay-old", "url": url_of("relay-old"), "epoch": "e"})
    await raw.pexpire(key, 150)

    owner = await b.lookup("org:legacy")
    assert owner is not None and owner.instance_id == "relay-old"

    async def expired() -> bool:
        return await b.lookup("org:legacy") is None

    await wait_until(expired, 2.0, "the legacy entry expires on its own TTL")
