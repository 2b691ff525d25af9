"""When a Redis directory heartbeat makes the relay check what it holds against Redis.

Pure decisions, no Redis: the lease tests against a real server are in test_directory_redis.py.
"""

from __future__ import annotations

import pytest

from relay.directory import HeartbeatResult
from relay.directory.redis import resync_reason


@pytest.mark.parametrize(
    ("lease", "entries", "held", "quiet", "recreated", "expected"),
    [
        ("renewed", 3, 3, True, False, None),  # the steady state: nothing to check
        ("renewed", 2, 3, False, False, None),  # a write overlapped: sizes not comparable
        ("renewed", 2, 3, True, False, "index_mismatch"),
        ("renewed", 4, 3, True, False, "index_mismatch"),
        ("renewed", 3, 3, True, True, "lease_recreated"),
        ("recreated", 0, 3, True, False, "lease_recreated"),
        ("recreated", 3, 3, False, False, "lease_recreated"),
        ("conflict", 3, 3, True, False, "lease_conflict"),
    ],
)
def test_when_a_heartbeat_resyncs(
    lease: str, entries: int, held: int, quiet: bool, recreated: bool, expected: str | None
) -> None:
    beat = HeartbeatResult(lease, entries, (), 0)
    assert resync_reason(beat, held, quiet=quiet, lease_recreated=recreated) == expected
