"""A fast bench host service: raw asyncio protocol HTTP/1.1 + WebSocket echo on uvloop.

It stands where a desktop's local service stands behind an agent, but costs next to nothing per
request so the bench measures the relay, not the host. Routes:

- ``GET /small``: a 1 KiB body (keep-alive);
- ``GET /bytes/<n>``: ``n`` bytes with a Content-Length, written in large blocks while the
  transport takes them (``pause_writing``/``resume_writing`` give the backpressure);
- ``GET /ws``: WebSocket echo (every data frame sent back as it came, pings answered);
- anything else: 404.

Run: ``python -m bench.fasthost --port 3000``. Not a general HTTP server: no request bodies
beyond a Content-Length, no chunked requests, one request at a time per connection (pipelined
requests wait their turn).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from typing import cast

from bench import wsframes

SMALL_BODY = b"x" * 1024
SMALL_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1024\r\n\r\n"
    + SMALL_BODY
)
NOT_FOUND = (
    b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\n"
    b"not found\n"
)
BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
    b"Connection: close\r\n\r\nbad request\n"
)
# Downloads are sliced out of one pre-built block: no per-request allocation of body bytes.
BLOCK_SIZE = 256 * 1024
BLOCK = bytes((i * 7 + 13) % 256 for i in range(251)) * (BLOCK_SIZE // 251 + 1)
BLOCK = BLOCK[:BLOCK_SIZE]
MAX_HEAD = 64 * 1024
WRITE_HIGH = 1 << 20
WRITE_LOW = 256 * 1024


class HostProtocol(asyncio.Protocol):
    """One client connection: HTTP/1.1 requests until it upgrades to a WebSocket."""

    __slots__ = ("buf", "close_after", "paused", "remaining", "transport", "ws")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.paused = False
        self.remaining = 0  # bytes of the current download still to write
        self.close_after = False
        self.ws = False

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.ws:
            self._ws_frames()
        elif not self.remaining:
            self._requests()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.remaining:
            self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self.remaining = 0
        self.transport = None

    # -- HTTP ----------------------------------------------------------------------------------
    def _requests(self) -> None:
        transport = self.transport
        buf = self.buf
        while transport is not None and not self.remaining and not self.ws:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    transport.write(BAD_REQUEST)
                    transport.close()
                return
            lines = bytes(buf[:end]).split(b"\r\n")
            parts = lines[0].split(b" ")
            if len(parts) != 3:
                transport.write(BAD_REQUEST)
                transport.close()
                return
            method, target, version = parts
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            body_len = int(headers.get(b"content-length", b"0") or 0)
            if len(buf) < end + 4 + body_len:
                return  # the request body has not all arrived yet
            del buf[:end + 4 + body_len]
            connection = headers.get(b"connection", b"").lower()
            self.close_after = b"close" in connection or (
                version == b"HTTP/1.0" and b"keep-alive" not in connection
            )
            self._route(method, target, headers)
            if self.close_after and not self.remaining and self.transport is not None:
                self.transport.close()
                return

    def _route(self, method: bytes, target: bytes, headers: dict[bytes, bytes]) -> None:
        assert self.transport is not None
        path = target.split(b"?", 1)[0]
        if path == b"/small":
            self.transport.write(SMALL_RESPONSE)
        elif path.startswith(b"/bytes/") and path[7:].isdigit():
            size = int(path[7:])
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\n\r\n" % size
            )
            self.remaining = size
            self._pump()
        elif path == b"/ws" and headers.get(b"upgrade", b"").lower() == b"websocket":
            key = headers.get(b"sec-websocket-key")
            if not key:
                self.transport.write(BAD_REQUEST)
                self.transport.close()
                return
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                + wsframes.accept_key(key).encode() + b"\r\n\r\n"
            )
            self.ws = True
            self._ws_frames()
        else:
            self.transport.write(NOT_FOUND)

    def _pump(self) -> None:
        """Write the current download while the transport takes it."""
        transport = self.transport
        while self.remaining and not self.paused and transport is not None:
            if self.remaining >= BLOCK_SIZE:
                transport.write(BLOCK)
                self.remaining -= BLOCK_SIZE
            else:
                transport.write(BLOCK[:self.remaining])
                self.remaining = 0
        if not self.remaining and transport is not None:
            if self.close_after:
                transport.close()
            elif self.buf:
                self._requests()

    # -- WebSocket -----------------------------------------------------------------------------
    def _ws_frames(self) -> None:
        transport = self.transport
        if transport is None:
            return
        out: list[bytes] = []
        for first, payload in wsframes.parse(self.buf):
            opcode = first & 0x0F
            if opcode == wsframes.OP_CLOSE:
                code = wsframes.close_code(payload) or 1000
                out.append(wsframes.frame(wsframes.OP_CLOSE, wsframes.close_payload(code)))
                transport.writelines(out)
                transport.close()
                return
            if opcode == wsframes.OP_PING:
                out.append(wsframes.frame(wsframes.OP_PONG, payload))
            elif opcode != wsframes.OP_PONG:
                out.append(wsframes.frame(opcode, payload, fin=bool(first & 0x80)))
        if len(out) == 1:
            transport.write(out[0])
        elif out:
            transport.writelines(out)


async def serve(host: str, port: int) -> None:
    """Listen until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(HostProtocol, host, port, backlog=4096, reuse_address=True)
    print(f"fasthost listening on http://{host}:{port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()


def main() -> int:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a relay dependency on Linux
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
