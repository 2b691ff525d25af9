"""What the agent writes when it cannot stay connected: the relay's own words, and why.

A real relay refuses real tokens; the agent's JSON log lines are read back and must carry the
relay's close code and reason, the address and cause of a failed connect, and, after a 4401
with an expired token, when it expired and how to get a longer-lived one. Never the token.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay.agent.backoff import Backoff
from relay.agent.tokens import expiry_hint, unverified_expiry
from relay.config import load_config
from tests.harness import (
    LogCapture,
    RunningRelay,
    eventually,
    free_port,
    start_agent,
    start_relay,
    write_config,
)

HOST = "acme:laptop"


def events(logs: LogCapture, name: str) -> list[dict[str, Any]]:
    found = []
    for line in logs.text.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
    return found


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[RunningRelay]:
    running = await start_relay(load_config(write_config(tmp_path), env={}))
    try:
        yield running
    finally:
        await running.stop()


async def test_a_4401_logs_the_relays_reason_and_when_the_token_expired(
    relay: RunningRelay,
) -> None:
    expired = relay.token(ttl_s=60, now=time.time() - 3600)
    with LogCapture() as logs:
        agent = await start_agent(relay.ws_url, HOST, "http://127.0.0.1:9", token=expired,
                                  wait=False, backoff=Backoff(base=0.05, cap=0.1))
        try:
            await eventually(lambda: len(events(logs, "agent.token_expired")) >= 1)
        finally:
            await agent.stop()
    disconnected = events(logs, "agent.disconnected")[0]
    assert disconnected["code"] == 4401
    assert disconnected["close_reason"] == "token expired; get a fresh token and retry"
    reconnecting = events(logs, "agent.reconnecting")[0]
    assert reconnecting["reason"] == "token expired; get a fresh token and retry"
    hint = events(logs, "agent.token_expired")[0]
    assert hint["level"] == "warning"
    assert 3500 <= hint["expired_s_ago"] <= 3600
    assert hint["exp"] == time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                        time.gmtime(unverified_expiry(expired) or 0))
    assert "--token-file" in hint["hint"] and "--ttl" in hint["hint"]
    assert expired not in logs.text and expired.split(".")[2] not in logs.text


async def test_a_4403_logs_the_relays_reason_and_no_expiry_hint(relay: RunningRelay) -> None:
    other_org = relay.token(orgs=("beta",))
    with LogCapture() as logs:
        agent = await start_agent(relay.ws_url, HOST, "http://127.0.0.1:9", token=other_org,
                                  wait=False, backoff=Backoff(base=0.05, cap=0.1))
        try:
            await eventually(lambda: len(events(logs, "agent.reconnecting")) >= 1)
        finally:
            await agent.stop()
    disconnected = events(logs, "agent.disconnected")[0]
    assert disconnected["code"] == 4403
    assert disconnected["close_reason"] not in ("", "closed")
    assert "org" in disconnected["close_reason"]
    assert events(logs, "agent.reconnecting")[0]["reason"] == disconnected["close_reason"]
    assert events(logs, "agent.token_expired") == []  # the token is fine; access is not


async def test_connect_failed_names_the_address_and_the_cause() -> None:
    port = free_port()  # nothing listens there
    with LogCapture() as logs:
        agent = await start_agent(f"ws://127.0.0.1:{port}", HOST, "http://127.0.0.1:9",
                                  token="t", wait=False, backoff=Backoff(base=0.05, cap=0.1))
        try:
            await eventually(lambda: len(events(logs, "agent.connect_failed")) >= 1)
        finally:
            await agent.stop()
    failed = events(logs, "agent.connect_failed")[0]
    assert failed["address"] == f"127.0.0.1:{port}"
    assert failed["cause"] == "connection refused"
    assert failed["error"] == "ClientConnectorError"


def test_expiry_hint_only_for_an_expired_readable_token(tmp_path: Path) -> None:
    from relay.auth.devissuer import mint_token

    config = load_config(write_config(tmp_path), env={})
    now = time.time()
    fresh = mint_token(config, "alice", ["acme"], ttl_s=600, now=now)
    stale = mint_token(config, "alice", ["acme"], ttl_s=600, now=now - 3600)
    assert expiry_hint(fresh, "flag", now=now) is None
    assert expiry_hint("not-a-jwt", "flag", now=now) is None
    from_file = expiry_hint(stale, "file /run/agent/token", now=now)
    assert from_file is not None and from_file["expired_s_ago"] == 3000
    assert "file" in str(from_file["hint"]) and "--ttl" in str(from_file["hint"])
    from_flag = expiry_hint(stale, "flag", now=now)
    assert from_flag is not None and "--token-command" in str(from_flag["hint"])
