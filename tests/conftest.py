"""Shared fixtures: a full stack (relay + agent + host service) on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.harness import Stack, stack


@pytest.fixture
async def full_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with stack(tmp_path) as running:
        yield running
