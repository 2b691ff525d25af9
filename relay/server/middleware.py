"""The middlewares and response hooks every request passes: one error answer for all failures,
and the CORS grant. Proxying itself adds no middleware hop (relay.server.observe is installed
only when tracing or Server-Timing is on)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from relay.errors import ErrorCode, LocalProtocolError, PayloadTooLarge, RelayError
from relay.server.cors import CorsPolicy
from relay.server.edge import HOSTS_PREFIX, awaits_continue, error_response
from relay.server.httpedge import close_without_reading
from relay.server.state import STATE

log = structlog.get_logger("relay.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CORS: web.AppKey[CorsPolicy] = web.AppKey("relay_cors", CorsPolicy)
# Set on a request whose preflight the relay answered itself (the hook leaves it alone).
PREFLIGHT: web.RequestKey[bool] = web.RequestKey("relay_cors_preflight", bool)


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


async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer under /hosts/ (proxied, the relay's own errors, redirects) gets the grant."""
    cors = request.app.get(CORS)
    if (cors is None or response.status == 101 or request.get(PREFLIGHT)
            or not request.path.startswith(HOSTS_PREFIX)):
        return
    cors.decorate(response.headers, request.headers.get("Origin"))
