"""Keeping hosts apart on one origin: Set-Cookie and Location rewriting (pure functions)."""

from __future__ import annotations

import pytest

from relay.protocol.hostpaths import (
    localize_location,
    localize_response_headers,
    origin_key,
    rewrite_cookie_path,
    rewrite_for_client,
    rewrite_location,
    rewrite_set_cookie,
)

P = "/hosts/acme:laptop"
RELAY = "https://relay.example"


@pytest.mark.parametrize(("path", "expected"), [
    (None, P + "/"),
    ("", P + "/"),
    ("/", P + "/"),
    ("/app", P + "/app"),
    ("/app/", P + "/app/"),
    ("/a/b/c", P + "/a/b/c"),
    ("app", P + "/"),  # not starting with "/": the RFC's default path, here the host's root
    (P + "/", P + "/"),  # a prefix-aware host is not prefixed twice
    (P + "/x", P + "/x"),
    (P, P),
    ("/hosts/acme:laptopX/", P + "/hosts/acme:laptopX/"),  # a look-alike prefix is not ours
    ("/hosts/acme:desk/", P + "/hosts/acme:desk/"),  # another host's path: stays inside ours
    # hostile: climbing out of the prefix, encoded or not, or control characters
    ("/../../hosts/acme:desk/", P + "/"),
    ("/app/../..", P + "/"),
    ("/%2e%2e/x", P + "/"),
    ("/%2E%2E%2Fhosts", P + "/"),
    ("/./x", P + "/"),
    ("/a\\b", P + "/"),
    ("/a\tb", P + "/"),
    ("/a b", P + "/"),
    ("/a\x00", P + "/"),
])
def test_cookie_path_is_moved_under_the_host(path: str | None, expected: str) -> None:
    assert rewrite_cookie_path(path, P) == expected


@pytest.mark.parametrize(("header", "expected"), [
    ("sid=1", f"sid=1; Path={P}/"),
    ("sid=1; Path=/", f"sid=1; Path={P}/"),
    ("sid=1; path=/app; HttpOnly", f"sid=1; HttpOnly; Path={P}/app"),
    ("sid=1; Domain=relay.example; Path=/", f"sid=1; Path={P}/"),
    ("sid=1; domain=.example; Secure; SameSite=None", f"sid=1; Secure; SameSite=None; Path={P}/"),
    ("sid=1; Path=/a; Path=/b", f"sid=1; Path={P}/b"),  # the last Path wins, as in browsers
    ("sid=1; Path", f"sid=1; Path={P}/"),
    ("sid=1; Path=", f"sid=1; Path={P}/"),
    ("sid=1; Max-Age=60; Expires=Wed, 21 Oct 2099 07:28:00 GMT",
     f"sid=1; Max-Age=60; Expires=Wed, 21 Oct 2099 07:28:00 GMT; Path={P}/"),
    ("  sid = a=b=c ;  Path = /x ; ", f"sid = a=b=c; Path={P}/x"),
    ("sid=1;;; HttpOnly", f"sid=1; HttpOnly; Path={P}/"),
    ("sid=1; Domain=127.0.0.1; Domain=evil.example", f"sid=1; Path={P}/"),
    ("sid=1; Path=/../../; Domain=relay.example", f"sid=1; Path={P}/"),
    ("sid=1; Partitioned; Secure", f"sid=1; Partitioned; Secure; Path={P}/"),
])
def test_set_cookie_keeps_its_attributes_but_not_its_domain_or_path(
    header: str, expected: str
) -> None:
    assert rewrite_set_cookie(header, P) == expected


def test_a_host_cannot_set_the_relays_session_cookie() -> None:
    assert rewrite_set_cookie("relay_session=forged; Path=/", P) is None
    assert rewrite_set_cookie(" relay_session =x", P) is None
    # Cookie names are case-sensitive: this one is the host's own.
    assert rewrite_set_cookie("Relay_Session=x", P) == f"Relay_Session=x; Path={P}/"


