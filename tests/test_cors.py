"""The CORS decision (pure): preflight grants, grants on answers, config validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from multidict import CIMultiDict

from relay.config import load_config
from relay.errors import ConfigError
from relay.server.cors import CorsPolicy, merge_vary

APP = "https://app.example.com"


def policy(*origins: str) -> CorsPolicy:
    return CorsPolicy(origins or (APP,), max_age_s=600)


def test_preflight_grants_the_requested_method_and_headers() -> None:
    grant = policy().preflight(APP, "PUT", "authorization, content-type,X-Trace")
    assert grant == [
        ("Access-Control-Allow-Origin", APP),
        ("Access-Control-Allow-Credentials", "true"),
        ("Access-Control-Allow-Methods", "PUT"),
        ("Access-Control-Allow-Headers", "authorization, content-type, X-Trace"),
        ("Access-Control-Max-Age", "600"),
        ("Vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
    ]


def test_preflight_without_requested_headers_grants_none() -> None:
    grant = dict(policy().preflight(APP, "GET", None) or [])
    assert "Access-Control-Allow-Headers" not in grant
    assert grant["Access-Control-Allow-Methods"] == "GET"


@pytest.mark.parametrize(("origin", "method", "headers"), [
    ("https://evil.example", "GET", ""),
    ("https://app.example.com.evil.example", "GET", ""),
    ("http://app.example.com", "GET", ""),  # another scheme is another origin
    ("https://app.example.com:8443", "GET", ""),
    ("null", "GET", ""),
    ("", "GET", ""),
    (None, "GET", ""),
    (APP, None, ""),  # a plain OPTIONS, not a preflight
    (APP, "", ""),
    (APP, "GET, PUT", ""),
    (APP, "GE T", ""),
    (APP, "GET\r\nX-Injected: 1", ""),
    (APP, "GET", "x-ok, bad header"),
    (APP, "GET", "x\r\nSet-Cookie: a=b"),
    (APP, "GET", ",".join(f"x-{n}" for n in range(65))),
])
def test_no_preflight_grant(origin: str | None, method: str | None, headers: str) -> None:
    assert policy().preflight(origin, method, headers) is None


def test_config_spellings_of_an_origin_match_what_browsers_send() -> None:
    cors = policy("https://App.Example.com:443", "http://localhost:3000")
    assert cors.allows("https://app.example.com")
    assert cors.allows("http://localhost:3000")
    assert not cors.allows("http://localhost:3001")
    assert not cors.allows("http://localhost")


def test_the_memo_of_origins_is_bounded() -> None:
    cors = policy()
    for n in range(5000):
        assert not cors.allows(f"https://x{n}.example")
    assert len(cors._exact) <= 1024
    assert cors.allows(APP)


def test_grant_replaces_the_hosts_cors_headers_and_keeps_its_exposed_names() -> None:
    headers = CIMultiDict([
        ("Content-Type", "application/json"),
        ("Access-Control-Allow-Origin", "*"),
        ("access-control-allow-credentials", "false"),
        ("Access-Control-Allow-Methods", "DELETE"),
        ("Access-Control-Expose-Headers", "X-Request-Id, retry-after"),
        ("Access-Control-Expose-Headers", "X-Bad Name"),
        ("Vary", "Accept-Encoding"),
        ("vary", "Accept"),
    ])
    policy().decorate(headers, APP)
    assert headers.getall("Access-Control-Allow-Origin") == [APP]
    assert headers.getall("Access-Control-Allow-Credentials") == ["true"]
    assert "Access-Control-Allow-Methods" not in headers
    assert headers.getall("Access-Control-Expose-Headers") == [
        "Retry-After, WWW-Authenticate, Server-Timing, X-Request-Id"]
    assert headers.getall("Vary") == ["Accept-Encoding, Accept, Origin"]
    assert headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("origin", [None, "https://evil.example", "null"])
def test_no_grant_strips_the_hosts_cors_headers_but_still_varies(origin: str | None) -> None:
    headers = CIMultiDict([("Access-Control-Allow-Origin", "*"), ("X-Other", "1")])
    policy().decorate(headers, origin)
    assert not [n for n in headers if n.lower().startswith("access-control-")]
    assert headers["Vary"] == "Origin"
    assert headers["X-Other"] == "1"


def test_decorating_twice_is_the_same_as_once() -> None:
    # A forwarded request is decorated by the owner relay and again by the entry relay.
    headers = CIMultiDict([("Vary", "Accept")])
    policy().decorate(headers, APP)
    once = list(headers.items())
    policy().decorate(headers, APP)
    assert sorted(headers.items()) == sorted(once)


@pytest.mark.parametrize(("values", "expected"), [
    ([], "Origin"),
    (["Accept"], "Accept, Origin"),
    (["origin"], "origin"),
    (["Accept, Origin"], "Accept, Origin"),
    (["*"], "*"),
    (["", " , Accept"], "Accept, Origin"),
])
def test_merge_vary(values: list[str], expected: str) -> None:
    assert merge_vary(values, "Origin") == expected


def _config(tmp_path: Path, body: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(body)
    load_config(path, env={})


@pytest.mark.parametrize(("origin", "problem"), [
    ("*", "'*' is not allowed"),
    ("https://app.example.com/", "no path"),
    ("https://app.example.com/app", "no path"),
    ("https://app.example.com?x", "no path"),
    ("app.example.com", "http(s)://host"),
    ("ftp://app.example.com", "http(s)://host"),
    ("https://user@app.example.com", "user info"),
    ("https://app.example.com:99999", "not a valid origin"),
    ("null", "http(s)://host"),
])
def test_config_refuses_anything_but_exact_origins(
    tmp_path: Path, origin: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, f'[cors]\nallow_origins = ["{origin}"]\n')
    assert info.value.key == "cors.allow_origins"
    assert problem in str(info.value)
    assert "\n" not in str(info.value)


def test_config_accepts_exact_origins_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[cors]\nallow_origins = ["https://a.example", "http://localhost:3000"]\n')
    config = load_config(path, env={})
    assert config.cors.allow_origins == ("https://a.example", "http://localhost:3000")
    assert config.cors.max_age_s == 600
    env = {"RELAY_CORS_ALLOW_ORIGINS": "https://b.example, https://c.example",
           "RELAY_CORS_MAX_AGE_S": "60"}
    config = load_config(path, env=env)
    assert config.cors.allow_origins == ("https://b.example", "https://c.example")
    assert config.cors.max_age_s == 60
    with pytest.raises(ConfigError):
        load_config(path, env={"RELAY_CORS_MAX_AGE_S": "-1"})
