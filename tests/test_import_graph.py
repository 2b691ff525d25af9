"""The import graph flows one way: protocol is pure, the tunnel knows no side, and the relay
(server) and the agent never import each other. Checked on the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "relay"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(subpackage: str) -> list[Path]:
    return sorted((PACKAGE / subpackage).rglob("*.py"))


def offending(subpackage: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in modules(subpackage):
        bad = sorted(name for name in imports_of(path)
                     if any(name == f or name.startswith(f + ".") for f in forbidden))
        if bad:
            found[str(path.relative_to(PACKAGE.parent))] = bad
    return found


def test_the_protocol_is_pure() -> None:
    assert offending("protocol", ("asyncio", "aiohttp", "socket", "relay.tunnel",
                                  "relay.server", "relay.agent", "relay.directory")) == {}


def test_the_tunnel_layer_knows_neither_side() -> None:
    assert offending("tunnel", ("relay.server", "relay.agent", "relay.cli")) == {}


def test_the_relay_never_imports_the_agent() -> None:
    assert offending("server", ("relay.agent",)) == {}


def test_the_agent_never_imports_the_relay() -> None:
    assert offending("agent", ("relay.server", "relay.directory", "relay.cli")) == {}


@pytest.mark.parametrize("subpackage", ["protocol", "tunnel", "agent", "server", "auth",
                                        "directory"])
def test_nothing_imports_the_cli(subpackage: str) -> None:
    assert offending(subpackage, ("relay.cli",)) == {}


def test_the_checks_see_imports() -> None:
    """A check that finds nothing because it reads nothing would pass forever."""
    assert "relay.protocol.frames" in imports_of(PACKAGE / "tunnel" / "session.py")
    assert len(modules("protocol")) >= 5
