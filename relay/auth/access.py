"""Access decisions: may this verified identity reach -- or serve -- this host?

Every decision has an :class:`AccessRole`: ``client`` (a ``/hosts`` request or channel) or
``agent`` (a ``/tunnel`` registration: the right to *answer* for the host, which is worth more
than the right to call it). Order, for every tunnel and every proxied request:

1. **Org short-circuit** -- the host's organisation must be among the token's organisations,
   else ``403 not_in_org`` at once, with no upstream call.
2. **Backend**:

   * ``org``: membership suffices for a client; an agent also needs the token's agent claim
     (``auth.agent_claim``) to cover the host id (source ``local``);
   * ``static``: a grants file read at start, each grant naming its roles (source ``local``),
     see :class:`StaticGrantsBackend` for the format;
   * ``upstream``: ``POST access.upstream_url`` with the caller's bearer token and
     ``{"hostId": "...", "role": "client"|"agent"}``; ``200 {"allowed": true|false}`` decides.
     Answers are cached by ``(sub, hostId, role)`` -- never by token, which rotates hourly
     while the grant does not -- allowed for ``allow_ttl_s``, denied for ``deny_ttl_s``, in
     bounded LRUs. Concurrent misses for one key share one call. Failures are
     ``503 access_unavailable``, never cached as a denial, and a short fail-fast window keeps a
     sick upstream from being hammered.

Clock, HTTP session and metrics are passed in. Nothing here logs a token.
"""

from __future__ import annotations

import asyncio
import json
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import structlog

from relay.aio import KeyedSingleFlight
from relay.auth.hostid import HostId, HostPatterns, parse_host_pattern
from relay.auth.tokens import Identity
from relay.auth.ttlcache import TTLCache
from relay.config import AccessBackend, Config
from relay.errors import AccessUnavailable, ConfigError, ErrorCode, Forbidden
from relay.metrics import AccessOutcome, AccessSource, Metrics
from relay.protocol.close import MAX_REASON_BYTES, fit_reason

