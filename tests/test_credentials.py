"""Long-lived connections keep to their credentials, end to end.

A WebSocket channel closes 4401 when its token expires and 4403 when its access is revoked; a
tunnel closes 4401 at its token's expiry unless the agent renews in-band (protocol v2), and a
v1 agent comes back with a fresh token. The auth leeway is 0, and the relay's wall clock (and
the agent's renewal clock) is a shifted one the test sets to just before a deadline instead of
waiting for it: real time still runs, so every timer is the real one; the times from deadline
to close (on that clock) are printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import jwt
import pytest

from relay.agent.tokens import TokenSource
from relay.config import load_config
from relay.errors import CloseCode
from relay.protocol import frames
from relay.protocol.frames import FrameType
from tests.clock import ShiftedClock
from tests.harness import (
    RunningHost,
    RunningRelay,
    eventually,
    start_agent,
    start_host,
    start_relay,
    write_config,
)
from tests.test_rogue_agent import RawTunnel

HOST = "acme:laptop"
SECRET = "admin-secret-for-credential-tests"


def claim_of(token: str, name: str) -> float:
    return float(jwt.decode(token, options={"verify_signature": False})[name])


def exp_of(token: str) -> float:
    return claim_of(token, "exp")


@dataclass
class Setup:
    relay: RunningRelay
    host: RunningHost
    client: aiohttp.ClientSession
    clock: ShiftedClock  # the relay's wall clock

    def jump(self, now: float) -> None:
        """Set the relay's time to ``now``; its credential timer re-reads the clock at once."""
        self.clock.set(now)
        self.relay.state.leases.clock_stepped()

    def ws_url(self, path: str = "/ws") -> str:
        return f"{self.relay.ws_url}/hosts/{HOST}{path}"

    async def channel(self, token: str) -> aiohttp.ClientWebSocketResponse:
        ws = await self.client.ws_connect(self.ws_url(),
                                          headers={"Authorization": f"Bearer {token}"})
        await ws.send_str("ping")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, "ping")
        return ws

    async def revoke(self, body: dict[str, str]) -> None:
        async with self.client.post(f"{self.relay.url}/admin/revoke", json=body,
                                    headers={"Authorization": f"Bearer {SECRET}"}) as resp:
            assert resp.status == 200, await resp.text()


@contextlib.asynccontextmanager
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    config = load_config(write_config(tmp_path, {
        "auth": {"leeway_s": 0},
        "admin": {"secret": SECRET},
    }), env={})
    clock = ShiftedClock()
    relay = await start_relay(config, wall_clock=clock)
    host = await start_host()
    client = aiohttp.ClientSession()
    try:
        yield Setup(relay, host, client, clock)
    finally:
        await client.close()
        await relay.stop()
        await host.stop()


@pytest.fixture
async def creds(tmp_path: Path) -> AsyncIterator[Setup]:
    async with setup(tmp_path) as running:
        yield running


async def closed_within(ws: aiohttp.ClientWebSocketResponse, seconds: float,
                        clock: Callable[[], float] = time.time,
                        ) -> tuple[int | None, str, float]:
    """Wait for the relay to close ``ws``: its code, reason and when (on ``clock``)."""
    async with asyncio.timeout(seconds):
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.CLOSE:
                return int(msg.data), str(msg.extra or ""), clock()
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return ws.close_code, "", clock()


# -- channels ---------------------------------------------------------------------------------


async def test_a_channel_is_closed_4401_when_its_token_expires(creds: Setup) -> None:
    agent = await start_agent(creds.relay.ws_url, HOST, creds.host.url,
                              token=creds.relay.agent_token(HOST, sub="agent"))
    try:
        token = creds.relay.token(sub="alice", ttl_s=60)
        ws = await creds.channel(token)
        creds.jump(exp_of(token) - 0.05)
        code, reason, at = await closed_within(ws, 5, creds.clock)
        lag = at - exp_of(token)
        print(f"channel closed {code} {reason!r} {lag * 1000:.0f} ms after exp")
        assert (code, reason) == (CloseCode.UNAUTHORIZED, "token expired")
        assert 0 <= lag < 0.5
        assert creds.relay.state.metrics.registry.get_sample_value(
            "relay_credential_closes_total", {"kind": "channel", "reason": "expired"}) == 1
        # The tunnel and other users are untouched.
        assert agent.agent.connects == 1
        other = await creds.channel(creds.relay.token(sub="bob"))
        await other.close()
    finally:
        await agent.stop()


