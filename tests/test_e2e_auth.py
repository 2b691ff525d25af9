"""Identity and access through the whole relay: attacks, org short-circuit, upstream caching."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay.auth.devissuer import dev_key_id, load_or_create_dev_key
from tests.harness import Stack, stack, start_host

HOST = "acme:laptop"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    body: dict[str, object] = {"sub": "alice", "organizationIds": ["acme"], "iss": "relay-dev",
                               "aud": "relay", "iat": now, "nbf": now, "exp": now + 600}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def attack_tokens(state_dir: Path) -> dict[str, str]:
    key = load_or_create_dev_key(state_dir)
    kid = dev_key_id(key.public_key())
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    def signed(body: dict[str, object], signing_key: Ed25519PrivateKey = key) -> str:
        return jwt.encode(body, signing_key, algorithm="EdDSA", headers={"kid": kid})

    def unsigned(header: dict[str, object], body: dict[str, object], sig: bytes = b"") -> str:
        head = b64(json.dumps(header).encode())
        payload = b64(json.dumps(body).encode())
        return f"{head}.{payload}.{b64(sig)}"

    hs_header = {"alg": "HS256", "typ": "JWT", "kid": kid}
    hs_signing_input = (b64(json.dumps(hs_header).encode()) + "." +
                        b64(json.dumps(claims()).encode())).encode()
    hs_sig = hmac.new(public_pem, hs_signing_input, hashlib.sha256).digest()
    return {
        "garbage": "not-a-jwt",
        "alg_none": unsigned({"alg": "none", "typ": "JWT"}, claims()),
        "hs256_with_public_key": hs_signing_input.decode() + "." + b64(hs_sig),
        "foreign_key": signed(claims(), Ed25519PrivateKey.generate()),
        "expired": signed(claims(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200,
                                 nbf=int(time.time()) - 7200)),
        "not_yet_valid": signed(claims(nbf=int(time.time()) + 3600)),
        "wrong_issuer": signed(claims(iss="someone-else")),
        "wrong_audience": signed(claims(aud="another-api")),
        "no_org_claim": signed(claims(organizationIds=None)),
        "org_claim_not_a_list": signed(claims(organizationIds="acme")),
        "tampered_payload": _tamper(signed(claims())),
    }


def _tamper(token: str) -> str:
    head, payload, sig = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=="))
    body["organizationIds"] = ["acme", "victim-org"]
    return f"{head}.{b64(json.dumps(body).encode())}.{sig}"


ATTACKS = ["garbage", "alg_none", "hs256_with_public_key", "foreign_key", "expired",
           "not_yet_valid", "wrong_issuer", "wrong_audience", "no_org_claim",
           "org_claim_not_a_list", "tampered_payload"]


@pytest.fixture
async def dev_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with stack(tmp_path) as running:
        yield running


async def test_missing_token_is_401_with_www_authenticate(dev_stack: Stack) -> None:
    async with dev_stack.client.get(dev_stack.url("/")) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await resp.json())["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("attack", ATTACKS)
async def test_attack_tokens_are_refused_over_http_and_websocket(
    dev_stack: Stack, attack: str
) -> None:
    token = attack_tokens(dev_stack.relay.config.dev_state_path)[attack]
    async with dev_stack.client.get(dev_stack.url("/"), headers=dev_stack.auth(token)) as resp:
        assert resp.status == 401, attack
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        body = await resp.json()
        assert body["error"]["code"] == "unauthorized"
        assert token not in json.dumps(body)
    async with dev_stack.client.ws_connect(dev_stack.url("/ws") + f"?token={token}") as ws:
        await ws.receive(timeout=5)
        assert ws.close_code == 4401
    # An agent with such a token cannot register a tunnel either.
    async with dev_stack.client.ws_connect(
        f"{dev_stack.relay.ws_url}/tunnel?hostId=acme:evil&v=1&token={token}"
    ) as ws:
        await ws.receive(timeout=5)
        assert ws.close_code == 4401
    assert dev_stack.relay.state.registry.get("acme:evil") is None


async def test_a_valid_token_still_works_after_the_attacks(dev_stack: Stack) -> None:
    async with dev_stack.client.get(dev_stack.url("/"), headers=dev_stack.auth()) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("raw", [
    "acme", "acme:", ":laptop", "acme:lap:top", "acme%3Alaptop", "acme:lap%2Ftop",
    "acme:..", "acme:%00", "a" * 300 + ":b", "acme:lap%20top", "acme:lap%09top", "..%2F:x",
])
async def test_hostile_host_ids_are_400_invalid_host(dev_stack: Stack, raw: str) -> None:
    url = f"{dev_stack.relay.url}/hosts/{raw}/x"
    async with dev_stack.client.get(aiohttp.client.URL(url, encoded=True),
                                    headers=dev_stack.auth()) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_host"
    async with dev_stack.client.ws_connect(
        aiohttp.client.URL(f"{dev_stack.relay.url}/hosts/{raw}/ws?token={dev_stack.token()}",
                           encoded=True)
    ) as ws:
        await ws.receive(timeout=5)
        assert ws.close_code == 4400


# -- the upstream access backend, end to end ---------------------------------------------------

@dataclass
class CheckAccess:
    """A real checkAccess upstream that counts its calls and can be told what to answer."""

    allowed: bool = True
    status: int = 200
    delay_s: float = 0.0
    calls: list[tuple[str, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append((request.headers.get("Authorization", ""), body.get("hostId", "")))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.status != 200:
            return web.Response(status=self.status, text="upstream trouble")
        return web.json_response({"allowed": self.allowed})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/check-access", self.handle)
        return app


@pytest.fixture
async def upstream_stack(tmp_path: Path, request: pytest.FixtureRequest,
                         ) -> AsyncIterator[tuple[Stack, CheckAccess]]:
    """Indirectly parametrized, the param is ``access`` settings over these."""
    check = CheckAccess()
    server = await start_host(check.app())
    sections = {"access": {"backend": "upstream", "upstream_url": f"{server.url}/check-access",
                           "deny_ttl_s": 0.5, "allow_ttl_s": 60, "failure_backoff_s": 0.5,
                           "upstream_timeout_s": 1, **getattr(request, "param", {})}}
    try:
        async with stack(tmp_path, sections) as running:
            check.calls.clear()  # the agent's own tunnel check
            yield running, check
    finally:
        await server.stop()


async def _get(st: Stack, token: str, host: str = HOST) -> tuple[int, str]:
    async with st.client.get(f"{st.relay.url}/hosts/{host}/", headers=st.auth(token)) as resp:
        body = await resp.text()
        code = json.loads(body)["error"]["code"] if resp.status >= 400 else ""
        return resp.status, code


async def test_other_org_is_denied_locally_without_an_upstream_call(
    upstream_stack: tuple[Stack, CheckAccess],
) -> None:
    st, check = upstream_stack
    assert await _get(st, st.token(), "globex:server") == (403, "not_in_org")
    assert check.calls == []


async def test_cache_is_keyed_by_subject_across_rotated_tokens(
    upstream_stack: tuple[Stack, CheckAccess],
) -> None:
    st, check = upstream_stack
    for ttl in (600, 601, 602, 603):  # four distinct tokens for the same subject
        assert await _get(st, st.token(sub="frank", ttl_s=ttl)) == (200, "")
    assert len(check.calls) == 1
    # The upstream saw the caller's own bearer token and the host id.
    auth, host = check.calls[0]
    assert auth.startswith("Bearer ") and host == HOST
    # Another subject is another key.
    assert await _get(st, st.token(sub="bob")) == (200, "")
    assert len(check.calls) == 2


async def test_thirty_concurrent_misses_make_one_upstream_call(
    upstream_stack: tuple[Stack, CheckAccess],
) -> None:
    st, check = upstream_stack
    check.delay_s = 0.3
    token = st.token(sub="carol")
    results = await asyncio.gather(*(_get(st, token) for _ in range(30)))
    assert all(result == (200, "") for result in results)
    assert len(check.calls) == 1


async def test_denial_is_cached_for_the_deny_ttl_only(
    upstream_stack: tuple[Stack, CheckAccess],
) -> None:
    st, check = upstream_stack
    check.allowed = False
    token = st.token(sub="dave")
    for _ in range(5):
        assert await _get(st, token) == (403, "not_registered")
    assert len(check.calls) == 1
    check.allowed = True
    # Polled: until deny_ttl_s (0.5 s) has passed the cached denial answers, without a call.
    deadline = time.monotonic() + 5
    while await _get(st, token) != (200, ""):
        assert time.monotonic() < deadline, "the denial outlived its TTL"
        await asyncio.sleep(0.05)
    assert len(check.calls) == 2


# The upstream times out in 0.3 s here: only that it does, not after how long, is tested.
@pytest.mark.parametrize("upstream_stack", [{"upstream_timeout_s": 0.3}], indirect=True,
                         ids=["timeout_0.3s"])
@pytest.mark.parametrize("failure", ["status_500", "timeout"])
async def test_upstream_outage_is_503_never_cached_as_denial_and_recovers(
    upstream_stack: tuple[Stack, CheckAccess], failure: str,
) -> None:
    st, check = upstream_stack
    if failure == "status_500":
        check.status = 500
    else:
        check.delay_s = 2.0  # upstream_timeout_s = 0.3
    token = st.token(sub="erin")
    statuses = await asyncio.gather(*(_get(st, token) for _ in range(20)))
    assert all(result == (503, "access_unavailable") for result in statuses)
    for _ in range(10):
        assert await _get(st, token) == (503, "access_unavailable")
    # The upstream was not hammered: the concurrent misses and the fail-fast window share calls.
    assert len(check.calls) <= 2
    check.status, check.delay_s = 200, 0.0
    # Polled: fail-fast answers 503 for failure_backoff_s (0.5 s), then a call goes out again.
    deadline = time.monotonic() + 5
    while await _get(st, token) != (200, ""):
        assert time.monotonic() < deadline, "access did not recover"
        await asyncio.sleep(0.1)

