"""Load generator processes for the bench: downloads, a slow reader, WebSocket echo, idle tunnels,
and W6's hostile clients (idle channels held open, an agent flooding PINGs).

Each subcommand runs in its own process (``python -m bench.loadgen <cmd> ...``) so the client
side is spread over processes and never shares an interpreter with what it measures. Protocol
with the parent (bench/run.py): JSON lines on stdout. Workers that take part in a synchronised
start print ``{"ready": ...}``, wait for a ``go`` line on stdin, run, and print their result;
every wait is bounded by ``--deadline`` seconds, after which the worker exits by itself.

The clients speak raw HTTP/1.1 and RFC 6455 over plain sockets so they cost far less per
request than the relay does: the bench measures the relay, not the load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import os
import resource
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

from bench import wsframes

RECV_BUF = 1 << 20
TUNNEL_HEADER = struct.Struct("!BBI")
FRAME_HELLO = 0x01
FRAME_PING = 0x07
FRAME_PONG = 0x08
FRAME_DRAIN = 0x09


def emit(obj: dict[str, Any]) -> None:
    """One JSON line to the parent."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class StdinCommands:
    """Lines from the parent, read by a daemon thread (never blocks the interpreter's exit)."""

    def __init__(self) -> None:
        self._lines: collections.deque[str] = collections.deque()
        self._cond = threading.Condition()
        self.eof = False
        thread = threading.Thread(target=self._read, name="stdin", daemon=True)
        thread.start()

    def _read(self) -> None:
        for line in sys.stdin:
            with self._cond:
                self._lines.append(line.strip())
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def wait(self, timeout: float) -> str | None:
        """The next line, or None on EOF or timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._lines and not self.eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._lines.popleft() if self._lines else None


# -- HTTP over a plain socket ----------------------------------------------------------------


class HttpConn:
    """One keep-alive HTTP/1.1 connection that reads bodies into a reused buffer."""

    def __init__(self, url: str, token: str, *, rcvbuf: int | None = None,
                 timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.token = token
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.sock.connect((self.host, self.port))
        self.buf = bytearray(RECV_BUF)
        self.view = memoryview(self.buf)
        self.pending = bytearray()

    def send_get(self) -> None:
        auth = f"Authorization: Bearer {self.token}\r\n" if self.token else ""
        request = f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{auth}\r\n"
        self.sock.sendall(request.encode())

    def read_head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed before the response head")
            self.pending += chunk
        end = self.pending.index(b"\r\n\r\n")
        lines = bytes(self.pending[:end]).decode("latin-1").split("\r\n")
        del self.pending[:end + 4]
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    def read_exact(self, size: int, sink: Callable[[int], None] | None = None) -> int:
        """Read and discard ``size`` body bytes; returns how many arrived."""
        got = 0
        if self.pending:
            take = min(size, len(self.pending))
            del self.pending[:take]
            got += take
        while got < size:
            n = self.sock.recv_into(self.view, min(RECV_BUF, size - got))
            if not n:
                break
            got += n
            if sink is not None:
                sink(n)
        return got

    def _read_line(self) -> bytes:
        while b"\r\n" not in self.pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed inside a chunked body")
            self.pending += chunk
        end = self.pending.index(b"\r\n")
        line = bytes(self.pending[:end])
        del self.pending[:end + 2]
        return line

    def read_body(self, headers: dict[str, str]) -> int:
        if "content-length" in headers:
            return self.read_exact(int(headers["content-length"]))
        if "chunked" in headers.get("transfer-encoding", "").lower():
            total = 0
            while True:
                size = int(self._read_line().split(b";")[0], 16)
                if size == 0:
                    while self._read_line():
                        pass
                    return total
                total += self.read_exact(size)
                self.read_exact(2)
        total = 0
        while True:  # read to close
            n = self.read_exact(RECV_BUF)
            total += n
            if n < RECV_BUF:
                return total

    def get(self) -> tuple[int, int]:
        self.send_get()
        status, headers = self.read_head()
        return status, self.read_body(headers)

    def abort(self) -> None:
        """Close with a reset, the way a client that gives up does."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def cmd_download(args: argparse.Namespace) -> int:
    """``rounds`` downloads of ``url`` one after another on one connection, after ``go``."""
    commands = StdinCommands()
    conn = HttpConn(args.url, args.token, timeout=args.deadline)
    emit({"ready": True})
    if commands.wait(args.deadline) != "go":
        return 1
    results = []
    for _ in range(args.rounds):
        start = time.monotonic()
        status, size = conn.get()
        results.append([start, time.monotonic(), size, status])
    emit({"downloads": results})
    conn.abort()
    return 0


