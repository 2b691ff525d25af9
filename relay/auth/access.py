"""Access decisions: may this verified identity reach this host?

Order (SPEC "Identity and access"), for every tunnel and every proxied request:

1. **Org short-circuit** -- the host's organisation must be among the token's organisations,
   else ``403 not_in_org`` at once, with no upstream call.
2. **Backend**:

   * ``org``: membership suffices (source ``local``);
   * ``static``: a grants file read at start (source ``local``), see
     :class:`StaticGrantsBackend` for the format;
   * ``upstream``: ``POST access.upstream_url`` with the caller's bearer token and
     ``{"hostId": "..."}``; ``200 {"allowed": true|false}`` decides. Answers are cached by
     ``(sub, hostId)`` -- never by token, which rotates hourly while the grant does not --
     allowed for ``allow_ttl_s``, denied for ``deny_ttl_s``, in bounded LRUs. Concurrent misses
     for one key share one call. Failures are ``503 access_unavailable``, never cached as a
     denial, and a short fail-fast window keeps a sick upstream from being hammered.

Clock, HTTP session and metrics are passed in. Nothing here logs a token.
"""

from __future__ import annotations

import asyncio
import json
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import structlog

from relay.auth.hostid import HostId, is_valid_host_part, parse_host_id
from relay.auth.tokens import Identity
from relay.auth.ttlcache import TTLCache
from relay.config import Config
from relay.errors import AccessUnavailable, ConfigError, ErrorCode, Forbidden, InvalidHost
from relay.metrics import Metrics

__all__ = [
    "AccessPolicy",
    "LocalBackend",
    "OrgMembershipBackend",
    "StaticGrantsBackend",
    "UpstreamAccessBackend",
    "build_access_policy",
]

log = structlog.get_logger("relay.access")

MSG_NOT_IN_ORG = "this host belongs to an organisation your token does not include"
MSG_NOT_REGISTERED = "you do not have access to this host"
MSG_UNAVAILABLE = "the access check is unavailable; retry shortly"

MAX_UPSTREAM_BODY = 65536
# 4xx answers (other than these) are about the caller's request, not the upstream's health.
_UPSTREAM_SICK_4XX = frozenset({408, 429})

CacheKey = tuple[str, str]  # (identity.sub, str(host))


class LocalBackend(Protocol):
    """A backend that decides without I/O (after the org short-circuit has passed)."""

    def allows(self, identity: Identity, host: HostId) -> bool: ...


class OrgMembershipBackend:
    """``access.backend = "org"``: membership in the host's organisation is enough."""

    def allows(self, identity: Identity, host: HostId) -> bool:
        return host.org in identity.orgs


class StaticGrantsBackend:
    """``access.backend = "static"``: grants listed in a JSON or TOML file.

    JSON::

        {"grants": [
            {"sub": "auth0|alice", "hosts": ["acme:laptop-1", "acme:*"]},
            {"sub": "auth0|bob", "hosts": ["acme:build-7"]}
        ]}

    TOML (chosen by the ``.toml`` suffix)::

        [[grants]]
        sub = "auth0|alice"
        hosts = ["acme:laptop-1", "acme:*"]

    A host entry is an exact host id or ``<org>:*`` for every machine of that org. Grants add
    to, never replace, the org short-circuit: ``acme:*`` still requires ``acme`` in the token.
    The same ``sub`` may appear in several grants; they add up.
    """

    def __init__(self, grants: Mapping[str, Iterable[str]], source: str = "<memory>") -> None:
        self._exact: dict[str, frozenset[str]] = {}
        self._orgs: dict[str, frozenset[str]] = {}
        for sub, hosts in grants.items():
            exact: set[str] = set()
            orgs: set[str] = set()
            for pattern in hosts:
                org, sep, machine = pattern.partition(":")
                if sep and machine == "*" and is_valid_host_part(org):
                    orgs.add(org)
                    continue
                try:
                    exact.add(str(parse_host_id(pattern)))
                except InvalidHost:
                    raise ConfigError(
                        source,
                        "access.static_grants_file",
                        f"grant for {sub!r}: {pattern!r} is not a host id or <org>:*",
                    ) from None
            self._exact[sub] = frozenset(exact)
            self._orgs[sub] = frozenset(orgs)

    @classmethod
    def from_file(cls, path: Path) -> StaticGrantsBackend:
        """Load a grants file; :class:`ConfigError` (file, key, problem) when it is unusable."""
        source = str(path)
        key = "access.static_grants_file"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(source, key, f"cannot read: {exc.strerror}") from None
        doc: Any
        try:
            doc = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(source, key, f"cannot parse: {exc}") from None
        entries = doc.get("grants") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise ConfigError(source, key, 'must contain a "grants" list')
        grants: dict[str, list[str]] = {}
        for index, entry in enumerate(entries):
            sub = entry.get("sub") if isinstance(entry, dict) else None
            hosts = entry.get("hosts") if isinstance(entry, dict) else None
            if not isinstance(sub, str) or not sub:
                raise ConfigError(source, key, f"grants[{index}]: sub must be a non-empty string")
            if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
                raise ConfigError(source, key, f"grants[{index}]: hosts must be a list of strings")
            grants.setdefault(sub, []).extend(hosts)
        return cls(grants, source)

    def allows(self, identity: Identity, host: HostId) -> bool:
        return str(host) in self._exact.get(identity.sub, ()) or host.org in self._orgs.get(
            identity.sub, ()
        )


