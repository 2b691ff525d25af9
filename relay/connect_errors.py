"""Say why a connection attempt failed in words an operator can act on.

``ClientConnectorError`` alone tells nobody anything; "connection refused", "name or service
not known" or "HTTP 404 on the upgrade" do.

The agent dials its tunnel itself (relay.tunnel.dial) but its log keeps the words and names it
had when aiohttp dialled it (alerts and searches are written against them):
:func:`connect_error_name` gives the aiohttp exception a failure used to be, and a refused
upgrade reads as aiohttp's did.
"""

from __future__ import annotations

import os
import socket
import ssl

import aiohttp

from relay.tunnel.dial import HandshakeRefused

# What relay.tunnel.dial says of a 101 that fails a check, in aiohttp's words.
_AIOHTTP_WORDS = {
    "no 'Upgrade: websocket'": "Invalid upgrade header",
    "no 'Connection: upgrade'": "Invalid connection header",
    "wrong Sec-WebSocket-Accept": "Invalid challenge response",
}


def connect_error_cause(exc: BaseException) -> str:
    """The cause of a failed connect: errno text, TLS problem, HTTP status, or timeout."""
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"the server answered HTTP {exc.status} to the WebSocket upgrade ({exc.message})"
    if isinstance(exc, HandshakeRefused):
        if exc.status == 0:
            return f"the server's answer to the WebSocket upgrade is not HTTP ({exc.message})"
        message = (_AIOHTTP_WORDS.get(exc.message, exc.message) if exc.status == 101
                   else "Invalid response status")
        return f"the server answered HTTP {exc.status} to the WebSocket upgrade ({message})"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate rejected: {exc.certificate_error}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate rejected: {exc}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _os_error_text(exc.os_error)
    if _upgrade_lost(exc):
        return "Server disconnected"  # aiohttp's ServerDisconnectedError
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError):
        return _os_error_text(exc)
    return str(exc) or type(exc).__name__


def connect_error_name(exc: BaseException) -> str:
    """The failure's name as the agent's log has always given it: the aiohttp exception its
    dial raised for it."""
    if isinstance(exc, HandshakeRefused):
        # aiohttp's parser refused what is not an HTTP response.
        return "ClientResponseError" if exc.status == 0 else "WSServerHandshakeError"
    if _upgrade_lost(exc):
        return "ServerDisconnectedError"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "ClientConnectorCertificateError"
    if isinstance(exc, ssl.SSLError):
        return "ClientConnectorSSLError"
    if isinstance(exc, socket.gaierror):
        return "ClientConnectorDNSError"
    if isinstance(exc, TimeoutError):
        return "TimeoutError"
    if isinstance(exc, OSError):
        return "ClientConnectorError"
    return type(exc).__name__


def _upgrade_lost(exc: BaseException) -> bool:
    """The dial's own error for a connection that ended before the upgrade was answered: a
    reset the OS did not report, so without an errno (a reset while connecting has one)."""
    return type(exc) is ConnectionResetError and exc.errno is None


def _os_error_text(exc: OSError) -> str:
    errno = exc.errno
    if isinstance(errno, int) and errno > 0:
        return os.strerror(errno).lower()
    # getaddrinfo errors carry negative codes and their own text ("Name or service not known").
    return (exc.strerror or str(exc) or type(exc).__name__).lower()
