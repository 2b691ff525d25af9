"""Bearer token verification: from a JWT to an :class:`Identity`, or a terse 401.

Identity comes from the verified token alone (subject, organisations, email); nothing is
looked up per request. The verifier is pure-ish: keys come from a :mod:`relay.auth.keys`
source passed in, time from an injected clock.

What a token must pass, in order:

1. be present and at most :data:`MAX_TOKEN_LENGTH` characters;
2. a header whose ``alg`` is in the configured allowlist (asymmetric only: ``none`` and
   every ``HS*`` are refused whatever the config says);
3. a key from the key source for its ``kid`` whose family matches ``alg``;
4. PyJWT's signature check and ``iss``/``aud`` validation (``iss`` and ``aud`` when
   configured; dev mode defaults them);
5. ``exp``, ``nbf`` and ``iat`` against the injected clock with ``auth.leeway_s`` (PyJWT would
   read the wall clock itself), a non-empty string ``sub`` and a list of strings under
   ``auth.org_claim``.

The agent claim (``auth.agent_claim``, default ``relayHosts``) lists the host ids the token may
*serve* (register a tunnel for): exact ids or ``<org>:*``. It is optional and parsed leniently:
at most :data:`MAX_AGENT_HOSTS` entries are looked at, malformed ones are ignored, and a claim of
any other shape means "none" -- a hostile claim can only take rights away, never raise.

Verified tokens are cached (bounded LRU keyed by the token's SHA-256, never used past ``exp``
or before ``nbf``, dropped when key material changes), so a browser that sends the same token
with every request pays for one signature check.

Nothing here logs a token, its signature, its payload or an email: rejections are logged as a
short ``reason`` (expired ones at debug, since expiry is routine).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import aiohttp
import jwt
import structlog

from relay.auth.devissuer import DevKeySource, effective_audience, effective_issuer
from relay.auth.hostid import HostId, HostPatterns
from relay.auth.keys import (
    ASYMMETRIC_ALGORITHMS,
    JwksKeySource,
    KeySource,
    KeysUnavailable,
    StaticKeySource,
    UnknownKey,
    key_matches_alg,
)
from relay.auth.ttlcache import TTLCache
from relay.config import AuthMode, Config
from relay.errors import AccessUnavailable, ConfigError, Unauthorized
from relay.metrics import Metrics, TokenResult

__all__ = [
    "MAX_TOKEN_LENGTH",
    "Identity",
    "TokenVerifier",
    "build_verifier",
    "extract_token",
]

log = structlog.get_logger("relay.auth")

# Real JWTs are 1-2 KiB. The cap keeps hashing/parsing of hostile input cheap.
MAX_TOKEN_LENGTH = 16384
MAX_SUB_LENGTH = 512
MAX_AGENT_HOSTS = 256

MSG_INVALID = "invalid bearer token; get a fresh token and retry"
MSG_MISSING = "missing bearer token"
MSG_EXPIRED = "token expired; get a fresh token and retry"
MSG_NO_ORGS = "token has no organisations claim"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, as stated by a verified token."""

    sub: str
    orgs: frozenset[str]
    # Kept out of repr() so a logged Identity does not leak an email address.
    email: str | None = field(repr=False)
    expires_at: float
    # The host ids this token may serve as an agent (the agent claim); empty for most users.
    agent_hosts: HostPatterns = field(default_factory=HostPatterns)

    def may_serve(self, host: HostId) -> bool:
        return self.agent_hosts.covers(host)


@dataclass(frozen=True, slots=True)
class _Verified:
    identity: Identity
    not_before: float  # nbf minus leeway: the cache must not accept earlier than PyJWT would
    stamp: tuple[int, int]  # (verifier epoch, key source generation) when verified


