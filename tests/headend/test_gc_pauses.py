"""The cycle collector's pauses, timed by the headend and shown on ``/metrics``."""

from __future__ import annotations

import gc

import httpx
from prometheus_client.parser import text_string_to_metric_families

from der_sdk_headend import gc_pauses
from der_sdk_headend.gc_pauses import GcPauses


def test_a_full_collection_is_counted_and_timed_for_generation_two() -> None:
    monitor = GcPauses()
    monitor.start()
    try:
        gc.collect()
        gc.collect()
    finally:
        monitor.stop()
    full = monitor.stats()[2]
    assert full.generation == 2
    assert full.collections >= 2
    assert full.max_s > 0 and full.seconds_total >= full.max_s
    assert 0 < full.p99_s <= full.max_s
    assert full.cpu_max_s >= 0
    gc.collect()
    assert monitor.stats()[2].collections == full.collections, "stopped: no longer counted"


async def test_metrics_show_the_pauses_per_generation_once_installed(
    http: httpx.AsyncClient,
) -> None:
    gc_pauses.install()
    gc_pauses.full_collection()
    text = (await http.get("/metrics")).text
    samples = {
        (s.name, s.labels.get("generation")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("der_gc_pauses_total", "2")] >= 1
    assert samples[("der_gc_pause_max_seconds", "2")] > 0
    assert ("der_gc_pause_p99_seconds", "0") in samples
    assert ("der_gc_pause_cpu_max_seconds", "1") in samples