@pytest.mark.parametrize(("location", "expected"), [
    # root-relative: under the host
    ("/", P + "/"),
    ("/login", P + "/login"),
    ("/login?next=/a#frag", P + "/login?next=/a#frag"),
    (P + "/already", P + "/already"),  # prefix-aware host
    (P, P),
    (P + "?x=1", P + "?x=1"),
    ("/hosts/acme:desk/x", P + "/hosts/acme:desk/x"),  # not a way into another host
    ("/hosts/acme:laptop2/x", P + "/hosts/acme:laptop2/x"),
    # relative: the browser resolves them under the current, prefixed URL
    ("login", "login"),
    ("../x", "../x"),
    ("./x?y", "./x?y"),
    ("?page=2", "?page=2"),
    ("#top", "#top"),
    ("", ""),
    # absolute at the relay's own origin (any spelling of it)
    (RELAY + "/login", RELAY + P + "/login"),
    (RELAY, RELAY + P + "/"),
    (RELAY + "?a=1", RELAY + P + "/?a=1"),
    ("HTTPS://Relay.Example/x", "https://Relay.Example" + P + "/x"),
    ("https://relay.example:443/x", "https://relay.example:443" + P + "/x"),
    (RELAY + P + "/in", RELAY + P + "/in"),
    # foreign: the host's business
    ("https://example.org/x", "https://example.org/x"),
    ("http://relay.example/x", "http://relay.example/x"),  # another scheme is another origin
    ("https://relay.example:8443/x", "https://relay.example:8443/x"),
    ("https://relay.example.evil/x", "https://relay.example.evil/x"),
    ("https://relay.example@evil.example/x", "https://relay.example@evil.example/x"),
    ("//evil.example/x", "//evil.example/x"),
    ("/\\evil.example/x", "/\\evil.example/x"),
    ("mailto:a@b", "mailto:a@b"),
    ("javascript:alert(1)", "javascript:alert(1)"),
    ("https://[::1/x", "https://[::1/x"),  # unparseable: untouched
])
def test_location_is_kept_under_the_host(location: str, expected: str) -> None:
    assert rewrite_location(location, P, RELAY) == expected


def test_location_at_a_relay_on_a_port() -> None:
    origin = "http://127.0.0.1:8080"
    assert rewrite_location("http://127.0.0.1:8080/x", P, origin) == f"{origin}{P}/x"
    assert rewrite_location("http://localhost:8080/x", P, origin) == "http://localhost:8080/x"
    assert rewrite_location("http://127.0.0.1:3100/x", P, origin) == "http://127.0.0.1:3100/x"


@pytest.mark.parametrize(("location", "expected"), [
    ("http://127.0.0.1:3100/x?y=1#z", "/x?y=1#z"),
    ("http://127.0.0.1:3100", "/"),
    ("http://127.0.0.1:3100?q", "/?q"),
    ("http://localhost:3100/x", "/x"),  # loopback aliases are the same service
    ("http://[::1]:3100/x", "/x"),
    ("HTTP://LOCALHOST:3100/x", "/x"),
    ("http://127.0.0.1:3100//evil.example/x", "/evil.example/x"),  # never "//host" after
    ("http://127.0.0.1:3101/x", "http://127.0.0.1:3101/x"),  # another port: another service
    ("https://127.0.0.1:3100/x", "https://127.0.0.1:3100/x"),
    ("http://10.0.0.5:3100/x", "http://10.0.0.5:3100/x"),
    ("https://example.org/x", "https://example.org/x"),
    ("/x", "/x"),
    ("x", "x"),
])
def test_agent_makes_redirects_to_its_own_origin_root_relative(
    location: str, expected: str
) -> None:
    assert localize_location(location, "http://127.0.0.1:3100") == expected


def test_agent_localizes_only_location() -> None:
    headers = [["Location", "http://127.0.0.1:3100/a"], ["Content-Location",
                                                          "http://127.0.0.1:3100/b"]]
    assert localize_response_headers(headers, "http://127.0.0.1:3100") == [
        ["Location", "/a"], ["Content-Location", "http://127.0.0.1:3100/b"]]


def test_agent_and_relay_together_keep_an_own_origin_redirect_under_the_host() -> None:
    own = localize_location("http://127.0.0.1:3100/done", "http://127.0.0.1:3100")
    assert rewrite_location(own, P, RELAY) == P + "/done"


def test_rewrite_for_client_touches_only_cookies_and_redirects() -> None:
    headers = [("Set-Cookie", "a=1; Path=/"), ("Location", "/x"), ("X-Other", "/y"),
               ("Set-Cookie", "relay_session=forged"), ("set-cookie", "b=2")]
    assert rewrite_for_client(headers, P, RELAY) == [
        ("Set-Cookie", f"a=1; Path={P}/"), ("Location", P + "/x"), ("X-Other", "/y"),
        ("set-cookie", f"b=2; Path={P}/")]


def test_a_host_cannot_reach_beyond_its_path_with_service_workers_or_clear_site_data() -> None:
    headers = [("Service-Worker-Allowed", "/"), ("Clear-Site-Data", '"cookies", "storage"'),
               ("service-worker-allowed", "/app/"), ("Service-Worker-Allowed", "/../")]
    assert rewrite_for_client(headers, P, RELAY) == [
        ("Service-Worker-Allowed", P + "/"), ("service-worker-allowed", P + "/app/"),
        ("Service-Worker-Allowed", P + "/")]


def test_origin_key_fills_default_ports() -> None:
    assert origin_key("https://A.example") == ("https", "a.example", 443)
    assert origin_key("http://a.example:80") == ("http", "a.example", 80)
    assert origin_key("http://a.example:8080") == ("http", "a.example", 8080)
    assert origin_key("a.example") is None
