"""docs/reference.md cannot drift from the code: its tables are checked against the close-code
and error-code enums, the error classes' statuses, and the config dataclasses."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from typing import Any

from relay.config import SECTIONS, env_name
from relay.errors import CloseCode, ErrorCode, RelayError
from relay.protocol import defaults
from relay.server.lifecycle import RELOADABLE
from tests.docs import REPO, table_under, unquote

REFERENCE = (REPO / "docs" / "reference.md").read_text()
PROTOCOL = (REPO / "docs" / "protocol.md").read_text()


def subclasses(cls: type[RelayError]) -> list[type[RelayError]]:
    out: list[type[RelayError]] = []
    for sub in cls.__subclasses__():
        out += [sub, *subclasses(sub)]
    return out


def test_close_code_table_lists_every_close_code_and_only_those() -> None:
    rows = table_under(REFERENCE, "WebSocket close codes")
    documented = [int(unquote(row["code"])) for row in rows]
    assert len(documented) == len(set(documented)), "a close code is listed twice"
    assert set(documented) == {int(code) for code in CloseCode}
    for row in rows:
        assert row["meaning"] and row["what the peer should do"], row


def test_error_table_lists_every_error_code_with_its_status() -> None:
    rows = table_under(REFERENCE, "HTTP error codes")
    documented: dict[str, set[int]] = {}
    for row in rows:
        documented.setdefault(unquote(row["code"]), set()).add(int(row["status"]))
        assert row["when"] and row["what to do"], row
    assert set(documented) == {str(code) for code in ErrorCode}
    classes = [cls for cls in subclasses(RelayError)
               if cls.__name__ not in {"ConfigError", "ProtocolViolation"}]  # not HTTP answers
    assert len(classes) >= 12
    for cls in classes:
        assert cls.status in documented[str(cls.code)], (cls.__name__, cls.status, cls.code)


def _toml_value(cell: str) -> Any:
    return tomllib.loads(f"value = {unquote(cell)}")["value"]


def test_config_table_lists_every_key_with_its_default_and_variable() -> None:
    rows = table_under(REFERENCE, "Configuration")
    documented = {(unquote(row["section"]), unquote(row["key"])): row for row in rows}
    assert len(documented) == len(rows), "a key is listed twice"
    expected = {(section, f.name) for section, cls in SECTIONS.items()
                for f in dataclasses.fields(cls)}
    assert set(documented) == expected, (
        f"missing: {sorted(expected - set(documented))}, "
        f"not keys: {sorted(set(documented) - expected)}")
    for section, cls in SECTIONS.items():
        defaults = cls()
        for f in dataclasses.fields(cls):
            row = documented[(section, f.name)]
            default = getattr(defaults, f.name)
            wanted = list(default) if isinstance(default, tuple) else default
            assert _toml_value(row["default"]) == wanted, (section, f.name, row["default"])
            assert unquote(row["environment"]) == env_name(section, f.name)
            reloadable = f"{section}.{f.name}" in RELOADABLE
            assert (row["reload"] == "reload") == reloadable, (section, f.name)
            assert row["meaning"], (section, f.name)


def test_readme_links_the_reference() -> None:
    assert "(docs/reference.md)" in (REPO / "README.md").read_text()


def test_the_protocol_names_only_codes_the_relay_has() -> None:
    """docs/protocol.md names close codes (in bold, and in its table of CLOSE codes on HTTP
    streams) and error codes (after an HTTP status): each must exist in the code, so the page
    never tells an agent author about a code nothing sends."""
    bold = {int(code) for code in re.findall(r"\*\*(\d{4})\*\*", PROTOCOL)}
    http_stream = {int(unquote(row["code"]))
                   for row in table_under(PROTOCOL, "4.5 Ending a stream early: CLOSE")}
    known = {int(code) for code in CloseCode}
    assert len(bold) >= 10 and len(http_stream) >= 6
    assert bold - known == set() and http_stream - known == set()
    named = set(re.findall(r"\b[1-5]\d\d\*{0,2} `([a-z_]+)`", PROTOCOL))
    assert {"tunnel_closed", "host_timeout", "draining"} <= named
    assert named - {str(code) for code in ErrorCode} == set()


def test_the_protocols_hello_defaults_are_the_codes() -> None:
    rows = {unquote(row["field"]): row["default"]
            for row in table_under(PROTOCOL, "3.1 HELLO (relay → agent)")}
    expected = {"version": defaults.VERSION, "window": defaults.WINDOW,
                "maxFrame": defaults.MAX_FRAME, "maxStreams": defaults.MAX_STREAMS,
                "pingIntervalS": defaults.PING_INTERVAL_S,
                "keepaliveMisses": defaults.KEEPALIVE_MISSES,
                "maxWsMessage": defaults.MAX_WS_MESSAGE}
    for field, value in expected.items():
        assert float(rows[field]) == value, field
    for field, value in {"openTimeoutS": defaults.OPEN_TIMEOUT_S,
                         "requestTimeoutS": defaults.REQUEST_TIMEOUT_S}.items():
        assert rows[field] == f"none (the reference relay's default is {value:g})", field
