"""The SDK side of tracing: export in the background, count every span that is dropped.

Imported only when tracing is configured (see :mod:`relay.tracing`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult


class CountingExporter(SpanExporter):
    """An exporter counting the spans of every export that did not succeed (timeouts too)."""

    def __init__(self, inner: SpanExporter, on_dropped: Callable[[int], None]) -> None:
        self._inner = inner
        self._on_dropped = on_dropped

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._on_dropped(len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class CountingBatchProcessor(BatchSpanProcessor):
    """``BatchSpanProcessor`` counting what its bounded queue drops.

    The SDK's queue is a ``deque(maxlen=...)`` that evicts its oldest span, with no callback,
    when a span arrives while it is full: every such arrival is one dropped span.
    """

    def __init__(self, exporter: SpanExporter, on_dropped: Callable[[int], None],
                 **kwargs: Any) -> None:
        super().__init__(exporter, **kwargs)
        self._on_dropped = on_dropped
        self._capacity = int(kwargs["max_queue_size"])
        # A private attribute of the SDK; tests/test_tracing.py's drop test fails if it moves.
        self._queue = getattr(self._batch_processor, "_queue", None)

    def on_end(self, span: ReadableSpan) -> None:
        queue = self._queue
        if (queue is not None and len(queue) >= self._capacity
                and span.context is not None and span.context.trace_flags.sampled):
            self._on_dropped(1)
        super().on_end(span)
