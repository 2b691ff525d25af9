"""A lean pooled HTTP/1.1 client for the agent's one origin, over llhttp (httptools).

The agent talks to exactly one local origin, so aiohttp's general client machinery (sessions,
URL joining, cookie jars, tracing hooks, redirects, per-request timers) was most of its CPU per
request. This keeps what the agent needs: keep-alive connections to that origin, streaming
request and response bodies with back-pressure both ways, and a clear verdict on connections
that misbehave, so a request on a pooled connection that turns out dead or dirty can be
retried once on a fresh one.

A connection is *dirty*, and is never reused, when the origin sends bytes it was not asked for:
a body on a HEAD answer, anything after the end of a response, or bytes while idle. llhttp
cannot be told that a response has no body (HEAD), so for HEAD the head is framed here (up to
the blank line) and fed to the parser alone.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import cast

import httptools
import structlog

__all__ = [
    "ConnectFailed",
    "ExchangeFailed",
    "OriginConnectionLost",
    "OriginError",
    "OriginPool",
    "OriginResponse",
    "ResponseInvalid",
]

# Bytes of response body held before reading from the origin pauses (back-pressure).
READ_HIGH_WATER = 256 * 1024
READ_LOW_WATER = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

log = structlog.get_logger("relay.agent")


class OriginError(Exception):
    """The origin could not be reached or answered badly."""


class ConnectFailed(OriginError):
    """No TCP (or TLS) connection to the origin."""


class ExchangeFailed(OriginError):
    """A connection failed its exchange: it closed, or sent what is not the response.

    ``before_head`` with ``reused`` is the stale or dirty pooled connection: the origin had
    closed a kept-alive connection, or stray bytes from an earlier answer came first, and the
    request itself never got an answer.
    """

    def __init__(self, message: str, *, before_head: bool, reused: bool) -> None:
        super().__init__(message)
        self.before_head = before_head
        self.reused = reused


class OriginConnectionLost(ExchangeFailed):
    """The connection ended before the response was complete."""


class ResponseInvalid(ExchangeFailed):
    """The origin's bytes are not a valid HTTP/1.1 response."""


@dataclass(slots=True)  # not frozen: a frozen __init__ costs a setattr call per field
class ResponseHead:
    status: int
    reason: str
    headers: list[tuple[str, str]]