def cmd_slowread(args: argparse.Namespace) -> int:
    """Read one large download at ``rate`` bytes/s through a small receive buffer, then hang up."""
    conn = HttpConn(args.url, args.token, rcvbuf=args.rcvbuf, timeout=args.deadline)
    conn.send_get()
    status, _headers = conn.read_head()
    start = time.monotonic()
    got = len(conn.pending)
    conn.pending.clear()
    piece = min(args.rcvbuf, RECV_BUF)
    while (elapsed := time.monotonic() - start) < args.duration:
        ahead = got - args.rate * elapsed
        if ahead > 0:
            time.sleep(min(ahead / args.rate, 0.1))
            continue
        n = conn.sock.recv_into(conn.view, piece)
        if not n:
            break
        got += n
    seconds = time.monotonic() - start
    conn.abort()
    emit({"status": status, "bytes": got, "seconds": seconds})
    return 0


# -- WebSocket over asyncio protocols ----------------------------------------------------------


def handshake_request(url: str, token: str, extra: str = "") -> tuple[str, int, bytes]:
    """Host, port and the HTTP upgrade request for a ``ws://`` URL."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {wsframes.new_key()}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{auth}{extra}\r\n"
    )
    return host, port, request.encode()


class WsClient(asyncio.Protocol):
    """A client WebSocket: handshake, then whole messages to ``on_message``.

    Outgoing frames are masked with one key per connection, so a fixed message can be framed
    once and sent many times (the server cannot tell; RFC 6455 wants a fresh key per frame
    only to protect intermediaries, and there are none on loopback).
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.mask = os.urandom(4)
        self.buf = bytearray()
        self.partial: list[bytes] = []
        self.partial_op = 0
        self.handshaken = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.handshaken:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status_line = bytes(self.buf[:self.buf.find(b"\r\n")])
            del self.buf[:end + 4]
            if b" 101 " not in status_line + b" ":
                self._finish(-int(status_line.split(b" ")[1]) if b" " in status_line else -1)
                return
            self.handshaken = True
            if not self.opened.done():
                self.opened.set_result(None)
        for first, payload in wsframes.parse(self.buf):
            opcode = first & 0x0F
            if opcode == wsframes.OP_CLOSE:
                code = wsframes.close_code(payload)
                self.send(wsframes.OP_CLOSE, wsframes.close_payload(code or 1000))
                self._finish(code)
                return
            if opcode == wsframes.OP_PING:
                self.send(wsframes.OP_PONG, payload)
            elif opcode == wsframes.OP_PONG:
                continue
            elif first & 0x80 and not self.partial:
                self.on_message(opcode, payload)
            else:
                if opcode != wsframes.OP_CONT:
                    self.partial_op = opcode
                self.partial.append(payload)
                if first & 0x80:
                    whole = b"".join(self.partial)
                    self.partial.clear()
                    self.on_message(self.partial_op, whole)

    def send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(wsframes.frame(opcode, payload, mask=self.mask))

    def on_message(self, opcode: int, payload: bytes) -> None:
        """Override: one whole data message arrived."""

    def _finish(self, code: int | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"refused: {code}"))
            self.opened.exception()
        if not self.closed.done():
            self.closed.set_result(code)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(None)
        self.transport = None


class EchoClient(WsClient):
    """Ping-pong one fixed binary message; record each round trip's latency in microseconds."""

    def __init__(self, request: bytes, size: int) -> None:
        super().__init__(request)
        self.payload = os.urandom(size)
        self.wire = wsframes.frame(wsframes.OP_BINARY, self.payload, mask=self.mask)
        self.sent_at = 0.0
        self.measure_from = float("inf")
        self.stop_at = float("inf")
        self.latencies: collections.Counter[int] = collections.Counter()
        self.count = 0
        self.bad = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def start(self, measure_from: float, stop_at: float) -> None:
        self.measure_from, self.stop_at = measure_from, stop_at
        self._send_next(time.perf_counter())

    def _send_next(self, now: float) -> None:
        assert self.transport is not None
        self.sent_at = now
        self.transport.write(self.wire)

    def on_message(self, opcode: int, payload: bytes) -> None:
        now = time.perf_counter()
        if len(payload) != len(self.payload):
            self.bad += 1
        if self.sent_at >= self.measure_from:
            self.count += 1
            self.latencies[int((now - self.sent_at) * 1e6)] += 1
        if now < self.stop_at and self.transport is not None:
            self._send_next(now)
        elif not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.done.done():
            self.done.set_result(None)


