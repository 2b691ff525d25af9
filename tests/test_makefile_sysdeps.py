"""``make sysdeps`` (run by ``make test``): installs missing test tools with apt-get, then
switches off the system services those packages start, and only those it installed.

apt-get, systemctl, service and update-rc.d are replaced by scripts on PATH that record how
they were called: installing packages for real is not something a test may do.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.harness import REPO

STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
"""


def run_sysdeps(tmp_path: Path, sysdeps: str, systemd: bool) -> list[str]:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    log = tmp_path / "calls"
    log.touch()
    for name in ("apt-get", "systemctl", "service", "update-rc.d", "sudo"):
        script = stubs / name
        body = STUB.format(log=log)
        if name == "sudo":  # record, then run the command (a stub too)
            body += 'exec "$@"\n'
        script.write_text(body)
        script.chmod(0o755)
    runtime = tmp_path / "systemd-runtime"
    if systemd:
        runtime.mkdir()
    env = {**os.environ, "PATH": f"{stubs}:/usr/bin:/bin"}
    result = subprocess.run(
        ["make", "--no-print-directory", "sysdeps", f"SYSDEPS={sysdeps}",
         f"SYSTEMD_RUNTIME={runtime}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    # Not root: sudo's own line is followed by the command's; keep the commands.
    return [line for line in log.read_text().splitlines() if not line.startswith("sudo ")]


def test_installed_services_are_disabled_with_systemd(tmp_path: Path) -> None:
    calls = run_sysdeps(tmp_path, "no-such-nginx:nginx no-such-redis:redis-server sh:sh", True)
    installs = [c for c in calls if c.startswith("apt-get install")]
    assert len(installs) == 1
    assert installs[0].split()[-2:] == ["nginx", "redis-server"]  # sh was found: not installed
    assert "systemctl disable --now nginx" in calls
    assert "systemctl disable --now redis-server" in calls


def test_installed_services_are_stopped_without_systemd(tmp_path: Path) -> None:
    calls = run_sysdeps(tmp_path, "no-such-nginx:nginx", False)
    assert "service nginx stop" in calls and "update-rc.d nginx disable" in calls
    assert not [c for c in calls if c.startswith("systemctl")]


def test_services_installed_before_are_left_alone(tmp_path: Path) -> None:
    # nginx "is there" (sh stands in for its binary); only systemd-analyze's package is missing.
    calls = run_sysdeps(tmp_path, "sh:nginx no-such-analyze:systemd", True)
    assert next(c for c in calls if c.startswith("apt-get install")).split()[-1] == "systemd"
    assert not [c for c in calls if "nginx" in c]


def test_nothing_missing_installs_nothing(tmp_path: Path) -> None:
    assert run_sysdeps(tmp_path, "sh:sh", True) == []
