"""Redis-backed directory shared by every relay: tunnel ownership, heartbeats, revocations.

Data model (``P`` is the key prefix, ``"relay:"`` by default)::

    P host:<hostId>        hash {instance, url, epoch}        PEXPIRE entry_ttl_s
                           who holds the host's tunnel; the epoch is unique per registration
    P instance:<id>        set of hostIds                     PEXPIRE entry_ttl_s
                           this relay's index: what the start-up clear and the sweep walk
    P revocations          pub/sub channel, JSON {sub, host, origin, session}

Every write that must be atomic is one Lua script (:data:`REGISTER`, :data:`UNREGISTER`,
:data:`HEARTBEAT`, :data:`CLEAR_INSTANCE`, :data:`SWEEP`):

- REGISTER writes the entry, adds it to the index and sets both TTLs. In ``force`` mode (a new
  tunnel) the last write wins over any other relay. In ``reclaim`` mode (rewriting what this
  relay still holds after Redis lost it) it only writes when the key is absent or still carries
  the same epoch, so a relay coming back never steals a host that reconnected elsewhere.
- UNREGISTER is compare-and-delete on the epoch.
- HEARTBEAT extends the TTL only of entries whose epoch still matches, never recreates one, and
  reports the others as *missing* (expired or deleted: re-register) or *taken* (someone else's
  registration: ownership lost).
- CLEAR_INSTANCE deletes, in one round trip, every entry still owned by this instance id and the
  index: run at start-up (a restarted relay's leftovers) and on close.
- SWEEP drops index members whose entry expired or belongs to someone else.

A crashed relay stops heartbeating, so its entries and its index expire within entry_ttl_s.
CLEAR_INSTANCE and SWEEP build entry keys inside the script (from the index members), which is
fine on a single Redis (or Sentinel) but not on Redis Cluster.

Failure handling: every Redis call is bounded (connect timeout plus ``asyncio.timeout``). A
failed operation marks the directory unhealthy (``/readyz`` → 503) and wakes the health loop,
which pings until Redis answers, then clears start-up leftovers if that never happened, rewrites
every registration this relay holds (``reclaim``), applies the compare-and-deletes that could not
be sent during the outage, and marks the directory healthy again. While unhealthy, ``register``
and ``lookup`` fail fast with :class:`DirectoryUnavailable`; local tunnels keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from relay.config import DirectoryConfig
from relay.directory.base import Directory, DirectoryUnavailable, Owner, new_epoch
from relay.metrics import Metrics

__all__ = ["HeartbeatResult", "RedisDirectory"]

log = structlog.get_logger("relay.directory")

T = TypeVar("T")

# Hosts per script call: keeps each script short enough not to stall Redis for other clients.
BATCH = 500
# Compare-and-deletes remembered during an outage; entries expire anyway, so dropping the
# oldest past this bound only lengthens a stale window, it never loses correctness.
MAX_PENDING_DELETES = 10_000
# A revocation's fields are host ids and subjects; anything longer is not one of ours.
MAX_REVOCATION_FIELD = 1024

# KEYS[1] = index, KEYS[2..n+1] = entries; ARGV = instance, url, ttl_ms, mode, epochs.., hosts..
# Returns one 1 (written) or 0 (left alone: another registration holds it) per host.
REGISTER = """
local n = #KEYS - 1
local instance, url, ttl, mode = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local results = {}
for i = 1, n do
  local key, epoch, host = KEYS[i + 1], ARGV[4 + i], ARGV[4 + n + i]
  local write = true
  if mode == 'reclaim' then
    local stored = redis.call('HGET', key, 'epoch')
    write = (not stored) or stored == epoch
  end
  if write then
    redis.call('DEL', key)
    redis.call('HSET', key, 'instance', instance, 'url', url, 'epoch', epoch)
    redis.call('PEXPIRE', key, ttl)
    redis.call('SADD', KEYS[1], host)
    results[i] = 1
  else
    results[i] = 0
  end
