"""Native TLS: the relay serves https and wss itself, and a SIGHUP swaps the certificate in place.

Certificates come from a private CA made in the test; the client and the agent trust only it.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from relay.config import load_config
from relay.errors import ConfigError
from relay.server.app import build_app
from tests.certs import PrivateCA, make_ca
from tests.clock import SteppedSleep
from tests.harness import (
    LogCapture,
    eventually,
    free_port,
    spawn_relay_process,
    start_agent,
    start_host,
    start_relay,
    write_config,
)
from tests.test_drain import events_named, stop_process, wait_exit

HOST_ID = "acme:laptop"


def tls_files(tmp_path: Path, ca: PrivateCA) -> tuple[Path, Path, int]:
    folder = tmp_path / "tls"
    folder.mkdir(exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    serial = ca.issue(cert, key)
    return cert, key, serial


def tls_sections(port: int | None = None) -> dict[str, dict[str, object]]:
    server: dict[str, object] = {"tls_cert_file": "tls/cert.pem", "tls_key_file": "tls/key.pem"}
    if port is not None:
        server["port"] = port
    return {"server": server}


async def served_serial(port: int, context: ssl.SSLContext) -> int:
    """The serial of the certificate a new TLS connection to ``port`` is shown."""
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"), 5
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        return int(x509.load_der_x509_certificate(der).serial_number)
    finally:
        writer.close()


async def test_https_and_wss_through_a_relay_serving_tls_itself(tmp_path: Path) -> None:
    ca = make_ca()
    ca_file = ca.write(tmp_path / "ca.pem")
    _, _, serial = tls_files(tmp_path, ca)
    config = load_config(write_config(tmp_path, tls_sections()), env={})
    relay = await start_relay(config)
    host = await start_host()
    port = config.server.port
    agent = await start_agent(f"wss://127.0.0.1:{port}", HOST_ID, host.url,
                              token=relay.agent_token(HOST_ID), ca_file=str(ca_file))
    token = relay.token()
    try:
        assert await served_serial(port, ca.client_context()) == serial
        connector = aiohttp.TCPConnector(ssl=ca.client_context())
        async with aiohttp.ClientSession(connector=connector) as client:
            auth = {"Authorization": f"Bearer {token}"}
            async with client.get(f"https://127.0.0.1:{port}/hosts/{HOST_ID}/inspect",
                                  headers=auth) as resp:
                assert resp.status == 200
                seen = await resp.json()
                forwarded = {n.lower(): v for n, v in seen["headers"]}
                assert forwarded["x-forwarded-proto"] == "https"
            async with client.ws_connect(f"wss://127.0.0.1:{port}/hosts/{HOST_ID}/ws",
                                         headers=auth) as ws:
                await ws.send_str("over tls")
                assert (await ws.receive(timeout=5)).data == "over tls"
        # A client that does not trust the private CA is refused at the handshake.
        async with aiohttp.ClientSession() as untrusting:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await untrusting.get(f"https://127.0.0.1:{port}/healthz")
        # Plain http to the TLS port is not served.
        async with aiohttp.ClientSession() as plain:
            with pytest.raises(aiohttp.ClientError):
                await plain.get(f"http://127.0.0.1:{port}/healthz",
                                timeout=aiohttp.ClientTimeout(total=3))
    finally:
        await agent.stop()
        await relay.stop()
        await host.stop()


async def test_an_agent_without_the_ca_cannot_connect(tmp_path: Path) -> None:
    ca = make_ca()
    tls_files(tmp_path, ca)
    config = load_config(write_config(tmp_path, tls_sections()), env={})
    relay = await start_relay(config)
    with LogCapture() as logs:
        agent = await start_agent(f"wss://127.0.0.1:{config.server.port}", HOST_ID,
                                  "http://127.0.0.1:9", token=relay.agent_token(HOST_ID),
                                  wait=False)
        try:
            await eventually(lambda: agent.agent.last_outcome is not None, timeout=5)
            assert agent.agent.last_outcome is not None
            assert agent.agent.last_outcome.reason == "connect_failed"
            assert not agent.agent.connected
        finally:
            await agent.stop()
            await relay.stop()
    failed = next(e for e in logs.events if e["event"] == "agent.connect_failed")
    assert failed["error"] == "ClientConnectorCertificateError"
    assert failed["cause"].startswith("TLS certificate rejected: [SSL: CERTIFICATE_VERIFY_FAILED]")


def test_tls_needs_both_files(tmp_path: Path) -> None:
    ca = make_ca()
    tls_files(tmp_path, ca)
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, {"server": {"tls_cert_file": "tls/cert.pem"}}),
                    env={})
    assert "server.tls_key_file" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, {"server": {"tls_cert_file": "tls/nope.pem",
                                                       "tls_key_file": "tls/key.pem"}}), env={})
    assert "server.tls_cert_file" in str(info.value) and "no such file" in str(info.value)


def test_a_key_that_does_not_match_stops_start_up_with_one_line(tmp_path: Path) -> None:
    ca = make_ca()
    tls_files(tmp_path, ca)
    other = tmp_path / "other"
    other.mkdir()
    ca.issue(other / "cert.pem", other / "key.pem")
    config = load_config(write_config(tmp_path, {"server": {
        "tls_cert_file": "tls/cert.pem", "tls_key_file": "other/key.pem"}}), env={})
    with pytest.raises(ConfigError) as info:
        build_app(config)
    message = str(info.value)
    assert "server.tls_cert_file" in message and "\n" not in message
    (tmp_path / "tls" / "cert.pem").write_text("not a certificate\n")
    config = load_config(write_config(tmp_path, tls_sections()), env={})
    with pytest.raises(ConfigError, match="PEM certificate"):
        build_app(config)


async def test_sighup_serves_a_new_certificate_to_new_connections_and_keeps_the_tunnel(
    tmp_path: Path,
) -> None:
    ca = make_ca()
    ca_file = ca.write(tmp_path / "ca.pem")
    cert, key, first = tls_files(tmp_path, ca)
    port = free_port()
    config_path = write_config(tmp_path, {**tls_sections(port), "log": {"level": "info"}})
    config = load_config(config_path, env={})
    log_file = tmp_path / "relay.log"
    proc = spawn_relay_process(config_path, log_file=log_file)
    host = await start_host()
    context = ca.client_context()
    agent = None
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                assert await served_serial(port, context) == first
                break
            except (OSError, TimeoutError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                await asyncio.sleep(0.05)
        from relay.auth.devissuer import mint_token

        token = mint_token(config, "alice", ["acme"], ttl_s=600, agent_hosts=[HOST_ID])
        agent = await start_agent(f"wss://127.0.0.1:{port}", HOST_ID, host.url, token=token,
                                  ca_file=str(ca_file), wait=True)
        connector = aiohttp.TCPConnector(ssl=context, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as client:
            url = f"https://127.0.0.1:{port}/hosts/{HOST_ID}/"
            auth = {"Authorization": f"Bearer {token}"}
            async with client.get(url, headers=auth) as resp:
                assert resp.status == 200

            second = ca.issue(cert, key)  # renewed in place, as certbot does
            proc.send_signal(signal.SIGHUP)
            await eventually(lambda: bool(events_named(log_file, "relay.tls_reloaded")),
                             timeout=10)
            assert await served_serial(port, context) == second
            async with client.get(url, headers=auth) as resp:
                assert resp.status == 200
            assert agent.agent.connected and agent.agent.connects == 1  # never reconnected

            # A broken renewal keeps the certificate that works.
            cert.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
            proc.send_signal(signal.SIGHUP)
            await eventually(lambda: bool(events_named(log_file, "relay.tls_reload_failed")),
                             timeout=10)
            failure = events_named(log_file, "relay.tls_reload_failed")[0]
            assert failure["level"] == "error" and "cert.pem" in failure["error"]
            assert await served_serial(port, context) == second
            async with client.get(url, headers=auth) as resp:
                assert resp.status == 200
            assert agent.agent.connects == 1
        loaded = events_named(log_file, "relay.tls_loaded")
        assert loaded and int(loaded[0]["serial"], 16) == first
        listening = events_named(log_file, "relay.listening")
        assert listening[0]["url"].startswith("https://")
        banner = log_file.read_text()
        assert f"on https://127.0.0.1:{port}" in banner
        assert f"--relay wss://127.0.0.1:{port}" in banner
    finally:
        if agent is not None:
            await agent.stop()
        proc.send_signal(signal.SIGTERM)
        try:
            await wait_exit(proc, 10)
        finally:
            stop_process(proc)
        await host.stop()


def test_dev_mode_with_tls_still_refuses_a_non_loopback_address(tmp_path: Path) -> None:
    tls_files(tmp_path, make_ca())
    sections = tls_sections()
    sections["server"]["host"] = "0.0.0.0"
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, sections), env={})
    assert "server.host" in str(info.value) and "loopback" in str(info.value)


async def test_the_probe_goes_through_wss_with_its_private_ca(tmp_path: Path) -> None:
    ca = make_ca()
    ca.write(tmp_path / "ca.pem")
    tls_files(tmp_path, ca)
    port = free_port()
    sections = {**tls_sections(port),
                "probe": {"public_url": f"wss://127.0.0.1:{port}", "interval_s": 60,
                          "timeout_s": 10, "ca_file": "ca.pem"}}
    probes = SteppedSleep()  # one step, one probe
    relay = await start_relay(load_config(write_config(tmp_path, sections), env={}),
                              probe_sleep=probes.sleep)
    registry = relay.state.metrics.registry
    try:
        await probes.step(timeout_s=20)
        assert registry.get_sample_value("relay_probe_success") == 1
    finally:
        await relay.stop()
