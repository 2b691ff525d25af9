"""The command line as an operator meets it: ``python -m relay ...`` in a subprocess.

Bad configuration must stop with exit status 2 and exactly one line on stderr naming the file
(or environment variable), the key and the problem, never a traceback; ``check-config`` must
never print a secret; ``relay token`` must mint tokens the relay accepts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay.config import load_config
from tests.harness import PYTHON, REPO, start_relay, write_config

ADMIN_SECRET = "admin-secret-do-not-print-1"
PEER_SECRET = "peer-secret-do-not-print-22"
REDIS_PASSWORD = "redis-pw-do-not-print-333"


def relay_cli(*args: str, env: dict[str, str] | None = None,
              cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        [PYTHON, "-m", "relay", *args], cwd=str(cwd), env={**clean, **(env or {})},
        capture_output=True, text=True, timeout=30, check=False,
    )


def relay_cli_all(*calls: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
    """``relay_cli`` for each argument list, the processes run side by side (they are
    independent; one after another, their start-ups added up)."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda args: relay_cli(*args), calls))


def assert_one_line_config_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("relay: config error: ")
    for needle in needles:
        assert needle in line, (needle, line)
    assert "Traceback" not in result.stderr
    return line


def test_help_works() -> None:
    commands = ("serve", "agent", "token", "check-config", "status")
    result, *subs = relay_cli_all(["--help"], *([command, "--help"] for command in commands))
    assert result.returncode == 0 and result.stderr == ""
    for command in commands:
        assert command in result.stdout
    for command, sub in zip(commands, subs, strict=True):
        assert sub.returncode == 0 and "usage: relay" in sub.stdout, command


def test_no_command_is_a_usage_error() -> None:
    result = relay_cli()
    assert result.returncode == 2 and "usage: relay" in result.stderr


def test_check_config_prints_the_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    path = write_config(tmp_path, {
        "admin": {"secret": ADMIN_SECRET},
        "directory": {"peer_secret": PEER_SECRET,
                      "redis_url": f"redis://:{REDIS_PASSWORD}@10.0.0.2:6379/0"},
    })
    result = relay_cli("check-config", "--config", str(path),
                       env={"RELAY_SERVER_PORT": "9123", "RELAY_ACCESS_DENY_TTL_S": "5"})
    assert result.returncode == 0, result.stderr
    for secret in (ADMIN_SECRET, PEER_SECRET, REDIS_PASSWORD):
        assert secret not in result.stdout and secret not in result.stderr
    doc = json.loads(result.stdout)
    assert doc["file"] == str(path)
    assert doc["admin"]["secret"] == "********"
    assert doc["directory"]["peer_secret"] == "********"
    assert doc["directory"]["redis_url"] == "********"
    # Effective: file values, defaults and environment overrides all shown.
    assert doc["server"]["port"] == 9123
    assert doc["access"]["deny_ttl_s"] == 5.0
    assert doc["access"]["allow_ttl_s"] == 900.0
    assert doc["auth"]["mode"] == "dev"
    assert doc["auth"]["algorithms"] == ["RS256", "ES256", "EdDSA"]


