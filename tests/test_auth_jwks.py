"""JwksKeySource against a real JWKS server on 127.0.0.1: caching, refresh limits, rotation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from structlog.testing import capture_logs

from relay.auth.keys import MAX_JWKS_KEYS, JwksKeySource, KeysUnavailable, UnknownKey
from relay.auth.tokens import TokenVerifier, build_verifier
from relay.config import AuthConfig, Config
from relay.errors import AccessUnavailable, ConfigError, Unauthorized
from relay.metrics import Metrics
from tests.clock import FakeClock

ServerFactory = Callable[..., Awaitable[TestServer]]


class Jwks:
    """A real JWKS endpoint whose key set, status and delay the test controls."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        self.status = 200
        self.delay = 0.0
        self.body: bytes | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.body is not None:
            return web.Response(body=self.body, content_type="application/json")
        if self.status != 200:
            return web.Response(status=self.status, text="nope")
        return web.json_response({"keys": self.keys})


@pytest.fixture(scope="module")
def rsa_a() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_b() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(key: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    public = key.public_key()
    algo = RSAAlgorithm if isinstance(public, rsa.RSAPublicKey) else ECAlgorithm
    data: dict[str, Any] = algo.to_jwk(public, as_dict=True)
    if kid is not None:
        data["kid"] = kid
    data.update(extra)
    return data


def token(key: Any, kid: str | None, alg: str = "RS256", sub: str = "alice") -> str:
    now = int(time.time())
    claims = {"sub": sub, "exp": now + 300, "iat": now, "organizationIds": ["acme"]}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid} if kid else {})


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def jwks(aiohttp_server: ServerFactory) -> tuple[Jwks, str]:
    state = Jwks()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", state.handle)
    server = await aiohttp_server(app)
    return state, str(server.make_url("/.well-known/jwks.json"))


def source(
    session: aiohttp.ClientSession,
    url: str,
    clock: FakeClock,
    metrics: Metrics | None = None,
    **kwargs: Any,
) -> JwksKeySource:
    options: dict[str, Any] = {"cache_s": 3600, "min_refresh_interval_s": 30, "timeout_s": 2.0}
    options.update(kwargs)
    return JwksKeySource(session, url, metrics=metrics, clock=clock, **options)


