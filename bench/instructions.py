"""The relay's instructions per proxied request, counted by callgrind: an A/B that load ignores.

    .venv/bin/python -m bench.instructions [--conns 16] [--requests 1600]

On a 2-core machine shared with other work, CPU µs per request moves by 20-30% from one run
to the next. The number of instructions the relay's process executes per request does not
(a few tenths of a percent between runs): it counts the relay's own user-space work
(interpreter, aiohttp, uvloop), not the kernel's (the sends and reads), so it answers "did this
change make the relay's code cheaper?" rather than "how fast is it here?".

The host service (bench/fasthost.py), an agent and a relay start as in bench/run.py; the relay
runs under ``valgrind --tool=callgrind`` with instrumentation off. After a warm-up, counting is
switched on (``callgrind_control -i on``), ``--conns`` keep-alive connections send
``--requests`` GETs of /small (1 KiB) between them, one at a time each, then counting stops and
the total is divided by the requests. Needs valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import run as bench_run  # noqa: E402
from bench.procs import free_port  # noqa: E402


async def _load(port: int, request: bytes, conns: int, each: int) -> None:
    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(each):
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"unexpected answer: {head[:80]!r}")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await asyncio.wait_for(reader.readexactly(length), 60)
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(conns)))


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=60)


def _counted(out: Path) -> int:
    """The instruction total of the dump taken while counting was on (the largest one)."""
    total = 0
    for path in out.parent.glob(out.name + "*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total


def measure(conns: int, requests: int) -> float:
    bench = bench_run.Bench(bench_run.parse_args(["--quick", "--only", "W1"]))
    out = bench.tmp / "callgrind.out"
    try:
        config = bench_run.write_config(bench.tmp / "token.toml", bench.state_dir,
                                        free_port())
        bench.token = bench.mint_token(config)
        bench.agent_token = bench.mint_token(config, f"{bench_run.ORG}:*")
        bench.token_file.write_text(bench.agent_token)
        bench.token_file.chmod(0o600)
        bench.start_host()
        relay = bench.start_relay("relay", launcher=(
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}", bench_run.PYTHON, "-m", "relay"),
            ready_timeout=240)
        bench.start_agent("agent", relay, bench_run.HOST_ID)
        request = (f"GET /hosts/{bench_run.HOST_ID}/small HTTP/1.1\r\n"
                   f"Host: 127.0.0.1:{relay.port}\r\n"
                   f"Authorization: Bearer {bench.token}\r\n\r\n").encode()
        each = max(1, requests // conns)
        asyncio.run(_load(relay.port, request, conns, 20))  # warm-up: caches, first-use paths
        _control("-i", "on", str(relay.pid))
        asyncio.run(_load(relay.port, request, conns, each))
        time.sleep(1.0)  # each exchange's metrics and access line run a loop step later
        _control("-i", "off", str(relay.pid))
        _control("-d", str(relay.pid))
        deadline = time.monotonic() + 30
        while (total := _counted(out)) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        if total == 0:
            raise RuntimeError("callgrind wrote no counts")
        return total / (each * conns)
    finally:
        bench.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1600)
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench.instructions: needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    per_request = measure(args.conns, args.requests)
    print(f"relay instructions per request: {per_request:,.0f} "
          f"({args.conns} connections, {args.requests} requests, GET 1 KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
