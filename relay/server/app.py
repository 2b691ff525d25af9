"""Assemble the relay's aiohttp application: routes, middlewares and resource lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import structlog
from aiohttp import web

from relay.auth.access import AccessRole, build_access_policy
from relay.auth.hostid import parse_host_id
from relay.auth.session import (
    SessionCookies,
    is_navigation,
    load_session_key,
    set_cookie_header,
)
from relay.auth.tokens import build_verifier
from relay.config import Config
from relay.directory import build_directory
from relay.errors import (
    CloseCode,
    Draining,
    ErrorCode,
    HostOffline,
    LocalProtocolError,
    Overloaded,
    PayloadTooLarge,
    PeerRejected,
    RelayError,
)
from relay.metrics import CONTENT_TYPE_LATEST, Metrics
from relay.protocol.headers import strip_token_param
from relay.protocol.messages import Drain
from relay.server.admin import add_admin_routes
from relay.server.cors import CorsPolicy
from relay.server.edge import (
    HOSTS_PREFIX,
    Authorized,
    HostRoute,
    authorize,
    awaits_continue,
    check_declared_body,
    check_header_size,
    error_response,
    is_secure,
    parse_host_route,
)
from relay.server.forward import forward_http, forward_ws
from relay.server.http_proxy import proxy_http
from relay.server.httpedge import close_without_reading, edge_limits, parser_args
from relay.server.observe import observe_middleware, wanted
from relay.server.peers import H_SIGNATURE, PeerSigner
from relay.server.probe import run_probe
from relay.server.registry import Tunnel
from relay.server.state import STATE, RelayState, session_settings
from relay.server.tls import build_tls
from relay.server.tunnels import handle_tunnel
from relay.server.ws_proxy import proxy_ws, refuse_ws
from relay.tracing import build_tracing

log = structlog.get_logger("relay.server")

CORS: web.AppKey[CorsPolicy] = web.AppKey("relay_cors", CorsPolicy)
# Set on a request whose preflight the relay answered itself (the hook leaves it alone).
_PREFLIGHT: web.RequestKey[bool] = web.RequestKey("relay_cors_preflight", bool)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure answers as JSON: ours with their code, aiohttp's with its status, a bug as
    500 ``internal`` (the traceback goes to the log, never to the client)."""
    try:
        return await handler(request)
    except RelayError as error:
        if isinstance(error, LocalProtocolError):
            return _unhandled(request, error)
        if request.path.startswith(HOSTS_PREFIX):
            state = request.app[STATE]
            state.metrics.requests_with_status(error.status).inc()
            log.info("http.refused", method=request.method, status=error.status,
                     code=str(error.code),
                     host_id=request.path[len(HOSTS_PREFIX):].split("/")[0][:300])
        response = error_response(error)
        if isinstance(error, PayloadTooLarge) or awaits_continue(request):
            # The rest of the body is never read: it is too large, or the client is waiting
            # for a 100 Continue that a refusal never sends.
            close_without_reading(request, response)
        return response
    except web.HTTPException as exc:
        # aiohttp's own refusals (no route, wrong method, a body over client_max_size ...)
        # become the same JSON as ours; redirects and successes pass as they are.
        if exc.status >= 400:
            code = _HTTP_EXCEPTION_CODES.get(
                exc.status, ErrorCode.BAD_REQUEST if exc.status < 500 else ErrorCode.INTERNAL
            )
            response = web.json_response(
                {"error": {"code": str(code), "message": exc.reason}}, status=exc.status
            )
            if "Allow" in exc.headers:  # a 405 says which methods would do
                response.headers["Allow"] = exc.headers["Allow"]
            if exc.status == 413:
                close_without_reading(request, response)
            return response
        raise
    except ConnectionResetError:
        raise  # the client went away: nobody to answer, nothing to report
    except Exception as exc:
        return _unhandled(request, exc)


def _response_started(request: web.Request) -> bool:
    # A prepared response shows on aiohttp's writer: bytes out, or the framing prepare() chose.
    writer = request.writer
    return (writer.output_size > 0 or writer.length is not None
            or bool(getattr(writer, "chunked", False)))


def _unhandled(request: web.Request, exc: Exception) -> web.StreamResponse:
    started = _response_started(request)
    log.error("http.unhandled", method=request.method, path=request.path[:300],
              error=type(exc).__name__, started=started, exc_info=exc)
    if started and request.transport is not None:
        # A status line already left: a second answer would be read as part of the first.
        # Cutting the connection is the only way to say the response is broken.
        request.transport.abort()
    response = error_response(RelayError())
    response.force_close()
    return response


