"""wrk, the HTTP load generator: install it from Debian's packages when missing, run, parse."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

AUTH_LUA = Path(__file__).resolve().parent / "auth.lua"
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_DURATION = re.compile(r"^\s*([0-9.]+)(us|ms|s|m|h)\s*$")


@dataclass
class WrkResult:
    """What one wrk run measured; latencies in milliseconds."""

    requests_per_s: float = 0.0
    requests: int = 0
    p50_ms: float | None = None
    p75_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    raw: str = ""

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


def _ms(text: str) -> float | None:
    match = _DURATION.match(text)
    if not match:
        return None
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse(output: str) -> WrkResult:
    """Parse ``wrk --latency`` output."""
    result = WrkResult(raw=output)
    for line in output.splitlines():
        stripped = line.strip()
        if stripped.startswith("Requests/sec:"):
            result.requests_per_s = float(stripped.split()[1])
        elif re.match(r"^\d+ requests in", stripped):
            result.requests = int(stripped.split()[0])
        elif stripped.startswith("Non-2xx or 3xx responses:"):
            result.non_2xx = int(stripped.split(":")[1])
        elif stripped.startswith("Socket errors:"):
            for part in stripped.split(":", 1)[1].split(","):
                name, _, value = part.strip().partition(" ")
                if value.strip().isdigit() and int(value):
                    result.socket_errors[name] = int(value)
        else:
            match = re.match(r"^(50|75|90|99)%\s+(\S+)$", stripped)
            if match:
                setattr(result, f"p{match.group(1)}_ms", _ms(match.group(2)))
    return result


def ensure_wrk(timeout: float = 300.0) -> tuple[str | None, str]:
    """The wrk binary, installed with apt-get when missing: ``(path, "")`` or ``(None, why)``."""
    found = shutil.which("wrk")
    if found:
        return found, ""
    if os.geteuid() != 0:
        return None, "wrk is not installed and this is not root: run `sudo apt-get install -y wrk`"
    if not shutil.which("apt-get"):
        return None, "wrk is not installed and there is no apt-get: install wrk by hand"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "wrk"]
    print("bench: wrk is missing; installing it: apt-get install -y wrk", flush=True)
    last = ""
    for attempt, steps in enumerate(([install], [["apt-get", "update"], install])):
        if attempt:
            print("bench: install failed; running apt-get update and trying again", flush=True)
        for step in steps:
            try:
                done = subprocess.run(step, env=env, capture_output=True, text=True,
                                      timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                return None, f"`{' '.join(step)}` timed out after {timeout:.0f}s"
            lines = (done.stderr or done.stdout).strip().splitlines()
            last = lines[-1] if lines else ""
            if done.returncode != 0:
                break
        found = shutil.which("wrk")
        if found:
            return found, ""
    return None, f"could not install wrk with apt-get ({last or 'no output'})"


def run(wrk: str, url: str, *, token: str, seconds: float, connections: int = 32,
        threads: int = 2, timeout_s: float = 5.0, origin: str = "") -> WrkResult:
    """``wrk -t -c -d --latency -s auth.lua URL``; the token (and an ``Origin`` to send, if
    any) travel in the environment."""
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            f"--timeout={timeout_s:g}s", "--latency", "-s", str(AUTH_LUA), url]
    env = {**os.environ, "RELAY_BENCH_TOKEN": token, "RELAY_BENCH_ORIGIN": origin}
    done = subprocess.run(argv, env=env,
                          capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[:300]}")
    return parse(done.stdout)