end
redis.call('PEXPIRE', KEYS[1], ttl)
return results
"""

# KEYS[1] = index, KEYS[2..n+1] = entries; ARGV = epochs.., hosts..
# Deletes each entry only if it still carries the given epoch. Returns 1/0 per host.
UNREGISTER = """
local n = #KEYS - 1
local results = {}
for i = 1, n do
  local key, epoch, host = KEYS[i + 1], ARGV[i], ARGV[n + i]
  if redis.call('HGET', key, 'epoch') == epoch then
    redis.call('DEL', key)
    redis.call('SREM', KEYS[1], host)
    results[i] = 1
  else
    results[i] = 0
  end
end
return results
"""

# KEYS[1] = index, KEYS[2..n+1] = entries; ARGV = ttl_ms, epochs.., hosts..
# Returns {missing hosts, taken hosts}. PEXPIRE never creates a key, so nothing is resurrected.
HEARTBEAT = """
local n = #KEYS - 1
local ttl = tonumber(ARGV[1])
local missing, taken = {}, {}
for i = 1, n do
  local key, epoch, host = KEYS[i + 1], ARGV[1 + i], ARGV[1 + n + i]
  local stored = redis.call('HGET', key, 'epoch')
  if stored == epoch then
    redis.call('PEXPIRE', key, ttl)
  elseif stored then
    taken[#taken + 1] = host
  else
    missing[#missing + 1] = host
  end
end
redis.call('PEXPIRE', KEYS[1], ttl)
return {missing, taken}
"""

# KEYS[1] = index; ARGV = instance, entry key prefix. Returns how many entries were deleted.
CLEAR_INSTANCE = """
local deleted = 0
for _, host in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[2] .. host
  if redis.call('HGET', key, 'instance') == ARGV[1] then
    redis.call('DEL', key)
    deleted = deleted + 1
  end
end
redis.call('DEL', KEYS[1])
return deleted
"""

# KEYS[1] = index; ARGV = instance, entry key prefix. Returns how many members were removed.
SWEEP = """
local removed = 0
for _, host in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('HGET', ARGV[2] .. host, 'instance') ~= ARGV[1] then
    redis.call('SREM', KEYS[1], host)
    removed = removed + 1
  end
end
return removed
"""


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    """What one heartbeat found for the registrations it was given."""

    refreshed: int  # entries whose TTL was extended
    missing: tuple[str, ...]  # expired or deleted: nobody holds them in Redis
    taken: tuple[str, ...]  # now carry another registration's epoch


def _batches(items: list[tuple[str, str]]) -> Iterable[list[tuple[str, str]]]:
    for start in range(0, len(items), BATCH):
        yield items[start : start + BATCH]


def _describe_error(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    text = str(cause)
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


class RedisDirectory(Directory):
    """The shared directory (``directory.backend = "redis"``). See the module docstring.

    The keyword arguments are not in :class:`DirectoryConfig` (yet); their defaults suit
    production, tests shrink them.
    """

    def __init__(
        self,
        config: DirectoryConfig,
        metrics: Metrics | None = None,
        *,
        key_prefix: str = "relay:",
        op_timeout_s: float = 1.0,
        register_attempts: int = 3,
        register_backoff_s: float = 0.05,
        register_budget_s: float = 2.5,
        max_connections: int = 64,
        close_timeout_s: float = 2.0,
    ) -> None:
        super().__init__(config.instance_id, config.advertise_url)
        if not config.instance_id:
            raise ValueError("RedisDirectory needs a non-empty instance_id")
        self._config = config
        self._metrics = metrics
        self._prefix = key_prefix
        self._host_prefix = f"{key_prefix}host:"
        self._index_key = f"{key_prefix}instance:{config.instance_id}"
        self._channel = f"{key_prefix}revocations"
        self._ttl_ms = max(1, int(config.entry_ttl_s * 1000))
        self._op_timeout = op_timeout_s
        self._register_attempts = max(1, register_attempts)
        self._register_backoff = register_backoff_s
        self._register_budget = register_budget_s
        self._max_connections = max_connections
        self._close_timeout = close_timeout_s
        # Probe quickly after a failure, but never more often than every 0.1 s.
        self._probe_interval = min(1.0, max(0.1, config.heartbeat_s / 2))
        self._resubscribe_max_s = min(2.0, config.heartbeat_s * 2)
        self._sweep_every = max(1, round(config.entry_ttl_s / config.heartbeat_s))
        # Lets the subscriber skip the echo of our own revocations (delivered directly).
        self._session = uuid.uuid4().hex

        self._client: Redis | None = None
        self._pubsub_client: Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._held: dict[str, str] = {}  # host_id -> epoch of every live registration we made
        self._pending_deletes: dict[tuple[str, str], None] = {}  # ordered set of (host, epoch)
        self._maintenance = asyncio.Lock()  # heartbeats and recovery never interleave
        self._wake_health = asyncio.Event()
        self._healthy = False
        self._cleared = False  # the start-up clear of our leftovers has run
        self._ever_healthy = False
        self._started = False
        self._closed = False
        self._subscribed = False
        self._last_error: str | None = None
        self._unhealthy_since: float | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._client = Redis.from_pool(self._make_pool(self._max_connections, retries=1))
        # The subscriber gets its own connection with no retries: redis-py would otherwise
        # reconnect and resubscribe silently, hiding a gap in which revocations were lost.
        self._pubsub_client = Redis.from_pool(self._make_pool(2, retries=0))
        self._scripts = {
            name: self._client.register_script(source)
            for name, source in (
                ("register", REGISTER),
                ("unregister", UNREGISTER),
                ("heartbeat", HEARTBEAT),
                ("clear", CLEAR_INSTANCE),
                ("sweep", SWEEP),
            )
        }
        try:
            async with self._maintenance:
                await self._recover()
        except DirectoryUnavailable as exc:
            self._last_error = _describe_error(exc)
            self._unhealthy_since = time.time()
            log.warning(
                "directory.redis_down", op="start", error=self._last_error,
                instance=self.instance_id,
            )
        self._tasks = [
            asyncio.create_task(loop(), name=f"relay-directory-{kind}:{self.instance_id}")
            for kind, loop in (
                ("heartbeat", self._heartbeat_loop),
                ("health", self._health_loop),
                ("revocations", self._subscriber_loop),
            )
        ]

    def _make_pool(self, max_connections: int, retries: int) -> BlockingConnectionPool:
        return BlockingConnectionPool.from_url(
            self._config.redis_url,
            max_connections=max_connections,
            timeout=self._op_timeout,  # waiting for a free pooled connection is bounded too
            socket_connect_timeout=self._op_timeout,
            # No socket_timeout: with one, redis-py wraps every write in asyncio.wait_for, which
            # on Python 3.11 swallows a cancellation landing in the same tick (CPython
            # gh-86296), and close() could not stop its tasks. Every call is bounded by
            # _call()'s asyncio.timeout instead; pub/sub reads pass their own timeout.
            socket_timeout=None,
            # retries=1 replaces, at once, a pooled connection that died with a restarted Redis;
            # retries beyond that are ours (bounded, with backoff) in register().
            retry=Retry(NoBackoff(), retries),
            decode_responses=True,
            # RESP2: every Redis (and compatible server) speaks it, and script and pub/sub
            # replies keep one shape.
            protocol=2,
            client_name=re.sub(r"[^A-Za-z0-9._:-]", "_", f"relay:{self.instance_id}"),
        )

    async def close(self, *, release: bool = True) -> None:
        """Stop background work and disconnect.

        With ``release`` (the default) the entries this instance still owns are deleted in one
        round trip, so other relays stop forwarding here at once instead of after entry_ttl_s.
        ``release=False`` leaves them to expire, exactly as a crash would.
        """
        if self._closed:
            return
        self._closed = True
        was_healthy, self._healthy = self._healthy, False
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            _, still_running = await asyncio.wait(tasks, timeout=self._close_timeout)
            if still_running:
                log.warning("directory.close_timeout", tasks=[t.get_name() for t in still_running])
        if release and was_healthy and self._client is not None:
            try:
                released = await self._call("release", self._run_clear())
                log.info("directory.released", instance=self.instance_id, entries=released)
            except DirectoryUnavailable as exc:
                log.warning("directory.release_failed", error=_describe_error(exc))
        self._held.clear()
        for client in (self._client, self._pubsub_client):
            if client is not None:
                with contextlib.suppress(RedisError, OSError):
                    async with asyncio.timeout(self._close_timeout):
                        await client.aclose()
        self._client = self._pubsub_client = None
        log.info("directory.closed", instance=self.instance_id)

    # ------------------------------------------------------------------ registrations

    async def register(self, host_id: str) -> str:
        if not self._healthy or self._closed:
            # Known to be down: refuse at once; the health loop is the one probing Redis.
            raise DirectoryUnavailable()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._register_budget
        epoch = new_epoch()  # the same epoch on every attempt keeps retries idempotent
        last_error: DirectoryUnavailable | None = None
        for attempt in range(self._register_attempts):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                await self._call(
                    "register",
                    self._run_register("force", [(host_id, epoch)]),
                    deadline_s=min(self._op_timeout, remaining),
                )
            except asyncio.CancelledError:
                # The caller gave up (agent gone); the write may have landed all the same.
                self._defer_delete(host_id, epoch)
                raise
            except DirectoryUnavailable as exc:
                last_error = exc
                delay = self._register_backoff * (2**attempt)
                if attempt + 1 < self._register_attempts:
                    await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
                continue
            self._held[host_id] = epoch
            return epoch
        # A timed-out attempt may still have been written: make sure it does not linger.
        self._defer_delete(host_id, epoch)
        self._mark_unhealthy("register", last_error or DirectoryUnavailable())
        log.warning("directory.register_failed", host=host_id, attempts=self._register_attempts)
        raise DirectoryUnavailable()

    async def unregister(self, host_id: str, epoch: str) -> bool:
        if self._held.get(host_id) == epoch:
            del self._held[host_id]
        if not self._healthy or self._client is None:
            self._defer_delete(host_id, epoch)
            log.info("directory.unregister_deferred", host=host_id)
            return False
        try:
            results = await self._call("unregister", self._run_unregister([(host_id, epoch)]))
        except DirectoryUnavailable as exc:
            self._defer_delete(host_id, epoch)
            self._mark_unhealthy("unregister", exc)
            log.warning("directory.unregister_failed", host=host_id, error=_describe_error(exc))
            return False
        return bool(results and int(results[0]))

    async def lookup(self, host_id: str) -> Owner | None:
        if not self._healthy or self._client is None:
            raise DirectoryUnavailable()
        try:
            data: dict[Any, Any] = await self._call(
                "lookup", self._client.hgetall(self._host_prefix + host_id)
            )
        except DirectoryUnavailable as exc:
            self._mark_unhealthy("lookup", exc)
            raise
        if not data:
            return None
        try:
            return Owner(data["instance"], data["url"], data["epoch"])
        except KeyError:
            log.warning("directory.entry_malformed", host=host_id, fields=sorted(data))
            return None

    def registrations(self) -> dict[str, str]:
        """A copy of this relay's live registrations: host_id -> epoch."""
        return dict(self._held)

    # ------------------------------------------------------------------ maintenance ops

    async def heartbeat(self, entries: Mapping[str, str] | None = None) -> HeartbeatResult:
        """Extend the TTL of ``entries`` (default: every registration held) where the epoch
        still matches. Reports the rest; does not act on them (the heartbeat loop does).
        Raises :class:`DirectoryUnavailable`."""
        pairs = list((self._held if entries is None else entries).items())
        refreshed, missing, taken = 0, [], []
        for batch in _batches(pairs):
            got_missing, got_taken = await self._call("heartbeat", self._run_heartbeat(batch))
            missing.extend(got_missing)
            taken.extend(got_taken)
            refreshed += len(batch) - len(got_missing) - len(got_taken)
        return HeartbeatResult(refreshed, tuple(missing), tuple(taken))

    async def clear_instance(self) -> int:
        """Delete, in one round trip, every entry this instance id still owns, and its index.
        Returns how many entries were deleted. Raises :class:`DirectoryUnavailable`."""
        return int(await self._call("clear", self._run_clear()))

    async def sweep(self) -> int:
        """Drop index members whose entry expired or was taken by another relay. Returns how
        many were removed. Raises :class:`DirectoryUnavailable`."""
        args = [self.instance_id, self._host_prefix]
        return int(await self._call("sweep", self._scripts["sweep"]([self._index_key], args)))

    # ------------------------------------------------------------------ revocations

    async def publish_revocation(self, sub: str | None, host: str | None) -> None:
        self._deliver_revocation(sub, host)
        if self._client is None or self._closed:
            raise DirectoryUnavailable()
        message = json.dumps(
            {"sub": sub, "host": host, "origin": self.instance_id, "session": self._session}
        )
        try:
            await self._call("publish", self._client.publish(self._channel, message))
        except DirectoryUnavailable as exc:
            self._mark_unhealthy("publish", exc)
            log.warning("directory.revocation_not_sent", sub=sub, host=host)
            raise

    def _handle_revocation(self, data: Any) -> None:
        try:
            message = json.loads(data)
            sub, host = message["sub"], message["host"]
            session = message.get("session")
            for value in (sub, host):
                if value is not None and (
                    not isinstance(value, str) or len(value) > MAX_REVOCATION_FIELD
                ):
                    raise ValueError("sub and host must be short strings or null")
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("directory.revocation_malformed", error=str(exc))
            return
        if session == self._session:
            return  # our own: publish_revocation already delivered it
        log.info(
            "directory.revocation_received", sub=sub, host=host, origin=message.get("origin")
        )
        self._deliver_revocation(sub, host)

    # ------------------------------------------------------------------ status

    def describe(self) -> dict[str, Any]:
        # redis_url is left out on purpose: it may carry a password.
        return {
            "backend": "redis",
            "instance_id": self.instance_id,
            "advertise_url": self.advertise_url,
            "healthy": self._healthy,
            "registrations": len(self._held),
            "pending_deletes": len(self._pending_deletes),
            "revocations_subscribed": self._subscribed,
            "unhealthy_since": self._unhealthy_since,
            "last_error": self._last_error,
            "key_prefix": self._prefix,
            "heartbeat_s": self._config.heartbeat_s,
            "entry_ttl_s": self._config.entry_ttl_s,
        }

    # ------------------------------------------------------------------ internals: calls

    async def _call(self, op: str, awaitable: Awaitable[T], deadline_s: float | None = None) -> T:
        """Await one Redis operation with a hard deadline; failures become DirectoryUnavailable."""
        limit = self._op_timeout if deadline_s is None else deadline_s
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the operation completes, and close() relies on cancellation.
            async with asyncio.timeout(limit):
                return await awaitable
        except (RedisError, OSError) as exc:  # OSError covers TimeoutError
            if self._metrics is not None:
                self._metrics.directory_errors_total.labels(op=op).inc()
            raise DirectoryUnavailable() from exc

    def _entry_keys(self, pairs: list[tuple[str, str]]) -> list[str]:
        return [self._index_key, *(self._host_prefix + host for host, _ in pairs)]

    async def _run_register(self, mode: str, pairs: list[tuple[str, str]]) -> list[int]:
        args = [self.instance_id, self.advertise_url, self._ttl_ms, mode]
        args += [epoch for _, epoch in pairs] + [host for host, _ in pairs]
        return await self._scripts["register"](self._entry_keys(pairs), args)

    async def _run_unregister(self, pairs: list[tuple[str, str]]) -> list[int]:
        args = [epoch for _, epoch in pairs] + [host for host, _ in pairs]
        return await self._scripts["unregister"](self._entry_keys(pairs), args)

    async def _run_heartbeat(self, pairs: list[tuple[str, str]]) -> list[list[str]]:
        args: list[Any] = [self._ttl_ms]
        args += [epoch for _, epoch in pairs] + [host for host, _ in pairs]
        return await self._scripts["heartbeat"](self._entry_keys(pairs), args)

    async def _run_clear(self) -> int:
        return await self._scripts["clear"](
            [self._index_key], [self.instance_id, self._host_prefix]
        )

    # ------------------------------------------------------------------ internals: health

    def _mark_unhealthy(self, op: str, exc: BaseException) -> None:
        self._last_error = f"{op}: {_describe_error(exc)}"
        if self._healthy:
            self._healthy = False
            self._unhealthy_since = time.time()
            log.warning(
                "directory.redis_down", op=op, error=self._last_error, instance=self.instance_id
            )
        self._wake_health.set()

    def _defer_delete(self, host_id: str, epoch: str) -> None:
        self._pending_deletes[(host_id, epoch)] = None
        while len(self._pending_deletes) > MAX_PENDING_DELETES:
            del self._pending_deletes[next(iter(self._pending_deletes))]

    def _lose(self, host_id: str, epoch: str, reason: str) -> None:
        """Forget a registration another one took over, and tell the server."""
        if self._held.get(host_id) != epoch:
            return  # replaced or unregistered locally meanwhile: nothing was lost
        del self._held[host_id]
        log.warning("directory.entry_lost", host=host_id, reason=reason)
        self._deliver_lost(host_id, epoch)

    async def _reclaim(self, entries: Mapping[str, str], op: str) -> None:
        """Rewrite registrations we hold that Redis lost, without taking any from others."""
        pairs = list(entries.items())
        for batch in _batches(pairs):
            results = await self._call(op, self._run_register("reclaim", batch))
            written: list[tuple[str, str]] = []
            for (host, epoch), result in zip(batch, results, strict=True):
                if int(result):
                    written.append((host, epoch))
                else:
                    self._lose(host, epoch, reason="taken_while_reclaiming")
            # An unregister that ran while the script was in flight may have been overtaken by
            # it; compare-and-delete those again so a closed tunnel's entry is not resurrected.
            stale = [(h, e) for h, e in written if self._held.get(h) != e]
            if stale:
                await self._call(op, self._run_unregister(stale))
            if written:
                log.info("directory.entry_reclaimed", hosts=len(written) - len(stale), op=op)

    async def _flush_pending_deletes(self) -> None:
        pairs = list(self._pending_deletes)
        for batch in _batches(pairs):
            await self._call("unregister", self._run_unregister(batch))
            for pair in batch:
                self._pending_deletes.pop(pair, None)

    async def _recover(self) -> None:
        """Bring the directory to healthy: ping, clear leftovers once, rewrite what we hold,
        apply deferred deletes. Raises DirectoryUnavailable, leaving it unhealthy."""
        assert self._client is not None
        await self._call("ping", self._client.ping())
        if not self._cleared:
            cleared = await self.clear_instance()
            self._cleared = True
            log.info("directory.startup_cleared", instance=self.instance_id, entries=cleared)
        held = dict(self._held)
        if held:
            await self._reclaim(held, op="reclaim")
        await self._flush_pending_deletes()
        # No await between here and the flag: nothing can slip in between.
        self._healthy = True
        self._last_error = None
        if self._ever_healthy:
            since = self._unhealthy_since
            log.info(
                "directory.redis_recovered", instance=self.instance_id, reregistered=len(held),
                down_s=None if since is None else round(time.time() - since, 3),
            )
        else:
            log.info("directory.started", instance=self.instance_id, url=self.advertise_url)
        self._ever_healthy = True
        self._unhealthy_since = None

    async def _beat(self) -> None:
        if self._pending_deletes:
            await self._flush_pending_deletes()
        if not self._held:
            # Nothing to refresh, but /readyz must still learn when Redis goes away.
            assert self._client is not None
            await self._call("ping", self._client.ping())
            return
        snapshot = dict(self._held)
        result = await self.heartbeat(snapshot)
        for host in result.taken:
            self._lose(host, snapshot[host], reason="taken")
        missing = {h: snapshot[h] for h in result.missing if self._held.get(h) == snapshot[h]}
        if missing:
            log.warning("directory.entry_missing", hosts=len(missing))
            await self._reclaim(missing, op="heartbeat")

    async def _heartbeat_loop(self) -> None:
        beats = 0
        while not self._closed:
            await asyncio.sleep(self._config.heartbeat_s)
            if not self._healthy:
                continue  # the health loop owns an unhealthy directory
            try:
                async with self._maintenance:
                    if not self._healthy:
                        continue
                    await self._beat()
                    beats += 1
                    if beats % self._sweep_every == 0:
                        removed = await self.sweep()
                        if removed:
                            log.info("directory.swept", removed=removed)
            except DirectoryUnavailable as exc:
                self._mark_unhealthy("heartbeat", exc)
            except Exception:
                log.exception("directory.heartbeat_crashed")

    async def _health_loop(self) -> None:
        while not self._closed:
            if self._healthy:
                self._wake_health.clear()
                # Bounded so a missed wake-up costs at most one heartbeat interval.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._config.heartbeat_s):
                        await self._wake_health.wait()
                continue
            try:
                async with self._maintenance:
                    if not self._healthy:
                        await self._recover()
            except DirectoryUnavailable as exc:
                self._last_error = _describe_error(exc)
            except Exception:
                log.exception("directory.health_crashed")
            if not self._healthy:
                await asyncio.sleep(self._probe_interval)

    # ------------------------------------------------------------------ internals: pub/sub

    async def _subscriber_loop(self) -> None:
        failures = 0  # consecutive failures since the last successful subscription
        gap = False  # we have been unsubscribed since start, so messages may have been missed
        while not self._closed:
            try:
                await self._subscribe_and_listen(gap)
            except (RedisError, OSError) as exc:
                if self._metrics is not None:
                    self._metrics.directory_errors_total.labels(op="subscribe").inc()
                if self._subscribed or not gap:
                    log.warning("directory.revocations_disconnected", error=_describe_error(exc))
            except Exception:
                log.exception("directory.subscriber_crashed")
            finally:
                failures = 1 if self._subscribed else failures + 1
                self._subscribed = False
                gap = True
            await asyncio.sleep(min(self._resubscribe_max_s, 0.05 * 2**min(failures, 10)))

    async def _subscribe_and_listen(self, after_gap: bool) -> None:
        """Subscribe and hand revocations to the callbacks until the connection fails."""
        assert self._pubsub_client is not None
        pubsub: PubSub = self._pubsub_client.pubsub()
        try:
            async with asyncio.timeout(self._op_timeout):
                await pubsub.subscribe(self._channel)
            self._subscribed = True
            log.info("directory.revocations_subscribed", channel=self._channel)
            if after_gap:
                # Revocations sent while we were not listening are gone for good: drop every
                # cached access decision rather than serve one that may have been revoked.
                self._deliver_revocation(None, None)
            loop = asyncio.get_running_loop()
            poll = min(1.0, self._config.heartbeat_s)
            # A black-holed connection never errors: treat prolonged silence as a failure.
            silence_limit = 2 * self._config.heartbeat_s + self._op_timeout
            last_seen = last_ping = loop.time()
            while not self._closed:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=poll)
                now = loop.time()
                if message is not None:
                    last_seen = now
                    if message.get("type") == "message":
                        self._handle_revocation(message.get("data"))
                elif now - last_seen > silence_limit:
                    raise TimeoutError("revocation subscription went silent")
                if now - last_ping >= self._config.heartbeat_s:
                    last_ping = now
                    async with asyncio.timeout(self._op_timeout):
                        await pubsub.ping()
        finally:
            with contextlib.suppress(RedisError, OSError):
                async with asyncio.timeout(self._op_timeout):
                    await pubsub.aclose()
