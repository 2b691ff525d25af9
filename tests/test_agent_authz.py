"""Agents are authorised to serve, not only to reach: roles in every access decision.

End to end against a real relay, real agents and real host services on 127.0.0.1: with the
default ``org`` backend an org member without the agent claim can neither register a host nor
replace the real agent (the hijack), the claim (exact or ``<org>:*``) lets an agent in, the
``upstream`` backend is asked with the role and caches per role, and static grants name roles.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType, web

from relay.auth.access import AccessPolicy, AccessRole, OrgMembershipBackend
from relay.auth.devissuer import mint_token
from relay.auth.hostid import parse_host_id
from relay.auth.tokens import MAX_AGENT_HOSTS, build_verifier
from relay.config import Config, load_config
from relay.errors import CloseCode, ErrorCode, Forbidden
from tests.harness import (
    RunningRelay,
    Stack,
    agent_token,
    eventually,
    start_agent,
    start_host,
    start_relay,
    write_config,
)
from tests.test_cli import relay_cli

HOST = "acme:laptop"
REAL_HELLO = {"hello": "from the host service"}


async def tunnel_refusal(client: aiohttp.ClientSession, relay: RunningRelay, host_id: str,
                         token: str) -> tuple[int | None, str]:
    """Open /tunnel for ``host_id`` with ``token``; the close code and reason it gets."""
    async with client.ws_connect(f"{relay.ws_url}/tunnel?hostId={host_id}&v=1",
                                 headers={"Authorization": f"Bearer {token}"}) as ws:
        msg = await ws.receive(timeout=5)
        if msg.type is WSMsgType.BINARY:
            return None, "accepted"  # the relay's HELLO: registered
        assert msg.type is WSMsgType.CLOSE, msg
        return ws.close_code, str(msg.extra or "")


def impostor_app() -> web.Application:
    async def anything(request: web.Request) -> web.Response:
        return web.json_response({"hello": "from the impostor"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


# -- the org backend --------------------------------------------------------------------------

async def test_org_member_without_the_agent_claim_is_refused_4403_with_a_reason(
    full_stack: Stack,
) -> None:
    code, reason = await tunnel_refusal(full_stack.client, full_stack.relay, "acme:desk",
                                        full_stack.token(sub="mallory"))
    assert code == CloseCode.FORBIDDEN
    assert reason == ("token may not serve acme:desk (no relayHosts claim for it); "
                      "mint an agent token")
    assert full_stack.relay.state.registry.get("acme:desk") is None


async def test_an_org_member_cannot_replace_the_real_agent(full_stack: Stack) -> None:
    """The hijack: a colleague's agent, pointed at their own service, registers the real host.

    It must be refused, and the real agent's tunnel must stay and keep serving the real host.
    """
    state = full_stack.relay.state
    real_tunnel = state.registry.get(HOST)
    assert real_tunnel is not None
    impostor_host = await start_host(impostor_app())
    impostor = await start_agent(full_stack.relay.ws_url, HOST, impostor_host.url,
                                 token=full_stack.token(sub="mallory"), wait=False)
    try:
        await eventually(lambda: impostor.agent.last_outcome is not None)
        outcome = impostor.agent.last_outcome
        assert outcome is not None and outcome.code == CloseCode.FORBIDDEN
        assert "may not serve acme:laptop" in outcome.close_reason
        assert not impostor.agent.connected_event.is_set()
        # The real agent was never told to leave, and every request reaches the real host.
        assert state.registry.get(HOST) is real_tunnel
        assert full_stack.agent.agent.last_outcome is None
        assert full_stack.agent.agent.connects == 1
        for _ in range(5):
            async with full_stack.client.get(full_stack.url("/"),
                                             headers=full_stack.auth()) as resp:
                assert resp.status == 200
                assert await resp.json() == REAL_HELLO
    finally:
        await impostor.stop()
        await impostor_host.stop()


async def test_the_agent_claim_for_the_host_or_its_org_lets_an_agent_serve(
    full_stack: Stack,
) -> None:
    relay = full_stack.relay
    # Exact host id (what the harness gives its agent) and an org wildcard both work.
    for host_id, claim in (("acme:desk", "acme:desk"), ("acme:any-box", "acme:*")):
        token = agent_token(relay.config, claim, sub="bob")
        agent = await start_agent(relay.ws_url, host_id, full_stack.host.url, token=token)
        try:
            async with full_stack.client.get(f"{relay.url}/hosts/{host_id}/",
                                             headers=full_stack.auth()) as resp:
                assert resp.status == 200
                assert await resp.json() == REAL_HELLO
        finally:
            await agent.stop()


async def test_a_claim_for_another_host_or_org_does_not_cover_this_one(full_stack: Stack) -> None:
    relay = full_stack.relay
    real_tunnel = relay.state.registry.get(HOST)
    other_host = relay.agent_token("acme:desk", sub="mallory")
    code, reason = await tunnel_refusal(full_stack.client, relay, HOST, other_host)
    assert code == CloseCode.FORBIDDEN and "may not serve acme:laptop" in reason
    # A wildcard for another org, even with both orgs in the token, does not cover acme.
    other_org = mint_token(relay.config, "mallory", ["acme", "globex"], agent_hosts=["globex:*"])
    code, _ = await tunnel_refusal(full_stack.client, relay, HOST, other_org)
    assert code == CloseCode.FORBIDDEN
    # The claim never widens the org short-circuit: a claim outside the token's orgs is moot.
    outside = mint_token(relay.config, "mallory", ["globex"], extra={"relayHosts": [HOST]})
    code, reason = await tunnel_refusal(full_stack.client, relay, HOST, outside)
    assert code == CloseCode.FORBIDDEN and "organisation" in reason
    assert relay.state.registry.get(HOST) is real_tunnel
    async with full_stack.client.get(full_stack.url("/"), headers=full_stack.auth()) as resp:
        assert await resp.json() == REAL_HELLO


async def test_an_agent_token_is_still_a_client_token(full_stack: Stack) -> None:
    """The claim adds serving; it takes nothing away from calling."""
    token = full_stack.agent_token(HOST)
    async with full_stack.client.get(full_stack.url("/"), headers=full_stack.auth(token)) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("claim", [
    {"acme:laptop": True}, 42, None, True, [["acme:laptop"]], [{"host": "acme:laptop"}],
    ["acme/laptop", "*:*", "acme:", ":laptop", "acme:lap:top", "a" * 5000, 7, None],
])
async def test_hostile_agent_claims_grant_nothing_and_never_raise(
    tmp_path: Path, claim: Any
) -> None:
    config = load_config(write_config(tmp_path), env={})
    verifier = build_verifier(config)
    await verifier.start()
    try:
        identity = await verifier.verify(
            mint_token(config, "alice", ["acme"], extra={"relayHosts": claim}))
        assert not identity.may_serve(parse_host_id(HOST))
        assert not identity.agent_hosts
        policy = AccessPolicy(OrgMembershipBackend())
        with pytest.raises(Forbidden) as info:
            await policy.check(identity, parse_host_id(HOST), "t", role=AccessRole.AGENT)
        assert info.value.code == ErrorCode.NOT_REGISTERED
        assert await policy.check(identity, parse_host_id(HOST), "t",
                                  role=AccessRole.CLIENT) == "local"
    finally:
        await verifier.close()


async def test_agent_claim_parsing_is_bounded_and_keeps_the_good_entries(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, {"auth": {"agent_claim": "example-io:hosts"}}),
                         env={})
    verifier = build_verifier(config)
    await verifier.start()
    try:
        many = [f"acme:m{i}" for i in range(MAX_AGENT_HOSTS + 50)]
        identity = await verifier.verify(mint_token(
            config, "alice", ["acme"], extra={"example-io:hosts": [{"x": 1}, "bad/one", *many]}))
        assert identity.may_serve(parse_host_id("acme:m0"))
        assert not identity.may_serve(parse_host_id(f"acme:m{MAX_AGENT_HOSTS + 10}"))
        assert len(identity.agent_hosts.exact) == MAX_AGENT_HOSTS - 2
        # One string is read as a one-entry list; the configured claim name is the one used.
        single = await verifier.verify(mint_token(
            config, "alice", ["acme"], extra={"example-io:hosts": "acme:*"}))
        assert single.may_serve(parse_host_id("acme:whatever"))
        ignored = await verifier.verify(mint_token(
            config, "alice", ["acme"], extra={"relayHosts": ["acme:*"]}))
        assert not ignored.agent_hosts
    finally:
        await verifier.close()


# -- the upstream backend: role in the request, decisions cached per role ----------------------

@dataclass
class CheckAccess:
    """A real checkAccess service: counts calls, refuses serving to the tokens in ``no_serve``."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    no_serve: set[str] = field(default_factory=set)

    async def handle(self, request: web.Request) -> web.Response:
        payload = await request.json()
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        sub = jwt.decode(token, options={"verify_signature": False})["sub"]
        self.calls.append((sub, payload))
        allowed = not (payload.get("role") == "agent" and sub in self.no_serve)
        return web.json_response({"allowed": allowed})

    def count(self, sub: str, role: str) -> int:
        return sum(1 for s, p in self.calls if s == sub and p.get("role") == role)


