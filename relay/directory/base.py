"""The directory interface: which relay owns which tunnel, plus cross-relay revocations.

A relay asks the directory two things: "may I take this host's tunnel?" (``register``, which
must succeed *before* the tunnel is accepted, so no other relay ever routes into a black hole)
and "who holds this host's tunnel?" (``lookup``, used to forward a request to the owner). It
also fans admin revocations out to every relay.

Ownership is last-write-wins: a newer registration for a host replaces an older one, wherever
it was made. Every registration gets a fresh ``epoch`` token so that removing an entry is a
compare-and-delete: a stale relay (or a replaced tunnel's late close handler) can never delete
an entry that somebody registered since.

Implementations: :class:`relay.directory.local.LocalDirectory` (one relay, in-process) and
:class:`relay.directory.redis.RedisDirectory` (any number of relays sharing one Redis).
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

__all__ = [
    "Directory",
    "LostCallback",
    "Owner",
    "RevocationCallback",
    "new_epoch",
]

log = structlog.get_logger("relay.directory")

# callback(sub, host); None is a wildcard, so (None, None) means "revoke everything".
RevocationCallback = Callable[[str | None, str | None], None]
# callback(host_id, epoch): this relay's registration `epoch` for `host_id` was taken over.
LostCallback = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class Owner:
    """The relay holding a host's tunnel, as recorded in the directory."""

    instance_id: str
    url: str  # the owner's advertise_url: where other relays forward to
    epoch: str  # unique per registration; what compare-and-delete compares


def new_epoch() -> str:
    """A token unique to one registration (random, so unique across relays and restarts)."""
    return uuid.uuid4().hex


class Directory(abc.ABC):
    """Where tunnels are registered and found, and revocations fanned out.

    Lifecycle: ``await start()`` once, ``await close()`` once (idempotent). Callers must not run
    two ``register()`` calls for the same host concurrently on one relay: the relay's tunnel
    registry decides which of two local tunnels is newer, and registers them in that order.
    """

    def __init__(self, instance_id: str, advertise_url: str) -> None:
        self._instance_id = instance_id
        self._advertise_url = advertise_url
        self._revocation_callbacks: list[RevocationCallback] = []
        self._lost_callbacks: list[LostCallback] = []

    @property
    def instance_id(self) -> str:
        """This relay's id, unique among the relays sharing a directory."""
        return self._instance_id

    @property
    def advertise_url(self) -> str:
        """How other relays reach this one (what lookups of our hosts return as ``url``)."""
        return self._advertise_url

    @property
    @abc.abstractmethod
    def healthy(self) -> bool:
        """True while the backend answers; ``/readyz`` reports 503 when False."""

    async def check_ready(self) -> bool:
        """``healthy``, confirmed by a cheap bounded check when the last one is stale.

        ``/readyz`` calls this; the default has nothing to confirm.
        """
        return self.healthy

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect, clear what a previous run of this instance left behind, start background
        work. Never raises for an unreachable backend: the directory starts unhealthy and
        recovers on its own."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Cancel every task the directory owns, release this relay's entries, disconnect.
        Every wait is bounded; calling it twice is harmless."""

    @abc.abstractmethod
    async def register(self, host_id: str) -> str:
        """Record this relay as the owner of ``host_id`` (replacing any other owner) and
        return the new epoch. Raises :class:`DirectoryUnavailable` after bounded retries;
        the tunnel must then be refused."""

    @abc.abstractmethod
    async def unregister(self, host_id: str, epoch: str) -> bool:
        """Delete ``host_id``'s entry only if it still carries ``epoch``. Returns True when an
        entry was deleted. Never raises for backend trouble: it logs and returns False (the
        entry then expires on its own)."""

    @abc.abstractmethod
    async def lookup(self, host_id: str) -> Owner | None:
        """The current owner of ``host_id``, or None when no relay holds it. Raises
        :class:`DirectoryUnavailable` when the backend cannot answer: a stale answer is worse
        than none, so there is no cache."""

    @abc.abstractmethod
    async def publish_revocation(self, sub: str | None, host: str | None) -> None:
        """Revoke cached access for ``(sub, host)`` on every relay (``None`` = any).

        The callbacks of *this* relay run first, synchronously and exactly once, even when the
        backend is down; then the revocation is sent to the other relays. Raises
        :class:`DirectoryUnavailable` when it could not be sent (the local part is done)."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Plain data for status pages and the admin API (never contains secrets)."""

    def on_revocation(self, callback: RevocationCallback) -> None:
        """Call ``callback(sub, host)`` for every revocation, from any relay including this one.

        Own revocations are delivered directly by :meth:`publish_revocation` (not via the
        backend's echo), so each revocation reaches each relay's callbacks exactly once.
        ``(None, None)`` asks to drop every cached access decision; the Redis directory also
        sends it after its subscription was interrupted, since revocations may have been missed.
        Callbacks must be quick and must not block; exceptions are logged and swallowed.
        """
        self._revocation_callbacks.append(callback)

    def on_lost(self, callback: LostCallback) -> None:
        """Call ``callback(host_id, epoch)`` when another registration (normally another relay's)
        took over a host this relay still holds. The local tunnel is then stale (its agent
        reconnected elsewhere) and should be closed with 4409. The directory has already
        forgotten the registration; a later ``unregister(host_id, epoch)`` is a harmless no-op.
        """
        self._lost_callbacks.append(callback)

    def _deliver_revocation(self, sub: str | None, host: str | None) -> None:
        for callback in list(self._revocation_callbacks):
            try:
                callback(sub, host)
            except Exception:
                # One broken subscriber must not stop the others from revoking.
                log.exception("directory.callback_failed", kind="revocation")

    def _deliver_lost(self, host_id: str, epoch: str) -> None:
        for callback in list(self._lost_callbacks):
            try:
                callback(host_id, epoch)
            except Exception:
                log.exception("directory.callback_failed", kind="lost", host=host_id)
