"""The forwarding rule, written once: who the client is and which URL it used.

What a reverse proxy in front says (X-Forwarded-For/-Proto/-Host) counts only with
``server.trust_forwarded``; what a peer relay says counts when its signature did
(``client_chain`` is its signed claim). The host (``X-Forwarded-*`` on OPEN), the owner relay
of a forwarded request, cookies' ``Secure`` flag and the admin throttle all read this view.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from relay.protocol.headers import request_headers_for_host
from relay.protocol.hostpaths import host_prefix
from relay.protocol.messages import Open

_WS_SCHEMES = {"http": "ws", "https": "wss"}


@dataclass(frozen=True, slots=True)
class ClientView:
    ip: str  # the client: the socket peer, or the address a peer relay vouched for
    prior: str  # the X-Forwarded-For chain a trusted proxy in front sent, to be extended
    scheme: str
    host: str

    @property
    def chain(self) -> str:
        """X-Forwarded-For for the next hop: the trusted chain, then the client."""
        return ", ".join(p for p in (self.prior, self.ip) if p)

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}"


def socket_peer(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return str(peer[0]) if peer else ""


def client_view(request: web.Request, trust_forwarded: bool, client_chain: str | None = None,
                *, websocket: bool = False) -> ClientView:
    ip, prior = socket_peer(request), ""
    scheme, host = request.scheme, request.host
    headers = request.headers
    if client_chain is not None or trust_forwarded:
        scheme = headers.get("X-Forwarded-Proto", scheme)
        host = headers.get("X-Forwarded-Host", host)
        if client_chain is not None:
            ip = client_chain  # already the whole chain, as the entry relay saw it
        else:
            prior = headers.get("X-Forwarded-For", "")
    if websocket:
        scheme = _WS_SCHEMES.get(scheme, scheme)
    return ClientView(ip, prior, scheme, host)


def is_secure(request: web.Request, trust_forwarded: bool) -> bool:
    """Did the client reach us over TLS (here, or at a trusted reverse proxy in front)?"""
    return request.secure or client_view(request, trust_forwarded).scheme.lower() in {
        "https", "wss"}


def throttle_address(request: web.Request, trust_forwarded: bool) -> str:
    """The address failures are counted against: the socket peer, or behind a trusted proxy
    the address that proxy appended (the last X-Forwarded-For entry, which it wrote itself)."""
    if trust_forwarded:
        last = request.headers.get("X-Forwarded-For", "").rsplit(",", 1)[-1].strip()
        if last:
            return last[:64]
    return socket_peer(request) or "unknown"


def host_request_head(
    request: web.Request, path: str, query: str, trust_forwarded: bool,
    client_chain: str | None = None, *, websocket: bool = False, host_id: str = "",
    protocols: tuple[str, ...] = (), claims: tuple[tuple[str, str], ...] = (),
    view: ClientView | None = None,
) -> Open:
    """What the host sees of the request, for HTTP exchanges and WebSocket channels alike.

    ``claims``: a peer link's per-stream claims, for the owner relay (it takes them out).
    ``view``: the request's :func:`client_view` when the caller has it already.
    """
    if view is None:
        view = client_view(request, trust_forwarded, client_chain, websocket=websocket)
    headers = request_headers_for_host(
        list(request.headers.items()), client_ip=view.ip, scheme=view.scheme, host=view.host,
        prior_forwarded_for=view.prior, websocket=websocket,
        prefix=host_prefix(host_id) if host_id else "",
        keep_client_identity=trust_forwarded,
    )
    return Open(kind="ws" if websocket else "http", method=request.method, path=path,
                query=query, headers=tuple(headers) + claims, protocols=protocols)