def test_check_config_masks_a_secret_given_in_the_environment(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    result = relay_cli("check-config", "--config", str(path),
                       env={"RELAY_ADMIN_SECRET": ADMIN_SECRET})
    assert result.returncode == 0, result.stderr
    assert ADMIN_SECRET not in result.stdout
    assert json.loads(result.stdout)["admin"]["secret"] == "********"


def test_check_config_reads_relay_config_from_the_environment(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"server": {"port": 9124}})
    result = relay_cli("check-config", env={"RELAY_CONFIG": str(path)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["server"]["port"] == 9124


BAD_CONFIGS: list[tuple[str, dict[str, dict[str, Any]] | str, tuple[str, ...]]] = [
    ("port-not-a-number", {"server": {"port": "abc"}}, ("server.port", "must be an integer")),
    ("port-out-of-range", {"server": {"port": 70000}}, ("server.port", "between 0 and 65535")),
    ("dev-mode-on-all-interfaces", {"server": {"host": "0.0.0.0"}},
     ("server.host", "loopback", "0.0.0.0")),
    ("unknown-key", {"server": {"prot": 8080}}, ("server.prot", "unknown key")),
    ("unknown-mode", {"auth": {"mode": "none"}}, ("auth.mode", "'none'")),
    ("upstream-without-url", {"access": {"backend": "upstream"}},
     ("access.upstream_url", "required")),
    ("hmac-algorithm", {"auth": {"algorithms": ["HS256"]}}, ("auth.algorithms", "HS256")),
    ("bad-log-level", {"log": {"level": "loud"}}, ("log.level", "loud")),
    ("not-toml", "[server\nport = 1\n", ("not valid TOML",)),
]


@pytest.mark.parametrize("sections, needles", [(s, n) for _, s, n in BAD_CONFIGS],
                         ids=[name for name, _, _ in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_file_key_and_problem(
    tmp_path: Path, sections: dict[str, dict[str, Any]] | str, needles: tuple[str, ...]
) -> None:
    if isinstance(sections, str):
        path = tmp_path / "config.toml"
        path.write_text(sections)
    else:
        path = write_config(tmp_path, sections)
    assert_one_line_config_error(relay_cli("check-config", "--config", str(path)),
                                 str(path), *needles)


def test_serve_refuses_a_bad_config_the_same_way(tmp_path: Path) -> None:
    (tmp_path / "host").mkdir()
    (tmp_path / "port").mkdir()
    host = write_config(tmp_path / "host", {"server": {"host": "0.0.0.0"}})
    port = write_config(tmp_path / "port", {"server": {"port": "abc"}})
    bad_host, bad_port = relay_cli_all(["serve", "--config", str(host)],
                                       ["serve", "--config", str(port)])
    assert_one_line_config_error(bad_host, str(host), "server.host", "loopback")
    assert_one_line_config_error(bad_port, str(port), "server.port")


def test_serve_on_a_taken_port_exits_1_with_one_error_event(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(tmp_path, {"server": {"port": port}, "log": {"level": "info"}})
        result = relay_cli("serve", "--config", str(path))
    assert result.returncode == 1  # not 2: systemd retries this one (the port may free up)
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    errors = [e for e in events if e["level"] == "error"]
    assert [e["event"] for e in errors] == ["relay.listen_failed"]
    assert errors[0]["port"] == port
    assert "Traceback" not in result.stderr


def test_missing_and_undecodable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[server]\n")
    not_found, undecodable = relay_cli_all(["check-config", "--config", str(missing)],
                                           ["check-config", "--config", str(binary)])
    assert_one_line_config_error(not_found, str(missing), "file not found")
    assert_one_line_config_error(undecodable, str(binary), "UTF-8")


@pytest.mark.parametrize("name, value, key", [
    ("RELAY_SERVER_PORT", "notanumber", "server.port"),
    ("RELAY_ACCESS_ALLOW_TTL_S", "soon", "access.allow_ttl_s"),
    ("RELAY_LOG_ACCESS_LOG", "maybe", "log.access_log"),
])
def test_bad_environment_override_names_the_variable(
    tmp_path: Path, name: str, value: str, key: str
) -> None:
    path = write_config(tmp_path)
    line = assert_one_line_config_error(
        relay_cli("check-config", "--config", str(path), env={name: value}), name, key, value)
    assert str(path) not in line  # the file is fine; the variable is what to fix


async def test_token_mints_a_jwt_the_relay_accepts(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    result = relay_cli("token", "--config", str(path), "--sub", "alice", "--org", "acme",
                       "--org", "beta", "--ttl", "120", "--email", "alice@example.test")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout.count("\n") == 1 and token.count(".") == 2
    assert "auth.dev_key_created" in result.stderr  # first run: the log line went to stderr
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "alice"
    assert claims["organizationIds"] == ["acme", "beta"]
    assert claims["email"] == "alice@example.test"
    assert claims["exp"] - claims["iat"] == 120

    relay = await start_relay(load_config(path, env={}))
    try:
        async with aiohttp.ClientSession() as client:
            # Accepted (identity and access pass), refused only because no agent is connected.
            async with client.get(f"{relay.url}/hosts/acme:laptop/",
                                  headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 503
                assert (await resp.json())["error"]["code"] == "host_offline"
            # The same request with a token the relay did not issue is a 401.
            forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
            async with client.get(f"{relay.url}/hosts/acme:laptop/",
                                  headers={"Authorization": f"Bearer {forged}"}) as resp:
                assert resp.status == 401
    finally:
        await relay.stop()


def test_token_needs_the_dev_issuer(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    path = write_config(tmp_path, {"auth": {"mode": "public_key", "public_key_file": "key.pem"}})
    result = relay_cli("token", "--config", str(path), "--sub", "alice", "--org", "acme")
    assert_one_line_config_error(result, str(path), "auth.mode", "dev")
