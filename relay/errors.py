"""The relay's exception tree, error codes and WebSocket close codes, defined once.

Every refusal a user can meet is a :class:`RelayError` that knows its HTTP status, its stable
error code, and the WebSocket close code to use when the refusal happens on a socket. Faults
are told apart by side, as h11 does: :class:`ProtocolViolation` is the peer's, and
:class:`LocalProtocolError` is ours (a bug)::

    RelayError
    ├── ConfigError                     bad configuration; stops start-up (no HTTP status)
    ├── BadRequest            400 4400  bad_request
    │   └── InvalidHost       400 4400  invalid_host
    ├── Unauthorized          401 4401  unauthorized
    │   └── SessionRejected   401 4401  unauthorized       (and the session cookie cleared)
    ├── PeerRejected          401 4401  unauthorized       (a relay-to-relay signature refused)
    ├── Forbidden             403 4403  not_in_org / not_registered
    ├── NotFound              404       not_found          (admin API)
    ├── RequestTimeout        408       request_timeout    (the request head came too slowly)
    ├── PayloadTooLarge       413 1009  payload_too_large
    ├── UriTooLong            414       uri_too_long
    ├── TooManyRequests       429 1013  rate_limited       (admin failures from one peer)
    ├── HeadersTooLarge       431 4400  headers_too_large
    ├── TunnelClosed          502 4410  tunnel_closed
    ├── HostOffline           503 4404  host_offline
    ├── AccessUnavailable     503 1013  access_unavailable
    ├── Draining              503 4503  draining
    ├── Overloaded            503 1013  overloaded
    ├── HostTimeout           504 4410  host_timeout
    ├── DirectoryUnavailable  503 1013  directory_unavailable
    ├── ProtocolViolation     502 1002  tunnel_closed      the PEER broke the tunnel protocol
    └── LocalProtocolError    500 1011  internal           OUR code misused the protocol (a bug)

Anything else that escapes a handler is a bug too: ``error_middleware`` answers it as a JSON
500 ``internal`` (close 1011 on a socket) and logs ``http.unhandled`` with the traceback.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class CloseCode(IntEnum):
    """WebSocket close codes the relay sends (docs/reference.md: what each asks of the peer)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    POLICY_VIOLATION = 1008  # a tunnel peer that stops reading is cut off with this
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    BAD_REQUEST = 4400
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403
    HOST_NOT_CONNECTED = 4404
    KEEPALIVE_MISSED = 4408
    TIMED_OUT = 4408  # the same code on a stream: no response HEAD within requestTimeoutS
    REPLACED = 4409
    TUNNEL_GONE = 4410
    DRAINING = 4503


# Close codes RFC 6455 forbids putting on the wire; they only describe what happened locally.
UNSENDABLE_CLOSE_CODES = frozenset({1004, 1005, 1006, 1015})


def sendable_close_code(code: int | None) -> int:
    """Map a close code we observed to one we may send.

    1005/1006/1015 mean "no code" or "abnormal"; forwarding them as 1000 would tell the client the
    exit was clean and stop it reconnecting, so they become 1011.
    """
    if code is None or code in UNSENDABLE_CLOSE_CODES:
        return int(CloseCode.INTERNAL_ERROR)
    if code < 1000 or code >= 5000 or (1016 <= code < 3000):
        return int(CloseCode.INTERNAL_ERROR)
    return code


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    INVALID_HOST = "invalid_host"
    UNAUTHORIZED = "unauthorized"
    NOT_IN_ORG = "not_in_org"
    NOT_REGISTERED = "not_registered"
    REQUEST_TIMEOUT = "request_timeout"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    URI_TOO_LONG = "uri_too_long"
    RATE_LIMITED = "rate_limited"
    HEADERS_TOO_LARGE = "headers_too_large"
    TUNNEL_CLOSED = "tunnel_closed"
    HOST_OFFLINE = "host_offline"
    ACCESS_UNAVAILABLE = "access_unavailable"
    DRAINING = "draining"
    OVERLOADED = "overloaded"
    HOST_TIMEOUT = "host_timeout"
    DIRECTORY_UNAVAILABLE = "directory_unavailable"
    NOT_FOUND = "not_found"
    HOST_UNAVAILABLE = "host_unavailable"  # sent by the agent: its host service did not answer
    INTERNAL = "internal"


class RelayError(Exception):
    """Root of every error the relay raises on purpose."""

    status: int = 500
    code: ErrorCode = ErrorCode.INTERNAL
    close_code: int = CloseCode.INTERNAL_ERROR
    default_message = "internal error"
    retry_after_s: int | None = None

    def __init__(self, message: str | None = None, *, code: ErrorCode | None = None) -> None:
        self.message = message or self.default_message
        if code is not None:
            self.code = code
        super().__init__(self.message)

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": str(self.code), "message": self.message}}


