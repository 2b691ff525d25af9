"""``make demo``: start a relay, a sample host service and an agent; show traffic going through.

Everything runs as real processes on loopback, from the embedded default config (on a free
port, so it does not collide with ``make run``), and is stopped at the end.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


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
            await asyncio.sleep(0.1)
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
        _step("Refusals explain themselves")
        async with client.get(f"{relay}/hosts/{host_id}/") as resp:
            print(resp.status, await resp.text())
        async with client.get(f"{relay}/hosts/other:box/", headers=auth) as resp:
            print(resp.status, await resp.text())
        async with client.get(f"{relay}/hosts/acme:offline/", headers=auth) as resp:
            print(resp.status, await resp.text())


def main() -> int:
    port, host_port = _free_port(), _free_port()
    relay = f"http://127.0.0.1:{port}"
    host_id = "acme:demo-laptop"
    env = {**os.environ, "RELAY_SERVER_PORT": str(port), "RELAY_LOG_LEVEL": "warning"}
    config = str(REPO / "config.toml")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        _step(f"relay serve on {relay} (embedded default config)")
        procs.append(subprocess.Popen([sys.executable, "-m", "relay", "serve", "--config", config],
                                      env=env, stderr=subprocess.DEVNULL))
        _step(f"sample host service on http://127.0.0.1:{host_port}")
        procs.append(subprocess.Popen([sys.executable, "-m", "relay.devhost", "--port",
                                       str(host_port)], env=env))
        asyncio.run(_wait_ok(f"{relay}/healthz"))
        mint = [sys.executable, "-m", "relay", "token", "--config", config, "--sub", "demo-user",
                "--org", "acme"]
        token = subprocess.run(mint, env=env, check=True, capture_output=True,
                               text=True).stdout.strip()
        print(f"minted a dev token: relay token --config config.toml --sub demo-user --org acme"
              f" -> {token[:12]}…")
        # Serving a host takes more than reaching it: the agent's token names the host.
        agent_token = subprocess.run([*mint, "--agent-host", host_id], env=env, check=True,
                                     capture_output=True, text=True).stdout.strip()
        print(f"minted an agent token: ... --agent-host {host_id} -> {agent_token[:12]}…")
        _step(f"relay agent --host-id {host_id}")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "relay", "agent", "--relay", f"ws://127.0.0.1:{port}",
             "--host-id", host_id, "--upstream", f"http://127.0.0.1:{host_port}",
             "--token", agent_token, "--log-level", "warning"], env=env))
        asyncio.run(_wait_ok(f"{relay}/hosts/{host_id}/", {"Authorization": f"Bearer {token}"}))
        asyncio.run(_show(relay, token, host_id))
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


if __name__ == "__main__":
    sys.exit(main())
