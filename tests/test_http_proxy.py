"""HTTP through the real stack: client -> relay -> tunnel -> agent -> host service, and back."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from relay.agent.upstream import LocalOrigin
from relay.devhost import STREAMS, Streams, pattern_bytes
from relay.protocol import frames
from relay.protocol.frames import Flags, FrameType
from relay.tunnel.session import Role, SessionSettings, TunnelSession
from relay.tunnel.tunnel_socket import TunnelSocket
from tests.harness import Stack, eventually, host_app_with_hold, stack, start_agent, start_host

MiB = 1 << 20


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def error_code(resp: aiohttp.ClientResponse) -> str:
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body["error"]) == {"code", "message"} and body["error"]["message"]
    return str(body["error"]["code"])


async def inspect(s: Stack, path: str = "/inspect", **kwargs: Any) -> dict[str, Any]:
    method = kwargs.pop("method", "GET")
    headers = {**s.auth(), **kwargs.pop("headers", {})}
    url = kwargs.pop("url", None) or s.url(path)
    async with s.client.request(method, url, headers=headers, **kwargs) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


def header_names(seen: dict[str, Any]) -> set[str]:
    return {name.lower() for name, _ in seen["headers"]}


def host_streams(s: Stack) -> Streams:
    return s.host.runner.app[STREAMS]


def agent_channels(s: Stack) -> int:
    session = s.agent.agent.session
    return len(session.channels) if session is not None else 0


# -- basics ---------------------------------------------------------------------------------------


async def test_small_get_returns_the_hosts_body(full_stack: Stack) -> None:
    async with full_stack.client.get(full_stack.url("/small?size=300"),
                                     headers=full_stack.auth()) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "300"
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert await resp.read() == b"x" * 300


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_every_method_reaches_the_host_with_its_body(full_stack: Stack, method: str) -> None:
    seen = await inspect(full_stack, "/inspect/m", method=method, data=b"b" * 1234)
    assert seen["method"] == method
    assert seen["path"] == "/inspect/m"
    assert seen["body_size"] == 1234


async def test_head_gets_the_hosts_headers_and_no_body(full_stack: Stack) -> None:
    async with full_stack.client.head(full_stack.url("/small?size=777"),
                                      headers=full_stack.auth()) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "777"
        assert await resp.read() == b""
    # The connection is still good for the next request: no stray body bytes on it.
    seen = await inspect(full_stack)
    assert seen["method"] == "GET"


async def test_bodiless_requests_reach_the_host_without_a_body(full_stack: Stack) -> None:
    seen = await inspect(full_stack, "/inspect", method="DELETE")
    assert seen["body_size"] == 0
    assert "transfer-encoding" not in header_names(seen)


@pytest.mark.parametrize("status", [201, 204, 304, 404, 500])
async def test_statuses_pass_through(full_stack: Stack, status: int) -> None:
    async with full_stack.client.get(full_stack.url(f"/status/{status}"),
                                     headers=full_stack.auth()) as resp:
        assert resp.status == status
        body = await resp.read()
    assert body == (b"" if status in (204, 304) else f"status {status}\n".encode())


# -- bodies, byte exact ---------------------------------------------------------------------------


async def test_binary_upload_with_content_length_is_byte_exact(full_stack: Stack) -> None:
    payload = os.urandom(6 * MiB + 123)
    async with full_stack.client.post(full_stack.url("/digest"), data=payload,
                                      headers=full_stack.auth()) as resp:
        assert resp.status == 200
        assert await resp.json() == {"sha256": sha256(payload), "size": len(payload)}


async def test_chunked_binary_upload_is_byte_exact(full_stack: Stack) -> None:
    payload = os.urandom(5 * MiB + 7)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 100_003):
            yield payload[start:start + 100_003]

    async with full_stack.client.post(full_stack.url("/digest"), data=chunks(),
                                      headers=full_stack.auth()) as resp:
        assert resp.status == 200
        assert await resp.json() == {"sha256": sha256(payload), "size": len(payload)}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_binary_download_is_byte_exact(full_stack: Stack, chunked: bool) -> None:
    size = 8 * MiB + 17
    query = "?chunked=1" if chunked else ""
    async with full_stack.client.get(full_stack.url(f"/bytes/{size}{query}"),
                                     headers=full_stack.auth()) as resp:
        assert resp.status == 200
        if chunked:
            assert "Content-Length" not in resp.headers
            assert resp.headers["Transfer-Encoding"] == "chunked"
        else:
            assert resp.headers["Content-Length"] == str(size)
        body = await resp.read()
    assert len(body) == size
    assert sha256(body) == sha256(pattern_bytes(size))


async def test_compressed_body_passes_through_untouched(full_stack: Stack) -> None:
    async with full_stack.client.get(full_stack.url("/gzip?size=200000"),
                                     headers={**full_stack.auth(),
                                              "Accept-Encoding": "gzip"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Encoding"] == "gzip"
        body = await resp.read()
    assert resp.headers["Content-Length"] == str(len(body))
    assert gzip.decompress(body) == pattern_bytes(200000)


async def test_request_body_streams_so_the_host_answers_before_the_upload_ends(
    full_stack: Stack,
) -> None:
    """If the relay buffered the upload, the echo could never come back mid-upload."""
    echoed_first = asyncio.Event()
    upload_done_at: list[float] = []

    async def upload() -> AsyncIterator[bytes]:
        yield b"first-" * 1000
        await asyncio.wait_for(echoed_first.wait(), 10)
        for _ in range(5):
            yield b"later-" * 1000
        upload_done_at.append(time.monotonic())

    async with full_stack.client.post(full_stack.url("/echo"), data=upload(),
                                      headers=full_stack.auth()) as resp:
        assert resp.status == 200
        first = await asyncio.wait_for(resp.content.readexactly(6000), 10)
        first_at = time.monotonic()
        echoed_first.set()
        rest = await resp.read()
    assert first == b"first-" * 1000
    assert rest == b"later-" * 5000
    assert upload_done_at and first_at < upload_done_at[0]


async def test_sse_events_arrive_as_the_host_sends_them(full_stack: Stack) -> None:
    count, interval = 6, 0.15
    started = time.monotonic()
    arrivals: list[float] = []
    async with full_stack.client.get(full_stack.url(f"/sse?count={count}&interval={interval}"),
                                     headers=full_stack.auth()) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        buffer = b""
        async for data in resp.content.iter_any():
            buffer += data
            while b"\n\n" in buffer:
                _, buffer = buffer.split(b"\n\n", 1)
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) == count
    # The host needs interval * (count - 1) to send them all; the first must not wait for that.
    assert arrivals[0] < interval * count / 2
    assert arrivals[-1] - arrivals[0] >= interval * (count - 1) * 0.8


# -- headers and credentials ----------------------------------------------------------------------


async def test_hop_by_hop_request_headers_do_not_reach_the_host(full_stack: Stack) -> None:
    seen = await inspect(full_stack, headers={
        "Connection": "keep-alive, X-Hop-Request",
        "X-Hop-Request": "only-for-the-relay",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Upgrade": "h2c",
        "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
        "Proxy-Connection": "keep-alive",
        "X-End-To-End": "kept",
    })
    names = header_names(seen)
    for hop in ("x-hop-request", "keep-alive", "te", "upgrade", "proxy-authorization",
                "proxy-connection"):
        assert hop not in names, hop
    assert ["X-End-To-End", "kept"] in seen["headers"]
    connection = [v for n, v in seen["headers"] if n.lower() == "connection"]
    assert all("x-hop-request" not in v.lower() for v in connection)


async def test_upload_framing_is_per_hop(full_stack: Stack) -> None:
    seen = await inspect(full_stack, method="POST", data=b"z" * 5000)
    names = header_names(seen)
    assert "transfer-encoding" not in names
    assert ["Content-Length", "5000"] in seen["headers"]


async def test_hop_by_hop_response_headers_do_not_reach_the_client(full_stack: Stack) -> None:
    async with full_stack.client.get(full_stack.url("/hop"), headers=full_stack.auth()) as resp:
        assert resp.status == 200
        assert await resp.text() == "hop\n"
        names = {n.lower() for n in resp.headers}
        for hop in ("x-hop-secret", "keep-alive", "proxy-authenticate", "proxy-connection",
                    "trailer", "upgrade"):
            assert hop not in names, hop
        assert "x-hop-secret" not in resp.headers.get("Connection", "").lower()
        assert resp.headers["X-End-To-End"] == "kept"
        # Kept apart from other hosts on the relay's origin (tests/test_browsers.py has more).
        assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/hosts/acme:laptop/",
                                                     "b=2; Path=/hosts/acme:laptop/"]


async def test_authorization_never_reaches_the_host_and_its_own_token_param_does(
    full_stack: Stack,
) -> None:
    token = full_stack.token()
    url = URL(full_stack.url("/inspect") + "?a=1&token=the-hosts-own&b=2", encoded=True)
    seen = await inspect(full_stack, url=url, headers={"Authorization": f"Bearer {token}"})
    assert "authorization" not in header_names(seen)
    # With a bearer header, ``token`` is a parameter of the host's API, not a credential.
    assert seen["raw_query"] == "a=1&token=the-hosts-own&b=2"
    assert token not in repr(seen)


async def test_query_token_credential_never_reaches_the_host(full_stack: Stack) -> None:
    token = full_stack.token()
    url = URL(full_stack.url("/inspect") + f"?a=1&token={token}&%74oken={token}&b=2",
              encoded=True)
    async with full_stack.client.get(url) as resp:
        assert resp.status == 200, await resp.text()
        seen = await resp.json()
    assert seen["raw_query"] == "a=1&b=2"
    assert token not in repr(seen)


async def test_forwarded_headers_are_added_and_client_values_not_trusted(
    full_stack: Stack,
) -> None:
    seen = await inspect(full_stack, headers={"X-Forwarded-For": "203.0.113.66",
                                              "X-Forwarded-Host": "evil.example",
                                              "X-Forwarded-Proto": "gopher"})
    forwarded = {n.lower(): v for n, v in seen["headers"] if n.lower().startswith("x-forwarded")}
    port = full_stack.relay.config.server.port
    assert forwarded == {"x-forwarded-for": "127.0.0.1", "x-forwarded-proto": "http",
                         "x-forwarded-host": f"127.0.0.1:{port}",
                         "x-forwarded-prefix": "/hosts/acme:laptop"}


async def test_percent_encoded_path_and_query_reach_the_host_byte_exact(
    full_stack: Stack,
) -> None:
    path = "/inspect/a%20b/c%2Fd/%C3%A9t%C3%A9/~x;y=1/%25/plus+sign"
    query = "q=%26amp&r=a+b&s=%2B&empty=&flag&t=%E2%9C%93&u=%2F%3F%23"
    url = URL(full_stack.url(path) + "?" + query, encoded=True)
    seen = await inspect(full_stack, url=url)
    assert seen["path"] == path
    assert seen["raw_query"] == query


# -- refusals and failures ------------------------------------------------------------------------


async def test_host_offline_is_503_with_retry_after(full_stack: Stack) -> None:
    url = f"{full_stack.relay.url}/hosts/acme:nobody-home/"
    async with full_stack.client.get(url, headers=full_stack.auth()) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"].isdigit()
        assert await error_code(resp) == "host_offline"


async def test_host_without_a_head_in_time_is_504_host_timeout(tmp_path: Path) -> None:
    async with stack(tmp_path, sections={"tunnel": {"request_timeout_s": 0.3}}) as s:
        started = time.monotonic()
        async with s.client.get(s.url("/slow?delay=10"), headers=s.auth()) as resp:
            assert resp.status == 504
            assert await error_code(resp) == "host_timeout"
        assert time.monotonic() - started < 5
        # The relay gave up on the stream: the agent is told, and stops waiting for the host.
        await eventually(lambda: agent_channels(s) == 0)


async def test_past_the_stream_limit_a_request_waits_and_503s_when_its_wait_runs_out(
    tmp_path: Path,
) -> None:
    tunnel = {"max_streams": 2, "max_streams_per_subject": 2, "queue_timeout_s": 0.3}
    release = asyncio.Event()  # the host holds every request until the third one is refused
    async with stack(tmp_path, sections={"tunnel": tunnel},
                     host_app=host_app_with_hold(release)) as s:
        async def get() -> tuple[int, str]:
            async with s.client.get(s.url("/hold"), headers=s.auth()) as resp:
                if resp.status == 503:
                    assert resp.headers["Retry-After"].isdigit()
                    return resp.status, await error_code(resp)
                return resp.status, await resp.text()

        requests = [asyncio.ensure_future(get()) for _ in range(3)]
        done, _ = await asyncio.wait(requests, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*requests), 10)
        assert sorted(results) == [(200, "finally\n"), (200, "finally\n"), (503, "overloaded")]
        assert await get() == (200, "finally\n")  # the streams were given back


async def test_past_the_stream_limit_requests_wait_their_turn_and_complete(tmp_path: Path) -> None:
    tunnel = {"max_streams": 2, "max_streams_per_subject": 2, "queue_timeout_s": 5}
    async with stack(tmp_path, sections={"tunnel": tunnel}) as s:
        async def get() -> int:
            async with s.client.get(s.url("/slow?delay=0.1"), headers=s.auth()) as resp:
                await resp.read()
                return resp.status

        assert await asyncio.gather(*(get() for _ in range(6))) == [200] * 6


async def test_declared_body_over_the_limit_is_413(tmp_path: Path) -> None:
    async with stack(tmp_path, sections={"server": {"max_body_bytes": MiB}}) as s:
        async with s.client.post(s.url("/digest"), data=b"a" * MiB, headers=s.auth()) as resp:
            assert resp.status == 200  # exactly at the limit is fine
        async with s.client.post(s.url("/digest"), data=b"a" * (MiB + 1),
                                 headers=s.auth()) as resp:
            assert resp.status == 413
            assert await error_code(resp) == "payload_too_large"
        assert host_streams(s).active == 0


async def test_chunked_body_growing_over_the_limit_is_413(tmp_path: Path) -> None:
    async with stack(tmp_path, sections={"server": {"max_body_bytes": MiB}}) as s:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(40):
                yield b"c" * 65536

        async with s.client.post(s.url("/digest"), data=chunks(), headers=s.auth()) as resp:
            assert resp.status == 413
            assert await error_code(resp) == "payload_too_large"
        await eventually(lambda: agent_channels(s) == 0)


async def test_headers_over_the_limit_are_431(tmp_path: Path) -> None:
    async with stack(tmp_path, sections={"server": {"max_header_bytes": 4096}}) as s:
        small = {f"X-Pad-{i}": "p" * 500 for i in range(4)}
        async with s.client.get(s.url("/"), headers={**s.auth(), **small}) as resp:
            assert resp.status == 200
        big = {f"X-Pad-{i}": "p" * 1000 for i in range(5)}
        async with s.client.get(s.url("/"), headers={**s.auth(), **big}) as resp:
            assert resp.status == 431
            assert await error_code(resp) == "headers_too_large"


async def test_request_on_a_tunnel_that_just_died_is_refused_cleanly(full_stack: Stack) -> None:
    """The registry may still hold a tunnel whose session has failed (its socket broke)."""
    tunnel = full_stack.relay.state.registry.get(full_stack.host_id)
    assert tunnel is not None
    tunnel.session.fail_all(4410, "tunnel write failed")
    async with full_stack.client.get(full_stack.url("/"), headers=full_stack.auth()) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"].isdigit()
        assert await error_code(resp) == "host_offline"


async def test_expect_100_continue_upload_goes_through(full_stack: Stack) -> None:
    payload = os.urandom(300_000)
    async with full_stack.client.post(full_stack.url("/digest"), data=payload, expect100=True,
                                      headers=full_stack.auth()) as resp:
        assert resp.status == 200
        assert (await resp.json())["sha256"] == sha256(payload)


async def test_agent_killed_before_head_gives_502_tunnel_closed(tmp_path: Path) -> None:
    async with stack(tmp_path) as s:
        request = asyncio.ensure_future(s.client.get(s.url("/slow?delay=30"), headers=s.auth()))
        await eventually(lambda: agent_channels(s) == 1)
        started = time.monotonic()
        s.agent.task.cancel()
        resp = await asyncio.wait_for(request, 5)
        async with resp:
            assert resp.status == 502
            assert await error_code(resp) == "tunnel_closed"
        assert time.monotonic() - started < 3
        await relay_still_serves_other_hosts(s)


async def relay_still_serves_other_hosts(s: Stack) -> None:
    other = await start_agent(s.relay.ws_url, "acme:desk", s.host.url,
                              token=s.agent_token("acme:desk"))
    try:
        url = f"{s.relay.url}/hosts/acme:desk/small?size=5"
        async with s.client.get(url, headers=s.auth()) as resp:
            assert resp.status == 200
            assert await resp.read() == b"xxxxx"
    finally:
        await other.stop()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_tunnel_lost_mid_body_aborts_the_clients_connection(
    tmp_path: Path, chunked: bool
) -> None:
    async with stack(tmp_path) as s:
        query = "?interval=0.05" + ("&chunked=1" if chunked else "")
        received = 0
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.client.get(s.url(f"/drip/{64 * MiB}{query}"),
                                    headers=s.auth()) as resp:
                assert resp.status == 200
                async for data in resp.content.iter_any():
                    received += len(data)
                    if received >= 128 * 1024 and s.agent.agent.session is not None:
                        # The network drops under the agent: no close frame, nothing.
                        sink = s.agent.agent.session.sink
                        assert isinstance(sink, TunnelSocket)
                        sink.abort()
        assert 0 < received < 64 * MiB
        await relay_still_serves_other_hosts(s)


async def test_host_dying_mid_body_aborts_only_that_exchange(full_stack: Stack) -> None:
    s = full_stack
    connects = s.agent.agent.connects
    other = asyncio.ensure_future(s.client.get(s.url(f"/drip/{MiB}?interval=0.02"),
                                               headers=s.auth()))
    for after in (0, 1000):
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.client.get(s.url(f"/broken/100000?after={after}"),
                                    headers=s.auth()) as resp:
                assert resp.status == 200
                await resp.read()
    # The other stream on the same tunnel is untouched and the tunnel never dropped.
    async with await other as resp:
        assert sha256(await resp.read()) == sha256(pattern_bytes(MiB))
    assert s.agent.agent.connects == connects
    assert s.relay.state.registry.get(s.host_id) is not None


async def test_client_gone_mid_download_stops_the_hosts_stream(full_stack: Stack) -> None:
    s = full_stack
    async with s.client.get(s.url(f"/drip/{256 * MiB}?interval=0.02"),
                            headers=s.auth()) as resp:
        assert resp.status == 200
        await resp.content.readexactly(64 * 1024)
        assert host_streams(s).active == 1
        assert agent_channels(s) == 1
        resp.close()  # hang up mid-body
    await eventually(lambda: agent_channels(s) == 0)
    await eventually(lambda: host_streams(s).active == 0)
    assert host_streams(s).aborted == 1 and host_streams(s).finished == 0
    relay_session = s.relay.state.registry.get(s.host_id)
    assert relay_session is not None
    await eventually(lambda: len(relay_session.session.channels) == 0)


async def test_client_gone_before_the_head_stops_the_hosts_request(full_stack: Stack) -> None:
    s = full_stack
    request = asyncio.ensure_future(s.client.get(s.url("/slow?delay=30"), headers=s.auth()))
    await eventually(lambda: agent_channels(s) == 1)
    request.cancel()  # the client hangs up while the host is still thinking
    await eventually(lambda: agent_channels(s) == 0)
    tunnel = s.relay.state.registry.get(s.host_id)
    assert tunnel is not None and tunnel.session.channels == {}


async def test_client_gone_mid_upload_stops_the_hosts_request(full_stack: Stack) -> None:
    s = full_stack
    hang_up = asyncio.Event()

    async def upload() -> AsyncIterator[bytes]:
        yield b"u" * 100_000
        await hang_up.wait()
        yield b"never sent"

    request = asyncio.ensure_future(s.client.post(s.url("/digest"), data=upload(),
                                                  headers=s.auth()))
    await eventually(lambda: agent_channels(s) == 1)
    request.cancel()
    await eventually(lambda: agent_channels(s) == 0)
    async with s.client.get(s.url("/small?size=3"), headers=s.auth()) as resp:
        assert await resp.read() == b"xxx"


# -- the agent's side, deterministically ----------------------------------------------------------


async def test_agent_forwards_a_small_body_that_arrived_with_the_open(tmp_path: Path) -> None:
    """OPEN, body and FIN in one read: the agent must still send the body to the host."""
    host = await start_host()
    sent: list[bytes] = []

    async def send_frame(data: bytes) -> None:
        sent.append(data)

    origin = LocalOrigin(host.url, max_ws_message=1 << 20)
    session = TunnelSession(
        send_frame, SessionSettings(), role=Role.AGENT, name="agent",
        on_open=lambda ch, head: ch.session.spawn(origin.serve(ch, head), "serve"),
    )
    session.start()
    try:
        session.feed(frames.encode_json(FrameType.OPEN, 1, {
            "kind": "http", "method": "POST", "path": "/echo", "query": "",
            "headers": [["Content-Length", "5"]],
        }))
        session.feed(frames.encode(FrameType.DATA, 1, b"hello", Flags.FIN))

        def finished() -> bool:
            return any(f[0] == FrameType.DATA and f[1] & Flags.FIN for f in sent)

        await eventually(finished)
        decoded = [frames.decode(f, 1 << 20) for f in sent if f[0] != FrameType.PING]
        heads = [frames.decode_json(f) for f in decoded if f.type is FrameType.HEAD]
        body = b"".join(f.payload for f in decoded if f.type is FrameType.DATA)
        assert [h["status"] for h in heads] == [200]
        assert body == b"hello"
    finally:
        await session.close()
        await origin.close()
        await host.stop()