def refreshes(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value("relay_jwks_refreshes_total", {"result": result})
    return value or 0.0


async def test_many_verifications_need_one_fetch(
    session: aiohttp.ClientSession, jwks: tuple[Jwks, str], rsa_a: rsa.RSAPrivateKey
) -> None:
    state, url = jwks
    state.keys = [jwk(rsa_a, "a")]
    metrics = Metrics()
    keys = source(session, url, FakeClock(1000.0), metrics)
    verifier = TokenVerifier(keys, metrics=metrics)
    # The first requests arrive together before any key is loaded: they share one fetch.
    first = await asyncio.gather(
        *(verifier.verify(token(rsa_a, "a", sub=f"u{i}")) for i in range(20))
    )
    assert {i.sub for i in first} == {f"u{i}" for i in range(20)}
    for i in range(20):
        await verifier.verify(token(rsa_a, "a", sub=f"v{i}"))
    assert state.fetches == 1
    assert refreshes(metrics, "ok") == 1
    await keys.close()


async def test_unknown_kid_triggers_exactly_one_refresh_and_finds_a_new_key(
    session: aiohttp.ClientSession,
    jwks: tuple[Jwks, str],
    rsa_a: rsa.RSAPrivateKey,
    rsa_b: rsa.RSAPrivateKey,
) -> None:
    state, url = jwks
    state.keys = [jwk(rsa_a, "a")]
    clock = FakeClock(1000.0)
    keys = source(session, url, clock)
    verifier = TokenVerifier(keys)
    await keys.start()
    assert state.fetches == 1
    # The issuer publishes a new key; after the rate-limit interval a token using it works.
    state.keys = [jwk(rsa_a, "a"), jwk(rsa_b, "b")]
    clock.advance(31)
    assert (await verifier.verify(token(rsa_b, "b"))).sub == "alice"
    assert state.fetches == 2
    # A kid that is still unknown right after does not fetch again.
    with capture_logs() as logs, pytest.raises(Unauthorized):
        await verifier.verify(token(rsa_b, "c"))
    assert state.fetches == 2
    assert logs[0]["reason"] == "unknown_kid"
    await keys.close()


async def test_flood_of_unknown_kids_causes_at_most_one_fetch(
    session: aiohttp.ClientSession, jwks: tuple[Jwks, str], rsa_a: rsa.RSAPrivateKey
) -> None:
    state, url = jwks
    state.keys = [jwk(rsa_a, "a")]
    state.delay = 0.05  # keep the refresh in flight while the flood arrives
    clock = FakeClock(1000.0)
    keys = source(session, url, clock)
    verifier = TokenVerifier(keys)
    await keys.start()
    clock.advance(31)  # the refresh interval has passed: one refresh is allowed
    flood = [verifier.verify(token(rsa_a, f"made-up-{i}")) for i in range(50)]
    results = await asyncio.gather(*flood, return_exceptions=True)
    assert all(isinstance(r, Unauthorized) for r in results)
    assert state.fetches == 2  # start + at most one refresh
    # A second flood within the interval fetches nothing.
    clock.advance(5)
    results = await asyncio.gather(
        *(verifier.verify(token(rsa_a, f"again-{i}")) for i in range(50)),
        return_exceptions=True,
    )
    assert all(isinstance(r, Unauthorized) for r in results)
    assert state.fetches == 2
    await keys.close()


async def test_rotation_drops_removed_keys_and_their_cached_tokens(
    session: aiohttp.ClientSession,
    jwks: tuple[Jwks, str],
    rsa_a: rsa.RSAPrivateKey,
    rsa_b: rsa.RSAPrivateKey,
) -> None:
    state, url = jwks
    state.keys = [jwk(rsa_a, "a")]
    clock = FakeClock(1000.0)
    keys = source(session, url, clock)
    verifier = TokenVerifier(keys)
    old = token(rsa_a, "a")
    await verifier.verify(old)  # verified and cached under key a
    state.keys = [jwk(rsa_b, "b")]  # key a is retired
    clock.advance(31)
    assert (await verifier.verify(token(rsa_b, "b"))).sub == "alice"
    assert keys.kids == frozenset({"b"})
    with pytest.raises(Unauthorized):
        await verifier.verify(old)  # not served from the cache any more
    await keys.close()


async def test_stale_keys_refresh_in_the_background_and_failures_keep_old_keys(
    session: aiohttp.ClientSession, jwks: tuple[Jwks, str], rsa_a: rsa.RSAPrivateKey
) -> None:
    state, url = jwks
    state.keys = [jwk(rsa_a, "a")]
    clock = FakeClock(1000.0)
    metrics = Metrics()
    keys = source(session, url, clock, metrics, cache_s=60)
    verifier = TokenVerifier(keys, cache_size=0)
    await keys.start()
    state.status = 500
    clock.advance(61)  # keys are stale; the refresh fails
    assert (await verifier.verify(token(rsa_a, "a"))).sub == "alice"
    await asyncio.sleep(0.05)  # let the background refresh finish
    assert state.fetches == 2
    assert refreshes(metrics, "error") == 1
    assert (await verifier.verify(token(rsa_a, "a"))).sub == "alice"
    assert state.fetches == 2  # failed refreshes are rate limited too
    await keys.close()


async def test_jwks_down_at_start_is_unavailable_then_recovers(
    session: aiohttp.ClientSession, jwks: tuple[Jwks, str], rsa_a: rsa.RSAPrivateKey
) -> None:
    state, url = jwks
    state.status = 503
    clock = FakeClock(1000.0)
    keys = source(session, url, clock)
    verifier = TokenVerifier(keys)
    await keys.start()  # never raises
    assert not keys.loaded
    with pytest.raises(AccessUnavailable):
        await verifier.verify(token(rsa_a, "a"))
    assert state.fetches == 1  # retried at most every NO_KEYS_RETRY_S
    state.status = 200
    state.keys = [jwk(rsa_a, "a")]
    clock.advance(2.5)
    assert (await verifier.verify(token(rsa_a, "a"))).sub == "alice"
    assert state.fetches == 2
    await keys.close()


async def test_fetch_times_out(
    session: aiohttp.ClientSession, jwks: tuple[Jwks, str], rsa_a: rsa.RSAPrivateKey
) -> None:
    state, url = jwks
    state.keys = [jwk(rsa_a, "a")]
    state.delay = 5
    metrics = Metrics()
    keys = source(session, url, FakeClock(1000.0), metrics, timeout_s=0.1)
    started = time.monotonic()
    await keys.start()
    assert time.monotonic() - started < 2
    assert not keys.loaded
    assert refreshes(metrics, "error") == 1
    with pytest.raises(KeysUnavailable):
        await keys.key_for("a", "RS256")
    await keys.close()


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"keys": "x"}',
        b'{"keys": []}',
        b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}',
    ],
)
async def test_bad_jwks_documents_are_fetch_errors(
    session: aiohttp.ClientSession, jwks: tuple[Jwks, str], body: bytes
) -> None:
    state, url = jwks
    state.body = body
    metrics = Metrics()
    keys = source(session, url, FakeClock(1000.0), metrics)
    await keys.start()
    assert not keys.loaded
    assert refreshes(metrics, "error") == 1
    await keys.close()


