"""Host routing keys: parse and validate ``<organizationId>:<machineId>`` host ids.

The host id arrives from the outside (a URL path segment, a query parameter) and is used as a
cache key, a directory key (Redis), a log field and a metric-free label. So it is validated
strictly, once, at the edge, and everything behind the edge holds a :class:`HostId`.

The rule (anything else is ``400 invalid_host``):

* the whole id is at most :data:`MAX_HOST_ID_LENGTH` (256) characters;
* exactly one ``:`` separates two non-empty parts, ``org`` and ``machine``;
* each part is ASCII only, starts with a letter, a digit or ``_``, and otherwise contains only
  letters, digits and ``-`` ``_`` ``.`` ``@``;
* no part contains ``..``.

Consequences worth stating: no ``/`` or ``\\`` (no path games), no ``%`` (no percent-encoded
separators such as ``%3A`` or ``%2F`` that a later decode could turn into structure), no
whitespace or control characters (no header or log injection), no non-ASCII (no look-alike
Unicode or full-width colons), no second ``:``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from relay.errors import InvalidHost

__all__ = [
    "MAX_HOST_ID_LENGTH",
    "HostId",
    "HostPatterns",
    "is_valid_host_part",
    "parse_host_id",
    "parse_host_pattern",
]

MAX_HOST_ID_LENGTH = 256

# Explicit ASCII classes: Python's \w and \d would accept Unicode letters and digits.
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*")


def is_valid_host_part(part: str) -> bool:
    """True when ``part`` may be an organisation or machine id (see the module rule)."""
    return (
        isinstance(part, str)
        and part.isascii()
        and _PART.fullmatch(part) is not None
        and ".." not in part
    )


@dataclass(frozen=True, slots=True)
class HostId:
    """A validated host id. Constructing one directly validates it too."""

    org: str
    machine: str

    def __post_init__(self) -> None:
        if not (is_valid_host_part(self.org) and is_valid_host_part(self.machine)):
            raise InvalidHost()
        if len(self.org) + 1 + len(self.machine) > MAX_HOST_ID_LENGTH:
            raise InvalidHost()

    def __str__(self) -> str:
        return f"{self.org}:{self.machine}"


# Valid ids already parsed (HostId is frozen, so one value serves every request for its host):
# a proxied request parses its host id more than once, and validation is two regex matches.
# Only valid ids enter, so a client's garbage cannot grow it; cleared when full.
_PARSED: dict[str, HostId] = {}
_PARSED_MAX = 4096


def parse_host_id(raw: str) -> HostId:
    """Parse ``org:machine`` or raise :class:`InvalidHost`.

    The error message never echoes ``raw``: it is attacker-controlled and may be huge.
    """
    # Length first, so a 10k-character id costs nothing more than a len().
    if not isinstance(raw, str) or len(raw) > MAX_HOST_ID_LENGTH:
        raise InvalidHost()
    host = _PARSED.get(raw)
    if host is not None and type(raw) is str:  # a str subclass could compare equal yet differ
        return host
    org, sep, machine = raw.partition(":")
    if not sep:
        raise InvalidHost()
    # A second ':' lands in `machine` and fails the part charset there.
    host = HostId(org, machine)
    if type(raw) is str:
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[raw] = host
    return host


def parse_host_pattern(raw: object) -> HostId | str | None:
    """A host id (:class:`HostId`), an ``<org>:*`` wildcard (the org, a ``str``) or None.

    Used for grants and for the agent claim; it never raises, whatever ``raw`` is.
    """
    if not isinstance(raw, str) or len(raw) > MAX_HOST_ID_LENGTH:
        return None
    org, sep, machine = raw.partition(":")
    if sep and machine == "*":
        return org if is_valid_host_part(org) else None
    try:
        return parse_host_id(raw)
    except InvalidHost:
        return None


@dataclass(frozen=True, slots=True)
class HostPatterns:
    """Exact host ids and whole organisations (``<org>:*``): what a grant or claim covers."""

    exact: frozenset[str] = frozenset()
    orgs: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, entries: Iterable[object], limit: int | None = None) -> HostPatterns:
        """The valid patterns among ``entries`` (at most ``limit`` looked at); others ignored."""
        exact: set[str] = set()
        orgs: set[str] = set()
        for index, entry in enumerate(entries):
            if limit is not None and index >= limit:
                break
            pattern = parse_host_pattern(entry)
            if isinstance(pattern, HostId):
                exact.add(str(pattern))
            elif pattern is not None:
                orgs.add(pattern)
        return cls(frozenset(exact), frozenset(orgs))

    def covers(self, host: HostId) -> bool:
        return host.org in self.orgs or str(host) in self.exact

    def __or__(self, other: HostPatterns) -> HostPatterns:
        return HostPatterns(self.exact | other.exact, self.orgs | other.orgs)

    def __bool__(self) -> bool:
        return bool(self.exact or self.orgs)