class _Connection(asyncio.Protocol):
    """One keep-alive connection; serves one exchange at a time."""

    __slots__ = (
        "_body", "_body_bytes", "_complete", "_drain", "_error", "_head", "_head_buffer",
        "_head_waiter", "_headers", "_idle", "_keep_alive", "_lost", "_parser", "_pool",
        "_reading_paused", "_reason", "_skip_body", "_waiter", "dirty", "exchanges",
        "idle_since", "transport",
    )

    def __init__(self, pool: OriginPool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._lost: BaseException | None = None
        self._drain: asyncio.Future[None] | None = None
        self.dirty = False
        self.exchanges = 0  # responses completed on this connection
        self.idle_since = 0.0  # loop time it last went back to the pool
        self._idle = True
        # Reused by every exchange: a connection is only reused once its body was drained.
        self._body: collections.deque[bytes] = collections.deque()
        self._head_buffer = bytearray()
        self._reset_exchange(skip_body=False)

    def _reset_exchange(self, *, skip_body: bool) -> None:
        self._skip_body = skip_body
        if skip_body:
            self._head_buffer = bytearray()
        self._reason = ""
        self._headers: list[tuple[str, str]] = []
        self._head: ResponseHead | None = None
        self._head_waiter: asyncio.Future[ResponseHead] | None = None
        self._body.clear()
        self._body_bytes = 0
        self._complete = False
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._error: OriginError | None = None
        self._keep_alive = False

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they are one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._idle or self._complete:
            # Nobody asked: a body after a HEAD answer, a second response, noise.
            self._mark_dirty()
            return
        if self._skip_body:
            self._feed_head_only(data)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(self._invalid("the origin switched protocols on a plain request"))
        except httptools.HttpParserError as exc:
            self._fail(self._invalid(f"invalid response from the origin: {exc}"))

    def _feed_head_only(self, data: bytes) -> None:
        """HEAD: hand llhttp the head alone; any byte after it makes the connection dirty."""
        self._head_buffer += data
        while self._head is None:
            end = self._head_buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head_buffer) > MAX_HEAD_BYTES:
                    self._fail(self._invalid("the origin's response head is too large"))
                return
            head, rest = bytes(self._head_buffer[:end + 4]), self._head_buffer[end + 4:]
            self._head_buffer = bytearray(rest)
            try:
                self._parser.feed_data(head)
            except httptools.HttpParserError as exc:
                self._fail(self._invalid(f"invalid response from the origin: {exc}"))
                return
        # The parser still expects the body the headers announced: the next exchange gets a
        # fresh one.
        self._parser = httptools.HttpResponseParser(self)
        if self._head_buffer:
            self._mark_dirty()
        self._finish_message()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionResetError("the origin closed the connection")
        if not self._idle and not self._complete and self._head is not None and not (
            self._has_length()
        ):
            # No Content-Length and not chunked: the body ran to the end of the connection.
            self._finish_message()
        self._wake_drain()
        if not self._idle and not self._complete:
            self._fail(self._lost_error())
        self._pool._forget(self)

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake_drain()

    # -- llhttp callbacks ----------------------------------------------------------------------
    def on_status(self, status: bytes) -> None:
        self._reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # Informational (100 Continue, 103 Early Hints): the real answer follows.
            self._headers, self._reason = [], ""
            return
        self._head = ResponseHead(status, self._reason, self._headers)
        # Read now: llhttp resets the flags it is computed from once the message completes.
        self._keep_alive = self._parser.should_keep_alive()
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(self._head)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._body_bytes += len(body)
        if self._body_bytes > READ_HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._head is None:
            return  # the end of an informational response
        self._finish_message()

    # -- the exchange --------------------------------------------------------------------------
    def _finish_message(self) -> None:
        self._complete = True
        self._wake()

    def _has_length(self) -> bool:
        assert self._head is not None
        for name, value in self._head.headers:
            lowered = name.lower()
            if lowered == "content-length" or (
                lowered == "transfer-encoding" and "chunked" in value.lower()
            ):
                return True
        return self._head.status in (204, 304)

    def _mark_dirty(self) -> None:
        self.dirty = True
        if self.transport is not None:
            self.transport.close()

    def _lost_error(self) -> OriginConnectionLost:
        before_head = self._head is None
        return OriginConnectionLost(
            "the origin closed the connection" + (" before answering" if before_head else
                                                  " mid-response"),
            before_head=before_head, reused=self.exchanges > 0)

    def _invalid(self, message: str) -> ResponseInvalid:
        return ResponseInvalid(message, before_head=self._head is None,
                               reused=self.exchanges > 0)

    def _fail(self, error: OriginError) -> None:
        """The exchange is over: the first error is the one the reader gets."""
        self.dirty = True
        if self._error is None:
            self._error = error
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(self._error)
        self._wake()
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drain(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    @property
    def usable(self) -> bool:
        return self._lost is None and not self.dirty and self.transport is not None and (
            not self.transport.is_closing())

    def start(self, head: bytes, *, skip_body: bool) -> None:
        self._reset_exchange(skip_body=skip_body)
        self._idle = False
        assert self.transport is not None
        self.transport.write(head)

    async def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._lost is not None:
            raise self._lost_error()
        assert self.transport is not None
        self.transport.write(data)
        if self._drain is not None:
            await self._drain

    async def read_head(self) -> ResponseHead:
        if self._head is not None:
            return self._head
        if self._error is not None:
            raise self._error
        if self._lost is not None:
            raise self._lost_error()
        self._head_waiter = asyncio.get_running_loop().create_future()
        return await self._head_waiter

    async def read(self) -> bytes:
        """The next body bytes, b"" at the end of the body."""
        while True:
            if self._body:
                data = self._body.popleft()
                self._body_bytes -= len(data)
                if self._reading_paused and self._body_bytes <= READ_LOW_WATER:
                    self._reading_paused = False
                    if self.transport is not None and not self.transport.is_closing():
                        self.transport.resume_reading()
                return data
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            if self._lost is not None:
                raise self._lost_error()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    @property
    def body_complete(self) -> bool:
        return self._complete and not self._body

    def finished(self) -> bool:
        """Whether the exchange ended cleanly and the connection may serve another."""
        self._idle = True
        if not self._complete or self._body:
            return False
        self.exchanges += 1
        return self.usable and self._keep_alive

    def close(self) -> None:
        self._idle = True
        if self.transport is not None:
            self.transport.abort()


class OriginResponse:
    """A response being read; release it (``async with``) to return or drop its connection."""

    __slots__ = ("_conn", "_done", "_pool", "_upload", "head")

    def __init__(self, pool: OriginPool, conn: _Connection, head: ResponseHead,
                 upload: asyncio.Task[None] | None) -> None:
        self._pool, self._conn, self.head = pool, conn, head
        # The request body may still be going out (the origin answered early): it is this
        # response's to finish or cancel.
        self._upload = upload
        self._done = False

    @property
    def status(self) -> int:
        return self.head.status

    @property
    def reason(self) -> str:
        return self.head.reason

    @property
    def headers(self) -> list[tuple[str, str]]:
        return self.head.headers

    async def read(self) -> bytes:
        """The next bytes of the body as they arrive; b"" once it is complete."""
        return await self._conn.read()

    @property
    def at_eof(self) -> bool:
        """True when everything the origin sent has been read (nothing more will come)."""
        return self._conn.body_complete

    def release(self) -> None:
        if self._done:
            return
        self._done = True
        upload = self._upload
        if upload is not None and not (upload.done() and not upload.cancelled()
                                       and upload.exception() is None):
            upload.cancel()
            self._conn.close()  # half a request body went out: never reuse it
        self._pool._release(self._conn)

    async def __aenter__(self) -> OriginResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class OriginPool:
    """Keep-alive connections to one ``http(s)://host:port`` origin."""

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                 max_idle: int = 64, idle_timeout_s: float = 30.0,
                 connect_timeout_s: float = 10.0) -> None:
        self.host, self.port, self.ssl_context = host, port, ssl_context
        self.max_idle = max_idle
        self.idle_timeout_s = idle_timeout_s
        self.connect_timeout_s = connect_timeout_s
        default_port = 443 if ssl_context is not None else 80
        self.host_header = host if port == default_port else f"{host}:{port}"
        if ":" in host and not host.startswith("["):
            self.host_header = f"[{host}]" + ("" if port == default_port else f":{port}")
        # Oldest release first (connections are taken from the end), so the ones the idle
        # timeout ends are always a prefix; one sweep timer serves them all instead of a timer
        # armed and cancelled per request.
        self._idle: list[_Connection] = []
        self._sweep: asyncio.TimerHandle | None = None
        self._open: set[_Connection] = set()
        self._closed = False

    # -- connections ---------------------------------------------------------------------------
    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _transport, conn = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self.ssl_context,
                    server_hostname=self.host if self.ssl_context is not None else None)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (
                type(exc).__name__)
            raise ConnectFailed(f"cannot connect to {self.host_header}: {reason}") from exc
        self._open.add(conn)
        return conn

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection) -> None:
        if self._closed or not conn.finished() or len(self._idle) >= self.max_idle:
            conn.close()
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        self._idle.append(conn)
        if self._sweep is None:
            self._sweep = loop.call_at(conn.idle_since + self.idle_timeout_s, self._expire)

    def _expire(self) -> None:
        """Close the connections idle for ``idle_timeout_s``; come back for the next one."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() - self.idle_timeout_s
        expired = 0
        for conn in self._idle:
            if conn.idle_since > deadline:
                break
            expired += 1
        stale, self._idle[:expired] = self._idle[:expired], []
        for conn in stale:
            conn.close()
        if self._idle and not self._closed:
            self._sweep = loop.call_at(self._idle[0].idle_since + self.idle_timeout_s,
                                       self._expire)

    def _forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._open):
            conn.close()
        self._idle.clear()

    # -- requests ------------------------------------------------------------------------------
    def _head_bytes(self, method: str, target: str, headers: Iterable[tuple[str, str]],
                    framing: str) -> bytes:
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers]
        if framing:
            lines.append(framing + "\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    async def request(self, method: str, target: str, headers: list[tuple[str, str]],
                      body: AsyncIterator[bytes] | None = None, *,
                      retry_idempotent: bool = True) -> OriginResponse:
        """Send a request and return once the response head is in.

        ``headers`` must be free of hop-by-hop fields and Host; framing is chosen here: the
        caller's Content-Length is kept, otherwise a body is sent chunked. An idempotent
        request without a body that meets a stale pooled connection before any answer is
        sent once more on a fresh connection.
        """
        if " " in target or "\r" in target or "\n" in target or not target.startswith("/"):
            raise ValueError("request target must be an origin-form path")
        framing = ""
        if body is not None and not any(n.lower() == "content-length" for n, _ in headers):
            framing = "Transfer-Encoding: chunked"
        head = self._head_bytes(method, target, headers, framing)
        replayable = retry_idempotent and body is None and method in IDEMPOTENT
        conn = self._take_idle() or await self._connect()
        try:
            return await self._exchange(conn, method, head, body, framing)
        except ExchangeFailed as exc:
            if not (replayable and exc.before_head and exc.reused):
                raise
            log.info("agent.upstream_retry", error=type(exc).__name__, method=method)
        conn = await self._connect()
        return await self._exchange(conn, method, head, body, framing)

    async def _exchange(self, conn: _Connection, method: str, head: bytes,
                        body: AsyncIterator[bytes] | None, framing: str) -> OriginResponse:
        conn.start(head, skip_body=method == "HEAD")
        upload: asyncio.Task[None] | None = None
        try:
            if body is not None:
                upload = asyncio.ensure_future(self._send_body(conn, body, chunked=bool(framing)))
                # The origin may answer before the body is done (an early 413, say): whichever
                # comes first, the head is what the caller waits for.
                head_task = asyncio.ensure_future(conn.read_head())
                done, _ = await asyncio.wait({upload, head_task},
                                             return_when=asyncio.FIRST_COMPLETED)
                if upload in done and upload.exception() is not None and not head_task.done():
                    head_task.cancel()
                    upload.result()
                response_head = await head_task
            else:
                response_head = await conn.read_head()
        except BaseException:
            if upload is not None and not upload.done():
                upload.cancel()
            conn.close()
            raise
        return OriginResponse(self, conn, response_head, upload)

    async def _send_body(self, conn: _Connection, body: AsyncIterator[bytes], *,
                         chunked: bool) -> None:
        async for data in body:
            if not data:
                continue
            if chunked:
                await conn.write(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                await conn.write(data)
        if chunked:
            await conn.write(b"0\r\n\r\n")
