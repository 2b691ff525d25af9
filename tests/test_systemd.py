"""systemd integration: the notify protocol over a real datagram socket, and the unit files.

The datagrams are read from a real AF_UNIX socket on the same event loop as the feeder: the loop
is single-threaded, so after a synchronous drain of the socket everything read later was sent
later, which makes "no WATCHDOG=1 while X" assertions exact instead of timing guesses.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import relay.systemd as systemd_mod
from relay.config import ServerConfig
from relay.systemd import Notifier, WatchdogFeeder, watchdog_interval

UNIT_DIR = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
UNITS = ("relay.service", "relay-agent.service")

Message = dict[str, str]


def parse(datagram: bytes) -> Message:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def drain(sock: socket.socket) -> list[Message]:
    """Everything already queued on the socket, without waiting."""
    out: list[Message] = []
    while True:
        try:
            out.append(parse(sock.recv(65536)))
        except BlockingIOError:
            return out


async def recv(sock: socket.socket, within: float = 3.0) -> Message:
    loop = asyncio.get_running_loop()
    return parse(await asyncio.wait_for(loop.sock_recv(sock, 65536), within))


async def recv_until(
    sock: socket.socket, predicate: Any, within: float = 3.0
) -> tuple[Message, list[Message]]:
    """Read until a message satisfies ``predicate``; return it and the ones read before it."""
    before: list[Message] = []
    deadline = time.monotonic() + within
    while True:
        message = await recv(sock, max(0.01, deadline - time.monotonic()))
        if predicate(message):
            return message, before
        before.append(message)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        yield sock, {"NOTIFY_SOCKET": str(path)}
    finally:
        sock.close()


@pytest.fixture(autouse=True)
def _close_notifiers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close every Notifier a test made, so no socket is left to the garbage collector."""
    made: list[Notifier] = []
    original = Notifier.from_env.__func__  # type: ignore[attr-defined]

    def from_env(cls: type[Notifier], env: Any = os.environ) -> Notifier:
        notifier: Notifier = original(cls, env)
        made.append(notifier)
        return notifier

    monkeypatch.setattr(Notifier, "from_env", classmethod(from_env))
    yield
    for notifier in made:
        notifier.close()


