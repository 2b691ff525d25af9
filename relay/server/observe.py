"""One span and one timer per ``/hosts`` exchange or channel, when tracing or Server-Timing is on.

The middleware is only installed when one of them is configured, so a relay with neither pays
nothing per request. The span's parent is the client's ``traceparent`` (a new trace without
one); the proxies send the host this span as the parent (:meth:`PathTimer.next_hop_headers`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from relay.config import Config
from relay.errors import RelayError
from relay.server.edge import HOSTS_PREFIX
from relay.server.state import STATE
from relay.server.timing import PATH_TIMER, PathTimer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def wanted(config: Config) -> bool:
    return bool(config.server.server_timing or config.tracing.otlp_endpoint)


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith(HOSTS_PREFIX):
        return await handler(request)
    state = request.app[STATE]
    tracing = state.tracing
    upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
    span = None
    if tracing is not None:
        host_raw = request.path[len(HOSTS_PREFIX):].split("/", 1)[0][:256]
        span = tracing.start_server_span(
            "relay.ws" if upgrade else "relay.http", request.headers,
            {"http.request.method": request.method, "relay.host_id": host_raw},
        )
    request[PATH_TIMER] = PathTimer(tracing, span,
                                    server_timing=state.config.server.server_timing)
    if span is None or tracing is None:
        return await handler(request)
    status: int | None = None
    error: str | None = None
    try:
        response = await handler(request)
        status = response.status
        return response
    except RelayError as exc:
        status, error = exc.status, str(exc.code)
        raise
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status, error = 499, "client went away"
        raise
    except Exception as exc:
        status, error = 500, type(exc).__name__
        raise
    finally:
        tracing.end_span(span, status, error)