async def _wsecho(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    commands = StdinCommands()
    clients: list[EchoClient] = []
    for _ in range(args.channels):
        host, port, request = handshake_request(args.url, args.token)
        _, client = await asyncio.wait_for(
            loop.create_connection(functools.partial(EchoClient, request, args.size), host, port),
            10,
        )
        await asyncio.wait_for(client.opened, 10)
        clients.append(client)
    emit({"ready": True})
    line = await loop.run_in_executor(None, commands.wait, args.deadline)
    if line != "go":
        return 1
    now = time.perf_counter()
    measure_from, stop_at = now + args.warmup, now + args.warmup + args.duration
    for client in clients:
        client.start(measure_from, stop_at)
    await asyncio.wait_for(asyncio.gather(*(c.done for c in clients)),
                           args.warmup + args.duration + 10)
    merged: collections.Counter[int] = collections.Counter()
    for client in clients:
        merged.update(client.latencies)
    emit({
        "count": sum(c.count for c in clients),
        "seconds": args.duration,
        "bad": sum(c.bad for c in clients),
        "closed": sum(1 for c in clients if c.closed.done()),
        "latency_us": {str(k): v for k, v in merged.items()},
    })
    for client in clients:
        client.send(wsframes.OP_CLOSE, wsframes.close_payload(1000))
    await asyncio.sleep(0.05)
    return 0


class IdleTunnel(WsClient):
    """An agent that only keeps its tunnel alive: answers PING frames, nothing else."""

    def __init__(self, request: bytes) -> None:
        super().__init__(request)
        self.hello: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pings = 0

    def on_message(self, opcode: int, payload: bytes) -> None:
        if opcode != wsframes.OP_BINARY or len(payload) < TUNNEL_HEADER.size:
            return
        ftype = payload[0]
        if ftype == FRAME_PING:
            self.pings += 1
            self.send(wsframes.OP_BINARY,
                      TUNNEL_HEADER.pack(FRAME_PONG, 0, 0) + payload[TUNNEL_HEADER.size:])
        elif ftype == FRAME_HELLO and not self.hello.done():
            self.hello.set_result(None)


async def _tunnels(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    commands = StdinCommands()
    tunnels: list[IdleTunnel] = []
    errors: collections.Counter[str] = collections.Counter()
    gate = asyncio.Semaphore(args.concurrency)

    async def open_one(index: int) -> None:
        url = f"{args.url.rstrip('/')}/tunnel?hostId={args.org}:{args.prefix}-{index}&v=1"
        host, port, request = handshake_request(url, args.token)
        async with gate:
            try:
                _, tunnel = await asyncio.wait_for(
                    loop.create_connection(functools.partial(IdleTunnel, request), host, port),
                    30)
                tunnels.append(tunnel)
                await asyncio.wait_for(tunnel.opened, 30)
                await asyncio.wait_for(asyncio.shield(tunnel.hello), 30)
            except (OSError, TimeoutError, ConnectionError) as exc:
                errors[type(exc).__name__ + ":" + str(exc)[:60]] += 1

    started = time.monotonic()
    await asyncio.gather(*(open_one(i) for i in range(args.start, args.start + args.count)))
    live = sum(1 for t in tunnels if t.hello.done() and not t.closed.done())
    emit({"ready": live, "failed": args.count - live, "errors": dict(errors),
          "seconds": round(time.monotonic() - started, 3)})
    await loop.run_in_executor(None, commands.wait, args.deadline)
    codes = collections.Counter(str(t.closed.result()) for t in tunnels
                                if t.closed.done() and not t.closed.cancelled())
    emit({"closed_early": dict(codes), "pings": sum(t.pings for t in tunnels)})
    for tunnel in tunnels:
        if tunnel.transport is not None:
            tunnel.transport.abort()
    return 0


class IdleChannel(WsClient):
    """A hostile client's WebSocket channel to a host: opened, then never used (W6)."""


async def _idlechannels(args: argparse.Namespace) -> int:
    """Hold ``--count`` idle WebSocket channels to one host until told to stop (W6)."""
    loop = asyncio.get_running_loop()
    commands = StdinCommands()
    channels: list[IdleChannel] = []
    errors: collections.Counter[str] = collections.Counter()
    gate = asyncio.Semaphore(args.concurrency)

    async def open_one() -> None:
        host, port, request = handshake_request(args.url, args.token)
        async with gate:
            try:
                _, channel = await asyncio.wait_for(
                    loop.create_connection(functools.partial(IdleChannel, request), host, port),
                    30)
                channels.append(channel)
                await asyncio.wait_for(asyncio.shield(channel.opened), 30)
            except (OSError, TimeoutError, ConnectionError) as exc:
                errors[type(exc).__name__ + ":" + str(exc)[:60]] += 1

    await asyncio.gather(*(open_one() for _ in range(args.count)))
    # Accepted then closed (a refusal is a close code on an accepted socket) is not held.
    held = sum(1 for c in channels if c.opened.done() and not c.opened.exception()
               and not c.closed.done())
    emit({"ready": held, "errors": dict(errors)})
    await loop.run_in_executor(None, commands.wait, args.deadline)
    codes = collections.Counter(str(c.closed.result()) for c in channels
                                if c.closed.done() and not c.closed.cancelled())
    emit({"held": sum(1 for c in channels if not c.closed.done()), "closed": dict(codes)})
    for channel in channels:
        if channel.transport is not None:
            channel.transport.abort()
    return 0


class PingFlooder(WsClient):
    """A hostile agent: registers a tunnel, then sends PINGs as fast as the socket takes them
    and never reads a PONG (it stops reading after the HELLO)."""

    def __init__(self, request: bytes, frame: bytes) -> None:
        super().__init__(request)
        self.frame = frame
        self.sent = 0
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.hello: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(self, opcode: int, payload: bytes) -> None:
        if (opcode == wsframes.OP_BINARY and payload[:1] == bytes([FRAME_HELLO])
                and not self.hello.done()):
            self.hello.set_result(None)
            if self.transport is not None:
                self.transport.pause_reading()  # never read a PONG again

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    async def flood(self, until: float) -> None:
        while time.monotonic() < until and not self.closed.done():
            try:
                await asyncio.wait_for(self.can_write.wait(), max(0.01, until - time.monotonic()))
            except TimeoutError:
                return
            self.send(wsframes.OP_BINARY, self.frame)
            self.sent += 1
            await asyncio.sleep(0)


async def _pingflood(args: argparse.Namespace) -> int:
    """One agent flooding ``--size``-byte PINGs for ``--duration`` s, reconnecting when cut (W6)."""
    loop = asyncio.get_running_loop()
    commands = StdinCommands()
    url = f"{args.url.rstrip('/')}/tunnel?hostId={args.host_id}&v=1"
    payload = TUNNEL_HEADER.pack(FRAME_PING, 0, 0) + os.urandom(args.size)
    emit({"ready": True})
    line = await loop.run_in_executor(None, commands.wait, args.deadline)
    if line != "go":
        return 1
    until = time.monotonic() + args.duration
    sent = connects = refused = 0
    codes: collections.Counter[str] = collections.Counter()
    while time.monotonic() < until:
        host, port, request = handshake_request(url, args.token)
        try:
            _, flooder = await asyncio.wait_for(loop.create_connection(
                functools.partial(PingFlooder, request, payload), host, port), 10)
            # A refusal is a close before HELLO: try again at once, as an attacker would, rather
            # than wait out a HELLO that never comes.
            either: list[asyncio.Future[Any]] = [flooder.hello, flooder.closed]
            await asyncio.wait_for(asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED), 10)
        except (OSError, TimeoutError, ConnectionError) as exc:
            codes[type(exc).__name__] += 1
            await asyncio.sleep(0.2)
            continue
        if not flooder.hello.done():
            refused += 1
            codes[f"refused {flooder.closed.result()}"] += 1
            continue
        connects += 1
        await flooder.flood(until)
        sent += flooder.sent
        if flooder.closed.done():
            code = flooder.closed.result()
            codes["cut without a close frame" if code is None else str(code)] += 1
        elif flooder.transport is not None:
            flooder.transport.abort()
    emit({"pings_sent": sent, "connects": connects, "refused": refused, "closes": dict(codes)})
    return 0


def _run_async(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return int(asyncio.run(coro))
    return int(uvloop.run(coro))


def main() -> int:
    """Dispatch a subcommand."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", required=True)
    common.add_argument("--token", default=os.environ.get("RELAY_BENCH_TOKEN", ""),
                        help="bearer token (default: $RELAY_BENCH_TOKEN)")
    common.add_argument("--deadline", type=float, default=120.0, help="longest wait for anything")

    p = sub.add_parser("download", parents=[common])
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("slowread", parents=[common])
    p.add_argument("--rate", type=float, default=1.5e6, help="bytes per second")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rcvbuf", type=int, default=16384)
    p = sub.add_parser("wsecho", parents=[common])
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p = sub.add_parser("tunnels", parents=[common])
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--start", type=int, default=0, help="first host index")
    p.add_argument("--org", default="acme")
    p.add_argument("--prefix", default="idle")
    p.add_argument("--concurrency", type=int, default=64)
    p = sub.add_parser("idlechannels", parents=[common])
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=64)
    p = sub.add_parser("pingflood", parents=[common])
    p.add_argument("--host-id", required=True)
    p.add_argument("--size", type=int, default=64 * 1024, help="PING payload bytes")
    p.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    raise_nofile()
    if args.cmd == "download":
        return cmd_download(args)
    if args.cmd == "slowread":
        return cmd_slowread(args)
    if args.cmd == "wsecho":
        return _run_async(_wsecho(args))
    if args.cmd == "idlechannels":
        return _run_async(_idlechannels(args))
    if args.cmd == "pingflood":
        return _run_async(_pingflood(args))
    return _run_async(_tunnels(args))


if __name__ == "__main__":
    sys.exit(main())
