"""The error tree and the JSON catch-all, through real relays on loopback.

Every refusal is a RelayError defined in relay.errors; whatever else escapes a handler is a bug
that the client sees as a JSON 500 ``internal`` and the operator as one ``http.unhandled``
event with its traceback.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import pkgutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import relay
from relay.config import Config, load_config
from relay.errors import (
    CloseCode,
    ErrorCode,
    LocalProtocolError,
    PeerRejected,
    ProtocolViolation,
    RelayError,
)
from relay.server.app import build_app
from relay.server.listen import Listeners
from tests.harness import LogCapture, start_agent, start_host, start_relay, write_config
from tests.redis_server import RedisServer


def _subclasses(cls: type) -> list[type]:
    out: list[type] = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def test_every_relay_error_is_defined_in_relay_errors() -> None:
    for module in pkgutil.walk_packages(relay.__path__, "relay."):
        if not module.name.endswith("__main__"):  # that one runs the CLI
            importlib.import_module(module.name)
    ours = [cls for cls in _subclasses(RelayError) if cls.__module__.startswith("relay")]
    assert len(ours) >= 20
    assert {cls.__module__ for cls in ours} == {"relay.errors"}, [
        f"{cls.__module__}.{cls.__name__}" for cls in ours if cls.__module__ != "relay.errors"]


def test_local_and_remote_protocol_faults_are_told_apart() -> None:
    # The peer's fault ends a tunnel with 1002; ours is a bug: 1011 and 500 internal.
    assert ProtocolViolation().close_code == CloseCode.PROTOCOL_ERROR
    assert (LocalProtocolError().status, LocalProtocolError().close_code) == (
        500, CloseCode.INTERNAL_ERROR)
    assert LocalProtocolError().code == ErrorCode.INTERNAL
    assert not issubclass(LocalProtocolError, ProtocolViolation)
    assert (PeerRejected().status, PeerRejected().close_code) == (401, CloseCode.UNAUTHORIZED)


def _events(capture: LogCapture, name: str) -> list[dict[str, Any]]:
    out = []
    for line in capture.text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == name:
            out.append(event)
    return out


async def _broken(request: web.Request) -> web.StreamResponse:
    raise KeyError("a bug in a handler")


async def _broken_local(request: web.Request) -> web.StreamResponse:
    raise LocalProtocolError("stream id reused by our own code")


async def _broken_midway(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.content_length = 100
    await response.prepare(request)
    await response.write(b"x" * 10)
    raise RuntimeError("a bug after the status line left")


@pytest.fixture
async def broken_relay(tmp_path: Path) -> AsyncIterator[str]:
    """The real relay app and listeners, plus routes that really fail."""
    config: Config = load_config(write_config(tmp_path), env={})
    app = build_app(config)
    app.router.add_get("/broken", _broken)
    app.router.add_get("/broken-local", _broken_local)
    app.router.add_get("/broken-midway", _broken_midway)
    listeners = Listeners.create(app, config, shutdown_timeout=2.0)
    await listeners.setup()
    try:
        await listeners.start(config)
        yield f"http://127.0.0.1:{config.server.port}"
    finally:
        await listeners.cleanup()


async def test_an_unexpected_exception_is_a_json_500_and_one_error_event(
    broken_relay: str,
) -> None:
    with LogCapture() as capture:
        async with aiohttp.ClientSession() as client, client.get(
            f"{broken_relay}/broken"
        ) as resp:
            assert resp.status == 500
            assert resp.content_type == "application/json"
            body = await resp.text()
    assert json.loads(body)["error"]["code"] == "internal"
    assert "Traceback" not in body and "a bug in a handler" not in body
    events = _events(capture, "http.unhandled")
    assert len(events) == 1
    assert events[0]["level"] == "error" and events[0]["error"] == "KeyError"
    assert "Traceback" in events[0]["exception"] and "a bug in a handler" in events[0]["exception"]


async def test_our_own_protocol_misuse_is_a_500_not_the_peers_fault(broken_relay: str) -> None:
    with LogCapture() as capture:
        async with aiohttp.ClientSession() as client, client.get(
            f"{broken_relay}/broken-local"
        ) as resp:
            assert resp.status == 500
            assert (await resp.json())["error"]["code"] == "internal"
    assert [e["error"] for e in _events(capture, "http.unhandled")] == ["LocalProtocolError"]


async def test_a_bug_after_the_response_started_cuts_the_connection(broken_relay: str) -> None:
    with LogCapture() as capture:
        async with aiohttp.ClientSession() as client, client.get(
            f"{broken_relay}/broken-midway"
        ) as resp:
            assert resp.status == 200
            # A clean end would make the truncated body look complete.
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
    events = _events(capture, "http.unhandled")
    assert len(events) == 1 and events[0]["started"] is True


async def test_aiohttps_own_refusals_keep_their_status_with_our_json(broken_relay: str) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{broken_relay}/healthz") as resp:
            assert resp.status == 405
            assert "GET" in resp.headers["Allow"]
            assert (await resp.json())["error"]["code"] == "bad_request"
        async with client.get(f"{broken_relay}/no-such-route") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "not_found"


async def test_a_websocket_forwarded_with_a_refused_signature_closes_4401(
    tmp_path: Path,
) -> None:
    """Two real relays on one Redis whose peer secrets differ: the owner refuses the entry
    relay's signature, and the client hears 4401 (a refused credential), not 1011."""
    async with RedisServer() as redis:
        relays = []
        for name in ("owner", "entry"):
            folder = tmp_path / name
            folder.mkdir()
            config = load_config(write_config(folder, {
                "auth": {"dev_state_dir": str(tmp_path / "shared-state")},
                "directory": {"backend": "redis", "redis_url": redis.url,
                              "instance_id": f"relay-{name}", "peer_secret": f"{name}-" * 8,
                              "heartbeat_s": 0.4, "entry_ttl_s": 2.0},
            }), env={})
            relays.append(await start_relay(config))
        owner, entry = relays
        host = await start_host()
        agent = await start_agent(owner.ws_url, "acme:laptop", host.url,
                                  token=owner.agent_token("acme:laptop"))
        client = aiohttp.ClientSession()
        auth = {"Authorization": f"Bearer {entry.token()}"}
        url = f"{entry.url}/hosts/acme:laptop/echo"
        try:
            deadline = time.monotonic() + 10
            while True:  # until the entry relay sees the owner's directory entry
                async with client.get(url, headers=auth) as resp:
                    if resp.status != 503:
                        break
                assert time.monotonic() < deadline, "the entry relay never found the host"
                await asyncio.sleep(0.05)
            assert resp.status == 401
            async with client.get(url, headers=auth) as resp:
                assert (await resp.json())["error"]["code"] == "unauthorized"
            async with client.ws_connect(url.replace("http", "ws", 1), headers=auth) as ws:
                msg = await asyncio.wait_for(ws.receive(), 10)
                assert msg.type is aiohttp.WSMsgType.CLOSE
                assert ws.close_code == CloseCode.UNAUTHORIZED
        finally:
            await client.close()
            await agent.stop()
            await entry.stop()
            await owner.stop()
            await host.stop()


