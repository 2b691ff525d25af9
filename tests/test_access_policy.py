"""AccessPolicy against a real checkAccess upstream on 127.0.0.1 that counts its calls."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from relay.auth.access import (
    AccessPolicy,
    AccessRole,
    OrgMembershipBackend,
    StaticGrantsBackend,
    UpstreamAccessBackend,
    build_access_policy,
)
from relay.auth.hostid import parse_host_id
from relay.auth.tokens import Identity
from relay.config import AccessConfig, Config
from relay.errors import AccessUnavailable, ConfigError, ErrorCode, Forbidden
from relay.metrics import Metrics
from tests.clock import FakeClock

ServerFactory = Callable[..., Awaitable[TestServer]]

ALICE = Identity(sub="alice", orgs=frozenset({"acme"}), email="a@x.test", expires_at=0)
BOB = Identity(sub="bob", orgs=frozenset({"acme"}), email=None, expires_at=0)
HOST = parse_host_id("acme:laptop")
HOST2 = parse_host_id("acme:desktop")
TOKEN = "header.alice-token-1.sig"
CLIENT, AGENT = AccessRole.CLIENT, AccessRole.AGENT


class Upstream:
    """A real checkAccess endpoint: records calls; the test sets its answers."""

    def __init__(self) -> None:
        self.calls: list[tuple[str | None, Any]] = []
        self.allowed: dict[str, bool] = {}  # hostId -> answer; default True
        self.status = 200
        self.body: bytes | None = None
        self.delay = 0.0
        self.gate: asyncio.Event | None = None
        self.called = asyncio.Event()  # set once a call has arrived

    async def handle(self, request: web.Request) -> web.Response:
        payload = await request.json()
        self.calls.append((request.headers.get("Authorization"), payload))
        self.called.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.Response(status=self.status, text="upstream trouble")
        if self.body is not None:
            return web.Response(body=self.body, content_type="application/json")
        return web.json_response({"allowed": self.allowed.get(payload.get("hostId"), True)})


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def upstream(aiohttp_server: ServerFactory) -> tuple[Upstream, TestServer]:
    state = Upstream()
    app = web.Application()
    app.router.add_post("/checkAccess", state.handle)
    server = await aiohttp_server(app)
    return state, server


def make_policy(
    session: aiohttp.ClientSession,
    server: TestServer,
    clock: FakeClock,
    metrics: Metrics | None = None,
    *,
    timeout_s: float = 2.0,
    backoff_s: float = 2.0,
    **kwargs: Any,
) -> AccessPolicy:
    backend = UpstreamAccessBackend(
        session,
        str(server.make_url("/checkAccess")),
        timeout_s=timeout_s,
        failure_backoff_s=backoff_s,
        metrics=metrics,
        clock=clock,
    )
    return AccessPolicy(backend, metrics=metrics, clock=clock, **kwargs)


def decisions(metrics: Metrics, outcome: str, source: str) -> float:
    value = metrics.registry.get_sample_value(
        "relay_access_decisions_total", {"outcome": outcome, "source": source}
    )
    return value or 0.0


async def test_host_in_another_org_is_denied_without_an_upstream_call(
    session: aiohttp.ClientSession, upstream: tuple[Upstream, TestServer]
) -> None:
    state, server = upstream
    metrics = Metrics()
    policy = make_policy(session, server, FakeClock(5000.0), metrics)
    with pytest.raises(Forbidden) as info:
        await policy.check(ALICE, parse_host_id("globex:laptop"), TOKEN, role=CLIENT)
    assert info.value.code == ErrorCode.NOT_IN_ORG
    assert info.value.status == 403
    assert state.calls == []
    assert decisions(metrics, "denied", "local") == 1


async def test_org_backend_allows_members_locally() -> None:
    metrics = Metrics()
    policy = AccessPolicy(OrgMembershipBackend(), metrics=metrics)
    assert await policy.check(ALICE, HOST, TOKEN, role=CLIENT) == "local"
    with pytest.raises(Forbidden) as info:
        await policy.check(ALICE, parse_host_id("other:laptop"), TOKEN, role=CLIENT)
    assert info.value.code == ErrorCode.NOT_IN_ORG
    assert decisions(metrics, "allowed", "local") == 1


async def test_upstream_allow_is_cached_and_carries_the_callers_token(
    session: aiohttp.ClientSession, upstream: tuple[Upstream, TestServer]
) -> None:
    state, server = upstream
    metrics = Metrics()
    policy = make_policy(session, server, FakeClock(5000.0), metrics)
    assert await policy.check(ALICE, HOST, TOKEN, role=CLIENT) == "upstream"
    assert await policy.check(ALICE, HOST, TOKEN, role=CLIENT) == "cache"
    assert state.calls == [(f"Bearer {TOKEN}", {"hostId": "acme:laptop", "role": "client"})]
    assert decisions(metrics, "allowed", "upstream") == 1
    assert decisions(metrics, "allowed", "cache") == 1
    hist = metrics.registry.get_sample_value("relay_access_upstream_duration_seconds_count")
    assert hist == 1


async def test_cache_is_keyed_by_subject_not_token(
    session: aiohttp.ClientSession, upstream: tuple[Upstream, TestServer]
) -> None:
    state, server = upstream
    policy = make_policy(session, server, FakeClock(5000.0))
    assert await policy.check(ALICE, HOST, "token-issued-at-9am", role=CLIENT) == "upstream"
    assert await policy.check(ALICE, HOST, "token-refreshed-at-10am", role=CLIENT) == "cache"
    assert len(state.calls) == 1
    # Another subject, or another host, is another key.
    assert await policy.check(BOB, HOST, "bob-token", role=CLIENT) == "upstream"
    assert await policy.check(ALICE, HOST2, "token-refreshed-at-10am", role=CLIENT) == "upstream"
    assert len(state.calls) == 3


async def test_concurrent_misses_share_one_upstream_call(
    session: aiohttp.ClientSession, upstream: tuple[Upstream, TestServer]
) -> None:
    state, server = upstream
    state.gate = asyncio.Event()
    policy = make_policy(session, server, FakeClock(5000.0))
    checks = [asyncio.create_task(policy.check(ALICE, HOST, f"t{i}", role=CLIENT))
              for i in range(30)]
    await asyncio.wait_for(state.called.wait(), 5)  # the call arrived; the gate holds it
    await asyncio.sleep(0.02)
    state.gate.set()
    results = await asyncio.gather(*checks)
    assert results == ["upstream"] * 30
    assert len(state.calls) == 1
    assert len(policy._calls) == 0


async def test_cancelled_waiter_does_not_cancel_the_shared_call(
    session: aiohttp.ClientSession, upstream: tuple[Upstream, TestServer]
) -> None:
    state, server = upstream
    state.gate = asyncio.Event()
    policy = make_policy(session, server, FakeClock(5000.0))
    leaver = asyncio.create_task(policy.check(ALICE, HOST, TOKEN, role=CLIENT))
    stayer = asyncio.create_task(policy.check(ALICE, HOST, TOKEN, role=CLIENT))
    await asyncio.wait_for(state.called.wait(), 5)
    leaver.cancel()
    await asyncio.sleep(0.01)
    state.gate.set()
    assert await stayer == "upstream"
    assert leaver.cancelled()
    assert len(state.calls) == 1
    assert len(policy._calls) == 0
    assert await policy.check(ALICE, HOST, TOKEN, role=CLIENT) == "cache"


async def test_denial_is_cached_for_deny_ttl_only(
    session: aiohttp.ClientSession, upstream: tuple[Upstream, TestServer]
) -> None:
    state, server = upstream
    state.allowed["acme:laptop"] = False
    clock = FakeClock(5000.0)
    metrics = Metrics()
    policy = make_policy(session, server, clock, metrics, allow_ttl_s=900, deny_ttl_s=30)
    for _ in range(3):
        with pytest.raises(Forbidden) as info:
            await policy.check(ALICE, HOST, TOKEN, role=CLIENT)
        assert info.value.code == ErrorCode.NOT_REGISTERED
    assert len(state.calls) == 1
    assert decisions(metrics, "denied", "cache") == 2
    # The grant is given upstream; within 30 s the cached denial still answers...
    state.allowed["acme:laptop"] = True
    clock.advance(29)
    with pytest.raises(Forbidden):
        await policy.check(ALICE, HOST, TOKEN, role=CLIENT)
    # ...and after it, the upstream is asked again.
    clock.advance(1.5)
    assert await policy.check(ALICE, HOST, TOKEN, role=CLIENT) == "upstream"
    assert len(state.calls) == 2


async def test_allow_expires_after_allow_ttl_and_update_ttls_applies(
    session: aiohttp.ClientSession, upstream: tuple[Upstream, TestServer]
) -> None:
    state, server = upstream
    clock = FakeClock(5000.0)
    policy = make_policy(session, server, clock, allow_ttl_s=900, deny_ttl_s=30)
    await policy.check(ALICE, HOST, TOKEN, role=CLIENT)
    clock.advance(899)
    assert await policy.check(ALICE, HOST, TOKEN, role=CLIENT) == "cache"
    clock.advance(2)
    assert await policy.check(ALICE, HOST, TOKEN, role=CLIENT) == "upstream"
    clock.advance(120)
    policy.update_ttls(allow_ttl_s=60, deny_ttl_s=5)  # reload shortens the TTL
    assert await policy.check(ALICE, HOST, TOKEN, role=CLIENT) == "upstream"
    assert len(state.calls) == 3


@pytest.mark.parametrize("failure", ["500", "502", "429", "malformed", "not_bool", "huge"])
async def test_upstream_failure_is_unavailable_not_cached_and_not_hammered(
    session: aiohttp.ClientSession, upstream: tuple[Upstream, TestServer], failure: str
) -> None:
    state, server = upstream
    if failure.isdigit():
        state.status = int(failure)
    elif failure == "malformed":
        state.body = b"<html>oops</html>"
    elif failure == "not_bool":
        state.body = b'{"allowed": "yes"}'
    else:
        state.body = json.dumps({"allowed": True, "pad": "x" * 100_000}).encode()
    clock = FakeClock(5000.0)
    metrics = Metrics()
    policy = make_policy(session, server, clock, metrics, backoff_s=2.0)
    with capture_logs() as logs, pytest.raises(AccessUnavailable) as info:
        await policy.check(ALICE, HOST, TOKEN, role=CLIENT)
    assert info.value.status == 503
    assert "access.upstream_error" in [e["event"] for e in logs]
    assert TOKEN not in repr(logs)
    # During the backoff window nobody reaches the upstream, whatever the key.
    for identity, host in [(ALICE, HOST), (BOB, HOST), (ALICE, HOST2)] * 10:
        with pytest.raises(AccessUnavailable):
            await policy.check(identity, host, TOKEN, role=CLIENT)
    assert len(state.calls) == 1
    assert decisions(metrics, "unavailable", "upstream") == 31
    # The upstream recovers; shortly after, access works, and no denial was cached.
    state.status, state.body = 200, None
    clock.advance(2.1)
    assert await policy.check(ALICE, HOST, TOKEN, role=CLIENT) == "upstream"
    assert await policy.check(BOB, HOST, TOKEN, role=CLIENT) == "upstream"
    assert len(state.calls) == 3
    assert policy.healthy


async def test_stopped_upstream_is_unavailable_then_recovers(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    state = Upstream()
    app = web.Application()
    app.router.add_post("/checkAccess", state.handle)
    server = await aiohttp_server(app)
    port = server.port
    clock = FakeClock(5000.0)
    policy = make_policy(session, server, clock)
    await server.close()
    with pytest.raises(AccessUnavailable):
        await policy.check(ALICE, HOST, TOKEN, role=CLIENT)
    assert not policy.healthy
    # Back on the same port.
    app2 = web.Application()
    app2.router.add_post("/checkAccess", state.handle)
    await aiohttp_server(app2, port=port)
    with pytest.raises(AccessUnavailable):
        await policy.check(ALICE, HOST, TOKEN, role=CLIENT)  # still inside the backoff window
    assert state.calls == []
    clock.advance(2.1)
    assert await policy.check(ALICE, HOST, TOKEN, role=CLIENT) == "upstream"
    assert len(state.calls) == 1


async def test_slow_upstream_times_out_as_unavailable(
    session: aiohttp.ClientSession, upstream: tuple[Upstream, TestServer]
) -> None:
    state, server = upstream
    state.delay = 3
    policy = make_policy(session, server, FakeClock(5000.0), timeout_s=0.1)
    started = time.monotonic()
    with capture_logs() as logs, pytest.raises(AccessUnavailable):
        await policy.check(ALICE, HOST, TOKEN, role=CLIENT)
    assert time.monotonic() - started < 1.5
    assert [e["error"] for e in logs if e["event"] == "access.upstream_error"] == ["timeout"]
    with pytest.raises(AccessUnavailable):
        await policy.check(BOB, HOST, TOKEN, role=CLIENT)
    assert len(state.calls) == 1


async def test_after_backoff_only_one_probe_reaches_a_still_sick_upstream(
    session: aiohttp.ClientSession, upstream: tuple[Upstream, TestServer]
) -> None:
    state, server = upstream
    state.status = 500
    clock = FakeClock(5000.0)
    policy = make_policy(session, server, clock)
    with pytest.raises(AccessUnavailable):
        await policy.check(ALICE, HOST, TOKEN, role=CLIENT)
    clock.advance(2.1)
    subjects = [Identity(f"user{i}", frozenset({"acme"}), None, 0) for i in range(20)]
    results = await asyncio.gather(
        *(policy.check(s, HOST, TOKEN, role=CLIENT) for s in subjects), return_exceptions=True
    )
    assert all(isinstance(r, AccessUnavailable) for r in results)
    assert len(state.calls) == 2


async def test_caller_specific_4xx_backs_off_that_key_only(
    session: aiohttp.ClientSession, upstream: tuple[Upstream, TestServer]
) -> None:
    state, server = upstream
    state.status = 404
    clock = FakeClock(5000.0)
    policy = make_policy(session, server, clock)
    for _ in range(5):
        with pytest.raises(AccessUnavailable):
            await policy.check(ALICE, HOST, TOKEN, role=CLIENT)
    assert len(state.calls) == 1
    # Other callers are unaffected: one odd client cannot take access down for everyone.
    state.status = 200
    assert await policy.check(BOB, HOST, TOKEN, role=CLIENT) == "upstream"
    assert policy.healthy
    clock.advance(2.1)
    assert await policy.check(ALICE, HOST, TOKEN, role=CLIENT) == "upstream"
    assert len(state.calls) == 3


async def test_revoke_by_subject_and_by_host(
    session: aiohttp.ClientSession, upstream: tuple[Upstream, TestServer]
) -> None:
    state, server = upstream
    state.allowed["acme:desktop"] = False
    policy = make_policy(session, server, FakeClock(5000.0))
    await policy.check(ALICE, HOST, TOKEN, role=CLIENT)
    with pytest.raises(Forbidden):
        await policy.check(ALICE, HOST2, TOKEN, role=CLIENT)
    await policy.check(BOB, HOST, TOKEN, role=CLIENT)
    assert len(state.calls) == 3
    assert policy.revoke(sub="alice") == 2  # one allow + one deny entry
    assert await policy.check(BOB, HOST, TOKEN, role=CLIENT) == "cache"
    assert await policy.check(ALICE, HOST, TOKEN, role=CLIENT) == "upstream"
    assert len(state.calls) == 4
    assert policy.revoke(host="acme:laptop") == 2  # alice's and bob's
    assert await policy.check(BOB, HOST, TOKEN, role=CLIENT) == "upstream"
    assert policy.revoke(sub="nobody") == 0
    assert policy.revoke(sub="bob", host="acme:laptop") == 1
    assert await policy.check(ALICE, HOST, TOKEN, role=CLIENT) == "upstream"
    with pytest.raises(Forbidden):
        await policy.check(BOB, HOST2, TOKEN, role=CLIENT)
    assert policy.revoke() == 2  # no filter: everything
    assert policy.cache_sizes() == (0, 0)


async def test_decisions_are_cached_per_role_and_revoked_for_both(
    session: aiohttp.ClientSession, upstream: tuple[Upstream, TestServer]
) -> None:
    state, server = upstream
    policy = make_policy(session, server, FakeClock(5000.0))
    assert await policy.check(ALICE, HOST, TOKEN, role=CLIENT) == "upstream"
    # Allowed to call is not allowed to serve: the agent role is asked separately ...
    assert await policy.check(ALICE, HOST, TOKEN, role=AGENT) == "upstream"
    assert [payload for _, payload in state.calls] == [
        {"hostId": "acme:laptop", "role": "client"}, {"hostId": "acme:laptop", "role": "agent"}]
    # ... and each role's answer is cached on its own.
    assert await policy.check(ALICE, HOST, TOKEN, role=CLIENT) == "cache"
    assert await policy.check(ALICE, HOST, TOKEN, role=AGENT) == "cache"
    assert policy.cache_sizes() == (2, 0)
    assert policy.revoke(host="acme:laptop") == 2  # both roles
    assert policy.cache_sizes() == (0, 0)
    assert await policy.check(ALICE, HOST, TOKEN, role=AGENT) == "upstream"
    assert len(state.calls) == 3


async def test_answer_requested_before_a_revoke_is_not_cached(
    session: aiohttp.ClientSession, upstream: tuple[Upstream, TestServer]
) -> None:
    state, server = upstream
    state.gate = asyncio.Event()
    policy = make_policy(session, server, FakeClock(5000.0))
    pending = asyncio.create_task(policy.check(ALICE, HOST, TOKEN, role=CLIENT))
    await asyncio.wait_for(state.called.wait(), 5)
    policy.revoke(sub="alice")
    state.gate.set()
    assert await pending == "upstream"
    assert await policy.check(ALICE, HOST, TOKEN, role=CLIENT) == "upstream"
    assert len(state.calls) == 2


async def test_close_cancels_calls_in_flight(
    session: aiohttp.ClientSession, upstream: tuple[Upstream, TestServer]
) -> None:
    state, server = upstream
    state.gate = asyncio.Event()
    policy = make_policy(session, server, FakeClock(5000.0))
    pending = asyncio.create_task(policy.check(ALICE, HOST, TOKEN, role=CLIENT))
    await asyncio.wait_for(state.called.wait(), 5)
    await policy.close()
    with pytest.raises(asyncio.CancelledError):
        await pending
    state.gate.set()


def test_static_grants_json_and_toml(tmp_path: Path) -> None:
    (tmp_path / "grants.json").write_text(
        json.dumps(
            {
                "grants": [
                    {"sub": "alice", "hosts": ["acme:laptop"]},
                    {"sub": "alice", "hosts": ["globex:*"]},
                ]
            }
        )
    )
    (tmp_path / "grants.toml").write_text(
        '[[grants]]\nsub = "alice"\nhosts = ["acme:laptop", "globex:*"]\n'
    )
    for name in ("grants.json", "grants.toml"):
        backend = StaticGrantsBackend.from_file(tmp_path / name)
        assert backend.allows(ALICE, HOST, CLIENT) is True
        assert backend.allows(ALICE, HOST2, CLIENT) is False
        assert backend.allows(ALICE, parse_host_id("globex:anything"), CLIENT) is True
        assert backend.allows(BOB, HOST, CLIENT) is False
        # Grants written before roles existed are client grants: serving needs its own.
        assert isinstance(backend.allows(ALICE, HOST, AGENT), str)


def test_static_grants_name_roles_in_json_and_toml(tmp_path: Path) -> None:
    (tmp_path / "roles.json").write_text(json.dumps({"grants": [
        {"sub": "alice", "hosts": ["acme:laptop"], "roles": ["client", "agent"]},
        {"sub": "alice", "hosts": ["acme:*"], "roles": ["client"]},
        {"sub": "bob", "hosts": ["acme:laptop"], "roles": ["agent"]},
    ]}))
    (tmp_path / "roles.toml").write_text(
        '[[grants]]\nsub = "alice"\nhosts = ["acme:laptop"]\nroles = ["client", "agent"]\n'
        '[[grants]]\nsub = "alice"\nhosts = ["acme:*"]\nroles = ["client"]\n'
        '[[grants]]\nsub = "bob"\nhosts = ["acme:laptop"]\nroles = ["agent"]\n'
    )
    for name in ("roles.json", "roles.toml"):
        backend = StaticGrantsBackend.from_file(tmp_path / name)
        assert backend.allows(ALICE, HOST, AGENT) is True
        assert backend.allows(ALICE, HOST2, CLIENT) is True
        assert isinstance(backend.allows(ALICE, HOST2, AGENT), str)  # acme:* is client only
        assert backend.allows(BOB, HOST, AGENT) is True
        assert backend.allows(BOB, HOST, CLIENT) is False  # serving does not imply calling


@pytest.mark.parametrize("roles", ['[]', '["owner"]', '"agent"', '[1]'])
def test_bad_roles_in_grants_are_config_errors(tmp_path: Path, roles: str) -> None:
    path = tmp_path / "grants.json"
    path.write_text(f'{{"grants": [{{"sub": "a", "hosts": ["acme:x"], "roles": {roles}}}]}}')
    with pytest.raises(ConfigError) as info:
        StaticGrantsBackend.from_file(path)
    assert info.value.key == "access.static_grants_file"


async def test_static_policy_keeps_the_org_short_circuit(tmp_path: Path) -> None:
    backend = StaticGrantsBackend({"alice": ["globex:*", "acme:laptop"]})
    metrics = Metrics()
    policy = AccessPolicy(backend, metrics=metrics)
    assert await policy.check(ALICE, HOST, TOKEN, role=CLIENT) == "local"
    with pytest.raises(Forbidden) as info:
        await policy.check(ALICE, HOST2, TOKEN, role=CLIENT)
    assert info.value.code == ErrorCode.NOT_REGISTERED
    with pytest.raises(Forbidden) as info:
        # granted, but not in org
        await policy.check(ALICE, parse_host_id("globex:m"), TOKEN, role=CLIENT)
    assert info.value.code == ErrorCode.NOT_IN_ORG
    assert decisions(metrics, "denied", "local") == 2


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        '{"grants": {}}',
        '{"grants": [{"sub": "", "hosts": []}]}',
        '{"grants": [{"sub": "a", "hosts": "acme:x"}]}',
        '{"grants": [{"sub": "a", "hosts": ["acme/x"]}]}',
        '{"grants": [{"sub": "a", "hosts": ["*:*"]}]}',
    ],
)
def test_bad_grants_files_are_config_errors(tmp_path: Path, content: str) -> None:
    path = tmp_path / "grants.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        StaticGrantsBackend.from_file(path)
    assert info.value.key == "access.static_grants_file"


async def test_build_access_policy_for_each_backend(
    tmp_path: Path, session: aiohttp.ClientSession, upstream: tuple[Upstream, TestServer]
) -> None:
    state, server = upstream
    org = build_access_policy(Config())
    assert isinstance(org.backend, OrgMembershipBackend)

    (tmp_path / "grants.json").write_text('{"grants": [{"sub": "alice", "hosts": ["acme:*"]}]}')
    static = build_access_policy(
        Config(
            access=AccessConfig(backend="static", static_grants_file="grants.json"),
            base_dir=str(tmp_path),
        )
    )
    assert await static.check(ALICE, HOST, TOKEN, role=CLIENT) == "local"

    config = Config(
        access=AccessConfig(
            backend="upstream",
            upstream_url=str(server.make_url("/checkAccess")),
            deny_ttl_s=30,
        )
    )
    clock = FakeClock(5000.0)
    remote = build_access_policy(config, session, Metrics(), clock)
    state.allowed["acme:laptop"] = False
    with pytest.raises(Forbidden):
        await remote.check(ALICE, HOST, TOKEN, role=CLIENT)
    with pytest.raises(Forbidden):
        await remote.check(ALICE, HOST, TOKEN, role=CLIENT)
    assert len(state.calls) == 1
    with pytest.raises(ValueError):
        build_access_policy(config, None)


async def test_denials_are_logged_without_tokens(
    session: aiohttp.ClientSession, upstream: tuple[Upstream, TestServer]
) -> None:
    state, server = upstream
    state.allowed["acme:laptop"] = False
    policy = make_policy(session, server, FakeClock(5000.0))
    with capture_logs() as logs:
        for host in (HOST, parse_host_id("globex:m")):
            with pytest.raises(Forbidden):
                await policy.check(ALICE, host, TOKEN, role=CLIENT)
    denied = [e for e in logs if e["event"] == "access.denied"]
    assert [e["reason"] for e in denied] == ["not_registered", "not_in_org"]
    assert TOKEN not in repr(logs)
    assert "a@x.test" not in repr(logs)


async def test_redirect_from_upstream_is_not_followed_with_the_token(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    leaked: list[str | None] = []

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("/elsewhere")

    async def elsewhere(request: web.Request) -> web.Response:
        leaked.append(request.headers.get("Authorization"))
        return web.json_response({"allowed": True})

    app = web.Application()
    app.router.add_post("/checkAccess", redirect)
    app.router.add_post("/elsewhere", elsewhere)
    server = await aiohttp_server(app)
    policy = make_policy(session, server, FakeClock(5000.0))
    with pytest.raises(AccessUnavailable):
        await policy.check(ALICE, HOST, TOKEN, role=CLIENT)
    assert leaked == []