async def test_revoking_a_subject_closes_its_channels_4403_and_spares_others(
    creds: Setup,
) -> None:
    agent = await start_agent(creds.relay.ws_url, HOST, creds.host.url,
                              token=creds.relay.agent_token(HOST, sub="agent"))
    try:
        alice = [await creds.channel(creds.relay.token(sub="alice")) for _ in range(3)]
        bob = await creds.channel(creds.relay.token(sub="bob"))
        revoked_at = time.time()
        await creds.revoke({"sub": "alice"})
        for ws in alice:
            code, reason, at = await closed_within(ws, 5)
            assert (code, reason) == (CloseCode.FORBIDDEN, "access revoked")
        print(f"revoked channels closed {(at - revoked_at) * 1000:.0f} ms after the revoke call")
        assert at - revoked_at < 1.0
        await bob.send_str("still here")
        assert (await asyncio.wait_for(bob.receive(), 5)).data == "still here"
        assert agent.agent.connects == 1  # the tunnel's subject is "agent": not revoked
        await bob.close()
    finally:
        await agent.stop()


async def test_revoking_a_host_closes_its_tunnel_and_channels_4403(creds: Setup) -> None:
    agent = await start_agent(creds.relay.ws_url, HOST, creds.host.url,
                              token=creds.relay.agent_token(HOST, sub="agent"))
    try:
        ws = await creds.channel(creds.relay.token(sub="alice"))
        revoked_at = time.time()
        await creds.revoke({"hostId": HOST})
        code, _, at = await closed_within(ws, 5)
        # The channel's own lease closes it 4403; its tunnel closing at the same time would
        # have made it 4410: either way it is gone at once.
        assert code in (CloseCode.FORBIDDEN, CloseCode.TUNNEL_GONE)
        await eventually(lambda: agent.agent.last_outcome is not None
                         and agent.agent.last_outcome.code == CloseCode.FORBIDDEN)
        print(f"revoked host: channel and tunnel closed {(at - revoked_at) * 1000:.0f} ms "
              "after the revoke call")
        assert at - revoked_at < 1.0
    finally:
        await agent.stop()


# -- tunnels: v1 closed at exp and back with a fresh token; v2 renews in-band -------------------


@contextlib.asynccontextmanager
async def fresh_token_file(creds: Setup, path: Path, ttl_s: int,
                           every_s: float = 0.25) -> AsyncIterator[list[str]]:
    """A token file that something outside the agent keeps fresh, as a login helper would (on
    the relay's clock, as a login helper's tokens are on the issuer's)."""
    written: list[str] = []

    def mint() -> str:
        return creds.relay.agent_token(HOST, sub="agent", ttl_s=ttl_s, now=creds.clock())

    async def refresh() -> None:
        while True:
            token = mint()
            if not written or written[-1] != token:
                path.write_text(token)  # noqa: ASYNC240 (a few hundred bytes to a tmp file)
                written.append(token)
            await asyncio.sleep(every_s)

    first = mint()
    path.write_text(first)  # noqa: ASYNC240
    written.append(first)
    task = asyncio.ensure_future(refresh())
    task.set_name("test-token-refresher")
    try:
        yield written
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def test_a_v1_tunnel_is_closed_4401_at_exp_and_comes_back_with_a_fresh_token(
    creds: Setup, tmp_path: Path,
) -> None:
    async with fresh_token_file(creds, tmp_path / "token", ttl_s=60) as written:
        agent = await start_agent(creds.relay.ws_url, HOST, creds.host.url,
                                  tokens=TokenSource(file=str(tmp_path / "token")),
                                  versions=(1,))
        try:
            first_exp = exp_of(written[0])
            tunnel = creds.relay.state.registry.get(HOST)
            assert tunnel is not None and tunnel.session.version == 1
            creds.jump(first_exp - 0.05)
            await eventually(lambda: agent.agent.last_outcome is not None, timeout=6)
            closed_at = creds.clock()
            outcome = agent.agent.last_outcome
            assert outcome is not None and outcome.code == CloseCode.UNAUTHORIZED
            print(f"v1 tunnel closed 4401 about {(closed_at - first_exp) * 1000:.0f} ms after "
                  "exp (seen by the agent)")
            assert 0 <= closed_at - first_exp < 1.0
            await eventually(lambda: agent.agent.connects == 2 and agent.agent.connected,
                             timeout=5)
            async with creds.client.get(f"{creds.relay.url}/hosts/{HOST}/",
                                        headers={"Authorization":
                                                 f"Bearer {creds.relay.token()}"}) as resp:
                assert resp.status == 200
        finally:
            await agent.stop()


