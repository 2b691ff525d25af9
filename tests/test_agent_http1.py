"""The agent's pooled HTTP/1.1 client against real (and misbehaving) origins on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from relay.agent.http1 import (
    READ_HIGH_WATER,
    ConnectFailed,
    OriginConnectionLost,
    OriginPool,
    OriginResponse,
)
from tests.harness import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Origin"], Awaitable[None]]


class Origin:
    """A raw TCP origin whose handler writes exactly the bytes a test wants."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        self.requests.append(head)
        return head

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # The test is over and its server is closing: this handler's task ends here, so
            # asyncio has no cancelled connection task to complain about.
            pass
        finally:
            writer.close()


@asynccontextmanager
async def origin(handler: Handler) -> AsyncIterator[tuple[Origin, OriginPool]]:
    server_side = Origin(handler)
    port = free_port()
    server = await asyncio.start_server(server_side._serve, "127.0.0.1", port)
    pool = OriginPool("127.0.0.1", port, idle_timeout_s=5)
    try:
        yield server_side, pool
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def body_of(response: OriginResponse) -> bytes:
    async with response:
        parts = []
        while chunk := await response.read():
            parts.append(chunk)
        return b"".join(parts)


def answer(body: bytes, *extra: str) -> bytes:
    head = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def keep_alive_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        o: Origin) -> None:
    while (head := await o.read_request(reader)) is not None:
        method = head.split(b" ", 1)[0]
        if method == b"POST":
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            data = await reader.readexactly(length)
            writer.write(answer(data))
        else:
            writer.write(answer(b"hello " + head.split(b" ")[1]))
        await writer.drain()


