"""No token, token signature or token payload ever reaches a log line."""

from __future__ import annotations

import json
import time
from pathlib import Path

from relay.auth.devissuer import mint_token
from relay.logs import redact_text
from tests.harness import LogCapture, stack


def _parts(token: str) -> list[str]:
    _head, payload, signature = token.split(".")
    return [token, payload, signature]


async def test_tokens_never_reach_the_logs(tmp_path: Path) -> None:
    with LogCapture() as capture:
        async with stack(tmp_path) as st:
            good = st.token(email="alice@example.com")
            expired = mint_token(st.relay.config, "alice", ["acme"], ttl_s=600,
                                 now=time.time() - 7200)
            other = st.token(sub="mallory", orgs=("globex",))
            async with st.client.get(st.url("/inspect?token=" + good), headers=st.auth(good)):
                pass
            async with st.client.get(st.url("/"), headers=st.auth(expired)):
                pass
            async with st.client.get(st.url("/"), headers=st.auth(other)):
                pass
            async with st.client.get(st.url("/"), headers=st.auth(good + "x")):
                pass
            async with st.client.ws_connect(st.url("/ws") + f"?token={good}") as ws:
                await ws.send_str("hi")
                await ws.receive(timeout=5)
            async with st.client.ws_connect(st.url("/ws") + f"?token={expired}") as ws:
                await ws.receive(timeout=5)
            async with st.client.ws_connect(
                f"{st.relay.ws_url}/tunnel?hostId=acme:box&v=1&token={good}"
            ) as ws:
                await ws.close()
            tokens = [good, expired, other]
    text = capture.text
    events = [json.loads(line)["event"] for line in text.splitlines() if line.startswith("{")]
    # The capture works: the requests above were logged...
    assert "http.access" in events and "ws.opened" in events and "tunnel.connected" in events
    assert "auth.token_rejected" in events or "http.refused" in events
    # ...and nothing of any token is in there, nor the email claim.
    for token in tokens:
        for part in _parts(token):
            assert part not in text
    assert "alice@example.com" not in text


def test_redaction_catches_tokens_in_free_text() -> None:
    jwt_like = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"
    for text in (f"GET /hosts/a:b/ws?token={jwt_like}", f"Authorization: Bearer {jwt_like}",
                 f"failed for {jwt_like} badly", "/x?a=1&token=opaque-secret-value&b=2",
                 "Bearer opaque-secret-value"):
        redacted = redact_text(text)
        assert jwt_like not in redacted and "opaque-secret-value" not in redacted
        assert "[redacted]" in redacted


def test_access_line_matches_the_structured_events_and_is_redacted() -> None:
    import io

    import structlog

    from relay.logs import access_log, setup_logging

    jwt_like = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"
    stream = io.StringIO()
    setup_logging("info", "json", stream=stream)
    try:
        fields = {"host_id": "acme:x", "method": "GET", "path": f"/dl/{jwt_like}",
                  "status": 200, "bytes_in": 0, "bytes_out": 1024, "duration_ms": 1.5}
        structlog.get_logger("relay.http").info("http.access", **fields)
        access_log("relay.http").info("http.access", **fields)
        setup_logging("warning", "json", stream=stream)
        access_log("relay.http").info("http.access", **fields)  # below the level: unwritten
        assert not access_log("relay.http").enabled()
    finally:
        setup_logging("warning", "json")
    slow, fast = (json.loads(line) for line in stream.getvalue().splitlines())
    assert fast.keys() == slow.keys()
    assert {k: v for k, v in fast.items() if k != "timestamp"} == {
        k: v for k, v in slow.items() if k != "timestamp"}
    assert jwt_like not in stream.getvalue()
    assert fast["timestamp"].endswith("Z") and fast["timestamp"][:10] == slow["timestamp"][:10]
