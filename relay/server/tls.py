"""The relay's own HTTPS/WSS: one server ``SSLContext`` whose certificate is replaced in place.

``load_cert_chain`` on the live context affects new handshakes only, so a SIGHUP with a renewed
certificate never drops a tunnel. A new pair is first loaded into a scratch context, from a
private copy of the files' bytes, and only a pair that loads there (certificate parses, key
matches) goes into the live context: a bad renewal keeps the old certificate serving.
"""

from __future__ import annotations

import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography import x509

from relay.config import Config
from relay.errors import ConfigError

log = structlog.get_logger("relay.tls")


class TlsError(Exception):
    """A certificate or key that cannot be served; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class CertInfo:
    serial: str
    subject: str
    not_after: str


def _new_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _no_password() -> bytes:
    # An encrypted key must fail here, not make OpenSSL prompt on a terminal nobody reads.
    return b""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read {what} {path}: {exc.strerror}") from None


def _describe(cert_pem: bytes, path: Path) -> CertInfo:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise TlsError(f"{path} does not start with a PEM certificate") from None
    return CertInfo(serial=format(cert.serial_number, "x"), subject=cert.subject.rfc4514_string(),
                    not_after=cert.not_valid_after_utc.isoformat())


class TlsContext:
    def __init__(self, cert_path: Path, key_path: Path) -> None:
        self.context = _new_context()
        self.info = self._load(self.context, cert_path, key_path, check_first=False)

    def reload(self, cert_path: Path, key_path: Path) -> CertInfo:
        """Serve a new pair to new connections, or raise :class:`TlsError` keeping the old."""
        self.info = self._load(self.context, cert_path, key_path, check_first=True)
        return self.info

    @staticmethod
    def _load(context: ssl.SSLContext, cert_path: Path, key_path: Path, *,
              check_first: bool) -> CertInfo:
        cert_pem = _read(cert_path, "certificate")
        key_pem = _read(key_path, "key")
        info = _describe(cert_pem, cert_path)
        # The files may change while we read them (a renewal tool writing): load the bytes we
        # checked, from a private folder, never the paths twice.
        with tempfile.TemporaryDirectory(prefix="relay-tls-") as tmp:
            cert_copy, key_copy = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert_copy.write_bytes(cert_pem)
            key_copy.touch(mode=0o600)
            key_copy.write_bytes(key_pem)
            targets = [_new_context(), context] if check_first else [context]
            for target in targets:
                try:
                    target.load_cert_chain(cert_copy, key_copy, password=_no_password)
                except ssl.SSLError as exc:
                    reason = exc.reason or exc.strerror or str(exc)
                    raise TlsError(
                        f"cannot use {cert_path} with {key_path}: {reason}"
                    ) from None
        return info


def build_tls(config: Config) -> TlsContext | None:
    """The server context for ``server.tls_*``, or None without them; ConfigError when bad."""
    server = config.server
    if not server.tls_cert_file:
        return None
    try:
        tls = TlsContext(config.resolve_path(server.tls_cert_file),
                         config.resolve_path(server.tls_key_file))
    except TlsError as exc:
        raise ConfigError(config.source, "server.tls_cert_file", str(exc)) from None
    log.info("relay.tls_loaded", serial=tls.info.serial, subject=tls.info.subject,
             not_after=tls.info.not_after)
    return tls


def reload_tls(tls: TlsContext, config: Config) -> bool:
    """Re-read the certificate files (renewed in place or renamed); False keeps the old pair."""
    try:
        info = tls.reload(config.resolve_path(config.server.tls_cert_file),
                          config.resolve_path(config.server.tls_key_file))
    except TlsError as exc:
        log.error("relay.tls_reload_failed", error=str(exc))
        return False
    log.info("relay.tls_reloaded", serial=info.serial, subject=info.subject,
             not_after=info.not_after)
    return True
