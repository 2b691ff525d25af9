"""Shared fixtures: a full stack (relay + agent + host service) on loopback."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

# Bytecode for what this run imports and for the Python processes the suite starts (relay
# serve, relay token, agents, the demo: about a hundred of them). Where PYTHONDONTWRITEBYTECODE
# is set, every one of them compiled relay from source and pytest re-rewrote every test module,
# on every run: on a 2-core machine about 3 s of collection and 0.15 s per process, all pure
# overhead. The cache stays out of the source tree, under .pytest_cache (as git ignores it).
if sys.dont_write_bytecode:
    _PYCACHE = str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "pycache")
    sys.dont_write_bytecode, sys.pycache_prefix = False, _PYCACHE
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = _PYCACHE

from tests.harness import Stack, stack  # after the cache is in place


@pytest.fixture
async def full_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with stack(tmp_path) as running:
        yield running
