"""Real parts for end-to-end tests: a relay, a host service and agents on 127.0.0.1.

Everything here runs real sockets on loopback in the test's event loop. Processes (for
signals, kill -9 and memory) are started with :func:`spawn_relay_process`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from relay.agent.backoff import Backoff
from relay.agent.client import Agent, AgentOptions
from relay.agent.tokens import TokenSource
from relay.auth.devissuer import mint_token
from relay.config import Config, load_config
from relay.devhost import build_app as build_host_app
from relay.probe import probe_services
from relay.server.app import build_app
from relay.server.listen import Listeners
from relay.server.state import STATE, RelayState
from relay.tracing import Tracing

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def agent_token(config: Config, host_id: str, sub: str = "alice", *,
                orgs: tuple[str, ...] | None = None, ttl_s: int = 600, **extra: Any) -> str:
    """The one place tests mint a token an agent may register ``host_id`` with."""
    org = host_id.partition(":")[0]
    return mint_token(config, sub, list(orgs or (org,)), ttl_s=ttl_s, agent_hosts=[host_id],
                      **extra)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(directory: Path, sections: dict[str, dict[str, Any]] | None = None) -> Path:
    """A dev-mode config file in ``directory`` with its own state folder and a free port."""
    merged: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": free_port(), "drain_grace_s": 5},
        "auth": {"mode": "dev", "dev_state_dir": "state"},
        "access": {"backend": "org"},
        "tunnel": {"ping_interval_s": 1, "request_timeout_s": 5, "open_timeout_s": 3},
        "log": {"level": "debug", "format": "json"},
    }
    for section, values in (sections or {}).items():
        merged.setdefault(section, {}).update(values)
    lines = []
    for section, values in merged.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                rendered = "true" if value else "false"
            elif isinstance(value, (int, float)):
                rendered = repr(value)
            elif isinstance(value, list):
                rendered = "[" + ", ".join(f'"{v}"' for v in value) + "]"
            else:
                rendered = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
            lines.append(f"{key} = {rendered}")
        lines.append("")
    path = directory / "config.toml"
    path.write_text("\n".join(lines))
    return path


def abort_connections(runner: web.BaseRunner) -> None:
    """Drop every connection ``runner`` serves, as the kernel does when a process exits."""
    server = runner.server
    for connection in server.connections if server is not None else ():
        if connection.transport is not None:
            connection.transport.abort()
    # A relay's tunnels and its clients' WebSocket channels are no longer aiohttp's
    # connections once taken over.
    app = getattr(runner, "app", None)
    if isinstance(app, web.Application) and STATE in app:
        for socket in list(app[STATE].tunnel_sockets):
            socket.abort()
        for bridge in list(app[STATE].ws_bridges):
            bridge.abort()


@dataclass
class RunningRelay:
    config: Config
    listeners: Listeners
    app: web.Application

    @property
    def state(self) -> RelayState:
        return self.app[STATE]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config.server.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.config.server.port}"

    @property
    def admin_url(self) -> str:
        """The admin listener (``admin.listen``) when set, else the public port."""
        return f"http://{self.config.admin.listen}" if self.config.admin.listen else self.url

    def token(self, sub: str = "alice", orgs: tuple[str, ...] = ("acme",), ttl_s: int = 600,
              **extra: Any) -> str:
        """A user's token: it may call the org's hosts, not serve them."""
        return mint_token(self.config, sub, list(orgs), ttl_s=ttl_s, **extra)

    def agent_token(self, host_id: str = "acme:laptop", sub: str = "alice", **kwargs: Any) -> str:
        """An agent's token: ``token()`` plus the agent claim for ``host_id``."""
        return agent_token(self.config, host_id, sub, **kwargs)

    async def stop(self) -> None:
        """Stop as a process that goes away looks from outside: every open connection drops at
        once. Without that, a tunnel whose agent is still connected keeps its handler (and so
        the runner's cleanup) alive until the keepalive check closes it, ping interval times
        misses later."""
        for runner in (self.listeners.public, self.listeners.admin):
            if runner is not None:
                abort_connections(runner)
        await self.listeners.cleanup()


async def start_relay(config: Config, *,
                      probe_sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                      wall_clock: Callable[[], float] = time.time,
                      ) -> RunningRelay:
    """The relay as ``relay serve`` runs it (same connection edge and listeners), in-process.
    ``probe_sleep``: the probe loop's wait between probes (see tests.clock.SteppedSleep);
    ``wall_clock``: the relay's time for tokens (see tests.clock.ShiftedClock)."""
    app = build_app(config, services=probe_services(config, sleep=probe_sleep),
                    wall_clock=wall_clock)
    listeners = Listeners.create(app, config, shutdown_timeout=2.0)
    try:
        await listeners.setup()
        tls = app[STATE].tls
        await listeners.start(config, ssl_context=tls.context if tls is not None else None)
    except BaseException:
        await listeners.cleanup()
        raise
    return RunningRelay(config, listeners, app)


@dataclass
class RunningHost:
    runner: web.AppRunner
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


