"""docs/protocol.md, rule by rule, against a real relay.

The "agent" here is a hand-written WebSocket client (tests/rawws.py) sending frames packed with
``struct`` from the document's tables; nothing of the relay's own codec, messages or session is
used to speak to it, so each test checks the relay against the document, not against itself.
Clients are real HTTP and WebSocket clients on loopback. Section numbers are the document's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.config import load_config
from relay.server.drain import drain
from tests.docs import REPO, table_under
from tests.harness import RunningRelay, eventually, start_relay, write_config
from tests.rawhttp import RawClient
from tests.rawws import BINARY, CLOSE, TEXT, Message, RawWebSocket

PROTOCOL_DOC = (REPO / "docs" / "protocol.md").read_text()

# Section 2: the frame header and the type and flag numbers, as the document writes them.
HEADER = struct.Struct("!BBI")
HELLO, OPEN, HEAD, DATA, WINDOW, CLOSE_F, PING, PONG, DRAIN, RENEW, RENEWED = range(1, 12)
FIN, TEXT_F, MORE = 0x01, 0x02, 0x04
MAX_STREAM_ID = 2**31 - 1  # section 4.1: ids are 31-bit
WS_FRAME_COST = 64  # section 5
HOST = "acme:conform"


def frame(ftype: int, stream: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(ftype, flags, stream) + payload


def jframe(ftype: int, stream: int, body: Any, flags: int = 0) -> bytes:
    return frame(ftype, stream, json.dumps(body).encode(), flags)


def close_frame(stream: int, code: int, reason: bytes = b"") -> bytes:
    return frame(CLOSE_F, stream, struct.pack("!H", code) + reason)


def window_frame(stream: int, increment: int) -> bytes:
    return frame(WINDOW, stream, struct.pack("!I", increment))


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    flags: int
    stream: int
    payload: bytes

    def json(self) -> Any:
        return json.loads(self.payload)

    @property
    def close(self) -> tuple[int, bytes]:
        return struct.unpack("!H", self.payload[:2])[0], self.payload[2:]


class Agent:
    """A tunnel peer driven frame by frame. A reader task answers the relay's PINGs (unless
    told not to) and queues every other frame for the test, boundedly."""

    def __init__(self, ws: RawWebSocket, *, answer_pings: bool) -> None:
        self.ws = ws
        self.answer_pings = answer_pings
        self.frames: asyncio.Queue[Frame | None] = asyncio.Queue(maxsize=4096)
        self.close_message: Message | None = None
        self.hello: dict[str, Any] = {}
        self.raw_hello = b""
        self._reader = asyncio.ensure_future(self._read())
        self._reader.set_name("conformance-agent-reader")

    @classmethod
    async def connect(cls, relay: RunningRelay, *, host_id: str = HOST, v: str | None = "1",
                      answer_pings: bool = True, wait_hello: bool = True) -> Agent:
        target = f"/tunnel?hostId={host_id}" + (f"&v={v}" if v is not None else "")
        ws = await RawWebSocket.connect(
            relay.config.server.port, target,
            {"Authorization": f"Bearer {relay.agent_token(host_id)}"})
        agent = cls(ws, answer_pings=answer_pings)
        if wait_hello:
            hello = await agent.expect(HELLO)
            assert hello.stream == 0 and hello.flags == 0
            agent.raw_hello, agent.hello = hello.payload, hello.json()
        return agent

    async def _read(self) -> None:
        try:
            while True:
                message = await self.ws.receive(within=3600)
                if message.opcode == CLOSE:
                    self.close_message = message
                    with contextlib.suppress(Exception):
                        await self.ws.send_frame(CLOSE, message.data[:2])
                    return
                assert message.opcode == BINARY, "the relay sent a non-binary tunnel message"
                ftype, flags, stream = HEADER.unpack_from(message.data)
                got = Frame(ftype, flags, stream, message.data[HEADER.size:])
                if ftype == PING and self.answer_pings:
                    await self.send(frame(PONG, 0, got.payload))
                    continue
                self.frames.put_nowait(got)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                self.frames.put_nowait(None)

    async def send(self, *frames: bytes) -> None:
        """Frames in one write, so the relay reads them together."""
        await self.ws.send_raw(b"".join(self.ws.encode(BINARY, data) for data in frames))

    async def next(self, within: float = 5.0, *, skip: tuple[int, ...] = (PING, PONG)) -> Frame:
        async with asyncio.timeout(within):
            while True:
                got = await self.frames.get()
                if got is None:
                    self.frames.put_nowait(None)
                    raise AssertionError(f"the tunnel closed: {self.closed_with()}")
                if got.type not in skip:
                    return got

    async def expect(self, ftype: int, within: float = 5.0, **kwargs: Any) -> Frame:
        got = await self.next(within, **kwargs)
        assert got.type == ftype, f"expected type {ftype}, got {got}"
        return got

    def closed_with(self) -> tuple[int | None, bytes] | None:
        if self.close_message is None:
            return None
        return self.close_message.close_code, self.close_message.close_reason

    async def wait_closed(self, within: float = 5.0) -> tuple[int | None, bytes]:
        """The relay's close of the tunnel: code and reason."""
        await asyncio.wait_for(asyncio.shield(self._reader), within)
        assert self.close_message is not None, "the connection ended without a close frame"
        return self.close_message.close_code, self.close_message.close_reason

    async def is_alive(self) -> bool:
        """Still served: a PING of ours is answered with its PONG."""
        probe = os.urandom(8)
        await self.send(frame(PING, 0, probe))
        while True:
            got = await self.next(skip=(PING,))
            if got.type == PONG and got.payload == probe:
                return True

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader
        self.ws.abort()


