"""Browsers as clients, end to end (real relay, agents and host services), header by header.

CORS, ``?token=`` on reads, navigation sessions, hosts kept apart on one origin, the bare-host
redirect and HEAD. tests/test_chromium.py runs the same flows in a real browser.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from relay.auth.session import SessionCookies, load_session_key
from relay.protocol import frames
from relay.protocol.frames import Flags, FrameType
from tests.browser_host import BrowserStack, browser_stack
from tests.clock import FakeClock
from tests.harness import LogCapture, Stack, stack
from tests.test_rogue_agent import RawTunnel

APP = "https://app.example.com"
NAV = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Site": "none", "Accept": "text/html"}


@pytest.fixture
async def bs(tmp_path: Path) -> AsyncIterator[BrowserStack]:
    async with browser_stack(tmp_path, APP, {"server": {"max_body_bytes": 1000}}) as running:
        yield running


def client(s: BrowserStack) -> aiohttp.ClientSession:
    return s.base.client


def bearer(s: BrowserStack, **kwargs: object) -> dict[str, str]:
    return {"Authorization": f"Bearer {s.base.token(**kwargs)}"}  # type: ignore[arg-type]


def grant_of(resp: aiohttp.ClientResponse) -> dict[str, str]:
    return {k.lower(): v for k, v in resp.headers.items() if k.lower().startswith("access-")}


def assert_granted(resp: aiohttp.ClientResponse, origin: str = APP) -> None:
    assert resp.headers.getall("Access-Control-Allow-Origin") == [origin]
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    exposed = [n.strip().lower() for n in resp.headers["Access-Control-Expose-Headers"].split(",")]
    assert {"retry-after", "www-authenticate", "server-timing"} <= set(exposed)
    assert "Origin" in [v.strip() for v in resp.headers["Vary"].split(",")]


# -- CORS -------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["acme:laptop", "acme:offline", "globex:laptop", "bad"])
async def test_preflight_is_answered_by_the_relay_without_token_or_host(
    bs: BrowserStack, host: str
) -> None:
    headers = {"Origin": APP, "Access-Control-Request-Method": "PUT",
               "Access-Control-Request-Headers": "authorization,content-type"}
    async with client(bs).options(f"{bs.relay}/hosts/{host}/api", headers=headers) as resp:
        assert resp.status == 204
        assert grant_of(resp) == {
            "access-control-allow-origin": APP,
            "access-control-allow-credentials": "true",
            "access-control-allow-methods": "PUT",
            "access-control-allow-headers": "authorization, content-type",
            "access-control-max-age": "600",
        }
        assert resp.headers["Vary"].startswith("Origin")
        assert await resp.read() == b""
    assert not [m for m, _ in bs.seen("laptop") if m == "OPTIONS"]


async def test_preflight_from_an_unlisted_origin_gets_no_grant(bs: BrowserStack) -> None:
    headers = {"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    async with client(bs).options(bs.url("laptop", "/api"), headers=headers) as resp:
        assert resp.status == 401  # an ordinary request without a token: the browser gives up
        assert not grant_of(resp)


async def test_proxied_answer_gets_the_relays_grant_instead_of_the_hosts(bs: BrowserStack) -> None:
    headers = {"Origin": APP, **bearer(bs)}
    async with client(bs).get(bs.url("laptop", "/api"), headers=headers) as resp:
        assert resp.status == 200
        assert_granted(resp)
        assert "X-Host-Extra" in resp.headers["Access-Control-Expose-Headers"]
        assert resp.headers.getall("Vary") == ["Accept-Encoding, Origin"]


async def test_unlisted_origin_gets_neither_the_relays_nor_the_hosts_grant(
    bs: BrowserStack,
) -> None:
    headers = {"Origin": "https://evil.example", **bearer(bs)}
    async with client(bs).get(bs.url("laptop", "/api"), headers=headers) as resp:
        assert resp.status == 200
        assert not grant_of(resp)  # the host's "*" is gone too: the relay owns CORS
        assert resp.headers["Vary"] == "Accept-Encoding, Origin"


async def test_relays_own_answers_carry_the_grant(bs: BrowserStack) -> None:
    c = client(bs)
    o = {"Origin": APP}
    cases: list[tuple[str, str, dict[str, str], int, bytes | None]] = [
        ("GET", bs.url("laptop", "/api"), o, 401, None),
        ("GET", bs.url("laptop", "/api"), {**o, **bearer(bs, orgs=("globex",))}, 403, None),
        ("GET", bs.url("laptop", "/nothing/here"), {**o, **bearer(bs)}, 404, None),
        ("POST", bs.url("laptop", "/api"), {**o, **bearer(bs)}, 413, b"x" * 2000),
        ("GET", bs.url("offline", "/api"), {**o, **bearer(bs)}, 503, None),
        ("GET", f"{bs.relay}/hosts/bad/api", {**o, **bearer(bs)}, 400, None),
        ("GET", f"{bs.relay}/hosts/acme:laptop", o, 308, None),
        ("HEAD", bs.url("laptop", "/api"), o, 401, None),
    ]
    for method, url, headers, status, body in cases:
        async with c.request(method, url, headers=headers, data=body,
                             allow_redirects=False) as resp:
            assert resp.status == status, (method, url)
            assert_granted(resp)
            if status == 503:
                assert resp.headers["Retry-After"] == "5"
            if status == 401:
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_host_timeout_carries_the_grant(tmp_path: Path) -> None:
    sections = {"tunnel": {"request_timeout_s": 0.3}}
    async with browser_stack(tmp_path, APP, sections) as s:
        url = s.url("laptop", "/slow")  # no response head for 2 s
        async with client(s).get(url, headers={"Origin": APP, **bearer(s)}) as resp:
            assert resp.status == 504
            assert_granted(resp)


async def test_without_cors_the_hosts_own_cors_headers_pass_untouched(tmp_path: Path) -> None:
    from tests.browser_host import build_browser_host

    async with stack(tmp_path, host_app=build_browser_host("laptop")) as s:
        headers = {"Origin": APP, **s.auth()}
        async with s.client.get(s.url("/api"), headers=headers) as resp:
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            assert resp.headers["Vary"] == "Accept-Encoding"
        preflight = {"Origin": APP, "Access-Control-Request-Method": "GET"}
        async with s.client.options(s.url("/api"), headers=preflight) as resp:
            assert resp.status == 401  # not the relay's to answer when CORS is off


# -- ?token= on reads -------------------------------------------------------------------------


async def test_query_token_works_on_get_and_head_and_is_removed(bs: BrowserStack) -> None:
    token = bs.base.token()
    url = URL(bs.url("laptop", f"/api?a=1&token={token}&b=2"), encoded=True)
    async with client(bs).get(url) as resp:
        assert resp.status == 200
        assert (await resp.json())["query"] == "a=1&b=2"
    async with client(bs).head(url) as resp:
        assert resp.status == 200
    async with client(bs).post(url) as resp:
        assert resp.status == 401  # a write must carry its credential in a header


async def test_with_a_bearer_header_the_token_parameter_is_the_hosts(bs: BrowserStack) -> None:
    url = URL(bs.url("laptop", "/api?token=host-api-key"), encoded=True)
    async with client(bs).get(url, headers=bearer(bs)) as resp:
        assert (await resp.json())["query"] == "token=host-api-key"


async def test_tokens_never_reach_the_logs(bs: BrowserStack) -> None:
    token = bs.base.token()
    with LogCapture() as logs:
        async with client(bs).get(bs.url("laptop", f"/page?token={token}"),
                                  headers=NAV, allow_redirects=False) as resp:
            cookie = resp.cookies["relay_session"].value
        async with client(bs).get(bs.url("laptop", "/api"),
                                  headers={"Cookie": f"relay_session={cookie}"}) as resp:
            assert resp.status == 200
        async with client(bs).get(bs.url("laptop", f"/sse?token={token}")) as resp:
            await resp.read()
    assert "http.access" in logs.text and "http.session_started" in logs.text
    assert token not in logs.text
    assert token.split(".")[2] not in logs.text  # not even the signature part


# -- navigation sessions ----------------------------------------------------------------------


async def test_navigation_with_query_token_redirects_into_a_session(bs: BrowserStack) -> None:
    token = bs.base.token(ttl_s=600)
    url = URL(bs.url("laptop", f"/page?x=1&token={token}&y=%20z"), encoded=True)
    async with client(bs).get(url, headers=NAV, allow_redirects=False) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/hosts/acme:laptop/page?x=1&y=%20z"
        assert resp.headers["Cache-Control"] == "no-store"
        set_cookie = resp.headers["Set-Cookie"]
    attributes = [a.strip() for a in set_cookie.split(";")]
    assert attributes[0].startswith("relay_session=")
    assert attributes[0].endswith("." + token)
    assert "Path=/hosts/acme:laptop/" in attributes
    assert "HttpOnly" in attributes and "SameSite=Lax" in attributes
    assert "Secure" not in attributes  # plain HTTP here
    max_age = int(next(a for a in attributes if a.startswith("Max-Age="))[8:])
    assert 590 <= max_age <= 600
    assert ("GET", "/page") not in bs.seen("laptop")  # the redirect is the relay's


async def test_html_accept_is_a_navigation_and_fetch_is_not(bs: BrowserStack) -> None:
    token = bs.base.token()
    url = bs.url("laptop", f"/page?token={token}")
    async with client(bs).get(url, headers={"Accept": "text/html,*/*"},
                              allow_redirects=False) as resp:
        assert resp.status == 303
    async with client(bs).get(url, headers={"Sec-Fetch-Mode": "cors", "Accept": "text/html"},
                              allow_redirects=False) as resp:
        assert resp.status == 200
        assert "relay_session" not in resp.headers.get("Set-Cookie", "")


async def test_session_cookie_is_secure_behind_a_trusted_https_proxy(tmp_path: Path) -> None:
    async with browser_stack(tmp_path, APP, {"server": {"trust_forwarded": True}}) as s:
        url = s.url("laptop", f"/page?token={s.base.token()}")
        headers = {**NAV, "X-Forwarded-Proto": "https"}
        async with client(s).get(url, headers=headers, allow_redirects=False) as resp:
            assert resp.headers["Set-Cookie"].endswith("; Secure")


async def test_untrusted_forwarded_proto_does_not_make_it_secure(bs: BrowserStack) -> None:
    url = bs.url("laptop", f"/page?token={bs.base.token()}")
    headers = {**NAV, "X-Forwarded-Proto": "https"}
    async with client(bs).get(url, headers=headers, allow_redirects=False) as resp:
        assert "Secure" not in resp.headers["Set-Cookie"]


async def test_no_session_without_access(bs: BrowserStack) -> None:
    url = bs.url("laptop", f"/page?token={bs.base.token(orgs=('globex',))}")
    async with client(bs).get(url, headers=NAV, allow_redirects=False) as resp:
        assert resp.status == 403
        assert "Set-Cookie" not in resp.headers


async def session_cookie(s: BrowserStack, host: str = "laptop", **token: object) -> str:
    url = s.url(host, f"/page?token={s.base.token(**token)}")  # type: ignore[arg-type]
    async with client(s).get(url, headers=NAV, allow_redirects=False) as resp:
        assert resp.status == 303
        return resp.cookies["relay_session"].value


async def test_the_session_cookie_authenticates_and_never_reaches_the_host(
    bs: BrowserStack,
) -> None:
    cookie = await session_cookie(bs)
    headers = {"Cookie": f"theme=dark; relay_session={cookie}; sid=laptop"}
    async with client(bs).get(bs.url("laptop", "/api"), headers=headers) as resp:
        assert resp.status == 200
        assert (await resp.json())["cookie"] == "theme=dark; sid=laptop"
    async with client(bs).post(bs.url("laptop", "/submit"), headers=headers,
                               data={"word": "w"}, allow_redirects=False) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/hosts/acme:laptop/done?word=w"


async def test_the_session_cookie_opens_a_websocket_channel(bs: BrowserStack) -> None:
    cookie = await session_cookie(bs)
    ws_url = bs.url("laptop", "/ws").replace("http://", "ws://", 1)
    async with client(bs).ws_connect(ws_url, headers={"Cookie": f"relay_session={cookie}"}) as ws:
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "echo:hi"


async def test_a_session_for_one_host_opens_no_other(bs: BrowserStack) -> None:
    cookie = await session_cookie(bs, "laptop")
    async with client(bs).get(bs.url("desk", "/api"),
                              headers={"Cookie": f"relay_session={cookie}"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "unauthorized"
        assert resp.headers["Set-Cookie"].startswith(
            "relay_session=; Path=/hosts/acme:desk/; Max-Age=0")
    assert ("GET", "/api") not in bs.seen("desk")


@pytest.mark.parametrize("mangle", [
    lambda v: v[:-2] + "xx",  # the token's signature
    lambda v: "9" + v,  # a longer life
    lambda v: v.split(".", 2)[2],  # a bare token
    lambda v: "garbage",
])
async def test_a_tampered_session_is_401_and_cleared(bs: BrowserStack, mangle: object) -> None:
    cookie = mangle(await session_cookie(bs))  # type: ignore[operator]
    async with client(bs).get(bs.url("laptop", "/api"),
                              headers={"Cookie": f"relay_session={cookie}"}) as resp:
        assert resp.status == 401
        assert "Max-Age=0" in resp.headers["Set-Cookie"]


async def test_a_session_ends_when_its_token_expires(bs: BrowserStack) -> None:
    relay = bs.base.relay
    # The relay's session cookies on a clock the test moves (the same key: the same cookies).
    clock = FakeClock(time.time())
    relay.state.sessions = SessionCookies(load_session_key(relay.config), clock=clock)
    cookie = await session_cookie(bs, ttl_s=60)
    exp = int(cookie.split(".", 1)[0])  # the token's exp, which the cookie carries

    async def status() -> int:
        async with client(bs).get(bs.url("laptop", "/api"),
                                  headers={"Cookie": f"relay_session={cookie}"}) as resp:
            return resp.status

    clock.now = exp - 0.5
    assert await status() == 200
    clock.now = exp
    # The token itself has a minute left, and the verifier a clock leeway: the cookie has none.
    assert await status() == 401


async def test_precedence_header_then_query_then_cookie(bs: BrowserStack) -> None:
    cookie = await session_cookie(bs)
    with_cookie = {"Cookie": f"relay_session={cookie}"}
    async with client(bs).get(bs.url("laptop", "/api"),
                              headers={**with_cookie, "Authorization": "Bearer bad"}) as resp:
        assert resp.status == 401  # a bad header is not passed over for the cookie
    async with client(bs).get(bs.url("laptop", "/api?token=bad"), headers=with_cookie) as resp:
        assert resp.status == 401
    async with client(bs).get(bs.url("laptop", "/api"),
                              headers={"Cookie": "relay_session=bad", **bearer(bs)}) as resp:
        assert resp.status == 200  # the header wins; the cookie is not even looked at
        assert (await resp.json())["cookie"] == ""


async def test_a_sibling_site_cannot_ride_the_session(bs: BrowserStack) -> None:
    cookie = await session_cookie(bs)
    headers = {"Cookie": f"relay_session={cookie}", "Sec-Fetch-Site": "same-site",
               "Sec-Fetch-Mode": "navigate"}
    async with client(bs).post(bs.url("laptop", "/submit"), headers=headers,
                               data={"word": "w"}, allow_redirects=False) as resp:
        assert resp.status == 401
    async with client(bs).get(bs.url("laptop", "/next"), headers=headers) as resp:
        assert resp.status == 200  # a top-level link from there is fine, as with Lax


# -- hosts kept apart -------------------------------------------------------------------------


async def test_host_cookies_and_redirects_stay_under_the_host(bs: BrowserStack) -> None:
    c, auth = client(bs), bearer(bs)
    async with c.get(bs.url("laptop", "/page"), headers=auth) as resp:
        assert resp.headers.getall("Set-Cookie") == [
            "sid=laptop; HttpOnly; Path=/hosts/acme:laptop/",
            "pref=laptop; Path=/hosts/acme:laptop/app",
        ]
    expected = {
        "own": "/hosts/acme:laptop/landing?from=own",  # the agent made it root-relative
        "root": "/hosts/acme:laptop/landing?from=root",
        "relative": "landing?from=relative",
        "relay": f"{bs.relay}/hosts/acme:laptop/landing?from=relay",
        "foreign": "https://example.invalid/elsewhere",
    }
    for kind, location in expected.items():
        async with c.get(bs.url("laptop", f"/redirect/{kind}"), headers=auth,
                         allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == location, kind
            assert bs.base.host.url not in resp.headers["Location"]


async def test_host_learns_its_prefix_and_clients_cannot_forge_it(bs: BrowserStack) -> None:
    headers = {**bearer(bs), "X-Forwarded-Prefix": "/evil"}
    async with client(bs).get(bs.url("desk", "/api"), headers=headers) as resp:
        assert (await resp.json())["prefix"] == "/hosts/acme:desk"


async def test_bare_host_path_redirects_to_the_slash_keeping_the_query(bs: BrowserStack) -> None:
    for method in ("GET", "HEAD"):
        async with client(bs).request(method, f"{bs.relay}/hosts/acme:laptop?a=1&b=%20",
                                      allow_redirects=False) as resp:
            assert resp.status == 308
            assert resp.headers["Location"] == "/hosts/acme:laptop/?a=1&b=%20"
    async with client(bs).get(f"{bs.relay}/hosts/not-a-host", allow_redirects=False) as resp:
        assert resp.status == 400
    async with client(bs).post(f"{bs.relay}/hosts/acme:laptop", allow_redirects=False) as resp:
        assert resp.status == 401  # only reads are redirected; a POST is an ordinary request


# -- HEAD -------------------------------------------------------------------------------------


async def read_response(reader: asyncio.StreamReader, *, head: bool) -> tuple[int, dict[str, str],
                                                                            bytes]:
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = raw.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), f"not a status line: {lines[0]!r}"
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:]
                                                    if line)}
    if head or status in (204, 304):
        return status, headers, b""
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).strip(), 16)
            chunk = await asyncio.wait_for(reader.readexactly(size + 2), 5)
            if size == 0:
                return status, headers, body
            body += chunk[:-2]
    return status, headers, await asyncio.wait_for(
        reader.readexactly(int(headers.get("content-length", "0"))), 5)


async def test_head_answers_never_carry_a_body_on_a_keep_alive_connection(
    bs: BrowserStack,
) -> None:
    port = bs.base.relay.config.server.port
    token = bs.base.token()
    auth = f"Authorization: Bearer {token}\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        requests = [
            ("HEAD", "/hosts/acme:laptop/bytes", auth),  # proxied, with a length
            ("HEAD", "/hosts/acme:laptop/sse", auth),  # proxied, streamed
            ("HEAD", "/hosts/acme:laptop/api", ""),  # the relay's own 401
            ("HEAD", "/hosts/acme:offline/api", auth),  # the relay's own 503
            ("HEAD", "/hosts/acme:laptop", ""),  # the relay's 308
            ("GET", "/hosts/acme:laptop/bytes", auth),  # and the next answer parses
        ]
        writer.write(b"".join(
            f"{m} {p} HTTP/1.1\r\nHost: relay\r\nOrigin: {APP}\r\n{a}\r\n".encode()
            for m, p, a in requests))
        await writer.drain()
        answers = [await read_response(reader, head=m == "HEAD") for m, _, _ in requests]
        assert [status for status, _, _ in answers] == [200, 200, 401, 503, 308, 200]
        assert answers[0][1]["content-length"] == "10"  # HEAD reports the GET's length
        assert answers[2][1]["content-type"].startswith("application/json")
        assert all(h["access-control-allow-origin"] == APP for _, h, _ in answers)
        assert answers[-1][2] == b"0123456789"
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        await writer.drain()
        status, _, body = await read_response(reader, head=False)
        assert status == 200 and b"ok" in body
    finally:
        writer.close()


async def test_a_body_an_agent_sends_for_a_head_never_reaches_the_client(
    full_stack: Stack,
) -> None:
    s = full_stack
    tunnel = await RawTunnel.connect(s.client, s.relay, "acme:rogue", s.agent_token("acme:rogue"))
    reader, writer = await asyncio.open_connection("127.0.0.1", s.relay.config.server.port)
    try:
        auth = f"Authorization: Bearer {s.token()}\r\n"
        writer.write(f"HEAD /hosts/acme:rogue/x HTTP/1.1\r\nHost: r\r\n{auth}\r\n".encode())
        await writer.drain()
        await tunnel.serve_http(b"BODY-ON-HEAD")
        # A streamed one too: a HEAD with a length, then more bytes than it.
        writer.write(f"HEAD /hosts/acme:rogue/y HTTP/1.1\r\nHost: r\r\n{auth}\r\n".encode())
        await writer.drain()
        opened = await tunnel.expect(FrameType.OPEN)
        await tunnel.send(frames.encode_json(FrameType.HEAD, opened.stream_id, {
            "status": 200, "headers": [["Content-Length", "3"], ["Content-Type", "text/plain"]]}))
        await tunnel.send(frames.encode(FrameType.DATA, opened.stream_id, b"abc"))
        await tunnel.send(frames.encode(FrameType.DATA, opened.stream_id, b"def", Flags.FIN))
        writer.write(f"GET /hosts/acme:laptop/ HTTP/1.1\r\nHost: r\r\n{auth}\r\n".encode())
        await writer.drain()
        first = await read_response(reader, head=True)
        second = await read_response(reader, head=True)
        third = await read_response(reader, head=False)
        assert (first[0], second[0], third[0]) == (200, 200, 200)
        assert second[1]["content-length"] == "3"
        assert b"BODY" not in third[2] and b"abc" not in third[2]
    finally:
        writer.close()
        await tunnel.close()
