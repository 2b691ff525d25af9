"""Tunnel directory: which relay holds which host's tunnel, and cross-relay revocations.

``build_directory(config)`` picks the backend named by ``directory.backend``; everything else
talks to the :class:`Directory` interface.
"""

from __future__ import annotations

from relay.config import Config, DirectoryBackend
from relay.directory.base import (
    Directory,
    LostCallback,
    Owner,
    RevocationCallback,
)
from relay.directory.local import LocalDirectory
from relay.directory.redis import AuditResult, HeartbeatResult, RedisDirectory, SweepResult
from relay.metrics import Metrics

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
        return RedisDirectory(config.directory, metrics)
    # load_config() validates the backend; this guards configs built by hand.
    raise ValueError(f"unknown directory backend {backend!r}")
