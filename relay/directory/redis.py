"""Redis-backed directory shared by every relay: tunnel ownership, leases, revocations.

Data model (``P`` is the key prefix, ``"relay:"`` by default)::

    P lease:<instance>     string: this run's lease token          PEXPIRE entry_ttl_s
                           the relay's liveness: one key per relay, renewed by its heartbeat
    P host:<hostId>        hash {instance, url, epoch, lease}       no TTL
                           who holds the host's tunnel; epoch is unique per registration,
                           lease is the owner's lease token when it registered
    P instance:<instance>  set of hostIds                           no TTL
                           the relay's index: what start-up clear, release and sweep walk
    P lost:<instance>      list host, epoch, host, epoch, ...       PEXPIRE entry_ttl_s
                           registrations other relays took over, drained by the heartbeat
    P instances            set of instance ids                      no TTL
                           every relay with a lease or an index: the sweep's work list
    P revocations          pub/sub channel, JSON {sub, host, origin, session}

Why: liveness is one lease per relay instead of one TTL per tunnel, so a heartbeat is one
script call of a fixed handful of commands, whatever the number of tunnels (the older layout
refreshed every entry's TTL on every heartbeat: Redis work grew with the tunnel count).

An entry is *alive* while its owner's lease key holds the token written in the entry. A
crashed relay stops renewing its lease, so within entry_ttl_s every one of its entries reads as
offline everywhere at once. A relay restarted with the same instance id starts a new lease
token, so entries of the previous run can never come back to life (and its start-up clear
deletes them anyway). Leases are Redis-side TTLs: relay clocks and their skew play no part.

Every write is one Lua script (relay/directory/scripts.py):

- REGISTER writes the entry and the index. ``force`` (a new tunnel): last write wins; when it
  replaces a live registration of another relay it tells that relay through its lost list and
  drops the host from its index. ``reclaim`` (rewriting what this relay holds after Redis lost
  it) only writes where the entry is absent, dead or still carries the same epoch, so a relay
  coming back never steals a host that reconnected elsewhere. It recreates our lease if it had
  lapsed, and says so: the relay then resyncs.
- UNREGISTER is compare-and-delete on the epoch.
- HEARTBEAT renews the lease, drains the lost list (→ ``on_lost``) and returns the index size.
  A lease found missing (it lapsed, or Redis restarted empty) or an index size that disagrees
  with what the relay holds (a failover lost writes) triggers a *resync*: AUDIT what the relay
  holds, REGISTER ``reclaim`` what is missing, ``on_lost`` what is taken, PRUNE index members
  the relay no longer holds. That is O(tunnels), but only after something was lost.
- LOOKUP reads the entry and checks its owner's lease in one round trip; a dead entry reads as
  None and is deleted on the spot (lazy sweep).
- CLEAR_INSTANCE deletes, in one round trip, every entry still owned by this instance id, its
  index and lost list, and writes (start-up) or drops (release on close) the lease.
- SWEEP, every ``entry_ttl_s`` or so (every heartbeat while work remains), looks at a random
  sample of at most 32 known relays and deletes at most ``sweep_batch`` entries of those whose
  lease is gone, and forgets a relay once its index is empty: a dead relay's entries do not
  linger even if nobody looks them up.

Scripts build other relays' keys from what they read (an entry's owner, the instance set),
which is fine on a single Redis (or Sentinel) but not on Redis Cluster.

Entries without a ``lease`` field come from relays of the older layout (a rolling upgrade):
they carry their own TTL and are read as alive while they exist.

Failure handling: every Redis call is bounded (connect timeout plus ``asyncio.timeout``). A
failed operation marks the directory unhealthy (``/readyz`` → 503) and wakes the health loop,
which pings until Redis answers, then clears start-up leftovers if that never happened, renews
the lease, resyncs every registration this relay holds, applies the compare-and-deletes that
could not be sent during the outage, and marks the directory healthy again. While unhealthy,
``register`` and ``lookup`` fail fast with :class:`DirectoryUnavailable`; local tunnels keep
serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from relay.aio import cancel_and_wait
from relay.config import DirectoryConfig
from relay.directory import scripts
from relay.directory.base import Directory, Owner, new_epoch
from relay.errors import DirectoryUnavailable
from relay.metrics import Metrics

__all__ = ["AuditResult", "HeartbeatResult", "RedisDirectory", "SweepResult", "resync_reason"]

log = structlog.get_logger("relay.directory")

T = TypeVar("T")

# Hosts per script call: keeps each script short enough not to stall Redis for other clients.
BATCH = 500
# Compare-and-deletes remembered during an outage. Past this bound the oldest are dropped; the
# next index-size check notices the leftovers and prunes them.
MAX_PENDING_DELETES = 10_000
# /readyz confirms a healthy directory with a PING when the last success is older than this.
READY_MAX_AGE_S = 1.0
# A revocation's fields are host ids and subjects; anything longer is not one of ours.
MAX_REVOCATION_FIELD = 1024
# Instances one sweep looks at (a random sample of the instance set).
SWEEP_SAMPLE = 32
# Lost-list drains per heartbeat: a mass takeover is worked off over a few heartbeats at most.
MAX_LOST_DRAINS = 20


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    """What one heartbeat found."""

    lease: str  # "renewed" (was live), "recreated" (had lapsed or was lost), "conflict"
    entries: int  # how many hosts our index in Redis names
    lost: tuple[tuple[str, str], ...]  # (host, epoch) other relays took over
    more_lost: int  # takeovers still queued beyond this batch


@dataclass(frozen=True, slots=True)
class AuditResult:
    """How the registrations given to :meth:`RedisDirectory.audit` stand in Redis."""

    present: int  # still carry their epoch
    missing: tuple[str, ...]  # gone from Redis
    taken: tuple[str, ...]  # carry another registration's epoch


@dataclass(frozen=True, slots=True)
class _Written:
    """What one REGISTER call did."""

    results: list[int]  # 1 written / 0 left alone, per host
    lease_was_live: bool  # False: the call had to recreate our lease


@dataclass(frozen=True, slots=True)
class SweepResult:
    """One bounded sweep over relays whose lease is gone."""

    removed: int  # dead entries deleted
    more: bool  # dead entries remain (the next heartbeat sweeps again)


def resync_reason(
    beat: HeartbeatResult, held: int, *, quiet: bool, lease_recreated: bool
) -> str | None:
    """Why what this relay holds must be checked against Redis after ``beat``, or None.

    ``held`` is how many registrations the relay holds; ``quiet`` says no register/unregister
    overlapped the heartbeat (only then can the index size be compared with ``held``);
    ``lease_recreated`` says a registration found our lease gone and wrote it back.
    """
    if beat.lease != "renewed":
        return f"lease_{beat.lease}"  # lapsed, lost with Redis' data, or taken by a twin
    if lease_recreated:
        return "lease_recreated"  # a register renewed it first; entries may have been swept
    if quiet and beat.entries != held:
        return "index_mismatch"  # a failover lost writes, or deletes were dropped
    return None


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
    production, tests shrink them (and replace ``heartbeat_sleep``, the heartbeat loop's wait,
    to run heartbeats one at a time, and ``clock``, by which ``check_ready`` ages the last
    success).
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
        sweep_batch: int = BATCH,
        heartbeat_sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(config.instance_id, config.advertise_url)
        if not config.instance_id:
            raise ValueError("RedisDirectory needs a non-empty instance_id")
        self._config = config
        self._metrics = metrics
        self._prefix = key_prefix
        self._host_prefix = f"{key_prefix}host:"
        self._index_key = f"{key_prefix}instance:{config.instance_id}"
        self._lease_key = f"{key_prefix}lease:{config.instance_id}"
        self._lost_key = f"{key_prefix}lost:{config.instance_id}"
        self._instances_key = f"{key_prefix}instances"
        self._channel = f"{key_prefix}revocations"
        self._ttl_ms = max(1, int(config.entry_ttl_s * 1000))
        self._op_timeout = op_timeout_s
        self._register_attempts = max(1, register_attempts)
        self._register_backoff = register_backoff_s
        self._register_budget = register_budget_s
        self._max_connections = max_connections
        self._close_timeout = close_timeout_s
        self._sweep_batch = max(1, sweep_batch)
        self._heartbeat_sleep = heartbeat_sleep
        self._clock = clock  # ages the last success for check_ready
        # Probe quickly after a failure, but never more often than every 0.1 s.
        self._probe_interval = min(1.0, max(0.1, config.heartbeat_s / 2))
        self._resubscribe_max_s = min(2.0, config.heartbeat_s * 2)
        self._sweep_every = max(1, round(config.entry_ttl_s / config.heartbeat_s))
        # Lets the subscriber skip the echo of our own revocations (delivered directly).
        self._session = uuid.uuid4().hex
        # This run's lease token: entries of an earlier run of the same instance id carry
        # another one, so they read as dead even before the start-up clear removes them.
        self._lease = uuid.uuid4().hex

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
        # Set when a register had to recreate our lease: what we hold may have been swept.
        self._resync_needed = False
        # Writes in flight and a counter of writes started: the index-size check compares
        # only across a heartbeat that no register/unregister overlapped.
        self._writes_inflight = 0
        self._writes_started = 0
        self._registering: set[str] = set()
        self._sweep_more = False
        self._beats = 0  # heartbeats completed (for status pages and tests)
        self._last_ok = 0.0  # monotonic time of the last Redis call that succeeded
        self._ready_probe: asyncio.Task[None] | None = None  # /readyz's single-flight PING

    # ------------------------------------------------------------------ lifecycle

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def check_ready(self, max_age_s: float = READY_MAX_AGE_S) -> bool:
        """Without this, a dead Redis showed in /readyz only at the next heartbeat (up to
        heartbeat_s late). When the last success is older than ``max_age_s``, one PING (shared
        by concurrent callers, bounded by the op timeout) confirms it."""
        if not self._healthy or self._closed or self._client is None:
            return False
        if self._clock() - self._last_ok <= max_age_s:
            return True
        if self._ready_probe is None or self._ready_probe.done():
            self._ready_probe = asyncio.create_task(
                self._probe_ready(), name=f"relay-directory-ready:{self.instance_id}"
            )
        # shield: a client hanging up on /readyz must not cancel the probe other callers share.
        with contextlib.suppress(Exception):
            await asyncio.shield(self._ready_probe)
        return self._healthy

    async def _probe_ready(self) -> None:
        assert self._client is not None
        try:
            await self._call("ping", self._client.ping())
        except DirectoryUnavailable as exc:
            self._mark_unhealthy("ready_check", exc)

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
                ("register", scripts.REGISTER),
                ("unregister", scripts.UNREGISTER),
                ("heartbeat", scripts.HEARTBEAT),
                ("lookup", scripts.LOOKUP),
                ("clear", scripts.CLEAR_INSTANCE),
                ("sweep", scripts.SWEEP),
                ("audit", scripts.AUDIT),
                ("prune", scripts.PRUNE),
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

        With ``release`` (the default) the entries this instance still owns and its lease are
        deleted in one round trip, so other relays stop forwarding here at once instead of after
        entry_ttl_s. ``release=False`` leaves them for the lease to expire, exactly as a crash
        would.
        """
        if self._closed:
            return
        self._closed = True
        was_healthy, self._healthy = self._healthy, False
        tasks, self._tasks = self._tasks, []
        if self._ready_probe is not None:
            tasks.append(self._ready_probe)
            self._ready_probe = None
        await cancel_and_wait(tasks, self._close_timeout)
        still_running = [t for t in tasks if not t.done()]
        if still_running:
            log.warning("directory.close_timeout", tasks=[t.get_name() for t in still_running])
        if release and was_healthy and self._client is not None:
            try:
                released = await self._call("release", self._run_clear(lease=""))
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
        self._begin_write()
        self._registering.add(host_id)
        try:
            for attempt in range(self._register_attempts):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    written = await self._call(
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
                if not written.lease_was_live and self._ever_healthy:
                    # Our lease had lapsed: entries we hold may have been swept meanwhile.
                    self._resync_needed = True
                self._held[host_id] = epoch
                return epoch
        finally:
            self._registering.discard(host_id)
            self._writes_inflight -= 1
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
        self._begin_write()
        try:
            results = await self._call("unregister", self._run_unregister([(host_id, epoch)]))
        except DirectoryUnavailable as exc:
            self._defer_delete(host_id, epoch)
            self._mark_unhealthy("unregister", exc)
            log.warning("directory.unregister_failed", host=host_id, error=_describe_error(exc))
            return False
        finally:
            self._writes_inflight -= 1
        return bool(results and int(results[0]))

    async def lookup(self, host_id: str) -> Owner | None:
        if not self._healthy or self._client is None:
            raise DirectoryUnavailable()
        try:
            data: list[Any] | None = await self._call(
                "lookup",
                self._scripts["lookup"]([self._host_prefix + host_id], [self._prefix, host_id]),
            )
        except DirectoryUnavailable as exc:
            self._mark_unhealthy("lookup", exc)
            raise
        if not data:
            return None
        instance, url, epoch = [*data, None, None, None][:3]
        if not (instance and url and epoch):
            log.warning("directory.entry_malformed", host=host_id)
            return None
        return Owner(instance, url, epoch)

    def registrations(self) -> dict[str, str]:
        """A copy of this relay's live registrations: host_id -> epoch."""
        return dict(self._held)

    # ------------------------------------------------------------------ maintenance ops

    async def heartbeat(self) -> HeartbeatResult:
        """Renew this relay's lease and collect what other relays took over. A fixed number of
        Redis commands, whatever the number of tunnels; it never writes an entry. Does not act
        on what it finds (the heartbeat loop does). Raises :class:`DirectoryUnavailable`."""
        keys = [self._lease_key, self._lost_key, self._index_key, self._instances_key]
        args = [self._lease, self._ttl_ms, BATCH, self.instance_id]
        status, entries, queued, flat = await self._call(
            "heartbeat", self._scripts["heartbeat"](keys, args)
        )
        lost = tuple(zip(flat[0::2], flat[1::2], strict=True))
        return HeartbeatResult(str(status), int(entries), lost, int(queued))

    async def audit(self, entries: Mapping[str, str] | None = None) -> AuditResult:
        """Read-only: which of ``entries`` (default: every registration held) still carry their
        epoch in Redis, which are gone and which were taken. O(entries), in batches: the
        heartbeat loop runs it only after something was lost. Raises DirectoryUnavailable."""
        pairs = list((self._held if entries is None else entries).items())
        present, missing, taken = 0, [], []
        for batch in _batches(pairs):
            keys = [self._host_prefix + host for host, _ in batch]
            args = [epoch for _, epoch in batch] + [host for host, _ in batch]
            got_missing, got_taken = await self._call(
                "audit", self._scripts["audit"](keys, args)
            )
            missing.extend(got_missing)
            taken.extend(got_taken)
            present += len(batch) - len(got_missing) - len(got_taken)
        return AuditResult(present, tuple(missing), tuple(taken))

    async def clear_instance(self) -> int:
        """Delete, in one round trip, every entry this instance id still owns (from any run),
        its index and lost list, and write this run's lease. Returns how many entries were
        deleted. Raises :class:`DirectoryUnavailable`."""
        return int(await self._call("clear", self._run_clear(lease=self._lease)))

    async def sweep(self) -> SweepResult:
        """Delete at most ``sweep_batch`` entries of relays whose lease is gone (one round
        trip); forget relays whose index is empty. Raises :class:`DirectoryUnavailable`."""
        args = [self._prefix, self.instance_id, self._sweep_batch, SWEEP_SAMPLE]
        removed, more = await self._call(
            "sweep", self._scripts["sweep"]([self._instances_key], args)
        )
        return SweepResult(int(removed), bool(int(more)))

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
            "heartbeats": self._beats,
        }

    # ------------------------------------------------------------------ internals: calls

    async def _call(self, op: str, awaitable: Awaitable[T], deadline_s: float | None = None) -> T:
        """Await one Redis operation with a hard deadline; failures become DirectoryUnavailable."""
        limit = self._op_timeout if deadline_s is None else deadline_s
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the operation completes, and close() relies on cancellation.
            async with asyncio.timeout(limit):
                result = await awaitable
            self._last_ok = self._clock()
            return result
        except (RedisError, OSError) as exc:  # OSError covers TimeoutError
            if self._metrics is not None:
                self._metrics.directory_errors_total.labels(op=op).inc()
            raise DirectoryUnavailable() from exc

    def _entry_keys(self, pairs: list[tuple[str, str]]) -> list[str]:
        return [self._index_key, *(self._host_prefix + host for host, _ in pairs)]

    async def _run_register(self, mode: str, pairs: list[tuple[str, str]]) -> _Written:
        keys = [self._index_key, self._lease_key, self._instances_key]
        keys += [self._host_prefix + host for host, _ in pairs]
        args = [self.instance_id, self.advertise_url, self._lease, self._ttl_ms, mode, self._prefix]
        args += [epoch for _, epoch in pairs] + [host for host, _ in pairs]
        results = [int(r) for r in await self._scripts["register"](keys, args)]
        return _Written(results[:-1], bool(results[-1]))

    async def _run_unregister(self, pairs: list[tuple[str, str]]) -> list[int]:
        args = [epoch for _, epoch in pairs] + [host for host, _ in pairs]
        return [int(r) for r in await self._scripts["unregister"](self._entry_keys(pairs), args)]

    async def _run_clear(self, *, lease: str) -> int:
        keys = [self._index_key, self._lease_key, self._lost_key, self._instances_key]
        return int(await self._scripts["clear"](
            keys, [self.instance_id, self._prefix, lease, self._ttl_ms]
        ))

    def _begin_write(self) -> None:
        self._writes_inflight += 1
        self._writes_started += 1

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
            written_flags = (await self._call(op, self._run_register("reclaim", batch))).results
            written: list[tuple[str, str]] = []
            for (host, epoch), result in zip(batch, written_flags, strict=True):
                if result:
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

    async def _resync(self, op: str) -> None:
        """Make Redis agree with what we hold after something was lost (a lapsed lease, an
        emptied Redis, a failover): O(tunnels), in batches, and only then."""
        snapshot = dict(self._held)
        result = await self.audit(snapshot)
        for host in result.taken:
            self._lose(host, snapshot[host], reason="taken")
        missing = {h: snapshot[h] for h in result.missing if self._held.get(h) == snapshot[h]}
        if missing:
            log.warning("directory.entry_missing", hosts=len(missing), op=op)
            await self._reclaim(missing, op=op)
        await self._prune_index(op)

    async def _prune_index(self, op: str) -> None:
        """Drop index members (and our entries) for hosts we no longer hold: left behind when
        deferred deletes overflowed, or when a failover brought back an unregistered entry."""
        assert self._client is not None
        members = await self._call(op, self._client.smembers(self._index_key))
        extra = [str(h) for h in members if h not in self._held and h not in self._registering]
        pruned = 0
        for start in range(0, len(extra), BATCH):
            batch = extra[start : start + BATCH]
            keys = [self._index_key, *(self._host_prefix + h for h in batch)]
            # A host registered again since the snapshot keeps the epoch it has now; one
            # registered while this runs may be pruned, and the next index check restores it.
            args = [self.instance_id, *(self._held.get(h, "") for h in batch), *batch]
            pruned += int(await self._call(op, self._scripts["prune"](keys, args)))
        if pruned:
            log.info("directory.index_pruned", entries=pruned, op=op)

    async def _flush_pending_deletes(self) -> None:
        pairs = list(self._pending_deletes)
        for batch in _batches(pairs):
            await self._call("unregister", self._run_unregister(batch))
            for pair in batch:
                self._pending_deletes.pop(pair, None)

    async def _recover(self) -> None:
        """Bring the directory to healthy: ping, clear leftovers once, renew the lease, resync
        what we hold, apply deferred deletes. Raises DirectoryUnavailable, leaving it
        unhealthy."""
        assert self._client is not None
        await self._call("ping", self._client.ping())
        just_cleared = False
        if not self._cleared:
            cleared = await self.clear_instance()  # also writes this run's lease
            self._cleared = just_cleared = True
            log.info("directory.startup_cleared", instance=self.instance_id, entries=cleared)
        await self._flush_pending_deletes()
        held = len(self._held)
        if self._held or not just_cleared:
            # After an outage anything may have happened: resync whatever we hold (once).
            await self._renew(op="reclaim", resync=bool(self._held))
        # No await between here and the flag: nothing can slip in between.
        self._healthy = True
        self._last_error = None
        if self._ever_healthy:
            since = self._unhealthy_since
            log.info(
                "directory.redis_recovered", instance=self.instance_id, reregistered=held,
                down_s=None if since is None else round(time.time() - since, 3),
            )
        else:
            log.info("directory.started", instance=self.instance_id, url=self.advertise_url)
        self._ever_healthy = True
        self._unhealthy_since = None

    async def _renew(self, op: str, resync: bool = False) -> None:
        """One heartbeat: renew the lease, hand takeovers to ``on_lost``, resync when the lease
        had lapsed or the index disagrees with what we hold (or when ``resync`` says so)."""
        writes_before = self._writes_started
        quiet = self._writes_inflight == 0
        result = await self.heartbeat()
        for _ in range(MAX_LOST_DRAINS):
            for host, epoch in result.lost:
                self._lose(host, epoch, reason="taken")
            if not result.more_lost:
                break
            result = await self.heartbeat()
        quiet = quiet and self._writes_inflight == 0 and self._writes_started == writes_before
        if result.lease != "renewed":
            level = log.error if result.lease == "conflict" else log.warning
            # A conflict means two running relays share an instance id: a misconfiguration
            # they will fight over until one is renamed.
            level("directory.lease_" + result.lease, instance=self.instance_id, op=op,
                  held=len(self._held))
        reason = resync_reason(result, len(self._held), quiet=quiet,
                               lease_recreated=self._resync_needed)
        if reason == "index_mismatch":
            log.warning("directory.index_mismatch", redis=result.entries, held=len(self._held))
        if reason is not None or resync:
            self._resync_needed = False
            await self._resync(op)

    async def _beat(self) -> None:
        if self._pending_deletes:
            await self._flush_pending_deletes()
        await self._renew(op="heartbeat")

    async def _heartbeat_loop(self) -> None:
        beats = 0
        while not self._closed:
            await self._heartbeat_sleep(self._config.heartbeat_s)
            if not self._healthy:
                continue  # the health loop owns an unhealthy directory
            try:
                async with self._maintenance:
                    if not self._healthy:
                        continue
                    await self._beat()
                    beats += 1
                    if self._sweep_more or beats % self._sweep_every == 0:
                        swept = await self.sweep()
                        self._sweep_more = swept.more
                        if swept.removed:
                            log.info("directory.swept", removed=swept.removed, more=swept.more)
                    self._beats = beats  # after the sweep: a completed beat did all its work
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
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py
