"""Serve tunnel streams against the agent's one local origin, streaming both ways.

Plain HTTP exchanges go through :class:`relay.agent.http1.OriginPool`: keep-alive connections
to the origin, and a connection that misbehaves (bytes after a HEAD/204/304 answer or while
idle, a parse error, a reset) is never reused. A request that meets a dead or dirty pooled
connection before any byte of an answer is sent again, once, on a fresh connection -- only
``GET``/``HEAD``/``OPTIONS``/``TRACE`` and ``PUT``/``DELETE`` without a body (a body was
streamed from the tunnel and cannot be replayed). Nothing is sent to the relay until the
host's head is in, so a retried request is invisible to the client.

WebSocket channels are the relay's own code at both ends: the upgrade to the host is made by
hand (:func:`relay.tunnel.dial.upgrade`: the client's subprotocols offered, its end-to-end
headers forwarded, no extension offered, so an accepted one is a refusal, and so is a
subprotocol that was not offered), then the connection is served by a client-mode
:class:`relay.tunnel.channel_socket.ChannelSocket` (masked writes with fresh keys; a masked
frame from the host is 1002) bridged to the channel by :class:`relay.tunnel.ws_channel.
ChannelBridge`, the same bridge the relay runs for the client's socket. The host's messages go
down the tunnel from the socket's read, with no reader task, queue or future per message, and a
channel out of credit leaves the host's socket unread. A refused upgrade is the host's status
to the relay (a 1xx or nonsense one 502); a host that cannot be reached, or breaks the
handshake, is 502 and ``agent.upstream_ws_failed``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import ssl
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, TypeAlias

import structlog
from yarl import URL

from relay.agent.http1 import OriginConnectionLost, OriginError, OriginPool
from relay.errors import CloseCode, ErrorCode
from relay.protocol.headers import WS_HANDSHAKE, strip_hop_by_hop
from relay.protocol.hostpaths import localize_response_headers
from relay.protocol.messages import Head, Open
from relay.tunnel.channel_socket import ChannelSocket
from relay.tunnel.dial import HandshakeRefused, upgrade
from relay.tunnel.session import Channel, ChannelClosed, ChannelKind
from relay.tunnel.ws_channel import ChannelBridge

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from relay.tracing import Tracing

log = structlog.get_logger("relay.agent")


def _error_head(status: int, code: str, message: str) -> tuple[Head, bytes]:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = Head(status=status, headers=(("Content-Type", "application/json"),
                                        ("Content-Length", str(len(body)))))
    return head, body


def _refusal_status(status: int | None) -> int:
    """The host's refusal of a WebSocket as a final status (a 1xx or nonsense one is 502)."""
    return status if status is not None and 200 <= status <= 599 else 502


# The host's answer to an upgrade, bounded as aiohttp's connect timeout bounded it (the relay
# usually gives up first: tunnel.open_timeout_s).
UPGRADE_TIMEOUT_S = 10.0

Upgraded: TypeAlias = tuple[ChannelSocket, str | None]


async def _connect_while_open(channel: Channel, connecting: Awaitable[Upgraded]) -> Upgraded:
    """Await the host's WebSocket until the relay ends the stream (it gives up on a host that
    is slow to accept), then cancel it rather than hold a socket to the host for nobody."""
    task = asyncio.ensure_future(connecting)
    try:
        while not task.done():
            if channel.closed:
                raise ChannelClosed(int(CloseCode.GOING_AWAY), "the relay ended the stream")
            await asyncio.wait({task}, timeout=0.05)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
            if not task.cancelled() and task.exception() is None:
                task.result()[0].abort()  # it connected just then: hang up
    return task.result()


def _tunnel_lost(_: ChannelClosed) -> tuple[int, str]:
    return int(CloseCode.GOING_AWAY), "tunnel lost"


def parse_origin(origin: str) -> URL:
    """The http(s) origin ``origin`` names, or ValueError saying what to write instead."""
    try:
        url = URL(origin)
    except ValueError:
        url = URL()
    if url.scheme not in {"http", "https"} or not url.host or url.port is None:
        hint = "e.g. http://127.0.0.1:3000"
        if "://" not in origin and origin:
            hint = f"did you mean http://{origin}?"
        raise ValueError(f"--upstream must be an http(s) origin, got {origin!r}; {hint}")
    return url.origin()


