"""Proxy one HTTP exchange down a tunnel, streaming both bodies with bounded buffers."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog
from aiohttp import web
from multidict import CIMultiDict

from relay.aio import cancel_and_wait
from relay.errors import (
    CloseCode,
    Draining,
    HostOffline,
    HostTimeout,
    Overloaded,
    PayloadTooLarge,
    RelayError,
    TunnelClosed,
)
from relay.logs import access_log
from relay.protocol.headers import response_headers_for_client
from relay.protocol.hostpaths import host_prefix
from relay.protocol.messages import Head
from relay.server.edge import send_continue
from relay.server.forwarded import client_view, host_request_head
from relay.server.state import RelayState
from relay.server.timing import timer_of, trace_next_hop
from relay.tunnel.session import Channel, ChannelClosed, TunnelSession

log = structlog.get_logger("relay.http")
_ACCESS = access_log("relay.http")


@dataclass(slots=True)
class Exchange:
    """Counters of one exchange, for the access line and metrics."""

    bytes_up: int = 0
    bytes_down: int = 0
    started: float = 0.0  # monotonic
    upload_progress: float = 0.0  # monotonic: the request's arrival, then every chunk sent
    upload_done: bool = False
    body_too_large: bool = False
    first_byte: float = 0.0  # when the host's HEAD arrived (monotonic; 0: it never did)
    ended: float = 0.0


def request_has_body(request: web.Request) -> bool:
    if request.content_length is not None:
        return request.content_length > 0
    return "chunked" in request.headers.get("Transfer-Encoding", "").lower()


async def _upload(request: web.Request, channel: Channel, exchange: Exchange, limit: int) -> None:
    """Stream the client's body to the host; credit waits give the backpressure."""
    try:
        async for data in request.content.iter_any():
            exchange.bytes_up += len(data)
            if exchange.bytes_up > limit:
                exchange.body_too_large = True
                channel.close(int(CloseCode.MESSAGE_TOO_BIG), "request body too large")
                return
            await channel.write(data)
            exchange.upload_progress = time.monotonic()
        await channel.finish()
        exchange.upload_done = True
    except ChannelClosed:
        pass  # the response side reports why


async def _await_head(channel: Channel, exchange: Exchange, upload: asyncio.Task[None] | None,
                      limit_s: float) -> Head:
    """The host's response head; the clock runs while the upload makes no progress."""
    while True:
        if await channel.wait_head(limit_s / 4 if upload else limit_s):
            return channel.head.result()
        # upload_progress starts at the request's arrival and moves with every chunk sent.
        idle_since = exchange.upload_progress if upload is not None else exchange.started
        if time.monotonic() - idle_since >= limit_s:
            raise HostTimeout()