_HTTP_EXCEPTION_CODES = {
    404: ErrorCode.NOT_FOUND,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    431: ErrorCode.HEADERS_TOO_LARGE,
}


@dataclass(frozen=True, slots=True)
class Routed:
    host_id: str
    subject: str
    tunnel: Tunnel | None = None
    owner_url: str = ""
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


def _peer_routed(state: RelayState, request: web.Request, route: HostRoute) -> Routed:
    """A request a relay forwarded after checking the client itself.

    The signature must be ours, fresh and single-use, and such a request is never forwarded
    again (the loop guard).
    """
    signer = state.signer
    if signer is None:
        raise PeerRejected("relay-to-relay forwarding is not enabled on this relay")
    claims = signer.verify(request.method, request.raw_path, route.host_raw, request.headers)
    host = parse_host_id(route.host_raw)
    tunnel = state.registry.get(str(host))
    if tunnel is None:
        raise HostOffline("the host's tunnel is not on the relay the directory named; retry")
    return Routed(str(host), claims.subject, tunnel=tunnel, client_chain=claims.client_ip)


async def _locate(state: RelayState, auth: Authorized) -> Routed:
    """Where the host's tunnel is: here, on another relay, or nowhere (503)."""
    host_id = str(auth.host)
    identity = auth.identity
    tunnel = state.registry.get(host_id)
    if tunnel is not None:
        return Routed(host_id, identity.sub, tunnel=tunnel, expires_at=identity.expires_at)
    if state.signer is not None and state.directory is not None:
        owner = await state.directory.lookup(host_id)
        if owner is not None and owner.instance_id != state.directory.instance_id:
            return Routed(host_id, identity.sub, owner_url=owner.url,
                          expires_at=identity.expires_at)
    raise HostOffline()


def _forward_query(route: HostRoute, auth: Authorized | None) -> str:
    # ``token`` is removed only when it was the credential; next to a bearer header (or on a
    # peer-forwarded request, already cleaned by the entry relay) it is the host's parameter.
    if auth is not None and auth.credential == "query":
        return strip_token_param(route.query)
    return route.query


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


