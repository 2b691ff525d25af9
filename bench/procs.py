"""Child processes for the bench: start, talk to, sample the memory of, and always clean up.

Every child is started through :class:`Procs`, which ends all of them (SIGTERM, then SIGKILL
after a bounded wait) when the bench exits, fails or is interrupted. Children also get
``PR_SET_PDEATHSIG`` so a bench killed with SIGKILL does not leave them behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import resource
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Worker:
    """A child that speaks JSON lines on stdout and takes commands on stdin."""

    def __init__(self, name: str, popen: subprocess.Popen[str]) -> None:
        self.name = name
        self.popen = popen
        self.lines: queue.Queue[str | None] = queue.Queue()
        thread = threading.Thread(target=self._pump, name=f"out:{name}", daemon=True)
        thread.start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, timeout: float) -> dict[str, Any]:
        """The next JSON line, or RuntimeError on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.name}: no answer within {timeout:.0f}s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{self.name} exited ({self.popen.wait(5)}) without answering")
            line = line.strip()
            if line.startswith("{"):
                return dict(json.loads(line))

    def send(self, line: str) -> None:
        if self.popen.stdin is not None and self.popen.poll() is None:
            with contextlib.suppress(OSError):
                self.popen.stdin.write(line + "\n")
                self.popen.stdin.flush()


class Procs:
    """Owns every child process of one bench run."""

    def __init__(self, log_dir: Path, env: dict[str, str], cwd: Path) -> None:
        self.log_dir = log_dir
        self.env = env
        self.cwd = cwd
        self.children: list[tuple[str, subprocess.Popen[Any]]] = []
        self._logs: list[IO[bytes]] = []

    def start(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
              stdout_pipe: bool = False) -> subprocess.Popen[Any]:
        """A long-lived child; stderr (and stdout unless piped) go to ``<log_dir>/<name>.log``."""
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop_all
        self._logs.append(log)
        popen = subprocess.Popen(
            list(argv), cwd=self.cwd, env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log, preexec_fn=_die_with_parent, text=stdout_pipe,
        )
        self.children.append((name, popen))
        return popen

    def worker(self, name: str, argv: Sequence[str], *,
               env: dict[str, str] | None = None) -> Worker:
        """A load-generator child speaking JSON lines (see bench/loadgen.py)."""
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop_all
        self._logs.append(log)
        popen = subprocess.Popen(
            list(argv), cwd=self.cwd, env={**self.env, **(env or {})}, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=log, text=True, preexec_fn=_die_with_parent,
        )
        self.children.append((name, popen))
        return Worker(name, popen)

    def stop(self, popen: subprocess.Popen[Any], timeout: float = 5.0) -> None:
        """SIGTERM, a bounded wait, then SIGKILL."""
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                popen.terminate()
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    popen.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(5)
        for stream in (popen.stdin, popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def stop_all(self) -> None:
        """End every child still running: all get SIGTERM first, then stragglers SIGKILL."""
        live = [p for _, p in self.children if p.poll() is None]
        for popen in live:
            with contextlib.suppress(ProcessLookupError):
                popen.terminate()
        deadline = time.monotonic() + 5
        for popen in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(max(0.1, deadline - time.monotonic()))
        for _, popen in self.children:
            self.stop(popen, timeout=1)
        self.children.clear()
        for log in self._logs:
            with contextlib.suppress(OSError):
                log.close()
        self._logs.clear()

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.log_dir / f"{name}.log"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return ""


# -- memory ---------------------------------------------------------------------------------


def proc_status_kib(pid: int, field: str = "VmRSS") -> int:
    """A ``/proc/<pid>/status`` field in KiB (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def settle_rss(pid: int, seconds: float = 1.0, interval: float = 0.05) -> int:
    """The median RSS (KiB) over a short idle window: one baseline reading, less noise."""
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append(proc_status_kib(pid))
        time.sleep(interval)
    samples.sort()
    return samples[len(samples) // 2] if samples else proc_status_kib(pid)


class RssSampler:
    """Peak VmRSS of some processes while a block runs.

    A thread reads VmRSS every ``interval`` seconds; VmHWM (the kernel's exact high-water mark)
    is read on entry and exit too, so a spike shorter than the interval still counts when it
    set a new high for the process.
    """

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.peak: dict[str, int] = dict.fromkeys(pids, 0)
        self.samples = 0
        self._hwm_before: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], proc_status_kib(pid))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._hwm_before = {n: proc_status_kib(p, "VmHWM") for n, p in self.pids.items()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        for name, pid in self.pids.items():
            hwm = proc_status_kib(pid, "VmHWM")
            if hwm > self._hwm_before.get(name, hwm):
                self.peak[name] = max(self.peak[name], hwm)


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU seconds used by some processes, and by this process's reaped children (the load
    generators, which exit inside the block), while a block runs."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.used: dict[str, float] = {}
        self.wall = 0.0
        self._start: dict[str, float] = {}
        self._children = 0.0
        self._machine = (0.0, 0.0)
        self._t0 = 0.0

    def __enter__(self) -> CpuMeter:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._children = _children_cpu()
        self._machine = _machine_busy_seconds()
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self._t0
        self.used = {name: cpu_seconds(pid) - self._start[name] for name, pid in self.pids.items()}
        self.used["loadgen"] = _children_cpu() - self._children
        # Interrupt time (mostly loopback TCP in softirq) belongs to no process; whatever is
        # left is other processes on the machine (another test run skews the numbers).
        busy, irq = _machine_busy_seconds()
        self.used["softirq"] = irq - self._machine[1]
        self.used["other"] = max(0.0, busy - self._machine[0] - sum(self.used.values()))

    def describe(self) -> str:
        """``relay 95% agent 80% ...``: each process's average share of one core."""
        return " ".join(f"{name} {100 * self.share(name):.0f}%" for name in self.used)

    def share(self, name: str) -> float:
        """Average share of one core used by ``name`` over the block."""
        return self.used.get(name, 0.0) / self.wall if self.wall else 0.0


def _machine_ticks() -> tuple[int, int, int]:
    """Total (without guest time), idle + iowait, and irq + softirq ticks of all cores."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    return sum(values[:8]), values[3] + values[4], values[5] + values[6]


def _machine_busy_seconds() -> tuple[float, float]:
    """Busy seconds of all cores so far, and the interrupt share of them (loopback TCP)."""
    total, idle, irq = _machine_ticks()
    return (total - idle) / _TICK, irq / _TICK


def machine_busy(seconds: float = 0.5) -> float:
    """Share of all cores busy over a short window (before the bench starts anything)."""
    total0, idle0, _ = _machine_ticks()
    time.sleep(seconds)
    total1, idle1, _ = _machine_ticks()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


# -- waiting and plain HTTP -----------------------------------------------------------------


def http_get(url: str, headers: dict[str, str] | None = None,
             timeout: float = 2.0) -> tuple[int, bytes]:
    """Status and body of a GET; status 0 when nothing answered."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (OSError, ValueError):
        return 0, b""


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.05) -> None:
    """Poll until ``predicate()``; RuntimeError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def json_get(url: str, timeout: float = 2.0) -> dict[str, Any]:
    """A GET answered with a JSON object ({} when it was not)."""
    status, body = http_get(url, timeout=timeout)
    if not status:
        return {}
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` still runs."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