class ConfigError(RelayError):
    """Configuration that cannot run. Rendered as one line: file, key, problem."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file, self.key, self.problem = file, key, problem
        super().__init__(f"{file}: {key}: {problem}")


class BadRequest(RelayError):
    status, code, close_code = 400, ErrorCode.BAD_REQUEST, CloseCode.BAD_REQUEST
    default_message = "malformed request"


class InvalidHost(BadRequest):
    code = ErrorCode.INVALID_HOST
    default_message = "host id must be <organizationId>:<machineId>"


class Unauthorized(RelayError):
    status, code, close_code = 401, ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED
    default_message = "missing or invalid bearer token; get a fresh token and retry"


class SessionRejected(Unauthorized):
    """A ``relay_session`` cookie that no longer opens its host: 401, and the cookie cleared."""

    default_message = "your session for this host has ended; open it again with a fresh token"

    def __init__(self, clear_cookie: str) -> None:
        super().__init__()
        self.clear_cookie = clear_cookie


class PeerRejected(RelayError):
    """A relay-to-relay request whose signature, clock or nonce does not hold. On a forwarded
    WebSocket the client is closed 4401, like any other refused credential."""

    status, code, close_code = 401, ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED
    default_message = "invalid relay-to-relay signature"


class Forbidden(RelayError):
    status, code, close_code = 403, ErrorCode.NOT_REGISTERED, CloseCode.FORBIDDEN
    default_message = "access to this host is denied"


class NotFound(RelayError):
    status, code = 404, ErrorCode.NOT_FOUND
    default_message = "not found"


class PayloadTooLarge(RelayError):
    status, code, close_code = 413, ErrorCode.PAYLOAD_TOO_LARGE, CloseCode.MESSAGE_TOO_BIG
    default_message = "request body exceeds the configured limit"


class RequestTimeout(RelayError):
    status, code, close_code = 408, ErrorCode.REQUEST_TIMEOUT, CloseCode.BAD_REQUEST
    default_message = "the request head was not received in time"


class UriTooLong(RelayError):
    status, code, close_code = 414, ErrorCode.URI_TOO_LONG, CloseCode.BAD_REQUEST
    default_message = "request line exceeds the limit"


class TooManyRequests(RelayError):
    status, code, close_code = 429, ErrorCode.RATE_LIMITED, CloseCode.TRY_AGAIN_LATER
    default_message = "too many failed attempts; retry later"

    def __init__(self, message: str | None = None, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class HeadersTooLarge(RelayError):
    status, code, close_code = 431, ErrorCode.HEADERS_TOO_LARGE, CloseCode.BAD_REQUEST
    default_message = "request headers exceed the configured limit"


class TunnelClosed(RelayError):
    status, code, close_code = 502, ErrorCode.TUNNEL_CLOSED, CloseCode.TUNNEL_GONE
    default_message = "the host's tunnel closed during the exchange; retry"


class HostOffline(RelayError):
    status, code, close_code = 503, ErrorCode.HOST_OFFLINE, CloseCode.HOST_NOT_CONNECTED
    default_message = "the host is not connected; retry with backoff"
    retry_after_s = 5


class AccessUnavailable(RelayError):
    status, code, close_code = 503, ErrorCode.ACCESS_UNAVAILABLE, CloseCode.TRY_AGAIN_LATER
    default_message = "the access check is unavailable; retry shortly"
    retry_after_s = 2


class Draining(RelayError):
    status, code, close_code = 503, ErrorCode.DRAINING, CloseCode.DRAINING
    default_message = "relay is draining; reconnect at once"
    retry_after_s = 0


class Overloaded(RelayError):
    status, code, close_code = 503, ErrorCode.OVERLOADED, CloseCode.TRY_AGAIN_LATER
    default_message = "too many concurrent streams to this host; retry shortly"
    retry_after_s = 1


class HostTimeout(RelayError):
    status, code, close_code = 504, ErrorCode.HOST_TIMEOUT, CloseCode.TUNNEL_GONE
    default_message = "the host sent no response in time"


class DirectoryUnavailable(RelayError):
    """The directory backend cannot be read or written right now.

    On an agent's ``/tunnel`` this closes the socket with 1013 (try again later): the agent keeps
    its normal reconnect backoff and gets in once the directory is back. Clients whose request
    needs a directory lookup get 503 ``directory_unavailable`` rather than ``host_offline``,
    which would tell them the host is gone.
    """

    status, code, close_code = 503, ErrorCode.DIRECTORY_UNAVAILABLE, CloseCode.TRY_AGAIN_LATER
    default_message = "relay directory unavailable; retry shortly"
    retry_after_s = 2


class ProtocolViolation(RelayError):
    """The tunnel PEER sent something the protocol does not allow: the tunnel ends with 1002."""

    status, close_code = 502, CloseCode.PROTOCOL_ERROR
    code = ErrorCode.TUNNEL_CLOSED
    default_message = "tunnel protocol violation"


class LocalProtocolError(RelayError):
    """OUR code tried to break the tunnel protocol (a bug, never the peer's fault): the stream or
    tunnel ends with 1011 and an HTTP exchange with 500 ``internal``."""

    status, code, close_code = 500, ErrorCode.INTERNAL, CloseCode.INTERNAL_ERROR
    default_message = "internal protocol error"