async def test_sequential_requests_share_one_kept_alive_connection() -> None:
    async with origin(keep_alive_ok) as (o, pool):
        for i in range(5):
            response = await pool.request("GET", f"/n/{i}", [("Accept", "*/*")])
            assert response.status == 200 and response.reason == "OK"
            assert await body_of(response) == f"hello /n/{i}".encode()
        assert o.connections == 1
        assert o.requests[0].startswith(b"GET /n/0 HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"Accept: */*" in o.requests[0]
        assert pool.idle_connections == 1


async def test_request_body_streams_with_a_declared_length_or_chunked() -> None:
    received: list[bytes] = []

    async def echo_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           o: Origin) -> None:
        head = await o.read_request(reader)
        assert head is not None and b"transfer-encoding: chunked" in head.lower()
        data = b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            data += chunk[:-2]
        received.append(data)
        writer.write(answer(b"got it"))
        await writer.drain()

    async def parts() -> AsyncIterator[bytes]:
        for piece in (b"abc", b"", b"def" * 1000):
            yield piece

    async with origin(echo_chunked) as (_o, pool):
        response = await pool.request("POST", "/up", [], parts())
        assert await body_of(response) == b"got it"
    assert received == [b"abc" + b"def" * 1000]

    async with origin(keep_alive_ok) as (_o, pool):
        async def exact() -> AsyncIterator[bytes]:
            yield b"12345"

        response = await pool.request("POST", "/up", [("Content-Length", "5")], exact())
        assert await body_of(response) == b"12345"


async def test_a_body_after_a_head_answer_makes_the_connection_dirty_not_the_next_answer() -> None:
    async def head_with_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             o: Origin) -> None:
        while (head := await o.read_request(reader)) is not None:
            if head.startswith(b"HEAD"):
                writer.write(answer(b"a body HEAD must not have"))  # the host's bug
            else:
                writer.write(answer(b"real answer"))
            await writer.drain()

    async with origin(head_with_body) as (o, pool):
        response = await pool.request("HEAD", "/stream", [])
        assert response.status == 200
        assert await body_of(response) == b""
        for _ in range(4):
            response = await pool.request("GET", "/x", [])
            assert await body_of(response) == b"real answer"
        # The dirty connection was dropped; the GETs found a clean one.
        assert o.connections >= 2


async def test_an_idle_connection_the_origin_closed_leaves_the_pool() -> None:
    async def one_answer_per_connection(reader: asyncio.StreamReader,
                                        writer: asyncio.StreamWriter, o: Origin) -> None:
        await o.read_request(reader)
        writer.write(answer(b"once"))  # keep-alive implied, then the origin hangs up
        await writer.drain()

    async with origin(one_answer_per_connection) as (o, pool):
        assert await body_of(await pool.request("GET", "/a", [])) == b"once"
        async with asyncio.timeout(5):
            while pool.idle_connections:  # noqa: ASYNC110 - polls the pool, bounded
                await asyncio.sleep(0.01)
        assert await body_of(await pool.request("GET", "/b", [])) == b"once"
        assert o.connections == 2 and len(o.requests) == 2


async def test_idle_connections_are_closed_after_the_idle_timeout() -> None:
    closed_by_us: list[int] = []

    async def serve_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              o: Origin) -> None:
        await keep_alive_ok(reader, writer, o)
        closed_by_us.append(1)  # the pool hung up: the origin read EOF

    async with origin(serve_until_eof) as (o, pool):
        # Long enough that a loaded machine cannot expire the first connection before the
        # second one is idle too (the count of 2 below); short enough to keep the test quick.
        pool.idle_timeout_s = 0.5
        first, second = await asyncio.gather(pool.request("GET", "/a", []),
                                             pool.request("GET", "/b", []))
        assert await body_of(first) == b"hello /a"
        # Released later than the first: the sweep that ends the first must come back for it.
        await asyncio.sleep(0.05)
        assert await body_of(second) == b"hello /b"
        assert pool.idle_connections == 2
        async with asyncio.timeout(5):
            while len(closed_by_us) < 2:  # noqa: ASYNC110 - polls the origin, bounded
                await asyncio.sleep(0.01)
        assert pool.idle_connections == 0
        # The pool still serves (on a new connection) and expires that one too.
        assert await body_of(await pool.request("GET", "/c", [])) == b"hello /c"
        assert o.connections == 3
        async with asyncio.timeout(5):
            while len(closed_by_us) < 3:  # noqa: ASYNC110 - polls the origin, bounded
                await asyncio.sleep(0.01)


async def test_a_request_with_a_body_is_never_replayed() -> None:
    gate = asyncio.Event()

    async def hang_up_on_the_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                    o: Origin) -> None:
        await o.read_request(reader)
        writer.write(answer(b"first"))
        await writer.drain()
        await gate.wait()
        await o.read_request(reader)  # the POST's head: then the origin hangs up unanswered

    async def body() -> AsyncIterator[bytes]:
        yield b"xy"

    async with origin(hang_up_on_the_second) as (o, pool):
        assert await body_of(await pool.request("GET", "/1", [])) == b"first"
        gate.set()
        with pytest.raises(OriginConnectionLost) as lost:
            await pool.request("POST", "/p", [("Content-Length", "2")], body())
        assert lost.value.before_head and lost.value.reused
        assert [r.split(b" ")[0] for r in o.requests] == [b"GET", b"POST"]
        assert o.connections == 1


async def test_stale_connection_found_after_the_request_was_written_is_replayed() -> None:
    """The origin closes a kept-alive connection just as the next request goes out."""
    gate = asyncio.Event()

    async def close_after_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                o: Origin) -> None:
        if o.connections == 1:
            await o.read_request(reader)
            writer.write(answer(b"first"))
            await writer.drain()
            await gate.wait()
            head = await o.read_request(reader)  # read the next request, then hang up
            assert head is not None
            return
        await keep_alive_ok(reader, writer, o)

    async with origin(close_after_first) as (o, pool):
        assert await body_of(await pool.request("GET", "/1", [])) == b"first"
        gate.set()
        assert await body_of(await pool.request("GET", "/2", [])) == b"hello /2"
        assert o.connections == 2 and [r.split(b" ")[1] for r in o.requests] == [
            b"/1", b"/2", b"/2"]


async def test_informational_answers_are_skipped_and_bodiless_statuses_end_at_the_head() -> None:
    async def varied(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     o: Origin) -> None:
        while (head := await o.read_request(reader)) is not None:
            path = head.split(b" ")[1]
            if path == b"/continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"after 100"))
            elif path == b"/204":
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif path == b"/304":
                writer.write(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n')
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            await writer.drain()

    async with origin(varied) as (o, pool):
        response = await pool.request("GET", "/continue", [])
        assert response.status == 200 and await body_of(response) == b"after 100"
        response = await pool.request("GET", "/204", [])
        assert response.status == 204 and await body_of(response) == b""
        response = await pool.request("GET", "/304", [])
        assert response.status == 304 and ("ETag", '"v1"') in response.headers
        assert await body_of(response) == b""
        response = await pool.request("GET", "/chunked", [])
        assert await body_of(response) == b"hello world"
        assert o.connections == 1


async def test_a_body_without_length_runs_to_the_end_of_the_connection() -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          o: Origin) -> None:
        await o.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()

    async with origin(until_close) as (_o, pool):
        response = await pool.request("GET", "/", [])
        assert await body_of(response) == b"all of it"
        assert pool.idle_connections == 0


async def test_a_slow_reader_pauses_the_origin_instead_of_buffering() -> None:
    size = 16 * 1024 * 1024
    written = [0]  # blocks the origin got through

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  o: Origin) -> None:
        await o.read_request(reader)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        block = b"x" * 65536
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
            written[0] += 1

    async with origin(big) as (_o, pool):
        response = await pool.request("GET", "/big", [])
        async with response:
            assert len(await response.read()) > 0
            # Nobody reads: the origin ends up paused (no block written for 50 ms), and all
            # along the client holds at most its high-water mark.
            still, last = 0, -1
            async with asyncio.timeout(5):
                while still < 5:
                    await asyncio.sleep(0.01)
                    assert response._conn._body_bytes <= READ_HIGH_WATER + 256 * 1024
                    still, last = (still + 1, last) if written[0] == last else (0, written[0])
            assert written[0] < size // 65536
            total = 0
            while chunk := await response.read():
                total += len(chunk)
        assert total > size - 256 * 1024


async def test_an_early_answer_ends_an_unfinished_upload_and_drops_the_connection() -> None:
    async def refuse_upload(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            o: Origin) -> None:
        while await o.read_request(reader) is not None:
            writer.write(answer(b"too large", "Connection: keep-alive"))
            await writer.drain()

    forever = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        yield b"start"
        await forever.wait()
        yield b"never"

    async with origin(refuse_upload) as (o, pool):
        response = await pool.request("POST", "/up", [], endless())
        assert await body_of(response) == b"too large"
        assert pool.idle_connections == 0
        assert await body_of(await pool.request("GET", "/next", [])) == b"too large"
        assert o.connections == 2


async def test_connect_failures_and_bad_targets_are_clear() -> None:
    pool = OriginPool("127.0.0.1", free_port(), connect_timeout_s=2)
    with pytest.raises(ConnectFailed, match=r"cannot connect to 127\.0\.0\.1"):
        await pool.request("GET", "/", [])
    with pytest.raises(ValueError):
        await pool.request("GET", "/a b", [])
    with pytest.raises(ValueError):
        await pool.request("GET", "http://elsewhere/", [])
    await pool.close()
