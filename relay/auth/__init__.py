"""Identity and access: bearer tokens to identities, host ids, and access decisions.

Pure-ish: keys, HTTP sessions, metrics and clocks are passed in; no aiohttp server code here.
Imports flow hostid/ttlcache -> keys -> devissuer -> tokens -> access.
"""

from relay.auth.access import (
    AccessPolicy,
    OrgMembershipBackend,
    StaticGrantsBackend,
    UpstreamAccessBackend,
    build_access_policy,
)
from relay.auth.devissuer import (
    DEV_AUDIENCE,
    DEV_ISSUER,
    DevKeySource,
    load_or_create_dev_key,
    mint_token,
)
from relay.auth.hostid import HostId, parse_host_id
from relay.auth.keys import JwksKeySource, KeySource, StaticKeySource
from relay.auth.tokens import Identity, TokenVerifier, build_verifier, extract_token

__all__ = [
    "DEV_AUDIENCE",
    "DEV_ISSUER",
    "AccessPolicy",
    "DevKeySource",
    "HostId",
    "Identity",
    "JwksKeySource",
    "KeySource",
    "OrgMembershipBackend",
    "StaticGrantsBackend",
    "StaticKeySource",
    "TokenVerifier",
    "UpstreamAccessBackend",
    "build_access_policy",
    "build_verifier",
    "extract_token",
    "load_or_create_dev_key",
    "mint_token",
    "parse_host_id",
]
