"""The admin API on its own listener, and wrong secrets throttled per peer address."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp

from relay.config import load_config
from relay.server.throttle import FailureThrottle
from tests.clock import FakeClock
from tests.harness import PYTHON, REPO, free_port, start_relay, write_config

SECRET = "s3cret-admin-value-for-tests"


def test_throttle_locks_a_peer_out_after_n_failures_in_the_window() -> None:
    clock = FakeClock()
    throttle = FailureThrottle(max_failures=3, window_s=60, lockout_s=30, clock=clock)
    assert throttle.failed("a") is None and throttle.failed("a") is None
    assert throttle.failed("a") == 30
    assert throttle.retry_after("a") == 30
    assert throttle.retry_after("b") is None  # another address is not affected
    clock.advance(29.5)
    assert throttle.retry_after("a") == 1
    clock.advance(1)
    assert throttle.retry_after("a") is None
    assert throttle.failed("a") is None  # a fresh window after the lockout


def test_throttle_forgets_failures_outside_the_window_and_on_success() -> None:
    clock = FakeClock()
    throttle = FailureThrottle(max_failures=2, window_s=10, lockout_s=5, clock=clock)
    throttle.failed("a")
    clock.advance(11)
    assert throttle.failed("a") is None  # the first one is out of the window
    throttle.succeeded("a")
    assert throttle.failed("a") is None


def test_throttle_memory_is_bounded() -> None:
    throttle = FailureThrottle(max_failures=5, window_s=60, lockout_s=60, clock=FakeClock(),
                               max_peers=100)
    for i in range(10_000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(throttle) == 100


async def test_admin_listener_serves_admin_and_metrics_and_the_public_port_does_not(
    tmp_path: Path,
) -> None:
    admin_port = free_port()
    config = load_config(write_config(tmp_path, {
        "admin": {"secret": SECRET, "listen": f"127.0.0.1:{admin_port}", "max_failures": 3,
                  "lockout_s": 30},
    }), env={})
    relay = await start_relay(config)
    auth = {"Authorization": f"Bearer {SECRET}"}
    try:
        async with aiohttp.ClientSession() as client:
            for path in ("/admin/tunnels", "/metrics"):
                async with client.get(f"{relay.url}{path}", headers=auth) as resp:
                    assert resp.status == 404, path
                    assert (await resp.json())["error"]["code"] == "not_found"
            async with client.get(f"{relay.admin_url}/admin/tunnels", headers=auth) as resp:
                assert resp.status == 200
                assert (await resp.json())["tunnels"] == []
            async with client.get(f"{relay.admin_url}/metrics") as resp:
                assert resp.status == 200 and "relay_" in await resp.text()
            async with client.get(f"{relay.url}/readyz") as resp:
                assert resp.status == 200  # health stays on the public port for balancers

            # Three wrong secrets from 127.0.0.1: locked out, the right secret included.
            wrong = {"Authorization": "Bearer guess"}
            statuses = []
            for _ in range(4):
                async with client.get(f"{relay.admin_url}/admin/tunnels", headers=wrong) as resp:
                    statuses.append(resp.status)
                    retry_after = resp.headers.get("Retry-After")
            assert statuses == [401, 401, 429, 429]
            assert retry_after is not None and 0 < int(retry_after) <= 30
            async with client.get(f"{relay.admin_url}/admin/tunnels", headers=auth) as resp:
                assert resp.status == 429
                assert (await resp.json())["error"]["code"] == "rate_limited"

        # The right secret from another address still works.
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with (
            aiohttp.ClientSession(connector=connector) as other,
            other.get(f"{relay.admin_url}/admin/tunnels", headers=auth) as resp,
        ):
            assert resp.status == 200
    finally:
        await relay.stop()


async def test_relay_status_finds_the_admin_listener_from_the_config(tmp_path: Path) -> None:
    admin_port = free_port()
    path = write_config(tmp_path, {"admin": {"secret": SECRET,
                                             "listen": f"127.0.0.1:{admin_port}"}})
    relay = await start_relay(load_config(path, env={}))
    try:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "relay", "status", "--config", str(path), cwd=str(REPO), env=clean,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await relay.stop()
    assert proc.returncode == 0, err.decode()
    assert "0 tunnels" in out.decode()


def test_admin_listen_is_validated(tmp_path: Path) -> None:
    import pytest

    from relay.errors import ConfigError

    for value, problem in (("9091", "host:port"), ("127.0.0.1:x", "host:port"),
                           ("10.0.0.5:9091", "loopback"), ("127.0.0.1:0", "port")):
        with pytest.raises(ConfigError, match=problem) as caught:
            load_config(write_config(tmp_path, {"admin": {"listen": value}}), env={})
        assert caught.value.key == "admin.listen"
    config = load_config(write_config(tmp_path, {"admin": {"listen": "[::1]:9091"}}), env={})
    assert config.admin.listen == "[::1]:9091"


async def test_behind_a_trusted_proxy_failures_count_per_forwarded_client(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, {
        "server": {"trust_forwarded": True},
        "admin": {"secret": SECRET, "max_failures": 2, "lockout_s": 30},
    }), env={})
    relay = await start_relay(config)
    url = f"{relay.url}/admin/tunnels"
    try:
        async with aiohttp.ClientSession() as client:
            # The proxy appends the address it saw: the last entry is the client.
            for expected in (401, 429):
                async with client.get(url, headers={"Authorization": "Bearer guess",
                                                    "X-Forwarded-For": "9.9.9.9, 1.1.1.1"}) as r:
                    assert r.status == expected
            async with client.get(url, headers={"Authorization": f"Bearer {SECRET}",
                                                "X-Forwarded-For": "2.2.2.2"}) as resp:
                assert resp.status == 200  # everyone behind the same proxy is not locked out
    finally:
        await relay.stop()
