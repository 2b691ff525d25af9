"""Load, override from the environment, validate and freeze the relay's configuration.

A config is a TOML file whose sections map onto the frozen dataclasses below. Every key can be
overridden as ``RELAY_<SECTION>_<KEY>``. Anything wrong raises :class:`ConfigError` naming the
file, the key and the problem, so start-up stops with one line instead of running half-configured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import ipaddress
import os
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from relay.errors import ConfigError
from relay.protocol import defaults

ENV_PREFIX = "RELAY_"
# RELAY_* variables that look like ``RELAY_<SECTION>_<KEY>`` but are not config keys: the config
# file's path and ``relay status``'s default URL. Every other name under a known section's prefix
# must be a key, so a typo (RELAY_SERVER_PROT) stops start-up like the same typo in the file.
NON_KEY_VARIABLES = frozenset({"RELAY_CONFIG", "RELAY_ADMIN_URL"})
SECRET_KEYS = frozenset({
    "directory.peer_secret", "admin.secret", "directory.redis_url", "auth.session_secret",
})


class AuthMode(StrEnum):
    """``auth.mode``: where the keys that sign tokens come from."""

    DEV = "dev"
    JWKS = "jwks"
    PUBLIC_KEY = "public_key"


class AccessBackend(StrEnum):
    """``access.backend``: who decides which subject may use which host."""

    ORG = "org"
    UPSTREAM = "upstream"
    STATIC = "static"


class DirectoryBackend(StrEnum):
    """``directory.backend``: where the relay records which relay holds which tunnel."""

    LOCAL = "local"
    REDIS = "redis"


class LogLevel(StrEnum):
    """``log.level``, written in any case (``INFO`` is ``info``)."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"

    @classmethod
    def _missing_(cls, value: object) -> LogLevel | None:
        if isinstance(value, str) and value.lower() != value:
            return cls._value2member_map_.get(value.lower())  # type: ignore[return-value]
        return None


class LogFormat(StrEnum):
    JSON = "json"
    CONSOLE = "console"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 1 << 30  # 413 above this (declared or streamed)
    max_header_bytes: int = 16384  # 431 above this
    drain_grace_s: float = 20.0  # in-flight HTTP exchanges get this long on SIGTERM
    trust_forwarded: bool = False  # honour X-Forwarded-* from a reverse proxy in front
    header_timeout_s: float = 10.0  # a request head must arrive whole within this
    keepalive_timeout_s: float = 75.0  # an idle keep-alive connection is closed after this
    server_timing: bool = False  # proxied answers carry Server-Timing (auth, access, tunnel, host)
    tls_cert_file: str = ""  # PEM chain; with tls_key_file the relay serves HTTPS/WSS itself
    tls_key_file: str = ""


@dataclass(frozen=True, slots=True)
class AuthConfig:
    mode: AuthMode = AuthMode.DEV
    jwks_url: str = ""
    public_key_file: str = ""
    issuer: str = ""
    audience: str = ""
    org_claim: str = "organizationIds"
    email_claim: str = "email"
    agent_claim: str = "relayHosts"  # host ids (or <org>:*) a token may serve as an agent
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    leeway_s: int = 30
    dev_state_dir: str = "state"  # dev issuer key folder, relative to the config file
    jwks_cache_s: int = 3600
    jwks_refresh_min_interval_s: float = 30.0  # unknown-kid refreshes at most this often
    token_cache_size: int = 10000
    # Signs browser session cookies; empty = derived or generated (see relay.auth.session).
    session_secret: str = ""


@dataclass(frozen=True, slots=True)
class AccessConfig:
    backend: AccessBackend = AccessBackend.ORG
    upstream_url: str = ""
    allow_ttl_s: float = 900.0
    deny_ttl_s: float = 30.0
    allow_cache_size: int = 100000
    deny_cache_size: int = 100000
    upstream_timeout_s: float = 5.0
    failure_backoff_s: float = 2.0  # after an upstream failure, fail fast this long
    static_grants_file: str = ""


