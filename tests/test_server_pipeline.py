"""relay/server reads one way: no agent inside it, no import dodged inside a function, the
forwarding rule written once, and the relay's tasks found through their groups."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from relay.config import AccessBackend, AuthMode, DirectoryBackend, LogFormat, load_config
from relay.errors import ConfigError
from relay.server.forwarded import client_view, host_request_head, is_secure, throttle_address
from tests.harness import write_config
from tests.test_import_graph import PACKAGE, modules, offending


def test_the_relay_never_imports_the_agent() -> None:
    # The synthetic probe runs a real agent, so it lives in relay/probe.py, beside both.
    assert offending("server", ("relay.agent",)) == {}


def test_no_server_module_imports_inside_a_function() -> None:
    """A function-level import is how a cycle gets hidden; the graph must not need one."""
    hidden: list[str] = []
    for path in modules("server"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import | ast.ImportFrom):
                        hidden.append(f"{path.relative_to(PACKAGE.parent)}:{inner.lineno}")
    assert hidden == []


def _forwarded_header_readers() -> list[str]:
    readers = []
    for path in (PACKAGE / "server").rglob("*.py"):
        if '"X-Forwarded-' in path.read_text():
            readers.append(path.name)
    return sorted(readers)


def test_the_forwarding_rule_is_written_once() -> None:
    # forward.py sets X-Forwarded-Proto/-Host for the owner from the one view; it reads none.
    assert set(_forwarded_header_readers()) <= {"forwarded.py", "forward.py"}
    assert "X-Forwarded-For" not in (PACKAGE / "server" / "forward.py").read_text()


def _request(headers: dict[str, str]) -> web.Request:
    return make_mocked_request("GET", "/hosts/acme:laptop/", headers={"Host": "relay.test",
                                                                      **headers})


def test_a_trusted_proxy_names_the_client_and_an_untrusted_one_does_not() -> None:
    claimed = {"X-Forwarded-For": "203.0.113.7, 10.0.0.2", "X-Forwarded-Proto": "https",
               "X-Forwarded-Host": "public.example"}
    trusted = client_view(_request(claimed), trust_forwarded=True)
    assert (trusted.prior, trusted.scheme, trusted.host) == (
        "203.0.113.7, 10.0.0.2", "https", "public.example")
    assert trusted.origin == "https://public.example"
    assert throttle_address(_request(claimed), trust_forwarded=True) == "10.0.0.2"
    assert is_secure(_request(claimed), trust_forwarded=True)

    untrusted = client_view(_request(claimed), trust_forwarded=False)
    assert (untrusted.prior, untrusted.scheme, untrusted.host) == ("", "http", "relay.test")
    assert not is_secure(_request(claimed), trust_forwarded=False)


def test_a_websocket_reports_ws_schemes_whoever_named_the_scheme() -> None:
    # Before: a trusted proxy's "https" reached the host as is on a WebSocket, while the same
    # socket forwarded through a peer relay arrived as "wss".
    behind_proxy = client_view(_request({"X-Forwarded-Proto": "https"}), trust_forwarded=True,
                               websocket=True)
    from_peer = client_view(_request({"X-Forwarded-Proto": "wss"}), trust_forwarded=False,
                            client_chain="203.0.113.7", websocket=True)
    assert behind_proxy.scheme == from_peer.scheme == "wss"
    assert from_peer.chain == "203.0.113.7"


def test_the_host_sees_the_chain_extended_and_the_relay_prefix() -> None:
    request = _request({"X-Forwarded-For": "203.0.113.7", "X-Real-IP": "203.0.113.7"})
    head = host_request_head(request, "/", "", trust_forwarded=False, host_id="acme:laptop")
    headers = dict(head.headers)
    assert "X-Real-IP" not in headers  # a client's own claim, without a trusted proxy
    assert headers["X-Forwarded-Prefix"] == "/hosts/acme:laptop"
    assert "203.0.113.7" not in headers.get("X-Forwarded-For", "")


def test_config_modes_are_enums_with_the_same_values_on_the_wire(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path), env={"RELAY_DIRECTORY_BACKEND": "local"})
    assert config.auth.mode is AuthMode.DEV and config.auth.mode == "dev"
    assert config.access.backend is AccessBackend.ORG
    assert config.directory.backend is DirectoryBackend.LOCAL
    assert config.log.format is LogFormat.JSON
    with pytest.raises(ConfigError, match="must be local or redis, got 'etcd'"):
        load_config(write_config(tmp_path), env={"RELAY_DIRECTORY_BACKEND": "etcd"})
