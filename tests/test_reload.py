"""Reload on SIGHUP: what changes live, what is reported as needing a restart, what a bad file does.

Process tests send a real SIGHUP to ``python -m relay serve`` and read its JSON log file;
in-process tests call :meth:`Lifecycle.reload` on a running relay's state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay.auth.devissuer import mint_token
from relay.config import load_config
from relay.server.lifecycle import RELOADABLE, Lifecycle
from tests.harness import (
    RunningRelay,
    agent_token,
    eventually,
    free_port,
    spawn_relay_process,
    start_agent,
    start_host,
    start_relay,
    wait_http,
    write_config,
)
from tests.test_drain import events_named, stop_process, wait_exit

START_TIMEOUT_S = 15.0


def base_sections(port: int, **overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {
        "server": {"port": port, "drain_grace_s": 5},
        "log": {"level": "info"},
    }
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    return sections


async def wait_event(log_file: Path, name: str, count: int = 1) -> None:
    await eventually(lambda: len(events_named(log_file, name)) >= count, timeout=5.0)


async def test_sighup_changes_the_log_level_and_reports_keys_needing_a_restart(
    tmp_path: Path,
) -> None:
    port = free_port()
    config_path = write_config(tmp_path, base_sections(port))
    config = load_config(config_path, env={})
    expired = mint_token(config, "alice", ["acme"], ttl_s=60, now=time.time() - 3600)
    log_file = tmp_path / "relay.log"
    proc = spawn_relay_process(config_path, log_file=log_file)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_http(f"{url}/readyz", timeout=START_TIMEOUT_S)
        async with aiohttp.ClientSession() as client:
            # An expired token is refused with a debug-level log line: invisible at info.
            async with client.get(f"{url}/hosts/acme:laptop/",
                                  headers={"Authorization": f"Bearer {expired}"}) as resp:
                assert resp.status == 401
            # The refusal's own info line is written after the rejection's debug one would be.
            await wait_event(log_file, "http.refused")
            assert not events_named(log_file, "auth.token_rejected")

            other_port = free_port()
            write_config(tmp_path, base_sections(
                other_port,
                log={"level": "debug"},
                access={"allow_ttl_s": 60},
                tunnel={"ping_interval_s": 2},
            ))
            proc.send_signal(signal.SIGHUP)
            await wait_event(log_file, "relay.reloaded")
            reloaded = events_named(log_file, "relay.reloaded")[0]
            assert set(reloaded["applied"]) == {"log.level", "access.allow_ttl_s"}
            assert {"server.port", "tunnel.ping_interval_s"} <= set(reloaded["needs_restart"])
            assert "server.port" in events_named(log_file, "relay.restart_required")[0]["keys"]

            # Debug events appear from now on; the port did not change under the running relay.
            async with client.get(f"{url}/hosts/acme:laptop/",
                                  headers={"Authorization": f"Bearer {expired}"}) as resp:
                assert resp.status == 401
            await wait_event(log_file, "auth.token_rejected")
            rejected = events_named(log_file, "auth.token_rejected")[0]
            assert rejected["level"] == "debug" and rejected["reason"] == "expired"
            assert expired not in log_file.read_text()
            assert proc.poll() is None
    finally:
        stop_process(proc)


async def test_broken_config_on_sighup_is_logged_and_the_old_one_kept(tmp_path: Path) -> None:
    port = free_port()
    config_path = write_config(tmp_path, base_sections(port, log={"level": "debug"}))
    config = load_config(config_path, env={})
    token = mint_token(config, "alice", ["acme"])
    expired = mint_token(config, "alice", ["acme"], ttl_s=60, now=time.time() - 3600)
    log_file = tmp_path / "relay.log"
    proc = spawn_relay_process(config_path, log_file=log_file)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_http(f"{url}/readyz", timeout=START_TIMEOUT_S)
        for broken, problem in [
            ("[server\nport = 1\n", "not valid TOML"),
            ('[log]\nlevel = "warning"\nformat = "loud"\n', "log.format"),
        ]:
            config_path.write_text(broken)
            count = len(events_named(log_file, "relay.reload_failed")) + 1
            proc.send_signal(signal.SIGHUP)
            await wait_event(log_file, "relay.reload_failed", count=count)
            failed = events_named(log_file, "relay.reload_failed")[-1]
            assert failed["level"] == "error"
            assert str(config_path) in failed["error"] and problem in failed["error"]
        assert not events_named(log_file, "relay.reloaded")
        assert proc.poll() is None
        async with aiohttp.ClientSession() as client:
            async with client.get(f"{url}/readyz") as resp:
                assert resp.status == 200
            async with client.get(f"{url}/hosts/acme:laptop/",
                                  headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 503
                assert (await resp.json())["error"]["code"] == "host_offline"
            # Still at the old config's debug level: the broken file's "warning" never applied.
            async with client.get(f"{url}/hosts/acme:laptop/",
                                  headers={"Authorization": f"Bearer {expired}"}) as resp:
                assert resp.status == 401
        await wait_event(log_file, "auth.token_rejected")
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, within=10) == 0
    finally:
        stop_process(proc)


async def test_reloaded_drain_grace_is_the_one_sigterm_uses(tmp_path: Path) -> None:
    """drain_grace_s is reloadable: a shortened grace must bound the next drain."""
    port = free_port()
    config_path = write_config(tmp_path, base_sections(
        port, server={"drain_grace_s": 60}, tunnel={"request_timeout_s": 60}))
    config = load_config(config_path, env={})
    token = mint_token(config, "alice", ["acme"])
    log_file = tmp_path / "relay.log"
    proc = spawn_relay_process(config_path, log_file=log_file)
    host = await start_host()
    agent = None
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_http(f"{url}/readyz", timeout=START_TIMEOUT_S)
        agent = await start_agent(f"ws://127.0.0.1:{port}", "acme:laptop", host.url,
                                  token=agent_token(config, "acme:laptop"))
        write_config(tmp_path, base_sections(
            port, server={"drain_grace_s": 0.2}, tunnel={"request_timeout_s": 60}))
        proc.send_signal(signal.SIGHUP)
        await wait_event(log_file, "relay.reloaded")
        assert events_named(log_file, "relay.reloaded")[0]["applied"] == ["server.drain_grace_s"]
        async with aiohttp.ClientSession() as client:
            slow = asyncio.ensure_future(client.get(
                f"{url}/hosts/acme:laptop/slow?delay=30",
                headers={"Authorization": f"Bearer {token}"}))
            session = agent.agent.session
            assert session is not None
            await eventually(lambda: len(session.channels) == 1)
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            assert await wait_exit(proc, within=6) == 0
            assert time.monotonic() - started < 6
            slow.cancel()
        assert events_named(log_file, "relay.draining")[0]["grace_s"] == 0.2
    finally:
        stop_process(proc)
        if agent is not None:
            await agent.stop()
        await host.stop()


# -- in process: Lifecycle.reload on a running relay ---------------------------------------------


class CheckAccess:
    """A checkAccess upstream that allows everything and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        return web.json_response({"allowed": True})


