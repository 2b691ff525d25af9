"""Serve tunnel streams against the agent's one local origin, streaming both ways.

Pooled connections to the host service are reused (keep-alive), and a pooled connection can
turn out dead (the host closed it while it sat idle: the classic keep-alive race) or dirty (a
host that writes a body after a HEAD, 204 or 304 answer leaves bytes that would be read as the
next response). aiohttp already drops a connection that failed (a parse error, a reset) or
that still holds unread bytes when it is released, and closes an idle one on which bytes
arrive. What is left is the request that meets such a connection first: it fails before any
response byte. :func:`retry_allowed` decides when that request is sent again, **once**, on a
fresh connection that is not pooled: only when the failed connection was a reused one, the
failure is one a dead or dirty connection causes (:func:`is_stale_connection_error`), nothing
of the answer reached the relay yet, and the request is idempotent with no body (its body, if
any, was streamed from the tunnel and cannot be replayed). Everything else fails as before
with ``502 host_unavailable``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from types import SimpleNamespace
from typing import Any

import aiohttp
import structlog
from yarl import URL

from relay.errors import CloseCode
from relay.protocol.headers import WS_HANDSHAKE, Headers, strip_hop_by_hop
from relay.tunnel.bridge import bridge
from relay.tunnel.session import Channel, ChannelClosed, ChannelKind

log = structlog.get_logger("relay.agent")

# RFC 9110 idempotent methods a relay may replay; only ever without a request body.
RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def retry_allowed(method: str, has_body: bool) -> bool:
    """May a request that met a dead or dirty pooled connection be sent again?"""
    return not has_body and method.upper() in RETRYABLE_METHODS


def is_stale_connection_error(exc: BaseException) -> bool:
    """True for failures a dead or dirty reused connection causes before the answer's head.

    A refused connect (the host is down) and a timeout (the host is slow) are not: a fresh
    connection would fail the same way, or take as long again.
    """
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ServerTimeoutError):
        return False
    return isinstance(exc, (
        aiohttp.ServerDisconnectedError,  # closed under us: the keep-alive race
        aiohttp.ClientConnectionResetError,  # reset, or writing to a closing transport
        aiohttp.ClientOSError,  # other socket errors on an established connection
        aiohttp.ClientResponseError,  # the head did not parse: leftover bytes in front of it
    ))


class _Attempt:
    """What one request to the host got as far as (filled in by aiohttp's tracing)."""

    __slots__ = ("head_sent", "reused")

    def __init__(self) -> None:
        self.reused = False
        self.head_sent = False


async def _on_reuse(_session: aiohttp.ClientSession, ctx: SimpleNamespace, _params: Any) -> None:
    attempt = ctx.trace_request_ctx
    if isinstance(attempt, _Attempt):
        attempt.reused = True


def host_client(limit: int, *, pooled: bool) -> aiohttp.ClientSession:
    """A session to the host service: ``pooled`` (keep-alive) or one connection per request.

    No cookie jar: the agent serves many users through one client, and a Set-Cookie from the
    host must never ride along on another user's request. aiohttp's own silent retry is off
    (it cannot be switched off by a public option, aio-libs/aiohttp#10790): it would resend on
    whatever pooled connection comes next, maybe just as stale, and on top of ours.
    """
    tracing = aiohttp.TraceConfig()
    tracing.on_connection_reuseconn.append(_on_reuse)
    connector = (aiohttp.TCPConnector(limit=limit, keepalive_timeout=30) if pooled
                 else aiohttp.TCPConnector(limit=limit, force_close=True))
    client = aiohttp.ClientSession(
        connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10),
        trace_configs=[tracing] if pooled else None,
    )
    client._retry_connection = False
    return client


def _error_head(status: int, code: str, message: str) -> tuple[dict[str, Any], bytes]:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = {"status": status, "headers": [["Content-Type", "application/json"],
                                          ["Content-Length", str(len(body))]]}
    return head, body


async def _connect_while_open(
    channel: Channel, connecting: Awaitable[aiohttp.ClientWebSocketResponse[Any]]
) -> aiohttp.ClientWebSocketResponse[Any]:
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
                await task.result().close()  # it connected just then: hang up
    return task.result()


