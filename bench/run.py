"""``make bench``: relay + agent against a fast host service, side by side with going direct.

Workloads (each measured straight to the host service and through relay + agent):

- W0 one connection, sequential GETs: the latency the relay adds (relayed p50 - direct p50);
- W1 small requests: GET 1 KiB, 32 connections (wrk): req/s, p50, p99; then the same through
  a relay with ``cors.allow_origins`` set and an allowed ``Origin`` on every request (CORS on),
  beside the default relay (CORS off), so the header work shows up if it costs anything;
- W1T the same through a relay and an agent that trace every exchange (OTLP/HTTP to a sink that
  answers 200) beside the untraced pair: what tracing costs (req/s, latency, CPU per request);
- W2 large downloads: 16 MiB, 4 at once: MB/s and the relay's and agent's peak RSS growth;
  then one slow reader (~1.5 MB/s through a small receive buffer): relay RSS must stay flat;
- W3 WebSocket echo: 16 channels, 1 KiB binary ping-pong, clients in 2 processes: round trips/s,
  p50, p99;
- W4 idle tunnels: a fresh relay holding 1,000 then 19,000 tunnels: KiB of relay RSS per tunnel;
- W6 abuse: W1 through the relay again while one hostile client holds 300 idle WebSocket
  channels to the same host and a hostile agent floods 64 KiB PINGs it never reads the PONGs
  of (both raw-socket clients in their own processes): honest req/s as a ratio to W1 alone
  (target ≥ 0.8), the honest client's errors, and the relay's RSS growth;
- W5 owner vs non-owner relay (scale-out, directory.backend = "redis"): a request entering
  through the relay that holds the tunnel beside one entering through another relay. Skipped,
  with a note, while relay-to-relay forwarding is not available (detected by trying).
- W7 directory cost: one relay's Redis directory with 200 then 20,000 registered hosts: Redis
  commands per second (and Redis time) over whole heartbeat windows, which must not grow with
  the tunnel count; then a crash, and how long until another relay reads its hosts offline.

Prints one table (workload | metric | direct | via relay | ratio | target | met?). Every child
process is ended on exit, error or Ctrl-C; every wait is bounded. See bench/README.md and
bench/profile.md (``--profile`` records py-spy profiles of the relay and the agent).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import profiling, wrk  # noqa: E402
from bench.loadgen import raise_nofile  # noqa: E402
from bench.procs import (  # noqa: E402
    CpuMeter,
    Procs,
    RssSampler,
    Worker,
    free_port,
    http_get,
    json_get,
    machine_busy,
    settle_rss,
    wait_for,
)

RESULTS = REPO / "bench" / "results"
PYTHON = sys.executable
HOST_ID = "acme:bench"
ORG = "acme"
BENCH_ORIGIN = "https://app.bench.example"  # the allowed Origin of the W1 CORS-on run
MiB = 1024 * 1024
MB = 1_000_000
# Overrides that would point the bench's own relays elsewhere; everything else RELAY_* passes.
STRIPPED_ENV = ("RELAY_CONFIG", "RELAY_SERVER_HOST", "RELAY_SERVER_PORT", "RELAY_AUTH_",
                "RELAY_DIRECTORY_", "RELAY_ACCESS_", "RELAY_ADMIN_")
ALL_WORKLOADS = ("W0", "W1", "W1T", "W2", "W3", "W4", "W5", "W6", "W7")
W4_PING_INTERVAL_S = 10.0
W6_CHANNELS = 300  # more than tunnel.max_streams (256): the probe that locked a host out
# W4 last: its sockets linger in TIME_WAIT. W6 right after W1, on the same relay.
RUN_ORDER = ("W0", "W1", "W6", "W1T", "W2", "W3", "W5", "W7", "W4")


@dataclass
class Durations:
    """How long each measurement runs (``--quick`` shortens them)."""

    w0_s: float = 5.0
    w1_s: float = 10.0
    w1_warmup_s: float = 2.0
    w2_rounds: int = 8
    slow_s: float = 5.0
    w3_s: float = 8.0
    w3_warmup_s: float = 1.0
    w5_s: float = 8.0
    profile_s: float = 10.0

    @classmethod
    def quick(cls) -> Durations:
        return cls(w0_s=2, w1_s=3, w1_warmup_s=1, w2_rounds=2, slow_s=3, w3_s=3, w3_warmup_s=0.5,
                   w5_s=3, profile_s=5)


@dataclass
class Row:
    """One line of the result table."""

    workload: str
    metric: str
    direct: float | None
    relay: float | None
    unit: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""
    ratio: bool = True


@dataclass
class Report:
    """Everything one run measured, for the table and for ``--json``."""

    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, str] = field(default_factory=dict)


# -- configuration and the stack ------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, state_dir: Path, port: int,
                 extra: dict[str, dict[str, Any]] | None = None) -> Path:
    """A dev-mode relay config: loopback, free port, shipped log defaults, shared dev key.

    Logging stays as users get it (info level, one access line per request, JSON): a relay
    measured with its logs turned down would flatter every row.
    """
    sections: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": port, "drain_grace_s": 1.0},
        "auth": {"mode": "dev", "dev_state_dir": str(state_dir)},
        "access": {"backend": "org"},
        "tunnel": {"ping_interval_s": 10.0, "request_timeout_s": 30.0},
        "directory": {"backend": "local"},
        "log": {"level": "info", "format": "json", "access_log": True},
    }
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@dataclass
class Relay:
    """A relay process started by the bench."""

    name: str
    port: int
    config: Path
    popen: subprocess.Popen[Any]

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def host_url(self, host_id: str, path: str, scheme: str = "http") -> str:
        return f"{self.http if scheme == 'http' else self.ws}/hosts/{host_id}{path}"


class Bench:
    """One bench run: the temp dir, the processes, the stack and the measurements."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.durations = Durations.quick() if args.quick else Durations()
        self.tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
        self.state_dir = self.tmp / "state"
        self.state_dir.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(STRIPPED_ENV)}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        self.env = env
        self.procs = Procs(self.tmp, env, REPO)
        self.report = Report()
        self.token = ""
        self.agent_token = ""  # may serve every host of ORG (agents, W4's idle tunnels)
        # W6's hostile clients are another user: per-subject fairness is what keeps the honest
        # one served, so sharing the honest client's subject would measure the wrong thing.
        self.hostile_token = ""
        self.host_port = 0
        self.host_pid = 0
        self.relay: Relay | None = None
        self.agent_pid = 0
        self.wrk: str | None = None
        self.wrk_problem = ""

    # -- processes ----------------------------------------------------------------------------
    def start_host(self) -> None:
        self.host_port = free_port()
        popen = self.procs.start("fasthost", [PYTHON, "-m", "bench.fasthost", "--port",
                                              str(self.host_port)])
        self.host_pid = popen.pid
        url = f"http://127.0.0.1:{self.host_port}/small"
        self._wait_up(popen, "fasthost", lambda: http_get(url, timeout=1)[0] == 200, 15)

    def start_relay(self, name: str, extra: dict[str, dict[str, Any]] | None = None, *,
                    launcher: tuple[str, ...] = (PYTHON, "-m", "relay"),
                    ready_timeout: float = 30) -> Relay:
        port = free_port()
        config = write_config(self.tmp / f"{name}.toml", self.state_dir, port, extra)
        popen = self.procs.start(name, [*launcher, "serve", "--config", str(config)])
        relay = Relay(name, port, config, popen)
        self._wait_up(popen, name, lambda: http_get(f"{relay.http}/readyz", timeout=1)[0] == 200,
                      ready_timeout)
        return relay

    def mint_token(self, config: Path, *serve: str, sub: str = "bench") -> str:
        """``relay token``: every bench relay shares this dev issuer key, so one token serves.

        ``serve``: the host ids (or ``<org>:*``) the token may register tunnels for (agents).
        """
        done = subprocess.run(
            [PYTHON, "-m", "relay", "token", "--config", str(config), "--sub", sub,
             "--org", ORG, "--ttl", "7200", *(arg for s in serve for arg in ("--agent-host", s))],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=60, check=False,
        )
        if done.returncode != 0 or not done.stdout.strip():
            raise RuntimeError(f"relay token failed: {done.stderr.strip()[-300:]}")
        return done.stdout.strip().splitlines()[-1]

    def start_agent(self, name: str, relay: Relay, host_id: str,
                    *extra: str) -> subprocess.Popen[Any]:
        popen = self.procs.start(name, [
            PYTHON, "-m", "relay", "agent", "--relay", relay.ws, "--host-id", host_id,
            "--upstream", f"http://127.0.0.1:{self.host_port}", "--token-file",
            str(self.token_file), *extra,
        ])
        url = relay.host_url(host_id, "/small")
        headers = {"Authorization": f"Bearer {self.token}"}
        self._wait_up(popen, name, lambda: http_get(url, headers, timeout=2)[0] == 200, 30)
        return popen

    @property
    def token_file(self) -> Path:
        return self.tmp / "token"

    def _wait_up(self, popen: subprocess.Popen[Any], name: str, ready: Callable[[], bool],
                 timeout: float) -> None:
        def check() -> bool:
            if popen.poll() is not None:
                raise RuntimeError(f"{name} exited with {popen.returncode}:\n"
                                   f"{self.procs.log_tail(name)}")
            return ready()

        try:
            wait_for(check, timeout, f"{name} to answer")
        except RuntimeError as exc:
            if "timed out" in str(exc):
                raise RuntimeError(f"{exc}\n{self.procs.log_tail(name)}") from None
            raise

    def setup(self) -> None:
        """Host service, relay and agent for W1-W3 (and the host for W5)."""
        self.start_host()
        self.relay = self.start_relay("relay")
        self.agent_pid = self.start_agent("agent", self.relay, HOST_ID).pid
        print(f"bench: fasthost :{self.host_port} (pid {self.host_pid}), relay "
              f":{self.relay.port} (pid {self.relay.pid}), agent pid {self.agent_pid}",
              flush=True)

    def loadgen(self, name: str, cmd: str, *args: str, token: str = "") -> Worker:
        # Idle tunnels and W6's flooding agent register hosts: they need the token that may
        # serve them.
        token = token or (self.agent_token if cmd in ("tunnels", "pingflood") else self.token)
        return self.procs.worker(name, [PYTHON, "-m", "bench.loadgen", cmd, *args],
                                 env={"RELAY_BENCH_TOKEN": token})

    # -- workloads ----------------------------------------------------------------------------
    def direct_url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.host_port}{path}"

    def ensure_wrk(self) -> str | None:
        if self.wrk is None and not self.wrk_problem:
            self.wrk, self.wrk_problem = wrk.ensure_wrk()
        return self.wrk

    def w0(self) -> None:
        """Latency the relay adds: one connection, sequential GETs, straight and relayed."""
        binary = self.ensure_wrk()
        if binary is None:
            self.report.notes.append(f"W0 skipped: {self.wrk_problem}")
            return
        assert self.relay is not None
        d = self.durations
        results: dict[str, wrk.WrkResult] = {}
        meters: dict[str, CpuMeter] = {}
        for path, url in (("direct", self.direct_url("/small")),
                          ("relay", self.relay.host_url(HOST_ID, "/small"))):
            wrk.run(binary, url, token=self.token, seconds=1, connections=1, threads=1)
            with self.cpu_meter() as meters[path]:
                results[path] = wrk.run(binary, url, token=self.token, seconds=d.w0_s,
                                        connections=1, threads=1)
            r = results[path]
            print(f"  W0 {path:6s} {r.requests_per_s:10,.0f} req/s  p50 {ms(r.p50_ms)}  "
                  f"p99 {ms(r.p99_ms)}  errors {r.errors}", flush=True)
        direct, relay = results["direct"], results["relay"]
        self.report.raw["W0"] = {k: asdict(v) for k, v in results.items()}
        added_us = (relay.p50_ms - direct.p50_ms) * 1000 if (
            relay.p50_ms is not None and direct.p50_ms is not None) else None
        rows = self.report.rows
        rows.append(Row("W0", "req/s (1 conn, sequential)", direct.requests_per_s,
                        relay.requests_per_s))
        rows.append(Row("W0", "p50 latency", direct.p50_ms, relay.p50_ms, "ms"))
        rows.append(Row("W0", "relay-added p50 latency", None, added_us, "µs", "≤ 150 µs",
                        added_us is not None and added_us <= 150))
        rows.append(Row("W0", "errors", direct.errors, relay.errors, "", "0", relay.errors == 0,
                        ratio=False))
        self.cpu_rows("W0", "request", meters, {"direct": direct.requests,
                                                "relay": relay.requests})

    def w1(self) -> None:
        """Small requests: wrk -t2 -c32 GET /small, straight and through the tunnel."""
        binary = self.ensure_wrk()
        if binary is None:
            self.report.notes.append(f"W1 skipped: {self.wrk_problem}")
            return
        assert self.relay is not None
        d = self.durations
        urls = {"direct": self.direct_url("/small"),
                "relay": self.relay.host_url(HOST_ID, "/small")}
        results: dict[str, wrk.WrkResult] = {}
        meters: dict[str, CpuMeter] = {}
        for path, url in urls.items():
            wrk.run(binary, url, token=self.token, seconds=d.w1_warmup_s)  # warm-up, discarded
            with self.cpu_meter() as meters[path]:
                results[path] = wrk.run(binary, url, token=self.token, seconds=d.w1_s)
            r = results[path]
            print(f"  W1 {path:6s} {r.requests_per_s:10,.0f} req/s  p50 {ms(r.p50_ms)}  "
                  f"p99 {ms(r.p99_ms)}  errors {r.errors}  CPU {meters[path].describe()}",
                  flush=True)
        direct, relay = results["direct"], results["relay"]
        self.report.raw["W1"] = {k: {**asdict(v), "cpu_s": meters[k].used}
                                 for k, v in results.items()}
        rows = self.report.rows
        rows.append(Row("W1", "req/s (GET 1 KiB, 32 conns)", direct.requests_per_s,
                        relay.requests_per_s, "", "≥ 15,000", relay.requests_per_s >= 15000))
        rows.append(Row("W1", "p50 latency", direct.p50_ms, relay.p50_ms, "ms"))
        rows.append(Row("W1", "p99 latency", direct.p99_ms, relay.p99_ms, "ms", "≤ 5 ms",
                        relay.p99_ms is not None and relay.p99_ms <= 5))
        rows.append(Row("W1", "errors (non-2xx + socket)", direct.errors, relay.errors, "",
                        "0", relay.errors == 0, ratio=False))
        self.cpu_rows("W1", "request", meters, {"direct": direct.requests,
                                                "relay": relay.requests},
                      ceiling_target=("≥ 15,000", 15000.0))
        self.w1_access_log(binary)
        self.w1_cors(binary, relay, meters["relay"])
        if "W1" in self.profile_targets:
            self.profile_w1(binary, urls["relay"])

    def w1_access_log(self, binary: str) -> None:
        """What the default access log costs: the W1 relay and agent with it off, then on, ...

        One relay and agent, switched by SIGHUP (``log.access_log`` reloads from the next
        request) for alternating segments, so the two sides differ in nothing else. Two
        separate relays run one after the other measured their own differences instead: on
        the shared 2-core machine the share swung between 3 % and 48 % for the same code.
        """
        assert self.relay is not None
        relay = self.relay
        d = self.durations
        url = relay.host_url(HOST_ID, "/small")
        segment_s = max(1.0, d.w1_s / 2)
        totals = {True: [0.0, 0], False: [0.0, 0]}  # access log on? -> relay CPU s, requests
        rates: dict[bool, list[float]] = {True: [], False: []}
        try:
            for access_on in (False, True, False, True):
                self._reload_relay(relay, {"log": {"access_log": access_on}})
                wrk.run(binary, url, token=self.token, seconds=0.5)  # settle after the switch
                with CpuMeter({"relay": relay.pid}) as meter:
                    result = wrk.run(binary, url, token=self.token, seconds=segment_s)
                totals[access_on][0] += meter.used["relay"]
                totals[access_on][1] += result.requests
                rates[access_on].append(result.requests_per_s)
        finally:
            self._reload_relay(relay, None)  # the shipped defaults again for what follows
        on_us, off_us = ((cpu / n * 1e6 if n else None) for cpu, n in (totals[True],
                                                                          totals[False]))
        off_rate, on_rate = (sum(rates[k]) / len(rates[k]) for k in (False, True))
        print(f"  W1 access log off {off_rate:10,.0f} req/s  relay CPU {off_us or 0:.0f} µs/req "
              f"(on: {on_rate:,.0f} req/s, {on_us or 0:.0f} µs/req; same relay, alternating)",
              flush=True)
        cost = 100 * (on_us / off_us - 1) if on_us and off_us else None
        rows = self.report.rows
        rows.append(Row("W1", "req/s, access log off | on (default)", off_rate, on_rate))
        rows.append(Row("W1", "relay CPU per request, log off | on", off_us, on_us, "µs"))
        rows.append(Row("W1", "access log share of relay CPU per request", None, cost, "%",
                        "≤ 15 %", cost is not None and cost <= 15, ratio=False))

    def _reload_relay(self, relay: Relay, extra: dict[str, dict[str, Any]] | None) -> None:
        """Rewrite the relay's config and SIGHUP it; back once its log says it reloaded."""
        log_file = self.tmp / f"{relay.name}.log"
        offset = log_file.stat().st_size  # only what it writes from now on

        def reloaded() -> bool:
            with log_file.open("rb") as log:
                log.seek(offset)
                return b'"relay.reloaded"' in log.read()

        write_config(relay.config, self.state_dir, relay.port, extra)
        relay.popen.send_signal(signal.SIGHUP)
        wait_for(reloaded, 10, f"{relay.name} to reload")

    def w1_cors(self, binary: str, cors_off: wrk.WrkResult, meter_off: CpuMeter) -> None:
        """W1 again through a relay with CORS configured, every request from an allowed Origin.

        Its own relay and agent (the main relay keeps the default config), stopped afterwards.
        """
        d = self.durations
        relay = self.start_relay("relay-cors", {"cors": {"allow_origins": [BENCH_ORIGIN]}})
        agent = self.start_agent("agent-cors", relay, HOST_ID)
        try:
            url = relay.host_url(HOST_ID, "/small")
            wrk.run(binary, url, token=self.token, seconds=d.w1_warmup_s, origin=BENCH_ORIGIN)
            with CpuMeter({"relay": relay.pid, "agent": agent.pid,
                           "host": self.host_pid}) as meter_on:
                on = wrk.run(binary, url, token=self.token, seconds=d.w1_s, origin=BENCH_ORIGIN)
        finally:
            self.procs.stop(agent, 2)
            self.procs.stop(relay.popen)
        off_us = meter_off.used["relay"] / cors_off.requests * 1e6 if cors_off.requests else None
        on_us = meter_on.used["relay"] / on.requests * 1e6 if on.requests else None
        print(f"  W1 cors   {on.requests_per_s:10,.0f} req/s  p50 {ms(on.p50_ms)}  "
              f"p99 {ms(on.p99_ms)}  errors {on.errors}", flush=True)
        self.report.raw["W1-cors"] = asdict(on)
        rows = self.report.rows
        note = "direct column: the relay with CORS off (the W1 rows above)"
        rows.append(Row("W1", "req/s CORS on vs off", cors_off.requests_per_s,
                        on.requests_per_s, "", "≈ 1.00x", note=note))
        rows.append(Row("W1", "p99 latency CORS on vs off", cors_off.p99_ms, on.p99_ms, "ms"))
        rows.append(Row("W1", "relay CPU per request, CORS on vs off", off_us, on_us, "µs"))
        rows.append(Row("W1", "errors CORS on", None, on.errors, "", "0", on.errors == 0,
                        ratio=False))

    def w6(self) -> None:
        """Abuse: honest W1 throughput while hostile clients hold channels and flood PINGs.

        Measured three times on the same relay, so the loss can be split: the idle channels
        alone, the PING flood alone, then both (the headline row). Each run meters the CPU of
        the relay, the agent, the host and both hostile processes.
        """
        binary = self.ensure_wrk()
        if binary is None:
            self.report.notes.append(f"W6 skipped: {self.wrk_problem}")
            return
        assert self.relay is not None
        d = self.durations
        url = self.relay.host_url(HOST_ID, "/small")
        # "Alone" is measured here, next to the runs under abuse, rather than taken from W1:
        # on shared cores the machine drifts between workloads, and the ratio is only fair
        # between runs that saw the same machine. (W1's own number stays in the raw results.)
        wrk.run(binary, url, token=self.token, seconds=d.w1_warmup_s)
        with self.cpu_meter() as meter:
            alone = wrk.run(binary, url, token=self.token, seconds=d.w1_s)
        alone_rps, alone_errors = alone.requests_per_s, alone.errors
        alone_us = meter.used["relay"] / alone.requests * 1e6 if alone.requests else 0.0
        print(f"  W6 alone          {alone_rps:8,.0f} req/s, errors {alone_errors}, relay "
              f"{alone_us:.0f} µs/req; CPU {meter.describe()}", flush=True)
        phases = {name: self._w6_phase(binary, url, alone_rps, channels=name != "flood",
                                       flood=name != "channels")
                  for name in ("channels", "flood", "both")}
        rows = self.report.rows
        for name, phase in phases.items():
            label = {"channels": "idle channels only", "flood": "PING flood only",
                     "both": "both"}[name]
            rows.append(Row("W6", f"honest 2xx req/s under abuse: {label}", alone_rps,
                            phase["honest_rps"], "",
                            *(("≥ 0.8 of alone", phase["ratio"] >= 0.8) if name == "both"
                              else ("", None))))
            rows.append(Row("W6", f"relay CPU per honest request: {label}", alone_us,
                            phase["relay_us"], "µs"))
            rows.append(Row("W6", f"hostile processes' CPU, share of a core: {label}", None,
                            100 * phase["hostile_share"], "%", ratio=False))
        both = phases["both"]
        rows.append(Row("W6", "honest errors (non-2xx + socket)", alone_errors, both["errors"],
                        "", "0", both["errors"] == 0, ratio=False))
        rows.append(Row("W6", "relay RSS growth under abuse", None, both["rss_growth_mib"],
                        "MiB", "≤ 64 MiB", both["rss_growth_mib"] <= 64, ratio=False))
        w1_rps = self.report.raw.get("W1", {}).get("relay", {}).get("requests_per_s")
        self.report.raw["W6"] = {"alone_rps": alone_rps, "alone_errors": alone_errors,
                                 "alone_relay_us": alone_us, "w1_relay_rps": w1_rps,
                                 "phases": phases}

    def _w6_phase(self, binary: str, url: str, alone_rps: float, *, channels: bool,
                  flood: bool) -> dict[str, Any]:
        """One W6 measurement with the idle channels, the PING flood, or both."""
        assert self.relay is not None
        d = self.durations
        hold_s = d.w1_s + d.w1_warmup_s + 30
        workers: dict[str, Worker] = {}
        if channels:
            workers["channels"] = self.loadgen(
                "w6-channels", "idlechannels", "--url", self.relay.host_url(HOST_ID, "/ws", "ws"),
                "--count", str(W6_CHANNELS), "--deadline", str(hold_s + 30),
                token=self.hostile_token)
        if flood:
            workers["flood"] = self.loadgen(
                "w6-pingflood", "pingflood", "--url", self.relay.ws,
                "--host-id", f"{ORG}:w6-flood", "--size", str(64 * 1024),
                "--duration", str(d.w1_warmup_s + d.w1_s + 1),
                "--deadline", str(hold_s + 30), token=self.hostile_token)
        rss_before = settle_rss(self.relay.pid, 0.5)
        held: dict[str, Any] = {}
        held_after: dict[str, Any] = {}
        flooded: dict[str, Any] = {}
        try:
            if channels:
                held = workers["channels"].expect(60)
            if flood:
                workers["flood"].expect(30)
                workers["flood"].send("go")
            pids = {"relay": self.relay.pid, "agent": self.agent_pid, "host": self.host_pid,
                    **{f"hostile-{k}": w.popen.pid for k, w in workers.items()}}
            with RssSampler({"relay": self.relay.pid}) as rss:
                wrk.run(binary, url, token=self.token, seconds=d.w1_warmup_s)
                with CpuMeter(pids) as meter:
                    hostile = wrk.run(binary, url, token=self.token, seconds=d.w1_s)
            if channels:
                workers["channels"].send("stop")
                held_after = workers["channels"].expect(30)
            if flood:
                flooded = workers["flood"].expect(30)
        finally:
            for worker in workers.values():
                self.procs.stop(worker.popen)
        # Only answered requests count: a relay shedding the honest client with fast 503s must
        # not look faster than one serving it.
        ok = hostile.requests - hostile.errors
        honest_rps = hostile.requests_per_s * (max(0, ok) / hostile.requests
                                               if hostile.requests else 0.0)
        ratio = honest_rps / alone_rps if alone_rps else 0.0
        relay_us = meter.used["relay"] / ok * 1e6 if ok > 0 else float("nan")
        hostile_share = sum(meter.share(k) for k in meter.used if k.startswith("hostile-"))
        growth_mib = (rss.peak["relay"] - rss_before) / 1024
        what = "+".join(workers)
        # Only the abuse that ran is described: a run without the flood has no pings to count.
        parts = [f"CPU {meter.describe()}"]
        if channels:
            parts.append(f"channels held {held.get('ready')} -> {held_after.get('held')}")
        if flood:
            parts.append(f"pings sent {flooded.get('pings_sent')} over "
                         f"{flooded.get('connects')} tunnels ({flooded.get('refused')} attempts "
                         f"refused), closes {flooded.get('closes')}")
        parts.append(f"relay RSS +{growth_mib:.0f} MiB")
        print(f"  W6 {what:14s} {honest_rps:8,.0f} answered req/s (x{ratio:.2f}), errors "
              f"{hostile.errors}, relay {relay_us:.0f} µs/req; " + "; ".join(parts), flush=True)
        return {"honest_rps": honest_rps, "ratio": ratio, "errors": hostile.errors,
                "relay_us": relay_us, "hostile_share": hostile_share,
                "cpu_s": meter.used, "wall_s": meter.wall, "rss_growth_mib": growth_mib,
                "wrk": {k: v for k, v in asdict(hostile).items() if k != "raw"},
                "channels": [held, held_after], "pingflood": flooded}

    def w1t(self) -> None:
        """W1 with tracing off and on, side by side: a second relay + agent export every span."""
        binary = self.ensure_wrk()
        if binary is None:
            self.report.notes.append(f"W1T skipped: {self.wrk_problem}")
            return
        assert self.relay is not None
        sink_port = free_port()
        sink = self.procs.start("otlpsink", [PYTHON, "-m", "bench.otlpsink", "--port",
                                             str(sink_port)])
        started: list[subprocess.Popen[Any]] = [sink]
        try:
            stats_url = f"http://127.0.0.1:{sink_port}/stats"
            self._wait_up(sink, "otlpsink", lambda: http_get(stats_url, timeout=1)[0] == 200, 15)
            endpoint = f"http://127.0.0.1:{sink_port}/v1/traces"
            traced = self.start_relay("relay-traced", {"tracing": {"otlp_endpoint": endpoint}})
            started.append(traced.popen)
            host_id = "acme:bench-traced"
            agent = self.start_agent("agent-traced", traced, host_id, "--otlp-endpoint", endpoint)
            started.append(agent)
            pairs = {"off": (self.relay, self.agent_pid, HOST_ID),
                     "on": (traced, agent.pid, host_id)}
            results: dict[str, wrk.WrkResult] = {}
            meters: dict[str, CpuMeter] = {}
            for mode, (relay, agent_pid, hid) in pairs.items():
                url = relay.host_url(hid, "/small")
                wrk.run(binary, url, token=self.token, seconds=self.durations.w1_warmup_s)
                meters[mode] = CpuMeter({"relay": relay.pid, "agent": agent_pid,
                                         "host": self.host_pid})
                with meters[mode]:
                    results[mode] = wrk.run(binary, url, token=self.token,
                                            seconds=self.durations.w1_s)
                r = results[mode]
                print(f"  W1T tracing {mode:3s} {r.requests_per_s:10,.0f} req/s  "
                      f"p50 {ms(r.p50_ms)}  p99 {ms(r.p99_ms)}  errors {r.errors}  "
                      f"CPU {meters[mode].describe()}", flush=True)
            time.sleep(2)  # let the last batches reach the sink
            metrics = http_get(f"{traced.http}/metrics", timeout=5)[1].decode(errors="replace")
            dropped = next((float(line.split()[-1]) for line in metrics.splitlines()
                            if line.startswith("relay_trace_spans_dropped_total ")), 0.0)
            sink_stats = json_get(stats_url)
        finally:
            for popen in reversed(started):
                self.procs.stop(popen)
        off, on = results["off"], results["on"]
        self.report.raw["W1T"] = {k: {**asdict(v), "cpu_s": meters[k].used}
                                  for k, v in results.items()}
        self.report.raw["W1T"]["sink"] = sink_stats
        note = "direct = tracing off; via relay = tracing on (relay and agent export every span)"
        rows = self.report.rows
        rows.append(Row("W1T", "req/s, tracing off | on", off.requests_per_s, on.requests_per_s,
                        note=note))
        rows.append(Row("W1T", "p50 latency, tracing off | on", off.p50_ms, on.p50_ms, "ms"))
        rows.append(Row("W1T", "p99 latency, tracing off | on", off.p99_ms, on.p99_ms, "ms"))
        rows.append(Row("W1T", "errors, tracing off | on", off.errors, on.errors, "", "0",
                        on.errors == 0, ratio=False))
        for who in ("relay", "agent"):
            per = {mode: meters[mode].used[who] / results[mode].requests * 1e6
                   if results[mode].requests else None for mode in ("off", "on")}
            rows.append(Row("W1T", f"{who} CPU per request, off | on", per["off"], per["on"],
                            "µs"))
        rows.append(Row("W1T", "spans dropped (relay) | OTLP posts at the sink", dropped,
                        float(sink_stats.get("posts", 0)), "", "0 dropped", dropped == 0,
                        ratio=False))

    def cpu_meter(self) -> CpuMeter:
        """CPU of the relay, the agent and the host (and reaped load generators) in a block."""
        assert self.relay is not None
        return CpuMeter({"relay": self.relay.pid, "agent": self.agent_pid, "host": self.host_pid})

    def cpu_rows(self, workload: str, unit: str, meters: dict[str, CpuMeter],
                 counts: dict[str, int], *,
                 relay_target: tuple[str, float] | None = None,
                 ceiling_target: tuple[str, float] | None = None) -> None:
        """Where the CPU went: relay and agent per operation, host and load generator shares."""
        rows = self.report.rows
        relay, direct = meters["relay"], meters["direct"]
        for who in ("relay", "agent"):
            per = relay.used[who] / counts["relay"] * 1e6 if counts["relay"] else None
            if who == "relay" and relay_target is not None:
                label, bound = relay_target
                rows.append(Row(workload, f"{who} CPU per {unit}", None, per, "µs", label,
                                per is not None and per < bound))
            else:
                rows.append(Row(workload, f"{who} CPU per {unit}", None, per, "µs"))
        for who, label in (("host", "host service"), ("loadgen", "load generator")):
            rows.append(Row(workload, f"{label} CPU, share of a core", 100 * direct.share(who),
                            100 * relay.share(who), "%", ratio=False))
        if ceiling_target is not None:
            self.ceiling_rows(workload, unit, meters, counts, ceiling_target)
        for path, meter in meters.items():
            if meter.share("other") > 0.15:
                self.report.notes.append(
                    f"{workload} {path}: other processes used {100 * meter.share('other'):.0f}% "
                    f"of a core during the run; its numbers are likely low")

    def ceiling_rows(self, workload: str, unit: str, meters: dict[str, CpuMeter],
                     counts: dict[str, int], target: tuple[str, float]) -> None:
        """The rate this machine could reach if CPU were the only limit: its cores divided by
        the CPU one operation costs every process on the path (load generator, host service,
        loopback interrupts, and for the relayed path the relay and the agent). A throughput
        target above it cannot be met on this machine whatever the relay does; the second row
        shows the ceiling with a relay that cost nothing."""
        cores = os.cpu_count() or 1
        label, bound = target

        def ceiling(path: str, *without: str) -> float | None:
            used = meters[path].used
            cpu = sum(v for k, v in used.items() if k != "other" and k not in without)
            return cores * counts[path] / cpu if counts[path] and cpu > 0 else None

        relayed = ceiling("relay")
        rows = self.report.rows
        rows.append(Row(workload, f"CPU ceiling: {unit}s/s if {cores} cores did only this",
                        ceiling("direct"), relayed, "", label,
                        relayed is not None and relayed >= bound, ratio=False,
                        note="cores / CPU per operation of every process on the path"))
        rows.append(Row(workload, "CPU ceiling with a relay that cost nothing", None,
                        ceiling("relay", "relay"), "", ratio=False,
                        note="the same, leaving the relay's own CPU out"))

    @property
    def profile_targets(self) -> set[str]:
        return set(self.args.profile.split(",")) if self.args.profile else set()

    def profile_run(self, workload: str, load: Callable[[float], Any]) -> None:
        """Run ``load`` once more while py-spy records the relay and the agent."""
        pyspy, problem = profiling.ensure_pyspy()
        if pyspy is None:
            self.report.notes.append(f"{workload} profile skipped: {problem}")
            return
        assert self.relay is not None
        seconds = self.durations.profile_s
        rate = 100
        RESULTS.mkdir(parents=True, exist_ok=True)
        samplers = []
        targets = {"relay": self.relay.pid, "agent": self.agent_pid}
        for who, pid in targets.items():
            for fmt, suffix in (("raw", "txt"), ("flamegraph", "svg")):
                out = RESULTS / f"{who}-{workload}.{'raw.txt' if fmt == 'raw' else suffix}"
                samplers.append(self.procs.start(
                    f"pyspy-{who}-{fmt}",
                    profiling.record_argv(pyspy, pid, out, seconds=seconds, fmt=fmt, rate=rate)))
        print(f"  {workload} profiling relay and agent for {seconds:.0f}s with py-spy ...",
              flush=True)
        outcome = load(seconds + 2)
        for popen in samplers:
            try:
                popen.wait(seconds + 30)
            except subprocess.TimeoutExpired:
                self.procs.stop(popen)
        self.report.raw[f"{workload}-profiled-load"] = outcome
        for who in targets:
            raw = RESULTS / f"{who}-{workload}.raw.txt"
            if not raw.exists():
                self.report.notes.append(
                    f"{workload} profile of the {who}: py-spy wrote nothing "
                    f"({self.procs.log_tail(f'pyspy-{who}-raw', 3)})")
                continue
            profile = profiling.load_raw(raw)
            title = f"{who} under {workload} (py-spy, {rate} Hz)"
            top = RESULTS / f"{who}-{workload}-top.txt"
            top.write_text(profiling.summarize(profile, title=title, seconds=seconds, rate=rate))
            self.report.profiles[f"{who}-{workload}"] = profiling.summarize(
                profile, title=title, seconds=seconds, rate=rate, top=12, lines=0)
        self.report.notes.append(
            f"{workload} profiles: {RESULTS.relative_to(REPO)}/{{relay,agent}}-{workload}.svg "
            f"(flame graphs), *-{workload}-top.txt (summaries), *.raw.txt (collapsed stacks)")

    def profile_w1(self, binary: str, url: str) -> None:
        def load(seconds: float) -> dict[str, Any]:
            r = wrk.run(binary, url, token=self.token, seconds=seconds)
            return {"requests_per_s": r.requests_per_s, "p99_ms": r.p99_ms}

        self.profile_run("W1", load)

    def profile_w2(self, url: str) -> None:
        def load(seconds: float) -> dict[str, Any]:
            deadline = time.monotonic() + seconds
            moved = 0
            while time.monotonic() < deadline:
                moved += sum(d[2] for d in self._downloads(url, 4, 1, "w2-profiled"))
            return {"bytes": moved}

        self.profile_run("W2", load)

    def w2(self) -> None:
        """Large downloads (4 x 16 MiB at once) and a slow reader."""
        assert self.relay is not None
        size = 16 * MiB
        rounds = self.durations.w2_rounds
        results: dict[str, dict[str, Any]] = {}
        for path, url in (("direct", self.direct_url(f"/bytes/{size}")),
                          ("relay", self.relay.host_url(HOST_ID, f"/bytes/{size}"))):
            # Baseline before the warm-up round: first-use buffers count as growth too.
            base = {"relay": settle_rss(self.relay.pid, 0.5),
                    "agent": settle_rss(self.agent_pid, 0.5)}
            with RssSampler({"relay": self.relay.pid, "agent": self.agent_pid}) as sampler:
                self._downloads(url, 4, 1, f"w2-warm-{path}")  # warm-up round, not timed
                # Going direct takes a few ms per round: more rounds for a steadier baseline.
                downloads = self._downloads(url, 4, rounds * (4 if path == "direct" else 1),
                                            f"w2-{path}")
            starts = [d[0] for d in downloads]
            ends = [d[1] for d in downloads]
            total = sum(d[2] for d in downloads)
            bad = [d for d in downloads if d[3] != 200 or d[2] != size]
            span = max(ends) - min(starts)
            results[path] = {
                "mb_per_s": total / span / MB, "bytes": total, "seconds": span,
                "bad": len(bad), "rss_base_kib": base, "rss_peak_kib": dict(sampler.peak),
                "growth_mib": {k: (sampler.peak[k] - base[k]) / 1024 for k in base},
            }
            print(f"  W2 {path:6s} {results[path]['mb_per_s']:8.0f} MB/s  "
                  f"({total / MiB:.0f} MiB in {span:.2f}s, bad {len(bad)}); relay RSS +"
                  f"{results[path]['growth_mib']['relay']:.1f} MiB, agent +"
                  f"{results[path]['growth_mib']['agent']:.1f} MiB", flush=True)
        direct, relay = results["direct"], results["relay"]
        rows = self.report.rows
        rows.append(Row("W2", "MB/s (16 MiB x 4 at once)", direct["mb_per_s"],
                        relay["mb_per_s"], "", "≥ 1,000", relay["mb_per_s"] >= 1000))
        rows.append(Row("W2", "relay RSS peak growth", None, relay["growth_mib"]["relay"], "MiB",
                        "< 32 MiB", relay["growth_mib"]["relay"] < 32))
        rows.append(Row("W2", "agent RSS peak growth", None, relay["growth_mib"]["agent"], "MiB"))
        rows.append(Row("W2", "bad downloads (status/size)", direct["bad"], relay["bad"], "",
                        "0", relay["bad"] == 0, ratio=False))
        results["slow_reader"] = self._slow_reader()
        self.report.raw["W2"] = results
        if "W2" in self.profile_targets:
            self.profile_w2(self.relay.host_url(HOST_ID, f"/bytes/{size}"))

    def _downloads(self, url: str, parallel: int, rounds: int, name: str) -> list[list[Any]]:
        workers = [self.loadgen(f"{name}-{i}", "download", "--url", url, "--rounds", str(rounds),
                                "--deadline", "120") for i in range(parallel)]
        try:
            for worker in workers:
                worker.expect(30)
            for worker in workers:
                worker.send("go")
            downloads: list[list[Any]] = []
            for worker in workers:
                downloads += worker.expect(120)["downloads"]
            return downloads
        finally:
            for worker in workers:
                self.procs.stop(worker.popen, 2)

    def _slow_reader(self) -> dict[str, Any]:
        assert self.relay is not None
        seconds = self.durations.slow_s
        url = self.relay.host_url(HOST_ID, f"/bytes/{256 * MiB}")
        base = {"relay": settle_rss(self.relay.pid, 0.5), "agent": settle_rss(self.agent_pid, 0.5)}
        with RssSampler({"relay": self.relay.pid, "agent": self.agent_pid}) as sampler:
            worker = self.loadgen("w2-slow", "slowread", "--url", url, "--rate", "1500000",
                                  "--duration", str(seconds), "--rcvbuf", "16384",
                                  "--deadline", str(seconds + 30))
            try:
                result = worker.expect(seconds + 30)
            finally:
                self.procs.stop(worker.popen, 2)
        growth = {k: (sampler.peak[k] - base[k]) / 1024 for k in base}
        rate = result["bytes"] / max(result["seconds"], 1e-9) / MB
        print(f"  W2 slow reader: {result['bytes'] / MB:.1f} MB at {rate:.2f} MB/s; relay RSS "
              f"+{growth['relay']:.1f} MiB, agent +{growth['agent']:.1f} MiB", flush=True)
        note = f"read {result['bytes'] / MB:.1f} MB of 256 MiB at {rate:.2f} MB/s"
        self.report.rows.append(Row("W2", "slow reader: relay RSS growth", None, growth["relay"],
                                    "MiB", "flat (< 8 MiB)", growth["relay"] < 8, note=note))
        self.report.rows.append(Row("W2", "slow reader: agent RSS growth", None,
                                    growth["agent"], "MiB"))
        return {**result, "status": result.get("status"), "growth_mib": growth,
                "rss_base_kib": base, "rss_peak_kib": dict(sampler.peak)}

    def w3(self) -> None:
        """WebSocket echo: 16 channels of 1 KiB ping-pong, clients in 2 processes."""
        assert self.relay is not None
        results = {}
        meters: dict[str, CpuMeter] = {}
        for path, url in (("direct", self.direct_url("/ws", "ws")),
                          ("relay", self.relay.host_url(HOST_ID, "/ws", "ws"))):
            results[path] = self._ws_echo(url, f"w3-{path}", meter=meters.setdefault(
                path, self.cpu_meter()))
            r = results[path]
            print(f"  W3 {path:6s} {r['rate']:10,.0f} round trips/s  p50 {r['p50_ms']:.2f} ms  "
                  f"p99 {r['p99_ms']:.2f} ms  bad {r['bad']}  CPU {meters[path].describe()}",
                  flush=True)
        direct, relay = results["direct"], results["relay"]
        self.report.raw["W3"] = {k: {**{n: v for n, v in r.items() if n != "hist"},
                                     "cpu_s": meters[k].used} for k, r in results.items()}
        rows = self.report.rows
        rows.append(Row("W3", "round trips/s (16 ch, 1 KiB)", direct["rate"], relay["rate"], "",
                        "≥ 35,000", relay["rate"] >= 35000))
        rows.append(Row("W3", "p50 round trip", direct["p50_ms"], relay["p50_ms"], "ms"))
        rows.append(Row("W3", "p99 round trip", direct["p99_ms"], relay["p99_ms"], "ms",
                        "≤ 2 ms", relay["p99_ms"] <= 2))
        rows.append(Row("W3", "bad echoes / dropped channels", direct["bad"], relay["bad"], "",
                        "0", relay["bad"] == 0, ratio=False))
        self.cpu_rows("W3", "round trip", meters, {"direct": direct["count"],
                                                   "relay": relay["count"]},
                      relay_target=("< 30 µs", 30.0), ceiling_target=("≥ 35,000", 35000.0))
        if "W3" in self.profile_targets:
            self.profile_run("W3", lambda s: self._ws_echo(
                self.relay.host_url(HOST_ID, "/ws", "ws") if self.relay else "", "w3-profile",
                seconds=s))

    def _ws_echo(self, url: str, name: str, seconds: float | None = None,
                 meter: CpuMeter | None = None) -> dict[str, Any]:
        d = self.durations
        seconds = seconds or d.w3_s
        workers = [self.loadgen(f"{name}-{i}", "wsecho", "--url", url, "--channels", "8",
                                "--size", "1024", "--duration", str(seconds), "--warmup",
                                str(d.w3_warmup_s), "--deadline", str(seconds + 60))
                   for i in range(2)]
        try:
            for worker in workers:
                worker.expect(30)
            with meter or contextlib.nullcontext():
                for worker in workers:
                    worker.send("go")
                parts = [worker.expect(seconds + d.w3_warmup_s + 30) for worker in workers]
                for worker in workers:  # reaped inside the block: their CPU is counted
                    self.procs.stop(worker.popen, 5)
        finally:
            for worker in workers:
                self.procs.stop(worker.popen, 2)
        hist: collections.Counter[int] = collections.Counter()
        for part in parts:
            hist.update({int(k): v for k, v in part["latency_us"].items()})
        count = sum(p["count"] for p in parts)
        return {
            "rate": count / seconds, "count": count, "seconds": seconds,
            "p50_ms": percentile(hist, 50) / 1000, "p99_ms": percentile(hist, 99) / 1000,
            "bad": sum(p["bad"] + p["closed"] for p in parts), "hist": hist,
        }

    @staticmethod
    def _w4_capacity_row(registered: int, results: dict[str, Any]) -> Row:
        """The 50,000-tunnel target: held here, or why this machine cannot show it."""
        target = 50_000
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        note = f"open-file hard limit {hard:,}"
        if hard != resource.RLIM_INFINITY and hard < target + 100:
            stages = results.get("stages") or [{}]
            per_kib = float(stages[-1].get("kib_per_tunnel", 0.0))
            note = (f"this machine's hard limit of open files is {hard:,} per process (one "
                    f"socket per tunnel; raising it needs CAP_SYS_RESOURCE), so 50,000 cannot "
                    f"be opened here; at {per_kib:.1f} KiB each, 50,000 idle tunnels would take "
                    f"about {per_kib * target / 1024:,.0f} MiB")
        return Row("W4", "tunnels held by one relay process", None, registered, "",
                   "≥ 50,000", registered >= target, ratio=False, note=note)

    def w4(self) -> None:
        """Idle tunnels: relay RSS per tunnel at each stage (1,000 and 19,000) on a fresh relay."""
        stages = sorted(int(n) for n in self.args.tunnels.split(","))
        # The idle clients answer every PING, so the relay's keepalive never drops them.
        relay = self.start_relay("relay-w4", {"tunnel": {"ping_interval_s": W4_PING_INTERVAL_S}})
        warm = self._open_tunnels(relay, "warm", 0, 16, 1)
        time.sleep(0.5)
        base = settle_rss(relay.pid, 1.5)
        print(f"  W4 relay baseline RSS {base / 1024:.1f} MiB (16 warm-up tunnels)", flush=True)
        results: dict[str, Any] = {"baseline_kib": base, "stages": []}
        workers: list[Worker] = list(warm)
        opened = 0
        procs_per_stage = 4
        try:
            for total in stages:
                add = total - opened
                started = time.monotonic()
                workers += self._open_tunnels(relay, "idle", opened, add, procs_per_stage)
                connect_s = time.monotonic() - started
                opened = total
                wait_for(functools.partial(_registered, relay, total + 16), 60,
                         f"{total} tunnels registered", interval=0.25)
                time.sleep(2.0)
                rss = settle_rss(relay.pid, 1.5)
                per = (rss - base) / total
                stage = {"tunnels": total, "rss_kib": rss, "kib_per_tunnel": per,
                         "connect_s": connect_s}
                results["stages"].append(stage)
                print(f"  W4 {total:6,d} tunnels: relay RSS {rss / 1024:.1f} MiB, "
                      f"{per:.1f} KiB/tunnel (opened {add:,} in {connect_s:.1f}s)", flush=True)
                self.report.rows.append(Row(
                    "W4", f"relay KiB per idle tunnel @ {total:,}", None, per, "KiB", "≤ 12 KiB",
                    per <= 12, note=f"{add / connect_s:,.0f} tunnels/s opened"))
            if self.agent_pid:
                agent_kib = settle_rss(self.agent_pid, 0.5)
                self.report.rows.append(Row(
                    "W4", "agent RSS, whole process (one tunnel, idle)", None, agent_kib / 1024,
                    "MiB", note="an agent holds one tunnel: this is its per-tunnel cost"))
            registered = json_get(f"{relay.http}/readyz").get("tunnels", 0)
            for worker in workers:
                worker.send("quit")
            dropped: collections.Counter[str] = collections.Counter()
            pings = 0
            for worker in workers:
                with contextlib.suppress(RuntimeError):
                    answer = worker.expect(30)
                    dropped.update(answer.get("closed_early", {}))
                    pings += int(answer.get("pings", 0))
            results.update(registered_at_end=registered, closed_early=dict(dropped),
                           pings_answered=pings)
            lost = sum(dropped.values())
            self.report.rows.append(self._w4_capacity_row(registered, results))
            self.report.rows.append(Row(
                "W4", "tunnels dropped while idle", None, lost, "", "0", lost == 0, ratio=False,
                note=f"{registered:,} registered at the end; {pings:,} relay PINGs answered "
                     f"(ping_interval_s = {W4_PING_INTERVAL_S:g})"))
        finally:
            for worker in workers:
                self.procs.stop(worker.popen, 2)
            self.procs.stop(relay.popen)
        self.report.raw["W4"] = results
        if "W4" in self.profile_targets:
            self.profile_w4()

    def profile_w4(self) -> None:
        """Which allocation sites grow with every idle tunnel (tracemalloc in the relay)."""
        out = self.tmp / "memtrace"
        relay = self.start_relay(
            "relay-w4-trace", {"tunnel": {"ping_interval_s": W4_PING_INTERVAL_S}},
            launcher=(PYTHON, "-m", "bench.memtrace", "--out", str(out), "--"))
        workers: list[Worker] = []
        count = 1000
        print(f"  W4 memory profile: tracemalloc in a relay, {count:,} idle tunnels ...",
              flush=True)

        def snapshot(n: int) -> Path:
            os.kill(relay.pid, signal.SIGUSR1)
            wait_for((out / f"snapshot-{n}.done").exists, 120, f"tracemalloc snapshot {n}")
            return out / f"snapshot-{n}.pickle"

        try:
            workers += self._open_tunnels(relay, "warm", 0, 16, 1)
            time.sleep(1.0)
            rss0 = settle_rss(relay.pid, 0.5)
            before = snapshot(1)
            workers += self._open_tunnels(relay, "idle", 0, count, 4)
            wait_for(functools.partial(_registered, relay, count + 16), 60,
                     "traced tunnels registered", interval=0.25)
            time.sleep(2.0)
            rss1 = settle_rss(relay.pid, 0.5)
            after = snapshot(2)
            from bench.memtrace import compare

            text = (f"relay memory per idle tunnel, {count:,} tunnels (tracemalloc, "
                    f"{W4_PING_INTERVAL_S:g}s pings)\nRSS growth under tracing: "
                    f"{(rss1 - rss0) / count:.1f} KiB per tunnel (tracing adds its own "
                    f"overhead; the W4 rows are measured without it)\n"
                    + compare(before, after, count))
        finally:
            for worker in workers:
                self.procs.stop(worker.popen, 2)
            self.procs.stop(relay.popen)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "relay-W4-memory.txt").write_text(text)
        self.report.profiles["relay-W4-memory"] = text
        self.report.notes.append(f"W4 memory profile: {RESULTS.relative_to(REPO)}/"
                                 "relay-W4-memory.txt (tracemalloc, growth per tunnel by site)")

    def _open_tunnels(self, relay: Relay, prefix: str, start: int, count: int,
                      processes: int) -> list[Worker]:
        workers = []
        per = -(-count // processes)
        index = start
        while index < start + count:
            n = min(per, start + count - index)
            workers.append(self.loadgen(
                f"w4-{prefix}-{index}", "tunnels", "--url", relay.ws, "--count", str(n),
                "--start", str(index), "--prefix", prefix, "--concurrency", "64",
                "--deadline", "600"))
            index += n
        failed = 0
        errors: collections.Counter[str] = collections.Counter()
        for worker in workers:
            answer = worker.expect(180)
            failed += int(answer["failed"])
            errors.update(answer.get("errors", {}))
        if failed:
            raise RuntimeError(f"{failed} of {count} tunnels failed to open: {dict(errors)}")
        return workers

    def w5(self) -> None:
        """Owner vs non-owner relay, when relay-to-relay forwarding (redis directory) exists."""
        if self.args.w5 == "off":
            return
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            self._w5_unavailable("redis-server is not installed (apt-get install redis-server)")
            return
        redis_port = free_port()
        redis = self.procs.start("redis", [
            redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.tmp)])
        started: list[subprocess.Popen[Any]] = [redis]
        try:
            wait_for(lambda: _redis_ping(redis_port), 10, "redis-server")
            relays = []
            for name in ("relay-w5-owner", "relay-w5-other"):
                extra = {"directory": {
                    "backend": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0",
                    "instance_id": name, "peer_secret": "bench-peer-secret-0123456789",
                }}
                try:
                    relay = self.start_relay(name, extra)
                except RuntimeError as exc:
                    self._w5_unavailable(f"a relay with directory.backend=redis did not start: "
                                         f"{str(exc).splitlines()[0]}")
                    return
                started.append(relay.popen)
                relays.append(relay)
            owner, other = relays
            host_id = "acme:bench-w5"
            agent = self.start_agent("agent-w5", owner, host_id)
            started.append(agent)
            headers = {"Authorization": f"Bearer {self.token}"}
            status, body = http_get(other.host_url(host_id, "/small"), headers, timeout=10)
            if status != 200:
                self._w5_unavailable(
                    f"the non-owner relay answered {status} {body[:120].decode(errors='replace')}"
                    f" — relay-to-relay forwarding is not available yet")
                return
            binary = self.ensure_wrk()
            if binary is None:
                self._w5_unavailable(self.wrk_problem)
                return
            results = {}
            meters: dict[str, CpuMeter] = {}
            for path, relay in (("owner", owner), ("non-owner", other)):
                url = relay.host_url(host_id, "/small")
                wrk.run(binary, url, token=self.token, seconds=1)
                with CpuMeter({"owner": owner.popen.pid, "entry": other.popen.pid,
                               "agent": agent.pid, "host": self.host_pid}) as meters[path]:
                    results[path] = wrk.run(binary, url, token=self.token,
                                            seconds=self.durations.w5_s)
                r = results[path]
                print(f"  W5 {path:9s} {r.requests_per_s:10,.0f} req/s  p50 {ms(r.p50_ms)}  "
                      f"p99 {ms(r.p99_ms)}  errors {r.errors}  CPU {meters[path].describe()}",
                      flush=True)
            own, fwd = results["owner"], results["non-owner"]
            self.report.raw["W5"] = {k: {**asdict(v), "cpu_s": meters[k].used}
                                     for k, v in results.items()}
            rows = self.report.rows
            note = "direct = enters via the owner relay; via relay = via a non-owner relay"
            share = fwd.requests_per_s / own.requests_per_s if own.requests_per_s else 0.0
            rows.append(Row("W5", "req/s (owner | non-owner)", own.requests_per_s,
                            fwd.requests_per_s, "", "≥ 0.70x owner", share >= 0.70, note=note))
            rows.append(Row("W5", "p50 latency (owner | non-owner)", own.p50_ms, fwd.p50_ms,
                            "ms"))
            rows.append(Row("W5", "p99 latency (owner | non-owner)", own.p99_ms, fwd.p99_ms,
                            "ms"))
            rows.append(Row("W5", "errors (owner | non-owner)", own.errors, fwd.errors, "", "0",
                            fwd.errors == 0, ratio=False))

            def per_request(path: str, *who: str) -> float | None:
                n = results[path].requests
                return sum(meters[path].used[w] for w in who) / n * 1e6 if n else None

            # Through a non-owner, two relays share each request: the entry's half and the
            # owner's (which, serving a peer link's stream, parses no HTTP).
            rows.append(Row("W5", "relays' CPU per request (owner | non-owner)",
                            per_request("owner", "owner"),
                            per_request("non-owner", "owner", "entry"), "µs"))
            rows.append(Row("W5", "non-owner path: entry | owner relay CPU per request",
                            per_request("non-owner", "entry"), per_request("non-owner", "owner"),
                            "µs", ratio=False))
        finally:
            for popen in reversed(started):
                self.procs.stop(popen)

    def w7(self) -> None:
        """The Redis directory's cost per relay at 200 and 20,000 tunnels (in this process)."""
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            self.report.failures.append("W7: redis-server is not installed")
            return
        from bench import directory  # imports the relay package: only when W7 runs

        redis_port = free_port()
        redis = self.procs.start("redis-w7", [
            redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.tmp)])
        try:
            wait_for(lambda: _redis_ping(redis_port), 10, "redis-server")
            small, large = self.args.w7_hosts
            result = asyncio.run(directory.measure(f"redis://127.0.0.1:{redis_port}/0",
                                                   small, large))
        finally:
            self.procs.stop(redis)
        few, many = result.windows
        for w in result.windows:
            print(f"  W7 {w.hosts:6,d} hosts: {w.per_second:7.1f} Redis commands/s "
                  f"({w.per_beat:.1f} per heartbeat), Redis busy {w.busy_us_per_second:.0f} µs/s",
                  flush=True)
        print(f"  W7 crashed relay's hosts offline after {result.offline_after_s:.2f} s "
              f"(entry_ttl_s = {result.entry_ttl_s:g})", flush=True)
        self.report.raw["W7"] = result.as_dict()
        rows = self.report.rows
        flat = many.per_second <= few.per_second * 1.05
        note = (f"direct = {few.hosts:,} tunnels, via relay = {many.hosts:,}; heartbeat_s = "
                f"{result.heartbeat_s:g} (the default 5 s divides the rate by "
                f"{5 / result.heartbeat_s:g}). The per-tunnel TTL layout ran ≥ 2 commands per "
                f"tunnel per heartbeat: ≥ {2 * many.hosts / result.heartbeat_s:,.0f}/s here")
        rows.append(Row("W7", "Redis commands/s per relay", few.per_second, many.per_second, "",
                        "independent of the tunnel count", flat, note))
        rows.append(Row("W7", "Redis busy µs/s per relay", few.busy_us_per_second,
                        many.busy_us_per_second, "µs"))
        rows.append(Row("W7", f"crashed relay offline after (@ {many.hosts:,})", None,
                        result.offline_after_s, "s", f"≤ entry_ttl_s ({result.entry_ttl_s:g} s)",
                        result.offline_after_s <= result.entry_ttl_s + result.heartbeat_s / 2,
                        ratio=False))
        rows.append(Row("W7", "registrations/s (one relay)", None, result.register_per_s, "",
                        ratio=False))
        rows.append(Row("W7", "lookups/s (one relay, 32 at once)", None, result.lookups_per_s,
                        "", ratio=False, note=f"Redis time per lookup "
                        f"{result.redis_us_per_lookup:.1f} µs (one script call)"))
        rows.append(Row("W7", "Redis memory per registered tunnel", None,
                        result.bytes_per_entry, "B", ratio=False))

    def _w5_unavailable(self, why: str) -> None:
        message = f"W5 skipped: {why}"
        print(f"  {message}", flush=True)
        self.report.notes.append(message)
        if self.args.w5 == "on":
            self.report.failures.append(message)

    # -- the whole run ------------------------------------------------------------------------
    def run(self, selected: Iterable[str]) -> None:
        chosen = set(selected)
        print(f"bench: work dir {self.tmp}", flush=True)
        config = write_config(self.tmp / "token.toml", self.state_dir, free_port())
        self.token = self.mint_token(config)
        # Agents serve HOST_ID and the W5 hosts: one token that may serve the whole org.
        self.agent_token = self.mint_token(config, f"{ORG}:*")
        self.hostile_token = self.mint_token(config, f"{ORG}:*", sub="w6-hostile")
        self.token_file.write_text(self.agent_token)
        self.token_file.chmod(0o600)
        if chosen & {"W0", "W1", "W1T", "W2", "W3", "W6"}:
            self.setup()
        elif "W5" in chosen:
            self.start_host()
        for name in RUN_ORDER:
            if name not in chosen:
                continue
            print(f"bench: {name} ...", flush=True)
            started = time.monotonic()
            try:
                getattr(self, name.lower())()
            except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
                message = f"{name} failed: {exc}"
                print(f"  {message}", flush=True)
                self.report.failures.append(message)
            print(f"bench: {name} took {time.monotonic() - started:.1f}s", flush=True)

    def close(self) -> None:
        self.procs.stop_all()
        if self.args.keep:
            print(f"bench: kept {self.tmp} (logs, configs)")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _registered(relay: Relay, count: int) -> bool:
    """Whether the relay's /readyz reports at least ``count`` tunnels."""
    return int(json_get(f"{relay.http}/readyz").get("tunnels", 0)) >= count


