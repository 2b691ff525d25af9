"""Browser navigation sessions: a relay-signed cookie that carries the user's token for one host.

A person opening ``/hosts/<id>/page?token=...`` gets a 303 to the same URL without ``token`` and
a ``relay_session`` cookie scoped to ``Path=/hosts/<id>/``, so links, forms and the page's own
requests under that host authenticate without the token in any URL. The cookie value is::

    <exp>.<base64url HMAC-SHA256(key, hostId "\\n" exp "\\n" token)>.<token>

* bound to the host: the MAC covers the host id, so host A's cookie opens nothing on host B
  even if a browser were made to send it there;
* bound to the subject and never longer-lived than the token: it *is* the token, which is
  verified again on every request (cheaply: the verified-token cache) and whose ``exp`` is the
  cookie's; access is checked again too (the access cache);
* signed by the relay, so a host (or a script that cannot read it: ``HttpOnly``) cannot mint
  one; the relay still has a bearer token to hand the ``upstream`` access backend.

Pure apart from :func:`load_session_key`, which may create a key file at start-up.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import structlog

from relay.config import Config
from relay.errors import ConfigError
from relay.protocol.hostpaths import SESSION_COOKIE, host_prefix

log = structlog.get_logger("relay.auth")

COOKIE_NAME = SESSION_COOKIE
SESSION_KEY_FILENAME = "session-secret"
# Browsers drop cookies above ~4096 bytes (name, value and attributes together); past this the
# relay proxies the navigation with its token instead of redirecting into a lost cookie.
MAX_COOKIE_VALUE = 3800
_LABEL_SECRET = b"relay session cookie key v1 (auth.session_secret)"
_LABEL_PEER = b"relay session cookie key v1 (directory.peer_secret)"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class SessionCookies:
    """Seal and open ``relay_session`` values; the clock is injected (tests move it)."""

    def __init__(self, key: bytes, clock: Callable[[], float] = time.time) -> None:
        if len(key) < 16:
            raise ValueError("session key too short")
        self._key = key
        self._clock = clock

    def _mac(self, host_id: str, exp: int, token: str) -> str:
        message = f"{host_id}\n{exp}\n{token}".encode("utf-8", "surrogatepass")
        return _b64url(hmac.new(self._key, message, hashlib.sha256).digest())

    def max_age(self, expires_at: float) -> int:
        """Whole seconds a cookie for a token expiring at ``expires_at`` may live (≥ 0)."""
        return max(0, int(expires_at - self._clock()))

    def seal(self, host_id: str, token: str, expires_at: float) -> str | None:
        """The cookie value for ``token`` on ``host_id``, or None when it cannot be a cookie
        (expired already, too large for a browser, or not cookie-safe)."""
        exp = int(expires_at)
        if exp <= self._clock() or not _cookie_safe(token):
            return None
        value = f"{exp}.{self._mac(host_id, exp, token)}.{token}"
        return value if len(value) <= MAX_COOKIE_VALUE else None

    def open(self, host_id: str, value: str) -> str | None:
        """The token in a cookie value for ``host_id``, or None (forged, other host, expired)."""
        exp_text, _, rest = value.partition(".")
        mac, _, token = rest.partition(".")
        if not (exp_text.isascii() and exp_text.isdigit()) or len(exp_text) > 12 or not token:
            return None
        exp = int(exp_text)
        if not hmac.compare_digest(mac.encode("ascii", "replace"),
                                   self._mac(host_id, exp, token).encode("ascii")):
            return None
        if self._clock() >= exp:
            return None  # the cookie never outlives the token, even if a browser keeps it
        return token


def _cookie_safe(value: str) -> bool:
    # RFC 6265 cookie-octets; a JWT (base64url and dots) always is.
    return all(0x21 <= ord(ch) <= 0x7E and ch not in '",;\\' for ch in value)


def set_cookie_header(host_id: str, value: str, max_age: int, *, secure: bool) -> str:
    attributes = [f"{COOKIE_NAME}={value}", f"Path={host_prefix(host_id)}/",
                  f"Max-Age={max_age}", "HttpOnly", "SameSite=Lax"]
    if secure:
        attributes.append("Secure")
    return "; ".join(attributes)


def clear_cookie_header(host_id: str, *, secure: bool) -> str:
    return set_cookie_header(host_id, "", 0, secure=secure)


def session_values(cookie_headers: Iterable[str]) -> list[str]:
    """Every ``relay_session`` value in the request's ``Cookie`` header(s), in order."""
    values = []
    for header in cookie_headers:
        if COOKIE_NAME not in header:
            continue
        for pair in header.split(";"):
            name, sep, value = pair.partition("=")
            if sep and name.strip() == COOKIE_NAME and value.strip():
                values.append(value.strip())
    return values