@contextlib.asynccontextmanager
async def relay_with(tmp_path: Path, **tunnel: Any) -> AsyncIterator[RunningRelay]:
    sections: dict[str, dict[str, Any]] = {"tunnel": tunnel} if tunnel else {}
    relay = await start_relay(load_config(write_config(tmp_path, sections), env={}))
    try:
        yield relay
    finally:
        await relay.stop()


@contextlib.asynccontextmanager
async def agent_and_client(tmp_path: Path, **tunnel: Any
                           ) -> AsyncIterator[tuple[Agent, Client]]:
    """A relay with these tunnel settings, an agent on it and a client of it."""
    async with relay_with(tmp_path, **tunnel) as relay:
        agent = await Agent.connect(relay)
        client = Client(relay)
        try:
            yield agent, client
        finally:
            await client.close()
            await agent.close()


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[RunningRelay]:
    async with relay_with(tmp_path) as running:
        yield running


@pytest.fixture
async def agent(relay: RunningRelay) -> AsyncIterator[Agent]:
    connected = await Agent.connect(relay)
    await eventually(lambda: relay.state.registry.get(HOST) is not None)
    yield connected
    await connected.close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class Client:
    """HTTP requests to the host through the relay, each a task the test owns."""

    def __init__(self, relay: RunningRelay) -> None:
        self.relay = relay
        self.session = aiohttp.ClientSession(auto_decompress=False)
        self.tasks: list[asyncio.Task[Answer]] = []

    def request(self, method: str = "GET", path: str = "/x", **kwargs: Any
                ) -> asyncio.Task[Answer]:
        async def run() -> Answer:
            async with self.session.request(
                method, f"{self.relay.url}/hosts/{HOST}{path}",
                headers={"Authorization": f"Bearer {self.relay.token()}"},
                timeout=aiohttp.ClientTimeout(total=10), **kwargs,
            ) as resp:
                return Answer(resp.status, dict(resp.headers), await resp.read())

        task = asyncio.ensure_future(run())
        self.tasks.append(task)
        return task

    async def raw(self) -> RawClient:
        return await RawClient.connect(self.relay.config.server.port)

    def auth_line(self) -> str:
        return f"Authorization: Bearer {self.relay.token()}\r\n"

    async def websocket(self, path: str = "/ws", headers: dict[str, str] | None = None
                        ) -> RawWebSocket:
        return await RawWebSocket.connect(
            self.relay.config.server.port, f"/hosts/{HOST}{path}",
            {"Authorization": f"Bearer {self.relay.token()}", **(headers or {})})

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task
        await self.session.close()


@pytest.fixture
async def client(relay: RunningRelay) -> AsyncIterator[Client]:
    running = Client(relay)
    yield running
    await running.close()


async def answer_ok(agent: Agent, stream: int, body: bytes = b"ok",
                    headers: list[list[str]] | None = None) -> None:
    await agent.send(jframe(HEAD, stream, {"status": 200, "headers": headers or [
        ["Content-Type", "text/plain"], ["Content-Length", str(len(body))]]}),
        frame(DATA, stream, body, FIN))


async def assert_json_502(task: asyncio.Task[Answer]) -> None:
    answer = await asyncio.wait_for(task, 10)
    assert answer.status == 502, answer
    assert answer.headers["Content-Type"].startswith("application/json")
    assert json.loads(answer.body)["error"]["code"] == "tunnel_closed"


PROTOCOL_ERROR = 1002


# -- 1. Connecting, 3.1 HELLO ------------------------------------------------------------------

def documented_hello_defaults() -> dict[str, Any]:
    """Section 3.1's table: field -> default (a number, or the relay's own for the timeouts)."""
    out: dict[str, Any] = {}
    for row in table_under(PROTOCOL_DOC, "3.1 HELLO (relay → agent)"):
        name, default = row["field"].strip("`"), row["default"]
        if (match := re.fullmatch(r"none \(the reference relay's default is (\d+)\)", default)):
            out[name] = int(match.group(1))
        elif re.fullmatch(r"\d+", default):
            out[name] = int(default)
    return out


async def test_hello_announces_every_setting_and_the_documented_defaults_are_the_relays(
    tmp_path: Path,
) -> None:
    documented = documented_hello_defaults()
    assert set(documented) >= {"version", "window", "maxFrame", "maxStreams", "pingIntervalS",
                               "keepaliveMisses", "maxWsMessage", "openTimeoutS",
                               "requestTimeoutS"}
    # A relay on its defaults (the test harness shortens the timers: undo that).
    async with relay_with(tmp_path, ping_interval_s=10, request_timeout_s=120,
                          open_timeout_s=10) as relay:
        agent = await Agent.connect(relay)
        try:
            hello = agent.hello
            for name, value in documented.items():
                assert hello[name] == value, name
                # Senders write plain integers: 10, never 10.0.
                assert type(hello[name]) is int, (name, agent.raw_hello)
            assert hello["hostId"] == HOST
            assert "renew" not in hello and "expiresAt" not in hello  # version 1
        finally:
            await agent.close()


