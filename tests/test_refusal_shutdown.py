"""A stopping relay does not wait out a refused tunnel's lingering close.

A refused ``/tunnel`` upgrade gets its close frame and then up to two seconds for the agent to
take it before the relay hangs up (relay.server.tunnels.hang_up_refused). A relay that stops
meanwhile hangs such connections up at once: the peer is owed nothing more, and a SIGTERM must
not wait on it.
"""

from __future__ import annotations

import time
from pathlib import Path

from relay.config import load_config
from relay.server.tunnels import CLOSE_TIMEOUT_S
from tests.harness import eventually, start_relay, write_config
from tests.rawws import CLOSE, RawWebSocket


async def test_a_stopping_relay_hangs_up_refused_tunnels_at_once(tmp_path: Path) -> None:
    relay = await start_relay(load_config(write_config(tmp_path), env={}))
    stopped = False
    try:
        refused = await RawWebSocket.connect(
            relay.config.server.port, "/tunnel?hostId=acme:refused&v=1",
            {"Authorization": "Bearer not-a-token"})
        close = await refused.receive()
        assert close.opcode == CLOSE and int.from_bytes(close.data[:2], "big") == 4401
        # The relay now holds the connection, reading nothing, for the agent to answer.
        await eventually(lambda: len(relay.state.refusing) == 1)
        started = time.monotonic()
        await relay.listeners.cleanup()  # what `relay serve` does on SIGTERM after its drain
        stopped = True
        took = time.monotonic() - started
        assert took < CLOSE_TIMEOUT_S / 2, f"the stop waited {took:.2f}s on a refused tunnel"
        assert relay.state.refusing == set()
        assert await refused.wait_closed(within=1) is None  # hung up, nothing more sent
        refused.abort()
    finally:
        if not stopped:
            await relay.stop()