def is_navigation(method: str, headers: Mapping[str, str]) -> bool:
    """A top-level page load: ``Sec-Fetch-Mode: navigate``, or (older clients) ``Accept``
    led by ``text/html``."""
    if method != "GET":
        return False
    mode = headers.get("Sec-Fetch-Mode")
    if mode is not None:
        return mode.strip().lower() == "navigate"
    first = headers.get("Accept", "").split(",", 1)[0]
    return first.split(";", 1)[0].strip().lower() == "text/html"


def cookie_usable(method: str, headers: Mapping[str, str]) -> bool:
    """May a session cookie authenticate this request?

    ``SameSite=Lax`` already keeps the cookie off cross-site subrequests, but "site" is the
    registrable domain: a page on a sibling subdomain is same-site and would still send it
    (a WebSocket or a form POST riding the user's session). So a request the browser marks as
    coming from another origin (``Sec-Fetch-Site`` ``same-site``/``cross-site``) may use the
    cookie only for what Lax allows cross-site anyway: a top-level GET navigation.
    """
    site = headers.get("Sec-Fetch-Site", "").strip().lower()
    if site not in {"same-site", "cross-site"}:
        return True  # same-origin, none (typed, bookmark), or a client without Fetch Metadata
    mode = headers.get("Sec-Fetch-Mode", "").strip().lower()
    return method in {"GET", "HEAD"} and mode == "navigate"


def _derive(secret: bytes, label: bytes) -> bytes:
    return hmac.new(secret, label, hashlib.sha256).digest()


def load_session_key(config: Config) -> bytes:
    """The key that signs session cookies (see docs/browsers.md for the rules).

    ``auth.session_secret`` when set; else, with the Redis directory, a key derived from
    ``directory.peer_secret`` (every relay shares it, so a cookie works on all of them); else in
    dev mode a random key kept in the dev state folder; else a per-process random key.
    """
    if config.auth.session_secret:
        return _derive(config.auth.session_secret.encode(), _LABEL_SECRET)
    if config.directory.backend == "redis" and config.directory.peer_secret:
        return _derive(config.directory.peer_secret.encode(), _LABEL_PEER)
    if config.auth.mode == "dev":
        return _derive(_dev_key_file(config.dev_state_path), _LABEL_SECRET)
    log.info("auth.session_key_ephemeral",
             hint="browser sessions end when this relay restarts; set auth.session_secret")
    return secrets.token_bytes(32)


def _dev_key_file(state_dir: Path) -> bytes:
    from relay.auth.devissuer import _create_exclusive  # the same atomic 0600 create

    path = state_dir / SESSION_KEY_FILENAME
    try:
        if not path.exists():
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            _create_exclusive(path, secrets.token_bytes(32))
            log.info("auth.session_key_created", path=str(path))
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), "auth.dev_state_dir",
                          f"cannot use the session key: {exc.strerror}") from None
    if len(data) < 16:
        raise ConfigError(str(path), "auth.dev_state_dir", "the session key file is too short")
    return data
