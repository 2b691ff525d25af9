"""``/hosts/<hostId>/...``: identity → access → where the tunnel is → the proxy that serves it.

One sequence for HTTP and WebSocket alike (:func:`_route`); then a local tunnel is served by
relay.server.http_proxy / ws_proxy, a tunnel on another relay by relay.server.forward, and no
tunnel anywhere is 503 ``host_offline`` (4404 on a socket).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import structlog
from aiohttp import web

from relay.auth.access import AccessRole
from relay.auth.hostid import parse_host_id
from relay.auth.session import is_navigation, set_cookie_header
from relay.errors import (
    Draining,
    ErrorCode,
    HostOffline,
    Overloaded,
    PayloadTooLarge,
    PeerRejected,
    RelayError,
)
from relay.protocol.headers import strip_token_param
from relay.server.edge import (
    HOSTS_PREFIX,
    Authorized,
    HostRoute,
    authorize,
    check_declared_body,
    check_header_size,
    error_response,
    parse_host_route,
)
from relay.server.forward_link import forward_channel, forward_request, lookup_owner
from relay.server.forwarded import is_secure
from relay.server.http_proxy import proxy_http
from relay.server.httpedge import close_without_reading
from relay.server.middleware import CORS, PREFLIGHT
from relay.server.peers import H_SIGNATURE
from relay.server.registry import Tunnel
from relay.server.state import STATE, RelayState
from relay.server.ws_proxy import proxy_ws, refuse_ws

log = structlog.get_logger("relay.server")


@dataclass(frozen=True, slots=True)
class Routed:
    host_id: str
    subject: str
    query: str  # what the host gets: ``token`` removed when it was the credential
    tunnel: Tunnel | None = None  # here, or
    owner_url: str = ""  # on the relay at this URL
    client_chain: str | None = None  # set on requests a peer relay forwarded
    # When the caller's token expires (wall clock). A peer relay's forwarded request carries no
    # expiry: the entry relay holding the client's socket enforces it.
    expires_at: float = math.inf


def is_websocket_upgrade(request: web.Request) -> bool:
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in request.headers.get("Connection", "").lower()
    )


async def handle_hosts(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    route = parse_host_route(request)
    # Looked up for OPTIONS only: Application.get of a missing key raises and catches KeyError.
    cors = request.app.get(CORS) if request.method == "OPTIONS" else None
    if cors is not None:
        # A preflight carries no credentials: the relay answers it, or nobody could.
        grant = cors.preflight(request.headers.get("Origin"),
                               request.headers.get("Access-Control-Request-Method"),
                               request.headers.get("Access-Control-Request-Headers"))
        if grant is not None:
            request[PREFLIGHT] = True
            return web.Response(status=204, headers=grant)
    if is_websocket_upgrade(request):
        return await _websocket(state, request, route)
    if route.bare and request.method in {"GET", "HEAD"}:
        return _bare_host_redirect(route)
    return await _http(state, request, route)


async def _route(state: RelayState, request: web.Request, route: HostRoute, *,
                 websocket: bool) -> Routed | web.Response:
    """Where the request goes, or the RelayError that refuses it; a response of its own for a
    ``?token=`` navigation (303 to the URL without it, with a session cookie)."""
    if not websocket:
        # Like nginx's client_max_body_size: a declared body over the limit is refused before
        # anything else, so an unauthenticated client cannot make the relay read it either.
        check_declared_body(request, state.config.server.max_body_bytes)
    if state.draining:
        raise Draining()
    check_header_size(request, state.config.server.max_header_bytes)
    if request.headers.get(H_SIGNATURE) is not None:
        return _peer_routed(state, request, route)
    # Browsers cannot put a header on a WebSocket, an EventSource or a download link:
    # ?token= on those and on reads.
    auth = await authorize(state, request, route.host_raw,
                           allow_query_token=websocket or request.method in {"GET", "HEAD"},
                           role=AccessRole.CLIENT, allow_session=True)
    if (not websocket and auth.credential == "query"
            and is_navigation(request.method, request.headers)):
        redirect = _session_redirect(state, request, route, auth)
        if redirect is not None:
            return redirect
    return await _locate(state, auth, _forward_query(route, auth))


def _peer_routed(state: RelayState, request: web.Request, route: HostRoute) -> Routed:
    """A request a relay forwarded after checking the client itself.

    The signature must be ours, fresh and single-use, and such a request is never forwarded
    again (the loop guard). Its query was already cleaned by the entry relay.
    """
    signer = state.signer
    if signer is None:
        raise PeerRejected("relay-to-relay forwarding is not enabled on this relay")
    claims = signer.verify(request.method, request.raw_path, route.host_raw, request.headers)
    host = parse_host_id(route.host_raw)
    tunnel = state.registry.get(str(host))
    if tunnel is None:
        raise HostOffline("the host's tunnel is not on the relay the directory named; retry")
    return Routed(str(host), claims.subject, route.query, tunnel=tunnel,
                  client_chain=claims.client_ip)


async def _locate(state: RelayState, auth: Authorized, query: str) -> Routed:
    """Where the host's tunnel is: here, on another relay, or nowhere (503)."""
    host_id = str(auth.host)
    identity = auth.identity
    tunnel = state.registry.get(host_id)
    if tunnel is not None:
        return Routed(host_id, identity.sub, query, tunnel=tunnel,
                      expires_at=identity.expires_at)
    if state.signer is not None and state.directory is not None:
        owner = await lookup_owner(state, host_id)
        if owner is not None and owner.instance_id != state.directory.instance_id:
            return Routed(host_id, identity.sub, query, owner_url=owner.url,
                          expires_at=identity.expires_at)
    raise HostOffline()


