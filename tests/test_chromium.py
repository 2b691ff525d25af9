"""Browsers as first-class clients, in a real headless Chromium (Debian's ``chromium``).

An app page on another origin (``http://localhost:<port>``; the relay is
``http://127.0.0.1:<port>``) uses the relay the way a web developer would; then a person opens a
host's page by link and clicks around on it. tests/test_browsers.py pins the same rules header
by header with a plain HTTP client.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

from tests.browser_host import browser_stack
from tests.chromium import Page, chromium, chromium_process  # noqa: F401  (the fixtures)
from tests.harness import RunningHost, free_port, start_host

APP_PAGE = "<!doctype html><html><body><h1>app</h1></body></html>"

# One browser for the module (tests.chromium): its tests and fixtures share the module's loop.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module")
async def app_site() -> AsyncIterator[RunningHost]:
    """The browser app's own origin: a blank page on localhost (not the relay's 127.0.0.1)."""
    app = web.Application()

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=APP_PAGE, content_type="text/html")

    app.router.add_get("/", index)
    running = await start_host(app, port=free_port())
    yield running
    await running.stop()


def js(value: object) -> str:
    return json.dumps(value)


async def test_cross_origin_app_fetches_reads_errors_streams_events_and_talks_websocket(
    tmp_path: Path, chromium: Page, app_site: RunningHost,  # noqa: F811
) -> None:
    app_origin = f"http://localhost:{app_site.port}"
    async with browser_stack(tmp_path, app_origin) as s:
        token = s.base.token()
        assert await chromium.navigate(app_origin + "/") == app_origin + "/"

        # fetch with a bearer token: a preflight the relay answers itself, then the JSON.
        got = await chromium.evaluate(f"""(async () => {{
            const r = await fetch({js(s.url("laptop", "/api?x=1"))},
                                  {{headers: {{Authorization: "Bearer " + {js(token)}}}}});
            return {{status: r.status, body: await r.json(),
                     extra: r.headers.get("X-Host-Extra")}};
        }})()""")
        assert got["status"] == 200
        assert got["body"]["host"] == "laptop" and got["body"]["query"] == "x=1"
        assert got["body"]["authorization"] == ""  # the bearer header never reaches the host
        assert got["extra"] == "extra"  # the host's own exposed header stays readable
        assert ("OPTIONS", "/api") not in s.seen("laptop")  # the preflight never got there

        # The relay's own errors are readable too: a JSON 401 and a 503 with Retry-After.
        denied = await chromium.evaluate(f"""(async () => {{
            const r = await fetch({js(s.url("laptop", "/api"))});
            return {{status: r.status, body: await r.json(),
                     auth: r.headers.get("WWW-Authenticate")}};
        }})()""")
        assert denied["status"] == 401
        assert denied["body"]["error"]["code"] == "unauthorized"
        assert denied["auth"].startswith("Bearer")
        offline = await chromium.evaluate(f"""(async () => {{
            const r = await fetch({js(s.url("offline", "/api"))},
                                  {{headers: {{Authorization: "Bearer " + {js(token)}}}}});
            return {{status: r.status, body: await r.json(),
                     retry: r.headers.get("Retry-After")}};
        }})()""")
        assert offline["status"] == 503
        assert offline["body"]["error"]["code"] == "host_offline"
        assert offline["retry"] == "5"

        # EventSource cannot set headers: ?token= on a GET.
        events = await chromium.evaluate(f"""new Promise((resolve, reject) => {{
            const got = [];
            const es = new EventSource({js(s.url("laptop", "/sse?token=" + token))});
            es.onmessage = (e) => {{
                got.push(e.data);
                if (got.length === 3) {{ es.close(); resolve(got); }}
            }};
            es.onerror = () => {{
                es.close();
                reject(new Error("sse failed after " + got.length));
            }};
        }})""")
        assert events == ["event 0", "event 1", "event 2"]
        sse_queries = [p for m, p in s.seen("laptop") if p == "/sse"]
        assert sse_queries  # reached the host (its query is checked in test_browsers.py)

        # A WebSocket channel from the app page.
        ws_url = s.url("laptop", "/ws?token=" + token).replace("http://", "ws://", 1)
        echoed = await chromium.evaluate(f"""new Promise((resolve, reject) => {{
            const ws = new WebSocket({js(ws_url)});
            ws.onopen = () => ws.send("ping");
            ws.onmessage = (e) => {{ resolve(e.data); ws.close(); }};
            ws.onerror = () => reject(new Error("websocket failed"));
        }})""")
        assert echoed == "echo:ping"


async def test_navigation_session_links_form_and_hosts_kept_apart(
    tmp_path: Path, chromium: Page, app_site: RunningHost,  # noqa: F811
) -> None:
    async with browser_stack(tmp_path, f"http://localhost:{app_site.port}") as s:
        token = s.base.token()
        text = "document.getElementById('{}').textContent"

        # A link with ?token= lands on the page with the token gone from the address bar.
        landed = await chromium.navigate(s.url("laptop", f"/page?token={token}&keep=1"))
        assert landed == s.url("laptop", "/page?keep=1")
        assert await chromium.evaluate(text.format("title")) == "page"
        assert await chromium.evaluate(text.format("cookie")) == ""  # nothing of ours reached it
        cookies = {c["name"]: c for c in await chromium.cookies(s.url("laptop", "/app/x"))}
        session = cookies["relay_session"]
        assert session["path"] == "/hosts/acme:laptop/"
        assert session["httpOnly"] and session["sameSite"] == "Lax"
        assert cookies["sid"]["path"] == "/hosts/acme:laptop/"
        assert cookies["pref"]["path"] == "/hosts/acme:laptop/app"
        assert "relay_session" not in await chromium.evaluate("document.cookie")

        # A relative link, a root-relative link (prefix-aware) and a form POST: by the cookie.
        assert await chromium.navigating("document.getElementById('relative').click()") == \
            s.url("laptop", "/next")
        assert await chromium.evaluate(text.format("title")) == "next"
        assert await chromium.evaluate(text.format("cookie")) == "sid=laptop"
        assert await chromium.navigating("document.getElementById('root').click()") == \
            s.url("laptop", "/other")
        assert await chromium.evaluate(text.format("title")) == "other"
        assert await chromium.navigating("document.getElementById('form').submit()") == \
            s.url("laptop", "/done?word=hello")
        assert await chromium.evaluate(text.format("title")) == "done"
        assert ("POST", "/submit") in s.seen("laptop")

        # Redirects to the host's own origin and to "/" stay under the host.
        assert await chromium.navigate(s.url("laptop", "/redirect/own")) == \
            s.url("laptop", "/landing?from=own")
        assert await chromium.navigate(s.url("laptop", "/redirect/root")) == \
            s.url("laptop", "/landing?from=root")

        # Host B: its own session; host A's cookies are never sent to it.
        await chromium.navigate(s.url("desk", f"/page?token={token}"))
        assert await chromium.navigate(s.url("desk", "/next")) == s.url("desk", "/next")
        assert await chromium.evaluate(text.format("cookie")) == "sid=desk"
        assert await chromium.evaluate(text.format("host")) == "desk"

        # Host A's session cookie does not open host B, even when planted on B's path.
        laptop_value = session["value"]
        await chromium.call("Network.setCookie", name="relay_session", value=laptop_value,
                            url=s.url("desk", "/"), path="/hosts/acme:desk/", httpOnly=True)
        status = await chromium.evaluate(
            f"fetch({js(s.url('desk', '/api'))}).then(r => r.status)")
        assert status == 401
        left = {c["name"] for c in await chromium.cookies(s.url("desk", "/"))}
        assert "relay_session" not in left  # the 401 cleared the bad cookie
        # ... while host A's session still works.
        assert await chromium.navigate(s.url("laptop", "/next")) == s.url("laptop", "/next")
        assert await chromium.evaluate(text.format("title")) == "next"
