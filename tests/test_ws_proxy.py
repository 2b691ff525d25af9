"""WebSocket channels through relay, tunnel and agent: frames, subprotocols, close codes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from yarl import URL

from relay.devhost import build_app as build_host_app
from relay.errors import CloseCode
from relay.protocol import frames
from relay.protocol.frames import FrameType
from relay.server.drain import drain
from tests.harness import Stack, eventually, stack, start_agent
from tests.test_rogue_agent import RawTunnel

CLOSES: web.AppKey[asyncio.Queue[tuple[int | None, str]]] = web.AppKey("closes", asyncio.Queue)


async def ws_record_close(request: web.Request) -> web.WebSocketResponse:
    """Echo, and remember how the peer closed: the code and reason the host service saw."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    reason = ""
    while True:
        msg = await ws.receive()
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            reason = str(msg.extra or "")
            break
        elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            break
    await request.app[CLOSES].put((ws.close_code, reason))
    return ws


async def ws_inspect(request: web.Request) -> web.WebSocketResponse:
    """Tell the client what the host service saw of the upgrade request, then echo."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_json({
        "path": request.raw_path.split("?")[0],
        "query": request.query_string,
        "headers": [[k, v] for k, v in request.headers.items()],
    })
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
    return ws


async def ws_drop(request: web.Request) -> web.WebSocketResponse:
    """On the first message, vanish without a close frame: "reset" aborts the TCP connection,
    "fin" closes it gracefully (what the kernel does for a crashed host service)."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    msg = await ws.receive()
    assert request.transport is not None
    if msg.data == "reset":
        request.transport.abort()
    else:
        request.transport.close()
    return ws


