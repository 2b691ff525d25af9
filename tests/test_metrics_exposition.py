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