@pytest.fixture
async def upstream_relay(tmp_path: Path) -> AsyncIterator[tuple[RunningRelay, CheckAccess, str]]:
    check = CheckAccess(no_serve={"mallory"})
    app = web.Application()
    app.router.add_post("/checkAccess", check.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    config = load_config(write_config(tmp_path, {"access": {
        "backend": "upstream", "upstream_url": f"http://127.0.0.1:{port}/checkAccess",
    }}), env={})
    relay = await start_relay(config)
    host = await start_host()
    try:
        yield relay, check, host.url
    finally:
        await relay.stop()
        await host.stop()
        await runner.cleanup()


async def test_upstream_is_asked_with_the_role_and_caches_per_role(
    upstream_relay: tuple[RunningRelay, CheckAccess, str],
) -> None:
    relay, check, host_url = upstream_relay
    # With the upstream backend the upstream decides who serves: no claim needed.
    agent = await start_agent(relay.ws_url, HOST, host_url, token=relay.token(sub="alice"))
    try:
        assert check.calls == [("alice", {"hostId": HOST, "role": "agent"})]
        async with aiohttp.ClientSession() as client:
            for _ in range(3):
                async with client.get(f"{relay.url}/hosts/{HOST}/",
                                      headers={"Authorization":
                                               f"Bearer {relay.token(sub='alice')}"}) as resp:
                    assert resp.status == 200
            # The agent's allow did not answer for the client: one call per role, then cache.
            assert check.count("alice", "client") == 1
            assert check.count("alice", "agent") == 1

            mallory = relay.token(sub="mallory")
            async with client.get(f"{relay.url}/hosts/{HOST}/",
                                  headers={"Authorization": f"Bearer {mallory}"}) as resp:
                assert resp.status == 200  # may call the host ...
            for _ in range(2):  # ... may not serve it; the denial is cached for the agent role
                code, _ = await tunnel_refusal(client, relay, HOST, mallory)
                assert code == CloseCode.FORBIDDEN
            assert check.count("mallory", "client") == 1
            assert check.count("mallory", "agent") == 1
            assert agent.agent.last_outcome is None  # the real agent was never replaced

            # Revoking a subject forgets both roles' decisions.
            assert relay.state.access is not None
            assert relay.state.access.revoke(sub="alice") == 2
            async with client.get(f"{relay.url}/hosts/{HOST}/",
                                  headers={"Authorization":
                                           f"Bearer {relay.token(sub='alice')}"}) as resp:
                assert resp.status == 200
            assert check.count("alice", "client") == 2
    finally:
        await agent.stop()


async def test_concurrent_misses_single_flight_per_role(
    upstream_relay: tuple[RunningRelay, CheckAccess, str],
) -> None:
    relay, check, _ = upstream_relay
    access = relay.state.access
    verifier = relay.state.verifier
    assert access is not None and verifier is not None
    token = relay.token(sub="carol")
    identity = await verifier.verify(token)
    host = parse_host_id(HOST)
    checks = [access.check(identity, host, token, role=role)
              for role in (AccessRole.CLIENT, AccessRole.AGENT) for _ in range(10)]
    assert set(await asyncio.gather(*checks)) <= {"upstream", "cache"}
    assert check.count("carol", "client") == 1
    assert check.count("carol", "agent") == 1


# -- the static backend: grants name roles -----------------------------------------------------

async def test_static_grants_by_role(tmp_path: Path) -> None:
    (tmp_path / "grants.json").write_text(json.dumps({"grants": [
        {"sub": "alice", "hosts": [HOST], "roles": ["client", "agent"]},
        {"sub": "bob", "hosts": ["acme:*"]},  # the old format: a client grant only
        {"sub": "dave", "hosts": [HOST], "roles": ["agent"]},
    ]}))
    config = load_config(write_config(tmp_path, {"access": {
        "backend": "static", "static_grants_file": "grants.json"}}), env={})
    relay = await start_relay(config)
    host = await start_host()
    # No agent claim: with static grants the grants file decides who serves.
    agent = await start_agent(relay.ws_url, HOST, host.url, token=relay.token(sub="alice"))
    try:
        async with aiohttp.ClientSession() as client:
            for sub, status in (("alice", 200), ("bob", 200), ("dave", 403)):
                async with client.get(f"{relay.url}/hosts/{HOST}/", headers={
                        "Authorization": f"Bearer {relay.token(sub=sub)}"}) as resp:
                    assert resp.status == status, sub
            code, reason = await tunnel_refusal(client, relay, HOST, relay.token(sub="bob"))
            assert code == CloseCode.FORBIDDEN
            assert reason == ("token may not serve acme:laptop (no agent grant for it); "
                              "ask for an agent grant")
            code, _ = await tunnel_refusal(client, relay, "acme:desk", relay.token(sub="dave"))
            assert code == CloseCode.FORBIDDEN  # dave's agent grant is for acme:laptop only
            assert agent.agent.last_outcome is None
    finally:
        await agent.stop()
        await relay.stop()
        await host.stop()


def test_static_grants_with_a_bad_role_are_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "grants.toml").write_text(
        '[[grants]]\nsub = "alice"\nhosts = ["acme:laptop"]\nroles = ["owner"]\n')
    path = write_config(tmp_path, {"access": {"backend": "static",
                                              "static_grants_file": "grants.toml"}})
    result = relay_cli("serve", "--config", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]  # after the dev banner: the one error line
    assert last.startswith("relay: config error: ")
    assert "access.static_grants_file" in last and "'owner'" in last