def host_app_with_hold(release: asyncio.Event) -> web.Application:
    """The sample host plus two routes that wait for ``release`` (30 s at most), for requests
    that must stay in flight exactly as long as a test needs, not a guessed delay:
    ``/hold`` then answers "finally"; ``/hold-sink`` reads a first piece of the upload, stops
    reading until released, then answers the digest of it all as ``/sink`` does."""

    async def hold(request: web.Request) -> web.Response:
        async with asyncio.timeout(30):
            await release.wait()
        return web.Response(text="finally\n")

    async def hold_sink(request: web.Request) -> web.Response:
        hasher = hashlib.sha256()
        first = await request.content.read(64 * 1024)
        hasher.update(first)
        size = len(first)
        async with asyncio.timeout(30):
            await release.wait()
        async for data in request.content.iter_any():
            hasher.update(data)
            size += len(data)
        return web.json_response({"sha256": hasher.hexdigest(), "size": size})

    app = build_host_app()
    app.router.add_get("/hold", hold)
    app.router.add_post("/hold-sink", hold_sink)
    return app


async def start_host(app: web.Application | None = None, port: int | None = None) -> RunningHost:
    # A short shutdown: tests end with requests the host is still "thinking" about
    # (/slow?delay=30, /hold); waiting for them would only delay the teardown.
    runner = web.AppRunner(app or build_host_app(), access_log=None, handle_signals=False,
                           shutdown_timeout=0.1)
    await runner.setup()
    port = port or free_port()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    return RunningHost(runner, port)


@dataclass
class RunningAgent:
    agent: Agent
    task: asyncio.Task[None]
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_connected(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self.agent.connected_event.wait(), timeout)

    async def stop(self) -> None:
        self.stop_event.set()
        try:
            await asyncio.wait_for(self.task, 5)
        except (TimeoutError, asyncio.CancelledError):
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


async def start_agent(
    relay_url: str, host_id: str, upstream: str, *, token: str | None = None,
    tokens: TokenSource | None = None, backoff: Backoff | None = None, wait: bool = True,
    on_state: Callable[[Agent], None] | None = None, tracing: Tracing | None = None,
    renew_clock: Callable[[], float] = time.time,
    renew_sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    **options: Any,
) -> RunningAgent:
    source = tokens or TokenSource(token=token)
    agent = Agent(AgentOptions(relay_url=relay_url, host_id=host_id, upstream=upstream, **options),
                  source, backoff=backoff or Backoff(base=0.05, cap=0.5), on_state=on_state,
                  tracing=tracing, renew_clock=renew_clock, renew_sleep=renew_sleep)
    stop = asyncio.Event()
    task = asyncio.ensure_future(agent.run(stop))
    task.set_name(f"test-agent:{host_id}")
    running = RunningAgent(agent, task, stop)
    if wait:
        await running.wait_connected()
    return running


@dataclass
class Stack:
    """A relay, a host service and one connected agent for ``acme:laptop``."""

    relay: RunningRelay
    host: RunningHost
    agent: RunningAgent
    client: aiohttp.ClientSession
    host_id: str = "acme:laptop"

    def token(self, **kwargs: Any) -> str:
        return self.relay.token(**kwargs)

    def agent_token(self, host_id: str = "acme:laptop", **kwargs: Any) -> str:
        return self.relay.agent_token(host_id, **kwargs)

    def url(self, path: str) -> str:
        return f"{self.relay.url}/hosts/{self.host_id}{path}"

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token()}"}


@contextlib.asynccontextmanager
async def stack(tmp_path: Path, sections: dict[str, dict[str, Any]] | None = None,
                host_app: web.Application | None = None) -> AsyncIterator[Stack]:
    config = load_config(write_config(tmp_path, sections), env={})
    relay = await start_relay(config)
    host = await start_host(host_app)
    agent = await start_agent(relay.ws_url, "acme:laptop", host.url, token=relay.agent_token())
    client = aiohttp.ClientSession(auto_decompress=False)
    try:
        yield Stack(relay, host, agent, client)
    finally:
        await client.close()
        await agent.stop()
        await relay.stop()
        await host.stop()


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0,
                     interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


class LogCapture:
    """Route the relay's structured logs into a buffer to assert on what gets written."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    def __enter__(self) -> LogCapture:
        from relay.logs import setup_logging

        setup_logging("debug", "json", stream=self.stream)
        return self

    def __exit__(self, *exc: object) -> None:
        from relay.logs import setup_logging

        setup_logging("warning", "json")

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every JSON event written so far."""
        return json_events(self.text)


def json_events(text: str) -> list[dict[str, Any]]:
    """The JSON events in a log text (lines that are not JSON, e.g. a banner, left out)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def spawn_relay_process(config_path: Path, *, env: dict[str, str] | None = None,
                        log_file: Path | None = None) -> subprocess.Popen[bytes]:
    """``python -m relay serve`` as a real process (for signals, kill -9 and memory)."""
    out = open(log_file, "wb") if log_file else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [PYTHON, "-m", "relay", "serve", "--config", str(config_path)],
        stdout=out, stderr=subprocess.STDOUT if log_file else subprocess.DEVNULL,
        env={**os.environ, **(env or {})}, cwd=str(REPO),
    )


async def wait_http(url: str, timeout: float = 10.0, status: int | None = 200) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as client:
        while True:
            try:
                async with client.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    if status is None or resp.status == status:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not answer {status} in {timeout}s")
            await asyncio.sleep(0.05)