class UpstreamAccessBackend:
    """The ``checkAccess`` client, with the fail-fast windows that protect the upstream.

    Two windows, because failures come in two kinds:

    * **Upstream sick** (timeout, connection error, 5xx, 408/429, malformed answer): one
      *global* window of ``failure_backoff_s``. During an outage every key is failing, so a
      per-key window would still send one call per distinct (sub, host) per window -- thousands
      from a busy relay. A global window sends about one. It is kept short (seconds) because
      it also fails healthy keys: recovery is noticed by the first call after the window, which
      runs alone (a half-open probe) while the others keep failing fast until it answers.
    * **Caller-specific refusal** (any other 4xx, e.g. the upstream rejects this token or does
      not know this host): a *per-key* window of the same length. Letting those trip the global
      window would let one client with odd requests take access down for everyone.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        timeout_s: float = 5.0,
        failure_backoff_s: float = 2.0,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        key_backoff_size: int = 10000,
    ) -> None:
        self._session = session
        self._url = url
        self._timeout_s = timeout_s
        self._backoff_s = failure_backoff_s
        self._metrics = metrics
        self._clock = clock
        self._failing = False  # the upstream looked sick at the last call
        self._fail_until = 0.0
        self._probing = False
        self._key_backoff: TTLCache[CacheKey, bool] = TTLCache(
            key_backoff_size, failure_backoff_s, clock
        )

    @property
    def healthy(self) -> bool:
        """False while the upstream is believed down (for readiness checks)."""
        return not self._failing

    async def decide(self, key: CacheKey, host: HostId, token: str) -> bool:
        """The upstream's answer for ``key``; :class:`AccessUnavailable` when there is none."""
        if key in self._key_backoff:
            raise AccessUnavailable(MSG_UNAVAILABLE)
        probe = False
        if self._failing:
            if self._clock() < self._fail_until or self._probing:
                raise AccessUnavailable(MSG_UNAVAILABLE)
            probe = self._probing = True
        try:
            allowed = await self._call(key, host, token)
        except _CallerRefused:
            self._key_backoff.set(key, True)
            if probe:
                # The upstream answered, so it is up; this caller's 4xx says nothing more.
                self._failing = False
            raise AccessUnavailable(MSG_UNAVAILABLE) from None
        except _UpstreamSick:
            self._failing = True
            self._fail_until = self._clock() + self._backoff_s
            raise AccessUnavailable(MSG_UNAVAILABLE) from None
        finally:
            if probe:
                self._probing = False
        if self._failing:
            log.info("access.upstream_recovered")
        self._failing = False
        return allowed

    async def _call(self, key: CacheKey, host: HostId, token: str) -> bool:
        started = time.perf_counter()
        status = 0
        body: bytes | None = b""
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._session.post(
                    self._url,
                    json={"hostId": str(host)},
                    headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                    # A redirect would carry the caller's token to wherever it points.
                    allow_redirects=False,
                ) as resp:
                    status = resp.status
                    if 200 <= status < 300:
                        body = await _read_bounded(resp, MAX_UPSTREAM_BODY)
        except TimeoutError:
            self._failed("timeout", host, status or None)
            raise _UpstreamSick() from None
        except (aiohttp.ClientError, OSError) as exc:
            self._failed(type(exc).__name__, host, status or None)
            raise _UpstreamSick() from None
        finally:
            if self._metrics is not None:
                self._metrics.access_upstream_duration_seconds.observe(
                    time.perf_counter() - started
                )
        if not 200 <= status < 300:
            self._failed("status", host, status)
            if 400 <= status < 500 and status not in _UPSTREAM_SICK_4XX:
                raise _CallerRefused()
            raise _UpstreamSick()
        allowed = _parse_allowed(body)
        if allowed is None:
            self._failed("malformed_answer", host, status)
            raise _UpstreamSick()
        return allowed

    def _failed(self, error: str, host: HostId, status: int | None) -> None:
        log.warning("access.upstream_error", error=error, status=status, host=str(host))


