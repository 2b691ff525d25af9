"""The agent stays connected: reconnects, drains, fresh tokens, a watchdog, one local origin."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from yarl import URL

from relay.agent.backoff import Backoff
from relay.agent.client import Agent, AgentOptions, Outcome
from relay.agent.tokens import TokenSource
from relay.agent.upstream import LocalOrigin
from relay.config import Config, load_config
from relay.devhost import build_app as build_host_app
from relay.devhost import inspect as host_inspect
from relay.errors import CloseCode
from relay.protocol import frames
from relay.protocol.frames import Flags, FrameType
from relay.protocol.messages import Open
from relay.server.drain import drain
from tests.harness import (
    LogCapture,
    RunningAgent,
    RunningHost,
    RunningRelay,
    abort_connections,
    eventually,
    free_port,
    host_app_with_hold,
    start_agent,
    start_host,
    start_relay,
    write_config,
)
from tests.test_rogue_agent import RawTunnel

HOST = "acme:laptop"


# -- parts -------------------------------------------------------------------------------------

@dataclass
class Recorder:
    """Every outcome the agent's reconnect loop reached, in order."""

    outcomes: list[Outcome] = field(default_factory=list)

    def __call__(self, agent: Agent) -> None:
        last = agent.last_outcome
        if last is not None and (not self.outcomes or self.outcomes[-1] is not last):
            self.outcomes.append(last)


async def run_agent(relay_url: str, upstream: str, tokens: TokenSource, *,
                    backoff: Backoff | None = None, recorder: Callable[[Agent], None] | None = None,
                    wait: bool = True) -> RunningAgent:
    return await start_agent(relay_url, HOST, upstream, tokens=tokens, backoff=backoff,
                             wait=wait, on_state=recorder)


@pytest.fixture
async def host() -> AsyncIterator[RunningHost]:
    running = await start_host()
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def held_host() -> AsyncIterator[tuple[RunningHost, asyncio.Event]]:
    """The sample host whose ``/hold`` answers once the event is set."""
    release = asyncio.Event()
    running = await start_host(host_app_with_hold(release))
    try:
        yield running, release
    finally:
        await running.stop()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    # Fast keepalives: a relay stopped without a drain leaves its tunnels to the 4408 check,
    # which is what bounds how long ``RunningRelay.stop`` takes.
    return load_config(write_config(tmp_path, {"tunnel": {"ping_interval_s": 0.3}}), env={})


@contextlib.asynccontextmanager
async def relay_on(config: Config) -> AsyncIterator[RunningRelay]:
    running = await start_relay(config)
    try:
        yield running
    finally:
        await running.stop()


@contextlib.asynccontextmanager
async def agent_running(*args: Any, **kwargs: Any) -> AsyncIterator[RunningAgent]:
    running = await run_agent(*args, **kwargs)
    try:
        yield running
    finally:
        await running.stop()


Behaviour = Callable[[web.WebSocketResponse, "FakeRelay"], Awaitable[None]]


