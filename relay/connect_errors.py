"""Say why a connection attempt failed in words an operator can act on.

``ClientConnectorError`` alone tells nobody anything; "connection refused", "name or service
not known" or "HTTP 404 on the upgrade" do.
"""

from __future__ import annotations

import os

import aiohttp


def connect_error_cause(exc: BaseException) -> str:
    """The cause of a failed connect: errno text, TLS problem, HTTP status, or timeout."""
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"the server answered HTTP {exc.status} to the WebSocket upgrade ({exc.message})"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate rejected: {exc.certificate_error}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _os_error_text(exc.os_error)
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError):
        return _os_error_text(exc)
    return str(exc) or type(exc).__name__


def _os_error_text(exc: OSError) -> str:
    errno = exc.errno
    if isinstance(errno, int) and errno > 0:
        return os.strerror(errno).lower()
    # getaddrinfo errors carry negative codes and their own text ("Name or service not known").
    return (exc.strerror or str(exc) or type(exc).__name__).lower()
