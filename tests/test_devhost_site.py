"""The devhost's browser site: a page, a form, redirects, a cookie and an ETag, direct and
through a real relay and agent."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from relay.devhost import ETAG
from tests.harness import RunningHost, stack, start_host


@pytest.fixture
async def host() -> AsyncIterator[RunningHost]:
    running = await start_host()
    try:
        yield running
    finally:
        await running.stop()


async def test_page_has_a_relative_link_a_root_relative_link_and_a_form(
    host: RunningHost,
) -> None:
    async with aiohttp.ClientSession() as client, client.get(f"{host.url}/page") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        text = await resp.text()
    assert re.search(r'id="relative" href="etag"', text)
    assert re.search(r'id="root-relative" href="/cookie"', text)
    assert re.search(r'<form id="form" method="post" action="/form">', text)
    async with aiohttp.ClientSession() as client, client.post(
        f"{host.url}/form", data={"name": "<b>ann</b>"}
    ) as resp:
        assert resp.status == 200
        assert "name = &lt;b&gt;ann&lt;/b&gt;" in await resp.text()  # escaped, not injected


async def test_redirects_root_relative_and_absolute_to_its_own_origin(host: RunningHost) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{host.url}/redirect/root", allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"] == "/page"
        # Whatever Host the request named, the absolute location is the service's own origin.
        async with client.get(f"{host.url}/redirect/absolute", allow_redirects=False,
                              headers={"Host": "relay.example"}) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == f"{host.url}/page"


async def test_cookie_is_set_and_counted(host: RunningHost) -> None:
    # unsafe=True: aiohttp's jar otherwise ignores cookies from an IP-address host.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        async with client.get(f"{host.url}/cookie") as resp:
            assert (await resp.json())["visits"] == 1
            set_cookie = resp.headers["Set-Cookie"]
        assert "devhost_visits=1" in set_cookie and "HttpOnly" in set_cookie
        assert "Path=/" in set_cookie
        async with client.get(f"{host.url}/cookie") as resp:  # the jar sends it back
            assert (await resp.json())["visits"] == 2


async def test_etag_answers_304_through_the_relay(tmp_path: Path) -> None:
    async with stack(tmp_path) as s:
        async with s.client.get(s.url("/etag"), headers=s.auth()) as resp:
            assert resp.status == 200 and resp.headers["ETag"] == ETAG
            assert await resp.read()
        async with s.client.get(s.url("/etag"),
                                headers={**s.auth(), "If-None-Match": ETAG}) as resp:
            assert resp.status == 304 and resp.headers["ETag"] == ETAG
            assert await resp.read() == b""
        async with s.client.get(s.url("/etag"),
                                headers={**s.auth(), "If-None-Match": '"stale"'}) as resp:
            assert resp.status == 200
        async with s.client.get(s.url("/page"), headers=s.auth()) as resp:
            assert resp.status == 200 and "<form" in await resp.text()