async def ws_flood(request: web.Request) -> web.WebSocketResponse:
    """On request, send one message of the asked size (to go over the agent's limit)."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    msg = await ws.receive()
    await ws.send_bytes(b"y" * int(msg.data))
    await ws.receive()
    return ws


def host_app() -> web.Application:
    app = build_host_app()
    app[CLOSES] = asyncio.Queue()
    app.router.add_get("/ws-record", ws_record_close)
    app.router.add_get("/ws-inspect", ws_inspect)
    app.router.add_get("/ws-drop", ws_drop)
    app.router.add_get("/ws-flood", ws_flood)
    return app


@pytest.fixture
async def ws_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with stack(tmp_path, host_app=host_app()) as running:
        yield running


def host_closes(s: Stack) -> asyncio.Queue[tuple[int | None, str]]:
    app = s.host.runner.app
    assert app is not None
    return app[CLOSES]


async def connect(
    s: Stack, path: str = "/ws", protocols: tuple[str, ...] = ()
) -> aiohttp.ClientWebSocketResponse:
    return await s.client.ws_connect(s.url(path), headers=s.auth(), protocols=protocols)


async def expect_close(ws: aiohttp.ClientWebSocketResponse, within: float = 5.0) -> tuple[int, str]:
    """Skip messages until the close frame; its code and reason."""
    async with asyncio.timeout(within):
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.CLOSE:
                return int(msg.data), str(msg.extra or "")
            if msg.type in (WSMsgType.CLOSED, WSMsgType.ERROR):
                raise AssertionError(f"socket ended without a close frame ({ws.close_code})")


# -- frames ------------------------------------------------------------------------------------

async def test_text_and_binary_messages_arrive_unchanged(ws_stack: Stack) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB: many max_frame fragments and several windows
    assert len(big) > ws_stack.relay.state.settings.max_frame * 4
    messages: list[str | bytes] = [
        "hello", "ünïcødé ✓", "", b"", b"\x00\xff\x00", big, "x" * 200_000,
    ]
    async with await connect(ws_stack) as ws:
        for message in messages:
            if isinstance(message, str):
                await ws.send_str(message)
            else:
                await ws.send_bytes(message)
        for message in messages:
            msg = await ws.receive(timeout=10)
            expected = WSMsgType.TEXT if isinstance(message, str) else WSMsgType.BINARY
            assert msg.type is expected
            assert msg.data == message


async def test_many_channels_on_one_tunnel_stay_separate(ws_stack: Stack) -> None:
    sockets = [await connect(ws_stack) for _ in range(8)]
    try:
        for i, ws in enumerate(sockets):
            await ws.send_str(f"channel {i}")
        for i, ws in enumerate(sockets):
            assert (await ws.receive_str(timeout=5)) == f"channel {i}"
    finally:
        for ws in sockets:
            await ws.close()


async def test_subprotocol_chosen_by_the_host_is_what_the_client_gets(ws_stack: Stack) -> None:
    async with await connect(ws_stack, protocols=("v2.chat", "chat")) as ws:
        assert ws.protocol == "v2.chat"
    async with await connect(ws_stack, protocols=("nope", "chat")) as ws:
        assert ws.protocol == "chat"
    async with await connect(ws_stack, protocols=("nope",)) as ws:
        assert ws.protocol is None
        await ws.send_str("still works")
        assert (await ws.receive_str(timeout=5)) == "still works"


# -- close codes -------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [4000, 3001, 1000, 1001])
async def test_client_close_code_reaches_the_host(ws_stack: Stack, code: int) -> None:
    ws = await connect(ws_stack, "/ws-record")
    await ws.send_str("hi")
    assert (await ws.receive_str(timeout=5)) == "hi"
    await ws.close(code=code, message=b"client leaving")
    assert await asyncio.wait_for(host_closes(ws_stack).get(), 5) == (code, "client leaving")


async def test_host_close_code_and_reason_reach_the_client(ws_stack: Stack) -> None:
    async with await connect(ws_stack) as ws:
        await ws.send_str("close:4321")
        assert await expect_close(ws) == (4321, "asked to close")


async def test_host_clean_close_after_a_last_message(ws_stack: Stack) -> None:
    async with await connect(ws_stack) as ws:
        await ws.send_str("bye")
        assert (await ws.receive_str(timeout=5)) == "bye!"
        assert await expect_close(ws) == (1000, "")


@pytest.mark.parametrize("how", ["reset", "fin"])
async def test_host_socket_dropped_abnormally_gives_the_client_1011(
    ws_stack: Stack, how: str
) -> None:
    """No close frame from the host (1006 at the agent) must never become a clean 1000."""
    async with await connect(ws_stack, "/ws-drop") as ws:
        await ws.send_str(how)
        code, _ = await expect_close(ws)
        assert code == CloseCode.INTERNAL_ERROR


@pytest.mark.parametrize("how", ["reset", "fin"])
async def test_client_dropped_abnormally_is_not_a_clean_close_for_the_host(
    ws_stack: Stack, how: str
) -> None:
    ws = await connect(ws_stack, "/ws-record")
    await ws.send_str("hi")
    assert (await ws.receive_str(timeout=5)) == "hi"
    # aiohttp has no public way to drop a client socket: use its connection's transport.
    transport = getattr(getattr(ws, "_conn", None), "transport", None)
    assert transport is not None
    if how == "reset":
        transport.abort()
    else:
        transport.close()
    seen_code, _ = await asyncio.wait_for(host_closes(ws_stack).get(), 5)
    # "Going away" or "abnormal", never a clean 1000 the host would take for a goodbye.
    assert seen_code in (CloseCode.GOING_AWAY, CloseCode.INTERNAL_ERROR)
    await ws.close()


async def test_client_message_over_the_limit_ends_the_channel_with_1009(
    ws_stack: Stack,
) -> None:
    limit = ws_stack.relay.config.tunnel.max_ws_message_bytes
    ws = await connect(ws_stack, "/ws-record")
    try:
        # The relay refuses mid-message; the client may see the close or a reset first.
        with contextlib.suppress(ConnectionError):
            await ws.send_bytes(b"x" * (limit + 1))
        msg = await ws.receive(timeout=5)
        assert msg.type is not WSMsgType.BINARY
        if msg.type is WSMsgType.CLOSE:
            assert msg.data == CloseCode.MESSAGE_TOO_BIG
    finally:
        await ws.close()
    seen_code, _ = await asyncio.wait_for(host_closes(ws_stack).get(), 5)
    assert seen_code == CloseCode.MESSAGE_TOO_BIG


async def test_host_message_over_the_limit_gives_the_client_1009(ws_stack: Stack) -> None:
    limit = ws_stack.agent.agent.options.max_ws_message
    async with await connect(ws_stack, "/ws-flood") as ws:
        await ws.send_str(str(limit + 1))
        code, _ = await expect_close(ws)
        assert code == CloseCode.MESSAGE_TOO_BIG


# -- refusals ----------------------------------------------------------------------------------

async def _refusal(s: Stack, url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    # encoded=True: send the path exactly as written (percent-escapes included).
    async with s.client.ws_connect(URL(url, encoded=True), headers=headers or {}) as ws:
        return await expect_close(ws)


async def test_ws_without_a_token_is_closed_4401(ws_stack: Stack) -> None:
    code, reason = await _refusal(ws_stack, ws_stack.url("/ws"))
    assert code == CloseCode.UNAUTHORIZED and reason


async def test_ws_with_a_garbage_token_is_closed_4401(ws_stack: Stack) -> None:
    code, _ = await _refusal(ws_stack, ws_stack.url("/ws?token=not.a.jwt"))
    assert code == CloseCode.UNAUTHORIZED
    code, _ = await _refusal(ws_stack, ws_stack.url("/ws"), {"Authorization": "Bearer junk"})
    assert code == CloseCode.UNAUTHORIZED


async def test_ws_for_another_org_is_closed_4403(ws_stack: Stack) -> None:
    token = ws_stack.token(orgs=("globex",))
    code, _ = await _refusal(ws_stack, ws_stack.url("/ws"), ws_stack.auth(token))
    assert code == CloseCode.FORBIDDEN


@pytest.mark.parametrize("host_id", ["acme", "acme%3Alaptop", "acme:lap:top", "ac%2Fme:laptop"])
async def test_ws_for_a_malformed_host_id_is_closed_4400(ws_stack: Stack, host_id: str) -> None:
    url = f"{ws_stack.relay.url}/hosts/{host_id}/ws"
    code, _ = await _refusal(ws_stack, url, ws_stack.auth())
    assert code == CloseCode.BAD_REQUEST


async def test_ws_for_an_offline_host_is_closed_4404(ws_stack: Stack) -> None:
    url = f"{ws_stack.relay.url}/hosts/acme:desktop/ws"
    code, _ = await _refusal(ws_stack, url, ws_stack.auth())
    assert code == CloseCode.HOST_NOT_CONNECTED


async def test_ws_on_a_draining_relay_is_closed_4503(ws_stack: Stack) -> None:
    ws_stack.relay.state.draining = True
    try:
        code, _ = await _refusal(ws_stack, ws_stack.url("/ws"), ws_stack.auth())
    finally:
        ws_stack.relay.state.draining = False
    assert code == CloseCode.DRAINING


async def test_query_token_opens_the_ws_but_never_reaches_the_host(ws_stack: Stack) -> None:
    token = ws_stack.token()
    url = ws_stack.url(f"/ws-inspect?a=1&token={token}&b=two")
    async with ws_stack.client.ws_connect(url) as ws:
        seen = json.loads(await ws.receive_str(timeout=5))
    assert seen["path"] == "/ws-inspect"
    assert seen["query"] == "a=1&b=two"
    assert token not in json.dumps(seen)
    names = {name.lower() for name, _ in seen["headers"]}
    assert "authorization" not in names


async def test_header_token_never_reaches_the_host(ws_stack: Stack) -> None:
    token = ws_stack.token()
    async with await connect(ws_stack, "/ws-inspect") as ws:
        seen = json.loads(await ws.receive_str(timeout=5))
    assert token not in json.dumps(seen)
    assert "authorization" not in {name.lower() for name, _ in seen["headers"]}
    assert ["X-Forwarded-Prefix", "/hosts/acme:laptop"] in seen["headers"]


async def test_with_a_header_token_the_token_parameter_is_the_hosts(ws_stack: Stack) -> None:
    async with await connect(ws_stack, "/ws-inspect?token=host-own&x=1") as ws:
        seen = json.loads(await ws.receive_str(timeout=5))
    assert seen["query"] == "token=host-own&x=1"


# -- channels the host never opens -------------------------------------------------------------

async def test_host_service_down_fails_the_client_fast(ws_stack: Stack) -> None:
    await ws_stack.host.stop()
    started = time.monotonic()
    async with await connect(ws_stack) as ws:
        code, _ = await expect_close(ws)
    assert code == CloseCode.INTERNAL_ERROR  # an error the client retries, not a clean 1000
    assert time.monotonic() - started < 2.0
    tunnel = ws_stack.relay.state.registry.get(ws_stack.host_id)
    assert tunnel is not None and not tunnel.session.channels


async def test_host_refusing_the_upgrade_fails_the_client(ws_stack: Stack) -> None:
    async with await connect(ws_stack, "/no-such-socket") as ws:
        code, _ = await expect_close(ws)
    assert code == CloseCode.INTERNAL_ERROR


async def test_agent_that_never_answers_open_fails_the_client_within_open_timeout(
    tmp_path: Path,
) -> None:
    async with stack(tmp_path, sections={"tunnel": {"open_timeout_s": 0.2}}) as s:
        mute = await RawTunnel.connect(s.client, s.relay, "acme:mute", s.agent_token("acme:mute"))
        try:
            started = time.monotonic()
            url = f"{s.relay.url}/hosts/acme:mute/ws"
            client = asyncio.ensure_future(_refusal(s, url, s.auth()))
            opened = await mute.expect(FrameType.OPEN)
            assert frames.decode_json(opened)["kind"] == "ws"
            code, _ = await asyncio.wait_for(client, 5)
            elapsed = time.monotonic() - started
            assert code == CloseCode.TUNNEL_GONE
            assert 0.15 <= elapsed < 2.0
            # The relay also ended the stream it had offered, so nothing is left half-open.
            closed = await mute.expect(FrameType.CLOSE)
            assert closed.stream_id == opened.stream_id
            tunnel = s.relay.state.registry.get("acme:mute")
            assert tunnel is not None and not tunnel.session.channels
        finally:
            await mute.close()


async def test_agent_gives_up_a_host_upgrade_the_relay_already_gave_up_on(
    tmp_path: Path,
) -> None:
    """A host service that accepts TCP but never answers the upgrade must not pin the agent's
    stream (and a socket to the host) for ever once the client was told 4410."""
    live: set[asyncio.StreamWriter] = set()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        live.add(writer)
        try:
            await reader.read()  # until the agent hangs up
        finally:
            live.discard(writer)
            writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    mute_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with stack(tmp_path, sections={"tunnel": {"open_timeout_s": 0.2}}) as s:
            agent = await start_agent(s.relay.ws_url, "acme:mute", mute_url,
                                      token=s.agent_token("acme:mute"))
            try:
                url = f"{s.relay.url}/hosts/acme:mute/ws"
                code, _ = await _refusal(s, url, s.auth())
                assert code == CloseCode.TUNNEL_GONE
                await eventually(lambda: not live, timeout=2)
            finally:
                await agent.stop()
    finally:
        server.close()
        await server.wait_closed()


async def test_tunnel_dropped_under_an_open_channel_gives_the_client_4410(
    ws_stack: Stack,
) -> None:
    raw = await RawTunnel.connect(ws_stack.client, ws_stack.relay, "acme:raw",
                                  ws_stack.agent_token("acme:raw"))
    url = f"{ws_stack.relay.url}/hosts/acme:raw/ws"
    opening = asyncio.ensure_future(ws_stack.client.ws_connect(url, headers=ws_stack.auth()))
    opened = await raw.expect(FrameType.OPEN)
    await raw.send(frames.encode_json(FrameType.HEAD, opened.stream_id, {"status": 101}))
    ws = await opening
    try:
        raw.abort()
        code, _ = await expect_close(ws)
        assert code == CloseCode.TUNNEL_GONE
    finally:
        await ws.close()


async def test_agent_stopping_under_an_open_channel_gives_the_client_4410(
    ws_stack: Stack,
) -> None:
    async with await connect(ws_stack) as ws:
        await ws.send_str("hi")
        assert (await ws.receive_str(timeout=5)) == "hi"
        await ws_stack.agent.stop()
        code, _ = await expect_close(ws)
        assert code == CloseCode.TUNNEL_GONE


async def test_drain_closes_open_channels_with_4503(ws_stack: Stack) -> None:
    async with await connect(ws_stack) as ws:
        await ws.send_str("hi")
        assert (await ws.receive_str(timeout=5)) == "hi"
        draining = asyncio.ensure_future(drain(ws_stack.relay.state, 0.1))
        code, _ = await expect_close(ws)
        assert code == CloseCode.DRAINING
        await draining


async def test_closed_channels_leave_no_streams_behind(ws_stack: Stack) -> None:
    for _ in range(5):
        async with await connect(ws_stack) as ws:
            await ws.send_str("x")
            await ws.receive_str(timeout=5)
    tunnel = ws_stack.relay.state.registry.get(ws_stack.host_id)
    assert tunnel is not None
    await eventually(lambda: not tunnel.session.channels)
    agent_session = ws_stack.agent.agent.session
    assert agent_session is not None
    await eventually(lambda: not agent_session.channels)