@dataclass
class FakeRelay:
    """A relay that speaks ``/tunnel`` exactly as a test scripts it (and nothing else)."""

    behaviour: Behaviour
    port: int = field(default_factory=free_port)
    connections: list[float] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def _tunnel(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        self.connections.append(time.monotonic())
        await self.behaviour(ws, self)
        return ws

    async def start(self) -> FakeRelay:
        app = web.Application()
        app.router.add_get("/tunnel", self._tunnel)
        self.runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True,
                                    shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()
        return self

    async def stop(self) -> None:
        """Close every connection at once (the agent's own close would wait on a black hole)."""
        runner, self.runner = self.runner, None
        if runner is not None:
            abort_connections(runner)
            await runner.cleanup()


@contextlib.asynccontextmanager
async def fake_relay(behaviour: Behaviour) -> AsyncIterator[FakeRelay]:
    relay = await FakeRelay(behaviour).start()
    try:
        yield relay
    finally:
        await relay.stop()


def hello(ping_interval_s: float, misses: int = 2) -> bytes:
    return frames.encode_json(FrameType.HELLO, 0, {
        "version": 1, "hostId": HOST, "pingIntervalS": ping_interval_s,
        "keepaliveMisses": misses, "window": 262144, "maxFrame": 65536, "maxStreams": 256,
    })


def subject(relay: RunningRelay) -> str:
    """Whose token the relay's current tunnel for HOST was opened with."""
    tunnel = relay.state.registry.get(HOST)
    assert tunnel is not None
    return tunnel.subject


async def forever() -> None:
    await asyncio.Event().wait()


# -- reconnecting ------------------------------------------------------------------------------

async def test_agent_reconnects_after_the_relay_restarts_on_the_same_port(
    config: Config, host: RunningHost
) -> None:
    relay = await start_relay(config)
    tokens = TokenSource(token=relay.agent_token(HOST))
    async with agent_running(relay.ws_url, host.url, tokens) as agent:
        assert relay.state.registry.get(HOST) is not None
        await relay.stop()
        await eventually(lambda: not agent.agent.connected)
        refused_from = agent.agent.attempts
        # A few refused connects while the port is closed.
        await eventually(lambda: agent.agent.attempts >= refused_from + 2)
        async with relay_on(config) as again:
            started = time.monotonic()
            await agent.wait_connected(timeout=3)
            assert time.monotonic() - started < 2.0
            await eventually(lambda: again.state.registry.get(HOST) is not None)
            async with aiohttp.ClientSession() as client, client.get(
                f"{again.url}/hosts/{HOST}/", headers={"Authorization": f"Bearer {again.token()}"}
            ) as resp:
                assert resp.status == 200
        assert agent.agent.connects == 2


async def test_drain_resets_backoff_and_the_agent_comes_back_at_once(
    config: Config, host: RunningHost
) -> None:
    relay = await start_relay(config)
    recorder = Recorder()
    backoff = Backoff(base=0.05, cap=20)
    async with agent_running(relay.ws_url, host.url, TokenSource(token=relay.agent_token(HOST)),
                             backoff=backoff, recorder=recorder) as agent:
        backoff.attempt = 30  # a long history of failures: the next plain delay is 10-20 s
        await drain(relay.state, 0.1)
        await relay.stop()
        await eventually(lambda: any(o.drained for o in recorder.outcomes))
        drained = next(o for o in recorder.outcomes if o.drained)
        assert drained.hello
        async with relay_on(config) as new_relay:
            await agent.wait_connected(timeout=3)
            await eventually(lambda: new_relay.state.registry.get(HOST) is not None)


async def test_in_band_drain_alone_makes_the_agent_leave_at_once() -> None:
    """The close frame after a drain often never arrives; the DRAIN message must suffice."""

    async def drain_then_vanish(ws: web.WebSocketResponse, relay: FakeRelay) -> None:
        await ws.send_bytes(hello(ping_interval_s=5))  # the watchdog would wait 10 s
        if len(relay.connections) == 1:
            await ws.send_bytes(frames.encode_json(FrameType.DRAIN, 0, {"reason": "deploy"}))
        await forever()

    recorder = Recorder()
    async with fake_relay(drain_then_vanish) as relay, agent_running(
        relay.url, "http://127.0.0.1:9", TokenSource(token="t"),
        backoff=Backoff(base=0.05, cap=20), recorder=recorder,
    ):
        await eventually(lambda: len(relay.connections) >= 2, timeout=3)
        assert relay.connections[1] - relay.connections[0] < 1.0
        assert recorder.outcomes[0].drained
        await relay.stop()


async def test_drained_agent_lets_requests_in_flight_finish_before_leaving(
    config: Config, held_host: tuple[RunningHost, asyncio.Event]
) -> None:
    host, release = held_host
    recorder = Recorder()
    with LogCapture() as capture:
        async with relay_on(config) as relay, agent_running(
            relay.ws_url, host.url, TokenSource(token=relay.agent_token(HOST)),
            recorder=recorder,
        ) as agent, aiohttp.ClientSession() as client:
            session = agent.agent.session
            assert session is not None
            held = asyncio.ensure_future(client.get(
                f"{relay.url}/hosts/{HOST}/hold",
                headers={"Authorization": f"Bearer {relay.token()}"}))
            await eventually(lambda: len(session.channels) == 1)
            draining = asyncio.ensure_future(drain(relay.state, 5))
            # Held until the agent has taken the DRAIN: the request is in flight through it.
            await eventually(lambda: "agent.drain_received" in capture.text)
            assert not held.done()
            release.set()
            async with await asyncio.wait_for(held, 5) as resp:
                assert resp.status == 200
                assert await resp.text() == "finally\n"
            await asyncio.wait_for(draining, 3)
            await eventually(lambda: any(o.drained for o in recorder.outcomes))


async def test_draining_relay_refusing_at_the_door_is_not_hammered() -> None:
    """4503 at connect time means "try elsewhere soon", not a hot loop against one relay."""

    async def refuse(ws: web.WebSocketResponse, relay: FakeRelay) -> None:
        await ws.close(code=int(CloseCode.DRAINING), message=b"relay draining")

    attempted_at: list[float] = []  # on the agent's side: no connect latency in the gaps

    def on_state(agent: Agent) -> None:
        if agent.attempts > len(attempted_at):
            attempted_at.append(time.monotonic())

    async with fake_relay(refuse) as relay, agent_running(
        relay.url, "http://127.0.0.1:9", TokenSource(token="t"),
        backoff=Backoff(base=0.05, cap=2), recorder=on_state, wait=False,
    ) as agent:
        await eventually(lambda: len(relay.connections) >= 4, timeout=3)
        # The first refusal is retried at once, then the delays double from the base: the
        # second to fourth attempts are at least 0.05 + 0.1 s apart (a hot loop: a few ms).
        assert attempted_at[3] - attempted_at[1] >= 0.15 - 0.001  # a timer may fire a hair early
        assert agent.agent.last_outcome is not None
        assert agent.agent.last_outcome.code == CloseCode.DRAINING


async def test_replaced_agent_backs_off_slowly_instead_of_fighting(
    config: Config, host: RunningHost
) -> None:
    attempted_at: list[float] = []
    # When the retry was scheduled, for when, and whose tunnel the relay held at that moment.
    scheduled: list[tuple[float, float, str | None]] = []

    def on_state(agent: Agent) -> None:
        now = time.monotonic()
        if agent.attempts > len(attempted_at):
            attempted_at.append(now)
        if agent.next_attempt_at is not None and not scheduled:
            current = relay.state.registry.get(HOST)
            scheduled.append((now, agent.next_attempt_at, current and current.subject))

    # Slow retries wait out half the cap (rng 0): 0.3 s, against 0.025 s for a plain retry.
    async with relay_on(config) as relay, agent_running(
        relay.ws_url, host.url, TokenSource(token=relay.agent_token(HOST)),
        backoff=Backoff(base=0.05, cap=0.6, rng=lambda: 0.0), recorder=on_state,
    ) as agent, aiohttp.ClientSession() as client:
        newer = await RawTunnel.connect(client, relay, HOST, relay.agent_token(HOST, sub="newer"))
        try:
            await eventually(lambda: bool(scheduled))
            assert agent.agent.last_outcome is not None
            assert agent.agent.last_outcome.code == CloseCode.REPLACED
            at, next_attempt_at, holder = scheduled[0]
            assert next_attempt_at - at > 0.25
            assert holder == "newer"
            # The next attempt comes when it was scheduled, not before.
            await eventually(lambda: len(attempted_at) >= 2, timeout=3)
            assert attempted_at[1] >= next_attempt_at
        finally:
            await newer.close()


# -- tokens ------------------------------------------------------------------------------------

async def test_token_file_is_read_again_on_every_connect(
    tmp_path: Path, config: Config, host: RunningHost
) -> None:
    token_file = tmp_path / "token"
    relay = await start_relay(config)
    token_file.write_text(relay.agent_token(HOST, sub="alice") + "\n")
    async with agent_running(relay.ws_url, host.url, TokenSource(file=str(token_file))) as agent:
        assert subject(relay) == "alice"
        await relay.stop()
        token_file.write_text(relay.agent_token(HOST, sub="bob"))
        async with relay_on(config) as again:
            await agent.wait_connected(timeout=3)
            await eventually(lambda: again.state.registry.get(HOST) is not None)
            assert subject(again) == "bob"


TOKEN_SCRIPT = """\
import pathlib, sys
tokens = pathlib.Path(sys.argv[1]).read_text().split()
calls = pathlib.Path(sys.argv[2])
n = len(calls.read_text().splitlines()) if calls.exists() else 0
with calls.open("a") as log:
    log.write("call\\n")
print(tokens[min(n, len(tokens) - 1)])
"""


def token_command(tmp_path: Path, tokens: list[str]) -> tuple[str, Path]:
    """A command printing ``tokens`` one per run (the last one for ever after), and its log."""
    script = tmp_path / "print_token.py"
    script.write_text(TOKEN_SCRIPT)
    (tmp_path / "tokens").write_text("\n".join(tokens))
    calls = tmp_path / "calls"
    return f"{sys.executable} {script} {tmp_path / 'tokens'} {calls}", calls


async def test_token_command_runs_on_every_connect(
    tmp_path: Path, config: Config, host: RunningHost
) -> None:
    relay = await start_relay(config)
    command, calls = token_command(tmp_path, [relay.agent_token(HOST, sub="alice"),
                                                relay.agent_token(HOST, sub="bob")])
    async with agent_running(relay.ws_url, host.url, TokenSource(command=command)) as agent:
        assert subject(relay) == "alice"
        await relay.stop()
        async with relay_on(config) as again:
            await agent.wait_connected(timeout=5)
            await eventually(lambda: again.state.registry.get(HOST) is not None)
            assert subject(again) == "bob"
    assert len(calls.read_text().splitlines()) == agent.agent.attempts


async def test_expired_token_gets_4401_then_a_fresh_one_connects(
    tmp_path: Path, config: Config, host: RunningHost
) -> None:
    async with relay_on(config) as relay:
        expired = relay.agent_token(HOST, ttl_s=1, now=time.time() - 3600)
        command, calls = token_command(tmp_path, [expired, relay.agent_token(HOST, sub="fresh")])
        recorder = Recorder()
        async with agent_running(relay.ws_url, host.url, TokenSource(command=command),
                                 recorder=recorder, wait=False) as agent:
            await agent.wait_connected(timeout=5)
            assert recorder.outcomes[0].code == CloseCode.UNAUTHORIZED
            assert len(calls.read_text().splitlines()) == 2
            assert subject(relay) == "fresh"


async def test_unreadable_token_file_is_retried_not_fatal(tmp_path: Path, config: Config,
                                                         host: RunningHost) -> None:
    token_file = tmp_path / "missing-token"
    async with relay_on(config) as relay, agent_running(
        relay.ws_url, host.url, TokenSource(file=str(token_file)), wait=False,
    ) as agent:
        await eventually(lambda: agent.agent.attempts >= 2)
        assert agent.agent.last_outcome is not None
        assert agent.agent.last_outcome.reason == "token_unavailable"
        token_file.write_text(relay.agent_token(HOST))
        await agent.wait_connected(timeout=3)


# -- the watchdog ------------------------------------------------------------------------------

async def test_watchdog_abandons_a_black_holed_relay_and_reconnects() -> None:
    """HELLO, then total silence: no pings, no reads, no answer to a close frame, ever."""

    async def black_hole(ws: web.WebSocketResponse, relay: FakeRelay) -> None:
        await ws.send_bytes(hello(ping_interval_s=0.1, misses=2))
        await forever()

    recorder = Recorder()
    async with fake_relay(black_hole) as relay, agent_running(
        relay.url, "http://127.0.0.1:9", TokenSource(token="t"), recorder=recorder,
    ):
        await eventually(lambda: len(relay.connections) >= 2, timeout=3)
        gap = relay.connections[1] - relay.connections[0]
        # Silence limit 0.2 s, then an immediate reconnect (the tunnel had said HELLO).
        assert 0.15 <= gap < 0.2 + 0.6
        first = recorder.outcomes[0]
        assert first.abandoned and first.hello
        await relay.stop()


async def test_watchdog_leaves_a_quiet_but_live_relay_alone() -> None:
    async def pinging(ws: web.WebSocketResponse, relay: FakeRelay) -> None:
        """Sends nothing but PINGs and reads nothing: the agent's PONGs are not needed."""
        await ws.send_bytes(hello(ping_interval_s=0.1, misses=2))
        while True:
            await ws.send_bytes(frames.encode_ping(FrameType.PING, b"12345678"))
            await asyncio.sleep(0.05)

    async with fake_relay(pinging) as relay, agent_running(
        relay.url, "http://127.0.0.1:9", TokenSource(token="t"),
    ) as agent:
        await asyncio.sleep(0.6)  # three times the 0.2 s silence limit
        assert len(relay.connections) == 1
        assert agent.agent.connected
        await relay.stop()


# -- one local origin --------------------------------------------------------------------------

ESCAPES = ["//evil.example/x", "http://evil.example/x", "https://evil.example:8443/",
           "@evil.example/x", "//user@evil.example:80/x", "\\\\evil.example\\x", ":80@evil/x",
           "/%2F%2Fevil.example/x", "evil.example/x"]


def local_origin(upstream: str) -> LocalOrigin:
    return LocalOrigin(upstream, max_ws_message=1024)


@pytest.mark.parametrize("path", ESCAPES)
@pytest.mark.parametrize("websocket", [False, True])
def test_local_origin_never_leaves_its_origin(path: str, websocket: bool) -> None:
    origin = local_origin("http://127.0.0.1:3000/ignored/base")
    try:
        url = origin.url_for(Open("http", path=path, query="next=http://evil.example/"),
                             websocket=websocket)
    except ValueError:
        return  # refusing is fine too
    assert url.scheme == ("ws" if websocket else "http")
    assert (url.host, url.port) == ("127.0.0.1", 3000)
    assert url.user is None


def test_local_origin_keeps_the_path_byte_exact() -> None:
    origin = local_origin("http://127.0.0.1:3000")
    url = origin.url_for(Open("http", path="/a%2Fb/c%20d", query="x=%41&y"))
    assert str(url) == "http://127.0.0.1:3000/a%2Fb/c%20d?x=%41&y"


@dataclass
class Evil:
    hits: list[str] = field(default_factory=list)


@pytest.fixture
async def evil() -> AsyncIterator[tuple[RunningHost, Evil]]:
    """Another local server the agent must never reach."""
    seen = Evil()

    async def record(request: web.Request) -> web.Response:
        seen.hits.append(request.raw_path)
        return web.Response(text="evil")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    running = await start_host(app)
    try:
        yield running, seen
    finally:
        await running.stop()


def catch_all_host() -> web.Application:
    app = build_host_app()
    app.router.add_route("*", "/{tail:.*}", host_inspect)
    return app


async def test_paths_through_the_relay_stay_on_the_local_origin(
    config: Config, evil: tuple[RunningHost, Evil]
) -> None:
    evil_host, seen = evil
    host = await start_host(catch_all_host())
    try:
        async with relay_on(config) as relay, agent_running(
            relay.ws_url, host.url, TokenSource(token=relay.agent_token(HOST))
        ), aiohttp.ClientSession() as client:
            authority = f"127.0.0.1:{evil_host.port}"
            for path in [f"//{authority}/x", f"/http://{authority}/x", f"/@{authority}/x"]:
                url = f"{relay.url}/hosts/{HOST}{path}"
                async with client.get(URL(url, encoded=True),
                                      headers={"Authorization": f"Bearer {relay.token()}"}) as resp:
                    assert resp.status == 200
                    assert json.loads(await resp.read())["path"] == path
    finally:
        await host.stop()
    assert seen.hits == []


async def test_open_frames_from_the_relay_cannot_send_the_agent_elsewhere(
    evil: tuple[RunningHost, Evil],
) -> None:
    """Even a hostile relay only ever reaches the configured origin. Paths that start with
    "/" are served from the origin; an OPEN whose path does not is a protocol violation that
    ends the tunnel (1002) before anything is sent anywhere."""
    evil_host, seen = evil
    authority = f"127.0.0.1:{evil_host.port}"
    paths = [f"//{authority}/x", f"/http://{authority}/x", f"/@{authority}/x"]
    outside = [f"http://{authority}/x", f"@{authority}/x", f"{authority}/x"]
    answers: asyncio.Queue[tuple[str, str, int]] = asyncio.Queue()
    closes: asyncio.Queue[int | None] = asyncio.Queue()
    connections = [0]

    async def hostile(ws: web.WebSocketResponse, relay: FakeRelay) -> None:
        await ws.send_bytes(hello(ping_interval_s=5))
        kinds: dict[int, tuple[str, str]] = {}
        answered: set[int] = set()
        stream = 1
        connections[0] += 1
        if connections[0] > 1:
            if connections[0] - 2 >= len(outside):
                await ws.close()
                return
            await ws.send_bytes(frames.encode_json(
                FrameType.OPEN, 1, {"kind": "http", "method": "GET",
                                    "path": outside[connections[0] - 2],
                                    "query": "", "headers": []}, Flags.FIN))
            async for _ in ws:
                pass
            await closes.put(ws.close_code)
            return
        for path in paths:
            for kind in ("http", "ws"):
                kinds[stream] = (path, kind)
                await ws.send_bytes(frames.encode_json(
                    FrameType.OPEN, stream, {"kind": kind, "method": "GET", "path": path,
                                             "query": "", "headers": []},
                    Flags.FIN if kind == "http" else 0))
                stream += 2
        async for msg in ws:
            if msg.type is not WSMsgType.BINARY:
                continue
            frame = frames.decode(msg.data, 1 << 24)
            if frame.type is FrameType.PING:
                await ws.send_bytes(frames.encode_ping(FrameType.PONG, frame.payload))
            elif frame.type is FrameType.HEAD:
                path, kind = kinds[frame.stream_id]
                await answers.put((path, kind, int(frames.decode_json(frame)["status"])))
                answered.add(frame.stream_id)
                if len(answered) == len(kinds):
                    await ws.close()  # the agent comes back: to meet the next OPEN

    host = await start_host(catch_all_host())
    try:
        # Quick reconnects: each violation closes the tunnel, the next connection meets another.
        async with fake_relay(hostile) as relay, agent_running(
            relay.url, host.url, TokenSource(token="t"), backoff=Backoff(base=0.01, cap=0.05)
        ):
            results = [await asyncio.wait_for(answers.get(), 5) for _ in range(len(paths) * 2)]
            for _ in outside:
                # The agent reconnects after each violation: every connection meets one.
                assert await asyncio.wait_for(closes.get(), 15) == int(CloseCode.PROTOCOL_ERROR)
            await relay.stop()
    finally:
        await host.stop()
    assert seen.hits == []
    for path, kind, status in results:
        # Answered by the host service's catch-all (which is no WebSocket) or refused.
        assert status in ((200, 400) if kind == "http" else (200, 400, 502)), (path, kind, status)


HANGING_SCRIPT = """\
import os, pathlib, sys, time
pathlib.Path(sys.argv[1]).write_text(str(os.getpid()))
time.sleep(60)
"""


def process_exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().split(") ")[-1][:1]
    except (FileNotFoundError, ProcessLookupError):  # gone, or going while /proc is read
        return False
    return state not in ("", "Z")  # a zombie is already dead


async def test_token_command_cut_short_by_a_stopping_agent_is_killed(tmp_path: Path) -> None:
    script, pid_file = tmp_path / "hang.py", tmp_path / "pid"
    script.write_text(HANGING_SCRIPT)
    getting = asyncio.ensure_future(
        TokenSource(command=f"{sys.executable} {script} {pid_file}").get())
    await eventually(lambda: pid_file.exists() and pid_file.read_text() != "")
    pid = int(pid_file.read_text())
    assert process_exists(pid)
    getting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await getting
    await eventually(lambda: not process_exists(pid), timeout=3)


async def test_stopping_agent_does_not_wait_for_its_token_command(tmp_path: Path) -> None:
    script, pid_file = tmp_path / "hang.py", tmp_path / "pid"
    script.write_text(HANGING_SCRIPT)
    tokens = TokenSource(command=f"{sys.executable} {script} {pid_file}")
    agent = await run_agent("ws://127.0.0.1:9", "http://127.0.0.1:9", tokens, wait=False)
    await eventually(lambda: pid_file.exists() and pid_file.read_text() != "")
    agent.stop_event.set()
    await asyncio.wait_for(agent.task, 1.0)
    await eventually(lambda: not process_exists(int(pid_file.read_text())), timeout=3)


async def test_stopping_agent_does_not_wait_for_a_hanging_connect() -> None:
    """A relay address that accepts TCP but never answers the upgrade (up to 10 s)."""
    accepted = asyncio.Event()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        with contextlib.suppress(Exception):
            await reader.read()  # never answers; returns when the agent gives up
        writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        agent = await run_agent(f"ws://127.0.0.1:{port}", "http://127.0.0.1:9",
                                TokenSource(token="t"), wait=False)
        await asyncio.wait_for(accepted.wait(), 5)
        agent.stop_event.set()
        await asyncio.wait_for(agent.task, 1.0)
        assert agent.agent.last_outcome is not None
        assert agent.agent.last_outcome.reason == "stopped"
    finally:
        server.close()
        await server.wait_closed()


def test_first_4503_refusal_reconnects_at_once_and_repeats_back_off() -> None:
    from relay.agent.backoff import Backoff
    from relay.agent.client import Agent, Outcome
    from relay.agent.tokens import TokenSource
    from relay.errors import CloseCode

    agent = Agent(AgentOptions(relay_url="ws://127.0.0.1:1", host_id="acme:pc",
                               upstream="http://127.0.0.1:2"), TokenSource(token="t"),
                  backoff=Backoff(base=1.0, cap=30.0, rng=lambda: 1.0))
    for _ in range(4):  # an agent that had been failing for a while
        agent._delay_after(Outcome(None, "connect_failed"))
    refused = Outcome(int(CloseCode.DRAINING), "draining")
    first = agent._delay_after(refused)
    assert first <= 0.25  # reset and at once (a quarter of the base, for spread)
    delays = [agent._delay_after(Outcome(int(CloseCode.DRAINING), "draining")) for _ in range(4)]
    assert delays == sorted(delays) and delays[-1] >= 4.0  # no hot loop against a draining relay
