"""``make demo``: start a relay, a sample host service and an agent; show traffic going through.

Everything runs as real processes on loopback, from the embedded default config (on a free
port, so it does not collide with ``make run``), and is stopped at the end. On a terminal the
demo waits for Enter before stopping, so the page it shows can be opened in a browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def use_colour(stream: object = None, env: dict[str, str] | None = None) -> bool:
    """Bold headings only on a terminal, and never when NO_COLOR is set (no-color.org)."""
    stream = sys.stdout if stream is None else stream
    env = dict(os.environ) if env is None else env
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not env.get("NO_COLOR")


def _step(text: str) -> None:
    if use_colour():
        print(f"\n\033[1m==> {text}\033[0m", flush=True)
    else:
        print(f"\n==> {text}", flush=True)


async def _wait_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as client:
        while time.monotonic() < deadline:
            try:
                async with client.get(url, headers=headers) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not become ready")


async def _show(relay: str, token: str, host_id: str) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as client:
        _step(f"GET {relay}/hosts/{host_id}/")
        async with client.get(f"{relay}/hosts/{host_id}/", headers=auth) as resp:
            print(resp.status, await resp.text())
        _step("Server-sent events stream through as the host sends them")
        started = time.monotonic()
        async with client.get(f"{relay}/hosts/{host_id}/sse?count=3&interval=0.3",
                              headers=auth) as resp:
            async for line in resp.content:
                if line.startswith(b"data:"):
                    print(f"  +{time.monotonic() - started:.2f}s {line.decode().strip()}")
        _step("A WebSocket channel (token in the query string, as browsers do)")
        async with client.ws_connect(f"{relay}/hosts/{host_id}/ws?token={token}",
                                     protocols=("chat",)) as ws:
            await ws.send_str("hello through the tunnel")
            print("  echo:", (await ws.receive(timeout=5)).data)
            await ws.send_str("close:4000")
            await ws.receive(timeout=5)
            print("  host closed the channel with code", ws.close_code)
        _step("A browser page through the relay (a link, a redirect, a cookie, an ETag)")
        page_url = f"{relay}/hosts/{host_id}/page?token={token}"
        async with client.get(f"{relay}/hosts/{host_id}/page", headers=auth) as resp:
            text = await resp.text()
            title = text.split("<title>", 1)[-1].split("</title>", 1)[0]
            print(f"  GET /page -> {resp.status} {resp.content_type}: {title!r}")
        async with client.get(f"{relay}/hosts/{host_id}/etag", headers=auth) as resp:
            etag = resp.headers.get("ETag", "")
        async with client.get(f"{relay}/hosts/{host_id}/etag",
                              headers={**auth, "If-None-Match": etag}) as resp:
            print(f"  GET /etag with If-None-Match -> {resp.status}")
        print(f"  open in a browser: {page_url}")
        _step("Refusals explain themselves")
        async with client.get(f"{relay}/hosts/{host_id}/") as resp:
            print(resp.status, await resp.text())
        async with client.get(f"{relay}/hosts/other:box/", headers=auth) as resp:
            print(resp.status, await resp.text())
        async with client.get(f"{relay}/hosts/acme:offline/", headers=auth) as resp:
            print(resp.status, await resp.text())


def _minted(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=30)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, out)
    return out.strip()


def main() -> int:
    port, host_port = _free_port(), _free_port()
    relay = f"http://127.0.0.1:{port}"
    host_id = "acme:demo-laptop"
    env = {**os.environ, "RELAY_SERVER_PORT": str(port), "RELAY_LOG_LEVEL": "warning"}
    config = str(REPO / "config.toml")
    procs: list[subprocess.Popen[bytes] | subprocess.Popen[str]] = []
    workdir = tempfile.TemporaryDirectory(prefix="relay-demo-")
    try:
        _step(f"relay serve on {relay} (embedded default config)")
        procs.append(subprocess.Popen([sys.executable, "-m", "relay", "serve", "--config", config],
                                      env=env, stderr=subprocess.DEVNULL))
        _step(f"sample host service on http://127.0.0.1:{host_port}")
        procs.append(subprocess.Popen([sys.executable, "-m", "relay.devhost", "--port",
                                       str(host_port)], env=env))
        mint = [sys.executable, "-m", "relay", "token", "--config", config, "--sub", "demo-user",
                "--org", "acme"]
        # Minting needs the dev key, not the relay: both tokens are minted while it starts
        # (whichever process creates the key first, all of them end up using that one).
        # Serving a host takes more than reaching it: the agent's token names the host.
        minting = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
                   for command in (mint, [*mint, "--agent-host", host_id])]
        procs.extend(minting)  # the clean-up below owns them too, should one fail
        token, agent_token = (_minted(proc) for proc in minting)
        asyncio.run(_wait_ok(f"{relay}/healthz"))
        print(f"minted a dev token: relay token --config config.toml --sub demo-user --org acme"
              f" -> {token[:12]}…")
        # The agent reads its token from a 0600 file: on its command line, ps would show it.
        token_file = Path(workdir.name) / "agent-token"
        token_file.touch(mode=0o600)
        token_file.write_text(agent_token + "\n")
        print(f"minted an agent token: ... --agent-host {host_id} > {token_file}")
        _step(f"relay agent --host-id {host_id} --token-file {token_file}")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "relay", "agent", "--relay", f"ws://127.0.0.1:{port}",
             "--host-id", host_id, "--upstream", f"http://127.0.0.1:{host_port}",
             "--token-file", str(token_file), "--log-level", "warning"], env=env))
        asyncio.run(_wait_ok(f"{relay}/hosts/{host_id}/", {"Authorization": f"Bearer {token}"}))
        asyncio.run(_show(relay, token, host_id))
        if sys.stdin.isatty() and sys.stdout.isatty():
            _step("the relay, the agent and the host service keep running: press Enter to stop")
            with contextlib.suppress(EOFError, KeyboardInterrupt):
                input()
        _step("done")
        return 0
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=25)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        workdir.cleanup()


if __name__ == "__main__":
    sys.exit(main())