async def test_hello_carries_the_relays_configured_settings(relay: RunningRelay) -> None:
    agent = await Agent.connect(relay)  # the harness: 1 s pings, 5 s requests, 3 s opens
    try:
        assert (agent.hello["pingIntervalS"], agent.hello["requestTimeoutS"],
                agent.hello["openTimeoutS"]) == (1, 5, 3)
    finally:
        await agent.close()


@pytest.mark.parametrize(("offered", "version"), [
    (None, 1), ("", 1), ("1", 1), ("1,2", 2), ("2,1,9", 2), ("x,1", 1), ("%202%20", 2)])
async def test_the_relay_picks_the_highest_common_version(
    relay: RunningRelay, offered: str | None, version: int,
) -> None:
    agent = await Agent.connect(relay, v=offered)
    try:
        assert agent.hello["version"] == version
        assert agent.hello.get("renew", False) is (version >= 2)
        assert ("expiresAt" in agent.hello) is (version >= 2)
    finally:
        await agent.close()


async def test_no_common_version_is_4400_naming_the_versions_spoken(relay: RunningRelay) -> None:
    agent = await Agent.connect(relay, v="9", wait_hello=False)
    try:
        code, reason = await agent.wait_closed()
        assert code == 4400 and b"v=1,2" in reason
        assert agent.frames.get_nowait() is None  # no HELLO came first
    finally:
        await agent.close()


async def test_a_text_message_on_the_tunnel_is_1002(agent: Agent) -> None:
    await agent.ws.send_text("hello?")
    assert (await agent.wait_closed())[0] == PROTOCOL_ERROR


# -- 2.2 Which frame is valid where -----------------------------------------------------------

CONNECTION_LEVEL_VIOLATIONS: dict[str, tuple[str, bytes]] = {
    "unknown type": ("1", frame(0x0C, 0)),
    "unknown type 0": ("1", frame(0x00, 0)),
    "unknown flag on PING": ("1", frame(PING, 0, b"x", 0x08)),
    "FIN on PING": ("1", frame(PING, 0, b"x", FIN)),
    "FIN on PONG": ("1", frame(PONG, 0, b"x", FIN)),
    "shorter than a header": ("1", b"\x07\x00\x00"),
    "PING on a stream": ("1", frame(PING, 1, b"x")),
    "WINDOW on stream 0": ("1", window_frame(0, 10)),
    "DATA on stream 0": ("1", frame(DATA, 0, b"x")),
    "CLOSE on stream 0": ("1", close_frame(0, 1000)),
    "DATA for a stream never opened": ("1", frame(DATA, 7, b"x")),
    "HEAD for a stream never opened": ("1", jframe(HEAD, 9, {"status": 200})),
    "HEAD on an even stream": ("1", jframe(HEAD, 2, {"status": 200})),
    "WINDOW for a stream never opened": ("1", window_frame(5, 10)),
    "CLOSE for a stream never opened": ("1", close_frame(3, 1000)),
    "HELLO to the relay": ("1", jframe(HELLO, 0, {"version": 1})),
    "OPEN to the relay": ("1", jframe(OPEN, 1, {"kind": "http"})),
    "DRAIN to the relay": ("1", jframe(DRAIN, 0, {"reason": "x"})),
    "RENEWED to the relay": ("1,2", jframe(RENEWED, 0, {"expiresAt": 1})),
    "RENEW on a version 1 tunnel": ("1", jframe(RENEW, 0, {"token": "x"})),
    "RENEW that is not an object": ("1,2", frame(RENEW, 0, b"[]")),
    "RENEW without a string token": ("1,2", jframe(RENEW, 0, {"token": 5})),
    "PING over 256 KiB": ("1", frame(PING, 0, b"p" * (256 * 1024 + 1))),
}


@pytest.mark.parametrize("case", sorted(CONNECTION_LEVEL_VIOLATIONS))
async def test_a_frame_outside_its_row_is_1002(relay: RunningRelay, case: str) -> None:
    version, bad = CONNECTION_LEVEL_VIOLATIONS[case]
    agent = await Agent.connect(relay, v=version)
    try:
        await agent.send(bad)
        assert (await agent.wait_closed())[0] == PROTOCOL_ERROR
        await eventually(lambda: relay.state.registry.get(HOST) is None)
    finally:
        await agent.close()


# -- 3.3 HEAD and the stream rules, with a client waiting ------------------------------------

BEFORE_HEAD_VIOLATIONS: dict[str, Callable[[int], list[bytes]]] = {
    "status abc": lambda s: [jframe(HEAD, s, {"status": "abc"})],
    "status 99": lambda s: [jframe(HEAD, s, {"status": 99})],
    "status 101 on http": lambda s: [jframe(HEAD, s, {"status": 101})],
    "status 600": lambda s: [jframe(HEAD, s, {"status": 600})],
    "status 1.5": lambda s: [jframe(HEAD, s, {"status": 1.5})],
    "status true": lambda s: [jframe(HEAD, s, {"status": True})],
    "no status": lambda s: [jframe(HEAD, s, {"headers": []})],
    "headers 5": lambda s: [jframe(HEAD, s, {"status": 200, "headers": 5})],
    "a header that is not a pair": lambda s: [jframe(HEAD, s, {"status": 200,
                                                              "headers": [["X-One"]]})],
    "CRLF in a value": lambda s: [jframe(HEAD, s, {"status": 200, "headers": [
        ["X-Evil", "1\r\nSet-Cookie: stolen=1"]]})],
    "NUL in a value": lambda s: [jframe(HEAD, s, {"status": 200, "headers": [["X", "a\x00"]]})],
    "a name that is not a token": lambda s: [jframe(HEAD, s, {"status": 200, "headers": [
        ["Bad Name", "x"]]})],
    "CRLF in the reason": lambda s: [jframe(HEAD, s, {"status": 200, "reason": "O\r\nK"})],
    "not an object": lambda s: [frame(HEAD, s, b"[200]")],
    "not JSON": lambda s: [frame(HEAD, s, b"{status: 200")],
    "FIN on HEAD": lambda s: [jframe(HEAD, s, {"status": 200}, FIN)],
    "DATA before HEAD": lambda s: [frame(DATA, s, b"body first", FIN)],
}


