"""Dial a tunnel WebSocket: the upgrade made by hand, then the connection served by a client
:class:`relay.tunnel.tunnel_socket.TunnelSocket`. The entry relay dials its peer links with it
and the agent its tunnel (it lives in relay.tunnel so that both sides may).

aiohttp's client WebSocket parsed each frame into a queue that a reader task drained, one
wake-up and several coroutine steps per batch of frames (bench W5 on a peer link, W0-W3 on the
agent's tunnel). Here the upgrade is one request written and one response head read; from the
``101`` on, frames are parsed as they arrive and fed to the session synchronously, as on the
relay's end.

The connection is made as aiohttp's connector made it: the name resolved (``AI_ADDRCONFIG``;
an IP literal is not looked up), its addresses tried with Happy Eyeballs (RFC 8305, 250 ms
apart) through aiohappyeyeballs, whose error keeps the errno when every address failed alike
("connection refused" rather than "multiple exceptions"), and TLS started on that socket with
the host as the server name.

What is checked of the answer (RFC 6455 4.1): the status (anything but ``101`` is a refusal with
that status, as aiohttp's ``WSServerHandshakeError``), ``Upgrade: websocket``, ``Connection:
upgrade`` and ``Sec-WebSocket-Accept`` for our key; no extension may be accepted, since none is
offered, and a subprotocol only if it is one of those offered (none on a peer link). The
response head is bounded; the whole dial is bounded by the caller.

:func:`upgrade` is the same handshake for any socket: the agent dials its host service's
WebSocket channels with it (relay.agent.upstream), offering the client's subprotocols and
forwarding the client's headers, and serves them on a client-mode
:class:`relay.tunnel.channel_socket.ChannelSocket`.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Generic, TypeAlias, TypeVar, cast

import aiohappyeyeballs
from yarl import URL

from relay.tunnel.tunnel_socket import SocketOwner, TunnelSocket, accept_key

# A 101 is a few hundred bytes; a head larger than this is no answer of a relay.
MAX_RESPONSE_HEAD = 16 * 1024
# RFC 8305's "Connection Attempt Delay", aiohttp's default.
HAPPY_EYEBALLS_DELAY_S = 0.25
_AI_ADDRCONFIG = socket.AI_ADDRCONFIG & getattr(socket, "AI_MASK", socket.AI_ADDRCONFIG)

S = TypeVar("S")
# The connection after a valid 101: (transport, bytes read past the head, chosen subprotocol).
TakeOver: TypeAlias = Callable[[asyncio.Transport, bytes, str | None], S]


class HandshakeRefused(Exception):
    """The peer answered the upgrade with something other than a valid ``101``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


def upgrade_request(url: URL, key: str,
                    headers: Mapping[str, str] | Iterable[tuple[str, str]],
                    protocols: Sequence[str] = ()) -> bytes:
    """The ``GET`` that asks for the upgrade: no extension, the ``protocols`` offered (if any).
    ``headers`` may repeat a name (as a list of pairs); each is sent as given."""
    default_port = 443 if url.scheme == "wss" else 80
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal
    authority = host if url.port in (None, default_port) else f"{host}:{url.port}"
    lines = [f"GET {url.raw_path_qs} HTTP/1.1", f"Host: {authority}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if protocols:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(protocols)}")
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in pairs:
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            raise ValueError(f"header {name!r} holds a line break")
        lines.append(f"{name}: {value}")
    # UTF-8 as aiohttp's client wrote header values (the same bytes for ASCII); a value the
    # relay's edge decoded with surrogateescape goes back out as the bytes it came in as.
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


