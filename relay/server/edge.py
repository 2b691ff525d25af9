"""The edge of every proxied request and tunnel: errors, route parsing, identity and access.

The order is SPEC's: token, host id, org short-circuit, cached decision, upstream check.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from aiohttp import web

from relay.auth.access import AccessPolicy, AccessRole
from relay.auth.hostid import HostId, parse_host_id
from relay.auth.tokens import Identity, TokenVerifier, extract_token
from relay.errors import (
    BadRequest,
    HeadersTooLarge,
    InvalidHost,
    RelayError,
    Unauthorized,
)
from relay.server.probe_guard import check_probe_host
from relay.server.state import RelayState
from relay.server.timing import lap

log = structlog.get_logger("relay.edge")
HOSTS_PREFIX = "/hosts/"


def error_response(error: RelayError) -> web.Response:
    response = web.json_response(error.to_json(), status=error.status)
    if error.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="relay"'
    if error.retry_after_s is not None:
        response.headers["Retry-After"] = str(error.retry_after_s)
    return response


@dataclass(frozen=True, slots=True)
class HostRoute:
    host_raw: str
    path: str  # raw (still percent-encoded), always starting with "/"
    query: str  # raw, without the client's token parameter


def parse_host_route(request: web.Request) -> HostRoute:
    """Split ``/hosts/<hostId>/<path>`` on the raw path, so encoded separators stay visible."""
    raw = request.raw_path
    path_part, _, query = raw.partition("?")
    rest = path_part[len(HOSTS_PREFIX):]
    host_raw, slash, tail = rest.partition("/")
    return HostRoute(host_raw=host_raw, path="/" + tail if slash else "/", query=query)


def check_header_size(request: web.Request, limit: int) -> None:
    total = sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
    if total > limit:
        raise HeadersTooLarge()


@dataclass(frozen=True, slots=True)
class Authorized:
    identity: Identity
    host: HostId
    token: str
    source: str


async def authorize(
    state: RelayState,
    request: web.Request,
    host_raw: str,
    *,
    allow_query_token: bool,
    role: AccessRole,
) -> Authorized:
    """Token, host id, org short-circuit, access decision for ``role`` — or the RelayError
    that refuses."""
    verifier: TokenVerifier | None = state.verifier
    access: AccessPolicy | None = state.access
    assert verifier is not None and access is not None
    token = extract_token(request.headers, request.query, allow_query=allow_query_token)
    if not token:
        raise Unauthorized("missing bearer token")
    identity = await verifier.verify(token)
    lap(request, "auth")
    if not host_raw:
        raise InvalidHost("missing host id")
    host = parse_host_id(host_raw)
    check_probe_host(state.config, identity, host)
    source = await access.check(identity, host, token, role=role)
    lap(request, "access")
    return Authorized(identity, host, token, source)


def require_param(request: web.Request, name: str) -> str:
    value = request.query.get(name)
    if not value:
        raise BadRequest(f"missing query parameter {name!r}")
    return value