@pytest.mark.parametrize("case", sorted(BEFORE_HEAD_VIOLATIONS))
async def test_a_broken_head_is_1002_and_the_client_gets_json_502(
    relay: RunningRelay, agent: Agent, client: Client, case: str,
) -> None:
    request = client.request()
    opened = await agent.expect(OPEN)
    await agent.send(*BEFORE_HEAD_VIOLATIONS[case](opened.stream))
    assert (await agent.wait_closed())[0] == PROTOCOL_ERROR
    await assert_json_502(request)
    await eventually(lambda: relay.state.registry.get(HOST) is None)


AFTER_HEAD_VIOLATIONS: dict[str, Callable[[int], list[bytes]]] = {
    "TEXT on http DATA": lambda s: [frame(DATA, s, b"x", TEXT_F)],
    "MORE on http DATA": lambda s: [frame(DATA, s, b"x", MORE)],
    "an unknown DATA flag": lambda s: [frame(DATA, s, b"x", 0x10)],
    "DATA over maxFrame": lambda s: [frame(DATA, s, b"x" * 65537)],
    "a second HEAD": lambda s: [jframe(HEAD, s, {"status": 200})],
    "DATA after FIN": lambda s: [frame(DATA, s, b"x", FIN), frame(DATA, s, b"y")],
    "WINDOW of 0": lambda s: [window_frame(s, 0)],
    "WINDOW over 2^31-1": lambda s: [window_frame(s, 2**31)],
    "WINDOW raising credit past 2^31-1": lambda s: [window_frame(s, 2**31 - 1)],
    "WINDOW of 3 bytes": lambda s: [frame(WINDOW, s, b"\x00\x00\x01")],
    "CLOSE of 1 byte": lambda s: [frame(CLOSE_F, s, b"\x03")],
    "flags on WINDOW": lambda s: [frame(WINDOW, s, struct.pack("!I", 1), FIN)],
    "flags on CLOSE": lambda s: [frame(CLOSE_F, s, struct.pack("!H", 1000), FIN)],
}


@pytest.mark.parametrize("case", sorted(AFTER_HEAD_VIOLATIONS))
async def test_a_stream_frame_outside_its_row_is_1002(
    agent: Agent, client: Client, case: str,
) -> None:
    raw = await client.raw()
    try:
        # A request body still on its way: the relay's side of the stream stays open.
        await raw.send(f"POST /hosts/{HOST}/up HTTP/1.1\r\nHost: relay\r\n{client.auth_line()}"
                       "Content-Length: 100000\r\n\r\n".encode() + b"x" * 10)
        opened = await agent.expect(OPEN)
        await agent.send(jframe(HEAD, opened.stream, {"status": 200}),
                         *AFTER_HEAD_VIOLATIONS[case](opened.stream))
        assert (await agent.wait_closed())[0] == PROTOCOL_ERROR
    finally:
        raw.close()


async def test_data_beyond_the_credit_held_is_1002(tmp_path: Path) -> None:
    async with agent_and_client(tmp_path, stream_window_bytes=2048, max_frame_bytes=1024
                                ) as (agent, client):
        client.request()
        opened = await agent.expect(OPEN)
        # 3072 bytes against a 2048-byte window, all in one go.
        await agent.send(jframe(HEAD, opened.stream, {"status": 200}),
                         *[frame(DATA, opened.stream, b"x" * 1024)] * 3)
        assert (await agent.wait_closed())[0] == PROTOCOL_ERROR


async def test_integral_numbers_and_unknown_fields_are_accepted(
    agent: Agent, client: Client,
) -> None:
    request = client.request()
    opened = await agent.expect(OPEN)
    await agent.send(jframe(HEAD, opened.stream, {
        "status": 201.0, "future": {"field": [1, 2]},
        "headers": [["Content-Type", "text/plain"], ["Content-Length", "2"]]}),
        frame(DATA, opened.stream, b"ok", FIN))
    answer = await asyncio.wait_for(request, 10)
    assert (answer.status, answer.body) == (201, b"ok")
    assert await agent.is_alive()


async def test_frames_for_a_stream_that_ended_are_ignored(agent: Agent, client: Client) -> None:
    request = client.request()
    opened = await agent.expect(OPEN)
    assert opened.flags == FIN  # a GET: no body
    await answer_ok(agent, opened.stream)
    assert (await asyncio.wait_for(request, 10)).body == b"ok"
    await agent.send(window_frame(opened.stream, 100), frame(DATA, opened.stream, b"late"),
                     close_frame(opened.stream, 1000))
    assert await agent.is_alive()


# -- 4.1 stream ids; 4.2 OPEN ------------------------------------------------------------------

