"""A real headless Chromium, driven over the DevTools protocol with aiohttp's WebSocket client.

Only what the browser tests need: navigate and wait for the load, evaluate script (awaiting
promises), read and set cookies. The fixtures always kill the browser, pass or fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--disable-extensions", "--mute-audio",
    "--remote-debugging-port=0",
)
CALL_TIMEOUT_S = 10.0


class CdpError(Exception):
    pass


class Page:
    """One page target: calls get answers by id; events go to a bounded queue."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10000)
        self._reader = asyncio.ensure_future(self._read())
        self._reader.set_name("cdp-reader")

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            elif self.events.full():
                self.events.get_nowait()  # keep the newest: old events are not waited on
                self.events.put_nowait(data)
            else:
                self.events.put_nowait(data)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CdpError("DevTools connection closed"))

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        call_id = self._next_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        await self.ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        try:
            answer = await asyncio.wait_for(future, CALL_TIMEOUT_S)
        finally:
            self._pending.pop(call_id, None)
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def wait_event(self, name: str, timeout: float = CALL_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name} event in {timeout}s")
            event = await asyncio.wait_for(self.events.get(), left)
            if event.get("method") == name:
                params: dict[str, Any] = event.get("params", {})
                return params

    def drop_events(self) -> None:
        while not self.events.empty():
            self.events.get_nowait()

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` (a promise is awaited); a thrown error fails the test."""
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                                 returnByValue=True, timeout=int(CALL_TIMEOUT_S * 1000))
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"script failed: {text}")
        return result["result"].get("value")

    async def navigate(self, url: str) -> str:
        """Load ``url`` (following redirects) and return where the page landed."""
        self.drop_events()
        answer = await self.call("Page.navigate", url=url)
        if answer.get("errorText"):
            raise CdpError(f"navigation to {url} failed: {answer['errorText']}")
        await self.wait_event("Page.loadEventFired")
        return str(await self.evaluate("location.href"))

    async def navigating(self, script: str) -> str:
        """Run ``script`` that starts a navigation (a click, a form submit); wait for the load."""
        self.drop_events()
        await self.evaluate(script)
        await self.wait_event("Page.loadEventFired")
        return str(await self.evaluate("location.href"))

    async def cookies(self, *urls: str) -> list[dict[str, Any]]:
        result = await self.call("Network.getCookies", urls=list(urls))
        cookies: list[dict[str, Any]] = result["cookies"]
        return cookies

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader


async def _devtools_port(profile: Path, proc: asyncio.subprocess.Process) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}")
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            return int(marker.read_text().splitlines()[0])
        await asyncio.sleep(0.05)
    raise TimeoutError("chromium did not open its DevTools port")


@dataclass
class Browser:
    """One Chromium process. Each page opens in a browser context of its own (cookies, storage
    and cache apart, as in a fresh profile), so tests can share the process and its start-up."""

    control: Page  # the browser target: contexts and targets are made through it
    port: int
    session: aiohttp.ClientSession

    @contextlib.asynccontextmanager
    async def page(self) -> AsyncIterator[Page]:
        created = await self.control.call("Target.createBrowserContext")
        context = created["browserContextId"]
        page: Page | None = None
        try:
            target = await self.control.call("Target.createTarget", url="about:blank",
                                             browserContextId=context)
            ws = await self.session.ws_connect(
                f"ws://127.0.0.1:{self.port}/devtools/page/{target['targetId']}",
                max_msg_size=64 << 20, timeout=aiohttp.ClientWSTimeout(ws_close=2))
            page = Page(ws)
            await page.call("Page.enable")
            await page.call("Network.enable")
            yield page
        finally:
            if page is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(page.close(), 3)
            with contextlib.suppress(Exception):
                await self.control.call("Target.disposeBrowserContext", browserContextId=context)


@contextlib.asynccontextmanager
async def chromium_browser(profile: Path) -> AsyncIterator[Browser]:
    """A browser on a fresh profile in ``profile``; killed however the tests end."""
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    session = aiohttp.ClientSession()
    control: Page | None = None
    try:
        port = await _devtools_port(profile, proc)
        async with session.get(f"http://127.0.0.1:{port}/json/version",
                               timeout=aiohttp.ClientTimeout(total=10)) as resp:
            version = await resp.json()
        ws = await session.ws_connect(version["webSocketDebuggerUrl"], max_msg_size=64 << 20,
                                      timeout=aiohttp.ClientWSTimeout(ws_close=2))
        control = Page(ws)
        yield Browser(control, port, session)
    finally:
        if control is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(control.close(), 3)
        await session.close()
        if proc.returncode is None:
            # The whole process group we started: renderers and the zygote go with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)


# One browser for a module (its start-up is most of a browser test's time), a fresh context
# for each test. A module using these runs its tests in the module's event loop.
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chromium_process(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Browser]:
    async with chromium_browser(tmp_path_factory.mktemp("chromium-profile")) as browser:
        yield browser


@pytest_asyncio.fixture(loop_scope="module")
async def chromium(chromium_process: Browser) -> AsyncIterator[Page]:
    async with chromium_process.page() as page:
        yield page
