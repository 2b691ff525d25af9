"""CORS for ``/hosts/...``: which headers an answer to a browser gets, decided from config alone.

Pure: an Origin, a method and header names go in; header lists come out. The relay owns CORS
when ``cors.allow_origins`` is set: it answers preflights itself (a preflight carries no
credentials, so a host behind the relay could never answer one), and its grant replaces any
``Access-Control-*`` header the host sent. Grants carry credentials, so origins are exact.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from multidict import CIMultiDict

from relay.protocol.hostpaths import origin_key

Headers = list[tuple[str, str]]

# Readable by the page on every answer: a client needs these to act on the relay's own errors.
EXPOSED = ("Retry-After", "WWW-Authenticate", "Server-Timing")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_MAX_REQUESTED_HEADERS = 64

ALLOW_ORIGIN = "Access-Control-Allow-Origin"
ALLOW_CREDENTIALS = "Access-Control-Allow-Credentials"
EXPOSE_HEADERS = "Access-Control-Expose-Headers"


def _names(value: str) -> list[str] | None:
    """A comma-separated list of header names or methods, or None if one is not a token."""
    names = [part.strip() for part in value.split(",") if part.strip()]
    if len(names) > _MAX_REQUESTED_HEADERS or not all(_TOKEN.fullmatch(n) for n in names):
        return None
    return names


def merge_vary(values: list[str], name: str) -> str:
    """One Vary value listing ``values`` (the host's) and ``name``, each once."""
    tokens = [t.strip() for v in values for t in v.split(",") if t.strip()]
    if "*" in tokens or any(t.lower() == name.lower() for t in tokens):
        return ", ".join(tokens)
    return ", ".join([*tokens, name])


class CorsPolicy:
    """The CORS decisions for a list of exact origins (empty: CORS off, headers untouched)."""

    def __init__(self, origins: Iterable[str], max_age_s: int = 600) -> None:
        self._origins = frozenset(key for key in map(origin_key, origins) if key is not None)
        self._exact: dict[str, bool] = {}  # Origin header value -> allowed, memoised
        self.max_age_s = max_age_s

    @property
    def enabled(self) -> bool:
        return bool(self._origins)

    def allows(self, origin: str | None) -> bool:
        if not origin:
            return False
        allowed = self._exact.get(origin)
        if allowed is None:
            # Browsers send the serialised origin (lower case, no default port); config
            # spellings such as "https://App.example:443" still match it.
            allowed = origin != "null" and origin_key(origin) in self._origins
            if len(self._exact) < 1024:  # bounded: Origin is attacker-chosen
                self._exact[origin] = allowed
        return allowed

    def preflight(
        self, origin: str | None, method: str | None, requested_headers: str | None
    ) -> Headers | None:
        """The relay's 204 answer to a preflight, or None when this is not one it grants."""
        if not method or not self.allows(origin):
            return None
        methods = _names(method)
        headers = _names(requested_headers or "")
        if not methods or len(methods) != 1 or headers is None:
            return None
        assert origin is not None
        out: Headers = [
            (ALLOW_ORIGIN, origin),
            (ALLOW_CREDENTIALS, "true"),
            ("Access-Control-Allow-Methods", methods[0]),
        ]
        if headers:
            out.append(("Access-Control-Allow-Headers", ", ".join(headers)))
        out += [
            ("Access-Control-Max-Age", str(self.max_age_s)),
            ("Vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
        ]
        return out

    def decorate(self, headers: CIMultiDict[str], origin: str | None) -> None:
        """Put the relay's grant on an answer's headers (a CIMultiDict), replacing the host's.

        Every answer varies by Origin once CORS is on, so ``Vary: Origin`` goes on all of them
        (a shared cache must not hand one origin's grant to another). The host's own
        ``Access-Control-Expose-Headers`` names stay exposed: which of its headers a page may
        read is the host's call; who may read at all is the relay's.
        """
        host_exposed = [n for v in headers.getall(EXPOSE_HEADERS, ()) for n in v.split(",")]
        for name in {n for n in headers if n.lower().startswith("access-control-")}:
            headers.popall(name, None)
        vary = headers.popall("Vary", [])
        headers["Vary"] = merge_vary(vary, "Origin")
        if not self.allows(origin):
            return
        assert origin is not None
        headers[ALLOW_ORIGIN] = origin
        headers[ALLOW_CREDENTIALS] = "true"
        exposed = list(EXPOSED)
        seen = {n.lower() for n in exposed}
        for name in (n.strip() for n in host_exposed):
            if name and name.lower() not in seen and _TOKEN.fullmatch(name):
                seen.add(name.lower())
                exposed.append(name)
        headers[EXPOSE_HEADERS] = ", ".join(exposed)