@dataclass(frozen=True, slots=True)
class TunnelConfig:
    ping_interval_s: float = defaults.PING_INTERVAL_S
    request_timeout_s: float = defaults.REQUEST_TIMEOUT_S
    # silent ping intervals before 4408 / the agent's watchdog fires
    keepalive_misses: int = defaults.KEEPALIVE_MISSES
    # concurrent streams per tunnel; more HTTP exchanges wait in a queue
    max_streams: int = defaults.MAX_STREAMS
    max_streams_per_subject: int = 0  # streams one subject may hold on one host; 0 = half
    queue_timeout_s: float = 5.0  # how long an HTTP exchange waits for a stream before 503
    max_queued: int = 4096  # exchanges waiting per tunnel; more answer 503 at once
    max_outbox_bytes: int = 8 << 20  # bytes queued for an agent that does not read before 1008
    max_pings_per_s: float = 8.0  # PINGs an agent may send per second (burst 16+); 0 = any
    # after a PING flood cut, the subject's new tunnels are refused 1013 this long; 0 = never
    flood_lockout_s: float = 10.0
    stream_window_bytes: int = defaults.WINDOW  # flow-control credit per stream and direction
    max_frame_bytes: int = defaults.MAX_FRAME  # largest DATA payload on the tunnel
    max_ws_message_bytes: int = defaults.MAX_WS_MESSAGE
    # a channel open must be acknowledged by the host this fast
    open_timeout_s: float = defaults.OPEN_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class DirectoryConfig:
    backend: DirectoryBackend = DirectoryBackend.LOCAL
    redis_url: str = ""
    instance_id: str = ""
    advertise_url: str = ""
    peer_secret: str = ""
    heartbeat_s: float = 5.0
    entry_ttl_s: float = 20.0
    peer_max_skew_s: float = 30.0
    # forward over one persistent multiplexed link per owner relay (else a request each)
    peer_links: bool = True


@dataclass(frozen=True, slots=True)
class AdminConfig:
    secret: str = ""
    listen: str = ""  # "host:port" of a separate admin listener; empty = the public port
    max_failures: int = 10  # wrong secrets from one peer within failure_window_s ...
    failure_window_s: float = 60.0
    lockout_s: float = 60.0  # ... answer 429 for this long


@dataclass(frozen=True, slots=True)
class CorsConfig:
    allow_origins: tuple[str, ...] = ()  # exact origins, e.g. "https://app.example.com"
    max_age_s: int = 600  # how long a browser may cache a preflight answer


@dataclass(frozen=True, slots=True)
class TracingConfig:
    otlp_endpoint: str = ""  # OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces; "" = off
    service_name: str = "relay"
    sample_ratio: float = 1.0  # of traces the client did not decide (a sampled parent is kept)
    max_queue_size: int = 2048  # spans waiting for export; more are dropped (and counted)
    max_export_batch_size: int = 512
    schedule_delay_s: float = 1.0  # how often the background exporter sends a batch
    export_timeout_s: float = 5.0  # one export to the collector, retries included
    shutdown_timeout_s: float = 3.0  # a stopping relay's wait for the last export


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    public_url: str = ""  # how agents reach this relay (ws:// or wss://); "" = no probe
    interval_s: float = 60.0
    timeout_s: float = 10.0  # the whole probe: tunnel, one request, teardown
    token_file: str = ""  # the probe's token outside dev mode (re-read on every probe)
    subject: str = "relay-probe"  # the only subject allowed on the reserved probe org
    ca_file: str = ""  # trust this CA for a wss:// public_url with a private certificate


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: LogLevel = LogLevel.INFO
    format: LogFormat = LogFormat.JSON
    access_log: bool = True


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    log: LogConfig = field(default_factory=LogConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    # Where the config came from: relative paths resolve against its folder.
    source: str = "<defaults>"
    base_dir: str = "."

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path

    @property
    def dev_state_path(self) -> Path:
        return self.resolve_path(self.auth.dev_state_dir)


SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "auth": AuthConfig,
    "access": AccessConfig,
    "tunnel": TunnelConfig,
    "directory": DirectoryConfig,
    "admin": AdminConfig,
    "log": LogConfig,
    "cors": CorsConfig,
    "tracing": TracingConfig,
    "probe": ProbeConfig,
}


