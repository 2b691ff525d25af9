"""Host id parsing: the routing key accepts org:machine and nothing hostile."""

from __future__ import annotations

import pytest

from relay.auth.hostid import MAX_HOST_ID_LENGTH, HostId, parse_host_id
from relay.errors import InvalidHost


@pytest.mark.parametrize(
    ("raw", "org", "machine"),
    [
        ("acme:laptop-1", "acme", "laptop-1"),
        ("org_2abc:MAC.local", "org_2abc", "MAC.local"),
        ("0f8e-11:user@host", "0f8e-11", "user@host"),
        ("a:b", "a", "b"),
    ],
)
def test_valid_host_ids_parse_into_parts(raw: str, org: str, machine: str) -> None:
    host = parse_host_id(raw)
    assert (host.org, host.machine) == (org, machine)
    assert str(host) == raw


def test_longest_allowed_id_parses_and_one_more_is_refused() -> None:
    ok = "o:" + "m" * (MAX_HOST_ID_LENGTH - 2)
    assert str(parse_host_id(ok)) == ok
    with pytest.raises(InvalidHost):
        parse_host_id(ok + "m")


HOSTILE = [
    "",
    ":",
    ":b",
    "a:",
    "ab",
    "a:b:c",
    "../x",
    "a:..",
    "a:b..c",
    "..:b",
    "a:.",
    "a:b/c",
    "a/b:c",
    "a:b\\c",
    "a%3Ab",
    "a:b%2Fc",
    "a%2F..:b",
    "a:b\r\nX: y",
    "a:b\n",
    "a:b\x00",
    "a:b\x7f",
    "a :b",
    "a:b c",
    "a:\tb",
    " a:b",
    "a:b ",
    "a\uff1ab",  # fullwidth colon
    "a:b\u200b",  # zero-width space
    "\u0430cme:b",  # Cyrillic 'a'
    "a:\u0661",  # Arabic-Indic digit one: \d would accept it
    "a:b?x=1",
    "a:b#f",
    "a:b;c",
    "a:-rf",
    "a:.hidden",
    "x" * 10000,
    "a:" + "b" * 10000,
]


@pytest.mark.parametrize("raw", HOSTILE, ids=lambda r: repr(r)[:40])
def test_hostile_host_ids_are_refused(raw: str) -> None:
    with pytest.raises(InvalidHost) as info:
        parse_host_id(raw)
    assert info.value.status == 400
    assert info.value.code == "invalid_host"
    # The message never echoes attacker input.
    assert info.value.message == InvalidHost.default_message


def test_non_string_is_refused() -> None:
    with pytest.raises(InvalidHost):
        parse_host_id(None)  # type: ignore[arg-type]


def test_constructing_hostid_directly_validates() -> None:
    with pytest.raises(InvalidHost):
        HostId("a/b", "c")
    with pytest.raises(InvalidHost):
        HostId("a", "b:c")
    assert HostId("a", "b") == parse_host_id("a:b")


def test_hostid_is_hashable_and_frozen() -> None:
    host = parse_host_id("a:b")
    assert {host: 1}[HostId("a", "b")] == 1
    with pytest.raises(AttributeError):
        host.org = "x"  # type: ignore[misc]


def test_a_parsed_host_id_is_reused_and_garbage_never_cached() -> None:
    from relay.auth import hostid

    assert parse_host_id("acme:cached") is parse_host_id("acme:cached")
    before = len(hostid._PARSED)
    for raw in ("acme", "acme:", "a:b:c", "acme:%2F", "x" * 300):
        with pytest.raises(InvalidHost):
            parse_host_id(raw)
        with pytest.raises(InvalidHost):
            parse_host_id(raw)  # still refused the second time
    assert len(hostid._PARSED) == before
    for index in range(hostid._PARSED_MAX + 5):
        parse_host_id(f"acme:m{index}")
    assert len(hostid._PARSED) <= hostid._PARSED_MAX
