"""The agent's pooled connections to the host service, against REAL misbehaving hosts.

Each host here is a raw asyncio server on 127.0.0.1 that breaks HTTP/1.1 keep-alive the way
real services do: it writes a body after a HEAD answer, or closes a kept-alive connection
(right after answering, or as the next request arrives on it: the keep-alive race lost). Every
request goes client -> real relay -> real agent -> host; the host counts what reaches it, so
"retried once" and "never replayed" are facts the host saw, not the agent's word.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from relay.config import load_config
from relay.devhost import pattern_bytes
from tests.harness import (
    RunningAgent,
    RunningRelay,
    Stack,
    start_agent,
    start_relay,
    write_config,
)

HOST = "acme:laptop"
BODY = pattern_bytes(3000)
MAX_HEAD = 16384


@dataclass
class MisbehavingHost:
    """A keep-alive HTTP/1.1 server with one deliberate fault (``mode``).

    * ``late_head_body``: a HEAD answer's body is written after its head, late: in front of the
      next answer on that connection (what a streaming route that writes on HEAD does);
    * ``head_body_same_packet``: the HEAD answer's body goes out with its head;
    * ``close_after_answer``: each connection is closed right after its first answer, without
      ``Connection: close`` (the pooled connection the client keeps is dead);
    * ``close_on_reuse``: a connection's second request is read, then the connection closed
      unanswered (the keep-alive race, lost every time);
    * ``die_after_first``: after the first answer ever, every request is read and unanswered.
    """

    mode: str
    requests: list[str] = field(default_factory=list)  # methods, in the order they arrived
    connections: int = 0
    answered: int = 0
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, method: str) -> int:
        return self.requests.count(method)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        owed = b""
        try:
            while True:
                method = await self._read_request(reader)
                if method is None:
                    return
                self.requests.append(method)
                if ((self.mode == "close_on_reuse" and served >= 1)
                        or (self.mode == "die_after_first" and self.answered >= 1)):
                    return  # unanswered: the finally closes the connection
                head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(BODY))
                if method == "HEAD" and self.mode == "late_head_body":
                    writer.write(owed + head)
                    owed = BODY
                elif method == "HEAD" and self.mode == "head_body_same_packet":
                    writer.write(head + BODY)
                else:
                    writer.write(owed + head + (b"" if method == "HEAD" else BODY))
                    owed = b""
                await writer.drain()
                served += 1
                self.answered += 1
                if self.mode == "close_after_answer":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            writer.close()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> str | None:
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (asyncio.IncompleteReadError, TimeoutError):
            return None
        if len(raw) > MAX_HEAD:
            return None
        lines = raw.decode("latin-1").split("\r\n")
        method = lines[0].split(" ", 1)[0]
        fields = {k.strip().lower(): v.strip()
                  for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if fields.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        elif int(fields.get("content-length", "0")):
            await reader.readexactly(int(fields["content-length"]))
        return method


@dataclass
class PoolStack:
    relay: RunningRelay
    host: MisbehavingHost
    agent: RunningAgent
    client: aiohttp.ClientSession

    def url(self, path: str = "/x") -> str:
        return f"{self.relay.url}/hosts/{HOST}{path}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.relay.token()}"}

    async def call(self, method: str, data: bytes | None = None) -> tuple[int, bytes]:
        async with self.client.request(method, self.url(), headers=self.auth, data=data,
                                       timeout=aiohttp.ClientTimeout(total=15)) as resp:
            return resp.status, await resp.read()


@contextlib.asynccontextmanager
async def pool_stack(tmp_path: Path, mode: str) -> AsyncIterator[PoolStack]:
    host = MisbehavingHost(mode)
    await host.start()
    relay = await start_relay(load_config(write_config(tmp_path), env={}))
    agent = await start_agent(relay.ws_url, HOST, host.url, token=relay.agent_token(HOST))
    client = aiohttp.ClientSession()
    try:
        yield PoolStack(relay, host, agent, client)
    finally:
        await client.close()
        await agent.stop()
        await relay.stop()
        await host.stop()


async def test_a_body_written_after_a_head_answer_breaks_no_later_request(
    tmp_path: Path,
) -> None:
    async with pool_stack(tmp_path, "late_head_body") as s:
        assert await s.call("HEAD") == (200, b"")
        for _ in range(4):
            assert await s.call("GET") == (200, BODY)
        # The first GET met the HEAD's leftover bytes on the pooled connection, which was
        # dropped, and was sent again once on a fresh connection: five GETs for four.
        assert s.host.count("HEAD") == 1
        assert s.host.count("GET") == 5


async def test_a_head_body_in_the_same_packet_is_dropped_with_its_connection(
    tmp_path: Path,
) -> None:
    async with pool_stack(tmp_path, "head_body_same_packet") as s:
        assert await s.call("HEAD") == (200, b"")
        for _ in range(4):
            assert await s.call("GET") == (200, BODY)
        # The HEAD's connection was dirty at once and never pooled: no GET met it.
        assert s.host.count("GET") == 4
        assert s.host.connections == 2


async def test_a_pooled_connection_closed_as_the_request_arrives_is_retried_once(
    tmp_path: Path,
) -> None:
    async with pool_stack(tmp_path, "close_on_reuse") as s:
        # The host answers one request per connection, so each request after the first meets
        # the dead connection the one before left in the pool, and is sent again, once, on a
        # fresh connection (which is then pooled, and dead for the next one).
        for method in ("GET", "HEAD", "GET", "OPTIONS", "GET", "DELETE", "GET", "GET"):
            expected = b"" if method == "HEAD" else BODY
            assert await s.call(method) == (200, expected), method
        assert s.host.answered == 8
        assert s.host.count("GET") == 1 + 2 * 4
        assert s.host.count("HEAD") == 2
        assert s.host.count("OPTIONS") == 2
        assert s.host.count("DELETE") == 2


async def test_a_connection_closed_right_after_its_answer_breaks_no_request(
    tmp_path: Path,
) -> None:
    async with pool_stack(tmp_path, "close_after_answer") as s:
        for _ in range(6):
            assert await s.call("GET") == (200, BODY)
        assert s.host.answered == 6
        assert 6 <= s.host.count("GET") <= 12  # each request sent at most twice


async def test_a_request_with_a_body_is_never_replayed(tmp_path: Path) -> None:
    async with pool_stack(tmp_path, "close_on_reuse") as s:
        assert await s.call("GET") == (200, BODY)
        status, body = await s.call("POST", b"pay once")  # meets the dead pooled connection
        assert status == 502 and b"host_unavailable" in body
        assert s.host.count("POST") == 1
        assert await s.call("GET") == (200, BODY)
        status, _ = await s.call("PUT", b"a body")  # idempotent, but its body was streamed
        assert status == 502
        assert s.host.count("PUT") == 1


async def test_a_retry_happens_once_never_twice(tmp_path: Path) -> None:
    async with pool_stack(tmp_path, "die_after_first") as s:
        assert await s.call("GET") == (200, BODY)
        status, body = await s.call("GET")  # dead pooled connection, then a dead fresh one
        assert status == 502 and b"host_unavailable" in body
        assert s.host.count("GET") == 3


# -- the sample host: HEAD answers carry no body ----------------------------------------------

@pytest.mark.parametrize("path", ["/bytes/5000", "/bytes/5000?chunked=1", "/drip/5000",
                                  "/sse?count=3&interval=0"])
async def test_devhost_writes_no_body_on_head(full_stack: Stack, path: str) -> None:
    """Pipelined on one raw socket: the HEAD answer's head is followed directly by the next
    answer, with not one byte of body in between."""
    reader, writer = await asyncio.open_connection("127.0.0.1", full_stack.host.port)
    try:
        writer.write(f"HEAD {path} HTTP/1.1\r\nHost: h\r\n\r\n"
                     "GET /small?size=7 HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        await writer.drain()
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert first.startswith(b"HTTP/1.1 200")
        second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert second.startswith(b"HTTP/1.1 200"), second[:80]
        assert await asyncio.wait_for(reader.readexactly(7), 5) == b"x" * 7
    finally:
        writer.close()


async def test_head_then_gets_through_relay_and_agent_to_the_devhost(full_stack: Stack) -> None:
    """The report this fixes: HEAD on a streaming route, then GETs, all succeed."""
    for _ in range(2):
        async with full_stack.client.head(full_stack.url("/bytes/200000?chunked=1"),
                                          headers=full_stack.auth()) as resp:
            assert resp.status == 200
            assert await resp.read() == b""
    for _ in range(4):
        async with full_stack.client.get(full_stack.url("/bytes/20000"),
                                         headers=full_stack.auth()) as resp:
            assert resp.status == 200
            assert await resp.read() == pattern_bytes(20000)
