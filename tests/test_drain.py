"""Graceful drain of a real ``relay serve`` process on SIGTERM / SIGINT.

A real relay process (signals are the point), an in-process host service and agent: a slow
request is in flight when the signal arrives. The relay must turn unready at once, refuse new
work with ``503 draining`` / close 4503, let the request finish, tell the agent in-band, exit 0
in bounded time; and the agent must be back on a new relay within seconds of it being ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.agent.backoff import Backoff
from relay.agent.client import Outcome
from relay.auth.devissuer import mint_token
from relay.config import load_config
from relay.errors import CloseCode
from tests.harness import (
    RunningAgent,
    RunningHost,
    agent_token,
    eventually,
    host_app_with_hold,
    spawn_relay_process,
    start_agent,
    start_host,
    wait_http,
    write_config,
)

HOST_ID = "acme:laptop"
START_TIMEOUT_S = 15.0


def read_events(log_file: Path) -> list[dict[str, Any]]:
    """The JSON log lines a relay process wrote (anything else, e.g. the dev banner, skipped)."""
    events = []
    for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict) and "event" in doc:
                events.append(doc)
    return events


def events_named(log_file: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in read_events(log_file) if e["event"] == name]


async def wait_exit(proc: subprocess.Popen[bytes], within: float) -> int:
    deadline = time.monotonic() + within
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"relay process still running {within}s after the signal")
        await asyncio.sleep(0.02)
    return int(proc.returncode)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


@dataclass
class Running:
    config_path: Path
    port: int
    token: str
    host: RunningHost
    agent: RunningAgent
    client: aiohttp.ClientSession
    release: asyncio.Event  # answers the host's /hold requests
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hosts_url(self, path: str) -> str:
        return f"{self.url}/hosts/{HOST_ID}{path}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def spawn(self, log_file: Path) -> subprocess.Popen[bytes]:
        proc = spawn_relay_process(self.config_path, log_file=log_file)
        self.procs.append(proc)
        await wait_http(f"{self.url}/readyz", timeout=START_TIMEOUT_S)
        return proc


@contextlib.asynccontextmanager
async def running(tmp_path: Path, grace_s: float) -> AsyncIterator[Running]:
    config_path = write_config(tmp_path, {
        "server": {"drain_grace_s": grace_s},
        "tunnel": {"request_timeout_s": 30},
        "log": {"level": "info"},
    })
    config = load_config(config_path, env={})
    token = mint_token(config, "alice", ["acme"])  # also creates the dev key the relay will use
    release = asyncio.Event()
    host = await start_host(host_app_with_hold(release))
    client = aiohttp.ClientSession()
    run = Running(config_path, config.server.port, token, host, None, client, release)  # type: ignore[arg-type]
    try:
        await run.spawn(tmp_path / "relay-1.log")
        # Production-like backoff shape (base 0.2 s), capped low so the test stays short: the
        # agent retries a relay that is gone every 0.4 s at most.
        run.agent = await start_agent(f"ws://127.0.0.1:{run.port}", HOST_ID, host.url,
                                      token=agent_token(config, HOST_ID),
                                      backoff=Backoff(base=0.2, cap=0.4))
        agent = run.agent.agent
        original = agent._delay_after

        def record(outcome: Outcome) -> float:
            run.outcomes.append(outcome)
            return original(outcome)

        agent._delay_after = record  # type: ignore[method-assign]
        yield run
    finally:
        await client.close()
        if run.agent is not None:
            await run.agent.stop()
        for proc in run.procs:
            stop_process(proc)
        await host.stop()


async def refused_ws_close_code(client: aiohttp.ClientSession, url: str) -> int:
    async with client.ws_connect(url) as ws:
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE, msg
        return int(msg.data)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_drain_lets_the_inflight_request_finish_and_the_agent_comes_back(
    tmp_path: Path, sig: signal.Signals
) -> None:
    async with running(tmp_path, grace_s=5) as run:
        proc = run.procs[0]
        session = run.agent.agent.session
        assert session is not None

        # A client WebSocket channel (a terminal, say) that is open through the drain.
        channel = await run.client.ws_connect(run.hosts_url(f"/ws?token={run.token}"))
        await channel.send_str("before")
        assert (await channel.receive(timeout=5)).data == "before"
        slow = asyncio.ensure_future(run.client.get(run.hosts_url("/hold"), headers=run.auth))
        await eventually(lambda: len(session.channels) == 2)  # the host has the request
        proc.send_signal(sig)
        signalled = time.monotonic()

        # Unready at once (the load balancer stops sending new work here).
        await wait_http(f"{run.url}/readyz", timeout=1.0, status=503)
        async with run.client.get(f"{run.url}/readyz") as resp:
            body = await resp.json()
            assert resp.status == 503 and body["checks"]["draining"] is True

        # New requests and new WebSockets are refused with the drain's codes.
        async with run.client.get(run.hosts_url("/"), headers=run.auth) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "draining"
            assert resp.headers["Retry-After"] == "0"
        ws_code = await refused_ws_close_code(run.client,
                                              run.hosts_url(f"/ws?token={run.token}"))
        assert ws_code == CloseCode.DRAINING
        tunnel_code = await refused_ws_close_code(
            run.client, f"{run.url}/tunnel?hostId=acme:other&v=1&token={run.token}")
        assert tunnel_code == CloseCode.DRAINING
        assert time.monotonic() - signalled < 2.5, "the checks ran well inside the grace"
        assert not slow.done()

        # The request that was in flight completes normally.
        run.release.set()
        resp = await asyncio.wait_for(slow, 10)
        async with resp:
            assert resp.status == 200
            assert await resp.text() == "finally\n"

        assert await wait_exit(proc, within=8) == 0
        assert time.monotonic() - signalled < 8
        # The open channel was closed with 4503 too: its client reconnects at once.
        msg = await channel.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == CloseCode.DRAINING
        await channel.close()

        # The agent was told in-band, then closed with 4503.
        await eventually(lambda: any(o.hello for o in run.outcomes), timeout=5)
        served = next(o for o in run.outcomes if o.hello)
        assert served.drained and served.code == CloseCode.DRAINING
        log_file = tmp_path / "relay-1.log"
        draining = events_named(log_file, "relay.draining")
        assert len(draining) == 1 and draining[0]["tunnels"] == 1
        assert draining[0]["inflight"] == 1
        assert events_named(log_file, "relay.drained")[0]["inflight_left"] == 0
        assert events_named(log_file, "relay.stopped")

        # A new relay on the same port: the agent is back within seconds of it being ready.
        run.agent.agent.connected_event.clear()
        await run.spawn(tmp_path / "relay-2.log")
        ready = time.monotonic()
        await run.agent.wait_connected(timeout=5)
        async with run.client.get(run.hosts_url("/"), headers=run.auth) as resp:
            assert resp.status == 200
        assert time.monotonic() - ready < 3.0


async def start_slow_request(run: Running) -> asyncio.Future[aiohttp.ClientResponse]:
    """A request the host answers in 30 s, started and seen open at the agent."""
    session = run.agent.agent.session
    assert session is not None
    slow = asyncio.ensure_future(run.client.get(run.hosts_url("/slow?delay=30"),
                                                headers=run.auth))
    await eventually(lambda: len(session.channels) == 1)
    return slow


async def test_request_outliving_the_grace_is_cut_and_the_process_still_exits(
    tmp_path: Path,
) -> None:
    grace_s = 0.3
    async with running(tmp_path, grace_s=grace_s) as run:
        proc = run.procs[0]
        slow = await start_slow_request(run)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        assert await wait_exit(proc, within=grace_s + 5) == 0
        elapsed = time.monotonic() - signalled
        assert grace_s <= elapsed < grace_s + 5
        # The request was cut after the grace, with an error rather than a fake success.
        try:
            resp = await asyncio.wait_for(slow, 5)
        except aiohttp.ClientError:
            pass
        else:
            async with resp:
                # 503 draining, not 502: the client may retry at once (another relay).
                assert resp.status == 503
                assert (await resp.json())["error"]["code"] == "draining"
        log_file = tmp_path / "relay-1.log"
        assert events_named(log_file, "relay.drain_grace_expired")[0]["inflight"] == 1
        drained = events_named(log_file, "relay.drained")
        assert drained and drained[0]["cut"] == 1 and drained[0]["inflight_left"] == 0


async def test_second_signal_cuts_the_grace_short(tmp_path: Path) -> None:
    """Ctrl-C twice: the operator does not wait out a long grace; agents still get 4503."""
    async with running(tmp_path, grace_s=60) as run:
        proc = run.procs[0]
        slow = await start_slow_request(run)
        proc.send_signal(signal.SIGINT)
        await wait_http(f"{run.url}/readyz", timeout=1.0, status=503)
        proc.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        assert await wait_exit(proc, within=6) == 0
        assert time.monotonic() - signalled < 6
        with contextlib.suppress(aiohttp.ClientError):
            async with await asyncio.wait_for(slow, 5) as resp:
                assert resp.status == 503
        log_file = tmp_path / "relay-1.log"
        assert events_named(log_file, "relay.drain_forced")
        assert events_named(log_file, "relay.drained")[0]["cut"] == 1
        await eventually(lambda: any(o.hello for o in run.outcomes), timeout=5)
        served = next(o for o in run.outcomes if o.hello)
        assert served.drained and served.code == CloseCode.DRAINING
