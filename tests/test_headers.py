"""Header hygiene between client, relay and host: hop-by-hop fields and client credentials."""

from __future__ import annotations

import pytest

from relay.protocol.headers import (
    redact_query,
    request_headers_for_host,
    response_headers_for_client,
    strip_hop_by_hop,
    strip_token_param,
)

HOP_BY_HOP = [
    ("Connection", "keep-alive"),
    ("Keep-Alive", "timeout=5"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Transfer-Encoding", "chunked"),
    ("Upgrade", "h2c"),
    ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
    ("Proxy-Authenticate", "Basic"),
    ("Proxy-Connection", "keep-alive"),
    ("Proxy-Foo", "bar"),
]


def names(headers: list[tuple[str, str]]) -> list[str]:
    return [n.lower() for n, _ in headers]


def for_host(headers: list[tuple[str, str]], **kwargs: object) -> list[tuple[str, str]]:
    options: dict[str, object] = {"client_ip": "10.0.0.9", "scheme": "https",
                                  "host": "relay.example"}
    options.update(kwargs)
    return request_headers_for_host(headers, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "value"), HOP_BY_HOP)
def test_each_hop_by_hop_field_is_stripped_in_any_case(name: str, value: str) -> None:
    for spelled in (name, name.lower(), name.upper()):
        assert strip_hop_by_hop([(spelled, value), ("X-Keep", "1")]) == [("X-Keep", "1")]


def test_fields_named_in_connection_are_stripped() -> None:
    headers = [
        ("Connection", "X-Secret , x-other,keep-alive"),
        ("X-Secret", "s"),
        ("x-other", "o"),
        ("X-Kept", "k"),
    ]
    assert strip_hop_by_hop(headers) == [("X-Kept", "k")]


def test_fields_named_in_any_of_several_connection_headers_are_stripped() -> None:
    headers = [("Connection", "x-a"), ("Connection", "X-B"), ("X-A", "1"), ("X-B", "2"),
               ("X-C", "3")]
    assert strip_hop_by_hop(headers) == [("X-C", "3")]


def test_end_to_end_fields_keep_their_order_duplicates_and_spelling() -> None:
    headers = [("Set-Cookie", "a=1"), ("X-Mixed-Case", "v"), ("Set-Cookie", "b=2"),
               ("Content-Type", "text/plain")]
    assert strip_hop_by_hop(headers) == headers


def test_request_to_host_loses_credentials_host_and_hop_by_hop_fields() -> None:
    headers = [
        ("Host", "relay.example"),
        ("Authorization", "Bearer secret.jwt.value"),
        ("authorization", "Bearer second"),
        *HOP_BY_HOP,
        ("Accept", "text/html"),
        ("Cookie", "session=1"),
    ]
    out = for_host(headers)
    assert ("Accept", "text/html") in out and ("Cookie", "session=1") in out
    lowered = names(out)
    assert "authorization" not in lowered and "host" not in lowered
    for name, _ in HOP_BY_HOP:
        assert name.lower() not in lowered
    assert all("secret" not in v for _, v in out)


def test_forwarded_headers_are_set_by_the_relay() -> None:
    out = for_host([("Accept", "*/*")])
    assert out[-3:] == [("X-Forwarded-For", "10.0.0.9"), ("X-Forwarded-Proto", "https"),
                        ("X-Forwarded-Host", "relay.example")]


def test_client_supplied_forwarded_headers_are_not_trusted() -> None:
    headers = [("X-Forwarded-For", "1.2.3.4"), ("x-forwarded-proto", "gopher"),
               ("X-Forwarded-Host", "evil.example"), ("X-Relay-Peer", "forged"),
               ("x-relay-hop", "9"), ("Forwarded", "for=1.2.3.4;host=evil.example")]
    out = for_host(headers)
    assert out == [("X-Forwarded-For", "10.0.0.9"), ("X-Forwarded-Proto", "https"),
                   ("X-Forwarded-Host", "relay.example")]


def test_a_trusted_forwarded_chain_is_extended() -> None:
    out = for_host([("X-Forwarded-For", "1.2.3.4")], prior_forwarded_for="1.2.3.4, 5.6.7.8")
    assert ("X-Forwarded-For", "1.2.3.4, 5.6.7.8, 10.0.0.9") in out
    assert names(out).count("x-forwarded-for") == 1


def test_websocket_handshake_fields_are_dropped_only_for_websockets() -> None:
    headers = [("Sec-WebSocket-Key", "abc"), ("Sec-WebSocket-Version", "13"),
               ("Sec-WebSocket-Protocol", "chat"), ("Sec-WebSocket-Extensions", "x")]
    assert "sec-websocket-key" in names(for_host(headers))
    ws = names(for_host(headers, websocket=True))
    assert not [n for n in ws if n.startswith("sec-websocket")]