def _redis_ping(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def percentile(hist: collections.Counter[int], pct: float) -> float:
    """The ``pct`` percentile of a histogram of integer values."""
    total = sum(hist.values())
    if not total:
        return float("nan")
    rank = pct / 100 * total
    seen = 0
    for value in sorted(hist):
        seen += hist[value]
        if seen >= rank:
            return float(value)
    return float(max(hist))


# -- output -----------------------------------------------------------------------------------


def ms(value: float | None) -> str:
    """A latency for a progress line."""
    return "n/a" if value is None else f"{value:.2f} ms"


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if value != value:  # NaN
        return "n/a"
    if unit == "ms":
        text = f"{value:.2f}"
    elif unit in {"%", "µs"}:
        return f"{value:,.0f}{' ' if unit == 'µs' else ''}{unit}"
    elif unit in {"MiB", "KiB"}:
        text = f"{value:.1f}"
    elif abs(value) >= 100 or float(value).is_integer():
        text = f"{value:,.0f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def render_table(rows: list[Row]) -> str:
    header = ("workload", "metric", "direct", "via relay", "ratio", "target", "met?")
    body = []
    for row in sorted(rows, key=lambda r: r.workload):
        ratio = ""
        if row.ratio and row.direct and row.relay is not None:
            ratio = f"{row.relay / row.direct:.2f}x"
        met = "" if row.met is None else ("yes" if row.met else "NO")
        body.append((row.workload, row.metric, fmt_value(row.direct, row.unit),
                     fmt_value(row.relay, row.unit), ratio, row.target, met))
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    right = {2, 3, 4}

    def line(cells: tuple[str, ...]) -> str:
        return " | ".join(c.rjust(w) if i in right else c.ljust(w)
                          for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    out = [line(header), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in body]
    notes = [f"  {r.workload} {r.metric}: {r.note}"
             for r in sorted(rows, key=lambda r: r.workload) if r.note]
    return "\n".join(out + (["", *notes] if notes else []))


def describe_machine() -> str:
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "relay"],
                           capture_output=True, text=True, check=False).stdout.strip()
    overrides = sorted(k for k in os.environ if k.startswith("RELAY_")
                       and not k.startswith(STRIPPED_ENV))
    parts = [f"{os.cpu_count()} cores", f"Python {platform.python_version()}",
             f"relay {commit or '?'}{' (relay/ modified)' if dirty else ''}"]
    if overrides:
        parts.append("env overrides: " + ", ".join(overrides))
    return "; ".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short durations (a smoke run)")
    parser.add_argument("--only", default="", help="comma-separated workloads, e.g. W1,W3")
    parser.add_argument("--json", dest="json_path", default="", help="also write results here")
    parser.add_argument("--profile", nargs="?", const="W1", default="",
                        help="record py-spy profiles of the relay and the agent during an extra "
                             "run of these workloads (default W1; also W2, W3; W4 = tracemalloc "
                             "of the relay's memory per idle tunnel)")
    # 20,000 is the target; one process here may hold at most 20,000 descriptors (hard limit).
    parser.add_argument("--tunnels", default="1000,19000", help="W4 stages (total tunnels)")
    parser.add_argument("--w7-hosts", default="200,20000",
                        help="W7: the two directory sizes compared (hosts on one relay)")
    parser.add_argument("--w5", choices=("auto", "on", "off"), default="auto",
                        help="W5: auto = try and skip with a note when forwarding is missing; "
                             "on = a missing W5 fails the run; off = do not try")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, configs)")
    args = parser.parse_args(argv)
    only = [w.strip().upper() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in only if w not in ALL_WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from "
                     f"{', '.join(ALL_WORKLOADS)}")
    args.selected = only or list(ALL_WORKLOADS)
    try:
        small, large = (int(n) for n in args.w7_hosts.split(","))
    except ValueError:
        parser.error("--w7-hosts takes two counts, e.g. 200,20000")
    if not 0 < small < large:
        parser.error("--w7-hosts: the second count must be larger than the first")
    args.w7_hosts = (small, large)
    if args.profile:
        profiled = {w.strip().upper() for w in args.profile.split(",")}
        if not profiled <= {"W1", "W2", "W3", "W4"}:
            parser.error("--profile takes W1, W2, W3 and/or W4")
        args.profile = ",".join(sorted(profiled))
    return args


