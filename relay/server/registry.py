"""Which tunnel serves which host on this relay: last write wins, removal is compare-and-delete."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from relay.metrics import DisconnectReason
from relay.server.leases import Lease
from relay.tunnel.gate import StreamGate
from relay.tunnel.session import TunnelSession


class CloseTunnel(Protocol):
    """Asks a tunnel's handler to close its socket; ``label`` says why on the metric and log
    when the close code alone does not (e.g. an operator's 1001 from a stopping relay's)."""

    def __call__(self, code: int, reason: str, *, label: DisconnectReason | None = None,
                 patient: bool = True) -> None: ...


@dataclass(eq=False, slots=True)
class Tunnel:
    """A registered agent tunnel; identity matters, so instances compare by ``is``."""

    host_id: str
    session: TunnelSession
    peer: str
    subject: str
    close: CloseTunnel
    gate: StreamGate  # who may open a stream on it now (fair, bounded queue)
    epoch: str = ""
    connected_at: float = field(default_factory=time.time)
    lease: Lease | None = None  # its credential's deadline (moved by in-band renewal)

    def describe(self) -> dict[str, Any]:
        return {
            "hostId": self.host_id,
            "connectedSince": self.connected_at,
            "peer": self.peer,
            "subject": self.subject,
            "protocolVersion": self.session.version,
            "credentialExpiresAt": None if self.lease is None else self.lease.deadline,
            "queued": self.gate.admission.queued,
            "lastInboundAgoS": round(self.session.silent_for(), 3),
            **self.session.describe(),
        }


class TunnelRegistry:
    def __init__(self) -> None:
        self._tunnels: dict[str, Tunnel] = {}

    def register(self, tunnel: Tunnel) -> Tunnel | None:
        """Install ``tunnel``; return the one it replaced (the caller closes that with 4409)."""
        old = self._tunnels.get(tunnel.host_id)
        self._tunnels[tunnel.host_id] = tunnel
        return old if old is not tunnel else None

    def unregister(self, tunnel: Tunnel) -> bool:
        """Remove ``tunnel`` only if it is still the current one for its host.

        A replaced tunnel's late close handler must not tear down its successor.
        """
        if self._tunnels.get(tunnel.host_id) is tunnel:
            del self._tunnels[tunnel.host_id]
            return True
        return False

    def get(self, host_id: str) -> Tunnel | None:
        return self._tunnels.get(host_id)

    def __len__(self) -> int:
        return len(self._tunnels)

    def __iter__(self) -> Iterator[Tunnel]:
        return iter(list(self._tunnels.values()))