async def test_symmetric_and_encryption_keys_are_ignored(
    session: aiohttp.ClientSession, jwks: tuple[Jwks, str], rsa_a: rsa.RSAPrivateKey
) -> None:
    state, url = jwks
    state.keys = [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "a"},  # same kid as the real key, listed first
        jwk(rsa_a, "enc", use="enc"),
        jwk(rsa_a, "a"),
    ]
    keys = source(session, url, FakeClock(1000.0))
    await keys.start()
    assert keys.kids == frozenset({"a"})
    assert isinstance(await keys.key_for("a", "RS256"), rsa.RSAPublicKey)
    await keys.close()


async def test_a_jwk_pinned_to_an_algorithm_serves_only_that_algorithm(
    session: aiohttp.ClientSession, jwks: tuple[Jwks, str], rsa_a: rsa.RSAPrivateKey
) -> None:
    state, url = jwks
    state.keys = [jwk(rsa_a, "a", alg="RS256")]
    keys = source(session, url, FakeClock(1000.0))
    verifier = TokenVerifier(keys, algorithms=["RS256", "PS256"])
    assert (await verifier.verify(token(rsa_a, "a", alg="RS256"))).sub == "alice"
    with capture_logs() as logs, pytest.raises(Unauthorized):
        await verifier.verify(token(rsa_a, "a", alg="PS256"))
    assert logs[0]["reason"] == "unknown_kid"
    await keys.close()


async def test_ec_token_naming_an_rsa_kid_is_refused(
    session: aiohttp.ClientSession, jwks: tuple[Jwks, str], rsa_a: rsa.RSAPrivateKey
) -> None:
    state, url = jwks
    state.keys = [jwk(rsa_a, "a")]
    keys = source(session, url, FakeClock(1000.0))
    verifier = TokenVerifier(keys)
    forged = token(ec.generate_private_key(ec.SECP256R1()), "a", alg="ES256")
    with pytest.raises(Unauthorized):
        await verifier.verify(forged)
    await keys.close()


