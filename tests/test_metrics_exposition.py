"""``GET /metrics`` on a live relay: the relay's own series, process health, no ``_created``."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.harness import stack


async def test_metrics_serve_process_health_and_renamed_byte_counter(tmp_path: Path) -> None:
    async with stack(tmp_path) as s:
        async with s.client.post(s.url("/echo"), data=b"x" * 1000, headers=s.auth()) as resp:
            assert resp.status == 200
            assert len(await resp.read()) == 1000
        async with s.client.get(f"{s.relay.url}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    samples = {
        sample.name: sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    # Memory and descriptors of the relay process itself.
    assert samples["process_resident_memory_bytes"].value > 1 << 20
    assert samples["process_open_fds"].value >= 3
    assert samples["process_max_fds"].value >= samples["process_open_fds"].value
    assert "python_info" in samples
    # The byte counter under its new name, counting the echo both ways.
    names = {sample.name for family in text_string_to_metric_families(text)
             for sample in family.samples}
    assert "relay_bytes_proxied_total" not in names
    by_direction = {
        sample.labels["direction"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples if sample.name == "relay_proxied_bytes_total"
    }
    assert by_direction["to_host"] >= 1000 and by_direction["to_client"] >= 1000
    # No _created twin beside any counter or histogram.
    assert not [name for name in names if name.endswith("_created")]
    assert "_created" not in text


def test_metric_values_count_without_a_lock_and_render_as_before() -> None:
    from relay.metrics import LoopValue, Metrics

    metrics = Metrics()
    assert type(metrics.bytes_to_host._value) is LoopValue  # what every increment updates
    metrics.bytes_to_host.inc(5)
    metrics.bytes_to_host.inc(7)
    metrics.http_streams.inc()
    metrics.http_streams.inc()
    metrics.http_streams.dec()
    metrics.http_request_duration_seconds.observe(0.003)
    metrics.http_request_duration_seconds.observe(50)
    metrics.requests_with_status(404).inc()
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in families.values() for s in family.samples}
    assert samples[("relay_proxied_bytes_total", (("direction", "to_host"),))] == 12
    assert samples[("relay_streams_active", (("kind", "http"),))] == 1
    assert samples[("relay_http_request_duration_seconds_count", ())] == 2
    assert samples[("relay_http_request_duration_seconds_sum", ())] == 50.003
    assert samples[("relay_http_request_duration_seconds_bucket", (("le", "0.005"),))] == 1
    assert samples[("relay_http_request_duration_seconds_bucket", (("le", "+Inf"),))] == 2
    assert samples[("relay_http_requests_total", (("status", "404"),))] == 1
