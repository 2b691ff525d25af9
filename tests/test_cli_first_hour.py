"""The first hour at the command line: every mistake a newcomer makes is one line, not a
traceback, and what the relay prints can be pasted as it is.

Every test runs the real CLI in a subprocess and reads its stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

from relay import __version__
from relay.cli import self_command
from tests.harness import PYTHON, REPO, free_port, start_relay, write_config
from tests.test_cli import assert_one_line_config_error, relay_cli, relay_cli_all

VENV_BIN = Path(PYTHON).parent


def assert_one_line(result: subprocess.CompletedProcess[str], status: int, *needles: str) -> str:
    assert result.returncode == status, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_version() -> None:
    result = relay_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"relay {__version__}"


def test_help_is_written_for_people() -> None:
    result, token = relay_cli_all(["--help"], ["token", "--help"])
    assert result.returncode == 0
    assert "Entry points only" not in result.stdout and "``" not in result.stdout
    assert "first steps:" in result.stdout and "--token-file" in result.stdout
    token_help = token.stdout
    assert "ps" in token_help and "--ttl" in token_help


def test_token_ttl_zero_is_one_line(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    for ttl in ("0", "-5"):
        result = relay_cli("token", "--config", str(path), "--sub", "me", "--org", "acme",
                           "--ttl", ttl)
        assert_one_line(result, 2, "--ttl", "positive", ttl)
        assert result.stdout == ""


def test_agent_upstream_without_a_scheme_is_one_line() -> None:
    upstream, relay = relay_cli_all(
        ["agent", "--relay", "ws://127.0.0.1:9", "--host-id", "acme:laptop",
         "--upstream", "127.0.0.1:3000", "--token", "t"],
        ["agent", "--relay", "127.0.0.1:8080", "--host-id", "acme:laptop",
         "--upstream", "http://127.0.0.1:3000", "--token", "t"])
    line = assert_one_line(upstream, 2, "did you mean http://127.0.0.1:3000?")
    assert json.loads(line)["event"] == "agent.bad_option"
    assert json.loads(assert_one_line(relay, 2, "ws(s)://"))["event"] == "agent.bad_option"


def test_devhost_on_a_taken_port_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([PYTHON, "-m", "relay.devhost", "--port", str(port)],
                                capture_output=True, text=True, timeout=30, check=False)
    assert_one_line(result, 1, f"127.0.0.1:{port}", "address already in use")


def test_serve_on_a_taken_port_prints_no_banner(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        path = write_config(tmp_path, {"server": {"port": taken.getsockname()[1]}})
        result = relay_cli("serve", "--config", str(path))
    assert result.returncode == 1
    assert "mint a token" not in result.stderr and "listening on" not in result.stderr


def test_serve_prints_the_banner_once_listening_with_commands_that_run(tmp_path: Path) -> None:
    """Started as ``.venv/bin/relay`` (as ``make run`` does, with the venv not on PATH), the
    banner's commands name ``.venv/bin/relay``, and the printed token command works."""
    path = write_config(tmp_path, {"log": {"level": "info"}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PATH"] = "/usr/bin:/bin"
    relay_script = os.path.relpath(VENV_BIN / "relay", REPO)  # .venv/bin/relay
    proc = subprocess.Popen([relay_script, "serve", "--config", str(path)], cwd=REPO,
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + 20
        while not any("mint a token" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, lines
            lines.append(proc.stderr.readline())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    listening = next(i for i, line in enumerate(lines) if '"relay.listening"' in line)
    banner = next(i for i, line in enumerate(lines) if "listening on http://" in line)
    assert listening < banner  # bound first, then the banner
    mint = next(line for line in lines if "mint a token" in line).split(":", 1)[1].strip()
    assert mint.startswith(f"(umask 077; {relay_script} token --config {path}")
    # The banner writes it to a file; run the command itself to see it work.
    command = mint.removeprefix("(umask 077; ").split(" > ")[0]
    result = subprocess.run(shlex.split(command), cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(".") == 2


def test_self_command_names_what_the_shell_can_run(tmp_path: Path) -> None:
    assert self_command(str(VENV_BIN / "relay")).endswith("bin/relay")
    assert self_command("/nonexistent/relay") == "/nonexistent/relay"
    assert self_command(str(REPO / "relay" / "__main__.py")).endswith(" -m relay")


def test_misspelled_environment_override_is_refused_like_the_file_typo(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    result = relay_cli("check-config", "--config", str(path), env={"RELAY_SERVER_PROT": "9000"})
    assert_one_line_config_error(result, "RELAY_SERVER_PROT", "server.prot", "unknown key",
                                 "did you mean RELAY_SERVER_PORT?")
    result = relay_cli("serve", "--config", str(path), env={"RELAY_LOG_LEVLE": "debug"})
    assert_one_line_config_error(result, "RELAY_LOG_LEVLE", "RELAY_LOG_LEVEL")


def test_relay_variables_that_are_not_keys_stay_allowed(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    allowed = {"RELAY_CONFIG": str(path), "RELAY_ADMIN_URL": "http://127.0.0.1:1",
               "RELAY_URL": "wss://relay.example", "RELAY_HOST_ID": "acme:laptop",
               "RELAY_UPSTREAM": "http://127.0.0.1:3000", "RELAY_TOKEN_FILE": "/tmp/t",
               "RELAY_BENCH_TOKEN": "x", "RELAY_SERVER_PORT": "9001"}
    result = relay_cli("check-config", env=allowed, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["server"]["port"] == 9001


def test_serve_without_a_config_file_refuses_and_creates_nothing(tmp_path: Path) -> None:
    for command in (["serve"], ["token", "--sub", "me", "--org", "acme"]):
        result = relay_cli(*command, cwd=tmp_path)
        line = assert_one_line_config_error(result, str(tmp_path / "config.toml"),
                                            "file not found", "--config", "RELAY_CONFIG")
        assert "Traceback" not in line
        assert list(tmp_path.iterdir()) == []  # no ./state


async def test_status_against_a_relay_without_an_admin_secret_says_so(tmp_path: Path) -> None:
    from relay.config import load_config

    relay = await start_relay(load_config(write_config(tmp_path), env={}))
    try:
        # A subprocess, not the test's loop: the relay must keep answering meanwhile.
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "relay", "status", "--url", relay.url, "--secret", "s",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = await proc.communicate()
    finally:
        await relay.stop()
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "admin.secret is not set" in lines[0], lines


def test_status_names_the_cause_when_nothing_listens() -> None:
    port = free_port()
    result = relay_cli("status", "--url", f"http://127.0.0.1:{port}", "--secret", "s")
    assert_one_line(result, 1, f"127.0.0.1:{port}", "connection refused")