async def test_token_without_kid_needs_exactly_one_candidate_key(
    session: aiohttp.ClientSession,
    jwks: tuple[Jwks, str],
    rsa_a: rsa.RSAPrivateKey,
    rsa_b: rsa.RSAPrivateKey,
) -> None:
    state, url = jwks
    state.keys = [jwk(rsa_a, None)]
    keys = source(session, url, FakeClock(1000.0))
    verifier = TokenVerifier(keys)
    assert (await verifier.verify(token(rsa_a, None))).sub == "alice"
    await keys.close()

    state.keys = [jwk(rsa_a, "a"), jwk(rsa_b, "b")]
    keys = source(session, url, FakeClock(1000.0))
    with pytest.raises(Unauthorized):
        await TokenVerifier(keys).verify(token(rsa_a, None))
    await keys.close()


async def test_number_of_keys_is_bounded(
    session: aiohttp.ClientSession, jwks: tuple[Jwks, str], rsa_a: rsa.RSAPrivateKey
) -> None:
    state, url = jwks
    state.keys = [jwk(rsa_a, f"k{i}") for i in range(MAX_JWKS_KEYS * 3)]
    keys = source(session, url, FakeClock(1000.0))
    await keys.start()
    assert len(keys.kids) == MAX_JWKS_KEYS
    with pytest.raises(UnknownKey):
        await keys.key_for(f"k{MAX_JWKS_KEYS * 2}", "RS256")
    await keys.close()


async def test_cancelled_caller_does_not_cancel_the_shared_fetch(
    session: aiohttp.ClientSession, jwks: tuple[Jwks, str], rsa_a: rsa.RSAPrivateKey
) -> None:
    state, url = jwks
    state.keys = [jwk(rsa_a, "a")]
    state.delay = 0.1
    keys = source(session, url, FakeClock(1000.0))
    impatient = asyncio.create_task(keys.key_for("a", "RS256"))
    patient = asyncio.create_task(keys.key_for("a", "RS256"))
    await asyncio.sleep(0.02)
    impatient.cancel()
    assert isinstance(await patient, rsa.RSAPublicKey)
    assert impatient.cancelled()
    assert state.fetches == 1
    await keys.close()


async def test_close_cancels_a_fetch_in_flight(
    session: aiohttp.ClientSession, jwks: tuple[Jwks, str], rsa_a: rsa.RSAPrivateKey
) -> None:
    state, url = jwks
    state.keys = [jwk(rsa_a, "a")]
    state.delay = 5
    keys = source(session, url, FakeClock(1000.0))
    waiter = asyncio.create_task(keys.key_for("a", "RS256"))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await keys.close()
    assert time.monotonic() - started < 1
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_build_verifier_in_jwks_mode(
    session: aiohttp.ClientSession, jwks: tuple[Jwks, str], rsa_a: rsa.RSAPrivateKey
) -> None:
    state, url = jwks
    state.keys = [jwk(rsa_a, "a")]
    metrics = Metrics()
    config = Config(auth=AuthConfig(mode="jwks", jwks_url=url))
    verifier = build_verifier(config, session, metrics)
    await verifier.start()
    assert (await verifier.verify(token(rsa_a, "a"))).sub == "alice"
    await verifier.verify(token(rsa_a, "a"))
    assert refreshes(metrics, "ok") == 1
    await verifier.close()
    with pytest.raises(ValueError):
        build_verifier(config, None)


async def test_reload_fetches_now_and_reports_failure(
    session: aiohttp.ClientSession,
    jwks: tuple[Jwks, str],
    rsa_a: rsa.RSAPrivateKey,
    rsa_b: rsa.RSAPrivateKey,
) -> None:
    state, url = jwks
    state.keys = [jwk(rsa_a, "a")]
    keys = source(session, url, FakeClock(1000.0))
    verifier = TokenVerifier(keys)
    await verifier.start()
    state.keys = [jwk(rsa_b, "b")]
    await verifier.reload_keys()  # no rate limit for an operator's reload
    assert keys.kids == frozenset({"b"})
    state.status = 500
    with pytest.raises(ConfigError) as info:
        await verifier.reload_keys()
    assert info.value.key == "auth.jwks_url"
    assert keys.kids == frozenset({"b"})
    assert (await verifier.verify(token(rsa_b, "b"))).sub == "alice"
    await verifier.close()
