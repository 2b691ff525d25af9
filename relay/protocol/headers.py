"""Header rules shared by the relay and the agent: hop-by-hop stripping and credential hygiene.

Pure functions over ``(name, value)`` lists so they are testable without a server.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote_plus, urlencode

from relay.protocol.hostpaths import SESSION_COOKIE, rewrite_for_client

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
# Handled at the relay's edge: it answers a client's 100-continue itself once the request is
# admitted, so the host never sees an Expect it would answer a second time.
EDGE_HANDLED = frozenset({"expect"})
# Set by the WebSocket handshake on each hop; forwarding them would corrupt the next handshake.
WS_HANDSHAKE = frozenset({
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-accept", "sec-websocket-protocol",
})
# Relay-to-relay forwarding headers: a client must never be able to inject them.
RELAY_INTERNAL_PREFIX = "x-relay-"
# Who the client is and what URL it asked for, as proxies in front report it. A host that
# trusts them (for logs, rate limits, redirects, access rules) could be lied to by any client,
# so they reach the host only from a trusted reverse proxy (server.trust_forwarded); the relay
# then sets its own X-Forwarded-For/-Proto/-Host after dropping the client's.
CLIENT_IDENTITY = frozenset({
    "forwarded", "x-real-ip", "true-client-ip", "x-client-ip", "cf-connecting-ip",
    "x-cluster-client-ip", "fastly-client-ip", "x-original-url", "x-rewrite-url",
    "x-original-host", "x-host", "x-original-forwarded-for",
})
CLIENT_IDENTITY_PREFIX = "x-forwarded-"
# Always replaced by the relay's own values, trusted proxy or not. Forwarded is dropped rather
# than left disagreeing with the X-Forwarded-For chain the relay extends.
RELAY_SET = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                       "x-forwarded-prefix", "forwarded"})

Headers = list[tuple[str, str]]


def _connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    tokens: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


# HOP_BY_HOP plus each ``extra`` set callers pass (a handful of constants): every proxied
# request strips headers, and building the union each time cost more than the stripping.
_DROP: dict[frozenset[str], frozenset[str]] = {}


def strip_hop_by_hop(
    headers: Iterable[tuple[str, str]], *, extra: frozenset[str] = frozenset()
) -> Headers:
    """Drop hop-by-hop fields (and Proxy-*), anything listed in Connection, and ``extra`` names."""
    items = list(headers)
    drop = _DROP.get(extra)
    if drop is None:
        drop = _DROP[extra] = HOP_BY_HOP | extra
    lowered = [n.lower() for n, _ in items]
    if "connection" in lowered:
        drop = drop | _connection_tokens(items)
    return [item for item, lower in zip(items, lowered, strict=True)
            if lower not in drop and not lower.startswith(HOP_BY_HOP_PREFIX)]


def is_client_identity(name: str) -> bool:
    """A client-supplied identity or original-URL header (see :data:`CLIENT_IDENTITY`)."""
    return _is_identity(name.lower())


def _is_identity(lower: str) -> bool:
    return lower in CLIENT_IDENTITY or lower.startswith(CLIENT_IDENTITY_PREFIX)


_TO_CLIENT = frozenset({"content-length"})
_TO_HOST_HTTP = CLIENT_CREDENTIALS | EDGE_HANDLED | {"host"}
_TO_HOST_WS = _TO_HOST_HTTP | WS_HANDSHAKE


def request_headers_for_host(
    headers: list[tuple[str, str]],
    *,
    client_ip: str,
    scheme: str,
    host: str,
    websocket: bool = False,
    prior_forwarded_for: str = "",
    prefix: str = "",
    keep_client_identity: bool = False,
) -> Headers:
    """What the host service sees of a client's request headers.

    ``prefix`` (``/hosts/<id>``) goes to the host as ``X-Forwarded-Prefix``, so a host that
    builds absolute links can put them under its path on the relay.
    ``keep_client_identity`` (a trusted reverse proxy in front) lets the proxy's
    ``X-Real-IP``, ``X-Forwarded-Port`` etc. through; the relay's own forwarding headers are
    set last either way.

    The same as :func:`strip_hop_by_hop` (with the host's ``extra`` names), then
    :func:`strip_session_cookie`, then the identity rules, in one pass: this runs for every
    proxied request, and a header name's fate is looked up rather than worked out each time.
    """
    dropped = _HOST_DROPS[(websocket, keep_client_identity)]
    out: Headers = []
    connection = False
    for name, value in headers:
        fate = dropped.get(name)
        if fate is None:
            fate = _host_fate(name, websocket, keep_client_identity, dropped)
        lower, drop = fate
        if drop:
            connection = connection or lower == "connection"
            continue
        if lower == "cookie" and SESSION_COOKIE in value:
            value = _without_session(value)
        if value:
            out.append((name, value))
    if connection:  # what Connection lists is hop-by-hop too (its values are dropped above)
        tokens = _connection_tokens(headers)
        out = [(n, v) for n, v in out if n.lower() not in tokens]
    # A chain from a trusted reverse proxy is extended; otherwise the client cannot forge one.
    chain = ", ".join([p for p in (prior_forwarded_for, client_ip) if p])
    for name, value in (("X-Forwarded-For", chain), ("X-Forwarded-Proto", scheme),
                        ("X-Forwarded-Host", host), ("X-Forwarded-Prefix", prefix)):
        if value:
            out.append((name, value))
    return out


# (websocket, keep_client_identity) -> header name as sent -> (its lower case, dropped?).
# Bounded: names are the client's choice, and each table is cleared when full.
_HOST_DROPS: dict[tuple[bool, bool], dict[str, tuple[str, bool]]] = {
    (ws, keep): {} for ws in (False, True) for keep in (False, True)}
_HOST_DROPS_MAX = 1024


def _host_fate(name: str, websocket: bool, keep_client_identity: bool,
               table: dict[str, tuple[str, bool]]) -> tuple[str, bool]:
    lower = name.lower()
    extra = _TO_HOST_WS if websocket else _TO_HOST_HTTP
    drop = (lower in HOP_BY_HOP or lower in extra or lower.startswith(HOP_BY_HOP_PREFIX)
            or lower.startswith(RELAY_INTERNAL_PREFIX) or lower in RELAY_SET
            or (not keep_client_identity and _is_identity(lower)))
    fate = (lower, drop)
    if type(name) is str:
        if len(table) >= _HOST_DROPS_MAX:
            table.clear()
        table[name] = fate
    return fate


def _without_session(value: str) -> str:
    return "; ".join(pair.strip() for pair in value.split(";")
                     if pair.strip() and pair.partition("=")[0].strip() != SESSION_COOKIE)


def strip_session_cookie(headers: Iterable[tuple[str, str]]) -> Headers:
    """The relay's session cookie taken out of ``Cookie`` headers (it carries the user's token
    and is the relay's, never the host's); a header left empty is dropped."""
    out: Headers = []
    for name, value in headers:
        if SESSION_COOKIE in value and name.lower() == "cookie":
            kept = _without_session(value)
            if not kept:
                continue
            value = kept
        out.append((name, value))
    return out


def response_headers_for_client(
    headers: Iterable[tuple[str, str]], prefix: str = "", public_origin: str = ""
) -> Headers:
    """What the client sees of the host's response headers (framing is the relay's own).

    With ``prefix``, the host's cookies and redirects are kept under it (relay.protocol.hostpaths).
    """
    out = strip_hop_by_hop(headers, extra=_TO_CLIENT)
    return rewrite_for_client(out, prefix, public_origin) if prefix else out


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
