"""Run ``relay serve`` under tracemalloc; SIGUSR1 writes a snapshot, for W4's memory profile.

``python -m bench.memtrace --out DIR -- serve --config F`` behaves like ``relay serve`` but
traces Python allocations; each SIGUSR1 dumps ``DIR/snapshot-<n>.pickle``. The bench compares
two snapshots (before and after opening idle tunnels) to show which allocation sites grow with
every tunnel. Tracing slows the relay down: only the memory profile uses this.
"""

from __future__ import annotations

import argparse
import collections
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

FRAMES = 12


def compare(before: Path, after: Path, per: int, top: int = 30) -> str:
    """Allocation sites that grew between two snapshots, as bytes per tunnel."""
    old = tracemalloc.Snapshot.load(str(before))
    new = tracemalloc.Snapshot.load(str(after))
    lines = []
    total = sum(s.size_diff for s in new.compare_to(old, "filename"))
    lines.append(f"traced Python heap growth: {total / 1024:.0f} KiB = "
                 f"{total / per / 1024:.2f} KiB per tunnel ({per} tunnels)")
    lines += ["", "growth by file (KiB per tunnel):"]
    for stat in new.compare_to(old, "filename")[:15]:
        frame = stat.traceback[0]
        lines.append(f"  {stat.size_diff / per / 1024:7.2f}  {stat.count_diff / per:6.1f} objs  "
                     f"{_short(frame.filename)}")
    lines += ["", f"top {top} allocation sites (KiB per tunnel, objects per tunnel):"]
    for stat in new.compare_to(old, "lineno")[:top]:
        frame = stat.traceback[0]
        lines.append(f"  {stat.size_diff / per / 1024:7.2f}  {stat.count_diff / per:6.1f} objs  "
                     f"{_short(frame.filename)}:{frame.lineno}")
    lines += ["", "growth by the innermost relay/ frame on the allocating stack (else the "
              "allocating file), KiB per tunnel:"]
    owners: collections.Counter[str] = collections.Counter()
    for stat in new.compare_to(old, "traceback"):
        frames = list(stat.traceback)  # oldest first
        ours = [f for f in frames if "/relay/" in f.filename and "/bench/" not in f.filename
                and not f.filename.endswith(("/relay/cli.py", "/relay/__main__.py"))]
        where = f"{_short(ours[-1].filename)}:{ours[-1].lineno}" if ours else \
            f"(event loop callback) {_short(frames[-1].filename)}:{frames[-1].lineno}"
        owners[where] += stat.size_diff
    for where, size in owners.most_common(25):
        lines.append(f"  {size / per / 1024:7.2f}  {where}")
    return "\n".join(lines) + "\n"


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3" else tail
    return path


def main() -> int:
    """Start tracing, install the SIGUSR1 dump, run the relay's CLI."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the snapshots")
    parser.add_argument("relay_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    relay_args = [a for a in args.relay_args if a != "--"]
    count = 0

    def dump(_signum: int, _frame: FrameType | None) -> None:
        nonlocal count
        count += 1
        tracemalloc.take_snapshot().dump(str(out / f"snapshot-{count}.pickle"))
        (out / f"snapshot-{count}.done").touch()

    tracemalloc.start(FRAMES)
    signal.signal(signal.SIGUSR1, dump)
    from relay.cli import main as relay_main

    return relay_main(relay_args)


if __name__ == "__main__":
    sys.exit(main())
