"""OpenTelemetry for the relay and the agent: W3C trace context, spans, bounded background export.

Tracing is off unless an OTLP/HTTP endpoint is configured, and off means no tracing object exists:
callers hold ``None`` and a client's ``traceparent`` passes through the relay untouched. On,
spans are handed to the SDK's ``BatchSpanProcessor``, whose worker thread exports them; the event
loop only appends to a bounded queue. What cannot be exported — the queue is full because the
collector is slow, or an export failed or timed out — is dropped and counted, never waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relay.config import TracingConfig

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_TRACE_HEADERS = frozenset({TRACEPARENT, TRACESTATE})
# The standard variables, honoured by the agent (the relay reads its config file).
ENV_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
ENV_SERVICE_NAME = "OTEL_SERVICE_NAME"


@dataclass(frozen=True, slots=True)
class TracingSettings:
    endpoint: str
    service_name: str = "relay"
    sample_ratio: float = 1.0
    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    schedule_delay_s: float = 1.0
    export_timeout_s: float = 5.0
    shutdown_timeout_s: float = 3.0  # shutdown()'s bound unless the caller names one


def trace_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The W3C trace context fields of a header list (first of each), names lower-cased."""
    found: dict[str, str] = {}
    for name, value in headers:
        lower = name.lower()
        if lower in _TRACE_HEADERS and lower not in found:
            found[lower] = value
    return found


def with_trace_headers(headers: Iterable[tuple[str, str]],
                       carrier: Mapping[str, str]) -> list[tuple[str, str]]:
    """``headers`` with any trace context replaced by ``carrier``'s (the next hop's parent)."""
    out = [(n, v) for n, v in headers if n.lower() not in _TRACE_HEADERS]
    out.extend(carrier.items())
    return out


class Tracing:
    """One tracer provider with its exporter; the relay and the agent each own one."""

    def __init__(self, settings: TracingSettings,
                 on_dropped: Callable[[int], None] | None = None) -> None:
        # Imported here: without an endpoint none of this is loaded by the relay.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from relay.tracing_export import CountingBatchProcessor, CountingExporter

        self.settings = settings
        self.dropped = 0
        self._on_dropped = on_dropped
        self._lock = threading.Lock()  # drops are counted from the loop and the export thread
        # The SDK logs every full queue and failed export at WARNING/ERROR through stdlib
        # logging; at relay volume that is a flood. The drop counter says it once, as a number.
        for noisy in ("opentelemetry.sdk._shared_internal",
                      "opentelemetry.exporter.otlp.proto.http",
                      "opentelemetry.exporter.otlp.proto.http.trace_exporter"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
        exporter = OTLPSpanExporter(endpoint=settings.endpoint, timeout=settings.export_timeout_s)
        self._processor = CountingBatchProcessor(
            CountingExporter(exporter, self._drop),
            self._drop,
            max_queue_size=settings.max_queue_size,
            schedule_delay_millis=settings.schedule_delay_s * 1000,
            max_export_batch_size=settings.max_export_batch_size,
            export_timeout_millis=settings.export_timeout_s * 1000,
        )
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        )
        self.provider.add_span_processor(self._processor)
        self.tracer = self.provider.get_tracer("relay")
        self._propagator = TraceContextTextMapPropagator()
        self._closed = False

    def _drop(self, count: int) -> None:
        # Under the lock too: the relay's metric values take no lock of their own (they are
        # updated on the loop's thread, relay.metrics.LoopValue), and this one is the exception.
        with self._lock:
            self.dropped += count
            if self._on_dropped is not None:
                self._on_dropped(count)

    # -- context -------------------------------------------------------------------------------
    def extract(self, carrier: Mapping[str, str]) -> Context:
        """The caller's trace context (an empty one, so a new trace, when absent or invalid)."""
        return self._propagator.extract(carrier)

    def inject(self, span: Span) -> dict[str, str]:
        """``traceparent`` (and ``tracestate``) naming ``span`` as the next hop's parent."""
        from opentelemetry.trace import set_span_in_context

        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=set_span_in_context(span))
        return carrier

    # -- spans ---------------------------------------------------------------------------------
    def start_server_span(self, name: str, carrier: Mapping[str, str],
                          attributes: Mapping[str, Any]) -> Span:
        from opentelemetry.trace import SpanKind

        return self.tracer.start_span(name, context=self.extract(carrier), kind=SpanKind.SERVER,
                                      attributes=dict(attributes))

    def start_client_span(self, name: str, carrier: Mapping[str, str],
                          attributes: Mapping[str, Any]) -> Span:
        from opentelemetry.trace import SpanKind

        return self.tracer.start_span(name, context=self.extract(carrier), kind=SpanKind.CLIENT,
                                      attributes=dict(attributes))

    @staticmethod
    def end_span(span: Span, status: int | None, error: str | None = None) -> None:
        from opentelemetry.trace import Status, StatusCode

        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if error is not None or (status is not None and status >= 500):
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()

    # -- lifetime ------------------------------------------------------------------------------
    async def shutdown(self, timeout_s: float | None = None) -> None:
        """Flush what is queued and stop the exporter, waiting at most ``timeout_s`` (the
        settings' ``shutdown_timeout_s`` when None).

        The SDK's shutdown blocks on a last export; a hanging collector must not hold the
        process, so it runs in a daemon thread that is abandoned at the deadline.
        """
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def work() -> None:
            try:
                self.provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be gone by now
                    loop.call_soon_threadsafe(finished)

        threading.Thread(target=work, name="otel-shutdown", daemon=True).start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                done, self.settings.shutdown_timeout_s if timeout_s is None else timeout_s)


def build_tracing(config: TracingConfig,
                  on_dropped: Callable[[int], None] | None = None) -> Tracing | None:
    """The relay's tracing from its ``[tracing]`` section; None (nothing loaded) when off."""
    if not config.otlp_endpoint:
        return None
    return Tracing(TracingSettings(
        endpoint=config.otlp_endpoint, service_name=config.service_name,
        sample_ratio=config.sample_ratio, max_queue_size=config.max_queue_size,
        max_export_batch_size=config.max_export_batch_size,
        schedule_delay_s=config.schedule_delay_s, export_timeout_s=config.export_timeout_s,
        shutdown_timeout_s=config.shutdown_timeout_s,
    ), on_dropped)