_HOST = frozenset({"host"})
# The handshake's own fields are the agent's to write (and Host is the origin's).
_WS_OWN = WS_HANDSHAKE | _HOST
# What the relay forwards percent-encoded: raw, it would corrupt the request line to the host.
_MUST_BE_ENCODED = re.compile(r"[\x00-\x20\x7f#]")


class LocalOrigin:
    """The agent's view of its host service: one origin, never anything else."""

    def __init__(self, origin: str, *, max_ws_message: int, pool: OriginPool | None = None,
                 tracing: Tracing | None = None) -> None:
        """``pool`` (made here by default, and then closed by :meth:`close`) carries plain
        HTTP exchanges; WebSocket channels are dialled by hand."""
        url = parse_origin(origin)
        assert url.host is not None and url.port is not None  # parse_origin checked both
        self.origin = url
        # Every exchange builds its URL on these (formatting them per request was a measurable
        # share of the agent's CPU under small requests).
        ws_url = url.with_scheme("wss" if url.scheme == "https" else "ws")
        self._bases = {False: (str(url), url), True: (str(ws_url), ws_url)}
        self.max_ws_message = max_ws_message
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._owns_pool = pool is None
        self.pool = pool or OriginPool(url.host, url.port, ssl_context=self._ssl)
        self.tracing = tracing

    async def close(self) -> None:
        if self._owns_pool:
            await self.pool.close()

    def url_for(self, head: Open, *, websocket: bool = False) -> URL:
        path = head.path
        if not path.startswith("/"):
            path = "/" + path
        query = head.query
        prefix, base = self._bases[websocket]
        # The path arrives still percent-encoded: keep it byte-exact, and never let it
        # name another origin.
        if _MUST_BE_ENCODED.search(path) or _MUST_BE_ENCODED.search(query):
            # The relay forwards what the client sent percent-encoded; a raw space, control
            # character or fragment here would corrupt the request line to the host.
            raise ValueError("path or query holds characters that must be percent-encoded")
        url = URL(prefix + path + (f"?{query}" if query else ""), encoded=True)
        if (url.host, url.port, url.scheme) != (base.host, base.port, base.scheme):
            raise ValueError("path escapes the local origin")
        return url

    async def serve(self, channel: Channel, head: Open) -> None:
        span = None
        if self.tracing is not None:
            span, head = self._start_span(channel, head)
        try:
            if channel.kind is ChannelKind.WS:
                await self._serve_ws(channel, head)
            else:
                await self._serve_http(channel, head, span)
        except ChannelClosed:
            pass  # the relay ended the stream (client gone, tunnel gone)
        finally:
            channel.close(int(CloseCode.INTERNAL_ERROR), "agent stream ended")
            if span is not None:
                span.end()

    def _start_span(self, channel: Channel, head: Open) -> tuple[Span, Open]:
        """The agent's span for its call to the host, which becomes the host's trace parent;
        and the OPEN with the span as the trace parent the host sees."""
        from relay.tracing import trace_headers, with_trace_headers

        assert self.tracing is not None
        headers = list(head.headers)
        span = self.tracing.start_client_span(
            "agent.upstream" if channel.kind is ChannelKind.HTTP else "agent.upstream_ws",
            trace_headers(headers),
            {"http.request.method": head.method, "url.path": head.path},
        )
        traced = with_trace_headers(headers, self.tracing.inject(span))
        return span, dataclasses.replace(head, headers=tuple(traced))

    async def _request_body(self, channel: Channel) -> AsyncIterator[bytes]:
        while True:
            chunk = await channel.read()
            if chunk is None:
                return
            yield chunk.data
            channel.consumed(len(chunk.data))

    async def _serve_http(self, channel: Channel, head: Open,
                          span: Span | None = None) -> None:
        method = head.method
        # Host is the pool's (the one origin); the relay sends none, a foreign relay might.
        headers = strip_hop_by_hop(head.headers, extra=_HOST)
        # The OPEN's FIN says "no body". Not the stream's current state: a small body and its
        # FIN may already have arrived by the time this task runs.
        has_body = not channel.fin_on_open
        try:
            url = self.url_for(head)
        except ValueError:
            await self._send_error(channel, 400, "bad_request", "invalid path")
            return
        head_sent = False
        try:
            response = await self.pool.request(
                method, url.raw_path_qs, list(headers),
                self._request_body(channel) if has_body else None,
            )
            async with response:
                if span is not None:
                    span.set_attribute("http.response.status_code", response.status)
                channel.send_head(Head(
                    status=response.status,
                    reason=response.reason,
                    # Redirects to the host's own origin become root-relative, so the relay
                    # can keep them under the host's prefix (it does not know this origin).
                    # Hop-by-hop fields describe the agent's own connection to the host.
                    headers=tuple(strip_hop_by_hop((k, v) for k, v in localize_response_headers(
                        [[k, v] for k, v in response.headers], self._bases[False][0]))),
                ))
                head_sent = True
                while True:
                    data = await response.read()
                    if not data:
                        await channel.finish()
                        break
                    if response.at_eof:
                        # The last bytes carry the FIN: a small response is one DATA frame.
                        await channel.write(data, fin=True)
                        break
                    await channel.write(data)
        except ChannelClosed:
            raise
        except (OriginError, TimeoutError) as exc:
            if channel.closed:
                return  # the relay ended the stream (e.g. while its body was being sent)
            log.info("agent.upstream_failed", error=type(exc).__name__, path=head.path,
                     after_head=head_sent)
            if head_sent:
                # Mid-body: a second HEAD would break the whole tunnel; abort this stream so
                # the relay cuts the client's connection instead of ending the body cleanly.
                if isinstance(exc, OriginConnectionLost):
                    channel.close(int(CloseCode.GOING_AWAY), "host connection closed early")
                else:
                    channel.close(int(CloseCode.INTERNAL_ERROR), "host failed mid-response")
                return
            await self._send_error(channel, 502, str(ErrorCode.HOST_UNAVAILABLE),
                                   "the host service did not answer")

    async def _send_error(self, channel: Channel, status: int, code: str, message: str) -> None:
        head, body = _error_head(status, code, message)
        channel.send_head(head)
        await channel.write(body, fin=True)

    async def _serve_ws(self, channel: Channel, head: Open) -> None:
        headers = strip_hop_by_hop(head.headers, extra=_WS_OWN)
        bridge = ChannelBridge(channel, lost_code=_tunnel_lost)
        max_message = self.max_ws_message

        def take_over(transport: asyncio.Transport, tail: bytes,
                      protocol: str | None) -> Upgraded:
            socket = ChannelSocket(transport, bridge, max_message_bytes=max_message,
                                   client=True)
            transport.set_protocol(socket)
            bridge.attach(socket)
            # Nothing of the host's is parsed before the channel's HEAD is out (below).
            socket.hold()
            if tail:
                socket.data_received(tail)
            return socket, protocol

        try:
            url = self.url_for(head, websocket=True)
            socket, protocol = await _connect_while_open(channel, asyncio.wait_for(upgrade(
                str(url), headers, take_over, protocols=head.protocols, ssl_context=self._ssl,
            ), UPGRADE_TIMEOUT_S))
        except HandshakeRefused as refused:
            if refused.status == 101 or refused.status == 0:
                # Not a refusal: an answer that breaks the handshake (or no HTTP at all).
                log.info("agent.upstream_ws_failed", error=type(refused).__name__,
                         path=head.path, status=refused.status, detail=refused.message)
            channel.send_head(Head(status=_refusal_status(refused.status)))
            return
        except (OSError, TimeoutError, ValueError) as exc:
            log.info("agent.upstream_ws_failed", error=type(exc).__name__, path=head.path)
            channel.send_head(Head(status=502))
            return
        channel.send_head(Head(status=101, protocol=protocol))
        socket.release()
        await bridge.run()