async def test_stream_ids_are_odd_and_increase_from_1(agent: Agent, client: Client) -> None:
    ids = []
    for _ in range(3):
        request = client.request()
        opened = await agent.expect(OPEN)
        ids.append(opened.stream)
        await answer_ok(agent, opened.stream)
        await asyncio.wait_for(request, 10)
    assert ids == [1, 3, 5]


async def test_open_carries_the_request_as_documented(agent: Agent, client: Client) -> None:
    raw = await client.raw()
    body = b"exactly these bytes\x00\xff"
    try:
        await raw.send(
            f"POST /hosts/{HOST}/up%20load?a=1&b=2 HTTP/1.1\r\nHost: public.example\r\n"
            f"{client.auth_line()}Content-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n"
            "Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
            "Proxy-Connection: keep-alive\r\nTE: trailers\r\nX-Kept: yes\r\n\r\n".encode())
        opened = await agent.expect(OPEN)
        assert opened.flags == 0  # a body follows
        head = opened.json()
        assert (head["kind"], head["method"], head["path"], head["query"]) == (
            "http", "POST", "/up%20load", "a=1&b=2")
        names = {name.lower(): value for name, value in head["headers"]}
        for gone in ("host", "authorization", "expect", "connection", "x-hop", "keep-alive",
                     "proxy-connection", "te"):
            assert gone not in names, gone
        assert names["x-kept"] == "yes"
        assert names["x-forwarded-host"] == "public.example"
        assert names["x-forwarded-proto"] == "http"
        assert names["x-forwarded-prefix"] == f"/hosts/{HOST}"
        assert names["x-forwarded-for"] == "127.0.0.1"
        # The relay answers the 100 itself once the request is admitted.
        continued = await asyncio.wait_for(raw.reader.readuntil(b"\r\n\r\n"), 5)
        assert continued.startswith(b"HTTP/1.1 100")
        await raw.send(body)
        received = b""
        while True:
            data = await agent.expect(DATA)
            received += data.payload
            if data.flags & FIN:
                break
        assert received == body  # exactly the client's bytes
        await answer_ok(agent, opened.stream)
        assert (await raw.read_response()).body == b"ok"
    finally:
        raw.close()


async def test_a_chunked_request_body_arrives_as_its_bytes(agent: Agent, client: Client) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"first,", b"second,", b"third"):
            yield part

    request = client.request("PUT", data=chunks())
    opened = await agent.expect(OPEN)
    received = b""
    while True:
        data = await agent.expect(DATA)
        received += data.payload
        if data.flags & FIN:
            break
    assert received == b"first,second,third"
    await answer_ok(agent, opened.stream)
    assert (await asyncio.wait_for(request, 10)).status == 200


# -- 4.2 the response --------------------------------------------------------------------------

async def test_hop_by_hop_headers_in_head_never_reach_the_client(
    agent: Agent, client: Client,
) -> None:
    request = client.request()
    opened = await agent.expect(OPEN)
    await agent.send(jframe(HEAD, opened.stream, {"status": 200, "headers": [
        ["Content-Type", "text/plain"], ["Connection", "X-Secret"], ["X-Secret", "1"],
        ["Keep-Alive", "timeout=1"], ["Transfer-Encoding", "chunked"], ["Upgrade", "h2c"],
        ["Trailer", "X-T"], ["X-Visible", "yes"]]}),
        frame(DATA, opened.stream, b"abc"), frame(DATA, opened.stream, b"def", FIN))
    answer = await asyncio.wait_for(request, 10)
    lowered = {name.lower(): value for name, value in answer.headers.items()}
    assert answer.body == b"abcdef"  # the relay framed the body itself
    assert lowered["x-visible"] == "yes"
    for gone in ("x-secret", "keep-alive", "upgrade", "trailer"):
        assert gone not in lowered, gone


async def test_a_content_length_in_head_frames_the_clients_body(
    agent: Agent, client: Client,
) -> None:
    request = client.request()
    opened = await agent.expect(OPEN)
    await agent.send(jframe(HEAD, opened.stream, {"status": 200, "headers": [
        ["Content-Length", "6"]]}),
        frame(DATA, opened.stream, b"abc"), frame(DATA, opened.stream, b"def", FIN))
    answer = await asyncio.wait_for(request, 10)
    assert answer.body == b"abcdef" and answer.headers["Content-Length"] == "6"


async def raw_get(client: Client) -> RawClient:
    raw = await client.raw()
    await raw.send(f"GET /hosts/{HOST}/x HTTP/1.1\r\nHost: relay\r\n{client.auth_line()}"
                   "\r\n".encode())
    return raw


