"""Navigation-session cookies (pure): sealing, opening, binding, expiry, request rules."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from multidict import CIMultiDict

from relay.auth.session import (
    SESSION_KEY_FILENAME,
    SessionCookies,
    clear_cookie_header,
    cookie_usable,
    is_navigation,
    load_session_key,
    session_values,
    set_cookie_header,
)
from relay.config import Config, load_config, masked
from relay.errors import ConfigError
from relay.protocol.headers import strip_session_cookie
from tests.clock import FakeClock

KEY = b"k" * 32
TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"


def sessions(clock: FakeClock) -> SessionCookies:
    return SessionCookies(KEY, clock=clock)


def test_a_sealed_cookie_opens_for_its_host_until_the_token_expires() -> None:
    clock = FakeClock(1000.0)
    cookies = sessions(clock)
    value = cookies.seal("acme:laptop", TOKEN, expires_at=1600.0)
    assert value is not None and value.endswith("." + TOKEN)
    assert cookies.open("acme:laptop", value) == TOKEN
    assert cookies.max_age(1600.0) == 600
    clock.advance(599)
    assert cookies.open("acme:laptop", value) == TOKEN
    assert cookies.max_age(1600.0) == 1
    clock.advance(1)
    assert cookies.open("acme:laptop", value) is None  # never outlives the token
    assert cookies.max_age(1600.0) == 0


def test_a_cookie_for_one_host_opens_no_other() -> None:
    cookies = sessions(FakeClock())
    value = cookies.seal("acme:laptop", TOKEN, expires_at=2000.0)
    assert value is not None
    for other in ("acme:desk", "acme:laptop2", "acme:lapto", "globex:laptop", ""):
        assert cookies.open(other, value) is None


def test_another_relays_key_or_a_tampered_cookie_opens_nothing() -> None:
    clock = FakeClock()
    value = sessions(clock).seal("acme:laptop", TOKEN, expires_at=2000.0)
    assert value is not None
    assert SessionCookies(b"x" * 32, clock=clock).open("acme:laptop", value) is None
    exp, mac, token = value.split(".", 2)
    cookies = sessions(clock)
    tampered = [
        f"{int(exp) + 1000}.{mac}.{token}",  # a longer life
        f"{exp}.{mac}.{token}x",  # another token
        f"{exp}.{mac[:-1]}A.{token}",
        f"{exp}..{token}",
        f"{exp}.{mac}.",
        f".{mac}.{token}",
        f"-1.{mac}.{token}",
        f"{'9' * 40}.{mac}.{token}",
        f"{exp}.{mac}",
        TOKEN,  # a bare token is not a session
        "", ".", "..", "garbage", "\u00e9.\u00e9.\u00e9",
    ]
    for bad in tampered:
        assert cookies.open("acme:laptop", bad) is None, bad


def test_tokens_that_cannot_be_cookies_are_not_sealed() -> None:
    cookies = sessions(FakeClock(1000.0))
    assert cookies.seal("acme:laptop", TOKEN, expires_at=999.0) is None  # already expired
    assert cookies.seal("acme:laptop", "a;b", expires_at=2000.0) is None
    assert cookies.seal("acme:laptop", "a b", expires_at=2000.0) is None
    assert cookies.seal("acme:laptop", "x" * 5000, expires_at=2000.0) is None  # too large


def test_set_cookie_attributes() -> None:
    header = set_cookie_header("acme:laptop", "v", 60, secure=False)
    assert header == "relay_session=v; Path=/hosts/acme:laptop/; Max-Age=60; HttpOnly; SameSite=Lax"
    assert set_cookie_header("acme:laptop", "v", 60, secure=True).endswith("; Secure")
    assert clear_cookie_header("acme:laptop", secure=False) == (
        "relay_session=; Path=/hosts/acme:laptop/; Max-Age=0; HttpOnly; SameSite=Lax")


def test_session_values_and_stripping_from_the_cookie_header() -> None:
    assert session_values(["a=1; relay_session=v1; b=2", "relay_session=v2"]) == ["v1", "v2"]
    assert session_values(["relay_session=", "xrelay_session=v", "relay_sessionx=v"]) == []
    stripped = strip_session_cookie([
        ("Cookie", "a=1; relay_session=v; b=2"),
        ("cookie", "relay_session=v"),
        ("Cookie", "xrelay_session=keep"),
        ("X-Other", "relay_session=v"),
    ])
    assert stripped == [("Cookie", "a=1; b=2"), ("Cookie", "xrelay_session=keep"),
                        ("X-Other", "relay_session=v")]


@pytest.mark.parametrize(("method", "headers", "expected"), [
    ("GET", {"Sec-Fetch-Mode": "navigate"}, True),
    ("GET", {"Sec-Fetch-Mode": "navigate", "Accept": "application/json"}, True),
    ("GET", {"Sec-Fetch-Mode": "cors", "Accept": "text/html"}, False),
    ("GET", {"Sec-Fetch-Mode": "no-cors"}, False),
    ("GET", {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}, True),
    ("GET", {"Accept": "TEXT/HTML;q=0.9"}, True),
    ("GET", {"Accept": "application/json, text/html"}, False),
    ("GET", {"Accept": "text/event-stream"}, False),
    ("GET", {}, False),
    ("HEAD", {"Sec-Fetch-Mode": "navigate"}, False),
    ("POST", {"Sec-Fetch-Mode": "navigate"}, False),
])
def test_what_is_a_navigation(method: str, headers: dict[str, str], expected: bool) -> None:
    assert is_navigation(method, CIMultiDict(headers)) is expected


@pytest.mark.parametrize(("method", "headers", "expected"), [
    ("POST", {}, True),  # no Fetch Metadata (older clients, curl): SameSite is the guard
    ("POST", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "navigate"}, True),
    ("GET", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "websocket"}, True),
    ("GET", {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"}, True),
    ("GET", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}, True),
    ("GET", {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate"}, True),
    # a sibling subdomain riding the user's session: refused
    ("POST", {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate"}, False),
    ("GET", {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "websocket"}, False),
    ("GET", {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"}, False),
    ("GET", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}, False),
])
def test_when_a_cookie_may_authenticate(
    method: str, headers: dict[str, str], expected: bool
) -> None:
    assert cookie_usable(method, CIMultiDict(headers)) is expected


def _config(tmp_path: Path, body: str = "") -> Config:
    path = tmp_path / "relay.toml"
    path.write_text(body)
    return load_config(path, env={})


def test_dev_mode_generates_one_key_into_the_state_folder_and_reuses_it(tmp_path: Path) -> None:
    config = _config(tmp_path)
    first = load_session_key(config)
    key_file = tmp_path / "state" / SESSION_KEY_FILENAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert load_session_key(config) == first
    assert len(first) == 32


def test_a_configured_secret_wins_and_is_masked(tmp_path: Path) -> None:
    config = _config(tmp_path, '[auth]\nsession_secret = "0123456789abcdef-shared"\n')
    key = load_session_key(config)
    assert not (tmp_path / "state" / SESSION_KEY_FILENAME).exists()
    assert key == load_session_key(_config(tmp_path, '[auth]\nsession_secret = '
                                           '"0123456789abcdef-shared"\n'))
    assert masked(config)["auth"]["session_secret"] == "********"
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, '[auth]\nsession_secret = "short"\n')
    assert info.value.key == "auth.session_secret"


def test_redis_relays_derive_the_key_from_the_peer_secret(tmp_path: Path) -> None:
    body = ('[directory]\nbackend = "redis"\nredis_url = "redis://127.0.0.1:1"\n'
            'peer_secret = "{}"\n')
    a = load_session_key(_config(tmp_path, body.format("p" * 20)))
    b = load_session_key(_config(tmp_path, body.format("p" * 20)))
    c = load_session_key(_config(tmp_path, body.format("q" * 20)))
    assert a == b != c
    assert a != ("p" * 20).encode()  # derived (domain-separated), not the peer secret itself


def test_without_any_secret_the_key_is_per_process(tmp_path: Path) -> None:
    pem = tmp_path / "pub.pem"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    config = _config(tmp_path, '[auth]\nmode = "public_key"\npublic_key_file = "pub.pem"\n')
    assert load_session_key(config) != load_session_key(config)
    assert not (tmp_path / "state").exists()


def test_an_unusable_dev_key_file_is_one_config_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / SESSION_KEY_FILENAME).write_bytes(b"short")
    os.chmod(state / SESSION_KEY_FILENAME, 0o644)
    with pytest.raises(ConfigError) as info:
        load_session_key(_config(tmp_path))
    assert info.value.key == "auth.dev_state_dir"