class _UpstreamSick(Exception):
    pass


class _CallerRefused(Exception):
    pass


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None when it is longer than ``limit`` (not a checkAccess answer)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(16384):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_allowed(body: bytes | None) -> bool | None:
    if body is None:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    allowed = doc.get("allowed") if isinstance(doc, dict) else None
    return allowed if isinstance(allowed, bool) else None


class AccessPolicy:
    """Runs the org short-circuit, then the backend (with caches for the upstream one)."""

    def __init__(
        self,
        backend: LocalBackend | UpstreamAccessBackend,
        *,
        allow_ttl_s: float = 900.0,
        deny_ttl_s: float = 30.0,
        allow_cache_size: int = 100000,
        deny_cache_size: int = 100000,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        self._metrics = metrics
        self._allow: TTLCache[CacheKey, bool] = TTLCache(allow_cache_size, allow_ttl_s, clock)
        self._deny: TTLCache[CacheKey, bool] = TTLCache(deny_cache_size, deny_ttl_s, clock)
        self._inflight: dict[CacheKey, asyncio.Task[bool]] = {}
        # Bumped by revoke(): an upstream answer that was requested before a revocation must
        # not be cached after it.
        self._revocations = 0

    @property
    def backend(self) -> LocalBackend | UpstreamAccessBackend:
        return self._backend

    @property
    def healthy(self) -> bool:
        backend = self._backend
        return backend.healthy if isinstance(backend, UpstreamAccessBackend) else True

    async def check(self, identity: Identity, host: HostId, token: str) -> str:
        """Return where the decision came from (``local``, ``cache``, ``upstream``) or raise
        :class:`Forbidden` (``not_in_org`` / ``not_registered``) or :class:`AccessUnavailable`.
        """
        if host.org not in identity.orgs:
            self._denied("not_in_org", identity, host, "local")
            raise Forbidden(MSG_NOT_IN_ORG, code=ErrorCode.NOT_IN_ORG)

        backend = self._backend
        if not isinstance(backend, UpstreamAccessBackend):
            if backend.allows(identity, host):
                self._record("allowed", "local")
                return "local"
            self._denied("not_registered", identity, host, "local")
            raise Forbidden(MSG_NOT_REGISTERED, code=ErrorCode.NOT_REGISTERED)

        key: CacheKey = (identity.sub, str(host))
        if self._allow.get(key):
            self._record("allowed", "cache")
            return "cache"
        if self._deny.get(key):
            self._denied("not_registered", identity, host, "cache", level="debug")
            raise Forbidden(MSG_NOT_REGISTERED, code=ErrorCode.NOT_REGISTERED)

        try:
            allowed = await self._shared_call(backend, key, host, token)
        except AccessUnavailable:
            self._record("unavailable", "upstream")
            raise
        if allowed:
            self._record("allowed", "upstream")
            return "upstream"
        self._denied("not_registered", identity, host, "upstream")
        raise Forbidden(MSG_NOT_REGISTERED, code=ErrorCode.NOT_REGISTERED)

    async def _shared_call(
        self, backend: UpstreamAccessBackend, key: CacheKey, host: HostId, token: str
    ) -> bool:
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._call_and_cache(backend, key, host, token, self._revocations),
                name=f"relay-access-check:{key[1]}",
            )
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._call_done(key, t))
        # shield: a waiter that is cancelled (client went away) must not cancel the call the
        # other waiters share; the task itself always runs to completion or timeout.
        return await asyncio.shield(task)

    def _call_done(self, key: CacheKey, task: asyncio.Task[bool]) -> None:
        # Identity check: revoke() may have detached this task and a newer one taken the key.
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved, so an all-waiters-gone failure is not "never retrieved"

    async def _call_and_cache(
        self,
        backend: UpstreamAccessBackend,
        key: CacheKey,
        host: HostId,
        token: str,
        revocations: int,
    ) -> bool:
        allowed = await backend.decide(key, host, token)
        if revocations == self._revocations:
            if allowed:
                self._deny.pop(key)
                self._allow.set(key, True)
            else:
                self._allow.pop(key)
                self._deny.set(key, True)
        return allowed

    def revoke(self, sub: str | None = None, host: str | None = None) -> int:
        """Forget cached decisions matching ``sub`` and/or ``host`` (both None: all).

        Returns how many cache entries were dropped. Calls in flight for matching keys are
        detached, and their answers will not be cached.
        """

        def matches(key: CacheKey, _value: object = None) -> bool:
            return (sub is None or key[0] == sub) and (host is None or key[1] == host)

        self._revocations += 1
        for key in [k for k in self._inflight if matches(k)]:
            del self._inflight[key]
        count = self._allow.remove_where(matches) + self._deny.remove_where(matches)
        log.info("access.revoked", sub=sub, host=host, entries=count)
        return count

    def update_ttls(self, allow_ttl_s: float, deny_ttl_s: float) -> None:
        """New TTLs (config reload); they apply to entries already cached too."""
        self._allow.ttl = allow_ttl_s
        self._deny.ttl = deny_ttl_s

    def cache_sizes(self) -> tuple[int, int]:
        return len(self._allow), len(self._deny)

    async def close(self) -> None:
        """Cancel upstream calls still in flight (shutdown)."""
        tasks = list(self._inflight.values())
        self._inflight.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)

    def _record(self, outcome: str, source: str) -> None:
        if self._metrics is not None:
            self._metrics.access_decisions_total.labels(outcome=outcome, source=source).inc()

    def _denied(
        self, reason: str, identity: Identity, host: HostId, source: str, level: str = "info"
    ) -> None:
        self._record("denied", source)
        getattr(log, level)(
            "access.denied", reason=reason, sub=identity.sub, host=str(host), source=source
        )