def body_of(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


async def test_a_body_longer_than_content_length_aborts_the_client_and_closes_the_stream_1002(
    agent: Agent, client: Client,
) -> None:
    raw = await raw_get(client)
    try:
        opened = await agent.expect(OPEN)
        await agent.send(jframe(HEAD, opened.stream, {"status": 200, "headers": [
            ["Content-Length", "5"]]}), frame(DATA, opened.stream, b"0123456789", FIN))
        closed = await agent.expect(CLOSE_F)
        assert closed.stream == opened.stream and closed.close[0] == PROTOCOL_ERROR
        got = await raw.read_until_closed()  # aborted: the connection does not stay open
        assert len(body_of(got)) <= 5
        assert await agent.is_alive()  # a stream error: the tunnel stays
    finally:
        raw.close()


async def test_a_body_shorter_than_content_length_aborts_the_client(
    agent: Agent, client: Client,
) -> None:
    raw = await raw_get(client)
    try:
        opened = await agent.expect(OPEN)
        await agent.send(jframe(HEAD, opened.stream, {"status": 200, "headers": [
            ["Content-Length", "10"]]}), frame(DATA, opened.stream, b"01234", FIN))
        got = await raw.read_until_closed()  # never a clean end that looks complete
        assert got.startswith(b"HTTP/1.1 200") and len(body_of(got)) < 10
        assert await agent.is_alive()
    finally:
        raw.close()


async def test_a_close_after_the_head_aborts_the_clients_connection(
    agent: Agent, client: Client,
) -> None:
    raw = await raw_get(client)
    try:
        opened = await agent.expect(OPEN)
        await agent.send(jframe(HEAD, opened.stream, {"status": 200}),
                         frame(DATA, opened.stream, b"part of it"),
                         close_frame(opened.stream, 1011, b"host failed mid-response"))
        got = await raw.read_until_closed()
        assert got.startswith(b"HTTP/1.1 200") and not got.endswith(b"0\r\n\r\n")
    finally:
        raw.close()


async def test_a_response_before_the_request_body_ends_gets_close_1000(
    agent: Agent, client: Client,
) -> None:
    raw = await client.raw()
    try:
        await raw.send(f"POST /hosts/{HOST}/upload HTTP/1.1\r\nHost: relay\r\n"
                       f"{client.auth_line()}Content-Length: 1000000\r\n\r\n".encode()
                       + b"x" * 1000)
        opened = await agent.expect(OPEN)
        await agent.expect(DATA)
        await answer_ok(agent, opened.stream, b"early")  # a whole response, FIN included
        closed = await agent.expect(CLOSE_F, skip=(PING, PONG, DATA))
        assert closed.stream == opened.stream and closed.close[0] == 1000
        response = await raw.read_response()
        assert (response.status, response.body) == (200, b"early")
    finally:
        raw.close()


async def test_a_client_that_goes_away_is_close_1001(agent: Agent, client: Client) -> None:
    raw = await raw_get(client)
    opened = await agent.expect(OPEN)
    raw.close()
    closed = await agent.expect(CLOSE_F)
    assert closed.stream == opened.stream and closed.close[0] == 1001


async def test_no_head_within_the_request_timeout_is_504_and_close_4408(tmp_path: Path) -> None:
    async with agent_and_client(tmp_path, request_timeout_s=0.1) as (agent, client):
        request = client.request()
        opened = await agent.expect(OPEN)
        closed = await agent.expect(CLOSE_F)
        assert closed.stream == opened.stream and closed.close[0] == 4408, closed
        answer = await asyncio.wait_for(request, 10)
        assert answer.status == 504
        assert json.loads(answer.body)["error"]["code"] == "host_timeout"


async def test_an_agent_at_its_stream_limit_refuses_with_1013_and_the_client_gets_503(
    agent: Agent, client: Client,
) -> None:
    request = client.request()
    opened = await agent.expect(OPEN)
    await agent.send(close_frame(opened.stream, 1013, b"agent stream limit"))
    answer = await asyncio.wait_for(request, 10)
    assert answer.status == 503 and json.loads(answer.body)["error"]["code"] == "overloaded"


# -- 4.3, 4.4 ws streams -----------------------------------------------------------------------

async def open_channel(agent: Agent, client: Client, *, protocol: str | None = None,
                       headers: dict[str, str] | None = None) -> tuple[RawWebSocket, Frame]:
    connecting = asyncio.ensure_future(client.websocket(headers=headers))
    try:
        opened = await agent.expect(OPEN, skip=(PING, PONG, WINDOW))
        await agent.send(jframe(HEAD, opened.stream, {"status": 101, "protocol": protocol}))
        return await asyncio.wait_for(connecting, 5), opened
    except BaseException:
        connecting.cancel()
        raise


async def test_a_ws_channel_as_documented(agent: Agent, client: Client) -> None:
    ws, opened = await open_channel(agent, client, protocol="chat",
                                    headers={"Sec-WebSocket-Protocol": "chat, superchat"})
    try:
        assert opened.flags == 0  # never FIN on a ws OPEN
        head = opened.json()
        assert head["kind"] == "ws" and head["protocols"] == ["chat", "superchat"]
        assert not [n for n, _ in head["headers"] if n.lower().startswith("sec-websocket-")]
        await ws.send_text("hi")
        got = await agent.expect(DATA)
        assert (got.stream, got.flags, got.payload) == (opened.stream, TEXT_F, b"hi")
        await ws.send_binary(b"")
        got = await agent.expect(DATA)
        assert (got.flags, got.payload) == (0, b"")  # an empty message: one empty frame
        await agent.send(frame(DATA, opened.stream, b"\x00\x01"),
                         frame(DATA, opened.stream, "é".encode(), TEXT_F))
        assert await ws.receive() == Message(BINARY, b"\x00\x01")
        assert await ws.receive() == Message(TEXT, "é".encode())
        await ws.send_close(4000, b"bye")
        closed = await agent.expect(CLOSE_F)
        assert closed.close == (4000, b"bye")
    finally:
        ws.abort()


async def test_fin_on_a_ws_stream_is_close_1000(agent: Agent, client: Client) -> None:
    ws, opened = await open_channel(agent, client)
    try:
        await agent.send(frame(DATA, opened.stream, b"", FIN))
        closed = await ws.wait_closed()
        assert closed is not None and (closed.close_code, closed.close_reason) == (1000, b"")
    finally:
        ws.abort()


@pytest.mark.parametrize("fragments", [
    [(b"a", MORE), (b"b", FIN)], [(b"a", MORE | FIN)], [(b"", MORE)]],
    ids=["FIN after MORE", "FIN with MORE", "empty fragment"])
async def test_a_broken_fragment_on_a_ws_stream_is_1002(
    agent: Agent, client: Client, fragments: list[tuple[bytes, int]],
) -> None:
    ws, opened = await open_channel(agent, client)
    try:
        await agent.send(*[frame(DATA, opened.stream, data, flags) for data, flags in fragments])
        assert (await agent.wait_closed())[0] == PROTOCOL_ERROR
    finally:
        ws.abort()


async def test_a_refused_ws_channel_closes_the_client_1011(agent: Agent, client: Client) -> None:
    connecting = asyncio.ensure_future(client.websocket())
    opened = await agent.expect(OPEN)
    await agent.send(jframe(HEAD, opened.stream, {"status": 404}))
    ws = await asyncio.wait_for(connecting, 5)
    try:
        closed = await ws.wait_closed()
        assert closed is not None and closed.close_code == 1011
        assert await agent.is_alive()
    finally:
        ws.abort()


async def test_an_unanswered_ws_open_is_close_1001_and_the_client_4410(tmp_path: Path) -> None:
    async with agent_and_client(tmp_path, open_timeout_s=0.15) as (agent, client):
        connecting = asyncio.ensure_future(client.websocket())
        opened = await agent.expect(OPEN)
        closed = await agent.expect(CLOSE_F)
        assert closed.stream == opened.stream and closed.close[0] == 1001
        ws = await asyncio.wait_for(connecting, 5)
        refused = await ws.wait_closed()
        assert refused is not None and refused.close_code == 4410
        ws.abort()


async def test_a_ws_dataframe_costs_its_payload_plus_64(tmp_path: Path) -> None:
    async with agent_and_client(tmp_path, stream_window_bytes=4096, max_frame_bytes=4096
                                ) as (agent, client):
        ws, opened = await open_channel(agent, client)
        await agent.send(frame(DATA, opened.stream, b"x" * (4096 - WS_FRAME_COST)))
        assert (await ws.receive()).data == b"x" * (4096 - WS_FRAME_COST)  # fits exactly
        ws.abort()
        assert (await agent.expect(CLOSE_F, skip=(PING, PONG, WINDOW))).stream == opened.stream
        ws, opened = await open_channel(agent, client)
        await agent.send(frame(DATA, opened.stream, b"x" * (4096 - WS_FRAME_COST + 1)))
        assert (await agent.wait_closed())[0] == PROTOCOL_ERROR
        ws.abort()


# -- 5. credit per fragment --------------------------------------------------------------------

async def test_a_message_larger_than_the_window_reaches_the_client(
    agent: Agent, client: Client,
) -> None:
    """The relay returns credit per fragment: an agent that splits a 1 MiB message to its
    credit over a 256 KiB window gets it through (section 5's worked example)."""
    window, max_frame = agent.hello["window"], agent.hello["maxFrame"]
    ws, opened = await open_channel(agent, client)
    message = os.urandom(1 << 20)
    receiving = asyncio.ensure_future(ws.receive(within=20))
    try:
        credit, sent, windows_before_the_end = window, 0, 0
        while sent < len(message):
            while credit <= WS_FRAME_COST:
                got = await agent.expect(WINDOW)
                assert got.stream == opened.stream
                credit += struct.unpack("!I", got.payload)[0]
                windows_before_the_end += 1
            size = min(len(message) - sent, max_frame, credit - WS_FRAME_COST)
            last = sent + size == len(message)
            await agent.send(frame(DATA, opened.stream, message[sent:sent + size],
                                   0 if last else MORE))
            credit -= size + WS_FRAME_COST
            sent += size
        got_message = await asyncio.wait_for(receiving, 20)
        assert got_message == Message(BINARY, message)
        assert windows_before_the_end >= 1  # it could never have finished without them
    finally:
        receiving.cancel()
        ws.abort()


async def test_the_relay_splits_a_large_message_to_the_credit_it_holds(
    agent: Agent, client: Client,
) -> None:
    window, max_frame = agent.hello["window"], agent.hello["maxFrame"]
    ws, opened = await open_channel(agent, client)
    message = os.urandom(1 << 20)
    try:
        await ws.send_binary(message)
        credit, received, fragments = window, b"", 0
        while True:
            got = await agent.expect(DATA, within=20)
            cost = len(got.payload) + WS_FRAME_COST
            assert got.stream == opened.stream and cost <= credit, (cost, credit)
            assert 0 < len(got.payload) <= max_frame
            credit -= cost
            received += got.payload
            fragments += 1
            await agent.send(window_frame(opened.stream, cost))  # credit per fragment
            credit += cost
            if not got.flags & MORE:
                break
        assert received == message and fragments > window // max_frame
    finally:
        ws.abort()


# -- 2.2 close reasons -------------------------------------------------------------------------

async def test_a_clients_full_length_utf8_close_reason_reaches_the_agent_intact(
    agent: Agent, client: Client,
) -> None:
    ws, _ = await open_channel(agent, client)
    reason = ("é" * 61 + "x").encode()
    assert len(reason) == 123
    try:
        await ws.send_close(4001, reason)
        closed = await agent.expect(CLOSE_F)
        assert closed.close == (4001, reason)
    finally:
        ws.abort()


async def test_a_reason_the_relay_passes_on_is_cut_to_123_bytes_at_a_character(
    agent: Agent, client: Client,
) -> None:
    connecting = asyncio.ensure_future(client.websocket())
    opened = await agent.expect(OPEN)
    # The refusal gets the relay's words in front of the agent's 120 bytes: too long as is.
    await agent.send(close_frame(opened.stream, 4410, ("é" * 60).encode()))
    ws = await asyncio.wait_for(connecting, 5)
    try:
        closed = await ws.wait_closed()
        assert closed is not None and closed.close_code == 4410
        assert 0 < len(closed.close_reason) <= 123
        assert "é" in closed.close_reason.decode("utf-8")  # cut at a character, valid UTF-8
    finally:
        ws.abort()


# -- 7. liveness -------------------------------------------------------------------------------

async def test_a_ping_is_answered_with_its_payload(agent: Agent) -> None:
    for payload in (b"", os.urandom(16), os.urandom(256 * 1024)):
        await agent.send(frame(PING, 0, payload))
        pong = await agent.expect(PONG, skip=(PING,))
        assert (pong.stream, pong.flags, pong.payload) == (0, 0, payload)


async def test_the_relay_pings_and_a_silent_agent_is_closed_4408(tmp_path: Path) -> None:
    async with relay_with(tmp_path, ping_interval_s=0.1, keepalive_misses=2) as relay:
        agent = await Agent.connect(relay, answer_pings=False)
        try:
            ping = await agent.expect(PING, skip=())
            assert ping.stream == 0 and ping.flags == 0
            code, _ = await agent.wait_closed(within=10)
            assert code == 4408
        finally:
            await agent.close()


async def test_a_ping_flood_is_1008(agent: Agent) -> None:
    await agent.send(*[frame(PING, 0, b"flood")] * 64)
    assert (await agent.wait_closed())[0] == 1008


# -- 4.1 exhaustion, 6. DRAIN, 8. replacement --------------------------------------------------

async def test_the_last_stream_id_is_2_31_minus_1_then_the_tunnel_drains(
    relay: RunningRelay, agent: Agent, client: Client,
) -> None:
    tunnel = relay.state.registry.get(HOST)
    assert tunnel is not None
    tunnel.session.mux.next_stream_id = MAX_STREAM_ID  # a test cannot open 2^30 streams
    first = client.request()
    opened = await agent.expect(OPEN)
    assert opened.stream == MAX_STREAM_ID
    second = await asyncio.wait_for(client.request(), 10)
    assert second.status == 503 and json.loads(second.body)["error"]["code"] == "draining"
    assert "Retry-After" in second.headers
    drained = await agent.expect(DRAIN)
    assert drained.stream == 0 and drained.json() == {
        "reason": "stream ids exhausted", "reconnectAfterS": 0}
    await answer_ok(agent, opened.stream)
    assert (await asyncio.wait_for(first, 10)).status == 200
    code, _ = await agent.wait_closed(within=10)  # once its last stream has ended
    assert code == 4503


async def test_a_relay_drain_sends_drain_and_ws_channels_do_not_hold_it(tmp_path: Path) -> None:
    async with relay_with(tmp_path) as relay:
        agent = await Agent.connect(relay)
        client = Client(relay)
        draining: asyncio.Task[None] | None = None
        try:
            ws, _ = await open_channel(agent, client)
            draining = asyncio.ensure_future(drain(relay.state, 60))
            drained = await agent.expect(DRAIN)
            assert drained.stream == 0 and drained.json() == {
                "reason": "relay draining", "reconnectAfterS": 0}
            # Far inside the 60 s grace: the open channel held nothing.
            assert (await agent.wait_closed(within=10))[0] == 4503
            closed = await ws.wait_closed(within=10)
            assert closed is not None and closed.close_code == 4503
            await asyncio.wait_for(draining, 10)
            ws.abort()
        finally:
            if draining is not None and not draining.done():
                draining.cancel()
            await client.close()
            await agent.close()


async def test_a_new_tunnel_for_the_host_replaces_the_old_one_with_4409(
    relay: RunningRelay, agent: Agent,
) -> None:
    newer = await Agent.connect(relay)
    try:
        assert (await agent.wait_closed())[0] == 4409
        assert await newer.is_alive()
    finally:
        await newer.close()


async def test_the_handshake_refusals_are_close_codes(relay: RunningRelay) -> None:
    """Section 1: refusals come after the upgrade; a missing token is 4401."""
    ws = await RawWebSocket.connect(relay.config.server.port, f"/tunnel?hostId={HOST}&v=1")
    try:
        closed = await ws.wait_closed()
        assert closed is not None and closed.close_code == 4401 and closed.close_reason
    finally:
        ws.abort()
    user_only = await RawWebSocket.connect(
        relay.config.server.port, f"/tunnel?hostId={HOST}&v=1",
        {"Authorization": f"Bearer {relay.token()}"})
    try:
        closed = await user_only.wait_closed()
        assert closed is not None and closed.close_code == 4403
        assert b"may not serve" in closed.close_reason
    finally:
        user_only.abort()

