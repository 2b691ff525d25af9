"""A sample host service for demos and tests: echo, downloads, SSE, WebSocket, slow answers,
and a small browser site (a page with links and a form, redirects, a cookie, an ETag).

Run it with ``python -m relay.devhost --port 3000``. It stands in for the desktop's local
service behind an agent; nothing in the relay or the agent depends on it.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gzip
import hashlib
import html
import json
import sys
from dataclasses import dataclass

from aiohttp import WSMsgType, web

CHUNK = 64 * 1024


@dataclass
class Streams:
    """What the streaming endpoints are doing, so tests can see a stream stop on the host."""

    active: int = 0  # response bodies being written right now
    finished: int = 0  # ... that reached their end
    aborted: int = 0  # ... that stopped early (the agent dropped the connection)


STREAMS: web.AppKey[Streams] = web.AppKey("devhost_streams", Streams)


async def _stream_body(request: web.Request, response: web.StreamResponse, size: int,
                       interval: float = 0.0) -> None:
    """Write ``size`` pattern bytes (pausing ``interval`` between chunks), counted in STREAMS."""
    if request.method == "HEAD":
        # A HEAD answer has a head only: aiohttp would put write()'s bytes on the wire anyway,
        # where a client's pooled connection reads them as the next response.
        await response.write_eof()
        return
    streams = request.app[STREAMS]
    streams.active += 1
    try:
        sent = 0
        while sent < size:
            piece = pattern_bytes(min(CHUNK, size - sent), sent)
            await response.write(piece)
            sent += len(piece)
            if interval:
                await asyncio.sleep(interval)
        await response.write_eof()
        streams.finished += 1
    except BaseException:
        streams.aborted += 1
        raise
    finally:
        streams.active -= 1


def pattern_bytes(size: int, offset: int = 0) -> bytes:
    """Deterministic, non-repeating-looking bytes so corruption and truncation show up."""
    block = bytes((i * 7 + 13) % 256 for i in range(251))
    start = offset % 251
    reps = (size + start) // 251 + 2
    return (block * reps)[start:start + size]


async def echo(request: web.Request) -> web.StreamResponse:
    """Stream the request body back as it arrives, with a digest of what was received."""
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    await response.prepare(request)
    async for data in request.content.iter_any():
        await response.write(data)
    await response.write_eof()
    return response


async def digest(request: web.Request) -> web.Response:
    hasher = hashlib.sha256()
    size = 0
    async for data in request.content.iter_any():
        hasher.update(data)
        size += len(data)
    return web.json_response({"sha256": hasher.hexdigest(), "size": size})


async def sink(request: web.Request) -> web.Response:
    """``/sink?pause=S``: read a little of the upload, stop reading for S seconds, then digest.

    Stands in for a host service that consumes uploads slower than the client sends them.
    """
    pause = float(request.query.get("pause", "1"))
    hasher = hashlib.sha256()
    first = await request.content.read(CHUNK)
    hasher.update(first)
    size = len(first)
    await asyncio.sleep(pause)
    async for data in request.content.iter_any():
        hasher.update(data)
        size += len(data)
    return web.json_response({"sha256": hasher.hexdigest(), "size": size})


async def gzipped(request: web.Request) -> web.Response:
    """A body the host compressed itself: proxies must pass it on untouched."""
    body = gzip.compress(pattern_bytes(int(request.query.get("size", "100000"))), mtime=0)
    return web.Response(body=body, headers={"Content-Type": "application/octet-stream",
                                            "Content-Encoding": "gzip"})


async def download(request: web.Request) -> web.StreamResponse:
    size = int(request.match_info["size"])
    chunked = request.query.get("chunked") == "1"
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if not chunked:
        response.content_length = size
    await response.prepare(request)
    await _stream_body(request, response, size)
    return response


async def drip(request: web.Request) -> web.StreamResponse:
    """``/drip/<size>?interval=S[&chunked=1]``: a slow download, a 64 KiB chunk per interval."""
    size = int(request.match_info["size"])
    interval = float(request.query.get("interval", "0.1"))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.query.get("chunked") != "1":
        response.content_length = size
    await response.prepare(request)
    await _stream_body(request, response, size, interval)
    return response


async def broken(request: web.Request) -> web.StreamResponse:
    """``/broken/<size>?after=N``: promise ``size`` bytes, send the head and ``after`` bytes, die.

    Stands in for a host service that crashes mid-response (``after=0``: right after its head).
    """
    size = int(request.match_info["size"])
    after = int(request.query.get("after", "0"))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    if after:
        await response.write(pattern_bytes(after))
    else:
        writer = response._payload_writer  # aiohttp defers the head to the first body write
        if writer is not None:
            writer.send_headers()
    await asyncio.sleep(0.2)
    if request.transport is not None:
        request.transport.abort()
    raise asyncio.CancelledError


async def hop_headers(request: web.Request) -> web.Response:
    """A response carrying hop-by-hop fields a proxy must not pass on."""
    response = web.Response(text="hop\n")
    response.headers["Connection"] = "keep-alive, X-Hop-Secret"
    response.headers["X-Hop-Secret"] = "host-internal"
    response.headers["Keep-Alive"] = "timeout=5"
    response.headers["Proxy-Authenticate"] = 'Basic realm="host"'
    response.headers["Proxy-Connection"] = "keep-alive"
    response.headers["Trailer"] = "X-Checksum"
    response.headers["Upgrade"] = "h2c"
    response.headers["X-End-To-End"] = "kept"
    response.headers.add("Set-Cookie", "a=1; Path=/")
    response.headers.add("Set-Cookie", "b=2; Path=/")
    return response


async def small(request: web.Request) -> web.Response:
    return web.Response(body=b"x" * int(request.query.get("size", "1024")),
                        content_type="application/octet-stream")


async def sse(request: web.Request) -> web.StreamResponse:
    count = int(request.query.get("count", "5"))
    interval = float(request.query.get("interval", "0.2"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    for i in range(0 if request.method == "HEAD" else count):
        await response.write(f"id: {i}\ndata: {{\"n\": {i}}}\n\n".encode())
        await asyncio.sleep(interval)
    await response.write_eof()
    return response


async def inspect(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({
        "method": request.method,
        "path": request.raw_path.split("?")[0],
        "query": request.query_string,
        "raw_query": request.rel_url.raw_query_string,
        "headers": [[k, v] for k, v in request.headers.items()],
        "body_size": len(body),
    })


async def status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    return web.Response(status=code, text=f"status {code}\n")


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("delay", "5")))
    return web.Response(text="finally\n")


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """Echo frames; "close:<code>" closes with that code; "bye" sends a last message and closes."""
    ws = web.WebSocketResponse(protocols=("chat", "v2.chat"), max_msg_size=16 << 20)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            if msg.data.startswith("close:"):
                await ws.close(code=int(msg.data.split(":", 1)[1]), message=b"asked to close")
                break
            if msg.data == "bye":
                await ws.send_str("bye!")
                await ws.close(code=1000)
                break
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


# -- a small browser site: what a proxy in front of a web app has to keep working -------------

PAGE = """<!doctype html>
<html>
<head><meta charset="utf-8"><title>devhost page</title></head>
<body>
<h1>Hello from the host service</h1>
<p>This page is served by the desktop's local host service, through the relay.</p>
<ul>
  <li><a id="relative" href="etag">a relative link (etag)</a></li>
  <li><a id="root-relative" href="/cookie">a root-relative link (/cookie)</a></li>
  <li><a id="redirect" href="redirect/root">a redirect to /page</a></li>
