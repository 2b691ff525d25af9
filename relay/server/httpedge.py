"""The HTTP/1.1 connection edge: request-head timeout, parser refusals as JSON, 413 without reading.

aiohttp's ``RequestHandler`` has an idle keep-alive timer (``keepalive_timeout``) but no
request-head timeout: a client trickling one header line every few seconds keeps a connection
and its parser buffer forever (slowloris). Its parser refusals are plain text that can echo up
to 100 bytes of the offending line (a token, say) and are logged at error level with a
traceback. And after a handler answered without reading the body, it reads and discards the
rest for ``lingering_time``, which at loopback speed is gigabytes. :class:`EdgeProtocol` is a
thin subclass that fixes those three at the connection, where they happen; everything else is
aiohttp's. It reads a few of ``RequestHandler``'s private attributes (the message queue, the
waiter, the upgrade flags): tests/test_edge_abuse.py pins the behaviour, so an aiohttp upgrade
that moves them fails loudly there rather than quietly in production.

What the peer sees, modelled on nginx:

- head not complete within ``server.header_timeout_s``: ``408 request_timeout`` (JSON) and the
  connection closed; a connection that sent nothing at all is just closed (a browser's
  preconnected socket must not read a stray 408 as the answer to its next request).
- head over the limits: ``431 headers_too_large`` / ``414 uri_too_long``; other malformed
  heads: ``400 bad_request``. One info-level ``http.parse_refused`` event each.
- a refused body (413): the answer is written, the write side is shut (FIN), reading stops so
  the client's sends stall on a full window, and the socket is dropped after a short grace.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from relay.config import Config
from relay.errors import (
    BadRequest,
    HeadersTooLarge,
    RelayError,
    RequestTimeout,
    UriTooLong,
)

log = structlog.get_logger("relay.edge")

# nginx's default request-line limit (large_client_header_buffers 8k); longer answers 414.
MAX_REQUEST_LINE_BYTES = 8190
# aiohttp's default; more header fields answer 431.
MAX_HEADER_COUNT = 128
# After a refused body: how long the client has to read the answer before the socket goes.
REFUSED_BODY_GRACE_S = 2.0


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    header_timeout_s: float = 10.0
    max_header_bytes: int = 16384
    refused_body_grace_s: float = REFUSED_BODY_GRACE_S

    @property
    def max_head_bytes(self) -> int:
        """The whole head: request line plus header fields (and their line endings)."""
        return MAX_REQUEST_LINE_BYTES + self.max_header_bytes + 2 * MAX_HEADER_COUNT


def edge_limits(config: Config) -> EdgeLimits:
    return EdgeLimits(header_timeout_s=config.server.header_timeout_s,
                      max_header_bytes=config.server.max_header_bytes)


def parser_args(limits: EdgeLimits) -> dict[str, Any]:
    """aiohttp's parser limits (``handler_args``), matched to the refusals below."""
    return {
        "max_line_size": MAX_REQUEST_LINE_BYTES,
        "max_field_size": limits.max_header_bytes,
        "max_headers": MAX_HEADER_COUNT,
    }


