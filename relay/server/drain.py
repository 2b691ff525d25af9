"""The relay's end: a drain (SIGTERM: refuse new work, let in-flight work finish, 4503) and the
stop that follows it or replaces it (1001 to every agent, then every owned task cancelled).

Both find the close handshakes they started through the ``tunnel-close`` task group.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from relay.errors import CloseCode
from relay.protocol.messages import Drain
from relay.server.registry import Tunnel
from relay.server.state import TUNNEL_CLOSE, TUNNEL_RELEASE, RelayState
from relay.tunnel.ws_channel import CLOSE_TIMEOUT_S

log = structlog.get_logger("relay.server")


async def drain(state: RelayState, grace_s: float) -> None:
    """Refuse new work, tell every agent in-band, let in-flight exchanges finish, then close.

    Bounded: ``grace_s`` for in-flight HTTP exchanges, then at most ~1 s to flush the last frames
    and ~3 s for the close handshakes, however many tunnels there are (they run concurrently).
    """
    if state.draining:
        return
    state.draining = True
    state.metrics.draining.set(1)
    started = time.monotonic()
    log.info("relay.draining", tunnels=len(state.registry), inflight=state.inflight_http,
             grace_s=grace_s)
    told: set[Tunnel] = set()  # Tunnel compares by identity

    def tell(tunnels: list[Tunnel]) -> None:
        for tunnel in tunnels:
            if tunnel not in told:
                told.add(tunnel)
                tunnel.session.send_drain(Drain("relay draining", 0))

    tell(list(state.registry))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(state.idle.wait(), grace_s)
    cut = state.inflight_http
    if cut:
        log.warning("relay.drain_grace_expired", inflight=cut, grace_s=grace_s)
    # Re-read the registry: a tunnel whose handshake was already past the draining check when
    # the drain began may have registered since; it gets the same drain and 4503.
    tunnels = list(state.registry)
    tell(tunnels)
    if tunnels:
        # Let the DRAIN frames reach the sockets, all tunnels at once (a black-holed agent
        # must not hold up the others).
        await asyncio.gather(*(t.session.flush(timeout=1.0) for t in tunnels))
    for tunnel in tunnels:
        tunnel.session.fail_all(int(CloseCode.DRAINING), "relay draining; reconnect at once")
        tunnel.close(int(CloseCode.DRAINING), "relay draining")
    if state.links is not None:  # channels forwarded from here close 4503 like local ones
        state.links.fail_all(int(CloseCode.DRAINING), "relay draining; reconnect at once")
    # Give the close frames a moment to leave (bounded: closes time out on their own).
    await state.tasks.group(TUNNEL_CLOSE).wait(timeout=3)
    log.info("relay.drained", duration_s=round(time.monotonic() - started, 3),
             tunnels=len(tunnels), cut=cut, inflight_left=state.inflight_http)


async def stop(state: RelayState) -> None:
    """Close every tunnel (1001) and cancel every task the relay owns, each step bounded."""
    # Without a drain (a test, a crash path) agents must still hear that we are going, or they
    # only find out at their keepalive deadline.
    for tunnel in list(state.registry):
        tunnel.close(int(CloseCode.GOING_AWAY), "relay stopping")
    await state.tasks.group(TUNNEL_CLOSE).wait(timeout=2.5)
    for tunnel in list(state.registry):
        await tunnel.session.close(int(CloseCode.GOING_AWAY), "relay stopping")
    # The closed tunnels' directory entries: released by tasks (no handler awaits them now
    # that aiohttp does not serve the tunnels), which the cancel below must not cut short.
    await state.tasks.group(TUNNEL_RELEASE).wait(timeout=2)
    await state.tasks.cancel(timeout=5)
    for socket in list(state.tunnel_sockets):  # whatever did not close in time
        socket.abort()
    await _end_ws_channels(state)


async def _end_ws_channels(state: RelayState) -> None:
    """The clients' channels ended with their tunnels (closed above); their close handshakes
    run in their handlers' tasks, which aiohttp's shutdown no longer waits for (the relay took
    their connections over). Wait for them (bounded), then hang up on the rest."""
    pumps = {bridge.task for bridge in state.ws_bridges if bridge.task is not None}
    if pumps:
        await asyncio.wait(pumps, timeout=CLOSE_TIMEOUT_S + 0.5)
    for bridge in list(state.ws_bridges):
        bridge.abort()
    pumps = {bridge.task for bridge in state.ws_bridges if bridge.task is not None}
    if pumps:  # a hung-up socket ends its pump at once
        await asyncio.wait(pumps, timeout=1.0)