</ul>
<form id="form" method="post" action="/form">
  <label>name <input name="name" value="visitor"></label>
  <button type="submit">send</button>
</form>
</body>
</html>
"""

ETAG_BODY = b"a representation that does not change\n"
ETAG = '"' + hashlib.sha256(ETAG_BODY).hexdigest()[:16] + '"'


def own_origin(request: web.Request) -> str:
    """This service's own origin, from the socket it answered on (not from the Host header)."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    host, port = (sockname[0], sockname[1]) if sockname else ("127.0.0.1", 3000)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def page(request: web.Request) -> web.Response:
    """An HTML page with a relative link, a root-relative link and a form (root-relative)."""
    return web.Response(text=PAGE, content_type="text/html")


async def form(request: web.Request) -> web.Response:
    fields = await request.post()
    items = "".join(f"<li>{html.escape(k)} = {html.escape(str(v))}</li>"
                    for k, v in fields.items())
    return web.Response(text=f"<!doctype html><title>form received</title><ul>{items}</ul>\n",
                        content_type="text/html")


async def redirect_root(request: web.Request) -> web.Response:
    """302 to a root-relative location, as most web apps answer."""
    raise web.HTTPFound("/page")


async def redirect_absolute(request: web.Request) -> web.Response:
    """302 to an absolute URL on this service's own origin (what a proxy must not leak)."""
    raise web.HTTPFound(f"{own_origin(request)}/page")


async def cookie(request: web.Request) -> web.Response:
    """Set a cookie and show which cookies came with the request."""
    visits = int(request.cookies.get("devhost_visits", "0") or 0) + 1
    response = web.json_response({"cookies": dict(request.cookies), "visits": visits})
    response.set_cookie("devhost_visits", str(visits), path="/", httponly=True, samesite="Lax")
    return response


async def etag(request: web.Request) -> web.Response:
    """A cacheable body: ``If-None-Match`` with the current ETag answers 304 and no body."""
    headers = {"ETag": ETAG, "Cache-Control": "no-cache"}
    wanted = {tag.strip() for tag in request.headers.get("If-None-Match", "").split(",")}
    if ETAG in wanted or "*" in wanted:
        return web.Response(status=304, headers=headers)
    return web.Response(body=ETAG_BODY, headers=headers, content_type="text/plain")


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=json.dumps({"hello": "from the host service"}),
                        content_type="application/json")


def build_app() -> web.Application:
    app = web.Application(client_max_size=1 << 30)
    app[STREAMS] = Streams()
    app.router.add_get("/", hello)
    app.router.add_post("/echo", echo)
    app.router.add_put("/echo", echo)
    app.router.add_post("/digest", digest)
    app.router.add_post("/sink", sink)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/bytes/{size:\\d+}", download)
    app.router.add_get("/drip/{size:\\d+}", drip)
    app.router.add_get("/hop", hop_headers)
    app.router.add_get("/broken/{size:\\d+}", broken)
    app.router.add_get("/small", small)
    app.router.add_get("/sse", sse)
    app.router.add_route("*", "/inspect{tail:.*}", inspect)
    app.router.add_route("*", "/status/{code:\\d+}", status)
    app.router.add_get("/slow", slow)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/page", page)
    app.router.add_post("/form", form)
    app.router.add_get("/redirect/root", redirect_root)
    app.router.add_get("/redirect/absolute", redirect_absolute)
    app.router.add_get("/cookie", cookie)
    app.router.add_get("/etag", etag)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relay.devhost", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args(argv)
    try:
        web.run_app(build_app(), host=args.host, port=args.port, access_log=None, print=None)
    except OSError as exc:
        # Almost always "address already in use": one line, not aiohttp's traceback.
        why = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            why = "address already in use (another devhost?); pick another --port"
        print(f"devhost: cannot listen on {args.host}:{args.port}: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