async def proxy_http(
    state: RelayState, request: web.Request, session: TunnelSession, path: str, query: str,
    host_id: str, client_chain: str | None = None, *, claims: tuple[tuple[str, str], ...] = (),
) -> web.StreamResponse:
    config = state.config
    metrics = state.metrics
    now = time.monotonic()
    exchange = Exchange(started=now, upload_progress=now)
    limit = config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    has_body = request_has_body(request)
    # Once per exchange: the host's X-Forwarded-* and the origin its redirects are rewritten to.
    public = client_view(request, config.server.trust_forwarded, client_chain)
    head = host_request_head(request, path, query, config.server.trust_forwarded, client_chain,
                             host_id=host_id, claims=claims, view=public)
    timer = timer_of(request)
    if timer is not None:
        head = trace_next_hop(timer, head)
    try:
        channel = session.open_channel(head, fin=not has_body)
    except ChannelClosed:
        # The tunnel failed and its handler has not unregistered it yet: nothing was sent.
        raise HostOffline() from None
    if timer is not None:
        timer.lap("tunnel")
    metrics.http_streams.inc()
    upload: asyncio.Task[None] | None = None
    status = 0
    complete = False  # the whole response went to the client
    timed_out = False  # no HEAD within requestTimeoutS: the agent is told 4408, not 1001
    try:
        if has_body:
            await send_continue(request)
            upload = asyncio.ensure_future(_upload(request, channel, exchange, limit))
            upload.set_name(f"http-upload:{host_id}:{channel.id}")
        try:
            host_head = await _await_head(channel, exchange, upload,
                                          config.tunnel.request_timeout_s)
        except ChannelClosed as closed:
            if exchange.body_too_large:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes") from None
            if closed.tunnel_lost and closed.code == CloseCode.DRAINING:
                raise Draining() from None
            if closed.tunnel_lost:
                raise TunnelClosed() from None
            if closed.code == CloseCode.TRY_AGAIN_LATER:
                raise Overloaded("the host's agent is at its stream limit; retry shortly") from None
            why = closed.reason or closed.code
            raise TunnelClosed(f"the host aborted the request: {why}") from None
        exchange.first_byte = time.monotonic()
        if timer is not None:
            timer.lap("host")
        status = host_head.status
        raw_headers = host_head.headers
        reason = host_head.reason or None
        length = None
        for name, value in raw_headers:
            if name.lower() == "content-length":
                length = value
        headers = CIMultiDict(response_headers_for_client(
            raw_headers, host_prefix(host_id), public.origin,
        ))
        if timer is not None and (timing := timer.header()) is not None:
            headers.add("Server-Timing", timing)  # beside any the host sent
        whole = channel.take_whole_body()
        # aiohttp's Response would invent a Content-Type the host did not send; stream then.
        if whole is not None and "Content-Type" in headers and (
            length is None or length == str(len(whole))
        ):
            # Everything is here already (the common small response): one write, not three.
            single = web.Response(status=status, reason=reason, body=whole, headers=headers)
            exchange.bytes_down += len(whole)
            channel.consumed(len(whole))
            complete = True
            return single
        if whole is not None:  # a length mismatch: stream it and let aiohttp police it
            channel.unread(whole)
        response = web.StreamResponse(status=status, reason=reason, headers=headers)
        declared = int(length) if length is not None and length.isdigit() else None
        if declared is not None:
            response.content_length = declared
        await response.prepare(request)
        # aiohttp writes whatever it is given, even to a HEAD: a body there would be read as
        # the next response on a keep-alive connection. Drain what a host sends, write none.
        body_allowed = request.method != "HEAD"
        # The agent must send exactly Content-Length bytes (aiohttp would silently drop the
        # excess and end a short body as if it were whole).
        exact = declared if body_allowed and status not in (204, 304) else None
        received = 0
        while True:
            try:
                chunk = await channel.read()
            except ChannelClosed:
                # Mid-body loss: the status is already sent, so cut the connection; a clean
                # end would make a truncated body look complete.
                exchange_failed(request)
                status = 502
                return response
            if chunk is None:
                if exact is not None and received < exact:
                    exchange_failed(request)  # FIN before Content-Length: truncated
                    status = 502
                    return response
                break
            received += len(chunk.data)
            if exact is not None and received > exact:
                channel.close(int(CloseCode.PROTOCOL_ERROR), "body longer than Content-Length",
                              even_if_finished=True)
                exchange_failed(request)
                status = 502
                return response
            if body_allowed:
                await response.write(chunk.data)
                exchange.bytes_down += len(chunk.data)
            channel.consumed(len(chunk.data))
        await response.write_eof()
        complete = True
        return response
    except RelayError as error:
        status = error.status
        timed_out = isinstance(error, HostTimeout)
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499  # the client went away
        raise
    finally:
        if upload is not None and not upload.done():
            await cancel_and_wait([upload])
        if not channel.closed and channel.state.value != "closed":
            if complete:  # the response ended before the request body: stop that body
                channel.close(int(CloseCode.NORMAL), "exchange complete")
            elif timed_out:
                channel.close(int(CloseCode.TIMED_OUT), "no response head in time")
            else:
                channel.close(int(CloseCode.GOING_AWAY), "client went away")
        exchange.ended = time.monotonic()
        # A returned response is written by aiohttp after this block, in the same loop step;
        # the metrics and the access line wait for the next one, so the client does not wait
        # for them (bench W0: the relay's response leg about a quarter shorter).
        session.loop.call_soon(_account, state, exchange, status, host_id, request.method, path)


def _account(state: RelayState, exchange: Exchange, status: int, host_id: str, method: str,
             path: str) -> None:
    """The metrics and the access line of one finished exchange."""
    metrics = state.metrics
    metrics.http_streams.dec()
    duration = exchange.ended - exchange.started
    if exchange.first_byte:
        metrics.http_time_to_first_byte_seconds.observe(exchange.first_byte - exchange.started)
    metrics.requests_with_status(status).inc()
    metrics.http_request_duration_seconds.observe(duration)
    metrics.bytes_to_host.inc(exchange.bytes_up)
    metrics.bytes_to_client.inc(exchange.bytes_down)
    if state.config.log.access_log and _ACCESS.enabled():
        _ACCESS.info("http.access", host_id=host_id, method=method, path=path,
                     status=status, bytes_in=exchange.bytes_up, bytes_out=exchange.bytes_down,
                     duration_ms=round(duration * 1000, 2))


def exchange_failed(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