def _terminate(signum: int, _frame: object) -> None:
    print(f"\nbench: got signal {signum}; stopping every process", flush=True)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the selected workloads, print the table, clean up whatever happens."""
    args = parse_args(argv)
    raise_nofile()
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    bench = Bench(args)
    print(f"bench: {describe_machine()}", flush=True)
    busy = machine_busy()
    if busy > 0.15:
        print(f"bench: WARNING: the machine is already {100 * busy:.0f}% busy before the bench "
              f"starts; the numbers will be low (another test run?)", flush=True)
    try:
        bench.run(args.selected)
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping every process", flush=True)
        return 130
    except RuntimeError as exc:
        print(f"bench: set-up failed: {exc}", flush=True)
        return 1
    finally:
        bench.close()
    report = bench.report
    elapsed = time.monotonic() - started
    print()
    print(render_table(report.rows))
    for note in report.notes:
        print(f"note: {note}")
    for failure in report.failures:
        print(f"FAILED: {failure}")
    for name, text in report.profiles.items():
        file = f"{name}.txt" if name.endswith("-memory") else f"{name}-top.txt"
        tool = "tracemalloc" if name.endswith("-memory") else "py-spy"
        print(f"\n--- {tool}: {name} (top of {RESULTS.relative_to(REPO)}/{file}) ---")
        print("\n".join(text.splitlines()[:60]))
    print(f"\nbench: finished in {elapsed:.0f}s")
    if args.json_path:
        payload = {
            "machine": describe_machine(), "seconds": elapsed, "durations": asdict(bench.durations),
            "rows": [asdict(r) for r in report.rows], "notes": report.notes,
            "failures": report.failures, "raw": report.raw, "profiles": report.profiles,
        }
        Path(args.json_path).write_text(json.dumps(payload, indent=2, default=str))
        print(f"bench: wrote {args.json_path}")
    if report.failures:
        return 1
    if args.strict and any(r.met is False for r in report.rows):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
