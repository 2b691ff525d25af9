"""The access line: the chain's exact JSON, batched per loop iteration, in order, never lost.

Access lines are rendered by hand and queued on the root handler; these pin that nothing about
the line changed (every field, its text, the redaction), that other events never overtake or
fall behind it, that the queue is bounded, and that a real ``relay serve`` stopped with SIGTERM
has written every line.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from relay.auth.devissuer import mint_token
from relay.config import load_config
from relay.logs import BufferedStreamHandler, access_log, setup_logging
from tests.harness import (
    agent_token,
    eventually,
    spawn_relay_process,
    stack,
    start_agent,
    start_host,
    wait_http,
    write_config,
)

JWT_LIKE = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"
ACCESS_FIELDS = ("host_id", "method", "path", "status", "bytes_in", "bytes_out", "duration_ms")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    try:
        yield out
    finally:
        setup_logging("warning", "json")


def _handler() -> BufferedStreamHandler:
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, BufferedStreamHandler)
    return handler


def _without_timestamp(line: str) -> str:
    doc = json.loads(line)
    return line.replace(doc["timestamp"], "T")


@pytest.mark.parametrize("fields", [
    {"host_id": "acme:x", "method": "GET", "path": "/small", "status": 200, "bytes_in": 0,
     "bytes_out": 1024, "duration_ms": 1.5},
    {"host_id": "acme:x", "method": "POST", "path": f"/dl/{JWT_LIKE}?token=opaque&x=1",
     "status": 499, "bytes_in": 17, "bytes_out": 0, "duration_ms": 30000.25},
    {"path": 'quotes " back\\slash \x01 tab\t é ü 日本 😀', "status": None, "ok": True,
     "no": False, "big": 10**20, "tiny": 1e-7, "nan": float("nan"), "inf": float("inf"),
     "list": ["a", f"Bearer {JWT_LIKE}", 3], "nested": {"k": JWT_LIKE}, "pct": "100%s %d"},
    {},
])
def test_access_line_is_byte_for_byte_the_chain_line(stream: io.StringIO,
                                                     fields: dict[str, Any]) -> None:
    structlog.get_logger("relay.http").info("http.access", **fields)
    access_log("relay.http").info("http.access", **dict(fields))
    _handler().flush()
    chain, fast = stream.getvalue().splitlines()
    assert _without_timestamp(fast) == _without_timestamp(chain)
    assert JWT_LIKE not in stream.getvalue() and "opaque" not in stream.getvalue()
    assert json.loads(fast)["timestamp"][:10] == json.loads(chain)["timestamp"][:10]


def test_the_default_line_keeps_every_field_in_its_order(stream: io.StringIO) -> None:
    fields = dict(zip(ACCESS_FIELDS, ("acme:x", "GET", "/a", 200, 0, 8, 0.42), strict=True))
    access_log("relay.http").info("http.access", **fields)
    _handler().flush()
    doc = json.loads(stream.getvalue())
    assert list(doc) == [*ACCESS_FIELDS, "event", "level", "logger", "timestamp"]
    assert doc["event"] == "http.access" and doc["level"] == "info"
    assert doc["logger"] == "relay.http" and doc["timestamp"].endswith("Z")


def test_below_info_nothing_is_queued(stream: io.StringIO) -> None:
    setup_logging("warning", "json", stream=stream)
    access_log("relay.http").info("http.access", status=200)
    assert _handler().pending_lines == 0
    _handler().flush()
    assert stream.getvalue() == ""


async def test_lines_wait_for_the_end_of_the_loop_iteration_then_go_in_one_write(
    stream: io.StringIO,
) -> None:
    writes: list[str] = []
    real_write = stream.write

    def counting_write(text: str) -> int:
        writes.append(text)
        return real_write(text)

    stream.write = counting_write  # type: ignore[method-assign]
    log = access_log("relay.http")
    for n in range(5):
        log.info("http.access", n=n)
    assert stream.getvalue() == "" and _handler().pending_lines == 5
    await eventually(lambda: _handler().pending_lines == 0, timeout=2, interval=0)
    assert len(writes) == 1
    assert [json.loads(line)["n"] for line in stream.getvalue().splitlines()] == list(range(5))


async def test_other_events_never_overtake_queued_access_lines(stream: io.StringIO) -> None:
    log = access_log("relay.http")
    log.info("http.access", n=1)
    structlog.get_logger("relay.tunnel").warning("tunnel.disconnected", reason="test")
    log.info("http.access", n=2)
    logging.getLogger("aiohttp.server").error("a stdlib record")
    log.info("http.access", n=3)
    await eventually(lambda: _handler().pending_lines == 0, timeout=2, interval=0)
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events == ["http.access", "tunnel.disconnected", "http.access", "a stdlib record",
                      "http.access"]


async def test_the_queue_is_bounded_within_one_iteration(stream: io.StringIO) -> None:
    handler = _handler()
    log = access_log("relay.http")
    path = "/p" * 100
    largest = 0
    for n in range(2000):  # ~500 KiB of lines without yielding to the loop once
        log.info("http.access", n=n, path=path)
        largest = max(largest, handler._pending_chars)
    assert largest < BufferedStreamHandler.MAX_PENDING_CHARS
    written = len(stream.getvalue().splitlines())
    assert written > 2000 - BufferedStreamHandler.MAX_PENDING_CHARS // len(path)
    await eventually(lambda: handler.pending_lines == 0, timeout=2, interval=0)
    assert [json.loads(line)["n"] for line in stream.getvalue().splitlines()] == list(range(2000))


async def test_a_new_setup_writes_what_the_old_handler_queued(stream: io.StringIO) -> None:
    access_log("relay.http").info("http.access", n=1)
    other = io.StringIO()
    setup_logging("info", "json", stream=other)
    assert json.loads(stream.getvalue())["n"] == 1 and other.getvalue() == ""


def test_without_a_running_loop_a_line_is_written_at_once(stream: io.StringIO) -> None:
    access_log("relay.http").info("http.access", n=1)
    assert json.loads(stream.getvalue())["n"] == 1


async def test_a_loop_that_ended_with_a_flush_pending_does_not_stall_the_next(
    stream: io.StringIO,
) -> None:
    handler = _handler()
    dead = asyncio.new_event_loop()
    dead.close()
    handler._scheduled = dead  # as if an earlier loop ended before running its flush
    access_log("relay.http").info("http.access", n=1)
    await eventually(lambda: handler.pending_lines == 0, timeout=2, interval=0)
    assert json.loads(stream.getvalue())["n"] == 1


async def test_proxied_requests_log_every_field_redacted(tmp_path: Path,
                                                         stream: io.StringIO) -> None:
    async with stack(tmp_path, {"log": {"level": "info"}}) as st:
        token = st.token()
        for n in range(3):
            async with st.client.get(st.url(f"/bytes/{n}?token={token}"),
                                     headers=st.auth(token)) as resp:
                await resp.read()
        await eventually(lambda: stream.getvalue().count('"http.access"') == 3, timeout=5)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [doc for doc in lines if doc["event"] == "http.access"]
    assert all(list(doc)[:7] == list(ACCESS_FIELDS) for doc in access)
    assert [doc["path"] for doc in access] == ["/bytes/0", "/bytes/1", "/bytes/2"]
    assert token not in stream.getvalue()
    for part in token.split("."):
        assert part not in stream.getvalue()


async def test_access_log_off_writes_no_access_line(tmp_path: Path, stream: io.StringIO) -> None:
    async with stack(tmp_path, {"log": {"level": "info", "access_log": False}}) as st:
        async with st.client.get(st.url("/"), headers=st.auth()) as resp:
            assert resp.status == 200
        await asyncio.sleep(0)
    _handler().flush()
    assert '"http.access"' not in stream.getvalue()


async def test_relay_serve_stopped_with_sigterm_has_written_every_line(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, {"log": {"level": "info"}})
    config = load_config(config_path, env={})
    token = mint_token(config, "alice", ["acme"])
    host = await start_host()
    log_file = tmp_path / "relay.log"
    proc = spawn_relay_process(config_path, log_file=log_file)
    agent = None
    try:
        base = f"http://127.0.0.1:{config.server.port}"
        await wait_http(f"{base}/readyz", timeout=15)
        agent = await start_agent(f"ws://127.0.0.1:{config.server.port}", "acme:laptop",
                                  host.url, token=agent_token(config, "acme:laptop"))
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as client:

            async def get(n: int) -> None:
                async with client.get(f"{base}/hosts/acme:laptop/bytes/{n}",
                                      headers=headers) as resp:
                    assert resp.status == 200
                    await resp.read()

            # Concurrent, so several lines share a loop iteration (and a write).
            await asyncio.gather(*(get(n) for n in range(40)))
        proc.send_signal(signal.SIGTERM)
        await eventually(lambda: proc.poll() is not None, timeout=15)
        assert proc.returncode == 0
    finally:
        if agent is not None:
            await agent.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        await host.stop()
    events = [json.loads(line) for line in log_file.read_text().splitlines()
              if line.startswith("{")]
    names = [doc["event"] for doc in events]
    assert sorted(doc["path"] for doc in events if doc["event"] == "http.access") == sorted(
        f"/bytes/{n}" for n in range(40))
    assert names[-1] == "relay.stopped"
    assert names.index("relay.signal") > max(i for i, n in enumerate(names) if n == "http.access")
