"""deploy/nginx/relay.conf: valid for nginx, and it really streams and upgrades.

Two checks: ``nginx -t`` on the example as shipped (TLS with a throwaway self-signed certificate),
and a real nginx running a plain-HTTP copy of the same server block in front of an aiohttp server
on loopback, to show WebSocket upgrades (frames and close codes), streamed responses and streamed
uploads pass through unbuffered, forwarded headers are set, and tokens stay out of the access
log. nginx runs as the invoking user with its own prefix, pid, temp and log paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

CONF = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "relay.conf"
CERT = "/etc/ssl/relay/fullchain.pem"
KEY = "/etc/ssl/relay/privkey.pem"
ACCESS_LOG = "/var/log/nginx/relay.access.log"
STEP = 5.0  # no single step of these tests should take anywhere near this long
FIREHOSE_MB = 256


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    assert found, "nginx not found: apt-get install -y nginx (the Makefile installs it)"
    return found


def substitute(text: str, pattern: str, replacement: str, count: int) -> str:
    """re.sub that insists the example still has exactly what the test expects to replace."""
    new, made = re.subn(pattern, replacement, text, flags=re.M)
    assert made == count, f"relay.conf changed: {pattern!r} matched {made} times, not {count}"
    return new


def wrapper(work: Path, include: Path, extra: str = "") -> Path:
    """A main nginx.conf that keeps every path nginx writes inside ``work``."""
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / f"tmp_{name}").mkdir(exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(
        f"""
{extra}
pid {work}/nginx.pid;
error_log {work}/error.log info;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {work}/tmp_body;
    proxy_temp_path {work}/tmp_proxy;
    fastcgi_temp_path {work}/tmp_fastcgi;
    uwsgi_temp_path {work}/tmp_uwsgi;
    scgi_temp_path {work}/tmp_scgi;
    access_log {work}/default-access.log;
    include {include};
}}
"""
    )
    return conf


def nginx_test(work: Path, conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [nginx_binary(), "-t", "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf)],
        capture_output=True, text=True, timeout=30, check=False,
    )


def test_example_passes_nginx_t_with_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=relay.example.com", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, check=True, timeout=30,
    )
    text = CONF.read_text()
    text = substitute(text, re.escape(CERT), str(cert), 1)
    text = substitute(text, re.escape(KEY), str(key), 1)
    text = substitute(text, re.escape(ACCESS_LOG), str(tmp_path / "relay-access.log"), 2)
    site = tmp_path / "relay.conf"
    site.write_text(text)
    result = nginx_test(tmp_path, wrapper(tmp_path, site))
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr


def test_nginx_t_catches_a_broken_example(tmp_path: Path) -> None:
    # The check above must be able to fail: a typo in a directive is refused.
    site = tmp_path / "relay.conf"
    site.write_text(CONF.read_text().replace("proxy_buffering off;", "proxy_bufering off;"))
    result = nginx_test(tmp_path, wrapper(tmp_path, site))
    assert result.returncode != 0
    assert "proxy_bufering" in result.stderr


def plain_http_variant(port: int, redirect_port: int, backend_port: int, log: Path) -> str:
    """The example with TLS and public listeners swapped for loopback ports, nothing else."""
    text = CONF.read_text()
    text = substitute(text, r"^(\s*)server 10\.0\.0\.11:8080\b[^;]*;",
                      rf"\1server 127.0.0.1:{backend_port};", 1)
    text = substitute(text, r"^\s*server 10\.0\.0\.1[23]:8080\b[^;]*;\n", "", 2)
    text = substitute(text, r"^(\s*)listen 80;", rf"\1listen 127.0.0.1:{redirect_port};", 1)
    text = substitute(text, r"^(\s*)listen 443 ssl http2;", rf"\1listen 127.0.0.1:{port};", 1)
    text = substitute(text, r"^\s*listen \[::\]:(80|443 ssl http2);\n", "", 2)
    text = substitute(text, r"^\s*ssl_\w+ [^;]*;\n", "", 7)
    return substitute(text, re.escape(ACCESS_LOG), str(log), 2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Backend:
    """A stand-in relay: WebSocket echo, a held-open stream, a streamed upload, header echo."""

    def __init__(self) -> None:
        self.release_stream = asyncio.Event()
        self.upload_started = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_get("/ws", self.ws)
        self.app.router.add_get("/stream", self.stream)
        self.app.router.add_post("/upload", self.upload)
        self.app.router.add_get("/headers", self.headers)
        self.app.router.add_get("/firehose", self.firehose)
        self.firehose_written = 0

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT and msg.data == "go away":
                await ws.close(code=4409, message=b"replaced")
            elif msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        # Held until the client proves it saw the first event: a buffering proxy deadlocks here.
        await asyncio.wait_for(self.release_stream.wait(), STEP)
        await response.write(b"data: second\n\n")
        await response.write_eof()
        return response

    async def firehose(self, request: web.Request) -> web.StreamResponse:
        # write() waits for the socket to drain: the count stalls once the path pushes back.
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b"x" * (1 << 20)
        with contextlib.suppress(ConnectionError):
            for _ in range(FIREHOSE_MB):
                await response.write(chunk)
                self.firehose_written += len(chunk)
        return response

    async def upload(self, request: web.Request) -> web.Response:
        received = await request.content.readany()
        self.upload_started.set()
        received += await request.content.read()
        return web.json_response({"bytes": len(received), "tail": received[-4:].decode()})

    async def headers(self, request: web.Request) -> web.Response:
        names = ("Host", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Real-IP")
        return web.json_response({name: request.headers.get(name) for name in names})


@contextlib.asynccontextmanager
async def backend_server() -> AsyncIterator[tuple[Backend, int]]:
    backend = Backend()
    runner = web.AppRunner(backend.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield backend, int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def running_nginx(work: Path, conf: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    # One foreground process, no workers: nothing to chase down, and no user switch as root.
    proc = subprocess.Popen(
        [nginx_binary(), "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=STEP)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


async def wait_listening(proc: subprocess.Popen[bytes], port: int, work: Path) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STEP
    while True:
        assert proc.poll() is None, (work / "error.log").read_text()
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            assert loop.time() < deadline, "nginx did not start listening"
            await asyncio.sleep(0.02)
            continue
        writer.close()
        await writer.wait_closed()
        return


async def test_live_proxy_streams_and_upgrades(tmp_path: Path) -> None:
    port, redirect_port = free_port(), free_port()
    access_log = tmp_path / "relay-access.log"
    async with backend_server() as (backend, backend_port):
        site = tmp_path / "relay.conf"
        site.write_text(plain_http_variant(port, redirect_port, backend_port, access_log))
        conf = wrapper(tmp_path, site, extra="daemon off;\nmaster_process off;")
        with running_nginx(tmp_path, conf, port) as proc:
            await wait_listening(proc, port, tmp_path)
            base = f"http://127.0.0.1:{port}"
            timeout = aiohttp.ClientTimeout(total=4 * STEP)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                await check_websocket(session, base)
                await check_streamed_response(session, base, backend)
                await check_streamed_upload(session, base, backend)
                await check_backpressure(session, base, backend)
                await check_forwarded_headers(session, base)
                async with session.get(f"{base}/metrics") as resp:
                    assert resp.status == 404  # scraped per relay, never through the balancer
                async with session.post(
                    f"http://127.0.0.1:{redirect_port}/hosts/o:m/x?a=1", allow_redirects=False
                ) as resp:
                    assert resp.status == 308
                    assert resp.headers["Location"] == "https://127.0.0.1/hosts/o:m/x?a=1"
    log = access_log.read_text()
    assert "/ws" in log and "/headers" in log
    assert "SECRET" not in log  # the query string (browser WebSocket tokens) is never logged


async def check_websocket(session: aiohttp.ClientSession, base: str) -> None:
    async with session.ws_connect(f"{base}/ws?token=SECRET-ws") as ws:
        await ws.send_str("hello")
        assert (await ws.receive(STEP)).data == "hello"
        payload = bytes(range(256)) * 300  # binary-safe, bigger than one frame buffer
        await ws.send_bytes(payload)
        assert (await ws.receive(STEP)).data == payload
        await ws.send_str("go away")
        msg = await ws.receive(STEP)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4409  # application close codes pass through untouched
        assert msg.extra == "replaced"


async def check_streamed_response(
    session: aiohttp.ClientSession, base: str, backend: Backend
) -> None:
    async with session.get(f"{base}/stream") as resp:
        assert resp.status == 200
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), STEP)
        assert first == b"data: first\n\n"
        backend.release_stream.set()
        rest = await asyncio.wait_for(resp.content.read(), STEP)
        assert rest == b"data: second\n\n"


async def check_backpressure(
    session: aiohttp.ClientSession, base: str, backend: Backend
) -> None:
    """A client that stops reading must stall the host, not make the proxy spool the stream.

    Spooling (proxy_buffering on) hides a slow client from flow control and fills the proxy's
    disk; unbuffered, the host is held back by a few socket buffers' worth of data.
    """
    async with session.get(f"{base}/firehose") as resp:
        assert resp.status == 200
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STEP
        last, stable_since = -1, loop.time()
        while loop.time() - stable_since < 0.3:  # the count stopped moving: the host is stalled
            assert loop.time() < deadline, "the host was never held back"
            await asyncio.sleep(0.05)
            if backend.firehose_written != last:
                last, stable_since = backend.firehose_written, loop.time()
        # Seen here: about 12 MiB (socket buffers of two hops); spooled: all of it.
        assert backend.firehose_written < (FIREHOSE_MB << 20) // 2, backend.firehose_written
        resp.close()


async def check_streamed_upload(
    session: aiohttp.ClientSession, base: str, backend: Backend
) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 4096
        # The host must see the start of the upload before the client sends the rest: a proxy
        # that spools request bodies never lets this happen.
        await asyncio.wait_for(backend.upload_started.wait(), STEP)
        yield b"b" * 4096 + b"tail"

    async with session.post(f"{base}/upload", data=body()) as resp:
        assert resp.status == 200
        assert await resp.json() == {"bytes": 8196, "tail": "tail"}


async def check_forwarded_headers(session: aiohttp.ClientSession, base: str) -> None:
    spoofed = {"X-Forwarded-For": "203.0.113.66", "X-Forwarded-Proto": "https"}
    async with session.get(f"{base}/headers?token=SECRET-http", headers=spoofed) as resp:
        seen: dict[str, Any] = await resp.json()
    # The edge proxy overwrites what the client claims.
    assert seen == {
        "Host": "127.0.0.1",
        "X-Forwarded-For": "127.0.0.1",
        "X-Forwarded-Proto": "http",
        "X-Forwarded-Host": "127.0.0.1",
        "X-Real-IP": "127.0.0.1",
    }


@pytest.fixture(autouse=True)
def _nginx_present() -> None:
    nginx_binary()