async def test_our_own_protocol_misuse_on_a_tunnel_closes_it_1011_not_1002(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fault injection: the relay's side of the tunnel hits a bug of its own while reading the
    agent's frames. The agent is told 1011 (not the 1002 that would blame it)."""
    config = load_config(write_config(tmp_path), env={})
    relay_ = await start_relay(config)
    host = await start_host()
    agent = await start_agent(relay_.ws_url, "acme:laptop", host.url,
                              token=relay_.agent_token())
    try:
        tunnel = relay_.state.registry.get("acme:laptop")
        assert tunnel is not None

        def broken_feed(data: bytes) -> None:
            raise LocalProtocolError("the relay reused a stream id")

        monkeypatch.setattr(tunnel.session, "feed", broken_feed)
        with LogCapture() as capture:
            # The agent's answer is the first frame the broken reader sees.
            url = f"{relay_.url}/hosts/acme:laptop/small?size=10"
            async with aiohttp.ClientSession() as client, client.get(
                url, headers={"Authorization": f"Bearer {relay_.token()}"}
            ):
                pass
            deadline = time.monotonic() + 10
            while not (agent.agent.last_outcome and agent.agent.last_outcome.code):
                assert time.monotonic() < deadline, "the agent never saw the tunnel close"
                await asyncio.sleep(0.02)
        assert agent.agent.last_outcome.code == CloseCode.INTERNAL_ERROR
        events = _events(capture, "tunnel.local_protocol_error")
        assert len(events) == 1 and events[0]["level"] == "error"
        assert not _events(capture, "tunnel.protocol_violation")
    finally:
        await agent.stop()
        await relay_.stop()
        await host.stop()
