"""TokenVerifier: the token attack matrix, claims, the verified-token cache, extract_token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from multidict import CIMultiDict
from structlog.testing import capture_logs

from relay.auth.keys import PublicKey, StaticKeySource, UnknownKey, key_matches_alg
from relay.auth.tokens import (
    MAX_TOKEN_LENGTH,
    Identity,
    TokenVerifier,
    build_verifier,
    extract_token,
)
from relay.config import AuthConfig, Config
from relay.errors import ConfigError, Unauthorized
from relay.metrics import Metrics
from tests.clock import FakeClock

ISS = "https://issuer.test/"
AUD = "relay-api"
KID = "key-1"
EMAIL = "alice@example.test"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "user-alice",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "iss": ISS,
        "aud": AUD,
        "organizationIds": ["acme", "globex"],
        "email": EMAIL,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: Any, alg: str = "RS256", kid: str | None = KID, **overrides: Any) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims(**overrides), key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], signer: Any = None) -> str:
    """A JWT assembled by hand, for algorithms PyJWT refuses to produce."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = signer(signing_input.encode()) if signer else b""
    return f"{signing_input}.{b64(signature)}"


class CountingKeys:
    """A real key source that counts lookups (a signature check follows every lookup)."""

    def __init__(self, inner: StaticKeySource) -> None:
        self.inner = inner
        self.lookups = 0

    @property
    def generation(self) -> int:
        return self.inner.generation

    async def key_for(self, kid: str | None, alg: str) -> PublicKey:
        self.lookups += 1
        return await self.inner.key_for(kid, alg)

    async def reload(self) -> None:
        await self.inner.reload()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def make_verifier(key: rsa.RSAPrivateKey, **kwargs: Any) -> TokenVerifier:
    options: dict[str, Any] = {"issuer": ISS, "audience": AUD, "metrics": Metrics()}
    options.update(kwargs)
    return TokenVerifier(StaticKeySource.from_key(key.public_key()), **options)


def metric(verifier_metrics: Metrics, result: str) -> float:
    value = verifier_metrics.registry.get_sample_value(
        "relay_token_verifications_total", {"result": result}
    )
    return value or 0.0


async def rejected(
    verifier: TokenVerifier, token: str
) -> tuple[Unauthorized, list[MutableMapping[str, Any]]]:
    with capture_logs() as logs, pytest.raises(Unauthorized) as info:
        await verifier.verify(token)
    # Never the token, nor any part of it, in the message or the logs.
    assert not token or token not in info.value.message
    for part in token.split("."):
        if len(part) > 8:
            assert part not in repr(logs)
            assert part not in info.value.message
    return info.value, logs


def reasons(logs: list[MutableMapping[str, Any]]) -> list[str]:
    return [e["reason"] for e in logs if e["event"] == "auth.token_rejected"]


