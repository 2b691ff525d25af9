"""The edge of every proxied request and tunnel: errors, route parsing, identity and access.

The order is fixed: token, host id, org short-circuit, cached decision, upstream check.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from aiohttp import web

from relay.auth.access import AccessPolicy, AccessRole
from relay.auth.hostid import HostId, parse_host_id
from relay.auth.session import clear_cookie_header, cookie_usable, session_values
from relay.auth.tokens import Identity, TokenVerifier, extract_token
from relay.errors import (
    BadRequest,
    HeadersTooLarge,
    InvalidHost,
    PayloadTooLarge,
    RelayError,
    SessionRejected,
    Unauthorized,
)
from relay.server.forwarded import is_secure
from relay.server.probe_guard import check_probe_host
from relay.server.state import RelayState
from relay.server.timing import lap

log = structlog.get_logger("relay.edge")
HOSTS_PREFIX = "/hosts/"
CONTINUE_SENT: web.RequestKey[bool] = web.RequestKey("relay_continue_sent", bool)  # 100 went out


def error_response(error: RelayError) -> web.Response:
    response = web.json_response(error.to_json(), status=error.status)
    if error.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="relay"'
    if error.retry_after_s is not None:
        response.headers["Retry-After"] = str(error.retry_after_s)
    if isinstance(error, SessionRejected):
        response.headers["Set-Cookie"] = error.clear_cookie
    return response


@dataclass(frozen=True, slots=True)
class HostRoute:
    host_raw: str
    path: str  # raw (still percent-encoded), always starting with "/"
    query: str  # raw, as sent (the token parameter is removed later, if it was the credential)
    bare: bool = False  # "/hosts/<id>" with nothing after the host id, not even "/"


def parse_host_route(request: web.Request) -> HostRoute:
    """Split ``/hosts/<hostId>/<path>`` on the raw path, so encoded separators stay visible."""
    raw = request.raw_path
    path_part, _, query = raw.partition("?")
    rest = path_part[len(HOSTS_PREFIX):]
    host_raw, slash, tail = rest.partition("/")
    return HostRoute(host_raw=host_raw, path="/" + tail if slash else "/", query=query,
                     bare=not slash)


def check_header_size(request: web.Request, limit: int) -> None:
    total = sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
    if total > limit:
        raise HeadersTooLarge()


def check_declared_body(request: web.Request, limit: int) -> None:
    """413 for a declared Content-Length over the limit (a chunked body is counted as it comes)."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")


async def send_continue(request: web.Request) -> None:
    """Answer ``Expect: 100-continue`` now that the exchange is accepted and the body is wanted.

    The /hosts expect handler deliberately sent nothing, so a refused request (401, 403, 413,
    503 ...) never invites the client to upload first.
    """
    if (request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue"
            and not request.get(CONTINUE_SENT)):
        request[CONTINUE_SENT] = True
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp does: the answer itself has not started


def awaits_continue(request: web.Request) -> bool:
    """The client announced a body and waits for a 100 Continue it was not sent (yet)."""
    return (request.headers.get("Expect", "").lower() == "100-continue"
            and not request.get(CONTINUE_SENT) and request.body_exists)


@dataclass(frozen=True, slots=True)
class Authorized:
    identity: Identity
    host: HostId
    token: str
    source: str
    credential: str = "header"  # where the token came from: "header" | "query" | "cookie"


def _credential(state: RelayState, request: web.Request, host_raw: str, *,
                allow_query_token: bool, allow_session: bool) -> tuple[str | None, str]:
    """The request's token and where it came from: Authorization > ?token= > session cookie.

    A credential that is present but bad is never passed over for a weaker one: it fails.
    """
    token = extract_token(request.headers, {}, allow_query=False)
    if token:
        return token, "header"
    if allow_query_token:
        token = extract_token({}, request.query, allow_query=True)
        if token:
            return token, "query"
    sessions = state.sessions
    if not allow_session or sessions is None or "Cookie" not in request.headers:
        return None, ""
    values = session_values(request.headers.getall("Cookie"))
    if not values or not cookie_usable(request.method, request.headers):
        return None, ""
    host = parse_host_id(host_raw)
    for value in values:
        token = sessions.open(str(host), value)
        if token:
            return token, "cookie"
    raise SessionRejected(clear_cookie_header(
        str(host), secure=is_secure(request, state.config.server.trust_forwarded)))


async def authorize(
    state: RelayState,
    request: web.Request,
    host_raw: str,
    *,
    allow_query_token: bool,
    role: AccessRole,
    allow_session: bool = False,
) -> Authorized:
    """Token, host id, org short-circuit, access decision for ``role`` — or the RelayError
    that refuses."""
    verifier: TokenVerifier | None = state.verifier
    access: AccessPolicy | None = state.access
    assert verifier is not None and access is not None
    token, credential = _credential(state, request, host_raw, allow_query_token=allow_query_token,
                                    allow_session=allow_session)
    if not token:
        raise Unauthorized("missing bearer token")
    try:
        identity = await verifier.verify(token)
    except Unauthorized:
        if credential != "cookie":
            raise
        # The token inside the cookie expired or its key was rotated: end the session.
        secure = is_secure(request, state.config.server.trust_forwarded)
        raise SessionRejected(clear_cookie_header(host_raw, secure=secure)) from None
    lap(request, "auth")
    if not host_raw:
        raise InvalidHost("missing host id")
    host = parse_host_id(host_raw)
    check_probe_host(state.config, identity, host)
    source = await access.check(identity, host, token, role=role)
    lap(request, "access")
    return Authorized(identity, host, token, source, credential)


def require_param(request: web.Request, name: str) -> str:
    value = request.query.get(name)
    if not value:
        raise BadRequest(f"missing query parameter {name!r}")
    return value
