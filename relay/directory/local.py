"""In-process directory for a single relay: every tunnel is local, nothing can be unavailable."""

from __future__ import annotations

from typing import Any

from relay.config import DirectoryConfig
from relay.directory.base import Directory, Owner, new_epoch


class LocalDirectory(Directory):
    """The directory of a relay that runs alone (``directory.backend = "local"``).

    It keeps the same contract as the Redis directory (epochs, compare-and-delete, revocation
    callbacks) so the server code is identical for both backends.
    """

    def __init__(self, config: DirectoryConfig) -> None:
        super().__init__(config.instance_id or "local", config.advertise_url)
        self._entries: dict[str, str] = {}  # host_id -> epoch

    @property
    def healthy(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()

    async def register(self, host_id: str) -> str:
        epoch = new_epoch()
        self._entries[host_id] = epoch
        return epoch

    async def unregister(self, host_id: str, epoch: str) -> bool:
        if self._entries.get(host_id) != epoch:
            return False
        del self._entries[host_id]
        return True

    async def lookup(self, host_id: str) -> Owner | None:
        epoch = self._entries.get(host_id)
        if epoch is None:
            return None
        return Owner(self.instance_id, self.advertise_url, epoch)

    async def publish_revocation(self, sub: str | None, host: str | None) -> None:
        self._deliver_revocation(sub, host)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "local",
            "instance_id": self.instance_id,
            "advertise_url": self.advertise_url,
            "healthy": True,
            "registrations": len(self._entries),
        }
