"""Agents that abuse the tunnel's control frames: memory stays bounded, the abuser is cut off.

The PING flood runs against a relay process (so its memory is its own to measure) from a raw
socket that speaks WebSocket by hand and never reads a byte of what the relay sends back.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import os
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from relay.config import Config, load_config
from relay.errors import CloseCode
from relay.protocol import frames
from relay.protocol.frames import FrameType
from tests.clock import FakeClock
from tests.harness import (
    Stack,
    agent_token,
    spawn_relay_process,
    stack,
    wait_http,
    write_config,
)
from tests.test_rogue_agent import ROGUE_HOST, RawTunnel

KiB, MiB = 1024, 1024 * 1024


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    raise AssertionError("no VmRSS")


def ws_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """One final, masked client frame. A zero mask key is legal and leaves the payload as is,
    so a flood costs the test no CPU to mask."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    return head + b"\0\0\0\0" + payload


async def raw_tunnel_socket(port: int, host_id: str, token: str
                            ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Upgrade ``/tunnel`` by hand; afterwards the caller decides what (not) to read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((
        f"GET /tunnel?hostId={host_id}&v=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head[:80]
    return reader, writer


@dataclass
class RelayProcess:
    """A `relay serve` process of its own (so its memory and logs are its own) in
    ``directory``, spawned on the first :meth:`running`; stopped (bounded) by :meth:`stop`."""

    directory: Path
    tunnel: dict[str, object] | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.directory / "relay.log"

    async def running(self) -> tuple[Config, str, subprocess.Popen[bytes]]:
        """Its config, base URL and process, healthy."""
        path = self.directory / "config.toml"
        if self.proc is None:
            write_config(self.directory, {"tunnel": self.tunnel} if self.tunnel else None)
            self.proc = spawn_relay_process(path, log_file=self.log)
        config = load_config(path, env={})
        url = f"http://127.0.0.1:{config.server.port}"
        await wait_http(f"{url}/healthz")
        return config, url, self.proc

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=15)


@contextlib.asynccontextmanager
async def relay_process(tmp_path: Path, tunnel: dict[str, object] | None = None,
                        ) -> AsyncIterator[tuple[Config, str, subprocess.Popen[bytes]]]:
    """A relay process for one test: its config, base URL and process."""
    relay = RelayProcess(tmp_path, tunnel)
    try:
        yield await relay.running()
    finally:
        relay.stop()


@pytest.fixture(scope="module")
def budget_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    """One relay process with a PING budget of 8 a second for the tests that can share it:
    each reads only what its own connection caused (its close, a counter of its own kind)
    and that nothing in the log is a traceback. Spawned by the first that runs."""
    relay = RelayProcess(tmp_path_factory.mktemp("budget-relay"), {"max_pings_per_s": 8})
    try:
        yield relay
    finally:
        relay.stop()


async def metric(client: aiohttp.ClientSession, url: str, name: str) -> float:
    async with client.get(f"{url}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_ping_flood_without_reading_keeps_relay_memory_flat_and_is_cut_off(
    tmp_path: Path,
) -> None:
    """100 KiB PINGs as fast as the socket takes them, never reading a PONG."""
    # Silence limit 0.5 s x 2: the flood runs the 1 s a write may stall (hundreds of MiB on
    # loopback) before the stalled writes cut it off. The PING budget is off here: this is
    # about what a peer that does not read can make the relay queue (the budget, on by
    # default, is tested below).
    ping_interval_s, misses = 0.5, 2
    tunnel: dict[str, object] = {"ping_interval_s": ping_interval_s, "keepalive_misses": misses,
                                 "max_pings_per_s": 0}
    async with relay_process(tmp_path, tunnel) as (config, url, proc):
        writer: asyncio.StreamWriter | None = None
        try:
            token = agent_token(config, ROGUE_HOST, "mallory")
            async with aiohttp.ClientSession() as client:
                _, writer = await raw_tunnel_socket(config.server.port, ROGUE_HOST, token)
                baseline = rss_bytes(proc.pid)
                ping = ws_frame(frames.encode_ping(FrameType.PING, os.urandom(100 * KiB)))
                peak, sent, cut = baseline, 0, False
                started = time.monotonic()
                last_sample = started
                while time.monotonic() - started < 15:
                    try:
                        writer.write(ping)
                        await asyncio.wait_for(writer.drain(), 1.0)
                        sent += 1
                    except (ConnectionError, TimeoutError):
                        pass  # the relay stopped reading or hung up: see below
                    now = time.monotonic()
                    if now - last_sample >= 0.1:
                        last_sample = now
                        peak = max(peak, rss_bytes(proc.pid))
                        if await metric(client, url, 'relay_tunnel_disconnects_total{reason="not_'
                                                     'reading"}') == 1:
                            cut = True
                            break
                flooded_s = time.monotonic() - started
            growth = peak - baseline
            print(f"ping flood: {sent} PINGs ({sent * 100 // 1024} MiB) in {flooded_s:.1f} s, "
                  f"relay RSS {baseline / MiB:.1f} MiB -> peak {peak / MiB:.1f} MiB "
                  f"(+{growth / MiB:.1f} MiB), cut off: {cut}")
            # A real flood, for most of the silence limit at least (none is cut before it).
            assert flooded_s >= 0.75 * ping_interval_s * misses and sent * 100 * KiB >= 32 * MiB
            assert growth < 32 * MiB
            assert cut, "the agent that does not read must be cut off"
            log = (tmp_path / "relay.log").read_text()
            assert "tunnel.peer_not_reading" in log and "Traceback" not in log
        finally:
            if writer is not None:
                writer.close()


async def test_a_ping_of_the_documented_256_kib_gets_its_pong(full_stack: Stack) -> None:
    tunnel = await RawTunnel.connect(full_stack.client, full_stack.relay, ROGUE_HOST,
                                     full_stack.agent_token(ROGUE_HOST), heartbeat_s=None)
    try:
        payload = os.urandom(256 * KiB)
        for _ in range(3):  # the issue saw the tunnel closed after two
            await tunnel.send(frames.encode_ping(FrameType.PING, payload))
            async with asyncio.timeout(5):
                while True:
                    msg = await tunnel.ws.receive()
                    assert msg.type is aiohttp.WSMsgType.BINARY, msg
                    frame = frames.decode(msg.data, 1 << 24)
                    if frame.type is FrameType.PONG and frame.payload == payload:
                        break
        assert full_stack.relay.state.registry.get(ROGUE_HOST) is not None
    finally:
        await tunnel.close()


async def test_a_ping_one_byte_over_256_kib_is_a_protocol_violation(full_stack: Stack) -> None:
    tunnel = await RawTunnel.connect(full_stack.client, full_stack.relay, ROGUE_HOST,
                                     full_stack.agent_token(ROGUE_HOST), heartbeat_s=None)
    try:
        await tunnel.send(frames.encode_ping(FrameType.PING, b"p" * (256 * KiB + 1)))
        code, _ = await tunnel.expect_close()
        assert code == CloseCode.PROTOCOL_ERROR
    finally:
        await tunnel.close()


async def test_a_data_frame_over_max_frame_is_a_protocol_violation(full_stack: Stack) -> None:
    """The socket's bound is the largest legal frame plus slack, not maxFrame: DATA is still
    held to maxFrame by the codec."""
    tunnel = await RawTunnel.connect(full_stack.client, full_stack.relay, ROGUE_HOST,
                                     full_stack.agent_token(ROGUE_HOST), heartbeat_s=None)
    try:
        max_frame = full_stack.relay.state.settings.max_frame
        await tunnel.send(frames.encode(FrameType.DATA, 1, b"d" * (max_frame + 1)))
        code, _ = await tunnel.expect_close()
        assert code == CloseCode.PROTOCOL_ERROR
    finally:
        with contextlib.suppress(Exception):
            await tunnel.close()


async def test_a_ping_flood_is_cut_off_1008_by_the_ping_budget_within_its_burst(
    budget_relay: RelayProcess,
) -> None:
    """Tiny PINGs as fast as the socket takes them (reading every PONG, so only the budget can
    stop it): the relay ends the tunnel with 1008 once the burst is spent, and stops reading."""
    config, url, _ = await budget_relay.running()
    writer: asyncio.StreamWriter | None = None
    try:
        token = agent_token(config, ROGUE_HOST, "mallory")
        reader, writer = await raw_tunnel_socket(config.server.port, ROGUE_HOST, token)
        ping = ws_frame(frames.encode_ping(FrameType.PING, b"x" * 16))
        writer.write(ping * 200)  # far beyond a burst of 16 at 8 per second
        await writer.drain()
        # Read to the end: the close code, and the hang-up (EOF, no close handshake awaited).
        seen: collections.Counter[int] = collections.Counter()
        code, _ = await asyncio.wait_for(read_server_frames(reader, seen), 10)
        assert code == int(CloseCode.POLICY_VIOLATION)
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as client:
            name = 'relay_tunnel_disconnects_total{reason="control_flood"}'
            polled_until = loop.time() + 10
            while await metric(client, url, name) != 1:
                assert loop.time() < polled_until, "the flood's disconnect was never counted"
                await asyncio.sleep(0.02)
        log = budget_relay.log.read_text()
        assert "tunnel.control_flood" in log and "Traceback" not in log
        assert token not in log
    finally:
        if writer is not None:
            writer.close()


async def test_an_honest_burst_of_pings_is_answered_and_the_tunnel_stays(
    full_stack: Stack,
) -> None:
    """The budget leaves honest keepalive alone: a burst of 16 PINGs at once is answered."""
    tunnel = await RawTunnel.connect(full_stack.client, full_stack.relay, ROGUE_HOST,
                                     full_stack.agent_token(ROGUE_HOST), heartbeat_s=None)
    try:
        sent = [n.to_bytes(8, "big") for n in range(16)]
        for payload in sent:
            await tunnel.send(frames.encode_ping(FrameType.PING, payload))
        answered: set[bytes] = set()
        async with asyncio.timeout(5):
            while sent[-1] not in answered:
                msg = await tunnel.ws.receive()
                assert msg.type is aiohttp.WSMsgType.BINARY, msg
                frame = frames.decode(msg.data, 1 << 24)
                if frame.type is FrameType.PONG:
                    answered.add(frame.payload)
        assert full_stack.relay.state.registry.get(ROGUE_HOST) is not None
    finally:
        await tunnel.close()


async def read_server_frames(reader: asyncio.StreamReader, seen: collections.Counter[int],
                             ) -> tuple[int | None, str]:
    """Read the relay's (unmasked) WebSocket frames until it hangs up; its close code and
    reason. ``seen`` counts the tunnel frame types that arrived."""
    close: tuple[int | None, str] = (None, "")
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            first, second = await reader.readexactly(2)
            size = second & 0x7F
            if size == 126:
                size = struct.unpack("!H", await reader.readexactly(2))[0]
            elif size == 127:
                size = struct.unpack("!Q", await reader.readexactly(8))[0]
            payload = await reader.readexactly(size)
            if first & 0x0F == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                close = (code, payload[2:].decode())
            elif first & 0x0F == 0x2 and payload:
                seen[payload[0]] += 1
    return close


async def _refusal_of(client: aiohttp.ClientSession, stack_: Stack, host_id: str,
                      token: str) -> tuple[int | None, str]:
    """Open a tunnel that the relay is expected to refuse; its close code and reason."""
    tunnel = await RawTunnel.connect(client, stack_.relay, host_id, token, wait_hello=False,
                                     heartbeat_s=None)
    try:
        return await tunnel.expect_close()
    finally:
        with contextlib.suppress(Exception):
            await tunnel.close()


async def test_a_subject_cut_off_for_a_ping_flood_may_not_come_straight_back(
    tmp_path: Path,
) -> None:
    """A flooder that reconnects at once would make the relay pay for a whole registration
    (and the start of another flood) per round trip: its subject is refused 1013 for
    ``tunnel.flood_lockout_s``, on every host id it may serve, while other agents are served."""
    lockout_s = 60
    async with stack(tmp_path, {"tunnel": {"flood_lockout_s": lockout_s}}) as running:
        config, client = running.relay.config, running.client
        # The lockout runs on the relay's clock, which the test moves (tunnels opened from now
        # on read it too; the stack's own agent, already connected, does not).
        clock = FakeClock(time.monotonic())
        running.relay.state.clock = clock
        mallory = agent_token(config, ROGUE_HOST, "mallory")
        flooder = await RawTunnel.connect(client, running.relay, ROGUE_HOST, mallory,
                                          heartbeat_s=None)
        for n in range(64):  # far past the burst
            with contextlib.suppress(ConnectionError):
                await flooder.send(frames.encode_ping(FrameType.PING, b"%08d" % n))
        code, _ = await flooder.expect_close()
        assert code == CloseCode.POLICY_VIOLATION
        await flooder.close()

        # The same subject, on the same host and on another it may serve: refused, and told
        # why and when to come back. Near the lockout's end, so that the relay holds each
        # refusal (min(retry in, 2 s)) for 1 s; side by side.
        clock.advance(lockout_s - 0.5)
        other_host = "acme:rogue-two"
        attempts = ((ROGUE_HOST, mallory),
                    (other_host, agent_token(config, other_host, "mallory")))
        refusals = await asyncio.gather(*(_refusal_of(client, running, host_id, token)
                                          for host_id, token in attempts))
        for (host_id, _), (code, reason) in zip(attempts, refusals, strict=True):
            assert code == CloseCode.TRY_AGAIN_LATER, (host_id, code, reason)
            assert "PING flood" in reason and "retry in 1 s" in reason
        # Someone else's agent is not held to mallory's lockout.
        honest = await RawTunnel.connect(client, running.relay, "acme:bystander",
                                         agent_token(config, "acme:bystander", "bob"))
        assert honest.hello
        await honest.close()
        async with client.get(f"{running.relay.url}/metrics") as resp:
            assert 'relay_tunnel_rejections_total{code="rate_limited"} 2.0' in await resp.text()

        # Once the lockout is over the subject is served again.
        clock.advance(1)
        tunnel = await RawTunnel.connect(client, running.relay, ROGUE_HOST, mallory,
                                         heartbeat_s=None)
        assert tunnel.hello
        await tunnel.close()


async def test_a_refused_agent_that_keeps_sending_is_not_read(
    budget_relay: RelayProcess,
) -> None:
    """No token, so 4401; then 64 KiB frames as fast as the socket takes them. The relay used
    to read (and decode) all of it while it waited for a close frame, for up to 2 s; now it
    stops reading once its close frame is out, so the sender stalls on full buffers."""
    # The budget is not in play: an agent without a token is refused before it counts.
    config, _, _ = await budget_relay.running()
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await raw_tunnel_socket(config.server.port, ROGUE_HOST, "")
        junk = ws_frame(frames.encode_ping(FrameType.PING, os.urandom(64 * KiB)))
        sent = 0
        with contextlib.suppress(ConnectionError, TimeoutError):
            while sent < 256 * MiB:
                writer.write(junk)
                await asyncio.wait_for(writer.drain(), 1.0)  # stalls once nothing is read
                sent += len(junk)
        seen: collections.Counter[int] = collections.Counter()
        code, reason = await asyncio.wait_for(read_server_frames(reader, seen), 10)
        print(f"refused and flooding: {sent / MiB:.1f} MiB taken before the sender stalled; "
              f"closed {code} {reason!r}")
        assert code == CloseCode.UNAUTHORIZED
        # What the kernel's socket buffers hold on both sides, not what 2 s of reading takes.
        assert sent < 48 * MiB
        assert "Traceback" not in budget_relay.log.read_text()
    finally:
        if writer is not None:
            writer.close()
