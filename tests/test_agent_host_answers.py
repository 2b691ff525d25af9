"""What `relay agent` sends up the tunnel for what its host service answers (docs/protocol.md
section 4.2): HEAD without hop-by-hop headers, and the CLOSE code that says how a response
ended early.

The relay is scripted (an aiohttp WebSocket server speaking frames) and the host service is a
raw TCP server writing exact bytes, so every case is the real agent against a real peer that
misbehaves in one precise way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import WSMsgType, web

from relay.protocol import frames
from relay.protocol.frames import Flags, FrameType
from tests.harness import RunningHost, abort_connections, start_agent, start_host

HOST = "acme:answers"


@dataclass
class Reply:
    """Every frame the agent sent on stream 1, until the stream ended."""

    head: dict[str, object] | None = None
    body: bytes = b""
    fin: bool = False
    close_code: int | None = None

    def header_names(self) -> set[str]:
        assert self.head is not None
        return {str(name).lower() for name, _ in self.head["headers"]}  # type: ignore[attr-defined]


@dataclass
class ScriptedRelay:
    """Sends HELLO, then one OPEN (GET /x, no body), and records the agent's reply."""

    replies: asyncio.Queue[Reply] = field(default_factory=lambda: asyncio.Queue(maxsize=8))
    host: RunningHost | None = None

    @property
    def port(self) -> int:
        assert self.host is not None
        return self.host.port

    async def _tunnel(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        await ws.send_bytes(frames.encode_json(FrameType.HELLO, 0, {
            "version": 1, "hostId": HOST, "pingIntervalS": 5, "keepaliveMisses": 2,
            "window": 262144, "maxFrame": 65536, "maxStreams": 256}))
        await ws.send_bytes(frames.encode_json(FrameType.OPEN, 1, {
            "kind": "http", "method": "GET", "path": "/x", "query": "", "headers": []},
            Flags.FIN))
        reply = Reply()
        async for message in ws:
            if message.type is not WSMsgType.BINARY:
                continue
            frame = frames.decode(message.data, 1 << 24)
            if frame.type is FrameType.PING:
                await ws.send_bytes(frames.encode_ping(FrameType.PONG, frame.payload))
            if frame.stream_id != 1:
                continue
            if frame.type is FrameType.HEAD:
                reply.head = frames.decode_json(frame)
            elif frame.type is FrameType.DATA:
                reply.body += bytes(frame.payload)
                reply.fin = bool(frame.flags & Flags.FIN)
            elif frame.type is FrameType.CLOSE:
                reply.close_code = frames.decode_close(frame)[0]
            if reply.fin or reply.close_code is not None:
                self.replies.put_nowait(reply)
                break
        async for _ in ws:  # hold the tunnel, and answer the agent's close when it leaves
            pass
        return ws

    async def start(self) -> ScriptedRelay:
        app = web.Application()
        app.router.add_get("/tunnel", self._tunnel)
        self.host = await start_host(app)
        return self

    async def stop(self) -> None:
        if self.host is not None:
            abort_connections(self.host.runner)
            await self.host.stop()


@contextlib.asynccontextmanager
async def raw_host(response: bytes) -> AsyncIterator[str]:
    """A host service that reads a request head, writes ``response`` and closes."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(response)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def agent_reply(response: bytes) -> Reply:
    relay = await ScriptedRelay().start()
    try:
        async with raw_host(response) as upstream:
            agent = await start_agent(f"ws://127.0.0.1:{relay.port}", HOST, upstream, token="t")
            try:
                return await asyncio.wait_for(relay.replies.get(), 10)
            finally:
                await agent.stop()
    finally:
        await relay.stop()


HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
              "transfer-encoding", "upgrade", "x-named-by-connection"}


@pytest.mark.parametrize("framing", [
    b"Content-Length: 2\r\n\r\nok",
    b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
], ids=["content-length", "chunked"])
async def test_head_carries_no_hop_by_hop_header(framing: bytes) -> None:
    reply = await agent_reply(
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: keep-alive, X-Named-By-Connection\r\n"
        b"X-Named-By-Connection: 1\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: h2c\r\n"
        b"X-End-To-End: kept\r\n" + framing)
    assert reply.head is not None and reply.head["status"] == 200
    names = reply.header_names()
    assert not names & HOP_BY_HOP, names & HOP_BY_HOP
    assert "x-end-to-end" in names
    assert reply.body == b"ok" and reply.fin


async def test_a_host_that_closes_mid_body_is_close_1001() -> None:
    reply = await agent_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    assert reply.head is not None and reply.head["status"] == 200
    assert reply.close_code == 1001
    assert not reply.fin and len(reply.body) <= 10


async def test_a_host_that_sends_garbage_mid_body_is_close_1011() -> None:
    reply = await agent_reply(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nnot-a-size\r\n\r\n")
    assert reply.head is not None and reply.head["status"] == 200
    assert reply.close_code == 1011
    assert not reply.fin
