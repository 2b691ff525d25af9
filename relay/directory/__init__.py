"""Tunnel directory: which relay holds which host's tunnel, and cross-relay revocations.

``build_directory(config)`` picks the backend named by ``directory.backend``; everything else
talks to the :class:`Directory` interface.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from relay.config import Config, DirectoryBackend
from relay.directory.base import (
    Directory,
    LostCallback,
    Owner,
    RevocationCallback,
)
from relay.directory.local import LocalDirectory
from relay.metrics import Metrics

if TYPE_CHECKING:
    from relay.directory.redis import AuditResult, HeartbeatResult, RedisDirectory, SweepResult

# The redis client costs a relay process about 0.4 s of start-up (it pulls in an OpenTelemetry
# SDK of its own); a relay on the local directory never loads it.
_REDIS_NAMES = frozenset({"AuditResult", "HeartbeatResult", "RedisDirectory", "SweepResult"})

__all__ = [
    "AuditResult",
    "Directory",
    "HeartbeatResult",
    "LocalDirectory",
    "LostCallback",
    "Owner",
    "RedisDirectory",
    "RevocationCallback",
    "SweepResult",
    "build_directory",
]


def build_directory(config: Config, metrics: Metrics | None = None) -> Directory:
    """The directory configured by ``config.directory`` (not started yet: call ``start()``)."""
    backend = config.directory.backend
    if backend == DirectoryBackend.LOCAL:
        return LocalDirectory(config.directory)
    if backend == DirectoryBackend.REDIS:
        from relay.directory.redis import RedisDirectory  # loaded only when configured: see above

        return RedisDirectory(config.directory, metrics)
    # load_config() validates the backend; this guards configs built by hand.
    raise ValueError(f"unknown directory backend {backend!r}")


def __getattr__(name: str) -> Any:
    if name in _REDIS_NAMES:
        return getattr(importlib.import_module("relay.directory.redis"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