def _forward_query(route: HostRoute, auth: Authorized) -> str:
    # ``token`` is removed only when it was the credential; next to a bearer header it is the
    # host's own parameter.
    if auth.credential == "query":
        return strip_token_param(route.query)
    return route.query


async def _websocket(state: RelayState, request: web.Request,
                     route: HostRoute) -> web.StreamResponse:
    try:
        routed = await _route(state, request, route, websocket=True)
    except RelayError as error:
        log.info("ws.refused", code=str(error.code), host_id=route.host_raw[:300])
        return await refuse_ws(state, request, error)
    assert isinstance(routed, Routed)  # only an HTTP navigation is answered by a redirect
    if routed.tunnel is None:
        assert state.signer is not None and routed.owner_url
        return await forward_channel(state, request, routed.owner_url, routed.host_id,
                                     route.path, routed.query, routed.subject, routed.expires_at)
    gate = routed.tunnel.gate
    try:
        ticket = gate.open_channel(routed.subject)
    except Overloaded as error:
        log.info("ws.refused", code=str(error.code), host_id=routed.host_id,
                 reason="subject_share")
        return await refuse_ws(state, request, error)
    try:
        return await proxy_ws(state, request, routed.tunnel.session, route.path, routed.query,
                              routed.host_id, routed.client_chain,
                              subject=routed.subject, expires_at=routed.expires_at)
    finally:
        gate.release(ticket)


async def _http(state: RelayState, request: web.Request, route: HostRoute) -> web.StreamResponse:
    routed = await _route(state, request, route, websocket=False)
    if not isinstance(routed, Routed):
        return routed
    state.request_started()
    try:
        if routed.tunnel is None:
            assert state.signer is not None and routed.owner_url
            return await forward_request(state, request, routed.owner_url, routed.host_id,
                                         route.path, routed.query, routed.subject,
                                         routed.expires_at)
        # Past the tunnel's stream limit (or the subject's share of it) the exchange waits here,
        # bounded, rather than being shed at once.
        async with routed.tunnel.gate.http_slot(routed.subject):
            return await proxy_http(state, request, routed.tunnel.session, route.path,
                                    routed.query, routed.host_id, routed.client_chain)
    finally:
        state.request_finished()


def _bare_host_redirect(route: HostRoute) -> web.Response:
    """``/hosts/<id>`` → 308 ``/hosts/<id>/``: relative links on the host's root page resolve
    under the host only with the slash. No credential needed: it reveals nothing."""
    host = parse_host_id(route.host_raw)
    location = f"{HOSTS_PREFIX}{host}/" + (f"?{route.query}" if route.query else "")
    return web.Response(status=308, headers={"Location": location})


def _session_redirect(state: RelayState, request: web.Request, route: HostRoute,
                      auth: Authorized) -> web.Response | None:
    """A navigation that came with ``?token=``: 303 to the URL without it, with a session.

    None (proxy as usual) when no cookie can be made, e.g. a token too large for a browser.
    """
    sessions = state.sessions
    if sessions is None:
        return None
    host_id = str(auth.host)
    value = sessions.seal(host_id, auth.token, auth.identity.expires_at)
    max_age = sessions.max_age(auth.identity.expires_at)
    if value is None or max_age <= 0:
        log.info("http.session_skipped", host_id=host_id, reason="token cannot be a cookie")
        return None
    query = strip_token_param(route.query)
    location = f"{HOSTS_PREFIX}{host_id}{route.path}" + (f"?{query}" if query else "")
    secure = is_secure(request, state.config.server.trust_forwarded)
    log.info("http.session_started", host_id=host_id, max_age_s=max_age)
    return web.Response(status=303, headers={
        "Location": location,
        "Set-Cookie": set_cookie_header(host_id, value, max_age, secure=secure),
        "Cache-Control": "no-store",
    })


async def handle_hosts_expect(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` on /hosts: refuse an over-limit body before the client sends it.

    aiohttp's default answers ``100 Continue`` before any check; here the 100 is deferred
    until the exchange is authorised and about to stream the body (see ``send_continue``).
    """
    expect = request.headers.get("Expect", "").lower()
    if expect != "100-continue":
        error = RelayError("unsupported Expect value", code=ErrorCode.BAD_REQUEST)
        error.status = 417
        return error_response(error)
    try:
        check_declared_body(request, request.app[STATE].config.server.max_body_bytes)
    except PayloadTooLarge as too_large:
        log.info("http.refused", method=request.method, status=too_large.status,
                 code=str(too_large.code), expect="100-continue")
        response = error_response(too_large)
        close_without_reading(request, response)
        return response
    return None
