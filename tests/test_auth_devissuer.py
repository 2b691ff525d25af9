"""The embedded dev issuer: key persistence, minted tokens, and dev-mode verification."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from relay.auth.devissuer import (
    DEV_AUDIENCE,
    DEV_ISSUER,
    DEV_KEY_FILENAME,
    DevKeySource,
    _create_exclusive,
    dev_jwks,
    dev_key_id,
    load_or_create_dev_key,
    mint_token,
)
from relay.auth.tokens import build_verifier
from relay.config import AuthConfig, Config
from relay.errors import ConfigError, Unauthorized


def dev_config(base: Path, **auth: object) -> Config:
    return Config(auth=AuthConfig(mode="dev", **auth), base_dir=str(base))  # type: ignore[arg-type]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_is_created_0600_in_a_0700_folder_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "state" / "nested"
    with capture_logs() as logs:
        key = load_or_create_dev_key(state)
    # Created private from the first byte, not fixed up afterwards.
    assert [e["event"] for e in logs] == ["auth.dev_key_created"]
    path = state / DEV_KEY_FILENAME
    assert mode(path) == 0o600
    assert mode(state) & 0o077 == 0
    assert not [p for p in state.iterdir() if p.name != DEV_KEY_FILENAME]  # no tmp left over
    again = load_or_create_dev_key(state)
    assert dev_key_id(again.public_key()) == dev_key_id(key.public_key())
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_other_state_folder_gets_another_key(tmp_path: Path) -> None:
    a = load_or_create_dev_key(tmp_path / "a")
    b = load_or_create_dev_key(tmp_path / "b")
    assert dev_key_id(a.public_key()) != dev_key_id(b.public_key())


def test_loose_key_permissions_are_tightened(tmp_path: Path) -> None:
    load_or_create_dev_key(tmp_path)
    path = tmp_path / DEV_KEY_FILENAME
    os.chmod(path, 0o644)
    with capture_logs() as logs:
        load_or_create_dev_key(tmp_path)
    assert mode(path) == 0o600
    assert [e["event"] for e in logs] == ["auth.dev_key_permissions_fixed"]


def test_exclusive_create_never_replaces_an_existing_key(tmp_path: Path) -> None:
    path = tmp_path / DEV_KEY_FILENAME
    path.write_bytes(b"first")
    _create_exclusive(path, b"second")
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == [DEV_KEY_FILENAME]


@pytest.mark.parametrize(
    "content",
    [
        b"not a pem",
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    ],
)
def test_unusable_key_file_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / DEV_KEY_FILENAME
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        load_or_create_dev_key(tmp_path)
    assert info.value.key == "auth.dev_state_dir"
    assert path.read_bytes() == content  # never overwritten


def test_unwritable_state_folder_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError) as info:
        load_or_create_dev_key(blocker / "state")
    assert info.value.key == "auth.dev_state_dir"


def test_minted_token_has_the_documented_claims(tmp_path: Path) -> None:
    config = dev_config(tmp_path, org_claim="example-io:orgs", email_claim="example-io:email")
    token = mint_token(config, "alice", ["acme", "globex"], ttl_s=600, email="a@x.test", now=1000)
    header = jwt.get_unverified_header(token)
    key = load_or_create_dev_key(config.dev_state_path)
    assert header["alg"] == "EdDSA"
    assert header["kid"] == dev_key_id(key.public_key())
    claims = jwt.decode(
        token,
        key.public_key(),
        algorithms=["EdDSA"],
        audience=DEV_AUDIENCE,
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )
    assert claims == {
        "sub": "alice",
        "iat": 1000,
        "nbf": 1000,
        "exp": 1600,
        "iss": DEV_ISSUER,
        "aud": DEV_AUDIENCE,
        "example-io:orgs": ["acme", "globex"],
        "example-io:email": "a@x.test",
    }


@pytest.mark.parametrize(
    ("sub", "orgs", "ttl"), [("", ["a"], 60), ("s", "acme", 60), ("s", [""], 60), ("s", ["a"], 0)]
)
def test_mint_token_refuses_bad_arguments(
    tmp_path: Path, sub: str, orgs: list[str], ttl: int
) -> None:
    with pytest.raises(ValueError):
        mint_token(dev_config(tmp_path), sub, orgs, ttl_s=ttl)


async def test_dev_mode_verifies_its_own_tokens_with_default_iss_and_aud(tmp_path: Path) -> None:
    config = dev_config(tmp_path)
    verifier = build_verifier(config)
    assert (verifier.issuer, verifier.audience) == (DEV_ISSUER, DEV_AUDIENCE)
    await verifier.start()
    identity = await verifier.verify(mint_token(config, "alice", ["acme"], email="a@x.test"))
    assert identity.sub == "alice"
    assert identity.orgs == frozenset({"acme"})
    assert identity.email == "a@x.test"
    # The defaults are enforced, not just filled in.
    for extra in ({"iss": "someone-else"}, {"aud": "another-api"}):
        with pytest.raises(Unauthorized):
            await verifier.verify(mint_token(config, "alice", ["acme"], extra=extra))
    await verifier.close()


async def test_dev_mode_with_configured_issuer_uses_it(tmp_path: Path) -> None:
    config = dev_config(tmp_path, issuer="my-issuer", audience="my-aud")
    verifier = build_verifier(config)
    token = mint_token(config, "alice", ["acme"])
    assert jwt.decode(token, options={"verify_signature": False})["iss"] == "my-issuer"
    assert (await verifier.verify(token)).sub == "alice"
    with pytest.raises(Unauthorized):
        await verifier.verify(mint_token(config, "alice", ["acme"], extra={"iss": DEV_ISSUER}))


async def test_tokens_survive_a_restart_but_not_another_state_folder(tmp_path: Path) -> None:
    config = dev_config(tmp_path)
    token = mint_token(config, "alice", ["acme"])
    restarted = build_verifier(config)
    assert (await restarted.verify(token)).sub == "alice"
    elsewhere = build_verifier(dev_config(tmp_path / "other"))
    with capture_logs() as logs, pytest.raises(Unauthorized):
        await elsewhere.verify(token)
    assert logs[0]["reason"] == "unknown_kid"


async def test_dev_key_source_reload_picks_up_a_replaced_key(tmp_path: Path) -> None:
    config = dev_config(tmp_path)
    verifier = build_verifier(config)
    old_token = mint_token(config, "alice", ["acme"])
    assert (await verifier.verify(old_token)).sub == "alice"
    (tmp_path / "state" / DEV_KEY_FILENAME).unlink()
    new_token = mint_token(config, "alice", ["acme"])  # creates a fresh key
    await verifier.reload_keys()
    assert (await verifier.verify(new_token)).sub == "alice"
    with pytest.raises(Unauthorized):
        await verifier.verify(old_token)


async def test_dev_key_source_only_serves_eddsa_with_its_kid(tmp_path: Path) -> None:
    key = load_or_create_dev_key(tmp_path)
    source = DevKeySource(key)
    kid = dev_key_id(key.public_key())
    assert await source.key_for(kid, "EdDSA") == source.public_key
    assert await source.key_for(None, "EdDSA") == source.public_key
    from relay.auth.keys import UnknownKey

    for k, alg in ((kid, "RS256"), ("other", "EdDSA"), (kid, "HS256")):
        with pytest.raises(UnknownKey):
            await source.key_for(k, alg)


def test_dev_jwks_describes_the_public_key(tmp_path: Path) -> None:
    key = load_or_create_dev_key(tmp_path)
    (jwk,) = dev_jwks(key.public_key())["keys"]
    assert jwk["kid"] == dev_key_id(key.public_key())
    parsed = jwt.PyJWK(jwk)
    assert parsed.key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    ) == key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