def test_response_to_client_loses_hop_by_hop_fields_and_the_hosts_framing() -> None:
    headers = [("Content-Type", "text/plain"), ("Content-Length", "12"),
               ("Connection", "close, X-Internal"), ("X-Internal", "1"), *HOP_BY_HOP,
               ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
    assert response_headers_for_client(headers) == [
        ("Content-Type", "text/plain"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
    ]


# -- the token query parameter ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ""),
        ("a=1", "a=1"),
        ("token=abc", ""),
        ("token=abc&a=1", "a=1"),
        ("a=1&token=abc", "a=1"),
        ("a=1&token=abc&b=%2F%20x+y", "a=1&b=%2F%20x+y"),
        ("token", ""),
        ("token=", ""),
        ("token=a&token=b&c=3", "c=3"),
        ("mytoken=1&token_type=x&tokens=2", "mytoken=1&token_type=x&tokens=2"),
        ("a=token&b=token%3D1", "a=token&b=token%3D1"),
        ("%74oken=abc&a=1", "a=1"),  # percent-encoded name: the host would decode it
        ("t%6Fken=abc", ""),
        ("%74%6F%6B%65%6E=abc&z", "z"),
        ("a=1&&b=2", "a=1&&b=2"),
    ],
)
def test_token_parameter_is_removed_and_every_other_byte_kept(query: str, expected: str) -> None:
    assert strip_token_param(query) == expected


def test_redacted_query_hides_credential_parameters() -> None:
    safe = redact_query("token=abc.def&access_token=x&a=1")
    assert "abc.def" not in safe and "x&" not in safe
    assert "a=1" in safe


IDENTITY = [("X-Real-IP", "6.6.6.6"), ("True-Client-IP", "6.6.6.6"), ("x-client-ip", "6.6.6.6"),
            ("CF-Connecting-IP", "6.6.6.6"), ("X-Forwarded-Port", "1"),
            ("X-Forwarded-Prefix", "/evil"), ("X-Forwarded-Server", "evil"),
            ("Forwarded", "for=6.6.6.6"), ("X-Original-URL", "/admin"),
            ("X-Rewrite-URL", "/admin"), ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Host", "evil.example"), ("X-Forwarded-Proto", "gopher")]


def test_client_identity_headers_are_dropped_and_the_relay_sets_its_own() -> None:
    out = for_host([*IDENTITY, ("X-Keep", "1")])
    assert out == [("X-Keep", "1"), ("X-Forwarded-For", "10.0.0.9"),
                   ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "relay.example")]


def test_a_trusted_proxy_keeps_identity_headers_but_never_the_forwarding_trio() -> None:
    out = dict(for_host(IDENTITY, keep_client_identity=True, prior_forwarded_for="1.2.3.4"))
    assert out["X-Real-IP"] == "6.6.6.6" and out["X-Forwarded-Port"] == "1"
    assert "Forwarded" not in out  # would disagree with the extended chain
    assert out["X-Forwarded-For"] == "1.2.3.4, 10.0.0.9"
    assert (out["X-Forwarded-Proto"], out["X-Forwarded-Host"]) == ("https", "relay.example")


def _for_host_step_by_step(headers: list[tuple[str, str]], *, websocket: bool,
                           keep: bool, prior: str) -> list[tuple[str, str]]:
    """The rules of request_headers_for_host applied one after the other, as they read."""
    from relay.protocol.headers import (
        _TO_HOST_HTTP,
        _TO_HOST_WS,
        RELAY_INTERNAL_PREFIX,
        RELAY_SET,
        is_client_identity,
        strip_session_cookie,
    )

    extra = _TO_HOST_WS if websocket else _TO_HOST_HTTP
    out = [(n, v) for n, v in strip_session_cookie(strip_hop_by_hop(headers, extra=extra))
           if not (n.lower().startswith(RELAY_INTERNAL_PREFIX) or n.lower() in RELAY_SET
                   or (not keep and is_client_identity(n)))]
    out += [("X-Forwarded-For", ", ".join(p for p in (prior, "10.0.0.9") if p)),
            ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "relay.example"),
            ("X-Forwarded-Prefix", "/hosts/a:b")]
    return [(n, v) for n, v in out if v]


def test_the_one_pass_filter_keeps_exactly_what_the_rules_keep() -> None:
    import random

    pool = [*HOP_BY_HOP, ("Connection", "X-Drop, keep-alive"), ("x-drop", "1"),
            ("X-Keep", "1"), ("X-Empty", ""), ("Authorization", "Bearer t"), ("Host", "h"),
            ("Expect", "100-continue"), ("Cookie", "relay_session=s; a=1"),
            ("Cookie", "relay_session=s"), ("cookie", "a=relay_session"),
            ("X-Relay-Signature", "x"), ("X-Forwarded-For", "1.2.3.4"), ("X-Real-IP", "1"),
            ("Forwarded", "for=1"), ("X-Forwarded-Port", "443"), ("Sec-WebSocket-Key", "k"),
            ("Sec-WebSocket-Protocol", "chat"), ("ACCEPT", "*/*"), ("Origin", "o"),
            ("CONNECTION", "Origin")]
    rng = random.Random(7)
    for _ in range(400):
        headers = rng.sample(pool, rng.randint(0, 12))
        websocket, keep = rng.random() < 0.5, rng.random() < 0.5
        prior = rng.choice(["", "9.9.9.9"])
        for _twice in range(2):  # the second time from the cached fates
            got = for_host(headers, websocket=websocket, keep_client_identity=keep,
                           prior_forwarded_for=prior, prefix="/hosts/a:b")
            assert got == _for_host_step_by_step(headers, websocket=websocket, keep=keep,
                                                 prior=prior), headers
