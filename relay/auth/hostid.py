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
from dataclasses import dataclass

from relay.errors import InvalidHost

__all__ = ["MAX_HOST_ID_LENGTH", "HostId", "is_valid_host_part", "parse_host_id"]

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


def parse_host_id(raw: str) -> HostId:
    """Parse ``org:machine`` or raise :class:`InvalidHost`.

    The error message never echoes ``raw``: it is attacker-controlled and may be huge.
    """
    # Length first, so a 10k-character id costs nothing more than a len().
    if not isinstance(raw, str) or len(raw) > MAX_HOST_ID_LENGTH:
        raise InvalidHost()
    org, sep, machine = raw.partition(":")
    if not sep:
        raise InvalidHost()
    # A second ':' lands in `machine` and fails the part charset there.
    return HostId(org, machine)