def extract_token(
    headers: Mapping[str, str], query: Mapping[str, str], allow_query: bool
) -> str | None:
    """The bearer token of a request, or None.

    ``Authorization: Bearer <token>`` (scheme case-insensitive) wins. The ``token`` query
    parameter is only read when ``allow_query`` (WebSocket upgrades: browsers cannot set
    headers on them). ``headers`` must be case-insensitive (aiohttp's ``CIMultiDict``) or use
    the canonical ``Authorization`` spelling.
    """
    auth = headers.get("Authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            return value
    if allow_query:
        value = (query.get("token") or "").strip()
        if value:
            return value
    return None


class TokenVerifier:
    """Turns bearer tokens into identities (see the module docstring for the rules)."""

    def __init__(
        self,
        keys: KeySource,
        *,
        algorithms: Iterable[str] = ("RS256", "ES256", "EdDSA"),
        issuer: str = "",
        audience: str = "",
        org_claim: str = "organizationIds",
        email_claim: str = "email",
        agent_claim: str = "relayHosts",
        leeway_s: float = 30,
        cache_size: int = 10000,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        algs = frozenset(algorithms)
        refused = algs - ASYMMETRIC_ALGORITHMS
        if refused:
            # Config validation refuses these already; this guards direct construction.
            raise ValueError(f"only asymmetric algorithms may verify tokens, got {sorted(refused)}")
        if not algs:
            raise ValueError("at least one algorithm is required")
        self._keys = keys
        self._algorithms = algs
        self._issuer = issuer
        self._audience = audience
        self._org_claim = org_claim
        self._email_claim = email_claim
        self._agent_claim = agent_claim
        self._leeway = float(leeway_s)
        self._metrics = metrics
        self._counters: dict[TokenResult, Any] = {}  # the labelled children, resolved once
        self._clock = clock
        # Deadlines are the tokens' exp (wall-clock), so the cache runs on the same clock.
        self._cache: TTLCache[bytes, _Verified] = TTLCache(cache_size, clock=clock)
        self._epoch = 0  # bumped by reload_keys(); part of every cache entry's stamp

    @property
    def key_source(self) -> KeySource:
        return self._keys

    @property
    def issuer(self) -> str:
        return self._issuer

    @property
    def audience(self) -> str:
        return self._audience

    async def start(self) -> None:
        await self._keys.start()

    async def close(self) -> None:
        await self._keys.close()

    async def reload_keys(self, keys: KeySource | None = None) -> None:
        """Swap in ``keys``, or re-read the current source; forget every verified token.

        Raises whatever the source raises when re-reading fails (its old keys stay in use).
        """
        if keys is not None:
            await keys.start()
            old, self._keys = self._keys, keys
            self._epoch += 1
            self._cache.clear()
            await old.close()
        else:
            await self._keys.reload()
            self._epoch += 1
            self._cache.clear()

    def clear_cache(self) -> None:
        self._cache.clear()

    async def verify(self, token: str) -> Identity:
        """The identity in ``token``, or :class:`Unauthorized` with a short, safe message.

        Raises :class:`AccessUnavailable` (503) instead when the key source has never been able
        to load any key: telling every client its token is bad during a JWKS outage at start-up
        would send them all off to refresh tokens that are fine.
        """
        if not token:
            # Routine (a first request before login, a probe): not worth an info line.
            self._reject("missing", MSG_MISSING, level="debug")
        if len(token) > MAX_TOKEN_LENGTH:
            self._reject("too_large", MSG_INVALID)
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None:
            if cached.stamp == self._stamp() and now >= cached.not_before:
                self._count(TokenResult.CACHED)
                return cached.identity
            self._cache.pop(digest)

        epoch = self._epoch
        identity, not_before = await self._verify_fresh(token, now)
        # Only cache what was verified under the key material still in place: reload_keys()
        # may have swapped the source while key_for() was awaiting a fetch.
        if epoch == self._epoch:
            # The deadline is exp itself, not exp + leeway: past exp every use re-verifies.
            self._cache.set(
                digest,
                _Verified(identity, not_before, self._stamp()),
                deadline=identity.expires_at,
            )
        self._count(TokenResult.OK)
        return identity

    def _stamp(self) -> tuple[int, int]:
        return (self._epoch, self._keys.generation)

    async def _verify_fresh(self, token: str, now: float) -> tuple[Identity, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            self._reject("malformed", MSG_INVALID)
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in self._algorithms:
            self._reject("bad_algorithm", MSG_INVALID, alg=_short(alg))
        if kid is not None and not isinstance(kid, str):
            self._reject("malformed", MSG_INVALID)
        try:
            key = await self._keys.key_for(kid, alg)
        except UnknownKey:
            self._reject("unknown_kid", MSG_INVALID, alg=alg, kid=_short(kid))
        except KeysUnavailable:
            self._count(TokenResult.REJECTED)
            log.warning("auth.token_rejected", reason="keys_unavailable")
            raise AccessUnavailable("token signing keys are unavailable; retry shortly") from None
        if not key_matches_alg(key, alg):
            # Defence in depth: sources only hand out matching keys.
            self._reject("key_mismatch", MSG_INVALID, alg=alg, kid=_short(kid))

        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience or None,
                issuer=self._issuer or None,
                leeway=self._leeway,
                options={
                    "require": ["exp", "sub"],
                    # Time claims are checked below, on the injected clock: the one the cache,
                    # the leases and a test's fake clock all read.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    # PyJWT refuses any token with an aud claim when no audience is given;
                    # with none configured, aud is simply not our business.
                    "verify_aud": bool(self._audience),
                    "verify_iss": bool(self._issuer),
                },
            )
        except jwt.InvalidSignatureError:
            self._reject("bad_signature", MSG_INVALID, alg=alg, kid=_short(kid))
        except jwt.InvalidAudienceError:
            self._reject("wrong_audience", MSG_INVALID)
        except jwt.InvalidIssuerError:
            self._reject("wrong_issuer", MSG_INVALID)
        except jwt.MissingRequiredClaimError as exc:
            self._reject("missing_claim", MSG_INVALID, claim=_short(exc.claim))
        except jwt.InvalidKeyError:
            self._reject("key_mismatch", MSG_INVALID, alg=alg, kid=_short(kid))
        except jwt.PyJWTError as exc:
            # DecodeError, InvalidSubjectError, InvalidIssuedAtError...: the class name is a
            # safe reason; the message may quote the payload, so it is not logged.
            self._reject("invalid", MSG_INVALID, error=type(exc).__name__)

        # Against our clock, so the clock the cache obeys and the clock verification obeys are
        # the same one; the same rules PyJWT applies with its own (the wall clock).
        exp = _number(claims.get("exp"))
        if exp is None:
            self._reject("invalid", MSG_INVALID, error="exp")
        if now >= exp + self._leeway:
            self._reject("expired", MSG_EXPIRED, level="debug")
        nbf = _number(claims.get("nbf")) if "nbf" in claims else -math.inf
        if nbf is None:
            self._reject("invalid", MSG_INVALID, error="nbf")
        if now < nbf - self._leeway:
            self._reject("not_yet_valid", MSG_INVALID)
        if "iat" in claims:
            iat = _number(claims.get("iat"))
            if iat is None:
                self._reject("invalid", MSG_INVALID, error="iat")
            if iat > now + self._leeway:
                self._reject("not_yet_valid", MSG_INVALID)

        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > MAX_SUB_LENGTH:
            self._reject("bad_subject", MSG_INVALID)
        orgs = claims.get(self._org_claim)
        if not isinstance(orgs, list) or not all(isinstance(o, str) for o in orgs):
            self._reject("no_orgs", MSG_NO_ORGS)
        email = claims.get(self._email_claim)
        identity = Identity(
            sub=sub,
            orgs=frozenset(orgs),
            email=email if isinstance(email, str) else None,
            expires_at=exp,
            agent_hosts=_agent_hosts(claims.get(self._agent_claim)),
        )
        return identity, nbf - self._leeway

    def _count(self, result: TokenResult) -> None:
        counter = self._counters.get(result)
        if counter is None and self._metrics is not None:
            metrics = self._metrics
            counter = self._counters[result] = metrics.child(
                metrics.token_verifications_total, result)
        if counter is not None:
            counter.inc()

    def _reject(self, reason: str, message: str, *, level: str = "info", **fields: Any) -> NoReturn:
        self._count(TokenResult.REJECTED)
        getattr(log, level)("auth.token_rejected", reason=reason, **fields)
        raise Unauthorized(message)


def _short(value: object, limit: int = 64) -> str | None:
    """A header value safe to log: header fields are attacker-chosen, so bound them and keep
    only printable ASCII (no terminal escapes or fake log lines in console-format logs)."""
    if value is None:
        return None
    text = value if isinstance(value, str) else type(value).__name__
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])


