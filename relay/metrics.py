"""Prometheus metrics, named once; each relay instance owns its own registry.

A registry per instance (not the process-global default) lets tests run several relays in one
process and lets the agent expose its own set without clashing.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import values as _values
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = [
    "CONTENT_TYPE_LATEST", "STANDARD_PREFIXES", "AccessOutcome", "AccessSource", "CredentialClose",
    "DisconnectReason", "FetchResult", "LinkOpen", "Metrics", "PeerSide", "ProbeRun",
    "QueueOutcome", "StreamKind",
    "TokenResult", "WsOutcome",
]


# Label values, named once: dashboards and alert rules match on these strings.
class StreamKind(StrEnum):
    """``kind`` of relay_streams_active and relay_forwarded_requests_total."""

    HTTP = "http"
    WS = "ws"


class AccessOutcome(StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"
    UNAVAILABLE = "unavailable"


class AccessSource(StrEnum):
    LOCAL = "local"
    CACHE = "cache"
    UPSTREAM = "upstream"


class TokenResult(StrEnum):
    OK = "ok"
    CACHED = "cached"
    REJECTED = "rejected"


class FetchResult(StrEnum):
    """``result`` of relay_jwks_refreshes_total."""

    OK = "ok"
    ERROR = "error"


class QueueOutcome(StrEnum):
    """``outcome`` of relay_stream_queue_total."""

    WAITED = "waited"
    TIMED_OUT = "timed_out"
    QUEUE_FULL = "queue_full"
    TUNNEL_GONE = "tunnel_gone"


class CredentialClose(StrEnum):
    """``reason`` of relay_credential_closes_total."""

    EXPIRED = "expired"  # 4401
    REVOKED = "revoked"  # 4403


class DisconnectReason(StrEnum):
    """``reason`` of relay_tunnel_disconnects_total and of ``tunnel.disconnected``: a closed set,
    so a close reason's free text can never mint a new series."""

    AGENT_CLOSED = "agent_closed"  # the agent left (after a drain, on stop)
    REPLACED = "replaced"  # 4409
    KEEPALIVE_MISSED = "keepalive_missed"  # 4408
    DRAINING = "draining"  # 4503: this relay is draining, or the tunnel ran out of stream ids
    UNAUTHORIZED = "unauthorized"  # 4401: token expired unrenewed, or a renewal refused
    FORBIDDEN = "forbidden"  # 4403: revoked, or a renewal for another subject
    NOT_READING = "not_reading"  # 1008: the agent stopped reading
    CONTROL_FLOOD = "control_flood"  # 1008: PINGs past tunnel.max_pings_per_s
    PROTOCOL_VIOLATION = "protocol_violation"  # 1002
    INTERNAL_ERROR = "internal_error"  # 1011: the relay's own fault
    OPERATOR = "operator"  # DELETE /admin/tunnels/<hostId>
    STOPPING = "stopping"  # 1001: this relay is shutting down
    ERROR = "error"  # the connection failed under the relay (reset)
    OTHER = "other"


class WsOutcome(StrEnum):
    """``outcome`` of relay_ws_channels_total besides the error codes of refused channels."""

    OPENED = "opened"


class PeerSide(StrEnum):
    """``side`` of relay_peer_links and relay_peer_link_streams_total."""

    ENTRY = "entry"  # the relay the client reached, which opened the link
    OWNER = "owner"  # the relay holding the host's tunnel, which answers the link's streams


class LinkOpen(StrEnum):
    """``outcome`` of relay_peer_link_opens_total."""

    UP = "up"
    NOT_OFFERED = "not_offered"  # an owner without peer links (older, or turned off): HTTP
    REFUSED = "refused"  # the owner refused the upgrade (its signature check, draining)
    UNREACHABLE = "unreachable"


class ProbeRun(StrEnum):
    OK = "ok"
    FAILED = "failed"

# ``<counter>_created`` series would double every counter (and every labelled child) for a
# timestamp nobody charts; prometheus_client decides this process-wide, at collection time.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it untyped



class LoopValue:
    """A metric's value without prometheus_client's lock: the relay and the agent update and
    render their metrics on the event loop's thread only, so the ``threading.Lock`` taken on
    every increment (about ten per proxied request: counters, the streams gauge, two histogram
    observations) bought nothing but its cost. The one value another thread updates, the
    tracing exporter's dropped spans, is incremented under relay.tracing's own lock."""

    __slots__ = ("_exemplar", "_value")
    _multiprocess = False

    def __init__(self, typ: str, metric_name: str, name: str, labelnames: Any,
                 labelvalues: Any, help_text: str, **kwargs: Any) -> None:
        self._value = 0.0
        self._exemplar: Any = None

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def set_exemplar(self, exemplar: Any) -> None:
        self._exemplar = exemplar

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> Any:
        return self._exemplar


# Chosen before any metric exists (values are created with their metric or labelled child);
# prometheus_client's multiprocess mode (its env variable set) keeps its own file-backed class.
if _values.ValueClass is _values.MutexValue:
    _values.ValueClass = LoopValue

