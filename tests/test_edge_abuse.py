"""The HTTP edge under abuse, end to end: misbehaving clients as raw bytes on a real socket
against a real relay (with a real agent and host behind it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from pathlib import Path

import pytest
from aiohttp import WSMsgType, web

from relay.config import load_config
from tests.harness import (
    LogCapture,
    json_events,
    spawn_relay_process,
    stack,
    wait_http,
    write_config,
)
from tests.rawhttp import RawClient, parse_responses

HOST = "acme:laptop"




# --------------------------------------------------------------------------- slowloris


async def test_a_trickled_request_head_is_cut_with_408(tmp_path: Path) -> None:
    head_s = 0.4
    async with stack(tmp_path, {"server": {"header_timeout_s": head_s}}) as st:
        client = await RawClient.connect(st.relay.config.server.port)
        started = time.monotonic()
        await client.send(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n")

        async def trickle() -> None:
            # One header line every 100 ms: each byte is "progress", the head never ends.
            for i in range(100):
                await asyncio.sleep(0.1)
                try:
                    await client.send(b"X-Slow-%d: yes\r\n" % i)
                except (ConnectionError, TimeoutError):
                    return

        trickler = asyncio.ensure_future(trickle())
        try:
            data = await client.read_until_closed(timeout=5)
        finally:
            trickler.cancel()
            client.close()
        cut_after = time.monotonic() - started
    [response] = parse_responses(data)
    assert response.status == 408
    assert response.json()["error"]["code"] == "request_timeout"
    assert 0.8 * head_s <= cut_after < 3, cut_after  # generous upper bound: shared CI cores


async def test_a_connection_that_sends_nothing_is_closed_silently(tmp_path: Path) -> None:
    head_s = 0.3
    async with stack(tmp_path, {"server": {"header_timeout_s": head_s}}) as st:
        client = await RawClient.connect(st.relay.config.server.port)
        started = time.monotonic()
        data = await client.read_until_closed(timeout=5)
        client.close()
    assert data == b""  # no stray 408 for a preconnected socket to misread
    assert 0.8 * head_s <= time.monotonic() - started < 3


async def test_an_idle_keepalive_connection_is_closed_and_a_slow_next_head_is_cut(
    tmp_path: Path,
) -> None:
    head_s, keepalive_s = 0.3, 0.7
    sections = {"server": {"header_timeout_s": head_s, "keepalive_timeout_s": keepalive_s}}
    async with stack(tmp_path, sections) as st:
        port = st.relay.config.server.port
        # Two requests on one connection: keep-alive works, then the idle socket is closed.
        client = await RawClient.connect(port)
        await client.send(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        assert (await client.read_response()).status == 200
        # Idle longer than the head timeout (not as long as the keep-alive): not a slow head.
        await asyncio.sleep((head_s + keepalive_s) / 2)
        await client.send(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        assert (await client.read_response()).status == 200
        idle_from = time.monotonic()
        assert await client.read_until_closed(timeout=5) == b""
        idle_s = time.monotonic() - idle_from
        client.close()
        assert 0.8 * keepalive_s <= idle_s < 4, idle_s

        # On a kept-alive socket, the next head's first byte starts the head clock.
        client = await RawClient.connect(port)
        await client.send(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        assert (await client.read_response()).status == 200
        await client.send(b"GET /healthz HTTP/1.1\r\n")
        started = time.monotonic()
        data = await client.read_until_closed(timeout=5)
        client.close()
        assert [r.status for r in parse_responses(data)] == [408]
        assert time.monotonic() - started < 3


async def test_a_slow_upload_is_not_a_slow_head(tmp_path: Path) -> None:
    async with stack(tmp_path, {"server": {"header_timeout_s": 0.2}}) as st:
        client = await RawClient.connect(st.relay.config.server.port)
        await client.send(
            f"POST /hosts/{HOST}/digest HTTP/1.1\r\nHost: relay\r\n"
            f"Authorization: Bearer {st.token()}\r\nContent-Length: 10\r\n\r\n".encode()
        )
        for _ in range(5):  # the body takes longer than the head timeout: fine
            await asyncio.sleep(0.1)
            await client.send(b"xx")
        response = await client.read_response()
        client.close()
    assert response.status == 200


# --------------------------------------------------------------------------- bodies


def _drain_blocked_send(sock: socket.socket, budget: int, timeout: float) -> int:
    """Send zeros until the peer stops reading (the send blocks), it closes, or ``budget``."""
    sock.settimeout(0.5)
    chunk = b"\0" * 65536
    sent = 0
    deadline = time.monotonic() + timeout
    while sent < budget and time.monotonic() < deadline:
        try:
            sent += sock.send(chunk)
        except (TimeoutError, BlockingIOError):
            break  # the window is full: the relay is not reading
        except OSError:
            break  # closed by the relay
    return sent


async def test_a_declared_body_over_the_limit_is_413_and_never_read(tmp_path: Path) -> None:
    async with stack(tmp_path, {"server": {"max_body_bytes": 1 << 20}}) as st:
        port = st.relay.config.server.port
        # No token at all: the size is refused before authentication, like nginx does.
        head = (f"POST /hosts/{HOST}/sink HTTP/1.1\r\nHost: relay\r\n"
                f"Content-Length: {8 << 30}\r\n\r\n").encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            sock.sendall(head)
            sent = await asyncio.to_thread(_drain_blocked_send, sock, 256 << 20, 10.0)
            sock.settimeout(5)
            started = time.monotonic()
            data = b""
            while True:
                try:
                    piece = await asyncio.to_thread(sock.recv, 65536)
                except ConnectionResetError:
                    break
                if not piece:
                    break
                data += piece
            closed_after = time.monotonic() - started
        finally:
            sock.close()
    [response] = parse_responses(data)
    assert response.status == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert response.headers.get("connection") == "close"
    # Only what the kernel buffers took: the relay read none of it (aiohttp's lingering close
    # would have read 256 MiB at loopback speed).
    assert sent < 64 << 20, sent
    assert closed_after < 4


async def test_expect_100_continue_over_the_limit_gets_413_and_no_100(tmp_path: Path) -> None:
    async with stack(tmp_path, {"server": {"max_body_bytes": 1 << 20}}) as st:
        client = await RawClient.connect(st.relay.config.server.port)
        await client.send(
            f"PUT /hosts/{HOST}/sink HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer "
            f"{st.token()}\r\nExpect: 100-continue\r\nContent-Length: {2 << 30}\r\n\r\n".encode()
        )
        data = await client.read_until_closed(timeout=5)
        client.close()
    responses = parse_responses(data)
    assert [r.status for r in responses] == [413]
    assert b"100 Continue" not in data


async def test_expect_100_continue_is_answered_only_once_accepted(tmp_path: Path) -> None:
    async with stack(tmp_path) as st:
        port = st.relay.config.server.port
        body = b"hello body"
        # Not authorised: the 401 comes without a 100 first, the body is never invited.
        client = await RawClient.connect(port)
        await client.send(
            f"POST /hosts/{HOST}/echo HTTP/1.1\r\nHost: relay\r\nExpect: 100-continue\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        refused = await client.read_until_closed(timeout=5)
        client.close()
        assert [r.status for r in parse_responses(refused)] == [401]
        # Authorised: 100 Continue, then the host's answer to the body.
        client = await RawClient.connect(port)
        await client.send(
            f"POST /hosts/{HOST}/inspect HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer "
            f"{st.token()}\r\nExpect: 100-continue\r\nContent-Length: {len(body)}\r\n"
            f"\r\n".encode()
        )
        interim = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        await client.send(body)
        answer = await client.read_response()
        client.close()
    assert answer.status == 200 and answer.json()["body_size"] == len(body)


async def test_a_chunked_body_growing_past_the_limit_is_413_then_closed(tmp_path: Path) -> None:
    async with stack(tmp_path, {"server": {"max_body_bytes": 100_000}}) as st:
        client = await RawClient.connect(st.relay.config.server.port)
        await client.send(
            f"POST /hosts/{HOST}/digest HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer "
            f"{st.token()}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        chunk = b"%x\r\n%s\r\n" % (16384, b"c" * 16384)

        async def keep_sending() -> None:
            for _ in range(2000):  # 32 MiB if nobody stopped it
                try:
                    await client.send(chunk)
                except (ConnectionError, TimeoutError):
                    return

        sender = asyncio.ensure_future(keep_sending())
        try:
            data = await client.read_until_closed(timeout=8)
        finally:
            sender.cancel()
            client.close()
    [response] = parse_responses(data)
    assert response.status == 413
    assert response.json()["error"]["code"] == "payload_too_large"


# --------------------------------------------------------------------------- parser refusals

TOKEN_MARK = "tok3n-that-must-never-be-echoed"
MALFORMED = {
    "bad_url": (b"GET /hosts/acme:laptop/a\x01b HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    "bad_transfer_encoding": (
        b"POST /hosts/acme:laptop/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: foo\r\n\r\n",
        400, "bad_request"),
    "transfer_encoding_and_length": (
        b"POST /hosts/acme:laptop/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 3\r\n\r\n", 400, "bad_request"),
    "too_many_headers": (
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(130))
        + b"\r\n", 431, "headers_too_large"),
    "huge_header_line": (
        b"GET /hosts/acme:laptop/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + TOKEN_MARK.encode() + b"a" * (128 * 1024) + b"\r\n\r\n", 431, "headers_too_large"),
    "huge_head": (
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-P%d: %s\r\n" % (i, b"p" * 8000)
                                                    for i in range(100)) + b"\r\n",
        431, "headers_too_large"),
    "long_url": (b"GET /hosts/acme:laptop/?token=" + TOKEN_MARK.encode() + b"a" * 9000
                 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    "bad_request_line": (b"GARBAGE " + TOKEN_MARK.encode() + b"\r\n\r\n", 400, "bad_request"),
    "header_without_colon": (
        b"GET / HTTP/1.1\r\nHost: x\r\n" + TOKEN_MARK.encode() + b"\r\n\r\n", 400, "bad_request"),
    "bad_chunk_size": (
        b"POST /hosts/acme:laptop/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\n", 400, "bad_request"),
    "bad_version": (b"GET / HTTP/9.x\r\nHost: x\r\n\r\n", 400, "bad_request"),
}


async def test_parser_refusals_are_our_json_and_one_info_event(tmp_path: Path) -> None:
    got: dict[str, tuple[int, str, bytes]] = {}
    with LogCapture() as capture:
        async with stack(tmp_path) as st:
            port = st.relay.config.server.port
            for name, (data, _, _) in MALFORMED.items():
                client = await RawClient.connect(port)
                with contextlib.suppress(ConnectionError):
                    await client.send(data)  # refused mid-send: the answer is still there
                raw = await client.read_until_closed(timeout=5)
                client.close()
                [response] = parse_responses(raw)
                assert response.headers["content-type"].startswith("application/json"), name
                got[name] = (response.status, response.json()["error"]["code"], raw)
    for name, (_, status, code) in MALFORMED.items():
        assert got[name][:2] == (status, code), name
        assert TOKEN_MARK.encode() not in got[name][2], name
    text = capture.text
    refused = [e for e in json_events(text) if e["event"] == "http.parse_refused"]
    assert len(refused) == len(MALFORMED)
    assert all(e["level"] == "info" and e["peer"] == "127.0.0.1" for e in refused)
    assert {e["status"] for e in refused} == {400, 414, 431}
    assert TOKEN_MARK not in text
    assert "Traceback" not in text
    assert not [e for e in json_events(text) if e["level"] in ("error", "critical")]


# --------------------------------------------------------------------------- identity headers

SPOOFED = {
    "X-Real-IP": "6.6.6.6", "True-Client-IP": "6.6.6.6", "X-Client-IP": "6.6.6.6",
    "CF-Connecting-IP": "6.6.6.6", "X-Forwarded-For": "6.6.6.6",
    "X-Forwarded-Port": "666", "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Proto": "gopher", "X-Forwarded-Prefix": "/evil", "Forwarded": "for=6.6.6.6",
    "X-Original-URL": "/admin", "X-Rewrite-URL": "/admin",
}


def _echo_host() -> web.Application:
    async def http(request: web.Request) -> web.Response:
        return web.json_response(dict(request.headers))

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket_ = web.WebSocketResponse()
        await socket_.prepare(request)
        await socket_.send_str(json.dumps(dict(request.headers)))
        await socket_.close()
        return socket_

    app = web.Application()
    app.router.add_get("/headers", http)
    app.router.add_get("/ws-headers", ws)
    return app


async def _seen_by_host(st: object) -> tuple[dict[str, str], dict[str, str]]:
    from tests.harness import Stack

    assert isinstance(st, Stack)
    headers = {**st.auth(), **SPOOFED}
    async with st.client.get(st.url("/headers"), headers=headers) as resp:
        assert resp.status == 200
        over_http = await resp.json()
    async with st.client.ws_connect(st.url("/ws-headers"), headers=headers) as ws:
        msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.TEXT
        over_ws = json.loads(msg.data)
    return over_http, over_ws


async def test_client_identity_headers_never_reach_the_host(tmp_path: Path) -> None:
    async with stack(tmp_path, host_app=_echo_host()) as st:
        for seen in await _seen_by_host(st):
            lower = {k.lower(): v for k, v in seen.items()}
            for name, value in SPOOFED.items():
                assert lower.get(name.lower()) != value, (name, seen)
            for name in ("x-real-ip", "true-client-ip", "x-client-ip", "cf-connecting-ip",
                         "x-forwarded-port", "x-original-url", "x-rewrite-url", "forwarded"):
                assert name not in lower, (name, seen)
            # The relay's own values, set after dropping the client's.
            assert lower["x-forwarded-for"] == "127.0.0.1"
            assert lower["x-forwarded-host"] == f"127.0.0.1:{st.relay.config.server.port}"


async def test_a_trusted_proxy_may_pass_identity_headers(tmp_path: Path) -> None:
    async with stack(tmp_path, {"server": {"trust_forwarded": True}},
                     host_app=_echo_host()) as st:
        for seen in await _seen_by_host(st):
            lower = {k.lower(): v for k, v in seen.items()}
            assert lower["x-real-ip"] == "6.6.6.6"
            assert lower["x-forwarded-port"] == "666"
            assert lower["x-forwarded-for"] == "6.6.6.6, 127.0.0.1"  # the chain, extended


# --------------------------------------------------------------------------- WebSocket limit


@pytest.mark.parametrize("size", [4096])
async def test_a_message_of_exactly_the_limit_passes_one_more_is_1009(
    tmp_path: Path, size: int,
) -> None:
    async with (
        stack(tmp_path, {"tunnel": {"max_ws_message_bytes": size}}) as st,
        st.client.ws_connect(st.url("/ws"), headers=st.auth()) as ws,
    ):
        await ws.send_bytes(b"m" * size)
        echoed = await ws.receive(timeout=5)
        assert echoed.type is WSMsgType.BINARY and echoed.data == b"m" * size
        await ws.send_bytes(b"m" * (size + 1))
        closed = await ws.receive(timeout=5)
        assert closed.type is WSMsgType.CLOSE
        assert closed.data == 1009
        assert str(size) in closed.extra and "too big" in closed.extra


# --------------------------------------------------------------------------- as `relay serve` runs


async def test_the_edge_holds_in_a_relay_serve_process_on_uvloop(tmp_path: Path) -> None:
    """`relay serve` runs on uvloop, whose transports are not asyncio's: same behaviour."""
    path = write_config(tmp_path, {"server": {"header_timeout_s": 0.3,
                                              "max_body_bytes": 1 << 20}})
    port = load_config(path, env={}).server.port
    proc = spawn_relay_process(path)
    try:
        await wait_http(f"http://127.0.0.1:{port}/healthz", timeout=30)
        slow = await RawClient.connect(port)
        await slow.send(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Partial: ")
        assert [r.status for r in parse_responses(await slow.read_until_closed())] == [408]
        slow.close()

        bad = await RawClient.connect(port)
        await bad.send(b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"t" * 20000
                       + b"\r\n\r\n")
        [refused] = parse_responses(await bad.read_until_closed())
        bad.close()
        assert refused.status == 431 and b"ttttt" not in refused.body

        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            sock.sendall(f"POST /hosts/{HOST}/sink HTTP/1.1\r\nHost: relay\r\n"
                         f"Content-Length: {8 << 30}\r\n\r\n".encode())
            sent = await asyncio.to_thread(_drain_blocked_send, sock, 256 << 20, 10.0)
            sock.settimeout(5)
            data = b""
            with contextlib.suppress(ConnectionResetError):
                while piece := await asyncio.to_thread(sock.recv, 65536):
                    data += piece
        finally:
            sock.close()
        assert [r.status for r in parse_responses(data)] == [413]
        assert sent < 64 << 20, sent
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 10)
