"""Where token-signing public keys come from: a PEM file or a JWKS URL, behind one interface.

A key source answers one question, ``await key_for(kid, alg)``: which public key verifies a
token with this header? It also exposes a ``generation`` number that changes whenever key
material is replaced or removed, so the verified-token cache can drop answers given under keys
that are gone. The embedded dev issuer's source lives in :mod:`relay.auth.devissuer`.

Only asymmetric algorithms exist here. A key is only ever handed out for an algorithm of its
own family (RSA for RS*/PS*, the right curve for ES*, Ed25519/Ed448 for EdDSA): that is what
stops the classic confusion attack where a token says ``HS256`` and the verifier uses the RSA
public key, which every attacker knows, as the HMAC secret.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import jwt
import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from relay.aio import SingleFlight
from relay.errors import ConfigError
from relay.metrics import FetchResult, Metrics

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "JwksKeySource",
    "KeySource",
    "KeysUnavailable",
    "PublicKey",
    "StaticKeySource",
    "UnknownKey",
    "key_matches_alg",
    "load_public_key_pem",
]

log = structlog.get_logger("relay.auth")

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)

_PUBLIC_KEY_TYPES = (
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)

ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)

_EC_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}

MAX_JWKS_BYTES = 1 << 20  # a JWKS is a few KiB; anything near this is not one
MAX_JWKS_KEYS = 64  # bounds memory and per-lookup work whatever the endpoint serves
DEFAULT_JWKS_TIMEOUT_S = 5.0
# With no keys at all every token fails, so retry sooner than the unknown-kid interval.
NO_KEYS_RETRY_S = 2.0


class UnknownKey(Exception):
    """No key for this kid/alg (after any refresh the source was willing to make)."""


class KeysUnavailable(Exception):
    """The source has never obtained any key (e.g. the JWKS endpoint has been down since start)."""


def key_matches_alg(key: object, alg: str) -> bool:
    """True when ``key`` is a public key of the family (and curve) that ``alg`` requires."""
    if alg in {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}:
        return isinstance(key, rsa.RSAPublicKey)
    if alg in _EC_CURVES:
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _EC_CURVES[alg])
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False  # HS*, none and anything unknown never get a key


@runtime_checkable
class KeySource(Protocol):
    """What :class:`relay.auth.tokens.TokenVerifier` needs from key material."""

    @property
    def generation(self) -> int:
        """Changes whenever keys are replaced or removed."""
        ...

    async def key_for(self, kid: str | None, alg: str) -> PublicKey:
        """The key to verify a token with this header; :class:`UnknownKey` if none."""
        ...

    async def reload(self) -> None:
        """Re-read key material now (operator action, SIGHUP).

        Raises ``OSError``, ``ValueError`` or ``ConfigError`` when that fails; the old keys then
        stay in use.
        """
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def load_public_key_pem(data: bytes) -> PublicKey:
    """Parse a PEM public key or certificate; refuse private keys and non-asymmetric keys."""
    if b"PRIVATE KEY" in data:
        raise ValueError("contains a private key; give the public key")
    key: object
    if b"BEGIN CERTIFICATE" in data:
        key = x509.load_pem_x509_certificate(data).public_key()
    else:
        key = load_pem_public_key(data)
    if not isinstance(key, _PUBLIC_KEY_TYPES):
        raise ValueError(f"unsupported key type {type(key).__name__}")
    return key


class StaticKeySource:
    """One public key from a PEM file (``auth.mode = "public_key"``); any ``kid`` matches it."""

    def __init__(self, path: Path) -> None:
        self._path = path
        # Start-up is synchronous and this is one small file; reload() reads off the loop.
        self._key = load_public_key_pem(path.read_bytes())
        self._generation = 0

    @classmethod
    def from_key(cls, key: PublicKey, path: Path | None = None) -> StaticKeySource:
        self = cls.__new__(cls)
        self._path = path if path is not None else Path("<memory>")
        self._key = key
        self._generation = 0
        return self

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def path(self) -> Path:
        return self._path

    async def key_for(self, kid: str | None, alg: str) -> PublicKey:
        if not key_matches_alg(self._key, alg):
            raise UnknownKey(alg)
        return self._key

    async def reload(self) -> None:
        data = await asyncio.to_thread(self._path.read_bytes)
        key = load_public_key_pem(data)  # raises before anything is replaced
        self._key = key
        self._generation += 1
        log.info("auth.keys_reloaded", source="public_key")

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _usable_jwk(data: dict[str, Any]) -> bool:
    # Encryption keys and symmetric ("oct") keys never verify a signature here.
    return data.get("use", "sig") == "sig" and data.get("kty") in {"RSA", "EC", "OKP"}


class JwksKeySource:
    """Public keys from a JWKS URL, fetched with a shared ``aiohttp.ClientSession``.

    * Keys are cached for ``cache_s``; once stale they are refreshed in the background while
      the old ones keep answering (a slow JWKS endpoint never delays requests that it does not
      need to).
    * An unknown ``kid`` triggers one refresh, at most once per ``min_refresh_interval_s``:
      tokens with made-up kids cannot turn the relay into a JWKS flood.
    * At most one fetch is ever in flight; every caller that needs it awaits the same task
      (shielded, so a caller that goes away does not cancel it for the others).
    * A failed fetch (timeout, non-200, bad JSON, no usable key) keeps the keys we had.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        cache_s: float = 3600.0,
        min_refresh_interval_s: float = 30.0,
        timeout_s: float = DEFAULT_JWKS_TIMEOUT_S,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._url = url
        self._cache_s = cache_s
        self._min_interval_s = min_refresh_interval_s
        self._timeout_s = timeout_s
        self._metrics = metrics
        self._clock = clock
        self._keys: list[_Jwk] = []
        self._loaded_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last fetch attempt, success or not
        self._flight = SingleFlight(self._fetch)
        self._generation = 0
        self._closed = False

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def loaded(self) -> bool:
        """True once a fetch has succeeded (useful for readiness)."""
        return self._loaded_at is not None

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(k.kid for k in self._keys if k.kid is not None)

    async def start(self) -> None:
        """Fetch the keys once, so the first request does not pay for it. Never raises."""
        await self._refresh_shared()

    async def close(self) -> None:
        self._closed = True
        await self._flight.cancel(self._timeout_s)

    async def reload(self) -> None:
        """Fetch now, ignoring the rate limit (an operator asked). Raises if the fetch failed
        (the keys we had stay in use), so the operator's reload can report it."""
        if not await self._refresh_shared():
            raise ConfigError(
                self._url, "auth.jwks_url", "refresh failed; keeping the current keys"
            )

    async def key_for(self, kid: str | None, alg: str) -> PublicKey:
        now = self._clock()
        if self._loaded_at is None:
            # Nothing to answer with: wait for a fetch (shared, and retried at most every
            # NO_KEYS_RETRY_S while the endpoint stays down).
            if self._flight.running or self._may_attempt(now, NO_KEYS_RETRY_S):
                await self._refresh_shared()
            if self._loaded_at is None:
                raise KeysUnavailable()
        elif now - self._loaded_at >= self._cache_s and self._may_attempt(
            now, self._min_interval_s
        ):
            self._start_refresh()  # stale-while-revalidate: do not wait for it

        key = self._find(kid, alg)
        if key is not None:
            return key
        # Unknown kid: join a fetch already in flight, or start one if the rate limit allows.
        if self._flight.running or self._may_attempt(self._clock(), self._min_interval_s):
            await self._refresh_shared()
            key = self._find(kid, alg)
            if key is not None:
                return key
        raise UnknownKey(kid)

    def _may_attempt(self, now: float, interval: float) -> bool:
        return not self._closed and (
            self._attempted_at is None or now - self._attempted_at >= interval
        )

    def _find(self, kid: str | None, alg: str) -> PublicKey | None:
        if kid is not None:
            candidates = [k for k in self._keys if k.kid == kid]
        else:
            # No kid in the token: acceptable only when exactly one key could have signed it.
            candidates = [k for k in self._keys if k.usable_for(alg)]
            if len(candidates) != 1:
                return None
        for jwk in candidates:
            if jwk.usable_for(alg):
                return jwk.key
        return None

    def _start_refresh(self) -> asyncio.Future[bool]:
        if not self._flight.running:
            self._attempted_at = self._clock()
        return self._flight.start()

    async def _refresh_shared(self) -> bool:
        if self._closed:
            return False
        # shield: a cancelled request must not cancel the fetch other requests are awaiting.
        return await asyncio.shield(self._start_refresh())

    async def _fetch(self) -> bool:
        """One JWKS fetch. Never raises (except on cancellation); returns success."""
        # Here, not at the top: the dev issuer (``relay token``) needs this module's key types
        # but no HTTP client, and loading aiohttp's is most of that command's start-up.
        import aiohttp

        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._session.get(
                    self._url,
                    timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                    headers={"Accept": "application/json"},
                ) as resp:
                    if resp.status != 200:
                        raise _FetchError(f"status {resp.status}")
                    body = await _read_bounded(resp, MAX_JWKS_BYTES)
            keys = _parse_jwks(body)
        except (TimeoutError, aiohttp.ClientError, OSError, _FetchError) as exc:
            return self._fetch_failed(exc, started)
        except Exception as exc:  # a surprise from a parser must not cost us the keys we have
            log.exception("auth.jwks_refresh_crashed")
            return self._fetch_failed(exc, started)
        changed = [k.raw for k in self._keys] != [k.raw for k in keys]
        self._keys = keys
        self._loaded_at = self._clock()
        if changed:
            self._generation += 1
        if self._metrics is not None:
            self._metrics.jwks_refreshes_total.labels(result=FetchResult.OK).inc()
        log.info(
            "auth.jwks_refreshed",
            keys=len(keys),
            duration_s=round(time.perf_counter() - started, 3),
        )
        return True

    def _fetch_failed(self, exc: BaseException, started: float) -> bool:
        if self._metrics is not None:
            self._metrics.jwks_refreshes_total.labels(result=FetchResult.ERROR).inc()
        log.warning(
            "auth.jwks_refresh_failed",
            error="bad_response" if isinstance(exc, _FetchError) else type(exc).__name__,
            detail=str(exc)[:200] if isinstance(exc, _FetchError) else None,
            kept_keys=len(self._keys),
            duration_s=round(time.perf_counter() - started, 3),
        )
        return False


