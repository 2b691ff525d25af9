"""py-spy for the bench: install it into the venv when missing, record, summarise raw stacks.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``). The summary
ranks functions by *self* time (samples where the function was the innermost frame) and by
*inclusive* time (samples where it was anywhere on the stack), and groups self time by package
(relay, aiohttp, asyncio, ...), which is what "where does the time go" needs.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def ensure_pyspy(timeout: float = 300.0) -> tuple[str | None, str]:
    """The py-spy binary (pip-installed into this venv when missing), or None and why."""
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local), ""
    found = shutil.which("py-spy")
    if found:
        return found, ""
    print("bench: py-spy is missing; installing it: pip install py-spy", flush=True)
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"],
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"pip install py-spy timed out after {timeout:.0f}s"
    if local.exists():
        return str(local), ""
    lines = (done.stderr or done.stdout).strip().splitlines()
    return None, f"pip install py-spy failed: {lines[-1] if lines else done.returncode}"


def record_argv(pyspy: str, pid: int, output: Path, *, seconds: float, fmt: str,
                rate: int = 100) -> list[str]:
    """A ``py-spy record`` command line; non-blocking so several samplers can share a pid."""
    return [pyspy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
            "--rate", str(rate), "--format", fmt, "--output", str(output), "--nonblocking"]


def split_frame(frame: str) -> tuple[str, str]:
    """``"func (file.py:12)"`` -> ``("func", "file.py")``."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip(), ""
    return match.group("func"), match.group("file")


def package_of(path: str) -> str:
    """A short owner for a source file: relay's own modules by subpackage, libraries by name."""
    parts = path.replace("\\", "/").split("/")
    if parts[0] == "relay":
        return "/".join(parts[:2]).removesuffix(".py") if len(parts) > 1 else "relay"
    if len(parts) == 1:
        return parts[0].removesuffix(".py") or "?"
    return parts[0]


# Frames on every stack (interpreter and event-loop entry): noise in an inclusive ranking.
_ENTRY_POINTS = frozenset({
    "<module>", "run", "main", "_run", "run_forever", "run_until_complete", "_run_once",
    "_run_module_as_main", "_run_code", "cmd_serve", "cmd_agent", "Runner.run",
})


@dataclass
class Profile:
    """Counts from one raw py-spy file."""

    samples: int = 0
    self_by_func: collections.Counter[str] = field(default_factory=collections.Counter)
    self_by_line: collections.Counter[str] = field(default_factory=collections.Counter)
    total_by_func: collections.Counter[str] = field(default_factory=collections.Counter)
    self_by_package: collections.Counter[str] = field(default_factory=collections.Counter)


def load_raw(path: Path) -> Profile:
    """Parse collapsed stacks written by ``py-spy record --format raw``."""
    profile = Profile()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        profile.samples += count
        func, file = split_frame(frames[-1])
        profile.self_by_func[f"{func} ({file})"] += count
        profile.self_by_line[frames[-1].strip()] += count
        profile.self_by_package[package_of(file)] += count
        seen = set()
        for frame in frames:
            func, file = split_frame(frame)
            key = f"{func} ({file})"
            if key not in seen:
                seen.add(key)
                profile.total_by_func[key] += count
    return profile


def summarize(profile: Profile, *, title: str, seconds: float, rate: int,
              top: int = 25, lines: int = 15) -> str:
    """A text report: busy share, self time by package, top functions by self and inclusive."""
    possible = max(1, round(seconds * rate))
    out = [
        f"{title}",
        f"samples: {profile.samples} busy of ~{possible} possible "
        f"({100 * profile.samples / possible:.0f}% of one core; idle waits are not sampled)",
        "",
        "self time by package:",
    ]
    total = max(1, profile.samples)
    for name, count in profile.self_by_package.most_common(8 if lines == 0 else 12):
        out.append(f"  {100 * count / total:5.1f}%  {name}")
    out += ["", f"top {top} functions by self time:"]
    for name, count in profile.self_by_func.most_common(top):
        out.append(f"  {100 * count / total:5.1f}%  {name}")
    out += ["", f"top {top} functions by inclusive time (on the stack, entry points left out):"]
    shown = 0
    for name, count in profile.total_by_func.most_common():
        func = name.split(" (", 1)[0]
        if func in _ENTRY_POINTS:
            continue
        out.append(f"  {100 * count / total:5.1f}%  {name}")
        shown += 1
        if shown >= top:
            break
    if lines:
        out += ["", f"top {lines} lines by self time:"]
        for name, count in profile.self_by_line.most_common(lines):
            out.append(f"  {100 * count / total:5.1f}%  {name}")
    return "\n".join(out) + "\n"
