"""The shortest path through everything: a request and a WebSocket through relay and agent."""

from __future__ import annotations

import aiohttp

from tests.harness import Stack


async def test_get_through_relay_and_agent(full_stack: Stack) -> None:
    async with full_stack.client.get(full_stack.url("/"), headers=full_stack.auth()) as resp:
        assert resp.status == 200
        assert await resp.json() == {"hello": "from the host service"}


async def test_websocket_echo_through_relay_and_agent(full_stack: Stack) -> None:
    url = full_stack.url("/ws") + f"?token={full_stack.token()}"
    async with full_stack.client.ws_connect(url) as ws:
        await ws.send_str("ping")
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.TEXT and msg.data == "ping"
