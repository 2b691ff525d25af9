"""The tunnel's JSON messages as typed, frozen values, validated once when they are decoded.

A message that is not a JSON object, or has a field of the wrong type or out of range, is the
peer breaking the protocol (:class:`ProtocolViolation`: the tunnel is closed 1002); nothing
past decode has to doubt a field again. Unknown fields are ignored by design, so a newer peer
can add some without a version. Integers written as ``1.0`` are accepted (JSON has one number
type); ``1.5`` for an integer is not.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from json.encoder import c_make_encoder  # type: ignore[attr-defined]
from json.encoder import encode_basestring_ascii as _esc
from typing import Any

from relay.errors import ProtocolViolation
from relay.protocol import defaults

Headers = tuple[tuple[str, str], ...]

# RFC 9110 token: a header name or method. Always fullmatch: ``$`` matches before a trailing
# newline too, which let "Host\n" through as a name.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FORBIDDEN_IN_VALUE = re.compile(r"[\r\n\x00]")
_FORBIDDEN_IN_PATH = re.compile(r"[\r\n\x00 ]")
_FORBIDDEN_IN_QUERY = re.compile(r"[\r\n\x00 #]")
# One encoder for every frame: json.dumps with separators builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_SCAN = json.decoder.JSONDecoder().scan_once  # type: ignore[attr-defined]  # json.loads runs it
# The C encoder _ENCODER.encode() builds afresh on every call, built once (no circular-reference
# check: every body is a fresh dict of strings, numbers and lists): the same text.
_C_ENCODE = None if c_make_encoder is None else c_make_encoder(
    None, _ENCODER.default, _esc, None, ":", ",", False, False, True)
KINDS = ("http", "ws")
# Header pairs that passed the checks below. Most of a host's response headers (and a client's
# request headers, on the agent) repeat request after request, and validating each pair is two
# regex scans; a lookup is one hash. Bounded in entries and in size per entry (a large cookie
# is checked every time), cleared when full, so a peer churning values only costs itself.
_VALID_PAIRS: dict[tuple[str, str], None] = {}
_VALID_MAX = 2048
_VALID_MAX_CHARS = 512


def _loads(payload: bytes) -> Any:
    """``json.loads(payload)``, without its per-call detours for the frames peers send.

    A payload starting ``{`` and a non-NUL byte is what json.loads' encoding detection reads as
    UTF-8 (no BOM, not UTF-16/32), and with nothing before the object only trailing JSON
    whitespace may follow it: the same text decoded the same way and the same errors, about a
    third less time per HEAD (the detection and decode() wrapper's two regex scans skipped).
    """
    if type(payload) is bytes and payload[:1] == b"{" and payload[1:2] != b"\x00":
        text = payload.decode("utf-8", "surrogatepass")  # as json.loads decodes bytes
        try:
            body, end = _SCAN(text, 0)
        except StopIteration:
            raise ValueError("not JSON") from None
        if end != len(text) and text[end:].strip(" \t\n\r"):
            raise ValueError("extra data after the JSON object")
        return body
    return json.loads(payload)


def _object(payload: bytes, what: str) -> dict[str, Any]:
    try:
        body = _loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolViolation(f"{what} payload is not JSON") from None
    if not isinstance(body, dict):
        raise ProtocolViolation(f"{what} payload is not a JSON object")
    return body


def _int(body: dict[str, Any], key: str, what: str, default: int | None = None) -> int:
    value = body.get(key)
    if value is None:
        if default is None:
            raise ProtocolViolation(f"{what} without {key}")
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolViolation(f"{what} {key} is not a number")
    if isinstance(value, float):
        if not value.is_integer():
            raise ProtocolViolation(f"{what} {key} is not an integer")
        value = int(value)
    return value


def _positive_int(body: dict[str, Any], key: str, what: str, default: int) -> int:
    value = _int(body, key, what, default)
    if value < 1:
        raise ProtocolViolation(f"{what} {key} must be at least 1")
    return value


def _seconds(body: dict[str, Any], key: str, what: str, default: float | None) -> float | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProtocolViolation(f"{what} {key} is not a number")
    if value <= 0:
        raise ProtocolViolation(f"{what} {key} must be positive")
    return float(value)


def _timestamp(body: dict[str, Any], key: str, what: str) -> float:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProtocolViolation(f"{what} {key} is not a number of Unix seconds")
    return float(value)


def _str(body: dict[str, Any], key: str, what: str, default: str | None = None) -> str:
    value = body.get(key)
    if value is None:
        if default is None:
            raise ProtocolViolation(f"{what} without {key}")
        return default
    if not isinstance(value, str):
        raise ProtocolViolation(f"{what} {key} is not a string")
    return value


def _headers(body: dict[str, Any], what: str) -> Headers:
    raw = body.get("headers")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ProtocolViolation(f"{what} headers is not a list")
    pairs = []
    valid = _VALID_PAIRS
    for pair in raw:
        # The common case first: a [name, value] list (json.loads' types exactly) seen before.
        if type(pair) is list and len(pair) == 2:
            name, value = pair
            if type(name) is str and type(value) is str:
                key = (name, value)
                if key in valid:
                    pairs.append(key)
                    continue
        if (not isinstance(pair, list | tuple) or len(pair) != 2
                or not isinstance(pair[0], str) or not isinstance(pair[1], str)):
            raise ProtocolViolation(f"{what} headers must be [name, value] string pairs")
        name, value = pair
        if not _TOKEN.fullmatch(name):
            raise ProtocolViolation(f"{what} header name {name[:40]!r} is not a token")
        if _FORBIDDEN_IN_VALUE.search(value):
            raise ProtocolViolation(f"{what} header {name} has CR, LF or NUL in its value")
        key = (name, value)
        if type(name) is str and type(value) is str and len(name) + len(value) <= _VALID_MAX_CHARS:
            if len(valid) >= _VALID_MAX:
                valid.clear()
            valid[key] = None
        pairs.append(key)
    return tuple(pairs)


def _encode(body: dict[str, Any]) -> bytes:
    if _C_ENCODE is None:
        return _ENCODER.encode(body).encode()
    return "".join(_C_ENCODE(body, 0)).encode()


def _pairs(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join([f"[{_esc(name)},{_esc(value)}]" for name, value in pairs])


@dataclass(frozen=True, slots=True)
class Hello:
    """The relay's first frame: the settings of this tunnel."""

    version: int = defaults.VERSION
    host_id: str = ""
    window: int = defaults.WINDOW
    max_frame: int = defaults.MAX_FRAME
    max_streams: int = defaults.MAX_STREAMS
    ping_interval_s: float = defaults.PING_INTERVAL_S
    keepalive_misses: int = defaults.KEEPALIVE_MISSES
    max_ws_message: int = defaults.MAX_WS_MESSAGE
    open_timeout_s: float | None = None
    request_timeout_s: float | None = None
    renew: bool = False
    expires_at: float | None = None  # Unix seconds

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        body = _object(payload, "HELLO")
        renew = body.get("renew", False)
        if not isinstance(renew, bool):
            raise ProtocolViolation("HELLO renew is not a boolean")
        expires = body.get("expiresAt")
        return cls(
            version=_positive_int(body, "version", "HELLO", defaults.VERSION),
            host_id=_str(body, "hostId", "HELLO", ""),
            window=_positive_int(body, "window", "HELLO", defaults.WINDOW),
            max_frame=_positive_int(body, "maxFrame", "HELLO", defaults.MAX_FRAME),
            max_streams=_positive_int(body, "maxStreams", "HELLO", defaults.MAX_STREAMS),
            ping_interval_s=_seconds(body, "pingIntervalS", "HELLO", defaults.PING_INTERVAL_S)
            or defaults.PING_INTERVAL_S,
            keepalive_misses=_positive_int(body, "keepaliveMisses", "HELLO",
                                           defaults.KEEPALIVE_MISSES),
            max_ws_message=_positive_int(body, "maxWsMessage", "HELLO",
                                         defaults.MAX_WS_MESSAGE),
            open_timeout_s=_seconds(body, "openTimeoutS", "HELLO", None),
            request_timeout_s=_seconds(body, "requestTimeoutS", "HELLO", None),
            renew=renew,
            expires_at=None if expires is None else _timestamp(body, "expiresAt", "HELLO"),
        )

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "version": self.version, "hostId": self.host_id,
            "pingIntervalS": _number(self.ping_interval_s),
            "keepaliveMisses": self.keepalive_misses, "window": self.window,
            "maxFrame": self.max_frame, "maxStreams": self.max_streams,
            "maxWsMessage": self.max_ws_message,
        }
        if self.open_timeout_s is not None:
            body["openTimeoutS"] = _number(self.open_timeout_s)
        if self.request_timeout_s is not None:
            body["requestTimeoutS"] = _number(self.request_timeout_s)
        if self.renew:
            body["renew"] = True
        if self.expires_at is not None:
            body["expiresAt"] = _number(self.expires_at)
        return _encode(body)


def _number(value: float) -> int | float:
    """Integral seconds go out as integers: a peer that reads integers must not see ``10.0``."""
    return int(value) if float(value).is_integer() else value


@dataclass(frozen=True, slots=True)
class Open:
    """A new stream, relay → agent: an HTTP request head or a WebSocket channel."""

    kind: str
    method: str = "GET"
    path: str = "/"
    query: str = ""
    headers: Headers = ()
    protocols: tuple[str, ...] = ()

    @classmethod
    def decode(cls, payload: bytes) -> Open:
        body = _object(payload, "OPEN")
        kind = body.get("kind")
        if kind not in KINDS:
            raise ProtocolViolation("OPEN with an unknown kind")
        method = _str(body, "method", "OPEN", "GET")
        if not _TOKEN.fullmatch(method):
            raise ProtocolViolation("OPEN method is not a token")
        path = _str(body, "path", "OPEN", "/")
        if not path.startswith("/") or _FORBIDDEN_IN_PATH.search(path):
            raise ProtocolViolation("OPEN path must start with / and hold no space, CR, LF, NUL")
        query = _str(body, "query", "OPEN", "")
        if _FORBIDDEN_IN_QUERY.search(query):
            raise ProtocolViolation("OPEN query holds a space, #, CR, LF or NUL")
        raw_protocols = body.get("protocols") or []
        if not isinstance(raw_protocols, list) or not all(
                isinstance(p, str) for p in raw_protocols):
            raise ProtocolViolation("OPEN protocols is not a list of strings")
        return cls(kind=str(kind), method=method, path=path, query=query,
                   headers=_headers(body, "OPEN"), protocols=tuple(raw_protocols))

    def encode(self) -> bytes:
        # Written out by hand (one per proxied request): the text _encode() would give for
        # {"kind", "method", "path", "query", "headers"[, "protocols"]} in half the time.
        text = (f'{{"kind":{_esc(self.kind)},"method":{_esc(self.method)},'
                f'"path":{_esc(self.path)},"query":{_esc(self.query)},'
                f'"headers":[{_pairs(self.headers)}]')
        if self.kind == "ws":
            text += ',"protocols":[' + ",".join([_esc(p) for p in self.protocols]) + "]"
        return (text + "}").encode()


@dataclass(frozen=True, slots=True)
class Head:
    """The host's answer, agent → relay: a response head, or a WebSocket accept/refusal."""

    status: int
    reason: str = ""
    headers: Headers = ()
    protocol: str | None = None

    @classmethod
    def decode(cls, payload: bytes, kind: str = "http") -> Head:
        body = _object(payload, "HEAD")
        status = _int(body, "status", "HEAD")
        if kind == "ws":
            if status != 101 and not 200 <= status <= 599:
                raise ProtocolViolation(f"HEAD status {status} on a WebSocket channel")
        elif not 200 <= status <= 599:
            raise ProtocolViolation(f"HEAD status {status} is not a final HTTP status")
        reason = _str(body, "reason", "HEAD", "")
        if _FORBIDDEN_IN_VALUE.search(reason):
            raise ProtocolViolation("HEAD reason has CR, LF or NUL")
        protocol = body.get("protocol")
        if protocol is not None and not isinstance(protocol, str):
            raise ProtocolViolation("HEAD protocol is not a string")
        return cls(status=status, reason=reason, headers=_headers(body, "HEAD"),
                   protocol=protocol)

    def encode(self) -> bytes:
        body: dict[str, Any] = {"status": self.status}
        if self.reason:
            body["reason"] = self.reason
        if self.headers:
            body["headers"] = list(self.headers)  # tuples encode as arrays
        if self.protocol is not None or self.status == 101:
            body["protocol"] = self.protocol
        return _encode(body)


@dataclass(frozen=True, slots=True)
class Drain:
    reason: str = "relay draining"
    reconnect_after_s: float = 0.0

    @classmethod
    def decode(cls, payload: bytes) -> Drain:
        body = _object(payload, "DRAIN")
        after = body.get("reconnectAfterS", 0)
        if isinstance(after, bool) or not isinstance(after, int | float) or not (
                math.isfinite(after) and after >= 0):
            raise ProtocolViolation("DRAIN reconnectAfterS is not a number of seconds")
        return cls(reason=_str(body, "reason", "DRAIN", ""), reconnect_after_s=float(after))

    def encode(self) -> bytes:
        return _encode({"reason": self.reason,
                        "reconnectAfterS": _number(self.reconnect_after_s)})


@dataclass(frozen=True, slots=True)
class Renew:
    token: str

    @classmethod
    def decode(cls, payload: bytes) -> Renew:
        body = _object(payload, "RENEW")
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolViolation("RENEW without a token")
        return cls(token=token)

    def encode(self) -> bytes:
        return _encode({"token": self.token})


@dataclass(frozen=True, slots=True)
class Renewed:
    """A renewal accepted (``expires_at``) or deferred (``error`` and ``retry_after_s``)."""

    expires_at: float | None = None
    error_code: str = ""
    error_message: str = ""
    retry_after_s: float = 0.0

    @classmethod
    def decode(cls, payload: bytes) -> Renewed:
        body = _object(payload, "RENEWED")
        error = body.get("error")
        if error is not None:
            if not isinstance(error, dict):
                raise ProtocolViolation("RENEWED error is not an object")
            retry = _seconds(body, "retryAfterS", "RENEWED", 1.0) or 1.0
            return cls(error_code=str(error.get("code") or ""),
                       error_message=str(error.get("message") or ""), retry_after_s=retry)
        return cls(expires_at=_timestamp(body, "expiresAt", "RENEWED"))

    def encode(self) -> bytes:
        if self.expires_at is not None:
            return _encode({"expiresAt": _number(self.expires_at)})
        return _encode({"error": {"code": self.error_code, "message": self.error_message},
                        "retryAfterS": _number(self.retry_after_s)})
