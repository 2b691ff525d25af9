"""Trace context end to end: client -> relay -> tunnel -> agent -> host, spans to a real receiver.

The receiver is a real OTLP/HTTP endpoint (protobuf decoded with ``opentelemetry-proto``); the
host is a small aiohttp app recording the headers it was sent.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from relay.config import load_config
from relay.server.observe import observe_middleware
from relay.tracing import Tracing, TracingSettings
from tests.harness import (
    RunningAgent,
    RunningHost,
    RunningRelay,
    eventually,
    free_port,
    start_agent,
    start_host,
    start_relay,
    write_config,
)
from tests.otlp_receiver import OtlpReceiver

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
HOST_ID = "acme:laptop"


@dataclass
class RecordingHost:
    seen: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> web.Application:
        async def record(request: web.Request) -> web.Response:
            self.seen.append({k.lower(): v for k, v in request.headers.items()})
            await request.read()
            headers = {"Server-Timing": "db;dur=7"} if request.path == "/timed" else {}
            return web.Response(text="ok", headers=headers)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        return app


@dataclass
class Traced:
    relay: RunningRelay
    host: RunningHost
    agent: RunningAgent
    recorder: RecordingHost
    client: aiohttp.ClientSession
    agent_tracing: Tracing | None

    def url(self, path: str = "/x") -> str:
        return f"{self.relay.url}/hosts/{HOST_ID}{path}"

    def auth(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.relay.token()}", **extra}


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    running = OtlpReceiver()
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


def tracing_sections(endpoint: str, **extra: Any) -> dict[str, dict[str, Any]]:
    return {"tracing": {"otlp_endpoint": endpoint, "schedule_delay_s": 0.05,
                        "export_timeout_s": 2.0, **extra}}


async def _start(tmp_path: Path, sections: dict[str, dict[str, Any]],
                 agent_endpoint: str | None) -> Traced:
    config = load_config(write_config(tmp_path, sections), env={})
    relay = await start_relay(config)
    recorder = RecordingHost()
    host = await start_host(recorder.app())
    agent_tracing = None
    if agent_endpoint:
        agent_tracing = Tracing(TracingSettings(endpoint=agent_endpoint, service_name="relay-agent",
                                                schedule_delay_s=0.05, export_timeout_s=2.0))
    agent = await start_agent(relay.ws_url, HOST_ID, host.url, token=relay.agent_token(HOST_ID),
                              tracing=agent_tracing)
    return Traced(relay, host, agent, recorder, aiohttp.ClientSession(), agent_tracing)


async def _stop(t: Traced) -> None:
    await t.client.close()
    await t.agent.stop()
    if t.agent_tracing is not None:
        await t.agent_tracing.shutdown(timeout_s=3.0)
    await t.relay.stop()
    await t.host.stop()


def client_traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


async def test_relay_and_agent_spans_carry_the_clients_trace_id_and_the_host_sees_it(
    tmp_path: Path, receiver: OtlpReceiver,
) -> None:
    t = await _start(tmp_path, tracing_sections(receiver.endpoint), receiver.endpoint)
    try:
        traceparent, trace_id, client_span = client_traceparent()
        async with t.client.get(t.url("/traced"), headers=t.auth(
                traceparent=traceparent, tracestate="vendor=abc")) as resp:
            assert resp.status == 200
            assert await resp.text() == "ok"
        seen = t.recorder.seen[-1]
        match = TRACEPARENT.match(seen["traceparent"])
        assert match is not None, seen["traceparent"]
        assert match.group(1) == trace_id
        host_parent = match.group(2)
        assert host_parent != client_span  # the host's parent is a hop it cannot see otherwise
        assert seen.get("tracestate") == "vendor=abc"

        names = {"relay.http", "agent.upstream"}
        await eventually(lambda: names <= {s.name for s in receiver.in_trace(trace_id)},
                         timeout=10)
        spans = {s.name: s for s in receiver.in_trace(trace_id)}
        assert spans["relay.http"].service == "relay"
        assert spans["agent.upstream"].service == "relay-agent"
        # client -> relay's exchange span -> agent's span -> host
        assert spans["relay.http"].parent_span_id == client_span
        assert spans["agent.upstream"].parent_span_id == spans["relay.http"].span_id
        assert host_parent == spans["agent.upstream"].span_id
        assert host_parent in {s.span_id for s in receiver.spans}
        # The relay's span and the agent's are the whole trace: the phases are events.
        assert len(receiver.in_trace(trace_id)) == 2
        events = spans["relay.http"].events
        assert list(events) == ["relay.auth", "relay.access", "relay.tunnel_wait",
                                "relay.host_head"]
        for attributes in events.values():
            duration = attributes["duration_ms"]
            assert isinstance(duration, float) and duration >= 0
        assert spans["relay.http"].attributes["http.response.status_code"] == 200
        assert spans["relay.http"].attributes["relay.host_id"] == HOST_ID
        assert spans["agent.upstream"].attributes["http.response.status_code"] == 200
    finally:
        await _stop(t)


async def test_without_a_client_traceparent_the_host_gets_a_new_trace_parented_by_the_relay(
    tmp_path: Path, receiver: OtlpReceiver,
) -> None:
    t = await _start(tmp_path, tracing_sections(receiver.endpoint), agent_endpoint=None)
    try:
        async with t.client.get(t.url("/fresh"), headers=t.auth()) as resp:
            assert resp.status == 200
        match = TRACEPARENT.match(t.recorder.seen[-1]["traceparent"])
        assert match is not None, t.recorder.seen[-1]["traceparent"]
        trace_id, parent = match.groups()
        assert trace_id != "0" * 32
        await eventually(lambda: bool(receiver.in_trace(trace_id)), timeout=10)
        await eventually(lambda: bool(
            [s for s in receiver.in_trace(trace_id) if s.name == "relay.http"]), timeout=10)
        exchange = next(s for s in receiver.in_trace(trace_id) if s.name == "relay.http")
        # No tracing agent: the relay's own span is the host's parent.
        assert parent == exchange.span_id
        assert exchange.parent_span_id == ""
    finally:
        await _stop(t)


async def test_websocket_channels_are_traced_and_carry_the_trace_to_the_host(
    tmp_path: Path, receiver: OtlpReceiver,
) -> None:
    seen: list[dict[str, str]] = []

    async def ws_host(request: web.Request) -> web.WebSocketResponse:
        seen.append({k.lower(): v for k, v in request.headers.items()})
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/echo", ws_host)
    config = load_config(write_config(tmp_path, tracing_sections(receiver.endpoint)), env={})
    relay = await start_relay(config)
    host = await start_host(app)
    agent = await start_agent(relay.ws_url, HOST_ID, host.url, token=relay.agent_token(HOST_ID))
    traceparent, trace_id, client_span = client_traceparent()
    try:
        async with aiohttp.ClientSession() as client, client.ws_connect(
            f"{relay.ws_url}/hosts/{HOST_ID}/echo",
            headers={"Authorization": f"Bearer {relay.token()}", "traceparent": traceparent},
        ) as ws:
            await ws.send_str("ping")
            assert (await ws.receive(timeout=5)).data == "ping"
        match = TRACEPARENT.match(seen[-1]["traceparent"])
        assert match is not None and match.group(1) == trace_id
        await eventually(lambda: bool(receiver.named("relay.ws")), timeout=10)
        channel = receiver.named("relay.ws")[0]
        assert channel.trace_id == trace_id and channel.parent_span_id == client_span
        assert match.group(2) == channel.span_id
        assert {"relay.auth", "relay.access", "relay.tunnel_wait", "relay.host_head"} <= set(
            channel.events)
    finally:
        await agent.stop()
        await relay.stop()
        await host.stop()


async def test_without_an_endpoint_the_clients_trace_context_reaches_the_host_unchanged(
    tmp_path: Path,
) -> None:
    t = await _start(tmp_path, {}, agent_endpoint=None)
    try:
        assert t.relay.state.tracing is None
        assert observe_middleware not in t.relay.app.middlewares  # nothing per request
        traceparent, _, _ = client_traceparent()
        async with t.client.get(t.url("/plain"), headers=t.auth(
                traceparent=traceparent, tracestate="a=1,b=2")) as resp:
            assert resp.status == 200
            assert "Server-Timing" not in resp.headers
        seen = t.recorder.seen[-1]
        assert seen["traceparent"] == traceparent
        assert seen["tracestate"] == "a=1,b=2"
    finally:
        await _stop(t)


async def test_a_hanging_collector_slows_no_request_and_its_drops_are_counted(
    tmp_path: Path, receiver: OtlpReceiver,
) -> None:
    receiver.hang = True
    # The stop's wait for a last export is bounded by shutdown_timeout_s (3 s shipped); a short
    # one here, so the bound shows without waiting it out.
    sections = tracing_sections(receiver.endpoint, max_queue_size=8, max_export_batch_size=4,
                                export_timeout_s=2.0, shutdown_timeout_s=0.2)
    t = await _start(tmp_path, sections, agent_endpoint=None)
    try:
        durations = []
        for _ in range(40):  # far more spans than the queue holds
            started = time.monotonic()
            async with t.client.get(t.url("/busy"), headers=t.auth()) as resp:
                assert resp.status == 200
                await resp.read()
            durations.append(time.monotonic() - started)
        # Each export waits 2 s on the hung collector before it gives up; a request that
        # waited on one would take that long. None did.
        assert max(durations) < 1.0, durations
        await eventually(lambda: receiver.posts >= 1, timeout=5)
        registry = t.relay.state.metrics.registry
        dropped = registry.get_sample_value("relay_trace_spans_dropped_total")
        assert dropped is not None and dropped >= 40 - 8 - 2 * 4, dropped
        async with t.client.get(f"{t.relay.url}/metrics") as resp:
            assert "relay_trace_spans_dropped_total" in await resp.text()
        # Stopping is bounded too, with the collector still hanging: by shutdown_timeout_s,
        # not by the 2 s export the hung collector holds.
        started = time.monotonic()
        await t.client.close()
        await t.agent.stop()
        await t.relay.stop()
        assert time.monotonic() - started < 1.5
    finally:
        await _stop(t)


def parse_server_timing(value: str) -> dict[str, float]:
    entries: dict[str, float] = {}
    for entry in value.split(","):
        name, _, params = entry.strip().partition(";")
        match = re.fullmatch(r"dur=(\d+(?:\.\d+)?)", params.strip())
        assert match is not None, entry
        entries[name] = float(match.group(1))
    return entries


async def test_server_timing_names_auth_access_tunnel_and_host_in_milliseconds(
    tmp_path: Path,
) -> None:
    t = await _start(tmp_path, {"server": {"server_timing": True}}, agent_endpoint=None)
    try:
        assert t.relay.state.tracing is None  # Server-Timing alone needs no tracing SDK
        started = time.monotonic()
        async with t.client.get(t.url("/x"), headers=t.auth()) as resp:
            assert resp.status == 200
            total_ms = (time.monotonic() - started) * 1000
            values = resp.headers.getall("Server-Timing")
        assert len(values) == 1
        timing = parse_server_timing(values[0])
        assert list(timing) == ["auth", "access", "tunnel", "host"]
        assert all(v >= 0 for v in timing.values())
        assert sum(timing.values()) <= total_ms + 1
        # A host's own Server-Timing is kept beside the relay's.
        async with t.client.get(t.url("/timed"), headers=t.auth()) as resp:
            values = resp.headers.getall("Server-Timing")
        assert "db;dur=7" in values
        assert any(v.startswith("auth;dur=") for v in values)
        # Errors the relay answers itself are not proxied answers.
        async with t.client.get(t.url("/x")) as resp:
            assert resp.status == 401
    finally:
        await _stop(t)


async def test_server_timing_is_absent_when_off(tmp_path: Path) -> None:
    t = await _start(tmp_path, {}, agent_endpoint=None)
    try:
        async with t.client.get(t.url("/x"), headers=t.auth()) as resp:
            assert resp.status == 200
            assert "Server-Timing" not in resp.headers
    finally:
        await _stop(t)


async def test_tracing_shutdown_is_bounded_with_a_hung_collector(receiver: OtlpReceiver) -> None:
    receiver.hang = True
    tracing = Tracing(TracingSettings(endpoint=receiver.endpoint, schedule_delay_s=10,
                                      export_timeout_s=30))
    span = tracing.start_server_span("x", {}, {})
    span.end()
    started = time.monotonic()
    await tracing.shutdown(timeout_s=0.2)
    assert time.monotonic() - started < 2


async def test_sample_ratio_0_records_nothing_new_but_follows_a_sampled_client(
    tmp_path: Path, receiver: OtlpReceiver,
) -> None:
    t = await _start(tmp_path, tracing_sections(receiver.endpoint, sample_ratio=0.0),
                     agent_endpoint=None)
    try:
        async with t.client.get(t.url("/unsampled"), headers=t.auth()) as resp:
            assert resp.status == 200
        match = TRACEPARENT.match(t.recorder.seen[-1]["traceparent"])
        assert match is not None  # the host still gets a trace context to log
        assert int(match.group(0)[-2:], 16) & 1 == 0  # ...marked not sampled
        unsampled = match.group(1)
        traceparent, trace_id, _ = client_traceparent()
        async with t.client.get(t.url("/sampled"), headers=t.auth(traceparent=traceparent)) as r:
            assert r.status == 200
        await eventually(lambda: bool(receiver.in_trace(trace_id)), timeout=10)
        assert not receiver.in_trace(unsampled)
    finally:
        await _stop(t)


async def test_a_forwarded_exchange_is_one_trace_across_relays_and_server_timing_adds_up(
    tmp_path: Path, receiver: OtlpReceiver,
) -> None:
    from tests.redis_server import RedisServer

    async with RedisServer() as redis:
        relays = []
        for name in ("owner", "entry"):
            folder = tmp_path / name
            folder.mkdir()
            port = free_port()
            config = load_config(write_config(folder, {
                **tracing_sections(receiver.endpoint),
                "server": {"port": port, "server_timing": True},
                "auth": {"dev_state_dir": str(tmp_path / "shared-state")},
                "directory": {"backend": "redis", "redis_url": redis.url,
                              "instance_id": f"relay-{name}",
                              "advertise_url": f"http://127.0.0.1:{port}",
                              "peer_secret": "a-shared-peer-secret-for-tests"},
            }), env={})
            relays.append(await start_relay(config))
        owner, entry = relays
        recorder = RecordingHost()
        host = await start_host(recorder.app())
        agent = await start_agent(owner.ws_url, HOST_ID, host.url,
                                  token=owner.agent_token(HOST_ID))
        traceparent, trace_id, client_span = client_traceparent()
        try:
            async with aiohttp.ClientSession() as client:
                url = f"{entry.url}/hosts/{HOST_ID}/across"
                headers = {"Authorization": f"Bearer {entry.token()}", "traceparent": traceparent}
                status = 0
                for _ in range(100):  # until the entry relay sees the owner's directory entry
                    async with client.get(url, headers=headers) as resp:
                        status = resp.status
                        timing = resp.headers.getall("Server-Timing", [])
                    if status == 200:
                        break
                    await asyncio.sleep(0.05)
                assert status == 200
            names = {p.split(";")[0] for value in timing for p in value.split(", ")}
            assert names == {"auth", "access", "tunnel", "host"}
            match = TRACEPARENT.match(recorder.seen[-1]["traceparent"])
            assert match is not None and match.group(1) == trace_id

            def exchanges() -> list[Any]:
                return [s for s in receiver.in_trace(trace_id) if s.name == "relay.http"]

            await eventually(lambda: len(exchanges()) >= 2, timeout=10)
            by_parent = {s.parent_span_id: s for s in exchanges()}
            first = by_parent[client_span]  # the entry relay's span
            second = by_parent[first.span_id]  # the owner's, its child
            assert match.group(2) == second.span_id
        finally:
            await agent.stop()
            for relay in relays:
                await relay.stop()
            await host.stop()