def _coerce(source: str, key: str, value: Any, default: Any, from_env: bool) -> Any:
    """Turn a TOML or environment value into the default's type, or explain why not."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if from_env and isinstance(value, str) and value.lower() in {"1", "true", "yes", "on"}:
            return True
        if from_env and isinstance(value, str) and value.lower() in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(source, key, f"must be true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_env and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(source, key, f"must be an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_env and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(source, key, f"must be a number, got {value!r}")
    if isinstance(default, tuple):
        if from_env and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise ConfigError(source, key, f"must be a list of strings, got {value!r}")
    if not isinstance(value, str):
        raise ConfigError(source, key, f"must be a string, got {value!r}")
    if isinstance(default, StrEnum):
        # An unknown mode stays a string here: validation names the ones there are.
        with contextlib.suppress(ValueError):
            return type(default)(value)
    return value


def _build_section(
    section: str, cls: type, raw: Mapping[str, Any], source: str, env: Mapping[str, str]
) -> Any:
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(source, f"{section}.{key}", "unknown key")
    values: dict[str, Any] = {}
    defaults = cls()
    for name in known:
        default = getattr(defaults, name)
        variable = env_name(section, name)
        if variable in env:
            values[name] = _coerce(variable, f"{section}.{name}", env[variable], default, True)
        elif name in raw:
            values[name] = _coerce(source, f"{section}.{name}", raw[name], default, False)
    return cls(**values)


def env_name(section: str, key: str) -> str:
    """The environment variable that overrides ``section.key``."""
    return f"{ENV_PREFIX}{section.upper()}_{key.upper()}"


def check_environment(env: Mapping[str, str]) -> None:
    """Refuse ``RELAY_<SECTION>_<KEY>`` names that name no key of a known section."""
    known = {env_name(section, f.name) for section, cls in SECTIONS.items() for f in fields(cls)}
    prefixes = {f"{ENV_PREFIX}{section.upper()}_": section for section in SECTIONS}
    for name in sorted(env):
        if name in known or name in NON_KEY_VARIABLES:
            continue
        section = next((s for p, s in prefixes.items() if name.startswith(p)), None)
        if section is None:
            continue  # not ours to judge (RELAY_URL in the agent's unit, a tool's own variable)
        key = name[len(ENV_PREFIX) + len(section) + 1:].lower()
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(name, f"{section}.{key}", f"unknown key{hint}")


def load_config(
    path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> Config:
    """Read ``path`` (or only defaults when None), apply ``RELAY_*`` overrides, validate."""
    env = os.environ if env is None else env
    check_environment(env)
    raw: dict[str, Any] = {}
    source = "<defaults>"
    base_dir = Path.cwd()
    if path is not None:
        file = Path(path)
        source = str(file)
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(source, "-", "file not found") from None
        except OSError as exc:
            raise ConfigError(source, "-", f"cannot read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(source, "-", "not valid UTF-8") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, "-", f"not valid TOML: {exc}") from None
        base_dir = file.resolve().parent
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(source, section, "unknown section")
        if not isinstance(raw[section], dict):
            raise ConfigError(source, section, "must be a table")
    built = {
        name: _build_section(name, cls, raw.get(name, {}), source, env)
        for name, cls in SECTIONS.items()
    }
    config = Config(**built, source=source, base_dir=str(base_dir))
    config = _fill_defaults(config)
    validate(config)
    return config


def _fill_defaults(config: Config) -> Config:
    directory = config.directory
    if not directory.instance_id:
        directory = dataclasses.replace(
            directory, instance_id=f"{os.uname().nodename}-{uuid.uuid4().hex[:8]}"
        )
    if not directory.advertise_url:
        host = config.server.host
        if host in {"0.0.0.0", "::", ""}:
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        directory = dataclasses.replace(
            directory, advertise_url=f"http://{host}:{config.server.port}"
        )
    return dataclasses.replace(config, directory=directory)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_url(source: str, key: str, value: str, schemes: set[str]) -> None:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.netloc:
        wanted = " or ".join(sorted(schemes))
        raise ConfigError(source, key, f"must be a {wanted} URL, got {value!r}")


def parse_listen(value: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); ValueError when malformed."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError("must be host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 < port <= 65535:
        raise ValueError("port must be between 1 and 65535")
    return host, port


def _validate_admin(config: Config) -> None:
    src, admin = config.source, config.admin
    if admin.listen:
        try:
            host, port = parse_listen(admin.listen)
        except ValueError as exc:
            raise ConfigError(src, "admin.listen", f"{exc}, got {admin.listen!r}") from None
        if config.auth.mode == "dev" and not _is_loopback(host):
            raise ConfigError(src, "admin.listen",
                              f"dev auth mode only listens on loopback, got {host!r}")
        if port == config.server.port:
            raise ConfigError(src, "admin.listen", "must not be the public port (server.port)")
    if admin.max_failures < 1:
        raise ConfigError(src, "admin.max_failures", "must be at least 1")
    for key in ("failure_window_s", "lockout_s"):
        if getattr(admin, key) <= 0:
            raise ConfigError(src, f"admin.{key}", "must be positive")


def validate(config: Config) -> None:
    src = config.source
    server, auth, access, tunnel = config.server, config.auth, config.access, config.tunnel
    directory, log = config.directory, config.log
    if not 0 <= server.port <= 65535:
        raise ConfigError(src, "server.port", f"must be between 0 and 65535, got {server.port}")
    if not server.host:
        raise ConfigError(src, "server.host", "must not be empty")
    if server.max_body_bytes <= 0:
        raise ConfigError(src, "server.max_body_bytes", "must be positive")
    if server.max_header_bytes < 1024:
        raise ConfigError(src, "server.max_header_bytes", "must be at least 1024")
    if server.drain_grace_s < 0:
        raise ConfigError(src, "server.drain_grace_s", "must not be negative")
    for key in ("header_timeout_s", "keepalive_timeout_s"):
        if getattr(server, key) <= 0:
            raise ConfigError(src, f"server.{key}", "must be positive")
    _validate_admin(config)
    _validate_tls(config)

    if auth.mode not in {"dev", "jwks", "public_key"}:
        raise ConfigError(src, "auth.mode", f"must be dev, jwks or public_key, got {auth.mode!r}")
    if auth.mode == "dev" and not _is_loopback(server.host):
        raise ConfigError(
            src,
            "server.host",
            f"dev auth mode only listens on loopback, got {server.host!r}; "
            "set auth.mode to jwks or public_key to serve other addresses",
        )
    if auth.mode == "jwks":
        if not auth.jwks_url:
            raise ConfigError(src, "auth.jwks_url", "required when auth.mode is jwks")
        _check_url(src, "auth.jwks_url", auth.jwks_url, {"http", "https"})
    if auth.mode == "public_key":
        if not auth.public_key_file:
            raise ConfigError(src, "auth.public_key_file", "required when auth.mode is public_key")
        key_path = config.resolve_path(auth.public_key_file)
        if not key_path.is_file():
            raise ConfigError(src, "auth.public_key_file", f"no such file: {key_path}")
    allowed_algs = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                    "ES512", "EdDSA"}
    if not auth.algorithms:
        raise ConfigError(src, "auth.algorithms", "must name at least one algorithm")
    for alg in auth.algorithms:
        if alg not in allowed_algs:
            raise ConfigError(
                src, "auth.algorithms",
                f"{alg!r} is not allowed (asymmetric algorithms only: "
                f"{', '.join(sorted(allowed_algs))})",
            )
    if not auth.org_claim:
        raise ConfigError(src, "auth.org_claim", "must not be empty")
    if not auth.agent_claim:
        raise ConfigError(src, "auth.agent_claim", "must not be empty")
    if auth.leeway_s < 0 or auth.leeway_s > 300:
        raise ConfigError(src, "auth.leeway_s", "must be between 0 and 300")
    if auth.session_secret and len(auth.session_secret) < 16:
        raise ConfigError(src, "auth.session_secret", "must be at least 16 characters")
    if auth.token_cache_size < 0:
        raise ConfigError(src, "auth.token_cache_size", "must not be negative")

    if access.backend not in {"org", "upstream", "static"}:
        raise ConfigError(
            src, "access.backend", f"must be org, upstream or static, got {access.backend!r}"
        )
    if access.backend == "upstream":
        if not access.upstream_url:
            raise ConfigError(
                src, "access.upstream_url", "required when access.backend is upstream"
            )
        _check_url(src, "access.upstream_url", access.upstream_url, {"http", "https"})
    if access.backend == "static":
        if not access.static_grants_file:
            raise ConfigError(
                src, "access.static_grants_file", "required when access.backend is static"
            )
        if not config.resolve_path(access.static_grants_file).is_file():
            raise ConfigError(src, "access.static_grants_file", "no such file")
    for key in ("allow_ttl_s", "deny_ttl_s", "upstream_timeout_s", "failure_backoff_s"):
        if getattr(access, key) < 0:
            raise ConfigError(src, f"access.{key}", "must not be negative")
    if access.upstream_timeout_s <= 0:
        raise ConfigError(src, "access.upstream_timeout_s", "must be positive")
    for key in ("allow_cache_size", "deny_cache_size"):
        if getattr(access, key) < 1:
            raise ConfigError(src, f"access.{key}", "must be at least 1")

    if tunnel.ping_interval_s <= 0:
        raise ConfigError(src, "tunnel.ping_interval_s", "must be positive")
    if tunnel.request_timeout_s <= 0:
        raise ConfigError(src, "tunnel.request_timeout_s", "must be positive")
    if tunnel.keepalive_misses < 1:
        raise ConfigError(src, "tunnel.keepalive_misses", "must be at least 1")
    if tunnel.max_streams < 1:
        raise ConfigError(src, "tunnel.max_streams", "must be at least 1")
    if not 1024 <= tunnel.max_frame_bytes <= 1 << 24:
        raise ConfigError(src, "tunnel.max_frame_bytes", "must be between 1024 and 16777216")
    if tunnel.stream_window_bytes < tunnel.max_frame_bytes:
        raise ConfigError(
            src, "tunnel.stream_window_bytes", "must be at least tunnel.max_frame_bytes"
        )
    if tunnel.max_ws_message_bytes < 1024:
        raise ConfigError(src, "tunnel.max_ws_message_bytes", "must be at least 1024")
    if tunnel.open_timeout_s <= 0:
        raise ConfigError(src, "tunnel.open_timeout_s", "must be positive")
    if not 0 <= tunnel.max_streams_per_subject <= tunnel.max_streams:
        raise ConfigError(src, "tunnel.max_streams_per_subject",
                          "must be between 0 (half of tunnel.max_streams) and tunnel.max_streams")
    if tunnel.queue_timeout_s < 0:
        raise ConfigError(src, "tunnel.queue_timeout_s", "must not be negative")
    if tunnel.max_pings_per_s < 0:
        raise ConfigError(src, "tunnel.max_pings_per_s", "must not be negative (0: no limit)")
    if not 0 <= tunnel.flood_lockout_s <= 3600:
        raise ConfigError(src, "tunnel.flood_lockout_s", "must be between 0 (off) and 3600")
    if tunnel.max_queued < 0:
        raise ConfigError(src, "tunnel.max_queued", "must not be negative")
    # Honest traffic may queue the data high-water mark plus a few of the largest frames.
    least_outbox = (1 << 20) + 4 * (max(tunnel.max_frame_bytes, 256 * 1024) + 6)
    if tunnel.max_outbox_bytes < least_outbox:
        raise ConfigError(src, "tunnel.max_outbox_bytes",
                          f"must be at least {least_outbox} with this tunnel.max_frame_bytes")

    if directory.backend not in {"local", "redis"}:
        raise ConfigError(
            src, "directory.backend", f"must be local or redis, got {directory.backend!r}"
        )
    if directory.backend == "redis":
        if not directory.redis_url:
            raise ConfigError(
                src, "directory.redis_url", "required when directory.backend is redis"
            )
        _check_url(src, "directory.redis_url", directory.redis_url, {"redis", "rediss", "unix"})
        if len(directory.peer_secret) < 16:
            raise ConfigError(
                src, "directory.peer_secret",
                "required with the redis directory: at least 16 characters shared by all relays",
            )
        _check_url(src, "directory.advertise_url", directory.advertise_url, {"http", "https"})
    if directory.heartbeat_s <= 0 or directory.entry_ttl_s <= directory.heartbeat_s * 2:
        raise ConfigError(
            src, "directory.entry_ttl_s", "must be more than twice directory.heartbeat_s"
        )

    _check_cors(src, config.cors)

    if not isinstance(log.level, LogLevel):
        names = ", ".join(level.value for level in LogLevel)
        raise ConfigError(src, "log.level", f"must be one of {names}, got {log.level!r}")
    if log.format not in {"json", "console"}:
        raise ConfigError(src, "log.format", f"must be json or console, got {log.format!r}")
    _validate_tracing(config)
    _validate_probe(config)


def _validate_tls(config: Config) -> None:
    src, server = config.source, config.server
    if bool(server.tls_cert_file) != bool(server.tls_key_file):
        missing = "server.tls_key_file" if server.tls_cert_file else "server.tls_cert_file"
        raise ConfigError(src, missing,
                          "server.tls_cert_file and server.tls_key_file go together; set both")
    for key in ("tls_cert_file", "tls_key_file"):
        value = getattr(server, key)
        if value and not config.resolve_path(value).is_file():
            raise ConfigError(src, f"server.{key}", f"no such file: {config.resolve_path(value)}")


def _validate_tracing(config: Config) -> None:
    src, tracing = config.source, config.tracing
    if tracing.otlp_endpoint:
        _check_url(src, "tracing.otlp_endpoint", tracing.otlp_endpoint, {"http", "https"})
    if not tracing.service_name:
        raise ConfigError(src, "tracing.service_name", "must not be empty")
    if not 0.0 <= tracing.sample_ratio <= 1.0:
        raise ConfigError(src, "tracing.sample_ratio", "must be between 0 and 1")
    if tracing.max_queue_size < 1:
        raise ConfigError(src, "tracing.max_queue_size", "must be at least 1")
    if not 1 <= tracing.max_export_batch_size <= tracing.max_queue_size:
        raise ConfigError(src, "tracing.max_export_batch_size",
                          "must be between 1 and tracing.max_queue_size")
    for key in ("schedule_delay_s", "export_timeout_s", "shutdown_timeout_s"):
        if getattr(tracing, key) <= 0:
            raise ConfigError(src, f"tracing.{key}", "must be positive")


def _validate_probe(config: Config) -> None:
    src, probe = config.source, config.probe
    if not probe.public_url:
        return
    _check_url(src, "probe.public_url", probe.public_url, {"ws", "wss"})
    if probe.interval_s <= 0:
        raise ConfigError(src, "probe.interval_s", "must be positive")
    if not 0 < probe.timeout_s < probe.interval_s:
        raise ConfigError(src, "probe.timeout_s", "must be positive and less than probe.interval_s")
    if config.auth.mode != "dev":
        if not probe.token_file:
            raise ConfigError(src, "probe.token_file",
                              "required with probe.public_url outside dev mode")
        if not config.resolve_path(probe.token_file).is_file():
            raise ConfigError(src, "probe.token_file",
                              f"no such file: {config.resolve_path(probe.token_file)}")
    if not probe.subject:
        raise ConfigError(src, "probe.subject", "must not be empty")
    if probe.ca_file and not config.resolve_path(probe.ca_file).is_file():
        raise ConfigError(src, "probe.ca_file",
                          f"no such file: {config.resolve_path(probe.ca_file)}")


def _check_cors(src: str, cors: CorsConfig) -> None:
    for origin in cors.allow_origins:
        problem = origin_problem(origin)
        if problem:
            raise ConfigError(src, "cors.allow_origins", f"{origin!r}: {problem}")
    if not 0 <= cors.max_age_s <= 86400:
        raise ConfigError(src, "cors.max_age_s", "must be between 0 and 86400")


def origin_problem(origin: str) -> str:
    """Why ``origin`` is not an exact ``scheme://host[:port]`` origin, or "" when it is."""
    if origin == "*":
        # Grants carry Access-Control-Allow-Credentials, which browsers refuse beside "*".
        return "'*' is not allowed (credentialed CORS needs exact origins)"
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return "not a valid origin"
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        return "must be http(s)://host[:port]"
    if parts.path or parts.query or parts.fragment or "?" in origin or "#" in origin:
        return "must be scheme://host[:port] with no path (not even a trailing '/')"
    if parts.username is not None or parts.password is not None:
        return "must not carry user info"
    if port is not None and not 0 < port <= 65535:
        return "port out of range"
    return ""


def masked(config: Config) -> dict[str, dict[str, Any]]:
    """The effective configuration as plain data, with secrets replaced by a marker."""
    out: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        values = dataclasses.asdict(getattr(config, section))
        for key, value in values.items():
            if f"{section}.{key}" in SECRET_KEYS and value:
                values[key] = "********"
            elif isinstance(value, tuple):
                values[key] = list(value)
        out[section] = values
    return out