# Families from prometheus_client's standard collectors: memory, CPU, file descriptors (process_*)
# and the interpreter's version (python_info).
STANDARD_PREFIXES = ("process_", "python_")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Memory and descriptors are what an operator of a long-lived relay watches; these are
        # read from /proc at scrape time (on Linux; elsewhere ProcessCollector reports nothing).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.tunnels_connected = Gauge(
            "relay_tunnels_connected", "Agent tunnels currently registered on this relay",
            registry=r,
        )
        self.tunnel_connects_total = Counter(
            "relay_tunnel_connects_total", "Tunnels accepted", registry=r
        )
        self.tunnel_disconnects_total = Counter(
            "relay_tunnel_disconnects_total", "Tunnels closed, by reason", ["reason"], registry=r
        )
        self.tunnel_rejections_total = Counter(
            "relay_tunnel_rejections_total", "Tunnel attempts refused, by error code", ["code"],
            registry=r,
        )
        self.streams_active = Gauge(
            "relay_streams_active", "Streams open across all tunnels, by kind", ["kind"],
            registry=r,
        )
        self.http_requests_total = Counter(
            "relay_http_requests_total", "Proxied HTTP requests, by status code", ["status"],
            registry=r,
        )
        self.http_request_duration_seconds = Histogram(
            "relay_http_request_duration_seconds",
            "Proxied HTTP request duration, from arrival to the last response byte",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.http_time_to_first_byte_seconds = Histogram(
            "relay_http_time_to_first_byte_seconds",
            "Time from a request's arrival to the host's response head through the tunnel",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ws_channels_total = Counter(
            "relay_ws_channels_total", "Proxied WebSocket channels, by outcome", ["outcome"],
            registry=r,
        )
        self.proxied_bytes_total = Counter(
            "relay_proxied_bytes_total",
            "Body and message bytes proxied, by direction (to_host, to_client)", ["direction"],
            registry=r,
        )
        self.access_decisions_total = Counter(
            "relay_access_decisions_total",
            "Access decisions, by outcome (allowed, denied, unavailable) and source "
            "(local, cache, upstream)",
            ["outcome", "source"], registry=r,
        )
        self.access_upstream_duration_seconds = Histogram(
            "relay_access_upstream_duration_seconds",
            "checkAccess upstream call latency", buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.token_verifications_total = Counter(
            "relay_token_verifications_total",
            "Bearer token verifications, by result (ok, cached, rejected)", ["result"],
            registry=r,
        )
        self.jwks_refreshes_total = Counter(
            "relay_jwks_refreshes_total", "JWKS fetches, by result", ["result"], registry=r
        )
        self.forwarded_requests_total = Counter(
            "relay_forwarded_requests_total",
            "Requests and channels forwarded to the relay owning the tunnel, by kind",
            ["kind"], registry=r,
        )
        self.peer_links = Gauge(
            "relay_peer_links",
            "Peer links open, by side (entry: opened by this relay to an owner relay; owner: "
            "opened by another relay to this one)", ["side"], registry=r,
        )
        self.peer_link_opens_total = Counter(
            "relay_peer_link_opens_total",
            "Attempts to open a peer link to an owner relay, by outcome (up, not_offered: "
            "the owner has no links and requests go by HTTP, refused, unreachable)",
            ["outcome"], registry=r,
        )
        self.peer_link_streams_total = Counter(
            "relay_peer_link_streams_total",
            "Requests (http) and channels (ws) carried over peer links, by side and kind",
            ["side", "kind"], registry=r,
        )
        self.peer_links_refused_total = Counter(
            "relay_peer_links_refused_total",
            "Peer link upgrades refused by this relay (bad, stale or replayed signature)",
            registry=r,
        )
        self.directory_errors_total = Counter(
            "relay_directory_errors_total", "Directory (Redis) operations that failed, by op",
            ["op"], registry=r,
        )
        self.draining = Gauge(
            "relay_draining", "1 while the relay is draining", registry=r
        )
        self.stream_queue_total = Counter(
            "relay_stream_queue_total",
            "HTTP exchanges that could not get a tunnel stream at once, by outcome (waited: "
            "got one after waiting; timed_out, queue_full: 503 overloaded; tunnel_gone)",
            ["outcome"], registry=r,
        )
        self.stream_queue_wait_seconds = Histogram(
            "relay_stream_queue_wait_seconds",
            "How long HTTP exchanges that had to wait waited for a tunnel stream",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.credential_closes_total = Counter(
            "relay_credential_closes_total",
            "Channels and tunnels closed for their credential, by kind (channel, tunnel) and "
            "reason (expired: 4401, revoked: 4403)",
            ["kind", "reason"], registry=r,
        )
        self.trace_spans_dropped_total = Counter(
            "relay_trace_spans_dropped_total",
            "Spans not exported: the export queue was full or the collector failed or timed out",
            registry=r,
        )
        self.probe_success = Gauge(
            "relay_probe_success",
            "1 when the last synthetic probe (tunnel in through the public URL, one request) "
            "worked, else 0", registry=r,
        )
        self.probe_duration_seconds = Gauge(
            "relay_probe_duration_seconds", "How long the last synthetic probe took", registry=r,
        )
        self.probe_runs_total = Counter(
            "relay_probe_runs_total", "Synthetic probes run, by result (ok, failed)", ["result"],
            registry=r,
        )

        # Labelled children looked up once: .labels() on every request was ~10% of the relay's
        # CPU under small-request load.
        self.http_streams = self.streams_active.labels(kind=StreamKind.HTTP)
        self.ws_streams = self.streams_active.labels(kind=StreamKind.WS)
        self.bytes_to_host = self.proxied_bytes_total.labels(direction="to_host")
        self.bytes_to_client = self.proxied_bytes_total.labels(direction="to_client")
        self._by_status: dict[int, Any] = {}
        self._children: dict[tuple[Any, ...], Any] = {}

    def requests_with_status(self, status: int) -> Any:
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = self.http_requests_total.labels(status=str(status))
        return child

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once per label set: the metrics counted on
        every request have closed sets of label values, so this stays small."""
        key = (id(metric), *values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)