# -- relay token --agent-host -------------------------------------------------------------------

async def test_relay_token_agent_host_mints_a_token_an_agent_registers_with(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path)
    result = relay_cli("token", "--config", str(path), "--sub", "me", "--org", "acme",
                       "--agent-host", HOST, "--agent-host", "acme:*")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert jwt.decode(token, options={"verify_signature": False})["relayHosts"] == [
        HOST, "acme:*"]
    plain = relay_cli("token", "--config", str(path), "--sub", "me", "--org", "acme")
    assert "relayHosts" not in jwt.decode(plain.stdout.strip(),
                                          options={"verify_signature": False})
    relay = await start_relay(load_config(path, env={}))
    try:
        async with aiohttp.ClientSession() as client:
            assert await tunnel_refusal(client, relay, HOST, token) == (None, "accepted")
            code, _ = await tunnel_refusal(client, relay, HOST, plain.stdout.strip())
            assert code == CloseCode.FORBIDDEN
    finally:
        await relay.stop()


@pytest.mark.parametrize("value, needle", [
    ("acme", "not a host id"), ("acme:lap/top", "not a host id"), ("*:*", "not a host id"),
    ("acme:", "not a host id"), ("globex:box", "outside the token's organisations"),
])
def test_relay_token_refuses_a_bad_agent_host_in_one_line(
    tmp_path: Path, value: str, needle: str
) -> None:
    path = write_config(tmp_path)
    result = relay_cli("token", "--config", str(path), "--sub", "me", "--org", "acme",
                       "--agent-host", value)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert needle in result.stderr and "agent host" in result.stderr


def test_config_refuses_an_empty_agent_claim(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"auth": {"agent_claim": ""}})
    result = relay_cli("check-config", "--config", str(path))
    assert result.returncode == 2 and "auth.agent_claim" in result.stderr


def test_the_default_agent_claim_is_relayhosts() -> None:
    assert Config().auth.agent_claim == "relayHosts"