class LocalOrigin:
    """The agent's view of its host service: one origin, never anything else."""

    def __init__(self, origin: str, client: aiohttp.ClientSession, *, max_ws_message: int,
                 fresh: aiohttp.ClientSession | None = None) -> None:
        """``client`` pools connections; ``fresh`` (default: ``client``) opens a new one per
        request, for the one retry after a pooled connection failed."""
        url = URL(origin)
        if url.scheme not in {"http", "https"} or not url.host:
            raise ValueError(f"upstream must be an http(s) origin, got {origin!r}")
        self.origin = url.origin()
        self.client = client
        self.fresh = fresh or client
        self.max_ws_message = max_ws_message

    def url_for(self, head: dict[str, Any], *, websocket: bool = False) -> URL:
        path = str(head.get("path") or "/")
        if not path.startswith("/"):
            path = "/" + path
        query = str(head.get("query") or "")
        base = self.origin
        if websocket:
            base = base.with_scheme("wss" if base.scheme == "https" else "ws")
        # The path arrives still percent-encoded: keep it byte-exact, and never let it
        # name another origin.
        if any(ord(ch) <= 0x20 or ord(ch) == 0x7F or ch == "#" for ch in path + query):
            # The relay forwards what the client sent percent-encoded; a raw space, control
            # character or fragment here would corrupt the request line to the host.
            raise ValueError("path or query holds characters that must be percent-encoded")
        raw = str(base) + path + (f"?{query}" if query else "")
        url = URL(raw, encoded=True)
        if url.origin() != base.origin():
            raise ValueError("path escapes the local origin")
        return url

    async def serve(self, channel: Channel, head: dict[str, Any]) -> None:
        try:
            if channel.kind is ChannelKind.WS:
                await self._serve_ws(channel, head)
            else:
                await self._serve_http(channel, head)
        except ChannelClosed:
            pass  # the relay ended the stream (client gone, tunnel gone)
        finally:
            channel.close(int(CloseCode.INTERNAL_ERROR), "agent stream ended")

    async def _request_body(self, channel: Channel) -> AsyncIterator[bytes]:
        while True:
            chunk = await channel.read()
            if chunk is None:
                return
            yield chunk.data
            channel.consumed(len(chunk.data))

    async def _serve_http(self, channel: Channel, head: dict[str, Any]) -> None:
        method = str(head.get("method") or "GET")
        headers = strip_hop_by_hop((str(n), str(v)) for n, v in head.get("headers") or [])
        # The OPEN's FIN says "no body". Not the stream's current state: a small body and its
        # FIN may already have arrived by the time this task runs.
        has_body = not channel.fin_on_open
        try:
            url = self.url_for(head)
        except ValueError:
            await self._send_error(channel, 400, "bad_request", "invalid path")
            return
        attempt = _Attempt()
        try:
            await self._exchange(self.client, channel, method, url, headers, has_body, attempt)
            return
        except ChannelClosed:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            if channel.closed:
                return  # the relay ended the stream (e.g. while its body was being sent)
            if not (attempt.reused and not attempt.head_sent and is_stale_connection_error(exc)
                    and retry_allowed(method, has_body)):
                await self._failed(channel, head, exc, attempt)
                return
            log.info("agent.upstream_retry", error=type(exc).__name__, method=method,
                     path=head.get("path"))
        attempt = _Attempt()
        try:
            await self._exchange(self.fresh, channel, method, url, headers, has_body, attempt)
        except ChannelClosed:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            if not channel.closed:
                await self._failed(channel, head, exc, attempt)

    async def _exchange(
        self, client: aiohttp.ClientSession, channel: Channel, method: str, url: URL,
        headers: Headers, has_body: bool, attempt: _Attempt,
    ) -> None:
        """One request to the host, its answer streamed to the relay; raises on failure."""
        async with client.request(
            method, url, headers=headers,
            data=self._request_body(channel) if has_body else None,
            allow_redirects=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            trace_request_ctx=attempt,
        ) as response:
            channel.send_head({
                "status": response.status,
                "reason": response.reason,
                "headers": [[k.decode("latin-1"), v.decode("latin-1")]
                            for k, v in response.raw_headers],
            })
            attempt.head_sent = True
            content = response.content
            while True:
                data = await content.readany()
                if not data:
                    await channel.finish()
                    break
                if content.at_eof():
                    # The last bytes carry the FIN: a small response is one DATA frame.
                    await channel.write(data, fin=True)
                    break
                await channel.write(data)

    async def _failed(self, channel: Channel, head: dict[str, Any], exc: BaseException,
                      attempt: _Attempt) -> None:
        log.info("agent.upstream_failed", error=type(exc).__name__, path=head.get("path"),
                 after_head=attempt.head_sent)
        if attempt.head_sent:
            # Mid-body: a second HEAD would break the whole tunnel; abort this stream so
            # the relay cuts the client's connection instead of ending the body cleanly.
            channel.close(int(CloseCode.INTERNAL_ERROR), "host failed mid-response")
            return
        await self._send_error(channel, 502, "host_unavailable",
                               "the host service did not answer")

    async def _send_error(self, channel: Channel, status: int, code: str, message: str) -> None:
        head, body = _error_head(status, code, message)
        channel.send_head(head)
        await channel.write(body, fin=True)

    async def _serve_ws(self, channel: Channel, head: dict[str, Any]) -> None:
        headers = strip_hop_by_hop(
            ((str(n), str(v)) for n, v in head.get("headers") or []), extra=WS_HANDSHAKE
        )
        protocols = [str(p) for p in head.get("protocols") or []]
        try:
            url = self.url_for(head, websocket=True)
            ws = await _connect_while_open(channel, self.client.ws_connect(
                url, protocols=protocols, headers=headers, autoping=True, compress=0,
                max_msg_size=self.max_ws_message, decode_text=False,
                timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
            ))
        except aiohttp.WSServerHandshakeError as exc:
            channel.send_head({"status": exc.status or 502})
            return
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.info("agent.upstream_ws_failed", error=type(exc).__name__, path=head.get("path"))
            channel.send_head({"status": 502})
            return
        channel.send_head({"status": 101, "protocol": ws.protocol})
        try:
            await bridge(ws, channel,
                         lost_code=lambda _: (int(CloseCode.GOING_AWAY), "tunnel lost"))
        finally:
            if not ws.closed:
                await ws.close()