class RecordingLog:
    """Stands in for the module's structlog logger, whatever structlog configuration is live."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def _record(self, level: str) -> Any:
        def log(event: str, **kw: Any) -> None:
            self.events.append((level, event, kw))

        return log

    def __getattr__(self, level: str) -> Any:
        return self._record(level)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [kw for _, name, kw in self.events if name == event]


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> RecordingLog:
    recorder = RecordingLog()
    monkeypatch.setattr(systemd_mod, "log", recorder)
    return recorder


# --- Notifier -------------------------------------------------------------------------------


async def test_ready_status_stopping_reloading_arrive(notify_socket: Any) -> None:
    sock, env = notify_socket
    notifier = Notifier.from_env(env)
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.status("3 tunnels; accepting")
    assert notifier.stopping()
    before = time.monotonic_ns() // 1000
    assert notifier.reloading()
    after = time.monotonic_ns() // 1000
    assert notifier.send(EXTEND_TIMEOUT_USEC=5_000_000, STATUS="draining")
    notifier.close()

    assert await recv(sock) == {"READY": "1"}
    assert await recv(sock) == {"STATUS": "3 tunnels; accepting"}
    assert await recv(sock) == {"STOPPING": "1"}
    reloading = await recv(sock)
    assert reloading["RELOADING"] == "1"
    # sd_notify(3): MONOTONIC_USEC is CLOCK_MONOTONIC in microseconds at the time of the reload.
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    assert await recv(sock) == {"EXTEND_TIMEOUT_USEC": "5000000", "STATUS": "draining"}
    assert drain(sock) == []


async def test_watchdog_ping(notify_socket: Any) -> None:
    sock, env = notify_socket
    assert Notifier.from_env(env).watchdog()
    assert await recv(sock) == {"WATCHDOG": "1"}


async def test_newline_in_status_cannot_forge_another_field(notify_socket: Any) -> None:
    sock, env = notify_socket
    Notifier.from_env(env).status("host a\nREADY=1")
    assert await recv(sock) == {"STATUS": "host a READY=1"}


async def test_abstract_namespace_socket() -> None:
    name = f"relay-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert await recv(sock) == {"READY": "1"}
    finally:
        sock.close()


def test_unset_notify_socket_is_a_silent_noop(logs: RecordingLog) -> None:
    for env in ({}, {"NOTIFY_SOCKET": ""}):
        notifier = Notifier.from_env(env)
        assert not notifier.enabled
        assert notifier.ready() is False
        assert notifier.status("x") is False
        assert notifier.stopping() is False
        assert notifier.reloading() is False
        assert notifier.watchdog() is False
        notifier.close()
    assert logs.events == []


async def test_feeder_without_notify_socket_starts_no_task() -> None:
    feeder = WatchdogFeeder(Notifier.from_env({}), 0.05, lambda: True, 1.0, lambda: "ok")
    feeder.start()
    assert feeder._task is None
    await feeder.stop()


def test_send_errors_never_raise_and_log_once(tmp_path: Path, logs: RecordingLog) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert notifier.enabled
    for _ in range(5):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
    failures = logs.named("systemd.notify_failed")
    assert len(failures) == 1
    assert failures[0]["address"].endswith("nobody-listens")


def test_unsupported_address_is_disabled_not_fatal(logs: RecordingLog) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert len(logs.named("systemd.notify_failed")) == 1


def test_full_queue_drops_instead_of_blocking(tmp_path: Path, logs: RecordingLog) -> None:
    # systemd not reading (hung PID 1, full queue) must not block the event loop.
    path = tmp_path / "full"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
        started = time.monotonic()
        results = [notifier.status("x" * 1000) for _ in range(5000)]
        assert time.monotonic() - started < 5
        assert results[0] is True
        assert results[-1] is False  # the queue filled up and later messages were dropped
        assert len(logs.named("systemd.notify_failed")) == 1
    finally:
        listener.close()


# --- watchdog_interval ------------------------------------------------------------------------


def test_watchdog_interval_is_half_the_period() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "500000"}) == 0.25
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"WATCHDOG_USEC": ""},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "soon"},
        # Inherited from a parent systemd watches: not ours to feed.
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"},
    ],
)
def test_no_watchdog_interval(env: dict[str, str]) -> None:
    assert watchdog_interval(env) is None


# --- WatchdogFeeder -------------------------------------------------------------------------

INTERVAL = 0.1
MAX_LAG = 0.25


def is_ping(message: Message) -> bool:
    return message.get("WATCHDOG") == "1"


async def test_feeder_pings_periodically_while_healthy(notify_socket: Any) -> None:
    sock, env = notify_socket
    feeder = WatchdogFeeder(Notifier.from_env(env), INTERVAL, lambda: True, MAX_LAG,
                            status_text=lambda: "2 tunnels; accepting")
    feeder.start()
    try:
        # The first round goes out at once: STATUS, then the first ping.
        assert await recv(sock) == {"STATUS": "2 tunnels; accepting"}
        assert await recv(sock) == {"WATCHDOG": "1"}
        drain(sock)
        # About one per interval: steady (at least 3 a second: the next 3 arrive within 1 s),
        # and not a flood (at most 12 a second: those 3 take a quarter of a second or more).
        started = time.monotonic()
        for _ in range(3):
            await recv_until(sock, is_ping, within=max(0.01, started + 1.0 - time.monotonic()))
        assert time.monotonic() - started >= 3 / 12
    finally:
        await feeder.stop()
    assert feeder._task is None
    drain(sock)
    await asyncio.sleep(3 * INTERVAL)
    assert drain(sock) == []  # stopped means stopped


async def test_no_ping_while_unhealthy(notify_socket: Any) -> None:
    sock, env = notify_socket
    healthy, text = [True], ["tunnel up"]
    feeder = WatchdogFeeder(Notifier.from_env(env), INTERVAL, lambda: healthy[0], MAX_LAG,
                            status_text=lambda: text[0])
    feeder.start()
    try:
        await recv_until(sock, is_ping)
        healthy[0], text[0] = False, "no tunnel; reconnect loop stopped"
        drain(sock)  # sent while healthy
        withheld, before = await recv_until(sock, lambda m: "STATUS" in m)
        assert withheld["STATUS"] == (
            "no tunnel; reconnect loop stopped; watchdog withheld: unhealthy"
        )
        assert not any(is_ping(m) for m in before)
        await asyncio.sleep(6 * INTERVAL)
        assert not any(is_ping(m) for m in drain(sock))

        healthy[0], text[0] = True, "tunnel up"
        resumed, _ = await recv_until(sock, is_ping)
        assert resumed == {"WATCHDOG": "1"}
    finally:
        await feeder.stop()


async def test_no_ping_while_the_loop_is_blocked(notify_socket: Any) -> None:
    sock, env = notify_socket
    feeder = WatchdogFeeder(Notifier.from_env(env), INTERVAL, lambda: True, MAX_LAG,
                            status_text=lambda: "accepting")
    feeder.start()

    async def wedge() -> None:
        # A blocking call on the event loop: exactly the bug the feeder must detect.
        time.sleep(2 * MAX_LAG)  # noqa: ASYNC251

    try:
        await recv_until(sock, is_ping)
        drain(sock)
        await wedge()
        # Nothing can be sent while the loop is blocked (same thread), and the round that
        # measures the block must not ping either: the next message is the withheld STATUS.
        withheld, before = await recv_until(sock, lambda m: "STATUS" in m)
        assert before == []
        assert withheld["STATUS"].startswith("accepting; watchdog withheld: event loop lagged")
        assert feeder.last_lag_s >= MAX_LAG
        # Responsive again: pings resume and the status clears.
        await recv_until(sock, lambda m: m.get("STATUS") == "accepting")
        await recv_until(sock, is_ping)
    finally:
        await feeder.stop()


async def test_tick_decides_on_lag_and_health(notify_socket: Any, logs: RecordingLog) -> None:
    sock, env = notify_socket
    healthy: list[Any] = [True]

    def check() -> bool:
        if isinstance(healthy[0], Exception):
            raise healthy[0]
        return bool(healthy[0])

    feeder = WatchdogFeeder(Notifier.from_env(env), 10.0, check, max_loop_lag_s=1.0)
    assert feeder.tick(0.2) is True
    assert await recv(sock) == {"WATCHDOG": "1"}
    assert feeder.tick(1.0) is False  # the bound is exclusive
    assert await recv(sock) == {"STATUS": "watchdog withheld: event loop lagged 1.0s"}
    assert feeder.tick(0.0) is True
    healthy[0] = RuntimeError("directory gone")
    assert feeder.tick(0.0) is False  # a health check that raises is a failed health check
    healthy[0] = False
    assert feeder.tick(0.0) is False
    messages = drain(sock)
    assert sum(map(is_ping, messages)) == 1
    assert {"STATUS": "watchdog withheld: unhealthy"} in messages
    assert logs.named("systemd.health_check_failed")
    assert [kw["reason"] for kw in logs.named("systemd.watchdog_withheld")] == [
        "event loop lagged 1.0s",
        "unhealthy",
    ]
    # Withholding is logged on change, not on every round.
    assert len(logs.named("systemd.watchdog_resumed")) == 1


async def test_status_only_without_a_watchdog(notify_socket: Any) -> None:
    sock, env = notify_socket
    texts = iter(["starting", "starting", "1 tunnel"])
    feeder = WatchdogFeeder(Notifier.from_env(env), None, lambda: True, 1.0,
                            status_text=lambda: next(texts))
    assert feeder.tick(0.0) is False
    assert feeder.tick(5.0) is False
    assert feeder.tick(0.0) is False
    # Only changes are sent, and never a ping nor a lag complaint: no watchdog is configured.
    assert drain(sock) == [{"STATUS": "starting"}, {"STATUS": "1 tunnel"}]


def test_feeder_rejects_bad_bounds() -> None:
    notifier = Notifier.from_env({})
    with pytest.raises(ValueError):
        WatchdogFeeder(notifier, 0, lambda: True, 1.0)
    with pytest.raises(ValueError):
        WatchdogFeeder(notifier, 1.0, lambda: True, 0)


# --- unit files -----------------------------------------------------------------------------


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file; each key maps to all of its values, in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(span: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[unit]
    return total


@pytest.mark.parametrize("unit", UNITS)
def test_unit_has_the_required_directives(unit: str) -> None:
    service = read_unit(UNIT_DIR / unit)["Service"]

    def one(key: str) -> str:
        assert key in service, f"{unit}: {key}= missing"
        return service[key][-1]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert seconds(one("WatchdogSec")) > 0
    assert one("Restart") in {"on-failure", "always"}
    if "DynamicUser" in service:
        assert one("DynamicUser") == "yes"
    else:
        assert one("User") not in {"", "root"}
    assert one("ProtectSystem") == "strict"
    assert one("NoNewPrivileges") == "yes"
    assert one("PrivateTmp") == "yes"
    assert one("KillSignal") == "SIGTERM"
    assert int(one("LimitNOFILE")) >= 65536
    assert one("ExecStart").startswith("/opt/relay/.venv/bin/relay ")


def test_relay_unit_specifics() -> None:
    service = read_unit(UNIT_DIR / "relay.service")["Service"]
    assert service["Restart"] == ["on-failure"]
    assert service["ExecStart"] == [
        "/opt/relay/.venv/bin/relay serve --config /etc/relay/config.toml"
    ]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["StateDirectory"] == ["relay"]
    assert service["EnvironmentFile"] == ["-/etc/relay/relay.env"]
    assert service["DynamicUser"] == ["yes"]
    assert "RELAY_AUTH_DEV_STATE_DIR=%S/relay" in service["Environment"]
    # systemd must never SIGKILL a relay that is still inside its drain grace.
    assert seconds(service["TimeoutStopSec"][-1]) > ServerConfig().drain_grace_s + 10


def test_agent_unit_specifics() -> None:
    service = read_unit(UNIT_DIR / "relay-agent.service")["Service"]
    assert service["Restart"] == ["always"]
    argv = service["ExecStart"][0].split()
    assert argv[:2] == ["/opt/relay/.venv/bin/relay", "agent"]
    for flag in ("--relay", "--host-id", "--upstream", "--token-file"):
        value = argv[argv.index(flag) + 1]
        # ${VAR} (not $VAR): systemd passes it as exactly one argument.
        assert re.fullmatch(r"\$\{RELAY_[A-Z_]+\}", value), (flag, value)
    env_file = service["EnvironmentFile"][0]
    example = (UNIT_DIR / "agent.env.example").read_text()
    for name in re.findall(r"\$\{(RELAY_[A-Z_]+)\}", service["ExecStart"][0]):
        assert re.search(rf"^{name}=\S", example, re.M), f"{name} not in agent.env.example"
    assert env_file == "/etc/relay/agent.env"
    unit = read_unit(UNIT_DIR / "relay-agent.service")["Unit"]
    assert unit["StartLimitIntervalSec"] == ["0"]  # never give up on the host's only way in
    sysusers = (UNIT_DIR / "relay-agent.sysusers.conf").read_text()
    assert re.search(rf"^u {service['User'][0]} ", sysusers, re.M)


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze not found: apt-get install -y systemd (the Makefile installs it)"
    return tool


@pytest.fixture
def verifiable_units(tmp_path: Path) -> Path:
    """The units with ExecStart pointed at a stub: verify insists the binary exists."""
    stub = tmp_path / "relay"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    for unit in UNITS:
        text = (UNIT_DIR / unit).read_text()
        assert "/opt/relay/.venv/bin/relay " in text
        (tmp_path / unit).write_text(text.replace("/opt/relay/.venv/bin/relay ", f"{stub} "))
    return tmp_path


def test_systemd_analyze_verify(verifiable_units: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", *(str(verifiable_units / u) for u in UNITS)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    # verify exits 0 on unknown keys and unparsable values, only warning: any output is a defect.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    assert result.stdout.strip() == "", result.stdout


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_security_exposure(verifiable_units: Path, unit: str) -> None:
    # Exposure is 0.0 (locked down) .. 10.0 (unprotected); the units score about 1.3. A threshold
    # of 2.0 catches a hardening directive lost in an edit.
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", "--threshold=20",
         str(verifiable_units / unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