@pytest.fixture
async def check_access() -> AsyncIterator[tuple[CheckAccess, str]]:
    upstream = CheckAccess()
    app = web.Application()
    app.router.add_post("/checkAccess", upstream.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield upstream, str(server.make_url("/checkAccess"))
    finally:
        await server.close()


async def get_status(relay: RunningRelay, token: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as client, client.get(
        f"{relay.url}/hosts/acme:laptop/", headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        body = await resp.json()
        return resp.status, body["error"]["code"]


async def test_access_ttl_change_applies_to_cached_decisions(
    tmp_path: Path, check_access: tuple[CheckAccess, str]
) -> None:
    upstream, upstream_url = check_access
    port = free_port()
    sections: dict[str, dict[str, Any]] = {
        "server": {"port": port},
        "access": {"backend": "upstream", "upstream_url": upstream_url, "allow_ttl_s": 900},
    }
    config_path = write_config(tmp_path, sections)
    relay = await start_relay(load_config(config_path, env={}))
    try:
        lifecycle = Lifecycle(relay.state, str(config_path))
        token = relay.token()
        # No tunnel: the access decision is made (and cached), then 503 host_offline.
        assert await get_status(relay, token) == (503, "host_offline")
        assert await get_status(relay, token) == (503, "host_offline")
        assert upstream.calls == 1  # cached for 900 s

        sections["access"]["allow_ttl_s"] = 0.05
        write_config(tmp_path, sections)
        await lifecycle.reload()
        assert relay.state.config.access.allow_ttl_s == 0.05
        # The entry cached under the old TTL expires by the new one: asked again, once.
        deadline = time.monotonic() + 5
        while upstream.calls < 2:
            assert time.monotonic() < deadline, "the decision cached for 900 s never expired"
            assert await get_status(relay, token) == (503, "host_offline")
            await asyncio.sleep(0.01)
        assert upstream.calls == 2
        await lifecycle.close()
    finally:
        await relay.stop()


def write_public_key(path: Path, key: Ed25519PrivateKey) -> None:
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


async def test_key_material_reloads_both_a_new_file_and_a_file_changed_in_place(
    tmp_path: Path,
) -> None:
    old_key, new_key, newest_key = (Ed25519PrivateKey.generate() for _ in range(3))
    write_public_key(tmp_path / "old.pem", old_key)
    write_public_key(tmp_path / "new.pem", new_key)
    port = free_port()
    sections: dict[str, dict[str, Any]] = {
        "server": {"port": port},
        "auth": {"mode": "public_key", "public_key_file": "old.pem",
                 "issuer": "https://idp.test/", "audience": "relay", "algorithms": ["EdDSA"]},
    }
    config_path = write_config(tmp_path, sections)
    config = load_config(config_path, env={})
    relay = await start_relay(config)
    try:
        def token(key: Ed25519PrivateKey) -> str:
            return mint_token(config, "alice", ["acme"], key=key)

        lifecycle = Lifecycle(relay.state, str(config_path))
        assert (await get_status(relay, token(old_key)))[0] == 503  # accepted: host offline
        assert await get_status(relay, token(new_key)) == (401, "unauthorized")

        sections["auth"]["public_key_file"] = "new.pem"
        write_config(tmp_path, sections)
        await lifecycle.reload()
        assert await get_status(relay, token(old_key)) == (401, "unauthorized")
        assert (await get_status(relay, token(new_key)))[0] == 503

        # Rotated in place (same path, no config change): a SIGHUP re-reads it.
        write_public_key(tmp_path / "new.pem", newest_key)
        await lifecycle.reload()
        assert await get_status(relay, token(new_key)) == (401, "unauthorized")
        assert (await get_status(relay, token(newest_key)))[0] == 503

        # A key file that is not a key: the keys in use stay, and the relay keeps serving.
        (tmp_path / "new.pem").write_text("not a key")
        await lifecycle.reload()
        assert (await get_status(relay, token(newest_key)))[0] == 503
        await lifecycle.close()
    finally:
        await relay.stop()


async def test_admin_secret_can_be_set_and_rotated_by_reload(tmp_path: Path) -> None:
    port = free_port()
    config_path = write_config(tmp_path, {"server": {"port": port}})
    relay = await start_relay(load_config(config_path, env={}))
    try:
        lifecycle = Lifecycle(relay.state, str(config_path))
        url = f"{relay.url}/admin/tunnels"
        async with aiohttp.ClientSession() as client:
            async with client.get(url, headers={"Authorization": "Bearer first-secret"}) as resp:
                assert resp.status == 404
            for secret in ("first-secret", "second-secret"):
                write_config(tmp_path, {"server": {"port": port}, "admin": {"secret": secret}})
                await lifecycle.reload()
                async with client.get(url, headers={"Authorization": f"Bearer {secret}"}) as resp:
                    assert resp.status == 200
            async with client.get(url, headers={"Authorization": "Bearer first-secret"}) as resp:
                assert resp.status == 401
        await lifecycle.close()
    finally:
        await relay.stop()


def test_reloadable_keys_exist_in_the_config() -> None:
    from relay.config import SECTIONS

    for key in RELOADABLE:
        section, name = key.split(".")
        assert name in {f.name for f in dataclasses.fields(SECTIONS[section])}, key