def refusal_for(exc: BaseException | None, limits: EdgeLimits) -> RelayError:
    """The JSON error for one of aiohttp's parser exceptions; never echoes the request bytes."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == MAX_REQUEST_LINE_BYTES and limit != limits.max_header_bytes:
            return UriTooLong(f"request line exceeds {MAX_REQUEST_LINE_BYTES} bytes")
        return HeadersTooLarge(f"a header field exceeds {limits.max_header_bytes} bytes")
    if isinstance(exc, BadHttpMessage) and "too many headers" in exc.message.lower():
        return HeadersTooLarge(f"more than {MAX_HEADER_COUNT} header fields")
    if isinstance(exc, BadStatusLine):  # BadHttpMethod included
        return BadRequest("malformed request line")
    if isinstance(exc, InvalidURLError):
        return BadRequest("malformed URL")
    if isinstance(exc, InvalidHeader):
        return BadRequest("malformed header field")
    if isinstance(exc, HttpProcessingError):
        # llhttp's messages are "<fixed description>:\n\n  <the bytes>": keep the description,
        # never the bytes (a token may be among them).
        description, sep, _ = exc.message.partition(":\n")
        if sep and description.isprintable() and len(description) <= 80:
            return BadRequest(f"malformed request: {description}")
    return BadRequest("malformed request")


def reason_class(exc: BaseException | None) -> str:
    return type(exc).__name__ if exc is not None else "unknown"


def raw_response(error: RelayError) -> bytes:
    """A complete ``Connection: close`` answer, for writing where there is no request object."""
    body = json.dumps(error.to_json()).encode()
    phrase = HTTPStatus(error.status).phrase
    head = (f"HTTP/1.1 {error.status} {phrase}\r\nContent-Type: application/json; charset=utf-8"
            f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + body


class EdgeProtocol(RequestHandler):
    def __init__(self, manager: web.Server, *, edge: EdgeLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._edge = edge
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = 0.0
        self._head_bytes = 0
        self._refuse_body = False
        self._drop_timer: asyncio.TimerHandle | None = None

    # -------------------------------------------------------------- request-head timeout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()  # a new connection must send its first head in time too

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_head_timer()
        if self._drop_timer is not None:
            self._drop_timer.cancel()
            self._drop_timer = None
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        # Between requests: aiohttp's loop awaits the next parsed message. While a handler runs
        # (a body streaming in) or after an upgrade, bytes are not a head.
        return (self._waiter is not None and not self._messages and not self._upgraded
                and self._payload_parser is None)

    def _arm_head_timer(self) -> None:
        self._head_started = self._loop.time()
        self._head_bytes = 0
        self._head_timer = self._loop.call_at(
            self._head_started + self._edge.header_timeout_s, self._head_timed_out
        )

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        if self._head_timer is None and data and self._waiting_for_head():
            self._arm_head_timer()  # the first byte of the next request on a kept-alive socket
        if self._head_timer is not None:
            self._head_bytes += len(data)
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._disarm_head_timer()  # a head arrived whole (or was refused by the parser)
        elif self._head_timer is not None and self._head_bytes > self._edge.max_head_bytes:
            # The parser bounds each line and the field count, not the head as a whole.
            self._refuse_head(HeadersTooLarge(), "head_too_large")

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or self._force_close:
            return
        if not self._waiting_for_head():
            return  # a message is being handled (it raced the timer): not a slow head
        if self._head_bytes == 0:
            log.debug("http.idle_connection_closed", peer=self._peer())
            self.force_close()
            return
        self._refuse_head(RequestTimeout(), "head_timeout")

    def _refuse_head(self, error: RelayError, reason: str) -> None:
        elapsed = self._loop.time() - self._head_started
        log.info("http.parse_refused", status=error.status, code=str(error.code), reason=reason,
                 peer=self._peer(), head_bytes=self._head_bytes, elapsed_s=round(elapsed, 3))
        self._disarm_head_timer()
        transport = self.transport
        if transport is not None:
            transport.write(raw_response(error))
        self.force_close()  # nothing more is read; close() flushes the answer first

    def _peer(self) -> str:
        peer = self.peername
        return str(peer[0]) if isinstance(peer, tuple) else str(peer or "")

    # -------------------------------------------------------------- parser refusals

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's error answers, made ours: JSON, and an info line for a client's fault."""
        if isinstance(exc, HttpProcessingError):
            error: RelayError = refusal_for(exc, self._edge)
            # Deliberately no exc_info and no message: aiohttp's message quotes the bytes.
            log.info("http.parse_refused", status=error.status, code=str(error.code),
                     reason=reason_class(exc), peer=self._peer())
        elif status == 504:
            # A TimeoutError escaped a handler: every wait of ours is bounded and mapped, so
            # this is a bug worth seeing, but not a traceback per request.
            log.warning("http.handler_timed_out", peer=self._peer())
            error = RelayError("the request handler timed out")
            error.status = 504
        else:
            # A bug in a handler, not the client's fault: this one deserves the traceback.
            log.error("http.handler_failed", status=status, exc_info=exc)
            error = RelayError()
            error.status = status
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error answer")
        response = web.json_response(error.to_json(), status=error.status)
        response.force_close()
        return response

    # -------------------------------------------------------------- handing the socket over

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """Give up the connection (an upgraded tunnel the relay serves itself): returns its
        transport and what the peer sent after the upgrade request. From here aiohttp holds
        no reference to the transport, never writes to or closes it, and its server no longer
        lists the connection (nor waits for it at shutdown); the request being handled ends
        with its handler (``start()`` sees ``_force_close`` and leaves its loop).

        What ``connection_lost`` would have released is released here, without touching the
        transport: the new protocol gets that callback, this one never will.
        """
        transport = self.transport
        if transport is None or self._manager is None:
            raise ConnectionResetError("the connection is already gone")
        tail, self._message_tail = self._message_tail, b""
        self._disarm_head_timer()
        if self._drop_timer is not None:
            self._drop_timer.cancel()
            self._drop_timer = None
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        self._manager._connections.pop(self, None)
        self._manager = None  # a stray connection_lost is a no-op now
        self._force_close = True  # start() leaves its loop once this request is done
        self.transport = None  # force_close() and friends check it before closing
        self._parser = None
        self._payload_parser = None
        if not transport.is_reading():  # paused for aiohttp's own buffers
            transport.resume_reading()
        return transport, tail

    # -------------------------------------------------------------- 413 without reading

    def refuse_body(self) -> None:
        """After this request's answer, close without reading the rest of its body."""
        self._refuse_body = True

    async def finish_response(self, request: BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        if self._refuse_body and self.transport is not None:
            transport = self.transport
            # Stop aiohttp's loop from reading and discarding the body ("lingering"): it would
            # read gigabytes. _force_close is how aiohttp itself skips lingering; setting it
            # without closing keeps the socket open while the answer drains.
            self._force_close = True
            transport.pause_reading()
            if transport.can_write_eof():
                transport.write_eof()  # FIN after the answer: the client knows it is over
            # Dropping the socket at once, with unread bytes, would send a RST that can destroy
            # the answer in flight; the client gets a moment to read it.
            self._drop_timer = self._loop.call_later(self._edge.refused_body_grace_s,
                                                     transport.abort)
        return result


def close_without_reading(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Close the connection after ``response`` (``Connection: close``), the body left unread."""
    response.force_close()
    protocol = request.protocol
    if isinstance(protocol, EdgeProtocol):
        protocol.refuse_body()


class EdgeServer(web.Server):
    """aiohttp's low-level server, creating :class:`EdgeProtocol` connections."""

    def __init__(self, *args: Any, edge: EdgeLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.edge = edge

    def __call__(self) -> RequestHandler:
        return EdgeProtocol(self, loop=self._loop, edge=self.edge, **self._kwargs)
