"""``/healthz`` (the process answers), ``/readyz`` (it should get traffic) and ``/metrics``."""

from __future__ import annotations

from aiohttp import web

from relay.metrics import CONTENT_TYPE_LATEST
from relay.server.state import STATE


async def handle_healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


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