async def test_a_v2_agent_renews_in_band_and_no_request_fails_across_the_renewal(
    creds: Setup, tmp_path: Path,
) -> None:
    """Tokens of 60 s, renewed at half their life: the test writes each fresh token to the
    file (as a login helper would), then moves the relay's and the agent's clock to just
    before the renewal is due; requests run back to back throughout."""
    clock, path = creds.clock, tmp_path / "token"

    def write_token(now: float) -> str:
        token = creds.relay.agent_token(HOST, sub="agent", ttl_s=60, now=now)
        path.write_text(token)
        return token

    current = write_token(clock())
    agent = await start_agent(creds.relay.ws_url, HOST, creds.host.url,
                              tokens=TokenSource(file=str(path)),
                              renew_clock=clock, renew_sleep=clock.sleep)
    statuses: list[int] = []

    async def requests() -> None:
        token = creds.relay.token(sub="alice")
        while True:
            async with creds.client.get(f"{creds.relay.url}/hosts/{HOST}/",
                                        headers={"Authorization": f"Bearer {token}"}) as resp:
                await resp.read()
                statuses.append(resp.status)
            await asyncio.sleep(0.02)

    async def more_requests() -> None:
        seen = len(statuses)
        await eventually(lambda: len(statuses) >= seen + 3)

    traffic = asyncio.ensure_future(requests())
    try:
        tunnel = creds.relay.state.registry.get(HOST)
        assert tunnel is not None and tunnel.session.version == 2
        assert tunnel.lease is not None
        first_deadline = tunnel.lease.deadline
        assert first_deadline == exp_of(current)
        await more_requests()
        # Two renewals, then past the first token's exp (+1 s): the lease of a tunnel that was
        # not renewed closes it at exp (+1 ms).
        for _ in range(2):
            due = claim_of(current, "iat") + 30
            current = write_token(due)
            creds.jump(due - 0.05)
            fresh = exp_of(current)

            def renewed(fresh: float = fresh) -> bool:
                return tunnel.lease is not None and tunnel.lease.deadline == fresh

            await eventually(renewed)
            await more_requests()
        assert tunnel.lease.deadline > first_deadline + 1
        creds.jump(first_deadline + 1.0)
        await more_requests()
        assert statuses and set(statuses) == {200}
        assert agent.agent.connects == 1 and agent.agent.connected
        assert creds.relay.state.registry.get(HOST) is tunnel
        print(f"v2 tunnel renewed: {len(statuses)} requests across the renewals, all 200; "
              f"deadline moved {tunnel.lease.deadline - first_deadline:.0f} s")
    finally:
        traffic.cancel()
        with contextlib.suppress(BaseException):
            await traffic
        await agent.stop()


async def test_a_v2_tunnel_that_does_not_renew_is_closed_4401_at_exp(creds: Setup) -> None:
    token = creds.relay.agent_token(HOST, sub="agent", ttl_s=60)
    tunnel = await RawTunnel.connect(creds.client, creds.relay, HOST, token,
                                     query=f"hostId={HOST}&v=1,2")
    try:
        assert tunnel.hello["version"] == 2 and tunnel.hello["renew"] is True
        assert tunnel.hello["expiresAt"] == exp_of(token)
        creds.jump(exp_of(token) - 0.05)
        code, reason = await tunnel.expect_close(within=5)
        lag = creds.clock() - exp_of(token)
        assert (code, reason) == (CloseCode.UNAUTHORIZED, "token expired")
        assert 0 <= lag < 1.0
    finally:
        await tunnel.close()


