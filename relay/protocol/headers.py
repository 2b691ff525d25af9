"""Header rules shared by the relay and the agent: hop-by-hop stripping and credential hygiene.

Pure functions over ``(name, value)`` lists so they are testable without a server.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote_plus, urlencode

# RFC 9110 §7.6.1 connection-specific fields, plus the ones proxies conventionally drop.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "proxy-connection",
})
# Proxy-Authorization, Proxy-Authenticate, Proxy-Connection and any other Proxy-* field belong to
# the hop they were sent on.
HOP_BY_HOP_PREFIX = "proxy-"
# The relay authenticates the client itself; its credentials must never reach the host.
CLIENT_CREDENTIALS = frozenset({"authorization"})
# Set by the WebSocket handshake on each hop; forwarding them would corrupt the next handshake.
WS_HANDSHAKE = frozenset({
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-accept", "sec-websocket-protocol",
})
# Relay-to-relay forwarding headers: a client must never be able to inject them.
RELAY_INTERNAL_PREFIX = "x-relay-"

Headers = list[tuple[str, str]]


def _connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    tokens: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def strip_hop_by_hop(
    headers: Iterable[tuple[str, str]], *, extra: frozenset[str] = frozenset()
) -> Headers:
    """Drop hop-by-hop fields (and Proxy-*), anything listed in Connection, and ``extra`` names."""
    items = list(headers)
    drop = HOP_BY_HOP | _connection_tokens(items) | extra
    return [
        (n, v) for n, v in items
        if n.lower() not in drop and not n.lower().startswith(HOP_BY_HOP_PREFIX)
    ]


def request_headers_for_host(
    headers: list[tuple[str, str]],
    *,
    client_ip: str,
    scheme: str,
    host: str,
    websocket: bool = False,
    prior_forwarded_for: str = "",
) -> Headers:
    """What the host service sees of a client's request headers."""
    extra = CLIENT_CREDENTIALS | (WS_HANDSHAKE if websocket else frozenset()) | {"host"}
    out = [
        (n, v) for n, v in strip_hop_by_hop(headers, extra=extra)
        if not n.lower().startswith(RELAY_INTERNAL_PREFIX)
        and n.lower() not in {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                              "forwarded"}
    ]
    # A chain from a trusted reverse proxy is extended; otherwise the client cannot forge one.
    chain = [p for p in (prior_forwarded_for, client_ip) if p]
    out.append(("X-Forwarded-For", ", ".join(chain)))
    out.append(("X-Forwarded-Proto", scheme))
    out.append(("X-Forwarded-Host", host))
    return [(n, v) for n, v in out if v]


def response_headers_for_client(headers: Iterable[tuple[str, str]]) -> Headers:
    """What the client sees of the host's response headers (framing is the relay's own)."""
    return strip_hop_by_hop(headers, extra=frozenset({"content-length"}))


def strip_token_param(query: str) -> str:
    """Remove the ``token`` query parameter, keeping every other byte of the query as sent.

    Names are compared decoded: ``%74oken=`` is the same parameter to the relay's own query
    parser (which accepts it as a credential) and to the host's.
    """
    if not query or ("token" not in query and "%" not in query):
        return query
    kept = [part for part in query.split("&")
            if unquote_plus(part.split("=", 1)[0]) != "token"]
    return "&".join(kept)


def redact_query(query: str) -> str:
    """A query string safe to log: credential-like parameters replaced."""
    if not query:
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    safe = [(k, "[redacted]" if k.lower() in {"token", "access_token", "jwt", "auth"} else v)
            for k, v in pairs]
    return urlencode(safe)