class _FetchError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Jwk:
    kid: str | None
    alg: str | None  # the algorithm the JWK pins itself to, if it does
    key: PublicKey
    raw: dict[str, Any]

    def usable_for(self, alg: str) -> bool:
        return (self.alg is None or self.alg == alg) and key_matches_alg(self.key, alg)


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    if resp.content_length is not None and resp.content_length > limit:
        raise _FetchError("body too large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise _FetchError("body too large")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_jwks(body: bytes) -> list[_Jwk]:
    try:
        doc = json.loads(body)
    except ValueError:
        raise _FetchError("not JSON") from None
    raw_keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(raw_keys, list):
        raise _FetchError("no keys array")
    keys: list[_Jwk] = []
    seen: set[str] = set()
    for raw in raw_keys:
        if len(keys) >= MAX_JWKS_KEYS:
            break
        if not isinstance(raw, dict) or not _usable_jwk(raw):
            continue
        kid, declared = raw.get("kid"), raw.get("alg")
        if kid is not None and (not isinstance(kid, str) or kid in seen):
            continue  # a duplicate kid is ambiguous: the first one wins
        if declared is not None and declared not in ASYMMETRIC_ALGORITHMS:
            continue
        try:
            jwk = jwt.PyJWK(raw)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue  # one malformed key must not cost us the others
        if not isinstance(jwk.key, _PUBLIC_KEY_TYPES):
            continue  # e.g. a JWK carrying private parameters: never ours to use
        if kid is not None:
            seen.add(kid)
        keys.append(_Jwk(kid=kid, alg=declared, key=jwk.key, raw=raw))
    if not keys:
        raise _FetchError("no usable signing key")
    return keys
