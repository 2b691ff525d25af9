"""The operator API (``/admin``) and ``relay status``.

A real relay, host service and agent on loopback, with the ``upstream`` access backend pointed at
a real checkAccess server the test can flip from allow to deny and that counts its calls, so a
revocation is seen taking effect on the very next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from relay.config import load_config
from relay.errors import CloseCode, DirectoryUnavailable
from relay.metrics import DisconnectReason
from tests.harness import (
    PYTHON,
    REPO,
    RunningAgent,
    RunningHost,
    RunningRelay,
    eventually,
    start_agent,
    start_host,
    start_relay,
    write_config,
)

SECRET = "s3cret-admin-token-for-tests"
HOST_ID = "acme:laptop"


class CheckAccess:
    """checkAccess upstream: one ``allowed`` answer for every caller; records each hostId asked."""

    def __init__(self) -> None:
        self.allowed = True
        self.calls: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(body["hostId"])
        return web.json_response({"allowed": self.allowed})


@dataclass
class Setup:
    relay: RunningRelay
    host: RunningHost
    agent: RunningAgent
    upstream: CheckAccess
    client: aiohttp.ClientSession

    def admin(self, secret: str | None = SECRET) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret}"} if secret else {}

    async def get_host(self, sub: str) -> tuple[int, Any]:
        token = self.relay.token(sub=sub)
        async with self.client.get(f"{self.relay.url}/hosts/{HOST_ID}/",
                                   headers={"Authorization": f"Bearer {token}"}) as resp:
            return resp.status, await resp.json()

    async def revoke(self, body: Any) -> tuple[int, Any]:
        async with self.client.post(f"{self.relay.url}/admin/revoke", json=body,
                                    headers=self.admin()) as resp:
            return resp.status, await resp.json()

    async def tunnels(self) -> dict[str, Any]:
        async with self.client.get(f"{self.relay.url}/admin/tunnels",
                                   headers=self.admin()) as resp:
            assert resp.status == 200
            return dict(await resp.json())


@contextlib.asynccontextmanager
async def setup(tmp_path: Path, secret: str = SECRET) -> AsyncIterator[Setup]:
    upstream = CheckAccess()
    upstream_app = web.Application()
    upstream_app.router.add_post("/checkAccess", upstream.handle)
    server = TestServer(upstream_app, host="127.0.0.1")
    await server.start_server()
    config = load_config(write_config(tmp_path, {
        "access": {"backend": "upstream", "upstream_url": str(server.make_url("/checkAccess"))},
        # Many deliberate wrong secrets below; throttling has its own tests.
        "admin": {"secret": secret, "max_failures": 1000},
    }), env={})
    relay = await start_relay(config)
    host = await start_host()
    # The agent's own tunnel is an access check too (sub "agent").
    agent = await start_agent(relay.ws_url, HOST_ID, host.url,
                              token=relay.agent_token(HOST_ID, sub="agent"))
    client = aiohttp.ClientSession()
    try:
        yield Setup(relay, host, agent, upstream, client)
    finally:
        await client.close()
        await agent.stop()
        await relay.stop()
        await host.stop()
        await server.close()


@pytest.fixture
async def admin_setup(tmp_path: Path) -> AsyncIterator[Setup]:
    async with setup(tmp_path) as running:
        yield running


ADMIN_ROUTES = [
    ("GET", "/admin/tunnels"),
    ("DELETE", f"/admin/tunnels/{HOST_ID}"),
    ("POST", "/admin/revoke"),
    ("GET", "/admin/"),
    ("GET", "/admin/anything/else"),
    ("POST", "/admin/tunnels"),
]


@pytest.mark.parametrize("auth", [None, SECRET, ""], ids=["no-header", "a-bearer", "empty"])
async def test_without_a_secret_every_admin_route_is_404(tmp_path: Path, auth: str | None) -> None:
    async with setup(tmp_path, secret="") as running:
        headers = {"Authorization": f"Bearer {auth}"} if auth is not None else {}
        for method, path in ADMIN_ROUTES:
            async with running.client.request(method, f"{running.relay.url}{path}",
                                              headers=headers, json={"sub": "x"}) as resp:
                assert resp.status == 404, (method, path)
                assert (await resp.json())["error"]["code"] == "not_found"
        # Nothing was done: the tunnel is still there.
        assert running.relay.state.registry.get(HOST_ID) is not None


async def test_wrong_or_missing_secret_is_401_json(admin_setup: Setup) -> None:
    url = f"{admin_setup.relay.url}/admin/tunnels"
    for headers in [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {SECRET}x"},
        {"Authorization": f"Bearer {SECRET[:-1]}"},
        {"Authorization": f"Basic {SECRET}"},
        {"Authorization": SECRET},
    ]:
        for method, path in ADMIN_ROUTES:
            async with admin_setup.client.request(method, f"{admin_setup.relay.url}{path}",
                                                  headers=headers) as resp:
                assert resp.status == 401, (headers, method, path)
                body = await resp.json()
                assert body["error"]["code"] == "unauthorized"
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    async with admin_setup.client.get(url, headers=admin_setup.admin()) as resp:
        assert resp.status == 200
    # The agent was never disconnected by the refused DELETEs.
    assert admin_setup.agent.agent.connects == 1


async def test_tunnel_list_has_the_operator_fields(admin_setup: Setup) -> None:
    # Some traffic, so the byte counters and stream counts mean something.
    status, _ = await admin_setup.get_host("alice")
    assert status == 200
    before = time.time()
    body = await admin_setup.tunnels()
    assert body["draining"] is False and body["instanceId"]
    [tunnel] = body["tunnels"]
    assert tunnel["hostId"] == HOST_ID
    assert tunnel["subject"] == "agent"
    assert before - 30 < tunnel["connectedSince"] <= before
    host, _, port = tunnel["peer"].rpartition(":")
    assert host == "127.0.0.1" and port.isdigit()
    assert tunnel["streams"] == 0
    assert tunnel["bytes_in"] > 0 and tunnel["bytes_out"] > 0
    assert 0 <= tunnel["lastInboundAgoS"] < 5
    assert "rtt_ms" in tunnel

    # An open stream shows up while it is open.
    token = admin_setup.relay.token()
    url = f"{admin_setup.relay.url}/hosts/{HOST_ID}/ws?token={token}"
    async with admin_setup.client.ws_connect(url) as ws:
        await ws.send_str("hi")
        await ws.receive(timeout=5)
        [tunnel] = (await admin_setup.tunnels())["tunnels"]
        assert tunnel["streams"] == 1


async def test_delete_disconnects_a_tunnel_and_the_agent_comes_back(admin_setup: Setup) -> None:
    relay, agent = admin_setup.relay, admin_setup.agent.agent
    old = relay.state.registry.get(HOST_ID)
    async with admin_setup.client.delete(f"{relay.url}/admin/tunnels/{HOST_ID}",
                                         headers=admin_setup.admin()) as resp:
        assert resp.status == 200
        assert await resp.json() == {"disconnected": HOST_ID}
    await eventually(lambda: agent.connects == 2, timeout=5)
    assert agent.last_outcome is not None and agent.last_outcome.code == CloseCode.GOING_AWAY
    # Counted as the operator's doing, under a label from the closed set (never the reason text).
    reasons = {sample.labels["reason"]: sample.value
               for family in relay.state.metrics.registry.collect()
               if family.name == "relay_tunnel_disconnects"
               for sample in family.samples if sample.name.endswith("_total")}
    assert reasons == {"operator": 1.0}, reasons
    assert set(reasons) <= {str(reason) for reason in DisconnectReason}
    new = relay.state.registry.get(HOST_ID)
    assert new is not None and new is not old
    [tunnel] = (await admin_setup.tunnels())["tunnels"]
    assert tunnel["hostId"] == HOST_ID
    status, _ = await admin_setup.get_host("alice")
    assert status == 200

    async with admin_setup.client.delete(f"{relay.url}/admin/tunnels/acme:nobody",
                                         headers=admin_setup.admin()) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"


async def test_revocation_takes_effect_on_the_next_request(admin_setup: Setup) -> None:
    upstream = admin_setup.upstream
    calls = len(upstream.calls)  # the agent's own tunnel check
    assert (await admin_setup.get_host("alice"))[0] == 200
    assert (await admin_setup.get_host("bob"))[0] == 200
    assert len(upstream.calls) == calls + 2

    # The upstream now denies everyone: the cached allows still apply (the cache works) ...
    upstream.allowed = False
    assert (await admin_setup.get_host("alice"))[0] == 200
    assert (await admin_setup.get_host("bob"))[0] == 200
    assert len(upstream.calls) == calls + 2

    # ... until a revocation for alice: her very next request asks the upstream and is denied.
    assert await admin_setup.revoke({"sub": "alice"}) == (
        200, {"revoked": 1, "sub": "alice", "hostId": None})
    status, body = await admin_setup.get_host("alice")
    assert (status, body["error"]["code"]) == (403, "not_registered")
    assert len(upstream.calls) == calls + 3
    assert (await admin_setup.get_host("bob"))[0] == 200  # bob's entry was not touched
    assert len(upstream.calls) == calls + 3

    # Denials are cached too, and a revocation (sub and host) drops them as well.
    upstream.allowed = True
    assert (await admin_setup.get_host("alice"))[0] == 403
    assert await admin_setup.revoke({"sub": "alice", "hostId": HOST_ID}) == (
        200, {"revoked": 1, "sub": "alice", "hostId": HOST_ID})
    assert (await admin_setup.get_host("alice"))[0] == 200
    assert len(upstream.calls) == calls + 4

    # Revoking by host drops every subject's entry for it (and the tunnel's own), and closes
    # the host's tunnel (4403): a connection never outlives the access it was granted under.
    upstream.allowed = False
    status, body = await admin_setup.revoke({"hostId": HOST_ID})
    assert status == 200 and body["revoked"] >= 2
    status, body = await admin_setup.get_host("bob")
    assert (status, body["error"]["code"]) == (403, "not_registered")
    agent = admin_setup.agent.agent
    await eventually(lambda: agent.last_outcome is not None
                     and agent.last_outcome.code == CloseCode.FORBIDDEN)


async def test_revoke_says_so_when_other_relays_could_not_be_told(admin_setup: Setup) -> None:
    directory = admin_setup.relay.state.directory
    assert directory is not None

    async def unavailable(sub: str | None, host: str | None) -> None:
        raise DirectoryUnavailable()

    assert (await admin_setup.get_host("alice"))[0] == 200
    admin_setup.upstream.allowed = False
    directory.publish_revocation = unavailable  # type: ignore[method-assign]
    status, body = await admin_setup.revoke({"sub": "alice"})
    assert (status, body["error"]["code"]) == (503, "directory_unavailable")
    assert "revoked on this relay" in body["error"]["message"]
    # ... and it was: the next request is decided by the upstream again.
    assert (await admin_setup.get_host("alice"))[0] == 403


@pytest.mark.parametrize("body", [
    b"not json", b"[1, 2]", b'"alice"', b"{}", b'{"sub": 5}', b'{"hostId": ["a"]}',
    b'{"sub": ""}', b'{"sub": null, "hostId": null}', b"\xff\xfe",
])
async def test_revoke_with_a_bad_body_is_400(admin_setup: Setup, body: bytes) -> None:
    async with admin_setup.client.post(f"{admin_setup.relay.url}/admin/revoke", data=body,
                                       headers=admin_setup.admin()) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "bad_request"


@pytest.mark.parametrize("host", ["laptop", "acme/laptop", "acme:lap%2Ftop", "a:b\n"])
async def test_revoke_with_a_malformed_host_id_is_400(admin_setup: Setup, host: str) -> None:
    status, body = await admin_setup.revoke({"hostId": host})
    assert (status, body["error"]["code"]) == (400, "invalid_host")


# -- relay status -------------------------------------------------------------------------------


async def relay_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m relay ...`` as a subprocess, without blocking the loop serving the relay."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "relay", *args, cwd=str(REPO), env={**clean, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_relay_status_prints_a_table(admin_setup: Setup) -> None:
    url = admin_setup.relay.url
    flag, from_env = await asyncio.gather(
        relay_cli("status", "--url", url, "--secret", SECRET),
        relay_cli("status", "--url", url, env={"RELAY_ADMIN_SECRET": SECRET}),
    )
    code, out, err = flag
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert "1 tunnels" in lines[0] and "serving" in lines[0]
    assert lines[1].split()[:3] == ["HOST", "CONNECTED", "PEER"]
    assert lines[2].split()[0] == HOST_ID
    assert "127.0.0.1:" in lines[2]

    # The secret from the environment works the same.
    code, out, _ = from_env
    assert code == 0 and HOST_ID in out


async def test_relay_status_json(admin_setup: Setup) -> None:
    code, out, _ = await relay_cli("status", "--url", admin_setup.relay.url, "--secret", SECRET,
                                   "--json")
    assert code == 0
    body = json.loads(out)
    assert [t["hostId"] for t in body["tunnels"]] == [HOST_ID]


async def test_relay_status_errors_are_one_line(admin_setup: Setup) -> None:
    url = admin_setup.relay.url
    # Side by side: independent processes, whose start-ups would otherwise add up.
    no_secret, wrong, unreachable = await asyncio.gather(
        relay_cli("status", "--url", url),
        relay_cli("status", "--url", url, "--secret", "wrong"),
        relay_cli("status", "--url", "http://127.0.0.1:1", "--secret", SECRET),
    )
    code, out, err = no_secret
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and "--secret" in err and "RELAY_ADMIN_SECRET" in err

    code, out, err = wrong
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and "401" in err
    assert "wrong" not in err

    code, out, err = unreachable
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and "cannot reach" in err
    assert "Traceback" not in err
