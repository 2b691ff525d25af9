"""The import graph flows one way: protocol is pure, the tunnel knows no side, the relay
(server) and the agent never import each other, and only ``relay.__main__`` imports the cli.
Checked on the source of every module under relay/ with ``ast`` (imports inside functions and
relative imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "relay"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    return imports_in(path.read_text(), module_name(path), is_package=path.name == "__init__.py")


def imports_in(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module ``module``'s source imports, absolute; ``from a import b`` also counts as
    ``a.b`` (b may be a module: ``from relay import cli``)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def every_module() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def modules(subpackage: str) -> list[Path]:
    return sorted((PACKAGE / subpackage).rglob("*.py"))


def matches(name: str, forbidden: tuple[str, ...]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in forbidden)


def offending(where: str | list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """Imports of ``forbidden`` modules by the modules at ``where`` (paths, or a subpackage's
    name), keyed by importer."""
    found: dict[str, list[str]] = {}
    for path in modules(where) if isinstance(where, str) else where:
        bad = sorted(name for name in imports_of(path) if matches(name, forbidden))
        if bad:
            found[module_name(path)] = bad
    return found


def test_the_protocol_is_pure() -> None:
    assert offending(modules("protocol"), (
        "asyncio", "aiohttp", "socket", "relay.tunnel", "relay.server", "relay.agent",
        "relay.directory", "relay.cli")) == {}


def test_the_tunnel_layer_knows_neither_side() -> None:
    assert offending(modules("tunnel"), ("relay.server", "relay.agent", "relay.cli")) == {}


def test_the_relay_never_imports_the_agent() -> None:
    assert offending(modules("server"), ("relay.agent",)) == {}


def test_the_agent_never_imports_the_relay() -> None:
    assert offending(modules("agent"), ("relay.server", "relay.directory", "relay.cli")) == {}


def test_nothing_but_main_imports_the_cli() -> None:
    others = [p for p in every_module() if module_name(p) not in {"relay.__main__", "relay.cli"}]
    assert offending(others, ("relay.cli",)) == {}
    assert "relay.cli" in imports_of(PACKAGE / "__main__.py")


def test_the_checks_see_imports() -> None:
    """A check that finds nothing because it reads nothing would pass forever."""
    assert "relay.protocol.frames" in imports_of(PACKAGE / "tunnel" / "session.py")
    assert len(modules("protocol")) >= 5 and len(every_module()) >= 40
    # The forms an import can take, relative and inside a function included.
    source = ("from ..agent import client\nfrom . import app\n"
              "def f() -> None:\n    from relay import cli\n")
    seen = imports_in(source, "relay.server.sample")
    assert {"relay.agent", "relay.agent.client", "relay.server.app", "relay.cli"} <= seen
    assert "relay.server.x" in imports_in("from .x import y", "relay.server", is_package=True)