async def test_valid_token_gives_identity(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = make_verifier(rsa_key)
    identity = await verifier.verify(sign(rsa_key))
    assert identity.sub == "user-alice"
    assert identity.orgs == frozenset({"acme", "globex"})
    assert identity.email == EMAIL
    assert identity.expires_at == pytest.approx(time.time() + 300, abs=5)
    assert EMAIL not in repr(identity)


@pytest.mark.parametrize(
    "token",
    ["", "garbage", "a.b.c", "....", "eyJhbGciOiJSUzI1NiJ9", "eyJ.eyJ.sig", "Bearer x.y.z"],
)
async def test_missing_or_garbage_token_is_unauthorized(
    rsa_key: rsa.RSAPrivateKey, token: str
) -> None:
    verifier = make_verifier(rsa_key)
    error, logs = await rejected(verifier, token)
    assert error.status == 401
    assert reasons(logs)[0] in {"missing", "malformed", "bad_algorithm"}


async def test_oversized_token_is_refused_before_parsing(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = make_verifier(rsa_key)
    _, logs = await rejected(verifier, "a" * (MAX_TOKEN_LENGTH + 1))
    assert reasons(logs) == ["too_large"]


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_is_refused(rsa_key: rsa.RSAPrivateKey, alg: str) -> None:
    verifier = make_verifier(rsa_key)
    token = hand_made({"alg": alg, "typ": "JWT", "kid": KID}, claims())
    _, logs = await rejected(verifier, token)
    assert reasons(logs) == ["bad_algorithm"]
    # The same token with a trailing signature-less form too.
    _, logs = await rejected(verifier, token.rstrip("."))
    assert reasons(logs) in (["bad_algorithm"], ["malformed"])


async def test_hs256_signed_with_the_public_key_pem_is_refused(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    """The key-confusion attack: HMAC keyed with the (public) RSA key must not verify."""
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = hand_made(
        {"alg": "HS256", "typ": "JWT", "kid": KID},
        claims(),
        signer=lambda data: hmac.new(pem, data, hashlib.sha256).digest(),
    )
    # Sanity: the forgery is a correct HS256 token for anyone who uses the PEM as the secret.
    head, body, sig = token.split(".")
    expected = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    assert b64(expected) == sig

    verifier = make_verifier(rsa_key)
    _, logs = await rejected(verifier, token)
    assert reasons(logs) == ["bad_algorithm"]


def test_key_family_must_match_algorithm(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    rsa_pub, ec_pub = rsa_key.public_key(), ec_key.public_key()
    assert key_matches_alg(rsa_pub, "RS256") and key_matches_alg(rsa_pub, "PS256")
    assert key_matches_alg(ec_pub, "ES256")
    for alg in ("HS256", "HS384", "HS512", "none", "ES256", "EdDSA"):
        assert not key_matches_alg(rsa_pub, alg)
    assert not key_matches_alg(ec_pub, "ES384")  # wrong curve
    assert not key_matches_alg(ec_pub, "RS256")
    pem = rsa_pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert not key_matches_alg(pem, "HS256")


def test_symmetric_algorithms_cannot_be_configured(rsa_key: rsa.RSAPrivateKey) -> None:
    for algs in (["HS256"], ["RS256", "HS512"], ["none"], []):
        with pytest.raises(ValueError):
            make_verifier(rsa_key, algorithms=algs)


class MismatchedKeys(CountingKeys):
    """A broken key source that hands out its RSA key for any algorithm."""

    async def key_for(self, kid: str | None, alg: str) -> PublicKey:
        return self.inner._key


async def test_key_of_wrong_family_is_refused_even_if_a_source_hands_it_out(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    keys = MismatchedKeys(StaticKeySource.from_key(rsa_key.public_key()))
    verifier = TokenVerifier(keys, issuer=ISS, audience=AUD)
    _, logs = await rejected(verifier, sign(ec_key, alg="ES256"))
    assert reasons(logs) == ["key_mismatch"]


async def test_static_source_refuses_algorithms_of_another_family(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    source = StaticKeySource.from_key(rsa_key.public_key())
    with pytest.raises(UnknownKey):
        await source.key_for(KID, "ES256")
    assert await source.key_for(None, "PS256") is not None


async def test_algorithm_outside_the_allowlist_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = make_verifier(rsa_key, algorithms=["RS256"])
    _, logs = await rejected(verifier, sign(rsa_key, alg="RS512"))
    assert reasons(logs) == ["bad_algorithm"]


async def test_token_signed_by_a_foreign_key_is_refused(
    rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = make_verifier(rsa_key)
    _, logs = await rejected(verifier, sign(other_rsa_key))
    assert reasons(logs) == ["bad_signature"]


async def test_tampered_payload_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = make_verifier(rsa_key)
    head, _, sig = sign(rsa_key).split(".")
    forged_body = b64(json.dumps(claims(organizationIds=["victim-org"])).encode())
    _, logs = await rejected(verifier, f"{head}.{forged_body}.{sig}")
    assert reasons(logs) == ["bad_signature"]


async def test_expired_token_is_refused_and_logged_at_debug(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = make_verifier(rsa_key, leeway_s=30)
    now = int(time.time())
    error, logs = await rejected(verifier, sign(rsa_key, exp=now - 120, iat=now - 400))
    assert "expired" in error.message
    assert [(e["reason"], e["log_level"]) for e in logs] == [("expired", "debug")]


async def test_recently_expired_token_is_accepted_within_leeway(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    verifier = make_verifier(rsa_key, leeway_s=30)
    now = int(time.time())
    identity = await verifier.verify(sign(rsa_key, exp=now - 10, iat=now - 400))
    assert identity.sub == "user-alice"


async def test_token_not_yet_valid_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = make_verifier(rsa_key, leeway_s=30)
    now = int(time.time())
    _, logs = await rejected(verifier, sign(rsa_key, nbf=now + 300))
    assert reasons(logs) == ["not_yet_valid"]


async def test_time_claims_are_checked_on_the_verifiers_clock_alone(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    """A relay whose clock a test moves (or one set a day back) verifies by that clock, not by
    the wall clock PyJWT would read: the cache, the leases and verification agree on time."""
    now = int(time.time())
    behind = make_verifier(rsa_key, leeway_s=30, clock=FakeClock(now - 86400))
    # Expired by the wall clock, a day left by the verifier's.
    identity = await behind.verify(sign(rsa_key, iat=now - 86400 - 60, nbf=now - 86400 - 60,
                                        exp=now - 3600))
    assert identity.expires_at == now - 3600
    ahead = make_verifier(rsa_key, leeway_s=30, clock=FakeClock(now + 86400))
    # Issued "tomorrow" by the wall clock, the verifier's now.
    identity = await ahead.verify(sign(rsa_key, iat=now + 86400, nbf=now + 86400,
                                       exp=now + 86400 + 300))
    assert identity.sub == "user-alice"
    # And what the wall clock would let through, the verifier's clock refuses.
    for verifier, overrides, reason in ((ahead, {"exp": now + 300}, "expired"),
                                        (behind, {"nbf": None}, "not_yet_valid"),  # by iat
                                        (behind, {"iat": None}, "not_yet_valid")):  # by nbf
        _, logs = await rejected(verifier, sign(rsa_key, **overrides))
        assert reasons(logs) == [reason], overrides


async def test_a_bad_iat_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = make_verifier(rsa_key, leeway_s=30)
    _, logs = await rejected(verifier, sign(rsa_key, iat="yesterday"))
    assert reasons(logs) == ["invalid"]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"iss": "https://evil.test/"}, "wrong_issuer"),
        ({"iss": None}, "missing_claim"),
        ({"aud": "someone-else"}, "wrong_audience"),
        ({"aud": ["x", "y"]}, "wrong_audience"),
        ({"aud": None}, "missing_claim"),
        ({"sub": None}, "missing_claim"),
        ({"exp": None}, "missing_claim"),
        ({"sub": 42}, "invalid"),
        ({"sub": ""}, "bad_subject"),
        ({"exp": "tomorrow"}, "invalid"),
    ],
)
async def test_claim_problems_are_refused(
    rsa_key: rsa.RSAPrivateKey, overrides: dict[str, Any], reason: str
) -> None:
    verifier = make_verifier(rsa_key)
    _, logs = await rejected(verifier, sign(rsa_key, **overrides))
    assert reasons(logs) == [reason]


async def test_audience_in_a_list_is_accepted(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = make_verifier(rsa_key)
    assert (await verifier.verify(sign(rsa_key, aud=["other", AUD]))).sub == "user-alice"


async def test_issuer_and_audience_are_not_enforced_when_not_configured(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    verifier = make_verifier(rsa_key, issuer="", audience="")
    identity = await verifier.verify(sign(rsa_key, iss="anyone", aud="anything"))
    assert identity.sub == "user-alice"
    assert (await verifier.verify(sign(rsa_key, iss=None, aud=None))).sub == "user-alice"


@pytest.mark.parametrize("orgs", [None, "acme", {"acme": True}, [1, 2], ["acme", None], 7])
async def test_missing_or_malformed_org_claim_is_refused(
    rsa_key: rsa.RSAPrivateKey, orgs: Any
) -> None:
    verifier = make_verifier(rsa_key)
    error, logs = await rejected(verifier, sign(rsa_key, organizationIds=orgs))
    assert error.message == "token has no organisations claim"
    assert reasons(logs) == ["no_orgs"]


async def test_custom_namespaced_claim_names(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = make_verifier(
        rsa_key, org_claim="https://example.io/organizations", email_claim="example-io:email"
    )
    namespaced: dict[str, Any] = {
        "https://example.io/organizations": ["initech"],
        "example-io:email": "bob@x.test",
    }
    token = sign(rsa_key, organizationIds=None, email=None, **namespaced)
    identity = await verifier.verify(token)
    assert identity.orgs == frozenset({"initech"})
    assert identity.email == "bob@x.test"
    # The default claim names are not read when others are configured.
    _, logs = await rejected(verifier, sign(rsa_key))
    assert reasons(logs) == ["no_orgs"]


async def test_email_claim_is_optional(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = make_verifier(rsa_key)
    assert (await verifier.verify(sign(rsa_key, email=None))).email is None
    assert (await verifier.verify(sign(rsa_key, email=["not", "a", "string"]))).email is None


async def test_verified_token_is_cached_one_signature_check(rsa_key: rsa.RSAPrivateKey) -> None:
    keys = CountingKeys(StaticKeySource.from_key(rsa_key.public_key()))
    metrics = Metrics()
    verifier = TokenVerifier(keys, issuer=ISS, audience=AUD, metrics=metrics)
    token = sign(rsa_key)
    identities = [await verifier.verify(token) for _ in range(5)]
    assert all(i == identities[0] for i in identities)
    assert keys.lookups == 1
    assert metric(metrics, "ok") == 1
    assert metric(metrics, "cached") == 4
    # A different token for the same subject is verified on its own.
    await verifier.verify(sign(rsa_key, iat=int(time.time()) - 1))
    assert keys.lookups == 2


async def test_cached_token_is_never_used_past_exp(rsa_key: rsa.RSAPrivateKey) -> None:
    clock = FakeClock(time.time())
    keys = CountingKeys(StaticKeySource.from_key(rsa_key.public_key()))
    metrics = Metrics()
    verifier = TokenVerifier(
        keys, issuer=ISS, audience=AUD, leeway_s=30, metrics=metrics, clock=clock
    )
    exp = int(clock.now) + 60
    token = sign(rsa_key, exp=exp)
    await verifier.verify(token)
    clock.now = exp - 0.5
    await verifier.verify(token)
    assert keys.lookups == 1  # still cached just before exp
    clock.now = exp + 1
    await verifier.verify(token)  # inside the leeway: accepted, but verified again
    assert keys.lookups == 2
    clock.now = exp + 31
    error, logs = await rejected(verifier, token)
    assert "expired" in error.message
    assert reasons(logs) == ["expired"]
    assert metric(metrics, "rejected") == 1


async def test_cache_size_zero_verifies_every_time(rsa_key: rsa.RSAPrivateKey) -> None:
    keys = CountingKeys(StaticKeySource.from_key(rsa_key.public_key()))
    verifier = TokenVerifier(keys, issuer=ISS, audience=AUD, cache_size=0)
    token = sign(rsa_key)
    for _ in range(3):
        await verifier.verify(token)
    assert keys.lookups == 3


async def test_reload_keys_swaps_key_material_and_forgets_cached_tokens(
    rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = make_verifier(rsa_key)
    old_token = sign(rsa_key)
    await verifier.verify(old_token)
    await verifier.reload_keys(StaticKeySource.from_key(other_rsa_key.public_key()))
    _, logs = await rejected(verifier, old_token)
    assert reasons(logs) == ["bad_signature"]
    assert (await verifier.verify(sign(other_rsa_key))).sub == "user-alice"


def write_pem(path: Path, key: Any) -> None:
    path.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


async def test_public_key_file_mode_resolves_relative_path_and_reloads(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    (tmp_path / "keys").mkdir()
    write_pem(tmp_path / "keys" / "issuer.pem", rsa_key.public_key())
    config = Config(
        auth=AuthConfig(
            mode="public_key", public_key_file="keys/issuer.pem", issuer=ISS, audience=AUD
        ),
        base_dir=str(tmp_path),
    )
    verifier = build_verifier(config)
    await verifier.start()
    assert (await verifier.verify(sign(rsa_key))).sub == "user-alice"
    # SIGHUP-style reload after the operator rotated the file.
    write_pem(tmp_path / "keys" / "issuer.pem", other_rsa_key.public_key())
    await verifier.reload_keys()
    await rejected(verifier, sign(rsa_key))
    assert (await verifier.verify(sign(other_rsa_key))).sub == "user-alice"
    # A broken file on reload keeps the old key.
    (tmp_path / "keys" / "issuer.pem").write_text("not a key")
    with pytest.raises(ValueError):
        await verifier.reload_keys()
    assert (await verifier.verify(sign(other_rsa_key))).sub == "user-alice"
    await verifier.close()


def test_public_key_file_with_private_key_or_garbage_is_a_config_error(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    private = tmp_path / "private.pem"
    private.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "garbage.pem").write_text("hello")
    for name in ("private.pem", "garbage.pem", "missing.pem"):
        config = Config(
            auth=AuthConfig(mode="public_key", public_key_file=name), base_dir=str(tmp_path)
        )
        with pytest.raises(ConfigError) as info:
            build_verifier(config)
        assert info.value.key == "auth.public_key_file"


async def test_rejections_log_reasons_never_tokens_payloads_or_emails(
    rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = make_verifier(rsa_key)
    now = int(time.time())
    bad = [
        sign(other_rsa_key),
        sign(rsa_key, exp=now - 100),
        sign(rsa_key, aud="x"),
        sign(rsa_key, organizationIds="acme"),
    ]
    with capture_logs() as logs:
        for token in bad:
            with pytest.raises(Unauthorized):
                await verifier.verify(token)
        await verifier.verify(sign(rsa_key))
    text = repr(logs)
    assert EMAIL not in text
    assert "acme" not in text
    for token in bad:
        assert token not in text
        assert token.split(".")[2] not in text
    assert reasons(logs) == ["bad_signature", "expired", "wrong_audience", "no_orgs"]


def test_extract_token_from_header_and_query() -> None:
    def h(value: str) -> CIMultiDict[str]:
        return CIMultiDict({"authorization": value})

    empty: dict[str, str] = {}
    assert extract_token(h("Bearer abc.def.ghi"), empty, False) == "abc.def.ghi"
    assert extract_token(h("bearer abc"), empty, False) == "abc"
    assert extract_token(h("BEARER   abc  "), empty, False) == "abc"
    assert extract_token(h("Basic dXNlcjpwdw=="), empty, False) is None
    assert extract_token(h("Bearer"), empty, False) is None
    assert extract_token(h("Bearer "), empty, False) is None
    assert extract_token(CIMultiDict(), {"token": "q.t.s"}, False) is None
    assert extract_token(CIMultiDict(), {"token": "q.t.s"}, True) == "q.t.s"
    assert extract_token(CIMultiDict(), {"token": ""}, True) is None
    assert extract_token(h("Bearer hdr"), {"token": "qry"}, True) == "hdr"
    assert extract_token(h("Basic x"), {"token": "qry"}, True) == "qry"


def test_identity_is_frozen() -> None:
    identity = Identity(sub="s", orgs=frozenset({"o"}), email=None, expires_at=1.0)
    with pytest.raises(AttributeError):
        identity.sub = "x"  # type: ignore[misc]


async def test_hostile_kid_is_logged_bounded_and_printable(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(
        StaticKeySource.from_key(rsa_key.public_key()), algorithms=["RS256", "ES256"]
    )
    hostile = "\x1b[31m\nfake: line" + "k" * 500
    with capture_logs() as logs, pytest.raises(Unauthorized):
        await verifier.verify(sign(ec.generate_private_key(ec.SECP256R1()), "ES256", kid=hostile))
    (event,) = logs
    assert event["reason"] == "unknown_kid"
    assert len(event["kid"]) == 64
    assert all(" " <= c <= "~" for c in event["kid"])