__all__ = [
    "AccessPolicy",
    "AccessRole",
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



def may_not_serve(host: HostId, why: str, advice: str) -> str:
    """The refusal an agent sees in its 4403 close reason: what is missing and what to do."""
    message = f"token may not serve {host} ({why}); {advice}"
    if len(message.encode()) > MAX_REASON_BYTES:  # long host ids: keep the advice, drop the id
        message = f"token may not serve this host ({why}); {advice}"
    return fit_reason(message)


class AccessRole(StrEnum):
    """What the caller wants to do with the host."""

    CLIENT = "client"  # call it: a /hosts request or WebSocket channel
    AGENT = "agent"  # serve it: register the /tunnel that answers for it


CacheKey = tuple[str, str, AccessRole]  # (identity.sub, str(host), role)


class LocalBackend(Protocol):
    """A backend that decides without I/O (after the org short-circuit has passed).

    ``allows`` returns True, or the reason to give the caller (a short, safe message).
    """

    def allows(self, identity: Identity, host: HostId, role: AccessRole) -> bool | str: ...


class OrgMembershipBackend:
    """``access.backend = "org"``: membership in the host's organisation lets a client in.

    Serving is more: an org member without the agent claim for a host must not be able to
    register a tunnel for it, or any colleague could replace the real agent and answer every
    user's requests with their own service.
    """

    def __init__(self, agent_claim: str = "relayHosts") -> None:
        self._agent_claim = agent_claim

    def allows(self, identity: Identity, host: HostId, role: AccessRole) -> bool | str:
        if host.org not in identity.orgs:
            return False
        if role is AccessRole.AGENT and not identity.may_serve(host):
            why = f"no {self._agent_claim} claim for it"
            return may_not_serve(host, why, "mint an agent token")
        return True


class StaticGrantsBackend:
    """``access.backend = "static"``: grants listed in a JSON or TOML file.

    JSON::

        {"grants": [
            {"sub": "auth0|alice", "hosts": ["acme:laptop-1", "acme:*"]},
            {"sub": "auth0|alice", "hosts": ["acme:laptop-1"], "roles": ["agent"]},
            {"sub": "auth0|bob", "hosts": ["acme:build-7"], "roles": ["client", "agent"]}
        ]}

    TOML (chosen by the ``.toml`` suffix)::

        [[grants]]
        sub = "auth0|alice"
        hosts = ["acme:laptop-1", "acme:*"]
        roles = ["client"]

    A host entry is an exact host id or ``<org>:*`` for every machine of that org. ``roles``
    lists what the grant allows: ``client`` (call the hosts) and/or ``agent`` (register their
    tunnels). A grant without ``roles`` -- every grant written before roles existed -- is
    ``["client"]`` only: serving a host must be granted explicitly. Grants add to, never
    replace, the org short-circuit: ``acme:*`` still requires ``acme`` in the token. The same
    ``sub`` may appear in several grants; they add up.
    """

    DEFAULT_ROLES = (AccessRole.CLIENT,)

    def __init__(
        self,
        grants: Mapping[str, Iterable[str]] | Iterable[tuple[str, Iterable[str], Iterable[str]]],
        source: str = "<memory>",
    ) -> None:
        """``grants``: ``(sub, hosts, roles)`` triples, or ``{sub: hosts}`` (client role)."""
        key = "access.static_grants_file"
        triples: Iterable[tuple[str, Iterable[str], Iterable[str]]]
        if isinstance(grants, Mapping):
            triples = [(sub, hosts, self.DEFAULT_ROLES) for sub, hosts in grants.items()]
        else:
            triples = grants
        self._grants: dict[tuple[str, AccessRole], HostPatterns] = {}
        for sub, hosts, roles in triples:
            for pattern in hosts:
                if parse_host_pattern(pattern) is None:
                    raise ConfigError(
                        source, key, f"grant for {sub!r}: {pattern!r} is not a host id or <org>:*"
                    )
            patterns = HostPatterns.parse(hosts)
            for role_name in roles:
                try:
                    role = AccessRole(role_name)
                except ValueError:
                    raise ConfigError(
                        source, key, f"grant for {sub!r}: role {role_name!r} is not client or agent"
                    ) from None
                self._grants[(sub, role)] = self._grants.get((sub, role), HostPatterns()) | patterns

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
        grants: list[tuple[str, list[str], list[str]]] = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ConfigError(source, key, f"grants[{index}]: must be a table/object")
            sub, hosts = entry.get("sub"), entry.get("hosts")
            roles = entry.get("roles", [str(r) for r in cls.DEFAULT_ROLES])
            if not isinstance(sub, str) or not sub:
                raise ConfigError(source, key, f"grants[{index}]: sub must be a non-empty string")
            if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
                raise ConfigError(source, key, f"grants[{index}]: hosts must be a list of strings")
            if (not isinstance(roles, list) or not roles
                    or not all(isinstance(r, str) for r in roles)):
                raise ConfigError(
                    source, key,
                    f'grants[{index}]: roles must be a non-empty list of "client" / "agent"',
                )
            grants.append((sub, hosts, roles))
        return cls(grants, source)

    def allows(self, identity: Identity, host: HostId, role: AccessRole) -> bool | str:
        patterns = self._grants.get((identity.sub, role))
        if patterns is not None and patterns.covers(host):
            return True
        if role is AccessRole.AGENT:
            return may_not_serve(host, "no agent grant for it", "ask for an agent grant")
        return False


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
        role = key[2]
        started = time.perf_counter()
        status = 0
        body: bytes | None = b""
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._session.post(
                    self._url,
                    json={"hostId": str(host), "role": str(role)},
                    headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                    # A redirect would carry the caller's token to wherever it points.
                    allow_redirects=False,
                ) as resp:
                    status = resp.status
                    if 200 <= status < 300:
                        body = await _read_bounded(resp, MAX_UPSTREAM_BODY)
        except TimeoutError:
            self._failed("timeout", host, role, status or None)
            raise _UpstreamSick() from None
        except (aiohttp.ClientError, OSError) as exc:
            self._failed(type(exc).__name__, host, role, status or None)
            raise _UpstreamSick() from None
        finally:
            if self._metrics is not None:
                self._metrics.access_upstream_duration_seconds.observe(
                    time.perf_counter() - started
                )
        if not 200 <= status < 300:
            self._failed("status", host, role, status)
            if 400 <= status < 500 and status not in _UPSTREAM_SICK_4XX:
                raise _CallerRefused()
            raise _UpstreamSick()
        allowed = _parse_allowed(body)
        if allowed is None:
            self._failed("malformed_answer", host, role, status)
            raise _UpstreamSick()
        return allowed

    def _failed(self, error: str, host: HostId, role: AccessRole, status: int | None) -> None:
        log.warning("access.upstream_error", error=error, status=status, host=str(host),
                    role=str(role))


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
        self._calls: KeyedSingleFlight[CacheKey, bool] = KeyedSingleFlight("relay-access-check")
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

    async def check(
        self, identity: Identity, host: HostId, token: str, *, role: AccessRole
    ) -> str:
        """Return where the decision came from (``local``, ``cache``, ``upstream``) or raise
        :class:`Forbidden` (``not_in_org`` / ``not_registered``) or :class:`AccessUnavailable`.

        ``role`` has no default on purpose: a tunnel checked as a client would be the hijack.
        """
        if host.org not in identity.orgs:
            self._denied("not_in_org", identity, host, role, AccessSource.LOCAL)
            raise Forbidden(MSG_NOT_IN_ORG, code=ErrorCode.NOT_IN_ORG)

        backend = self._backend
        if not isinstance(backend, UpstreamAccessBackend):
            verdict = backend.allows(identity, host, role)
            if verdict is True:
                self._record(AccessOutcome.ALLOWED, AccessSource.LOCAL)
                return AccessSource.LOCAL
            if isinstance(verdict, str):
                self._denied("may_not_serve", identity, host, role, AccessSource.LOCAL)
                raise Forbidden(verdict, code=ErrorCode.NOT_REGISTERED)
            self._denied("not_registered", identity, host, role, AccessSource.LOCAL)
            raise Forbidden(MSG_NOT_REGISTERED, code=ErrorCode.NOT_REGISTERED)

        key: CacheKey = (identity.sub, str(host), role)
        if self._allow.get(key):
            self._record(AccessOutcome.ALLOWED, AccessSource.CACHE)
            return AccessSource.CACHE
        if self._deny.get(key):
            self._denied("not_registered", identity, host, role, AccessSource.CACHE, level="debug")
            raise Forbidden(MSG_NOT_REGISTERED, code=ErrorCode.NOT_REGISTERED)

        try:
            revocations = self._revocations
            allowed = await self._calls(key, lambda: self._call_and_cache(
                backend, key, host, token, revocations))
        except AccessUnavailable:
            self._record(AccessOutcome.UNAVAILABLE, AccessSource.UPSTREAM)
            raise
        if allowed:
            self._record(AccessOutcome.ALLOWED, AccessSource.UPSTREAM)
            return AccessSource.UPSTREAM
        self._denied("not_registered", identity, host, role, AccessSource.UPSTREAM)
        raise Forbidden(MSG_NOT_REGISTERED, code=ErrorCode.NOT_REGISTERED)

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
        """Forget cached decisions matching ``sub`` and/or ``host`` (both None: all), for
        both roles.

        Returns how many cache entries were dropped. Calls in flight for matching keys are
        detached, and their answers will not be cached.
        """

        def matches(key: CacheKey, _value: object = None) -> bool:
            return (sub is None or key[0] == sub) and (host is None or key[1] == host)

        self._revocations += 1
        self._calls.detach(matches)
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
        await self._calls.cancel(timeout=1.0)

    def _record(self, outcome: AccessOutcome, source: AccessSource) -> None:
        if self._metrics is not None:
            metrics = self._metrics
            metrics.child(metrics.access_decisions_total, outcome, source).inc()

    def _denied(
        self,
        reason: str,
        identity: Identity,
        host: HostId,
        role: AccessRole,
        source: AccessSource,
        level: str = "info",
    ) -> None:
        self._record(AccessOutcome.DENIED, source)
        getattr(log, level)(
            "access.denied", reason=reason, sub=identity.sub, host=str(host), role=str(role),
            source=source,
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
    if access.backend == AccessBackend.ORG:
        backend = OrgMembershipBackend(config.auth.agent_claim)
    elif access.backend == AccessBackend.STATIC:
        backend = StaticGrantsBackend.from_file(config.resolve_path(access.static_grants_file))
    elif access.backend == AccessBackend.UPSTREAM:
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