def check_response(head: bytes, key: str, protocols: Sequence[str] = ()) -> str | None:
    """Raise HandshakeRefused unless ``head`` (up to its blank line) accepts our upgrade; the
    subprotocol it chose, one of ``protocols`` (None: it chose none)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HandshakeRefused(0, f"not an HTTP response: {lines[0][:80]!r}")
    status = int(parts[1])
    if status != 101:
        raise HandshakeRefused(status, parts[2] if len(parts) > 2 else "")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise HandshakeRefused(status, "malformed header line")
        name = name.strip().lower()
        # Repeated fields fold into one list (RFC 9110 5.3).
        fields[name] = f"{fields[name]}, {value.strip()}" if name in fields else value.strip()
    if fields.get("upgrade", "").lower() != "websocket":
        raise HandshakeRefused(status, "no 'Upgrade: websocket'")
    if "upgrade" not in (t.strip().lower() for t in fields.get("connection", "").split(",")):
        raise HandshakeRefused(status, "no 'Connection: upgrade'")
    if fields.get("sec-websocket-accept") != accept_key(key):
        raise HandshakeRefused(status, "wrong Sec-WebSocket-Accept")
    if fields.get("sec-websocket-extensions"):
        raise HandshakeRefused(status, "an extension nobody asked for")
    chosen = fields.get("sec-websocket-protocol")
    if not chosen:
        return None
    # RFC 6455 4.1: one of the offered values, exactly; anything else fails the connection.
    if chosen not in protocols:
        raise HandshakeRefused(status, f"a subprotocol nobody asked for: {chosen[:80]!r}")
    return chosen


class _Upgrading(asyncio.Protocol, Generic[S]):
    """The connection until the answer's head is in: then the socket takes over, in the same
    callback, so no frame that came with the head (or right after it) is missed."""

    def __init__(self, request: bytes, key: str, protocols: Sequence[str],
                 take_over: TakeOver[S]) -> None:
        self._request = request
        self._key = key
        self._protocols = protocols
        self._take_over = take_over
        self._buffer = bytearray()
        self.done: asyncio.Future[S] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they are one.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_RESPONSE_HEAD:
                self._fail(HandshakeRefused(0, "response head too large"))
            return
        head, tail = bytes(self._buffer[:end]), bytes(self._buffer[end + 4:])
        self._buffer = bytearray()
        try:
            protocol = check_response(head, self._key, self._protocols)
        except HandshakeRefused as refused:
            self._fail(refused)
            return
        assert self.transport is not None
        self.done.set_result(self._take_over(self.transport, tail, protocol))

    def _fail(self, error: Exception) -> None:
        self.done.set_exception(error)
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionResetError(
                "the peer closed the connection during the upgrade"))


async def upgrade(url: str, headers: Mapping[str, str] | Iterable[tuple[str, str]],
                  take_over: TakeOver[S], *, protocols: Sequence[str] = (),
                  ssl_context: ssl.SSLContext | None = None) -> S:
    """Open ``url`` (``ws://`` or ``wss://``), ask for a WebSocket offering ``protocols``, and
    once a valid ``101`` is in hand the connection to ``take_over`` (it sets the transport's
    protocol and feeds it what came after the head): what it returns. Unbounded: the caller
    bounds it (a cancelled upgrade hangs up what it opened).

    Raises HandshakeRefused (any answer but a valid 101), OSError (unreachable, reset, TLS),
    ValueError (not a WebSocket URL, a header with a line break).
    """
    target = URL(url, encoded=True)
    if target.scheme not in ("ws", "wss") or not target.raw_host:
        raise ValueError(f"not a WebSocket URL: {url}")
    secure = target.scheme == "wss"
    key = base64.b64encode(os.urandom(16)).decode()
    upgrading = _Upgrading(upgrade_request(target, key, headers, protocols), key, protocols,
                           take_over)
    context = (ssl_context or ssl.create_default_context()) if secure else None
    transport = await _connect(lambda: upgrading, target.raw_host,
                               target.port or (443 if secure else 80), context)
    try:
        return await upgrading.done
    except BaseException:
        transport.abort()  # refused, reset, or the caller gave up: nothing is left open
        raise


async def dial(url: str, headers: Mapping[str, str], owner: SocketOwner, *, max_message: int,
               start: Callable[[TunnelSocket], None],
               ssl_context: ssl.SSLContext | None = None) -> TunnelSocket:
    """Open ``url`` (``ws://`` or ``wss://``) as a WebSocket served by a client TunnelSocket
    reporting to ``owner``; ``start`` sets the owner up on the socket before its first frame is
    read. Unbounded: the caller bounds it (a cancelled dial hangs up what it opened).

    Raises HandshakeRefused (any answer but a valid 101), OSError (unreachable, reset).
    """

    def take_over(transport: asyncio.Transport, tail: bytes, _: str | None) -> TunnelSocket:
        ws = TunnelSocket(transport, owner, max_message=max_message, client=True)
        transport.set_protocol(ws)
        start(ws)
        if tail:
            ws.data_received(tail)
        return ws

    return await upgrade(url, headers, take_over, ssl_context=ssl_context)


async def _connect(factory: Callable[[], asyncio.Protocol], host: str, port: int,
                   context: ssl.SSLContext | None) -> asyncio.Transport:
    """The TCP connection (and TLS on it) as aiohttp's connector makes it (module docstring)."""
    loop = asyncio.get_running_loop()
    version = _ip_version(host)
    if version is None:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=_AI_ADDRCONFIG)
        if not infos:
            raise OSError(f"no address for {host}")
    elif version == 6:
        infos = [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port, 0, 0))]
    else:
        infos = [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    sock = await aiohappyeyeballs.start_connection(
        infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY_S)
    try:
        transport, _ = await loop.create_connection(
            factory, sock=sock, ssl=context,
            server_hostname=host.rstrip(".") if context is not None else None)
    except BaseException:
        sock.close()  # a no-op when the transport took it and closed it already
        raise
    return transport


def _ip_version(host: str) -> int | None:
    """4 or 6 for an IP literal (no lookup needed), None for a name."""
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None
