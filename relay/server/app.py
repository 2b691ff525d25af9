"""Assemble the relay: its aiohttp apps (public and admin), their routes and middlewares, and
everything with a lifetime (HTTP client, key sources, access policy, directory, owned tasks).

A request then reads one way: middlewares (relay.server.middleware) → routing
(relay.server.routing: identity → access → local tunnel | peer relay | offline) → a proxy
(http_proxy, ws_proxy, forward). The end is relay.server.drain.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, NamedTuple

import aiohttp
import structlog
from aiohttp import web

from relay.auth.access import build_access_policy
from relay.auth.session import SessionCookies, load_session_key
from relay.auth.tokens import build_verifier
from relay.config import Config, DirectoryBackend
from relay.directory import build_directory
from relay.errors import CloseCode
from relay.metrics import Metrics
from relay.server.admin import add_admin_routes
from relay.server.cors import CorsPolicy
from relay.server.drain import stop
from relay.server.health import handle_healthz, handle_metrics, handle_readyz
from relay.server.httpedge import edge_limits, parser_args
from relay.server.leases import LeaseWatch
from relay.server.middleware import CORS, cors_headers, error_middleware
from relay.server.observe import observe_middleware, wanted
from relay.server.peer_answer import close_answered_links, handle_peer_link
from relay.server.peerlink import PeerLinks
from relay.server.peers import LINK_PATH, PeerSigner
from relay.server.routing import handle_hosts, handle_hosts_expect
from relay.server.state import BACKGROUND, STATE, RelayState, session_settings
from relay.server.tls import build_tls
from relay.server.tunnels import handle_tunnel
from relay.tracing import build_tracing

log = structlog.get_logger("relay.server")

class Service(NamedTuple):
    """A loop that runs for the relay's lifetime beside it (the synthetic probe)."""

    name: str  # its task's name
    run: Callable[[RelayState], Coroutine[Any, Any, None]]


SERVICES: web.AppKey[tuple[Service, ...]] = web.AppKey("relay_services", tuple)


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
        state.sessions = SessionCookies(load_session_key(config), clock=state.wall_clock)
        state.verifier = build_verifier(config, state.client, state.metrics,
                                        clock=state.wall_clock)
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
        state.tasks.spawn(BACKGROUND, _keepalive_loop(state), "relay-keepalive")
        state.tasks.spawn(BACKGROUND, state.leases.run(), "relay-leases")
        for service in app[SERVICES]:
            state.tasks.spawn(BACKGROUND, service.run(state), service.name)
        yield
    finally:
        if state.links is not None:
            await state.links.close()
        close_answered_links(state)
        await stop(state)
        if state.directory is not None:
            await state.directory.close()
        if state.access is not None:
            await state.access.close()
        if state.verifier is not None:
            await state.verifier.close()
        await state.client.close()
        if state.tracing is not None:
            # Bounded (tracing.shutdown_timeout_s): a hung collector loses spans, not the exit.
            await state.tracing.shutdown()


async def _hang_up_refusals(app: web.Application) -> None:
    """Before aiohttp waits for its handlers: a refused tunnel's lingering close would hold a
    stopping relay for its whole grace, for a peer that is owed nothing more."""
    for transport in list(app[STATE].refusing):
        transport.abort()


def build_app(config: Config, metrics: Metrics | None = None, *,
              services: Sequence[Service] = (),
              wall_clock: Callable[[], float] = time.time) -> web.Application:
    """The relay's public app. ``services`` run beside it, owned and cancelled at stop; the
    layer that may import both sides passes the synthetic probe here (relay.serve).
    ``wall_clock``: what tokens' times are checked against (RelayState.wall_clock)."""
    state = RelayState(
        config=config, metrics=metrics or Metrics(), settings=session_settings(config),
        wall_clock=wall_clock, leases=LeaseWatch(clock=wall_clock),
    )
    closes = state.metrics.credential_closes_total
    state.leases.on_close = lambda kind, why: closes.labels(kind=kind, reason=why).inc()
    state.idle.set()
    state.tls = build_tls(config)
    directory = config.directory
    if directory.backend == DirectoryBackend.REDIS:
        state.signer = PeerSigner(directory.peer_secret, directory.instance_id,
                                  max_skew_s=directory.peer_max_skew_s)
        if directory.peer_links:
            state.links = PeerLinks(state)
    # The parser's own refusals (a line or field over these) are answered as JSON 414/431 by
    # relay.server.httpedge; the total header size is checked again per request (431).
    middlewares = [error_middleware]
    if wanted(config):  # a relay with neither tracing nor Server-Timing pays nothing per request
        middlewares.append(observe_middleware)
    app = web.Application(middlewares=middlewares,
                          handler_args=parser_args(edge_limits(config)))
    app[STATE] = state
    app[SERVICES] = tuple(services)
    if config.cors.allow_origins:
        app[CORS] = CorsPolicy(config.cors.allow_origins, config.cors.max_age_s)
        # A prepare hook, not a middleware: streamed answers are sent before a middleware
        # would see them. Without CORS configured it is not installed (and costs nothing).
        app.on_response_prepare.append(cors_headers)
    app.cleanup_ctx.append(_resources)
    app.on_shutdown.append(_hang_up_refusals)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    app.router.add_get("/tunnel", handle_tunnel)
    if state.links is not None:
        app.router.add_get(LINK_PATH, handle_peer_link)
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
