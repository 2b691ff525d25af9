"""The synthetic probe: a real in-process agent tunnels in through the public URL, one request.

The public URL goes through a real TCP balancer in front of the relay, as in production; taking
the balancer away is the broken path a probe exists to notice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.config import load_config
from relay.errors import ConfigError
from relay.probe import public_http_url
from relay.server.probe_guard import PROBE_ORG, probe_host_id
from tests.clock import SteppedSleep
from tests.harness import (
    LogCapture,
    RunningRelay,
    eventually,
    free_port,
    start_agent,
    start_host,
    start_relay,
    write_config,
)
from tests.tcp_balancer import FailoverBalancer

# The tests step the probe loop (tests.clock.SteppedSleep): one step, one probe. The interval
# is never waited for; the timeout is real, and far above a probe's loopback duration.
INTERVAL_S, TIMEOUT_S = 60.0, 10.0


def probe_sections(public_url: str, **extra: Any) -> dict[str, dict[str, Any]]:
    return {
        "probe": {"public_url": public_url, "interval_s": INTERVAL_S, "timeout_s": TIMEOUT_S,
                  **extra},
        "directory": {"instance_id": "relay-a"},
    }


def gauge(relay: RunningRelay, name: str, **labels: str) -> float | None:
    return relay.state.metrics.registry.get_sample_value(name, labels or None)


def events(capture: LogCapture, name: str) -> list[dict[str, Any]]:
    out = []
    for line in capture.text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == name:
            out.append(event)
    return out


async def test_probe_goes_from_0_to_1_through_the_balancer_and_back_to_0_when_it_is_gone(
    tmp_path: Path,
) -> None:
    port = free_port()
    balancer = FailoverBalancer([port])
    sections = probe_sections(f"ws://127.0.0.1:{balancer.port}")
    sections["server"] = {"port": port}
    config = load_config(write_config(tmp_path, sections), env={})
    probes = SteppedSleep()
    with LogCapture() as capture:
        relay = await start_relay(config, probe_sleep=probes.sleep)
        try:
            assert gauge(relay, "relay_probe_success") == 0
            await balancer.start()
            await probes.step(timeout_s=2 * TIMEOUT_S)
            assert gauge(relay, "relay_probe_success") == 1
            duration = gauge(relay, "relay_probe_duration_seconds")
            assert duration is not None and 0 < duration < TIMEOUT_S
            assert events(capture, "relay.probe_ok")
            # The probe's tunnel is gone again: it tears down after its one request.
            await eventually(lambda: relay.state.registry.get("relay-probe:relay-a") is None)

            await balancer.stop()
            await probes.step(timeout_s=2 * TIMEOUT_S)
            assert gauge(relay, "relay_probe_success") == 0
            failures = events(capture, "relay.probe_failed")
            assert failures and failures[-1]["reason"] == "connect_failed"
            assert failures[-1]["level"] == "warning"
            assert gauge(relay, "relay_probe_runs_total", result="failed")
        finally:
            await relay.stop()
            await balancer.stop()


async def test_a_wrong_public_url_reports_0_with_the_reason_in_the_log(tmp_path: Path) -> None:
    unused = free_port()
    config = load_config(write_config(tmp_path, probe_sections(f"ws://127.0.0.1:{unused}")),
                         env={})
    probes = SteppedSleep()
    with LogCapture() as capture:
        relay = await start_relay(config, probe_sleep=probes.sleep)
        try:
            await probes.step(timeout_s=2 * TIMEOUT_S)
            assert gauge(relay, "relay_probe_success") == 0
            failure = events(capture, "relay.probe_failed")[0]
            assert failure["reason"] == "connect_failed"
            assert failure["url"] == f"ws://127.0.0.1:{unused}"
            assert "duration_ms" in failure
            assert not events(capture, "relay.probe_ok")
        finally:
            await relay.stop()
    # Stopping the relay cancelled the probe's task.
    assert not [t for t in relay.state.tasks.tasks() if t.get_name() == "relay-probe"]


async def test_a_relay_that_refuses_the_probes_token_is_a_failure_with_the_close_code(
    tmp_path: Path,
) -> None:
    # The public URL leads to another relay, which does not trust this relay's dev issuer.
    (tmp_path / "other").mkdir()
    other = await start_relay(load_config(write_config(tmp_path / "other"), env={}))
    (tmp_path / "me").mkdir()
    config = load_config(write_config(tmp_path / "me", probe_sections(other.ws_url)), env={})
    probes = SteppedSleep()
    with LogCapture() as capture:
        relay = await start_relay(config, probe_sleep=probes.sleep)
        try:
            await probes.step(timeout_s=2 * TIMEOUT_S)
            assert events(capture, "relay.probe_failed")[0]["reason"] == "tunnel_closed_4401"
        finally:
            await relay.stop()
            await other.stop()


async def test_the_probe_org_is_reserved_for_the_probe_subject(tmp_path: Path) -> None:
    (tmp_path / "relay").mkdir()
    config = load_config(write_config(tmp_path / "relay"), env={})
    relay = await start_relay(config)
    host = await start_host()
    host_id = probe_host_id("relay-a")
    try:
        # A customer whose identity provider put them in the probe's org still cannot register
        # its host id (and so answer or displace the probe) nor reach it.
        # Even with the agent claim for exactly that host id.
        intruder = relay.agent_token(host_id, sub="mallory")
        agent = await start_agent(relay.ws_url, host_id, host.url, token=intruder, wait=False)
        await eventually(lambda: agent.agent.last_outcome is not None, timeout=5)
        assert agent.agent.last_outcome is not None
        assert agent.agent.last_outcome.code == 4403
        assert relay.state.registry.get(host_id) is None
        await agent.stop()

        probe = relay.agent_token(host_id, sub="relay-probe")
        real = await start_agent(relay.ws_url, host_id, host.url, token=probe)
        async with aiohttp.ClientSession() as client:
            url = f"{relay.url}/hosts/{host_id}/"
            async with client.get(url, headers={"Authorization": f"Bearer {intruder}"}) as resp:
                assert resp.status == 403
                assert (await resp.json())["error"]["code"] == "not_in_org"
            async with client.get(url, headers={"Authorization": f"Bearer {probe}"}) as resp:
                assert resp.status == 200
        await real.stop()
    finally:
        await relay.stop()
        await host.stop()


def test_probe_host_id_is_a_valid_host_id_for_any_instance_id() -> None:
    from relay.auth.hostid import parse_host_id

    for instance in ("relay-a", "web-1.example.com", "host/with:odd chars", "..x", "é"):
        parsed = parse_host_id(probe_host_id(instance))
        assert parsed.org == PROBE_ORG
    assert probe_host_id("web-1") == "relay-probe:web-1"


def test_public_http_url_maps_ws_schemes_and_keeps_a_path_prefix() -> None:
    assert str(public_http_url("wss://relay.example.com/")) == "https://relay.example.com"
    assert str(public_http_url("ws://10.0.0.1:8080/r/")) == "http://10.0.0.1:8080/r"


@pytest.mark.parametrize(("probe", "key"), [
    ({"public_url": "http://x"}, "probe.public_url"),
    ({"public_url": "ws://x", "interval_s": 5, "timeout_s": 5}, "probe.timeout_s"),
    ({"public_url": "ws://x", "ca_file": "missing.pem"}, "probe.ca_file"),
])
def test_probe_config_is_validated(tmp_path: Path, probe: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, {"probe": probe}), env={})
    assert key in str(info.value)


def test_probe_outside_dev_mode_needs_a_token_file(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("x")
    sections = {"auth": {"mode": "public_key", "public_key_file": "key.pem"},
                "probe": {"public_url": "wss://relay.example.com"}}
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, sections), env={})
    assert "probe.token_file" in str(info.value)


async def test_a_ca_file_that_does_not_load_is_reported_once_and_the_relay_keeps_serving(
    tmp_path: Path,
) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    sections = probe_sections("wss://127.0.0.1:9", ca_file="ca.pem")
    config = load_config(write_config(tmp_path, sections), env={})
    with LogCapture() as capture:
        relay = await start_relay(config)
        try:
            await eventually(lambda: bool(events(capture, "relay.probe_failed")), timeout=5)
            failure = events(capture, "relay.probe_failed")[0]
            assert failure["reason"] == "ca_file_unusable" and failure["level"] == "error"
            assert gauge(relay, "relay_probe_success") == 0
            async with aiohttp.ClientSession() as client, client.get(
                    f"{relay.url}/healthz") as resp:
                assert resp.status == 200
        finally:
            await relay.stop()


async def test_outside_dev_mode_the_probe_reads_its_token_file_on_every_probe(
    tmp_path: Path,
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from relay.auth.devissuer import mint_token

    key = Ed25519PrivateKey.generate()
    (tmp_path / "issuer.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    token_file = tmp_path / "probe-token"
    token_file.write_text("not-a-jwt\n")
    port = free_port()
    sections = probe_sections(f"ws://127.0.0.1:{port}", token_file="probe-token")
    sections["server"] = {"port": port}
    sections["auth"] = {"mode": "public_key", "public_key_file": "issuer.pem",
                        "issuer": "https://idp.example", "audience": "relay"}
    config = load_config(write_config(tmp_path, sections), env={})
    host_id = probe_host_id("relay-a")
    probes = SteppedSleep()
    with LogCapture() as capture:
        relay = await start_relay(config, probe_sleep=probes.sleep)
        try:
            await probes.step(timeout_s=2 * TIMEOUT_S)
            assert events(capture, "relay.probe_failed")[0]["reason"] == "tunnel_closed_4401"
            # The operator drops a real token in place; the next probe uses it.
            token_file.write_text(mint_token(config, "relay-probe", [PROBE_ORG],
                                             agent_hosts=[host_id], key=key) + "\n")
            await probes.step(timeout_s=2 * TIMEOUT_S)
            assert gauge(relay, "relay_probe_success") == 1
        finally:
            await relay.stop()