async def handle_hosts(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    route = parse_host_route(request)
    cors = request.app.get(CORS)
    if cors is not None and request.method == "OPTIONS":
        # A preflight carries no credentials: the relay answers it, or nobody could.
        grant = cors.preflight(request.headers.get("Origin"),
                               request.headers.get("Access-Control-Request-Method"),
                               request.headers.get("Access-Control-Request-Headers"))
        if grant is not None:
            request[_PREFLIGHT] = True
            return web.Response(status=204, headers=grant)
    websocket = is_websocket_upgrade(request)
    if route.bare and request.method in {"GET", "HEAD"} and not websocket:
        return _bare_host_redirect(route)
    peer = request.headers.get(H_SIGNATURE) is not None
    if websocket:
        auth: Authorized | None = None
        try:
            if state.draining:
                raise Draining()
            check_header_size(request, state.config.server.max_header_bytes)
            if peer:
                routed = _peer_routed(state, request, route)
            else:
                auth = await authorize(state, request, route.host_raw, allow_query_token=True,
                                       role=AccessRole.CLIENT, allow_session=True)
                routed = await _locate(state, auth)
        except RelayError as error:
            log.info("ws.refused", code=str(error.code), host_id=route.host_raw[:300])
            return await refuse_ws(state, request, error)
        query = _forward_query(route, auth)
        if routed.tunnel is None:
            assert state.signer is not None and routed.owner_url
            return await forward_ws(state, state.signer, request, routed.owner_url,
                                    routed.host_id, route.path, query, routed.subject,
                                    routed.expires_at)
        gate = routed.tunnel.gate
        try:
            ticket = gate.open_channel(routed.subject)
        except Overloaded as error:
            log.info("ws.refused", code=str(error.code), host_id=routed.host_id,
                     reason="subject_share")
            return await refuse_ws(state, request, error)
        try:
            return await proxy_ws(state, request, routed.tunnel.session, route.path, query,
                                  routed.host_id, routed.client_chain,
                                  subject=routed.subject, expires_at=routed.expires_at)
        finally:
            gate.release(ticket)
    # Like nginx's client_max_body_size: a declared body over the limit is refused before
    # anything else, so an unauthenticated client cannot make the relay read it either.
    check_declared_body(request, state.config.server.max_body_bytes)
    if state.draining:
        raise Draining()
    check_header_size(request, state.config.server.max_header_bytes)
    auth = None
    if peer:
        routed = _peer_routed(state, request, route)
    else:
        # Browsers cannot put a header on an EventSource or a download link: ?token= on reads.
        auth = await authorize(state, request, route.host_raw,
                               allow_query_token=request.method in {"GET", "HEAD"},
                               role=AccessRole.CLIENT, allow_session=True)
        if auth.credential == "query" and is_navigation(request.method, request.headers):
            redirect = _session_redirect(state, request, route, auth)
            if redirect is not None:
                return redirect
        routed = await _locate(state, auth)
    query = _forward_query(route, auth)
    state.request_started()
    try:
        if routed.tunnel is None:
            assert state.signer is not None and routed.owner_url
            return await forward_http(state, state.signer, request, routed.owner_url,
                                      routed.host_id, route.path, query, routed.subject)
        # Past the tunnel's stream limit (or the subject's share of it) the exchange waits here,
        # bounded, rather than being shed at once.
        async with routed.tunnel.gate.http_slot(routed.subject):
            return await proxy_http(state, request, routed.tunnel.session, route.path, query,
                                    routed.host_id, routed.client_chain)
    finally:
        state.request_finished()


async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer under /hosts/ (proxied, the relay's own errors, redirects) gets the grant."""
    cors = request.app.get(CORS)
    if (cors is None or response.status == 101 or request.get(_PREFLIGHT)
            or not request.path.startswith(HOSTS_PREFIX)):
        return
    cors.decorate(response.headers, request.headers.get("Origin"))


async def handle_healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


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


async def handle_readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    checks = {"draining": state.draining}
    ready = not state.draining
    if state.directory is not None:
        # A cheap bounded check when the last sign of life is older than ~1 s, so readiness
        # follows a dead backend within a second instead of at the next heartbeat.
        healthy = await state.directory.check_ready()
        checks["directory"] = healthy
        ready = ready and healthy
    body = {"status": "ready" if ready else "unavailable", "checks": checks,
            "tunnels": len(state.registry)}
    return web.json_response(body, status=200 if ready else 503)


async def handle_metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.Response(body=state.metrics.render(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _keepalive_loop(state: RelayState) -> None:
    """Ping every tunnel and close the silent ones (4408), in one task for all of them.

    A task per tunnel cost a coroutine, a task and a timer each: a large share of an idle
    tunnel's memory at ten thousand tunnels.
    """
    while True:
        for tunnel in state.registry:
            tunnel.session.keepalive_tick()
        await asyncio.sleep(state.settings.keepalive_check_s)


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """Everything with a lifetime: the HTTP client, key sources, the directory, owned tasks.

    Whatever was created is released even when a later step fails (a bad grants file, say).
    """
    state = app[STATE]
    config = state.config
    state.client = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=30),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    try:
        state.sessions = SessionCookies(load_session_key(config))
        state.verifier = build_verifier(config, state.client, state.metrics)
        state.access = build_access_policy(config, state.client, state.metrics)
        state.directory = build_directory(config, state.metrics)
        await state.verifier.start()
        await state.directory.start()
        access = state.access

        def revoked(sub: str | None, host: str | None) -> None:
            access.revoke(sub=sub, host=host)
            # Connections already open under what was revoked close too (4403), on every relay.
            state.leases.revoke(sub, host)

        def lost(host_id: str, epoch: str) -> None:
            # Another relay took this host over: its agent reconnected there, ours is stale.
            tunnel = state.registry.get(host_id)
            if tunnel is not None and tunnel.epoch == epoch:
                log.info("tunnel.taken_over", host_id=host_id)
                tunnel.close(int(CloseCode.REPLACED), "replaced by a newer tunnel on another relay")

        state.directory.on_revocation(revoked)
        state.directory.on_lost(lost)
        state.tracing = build_tracing(config.tracing, state.metrics.trace_spans_dropped_total.inc)
        state.spawn(_keepalive_loop(state), "relay-keepalive")
        state.spawn(state.leases.run(), "relay-leases")
        if config.probe.public_url:
            state.spawn(run_probe(state), "relay-probe")
        yield
    finally:
        # Without a drain (a test, a crash path) agents must still hear that we are going,
        # or they only find out at their keepalive deadline.
        for tunnel in list(state.registry):
            tunnel.close(int(CloseCode.GOING_AWAY), "relay stopping")
        closing = [t for t in state.tasks if t.get_name().startswith("tunnel-close:")]
        if closing:
            await asyncio.wait(closing, timeout=2.5)
        for tunnel in list(state.registry):
            await tunnel.session.close(int(CloseCode.GOING_AWAY), "relay stopping")
        tasks = list(state.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if state.directory is not None:
            await state.directory.close()
        if state.access is not None:
            await state.access.close()
        if state.verifier is not None:
            await state.verifier.close()
        await state.client.close()
        if state.tracing is not None:
            await state.tracing.shutdown(timeout_s=3.0)  # bounded: a hung collector loses spans


def build_app(config: Config, metrics: Metrics | None = None) -> web.Application:
    state = RelayState(
        config=config, metrics=metrics or Metrics(), settings=session_settings(config)
    )
    closes = state.metrics.credential_closes_total
    state.leases.on_close = lambda kind, why: closes.labels(kind=kind, reason=why).inc()
    state.idle.set()
    state.tls = build_tls(config)
    directory = config.directory
    if directory.backend == "redis":
        state.signer = PeerSigner(directory.peer_secret, directory.instance_id,
                                  max_skew_s=directory.peer_max_skew_s)
    # The parser's own refusals (a line or field over these) are answered as JSON 414/431 by
    # relay.server.httpedge; the total header size is checked again per request (431).
    middlewares = [error_middleware]
    if wanted(config):  # a relay with neither tracing nor Server-Timing pays nothing per request
        middlewares.append(observe_middleware)
    app = web.Application(middlewares=middlewares,
                          handler_args=parser_args(edge_limits(config)))
    app[STATE] = state
    if config.cors.allow_origins:
        app[CORS] = CorsPolicy(config.cors.allow_origins, config.cors.max_age_s)
        # A prepare hook, not a middleware: streamed answers are sent before a middleware
        # would see them. Without CORS configured it is not installed (and costs nothing).
        app.on_response_prepare.append(_cors_headers)
    app.cleanup_ctx.append(_resources)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    app.router.add_get("/tunnel", handle_tunnel)
    app.router.add_route("*", "/hosts/{tail:.*}", handle_hosts, expect_handler=handle_hosts_expect)
    if not config.admin.listen:
        # With a separate admin listener, /admin and /metrics live there only (as Envoy's
        # admin port does): the public port answers 404 for them.
        app.router.add_get("/metrics", handle_metrics)
        add_admin_routes(app)
    return app


def build_admin_app(state: RelayState) -> web.Application:
    """The admin listener's app: /admin, /metrics and the health checks, on shared state."""
    app = web.Application(middlewares=[error_middleware],
                          handler_args=parser_args(edge_limits(state.config)))
    app[STATE] = state
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    app.router.add_get("/metrics", handle_metrics)
    add_admin_routes(app)
    return app


async def drain(state: RelayState, grace_s: float) -> None:
    """Refuse new work, tell every agent in-band, let in-flight exchanges finish, then close.

    Bounded: ``grace_s`` for in-flight HTTP exchanges, then at most ~1 s to flush the last frames
    and ~3 s for the close handshakes, however many tunnels there are (they run concurrently).
    """
    if state.draining:
        return
    state.draining = True
    state.metrics.draining.set(1)
    started = time.monotonic()
    log.info("relay.draining", tunnels=len(state.registry), inflight=state.inflight_http,
             grace_s=grace_s)
    told: set[Tunnel] = set()  # Tunnel compares by identity

    def tell(tunnels: list[Tunnel]) -> None:
        for tunnel in tunnels:
            if tunnel not in told:
                told.add(tunnel)
                tunnel.session.send_drain(Drain("relay draining", 0))

    tell(list(state.registry))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(state.idle.wait(), grace_s)
    cut = state.inflight_http
    if cut:
        log.warning("relay.drain_grace_expired", inflight=cut, grace_s=grace_s)
    # Re-read the registry: a tunnel whose handshake was already past the draining check when
    # the drain began may have registered since; it gets the same drain and 4503.
    tunnels = list(state.registry)
    tell(tunnels)
    if tunnels:
        # Let the DRAIN frames reach the sockets, all tunnels at once (a black-holed agent
        # must not hold up the others).
        await asyncio.gather(*(t.session.flush(timeout=1.0) for t in tunnels))
    for tunnel in tunnels:
        tunnel.session.fail_all(int(CloseCode.DRAINING), "relay draining; reconnect at once")
        tunnel.close(int(CloseCode.DRAINING), "relay draining")
    # Give the close frames a moment to leave (bounded: closes time out on their own).
    pending = [t for t in state.tasks if t.get_name().startswith("tunnel-close:")]
    if pending:
        await asyncio.wait(pending, timeout=3)
    log.info("relay.drained", duration_s=round(time.monotonic() - started, 3),
             tunnels=len(tunnels), cut=cut, inflight_left=state.inflight_http)
