"""The embedded dev issuer: an Ed25519 key kept in a local state folder, and tokens signed by it.

``auth.mode = "dev"`` makes the relay trust this key, so ``relay token`` can mint tokens for
local use with no identity provider. The key is generated on first use, written ``0600`` into a
``0700`` folder with an atomic create (tmp file + link/rename), and reused ever after, so
tokens survive restarts. Config loading refuses dev mode on non-loopback addresses.

When ``auth.issuer`` / ``auth.audience`` are empty, dev tokens carry :data:`DEV_ISSUER` /
:data:`DEV_AUDIENCE` and the verifier enforces the same defaults.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jwt
import structlog
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from relay.auth.hostid import HostId, parse_host_pattern
from relay.auth.keys import PublicKey, UnknownKey
from relay.config import Config
from relay.errors import ConfigError

__all__ = [
    "DEV_ALGORITHM",
    "DEV_AUDIENCE",
    "DEV_ISSUER",
    "DEV_KEY_FILENAME",
    "DevKeySource",
    "dev_jwks",
    "dev_key_id",
    "dev_key_path",
    "effective_audience",
    "effective_issuer",
    "load_or_create_dev_key",
    "mint_token",
]

log = structlog.get_logger("relay.auth")

DEV_ISSUER = "relay-dev"
DEV_AUDIENCE = "relay"
DEV_ALGORITHM = "EdDSA"
DEV_KEY_FILENAME = "dev-issuer-ed25519.pem"


def effective_issuer(config: Config) -> str:
    """The issuer tokens must carry: the configured one, or the dev default in dev mode."""
    if not config.auth.issuer and config.auth.mode == "dev":
        return DEV_ISSUER
    return config.auth.issuer


def effective_audience(config: Config) -> str:
    """The audience tokens must carry: the configured one, or the dev default in dev mode."""
    if not config.auth.audience and config.auth.mode == "dev":
        return DEV_AUDIENCE
    return config.auth.audience


def dev_key_path(state_dir: Path) -> Path:
    return state_dir / DEV_KEY_FILENAME


def load_or_create_dev_key(state_dir: Path) -> Ed25519PrivateKey:
    """The dev issuer's private key from ``state_dir``, generated there on first use.

    Synchronous on purpose: it runs at start-up and in the CLI, before any event loop work.
    Raises :class:`ConfigError` (naming ``auth.dev_state_dir``) when the folder or the key file
    cannot be used.
    """
    path = dev_key_path(state_dir)
    try:
        return _load_dev_key(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(
            str(path), "auth.dev_state_dir", f"cannot read the dev issuer key: {exc.strerror}"
        ) from None
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _create_exclusive(path, pem)
        log.info("auth.dev_key_created", path=str(path))
        # Load what is on disk: if another process won the race, its key is the one to use.
        return _load_dev_key(path)
    except OSError as exc:
        raise ConfigError(
            str(path), "auth.dev_state_dir", f"cannot create the dev issuer key: {exc.strerror}"
        ) from None


def _create_exclusive(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, 0600, never replacing an existing file.

    The bytes go to a private temporary file first, so nobody ever sees a half-written key.
    It is then published with link(), which fails if ``path`` appeared meanwhile (two relays
    starting together on one state folder must end up sharing one key, not each trusting its
    own). Filesystems without hard links fall back to rename().
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # someone else created it first; theirs wins
        except OSError:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _load_dev_key(path: Path) -> Ed25519PrivateKey:
    data = path.read_bytes()  # FileNotFoundError propagates: the caller creates the key
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        # A private key readable by others is a key anyone on the machine can mint with.
        os.chmod(path, 0o600)
        log.warning("auth.dev_key_permissions_fixed", path=str(path), old_mode=oct(mode))
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            str(path), "auth.dev_state_dir", "the dev issuer key file is not a PEM private key"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(str(path), "auth.dev_state_dir", "the dev issuer key is not Ed25519")
    return key


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _public_jwk_members(public_key: Ed25519PublicKey) -> dict[str, str]:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}


def dev_key_id(public_key: Ed25519PublicKey) -> str:
    """The key's RFC 7638 JWK thumbprint: stable for a key, different for any other key."""
    members = json.dumps(_public_jwk_members(public_key), separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(members.encode("ascii")).digest())


