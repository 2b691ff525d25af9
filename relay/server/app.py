"""Assemble the relay's aiohttp application: routes, middlewares and resource lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import structlog
from aiohttp import web

from relay.auth.access import AccessRole, build_access_policy
from relay.auth.hostid import parse_host_id
from relay.auth.tokens import build_verifier
from relay.config import Config
from relay.directory import build_directory
from relay.errors import (
    CloseCode,
    Draining,
    ErrorCode,
    HostOffline,
    RelayError,
)
from relay.metrics import CONTENT_TYPE_LATEST, Metrics
from relay.protocol.headers import strip_token_param
from relay.server.admin import add_admin_routes
from relay.server.edge import (
    HOSTS_PREFIX,
    HostRoute,
    authorize,
    check_header_size,
    error_response,
    parse_host_route,
)
from relay.server.forward import forward_http, forward_ws
from relay.server.http_proxy import proxy_http
from relay.server.observe import observe_middleware, wanted
from relay.server.peers import H_SIGNATURE, PeerRejected, PeerSigner
from relay.server.probe import run_probe
from relay.server.registry import Tunnel
from relay.server.state import STATE, RelayState, session_settings
from relay.server.tls import build_tls
from relay.server.tunnels import handle_tunnel
from relay.server.ws_proxy import proxy_ws, refuse_ws
from relay.tracing import build_tracing

log = structlog.get_logger("relay.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RelayError as error:
        if request.path.startswith(HOSTS_PREFIX):
            state = request.app[STATE]
            state.metrics.requests_with_status(error.status).inc()
            log.info("http.refused", method=request.method, status=error.status,
                     code=str(error.code),
                     host_id=request.path[len(HOSTS_PREFIX):].split("/")[0][:300])
        return error_response(error)
    except web.HTTPException as exc:
        if exc.status in (404, 405):
            code = ErrorCode.NOT_FOUND if exc.status == 404 else ErrorCode.BAD_REQUEST
            return web.json_response(
                {"error": {"code": str(code), "message": exc.reason}}, status=exc.status
            )
        raise


@dataclass(frozen=True, slots=True)
class Routed:
    host_id: str
    subject: str
    tunnel: Tunnel | None = None
    owner_url: str = ""
    client_chain: str | None = None  # set on requests a peer relay forwarded


def is_websocket_upgrade(request: web.Request) -> bool:
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in request.headers.get("Connection", "").lower()
    )


async def _route(state: RelayState, request: web.Request, route: HostRoute,
                 allow_query_token: bool) -> Routed:
    """Who is asking and where the host's tunnel is: here, on another relay, or nowhere."""
    signer = state.signer
    if request.headers.get(H_SIGNATURE) is not None:
        # A relay forwarded this after checking the client itself; it must be ours, fresh and
        # single-use, and it is never forwarded again (the loop guard).
        if signer is None:
            raise PeerRejected("relay-to-relay forwarding is not enabled on this relay")
        claims = signer.verify(request.method, request.raw_path, route.host_raw, request.headers)
        host = parse_host_id(route.host_raw)
        tunnel = state.registry.get(str(host))
        if tunnel is None:
            raise HostOffline("the host's tunnel is not on the relay the directory named; retry")
        return Routed(str(host), claims.subject, tunnel=tunnel, client_chain=claims.client_ip)
    auth = await authorize(state, request, route.host_raw, allow_query_token=allow_query_token,
                           role=AccessRole.CLIENT)
    host_id = str(auth.host)
    tunnel = state.registry.get(host_id)
    if tunnel is not None:
        return Routed(host_id, auth.identity.sub, tunnel=tunnel)
    if signer is not None and state.directory is not None:
        owner = await state.directory.lookup(host_id)
        if owner is not None and owner.instance_id != state.directory.instance_id:
            return Routed(host_id, auth.identity.sub, owner_url=owner.url)
    raise HostOffline()


async def handle_hosts(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    route = parse_host_route(request)
    query = strip_token_param(route.query)
    if is_websocket_upgrade(request):
        try:
            if state.draining:
                raise Draining()
            check_header_size(request, state.config.server.max_header_bytes)
            routed = await _route(state, request, route, allow_query_token=True)
        except RelayError as error:
            log.info("ws.refused", code=str(error.code), host_id=route.host_raw[:300])
            return await refuse_ws(state, request, error)
        if routed.tunnel is None:
            assert state.signer is not None and routed.owner_url
            return await forward_ws(state, state.signer, request, routed.owner_url,
                                    routed.host_id, route.path, query, routed.subject)
        return await proxy_ws(state, request, routed.tunnel.session, route.path, query,
                              routed.host_id, routed.client_chain)
    if state.draining:
        raise Draining()
    check_header_size(request, state.config.server.max_header_bytes)
    routed = await _route(state, request, route, allow_query_token=False)
    state.request_started()
    try:
        if routed.tunnel is None:
            assert state.signer is not None and routed.owner_url
            return await forward_http(state, state.signer, request, routed.owner_url,
                                      routed.host_id, route.path, query, routed.subject)
        return await proxy_http(state, request, routed.tunnel.session, route.path, query,
                                routed.host_id, routed.client_chain)
    finally:
        state.request_finished()


async def handle_healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def handle_readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    checks = {"draining": state.draining}
    ready = not state.draining
    if state.directory is not None:
        healthy = state.directory.healthy
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
        state.verifier = build_verifier(config, state.client, state.metrics)
        state.access = build_access_policy(config, state.client, state.metrics)
        state.directory = build_directory(config, state.metrics)
        await state.verifier.start()
        await state.directory.start()
        access = state.access

        def revoked(sub: str | None, host: str | None) -> None:
            access.revoke(sub=sub, host=host)

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
    state.idle.set()
    state.tls = build_tls(config)
    directory = config.directory
    if directory.backend == "redis":
        state.signer = PeerSigner(directory.peer_secret, directory.instance_id,
                                  max_skew_s=directory.peer_max_skew_s)
    # aiohttp's parser refuses single lines above these with a bare 400; keep them well above
    # server.max_header_bytes so oversized headers get the documented JSON 431 instead.
    parser_limit = max(65536, config.server.max_header_bytes * 8)
    middlewares = [error_middleware]
    if wanted(config):  # a relay with neither tracing nor Server-Timing pays nothing per request
        middlewares.append(observe_middleware)
    app = web.Application(middlewares=middlewares, handler_args={
        "max_field_size": parser_limit,
        "max_line_size": parser_limit,
    })
    app[STATE] = state
    app.cleanup_ctx.append(_resources)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/tunnel", handle_tunnel)
    app.router.add_route("*", "/hosts/{tail:.*}", handle_hosts)
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
                tunnel.session.send_drain({"reason": "relay draining", "reconnectAfterS": 0})

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
