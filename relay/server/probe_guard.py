"""The synthetic probe's reserved organisation, and the rule that keeps everyone else out of it.

The probe registers ``relay-probe:<instance_id>`` and sends one request through it. No customer
may be in a position to answer (or replace) that tunnel, whatever their identity provider puts
in their tokens' organisations: every host in the ``relay-probe`` organisation is refused, for
tunnels and for requests alike, unless the token's subject is ``probe.subject``.
"""

from __future__ import annotations

import re

from relay.auth.hostid import HostId
from relay.auth.tokens import Identity
from relay.config import Config
from relay.errors import ErrorCode, Forbidden

PROBE_ORG = "relay-probe"
_NOT_A_HOST_CHAR = re.compile(r"[^A-Za-z0-9_.@-]")


def probe_host_id(instance_id: str) -> str:
    """``relay-probe:<instance_id>``, the instance id made a valid machine id."""
    machine = _NOT_A_HOST_CHAR.sub("-", instance_id).replace("..", "-").lstrip(".@-")
    return f"{PROBE_ORG}:{machine[:200] or 'relay'}"


def check_probe_host(config: Config, identity: Identity, host: HostId) -> None:
    if host.org == PROBE_ORG and identity.sub != config.probe.subject:
        raise Forbidden("this organisation is reserved for the relay's own probe",
                        code=ErrorCode.NOT_IN_ORG)