def _agent_hosts(claim: object) -> HostPatterns:
    """The agent claim as patterns: a list (or one string) of host ids and ``<org>:*``."""
    if isinstance(claim, str):
        return HostPatterns.parse([claim])
    if isinstance(claim, list):
        return HostPatterns.parse(claim, limit=MAX_AGENT_HOSTS)
    return HostPatterns()


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def build_verifier(
    config: Config,
    session: aiohttp.ClientSession | None = None,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.time,
) -> TokenVerifier:
    """The verifier ``config.auth`` describes. Call ``await verifier.start()`` before use.

    dev: the embedded dev issuer's key (created on first run in ``auth.dev_state_dir``), with
    ``iss``/``aud`` defaulting to ``relay-dev``/``relay``. public_key: the PEM file at
    ``auth.public_key_file``. jwks: ``auth.jwks_url`` fetched with ``session`` (required).
    Raises :class:`ConfigError` when key material cannot be loaded.
    """
    auth = config.auth
    keys: KeySource
    if auth.mode == AuthMode.DEV:
        keys = DevKeySource.from_state_dir(config.dev_state_path)
    elif auth.mode == AuthMode.PUBLIC_KEY:
        path = config.resolve_path(auth.public_key_file)
        try:
            keys = StaticKeySource(path)
        except OSError as exc:
            raise ConfigError(
                config.source, "auth.public_key_file", f"cannot read {path}: {exc.strerror}"
            ) from None
        except ValueError as exc:
            raise ConfigError(
                config.source, "auth.public_key_file", f"{path}: not a usable public key ({exc})"
            ) from None
    elif auth.mode == AuthMode.JWKS:
        if session is None:
            raise ValueError("auth.mode jwks needs an aiohttp.ClientSession")
        keys = JwksKeySource(
            session,
            auth.jwks_url,
            cache_s=auth.jwks_cache_s,
            min_refresh_interval_s=auth.jwks_refresh_min_interval_s,
            metrics=metrics,
        )
    else:
        raise ConfigError(config.source, "auth.mode", f"unknown mode {auth.mode!r}")
    return TokenVerifier(
        keys,
        algorithms=auth.algorithms,
        issuer=effective_issuer(config),
        audience=effective_audience(config),
        org_claim=auth.org_claim,
        email_claim=auth.email_claim,
        agent_claim=auth.agent_claim,
        leeway_s=auth.leeway_s,
        cache_size=auth.token_cache_size,
        metrics=metrics,
        clock=clock,
    )