def build_access_policy(
    config: Config,
    session: aiohttp.ClientSession | None = None,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> AccessPolicy:
    """The policy ``config.access`` describes. ``session`` is required for ``upstream``.

    Reads the static grants file (synchronously, at start-up); raises :class:`ConfigError` when
    it is unusable.
    """
    access = config.access
    backend: LocalBackend | UpstreamAccessBackend
    if access.backend == "org":
        backend = OrgMembershipBackend()
    elif access.backend == "static":
        backend = StaticGrantsBackend.from_file(config.resolve_path(access.static_grants_file))
    elif access.backend == "upstream":
        if session is None:
            raise ValueError("access.backend upstream needs an aiohttp.ClientSession")
        backend = UpstreamAccessBackend(
            session,
            access.upstream_url,
            timeout_s=access.upstream_timeout_s,
            failure_backoff_s=access.failure_backoff_s,
            metrics=metrics,
            clock=clock,
        )
    else:
        raise ConfigError(config.source, "access.backend", f"unknown backend {access.backend!r}")
    return AccessPolicy(
        backend,
        allow_ttl_s=access.allow_ttl_s,
        deny_ttl_s=access.deny_ttl_s,
        allow_cache_size=access.allow_cache_size,
        deny_cache_size=access.deny_cache_size,
        metrics=metrics,
        clock=clock,
    )
