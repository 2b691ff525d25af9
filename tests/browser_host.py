"""A host service that behaves like a small web app, for the browser tests.

It serves pages with a relative link, a root-relative link (built from ``X-Forwarded-Prefix``
as a prefix-aware app would) and a form; sets cookies; redirects every way a host can; streams
SSE; echoes WebSocket messages; and reports what it received (cookies, query, headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from tests.harness import RunningAgent, RunningHost, Stack, stack, start_agent, start_host

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

NAME: web.AppKey[str] = web.AppKey("name", str)
ORIGIN: web.AppKey[list[str]] = web.AppKey("origin", list)
SEEN: web.AppKey[list[tuple[str, str]]] = web.AppKey("seen", list)


@web.middleware
async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request that reached the host, as (method, path)."""
    request.app[SEEN].append((request.method, request.path))
    return await handler(request)


def _page(request: web.Request, title: str, body: str = "") -> web.Response:
    prefix = request.headers.get("X-Forwarded-Prefix", "")
    host = request.app[NAME]
    text = f"""<!doctype html><html><head><title>{title}</title></head><body>
<h1 id="title">{title}</h1><p id="host">{host}</p>
<a id="relative" href="next">next</a>
<a id="root" href="{prefix}/other">other</a>
<form id="form" method="post" action="submit"><input name="word" value="hello"></form>
<pre id="cookie">{html.escape(request.headers.get("Cookie", ""))}</pre>
{body}</body></html>"""
    return web.Response(text=text, content_type="text/html")


async def page(request: web.Request) -> web.Response:
    response = _page(request, "page")
    # A host that thinks it owns the whole origin: Path=/ and a Domain.
    response.headers.add("Set-Cookie", f"sid={request.app[NAME]}; Path=/; HttpOnly")
    response.headers.add("Set-Cookie", f"pref={request.app[NAME]}; Domain=127.0.0.1; Path=/app")
    return response


async def named(request: web.Request) -> web.Response:
    return _page(request, request.match_info["name"])


async def submit(request: web.Request) -> web.Response:
    form = await request.post()
    word = str(form.get("word", ""))
    # Post/redirect/get with a root-relative Location, as most frameworks write it.
    raise web.HTTPSeeOther(f"/done?word={word}")


async def api(request: web.Request) -> web.Response:
    response = web.json_response({
        "host": request.app[NAME],
        "cookie": request.headers.get("Cookie", ""),
        "query": request.query_string,
        "prefix": request.headers.get("X-Forwarded-Prefix", ""),
        "authorization": request.headers.get("Authorization", ""),
    })
    # The host's own CORS attempt: the relay's grant must replace it.
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.headers["Access-Control-Expose-Headers"] = "X-Host-Extra"
    response.headers["X-Host-Extra"] = "extra"
    response.headers["Vary"] = "Accept-Encoding"
    return response


async def redirect(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    own = request.app[ORIGIN][0] if request.app[ORIGIN] else ""
    relay = f"{request.headers.get('X-Forwarded-Proto', 'http')}://" \
            f"{request.headers.get('X-Forwarded-Host', '')}"
    target = {
        "own": f"{own}/landing?from=own",
        "root": "/landing?from=root",
        "relative": "landing?from=relative",
        "relay": f"{relay}/landing?from=relay",
        "foreign": "https://example.invalid/elsewhere",
    }[kind]
    raise web.HTTPFound(target)


async def sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    if request.method == "HEAD":
        # aiohttp would write these bytes even on a HEAD; a well-behaved host must not.
        await response.write_eof()
        return response
    for n in range(3):
        await response.write(f"data: event {n}\n\n".encode())
        await asyncio.sleep(0.01)
    await response.write_eof()
    return response


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(f"echo:{msg.data}")
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(2)
    return web.Response(text="late")


async def head_body(request: web.Request) -> web.Response:
    return web.Response(body=b"0123456789", content_type="application/octet-stream")


def build_browser_host(name: str) -> web.Application:
    app = web.Application(middlewares=[record])
    app[NAME] = name
    app[ORIGIN] = []  # filled in once the port is known
    app[SEEN] = []
    app.router.add_get("/page", page)
    app.router.add_get("/api", api)
    app.router.add_get("/sse", sse)
    app.router.add_get("/ws", ws_echo)
    app.router.add_get("/bytes", head_body)
    app.router.add_get("/slow", slow)
    app.router.add_post("/submit", submit)
    app.router.add_get("/redirect/{kind}", redirect)
    app.router.add_get("/{name}", named)
    return app


@dataclass
class BrowserStack:
    """A relay with CORS for ``app_origin``, host A (``acme:laptop``) and host B (``acme:desk``)."""

    base: Stack
    desk: RunningHost
    desk_agent: RunningAgent
    app_origin: str

    @property
    def relay(self) -> str:
        return self.base.relay.url

    def url(self, host: str, path: str) -> str:
        return f"{self.base.relay.url}/hosts/acme:{host}{path}"

    def seen(self, host: str) -> list[tuple[str, str]]:
        running = self.base.host if host == "laptop" else self.desk
        return running.runner.app[SEEN]


@contextlib.asynccontextmanager
async def browser_stack(tmp_path: Path, app_origin: str,
                        sections: dict[str, dict[str, Any]] | None = None,
                        ) -> AsyncIterator[BrowserStack]:
    merged: dict[str, dict[str, Any]] = {"cors": {"allow_origins": [app_origin]}}
    for section, values in (sections or {}).items():
        merged.setdefault(section, {}).update(values)
    async with stack(tmp_path, merged, host_app=build_browser_host("laptop")) as base:
        base.host.runner.app[ORIGIN].append(base.host.url)
        desk = await start_host(build_browser_host("desk"))
        desk.runner.app[ORIGIN].append(desk.url)
        desk_agent = await start_agent(base.relay.ws_url, "acme:desk", desk.url,
                                       token=base.relay.agent_token("acme:desk"))
        try:
            yield BrowserStack(base, desk, desk_agent, app_origin)
        finally:
            await desk_agent.stop()
            await desk.stop()
