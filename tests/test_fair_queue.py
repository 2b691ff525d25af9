"""Past the stream limit a host's traffic waits its turn, fairly, instead of being shed.

End to end: a real relay, agent and host service; the clients are real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path

import aiohttp

from relay.errors import CloseCode
from tests.harness import Stack, eventually, host_app_with_hold, stack
from tests.rawhttp import parse_responses

# These tests put hundreds of clients on the one event loop the relay and the agent share: on a
# loaded machine it can stall for seconds, and the harness's 1 s keepalive (3 s of silence and
# the tunnel is dropped) would cut the tunnel under the test rather than test the queue.
QUIET_KEEPALIVE_S = 5


async def test_a_burst_of_1500_concurrent_requests_to_one_host_all_complete(
    tmp_path: Path,
) -> None:
    """The default stream limits (256, half of them per subject): the burst is queued, not shed.

    Client, relay, agent and host share this test's one event loop (and the machine's CPUs with
    whatever else runs), so the queue and host timeouts are generous here (a 504 under a loaded
    machine said nothing about queueing); relay logs are kept quiet.
    """
    sections = {"tunnel": {"queue_timeout_s": 30, "request_timeout_s": 30,
                           "ping_interval_s": QUIET_KEEPALIVE_S},
                "log": {"level": "warning"}}
    async with stack(tmp_path, sections) as s:
        port = s.relay.config.server.port
        # The clients are plain sockets, one request each: an HTTP client library's own
        # per-request work was about a quarter of this test's CPU, and the relay sees the same
        # requests.
        head = (f"GET /hosts/{s.host_id}/small?size=100&n={{n}} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {s.token()}\r\n"
                "Connection: close\r\n\r\n")

        async def get(n: int) -> int:
            async with asyncio.timeout(60):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                try:
                    writer.write(head.format(n=n).encode())
                    (response,) = parse_responses(await reader.read(-1))
                    assert response.status != 200 or response.body == b"x" * 100, response
                    return response.status
                finally:
                    writer.close()

        started = time.monotonic()
        statuses = Counter(await asyncio.gather(*(get(n) for n in range(1500))))
        elapsed = time.monotonic() - started
        print(f"burst: {statuses[200]} of 1500 completed in {elapsed:.1f} s ({dict(statuses)})")
        assert statuses == Counter({200: 1500})
        gate = s.relay.state.registry.get(s.host_id)
        assert gate is not None and gate.gate.admission.in_flight == 0


async def _open_idle_channels(s: Stack, client: aiohttp.ClientSession, token: str, count: int
                              ) -> tuple[list[aiohttp.ClientWebSocketResponse], Counter[int]]:
    """Open ``count`` WebSocket channels; the open ones and the close codes of the refused."""
    opened: list[aiohttp.ClientWebSocketResponse] = []
    refused: Counter[int] = Counter()

    async def one() -> None:
        ws = await client.ws_connect(s.url("/ws").replace("http", "ws", 1),
                                       headers={"Authorization": f"Bearer {token}"})
        await ws.send_str("hi")
        msg = await asyncio.wait_for(ws.receive(), 10)
        if msg.type is aiohttp.WSMsgType.TEXT:
            opened.append(ws)
        else:
            refused[ws.close_code or 0] += 1
            await ws.close()

    await asyncio.gather(*(one() for _ in range(count)))
    return opened, refused


async def test_one_client_holding_300_idle_channels_cannot_lock_out_another(
    tmp_path: Path,
) -> None:
    keepalive = {"tunnel": {"ping_interval_s": QUIET_KEEPALIVE_S}}
    async with stack(tmp_path, keepalive) as s, aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
    ) as client:
        alice = s.token(sub="alice")
        opened, refused = await _open_idle_channels(s, client, alice, 300)
        try:
            share = s.relay.state.registry.get(s.host_id)
            assert share is not None
            print(f"idle channels: {len(opened)} open, refused {dict(refused)}")
            assert len(opened) == 128  # half of max_streams
            assert refused == Counter({int(CloseCode.TRY_AGAIN_LATER): 172})
            # Bob's HTTP gets through at once, over and over.
            bob = s.auth(s.token(sub="bob"))
            for _ in range(20):
                async with s.client.get(s.url("/"), headers=bob) as resp:
                    assert resp.status == 200
            # And bob may open channels of his own.
            bob_open, bob_refused = await _open_idle_channels(s, client, s.token(sub="bob"), 3)
            assert len(bob_open) == 3 and not bob_refused
            for ws in bob_open:
                await ws.close()
        finally:
            for ws in opened:
                with contextlib.suppress(Exception):
                    await ws.close()
        # Closed channels give their streams back.
        tunnel = s.relay.state.registry.get(s.host_id)
        assert tunnel is not None
        await eventually(lambda: tunnel.gate.admission.in_flight == 0)


async def test_a_subject_at_its_share_queues_its_http_while_others_pass(tmp_path: Path) -> None:
    tunnel_limits = {"max_streams": 4, "max_streams_per_subject": 2, "queue_timeout_s": 5}
    release = asyncio.Event()  # the host holds alice's requests until bob has been answered
    async with stack(tmp_path, sections={"tunnel": tunnel_limits},
                     host_app=host_app_with_hold(release)) as s:
        alice, bob = s.auth(s.token(sub="alice")), s.auth(s.token(sub="bob"))

        async def held(headers: dict[str, str]) -> None:
            async with s.client.get(s.url("/hold"), headers=headers) as resp:
                assert resp.status == 200
                await resp.read()

        alice_done = [asyncio.ensure_future(held(alice)) for _ in range(4)]
        tunnel = s.relay.state.registry.get(s.host_id)
        assert tunnel is not None
        admission = tunnel.gate.admission
        await eventually(lambda: admission.queued == 2)
        agent_session = s.agent.agent.session
        assert agent_session is not None
        await eventually(lambda: len(agent_session.channels) == 2)
        async with s.client.get(s.url("/"), headers=bob) as resp:
            assert resp.status == 200  # bob is not behind alice's queue...
        # ...which is still there: her first two are at the host, her last two wait for them.
        assert not any(done.done() for done in alice_done)
        assert (admission.in_flight, admission.queued) == (2, 2)
        release.set()
        await asyncio.wait_for(asyncio.gather(*alice_done), 10)
        metrics = s.relay.state.metrics.registry
        assert metrics.get_sample_value("relay_stream_queue_total", {"outcome": "waited"}) == 2
        assert metrics.get_sample_value("relay_stream_queue_wait_seconds_count") == 2