# -- RENEW frames from a hand-driven agent ----------------------------------------------------


async def raw_v2(creds: Setup, sub: str = "agent", ttl_s: int = 600) -> RawTunnel:
    return await RawTunnel.connect(creds.client, creds.relay, HOST,
                                   creds.relay.agent_token(HOST, sub=sub, ttl_s=ttl_s),
                                   query=f"hostId={HOST}&v=2")


async def test_renew_with_a_fresh_token_is_answered_renewed(creds: Setup) -> None:
    tunnel = await raw_v2(creds, ttl_s=60)
    try:
        fresh = creds.relay.agent_token(HOST, sub="agent", ttl_s=3600)
        await tunnel.send(frames.encode_json(FrameType.RENEW, 0, {"token": fresh}))
        answer = frames.decode_json(await tunnel.expect(FrameType.RENEWED))
        assert answer == {"expiresAt": exp_of(fresh)}
        registered = creds.relay.state.registry.get(HOST)
        assert registered is not None and registered.lease is not None
        assert registered.lease.deadline == exp_of(fresh)
    finally:
        await tunnel.close()


async def test_renew_with_another_subjects_token_closes_the_tunnel_4403(creds: Setup) -> None:
    tunnel = await raw_v2(creds)
    try:
        other = creds.relay.agent_token(HOST, sub="mallory")
        await tunnel.send(frames.encode_json(FrameType.RENEW, 0, {"token": other}))
        code, reason = await tunnel.expect_close()
        assert code == CloseCode.FORBIDDEN and "subject" in reason
    finally:
        await tunnel.close()


async def test_renew_with_an_expired_or_bad_token_closes_the_tunnel_4401(creds: Setup) -> None:
    for bad in (creds.relay.agent_token(HOST, sub="agent", extra={"exp": int(time.time()) - 5}),
                "not-a-token"):
        tunnel = await raw_v2(creds)
        try:
            await tunnel.send(frames.encode_json(FrameType.RENEW, 0, {"token": bad}))
            code, _ = await tunnel.expect_close()
            assert code == CloseCode.UNAUTHORIZED
        finally:
            await tunnel.close()


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b'{"token": 7}', b"{}"])
async def test_garbage_renew_is_a_protocol_violation(creds: Setup, payload: bytes) -> None:
    tunnel = await raw_v2(creds)
    try:
        await tunnel.send(frames.encode(FrameType.RENEW, 0, payload))
        code, _ = await tunnel.expect_close()
        assert code == CloseCode.PROTOCOL_ERROR
    finally:
        await tunnel.close()


async def test_renew_on_a_v1_tunnel_is_an_unknown_frame(creds: Setup) -> None:
    tunnel = await RawTunnel.connect(creds.client, creds.relay, HOST,
                                     creds.relay.agent_token(HOST, sub="agent"))
    try:
        assert tunnel.hello["version"] == 1 and "renew" not in tunnel.hello
        fresh = creds.relay.agent_token(HOST, sub="agent")
        await tunnel.send(frames.encode_json(FrameType.RENEW, 0, {"token": fresh}))
        code, _ = await tunnel.expect_close()
        assert code == CloseCode.PROTOCOL_ERROR
    finally:
        await tunnel.close()


async def test_a_renew_sent_before_the_last_was_answered_replaces_it(creds: Setup) -> None:
    tunnel = await raw_v2(creds, ttl_s=60)
    try:
        older = creds.relay.agent_token(HOST, sub="agent", ttl_s=1800)
        newer = creds.relay.agent_token(HOST, sub="agent", ttl_s=3600)
        await tunnel.send(frames.encode_json(FrameType.RENEW, 0, {"token": older}))
        await tunnel.send(frames.encode_json(FrameType.RENEW, 0, {"token": newer}))
        # Frames keep their order: an answer to the older RENEW would have come first.
        answer = frames.decode_json(await tunnel.expect(FrameType.RENEWED))
        assert answer == {"expiresAt": exp_of(newer)}
        assert creds.relay.state.registry.get(HOST) is not None
    finally:
        await tunnel.close()