def dev_jwks(public_key: Ed25519PublicKey) -> dict[str, list[dict[str, str]]]:
    """The dev issuer's public key as a JWKS document (to publish it, e.g. for other tools)."""
    jwk = {
        **_public_jwk_members(public_key),
        "kid": dev_key_id(public_key),
        "alg": "EdDSA",
        "use": "sig",
    }
    return {"keys": [jwk]}


def mint_token(
    config: Config,
    sub: str,
    orgs: Iterable[str],
    ttl_s: float = 3600,
    email: str | None = None,
    extra: Mapping[str, Any] | None = None,
    *,
    agent_hosts: Iterable[str] = (),
    key: Ed25519PrivateKey | None = None,
    now: float | None = None,
) -> str:
    """A token signed by the dev issuer of ``config`` (its key is created if missing).

    Claims: ``sub``, ``iat``/``nbf``/``exp``, ``iss``/``aud`` (configured or dev defaults), the
    organisations under ``auth.org_claim``, when given, the email under ``auth.email_claim``
    and the host ids the token may serve as an agent (``agent_hosts``: host ids or
    ``<org>:*``, each in one of ``orgs``) under ``auth.agent_claim``. ``extra`` claims are
    added last and may override any of these (tests and tools use that to build deliberately
    wrong tokens). ``key`` and ``now`` skip the key
    file read and the clock read.
    """
    if not isinstance(sub, str) or not sub:
        raise ValueError("sub must be a non-empty string")
    if isinstance(orgs, str):
        raise ValueError("orgs must be a list of organisation ids, not one string")
    org_list = list(orgs)
    if not all(isinstance(o, str) and o for o in org_list):
        raise ValueError("orgs must be non-empty strings")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    if isinstance(agent_hosts, str):
        raise ValueError("agent_hosts must be a list of host ids, not one string")
    serve = list(agent_hosts)
    for entry in serve:
        pattern = parse_host_pattern(entry)
        if pattern is None:
            raise ValueError(f"agent host {entry!r} is not a host id (<org>:<machine>) or <org>:*")
        org = pattern.org if isinstance(pattern, HostId) else pattern
        if org not in org_list:
            raise ValueError(
                f"agent host {entry!r} is outside the token's organisations (no --org {org})"
            )
    if key is None:
        key = load_or_create_dev_key(config.dev_state_path)
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "sub": sub,
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl_s),
        config.auth.org_claim: org_list,
    }
    issuer = config.auth.issuer or DEV_ISSUER
    audience = config.auth.audience or DEV_AUDIENCE
    claims["iss"] = issuer
    claims["aud"] = audience
    if email is not None:
        claims[config.auth.email_claim] = email
    if serve:
        claims[config.auth.agent_claim] = serve
    if extra:
        claims.update(extra)
    return jwt.encode(
        claims, key, algorithm=DEV_ALGORITHM, headers={"kid": dev_key_id(key.public_key())}
    )


class DevKeySource:
    """Key source trusting only the dev issuer's public key (``auth.mode = "dev"``)."""

    def __init__(
        self,
        key: Ed25519PrivateKey | Ed25519PublicKey,
        state_dir: Path | None = None,
        *,
        loader: Callable[[Path], Ed25519PrivateKey] = load_or_create_dev_key,
    ) -> None:
        self._public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
        self._kid = dev_key_id(self._public)
        self._state_dir = state_dir
        self._loader = loader
        self._generation = 0

    @classmethod
    def from_state_dir(cls, state_dir: Path) -> DevKeySource:
        return cls(load_or_create_dev_key(state_dir), state_dir)

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def kid(self) -> str:
        return self._kid

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._public

    async def key_for(self, kid: str | None, alg: str) -> PublicKey:
        if alg != DEV_ALGORITHM or (kid is not None and kid != self._kid):
            raise UnknownKey(kid)
        return self._public

    async def reload(self) -> None:
        if self._state_dir is None:
            return
        private = await asyncio.to_thread(self._loader, self._state_dir)
        public = private.public_key()
        kid = dev_key_id(public)
        if kid != self._kid:
            self._public, self._kid = public, kid
            self._generation += 1
            log.info("auth.keys_reloaded", source="dev")

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
