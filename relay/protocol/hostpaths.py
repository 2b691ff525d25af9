"""Keep hosts apart on one relay origin: cookie paths and redirects stay under ``/hosts/<id>/``.

Every host is served under its own path prefix of the relay's origin. A browser keys cookies by
path and follows redirects anywhere, so a host's ``Set-Cookie: sid=..; Path=/`` would be sent
to every other host, and a ``Location: /login`` would leave the host's prefix. The relay rewrites
both on the way to the client; the agent, which alone knows the host's own origin
(``http://127.0.0.1:3100``), turns absolute redirects to it into root-relative ones first.

Pure functions over header values; no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

# The relay's own navigation-session cookie (relay.auth.session): a host may not set or see it.
SESSION_COOKIE = "relay_session"

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def host_prefix(host_id: str) -> str:
    """The path prefix a host is served under, without the trailing slash."""
    return f"/hosts/{host_id}"


def is_under(path: str, prefix: str) -> bool:
    """True when ``path`` is ``prefix`` itself or inside it (``prefix`` has no trailing '/')."""
    return path == prefix or path.startswith(prefix + "/")


def _is_clean_path(path: str) -> bool:
    """A path a browser would match literally: no control characters, no dot segments."""
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in path) or "\\" in path:
        return False
    # Decoded, so %2e%2e counts as ".." too: never let a cookie path climb out of its prefix.
    return not any(seg in {".", ".."} for seg in unquote(path).split("/"))


def rewrite_cookie_path(path: str | None, prefix: str) -> str:
    """The ``Path`` a host's cookie gets: its own path moved under ``prefix``.

    ``None``/empty/relative/hostile → the host's root. A path already under the prefix (a host
    that honours ``X-Forwarded-Prefix``) is kept as it is.
    """
    if not path or not path.startswith("/") or not _is_clean_path(path):
        return prefix + "/"
    if is_under(path, prefix):
        return path
    return prefix + path


def rewrite_set_cookie(value: str, prefix: str) -> str | None:
    """A host's ``Set-Cookie`` with its ``Path`` under ``prefix`` and no ``Domain``.

    Returns None for a cookie the host may not set (the relay's own session cookie). Other
    attributes (Max-Age, Expires, Secure, HttpOnly, SameSite ...) are kept as sent.
    """
    pair, *attributes = value.split(";")
    name = pair.split("=", 1)[0].strip()
    if name == SESSION_COOKIE:
        return None
    kept: list[str] = []
    path: str | None = None
    for attribute in attributes:
        key, _, val = attribute.partition("=")
        key = key.strip().lower()
        if key == "domain":
            continue  # a Domain would widen the cookie to other sites of the relay's domain
        if key == "path":
            path = val.strip()  # RFC 6265 §5.3: the last Path attribute wins
            continue
        if attribute.strip():
            kept.append(attribute.strip())
    return "; ".join([pair.strip(), *kept, f"Path={rewrite_cookie_path(path, prefix)}"])


def _origin_of(scheme: str, netloc: str) -> tuple[str, str, int | None] | None:
    scheme = scheme.lower()
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if host is None:
        return None
    return scheme, host.lower(), port if port is not None else _DEFAULT_PORTS.get(scheme)


def origin_key(origin: str) -> tuple[str, str, int | None] | None:
    """``(scheme, host, port)`` of ``scheme://host[:port]`` with the default port filled in."""
    scheme, sep, netloc = origin.partition("://")
    return _origin_of(scheme, netloc.rstrip("/")) if sep else None


def _after_authority(value: str, scheme: str, netloc: str) -> str | None:
    """What follows ``scheme://netloc`` in ``value`` as sent, or None when it is not a prefix
    (urlsplit drops stray whitespace and control characters; such values are left alone)."""
    head = f"{scheme}://{netloc}"
    if value[:len(head)].lower() != head.lower():
        return None
    return value[len(head):]


def _root_relative(value: str) -> bool:
    # "//x" and "/\x" are network-path references to browsers (another host), not paths.
    return value.startswith("/") and not value.startswith(("//", "/\\"))


def rewrite_location(value: str, prefix: str, public_origin: str) -> str:
    """A host's ``Location`` kept under ``prefix`` when it points at the relay's own origin.

    Root-relative (``/x``) and absolute at ``public_origin`` outside the prefix get the prefix;
    relative (``x``, ``../x``), foreign and already-prefixed ones pass untouched.
    """
    if _root_relative(value):
        path = value.split("?", 1)[0].split("#", 1)[0]
        return value if is_under(path, prefix) else prefix + value
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if not parts.scheme or not parts.netloc:
        return value  # relative: the browser resolves it under the current (prefixed) URL
    target = _origin_of(parts.scheme, parts.netloc)
    if target is None or target != origin_key(public_origin):
        return value  # somewhere else entirely: the host's business
    rest = _after_authority(value, parts.scheme, parts.netloc)
    if rest is None or is_under(parts.path, prefix):
        return value
    return f"{parts.scheme}://{parts.netloc}{prefix}{rest if rest.startswith('/') else '/' + rest}"


def localize_location(value: str, local_origin: str) -> str:
    """An absolute ``Location`` at the host's own origin, made root-relative (agent side).

    ``http://127.0.0.1:3100/x?y`` → ``/x?y`` when the agent serves ``http://127.0.0.1:3100``;
    loopback aliases (``localhost``, ``127.0.0.1``, ``[::1]``) on the same scheme and port count
    as the same origin. The relay then keeps the root-relative path under the host's prefix.
    """
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if not parts.scheme or not parts.netloc:
        return value
    target = _origin_of(parts.scheme, parts.netloc)
    local = origin_key(local_origin)
    if target is None or local is None:
        return value
    same = target == local or (
        target[0] == local[0] and target[2] == local[2]
        and target[1] in _LOOPBACK_NAMES and local[1] in _LOOPBACK_NAMES
    )
    rest = _after_authority(value, parts.scheme, parts.netloc) if same else None
    if rest is None:
        return value
    if not rest.startswith("/"):
        rest = "/" + rest
    # A path that starts "//" would read as another host once the origin is gone.
    return "/" + rest.lstrip("/") if rest.startswith("//") else rest


def localize_response_headers(headers: list[list[str]], local_origin: str) -> list[list[str]]:
    """The host's response head as the agent sends it: Location made origin-free (in place)."""
    for pair in headers:
        if pair[0].lower() == "location":
            pair[1] = localize_location(pair[1], local_origin)
    return headers


def rewrite_for_client(
    headers: Iterable[tuple[str, str]], prefix: str, public_origin: str
) -> list[tuple[str, str]]:
    """A host's response headers kept under its prefix (relay side).

    ``Set-Cookie`` and ``Location`` as above; ``Service-Worker-Allowed`` too (a host could
    otherwise register a service worker controlling the whole origin, other hosts included);
    ``Clear-Site-Data`` is dropped (it would wipe every host's cookies and storage at once).
    """
    out: list[tuple[str, str]] = []
    for name, value in headers:
        lower = name.lower()
        if lower == "clear-site-data":
            continue
        if lower == "service-worker-allowed":
            value = rewrite_cookie_path(value.strip(), prefix)
        elif lower == "set-cookie":
            rewritten = rewrite_set_cookie(value, prefix)
            if rewritten is None:
                continue
            value = rewritten
        elif lower == "location":
            value = rewrite_location(value, prefix, public_origin)
        out.append((name, value))
    return out
