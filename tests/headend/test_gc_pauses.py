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


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_the_freezer_freezes_what_survives_a_young_collection() -> None:
    import asyncio

    freezer = gc_pauses.GcFreezer(asyncio.get_running_loop(), check_s=3600)
    freezer.start()
    try:
        gc.unfreeze()
        kept = [_Cycle() for _ in range(1000)]
        gc.collect(1)
        await asyncio.sleep(0)  # the freeze runs on the loop, after the collection
        assert freezer.freezes >= 1
        assert gc.get_freeze_count() >= len(kept)
        assert not any(gc.is_tracked(c) and c in gc.get_objects(2) for c in kept[:3])
    finally:
        freezer.stop()
        gc.unfreeze()


async def test_a_compaction_frees_cycles_that_died_frozen_once_the_frozen_heap_doubled() -> None:
    import asyncio
    import weakref

    freezer = gc_pauses.GcFreezer(asyncio.get_running_loop(), growth=2.0, check_s=3600, min_s=0)
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    freezer.kept = gc.get_freeze_count()
    try:
        dead = [_Cycle() for _ in range(freezer.kept + 1000)]
        probe = weakref.ref(dead[0])
        gc.freeze()
        frozen = gc.get_freeze_count()
        del dead
        gc.collect()
        assert probe() is not None, "frozen: a full collection does not free it"
        assert freezer.check(), "the frozen objects more than doubled"
        assert probe() is None
        assert freezer.compactions == 1
        assert freezer.kept < frozen / 2, "the dead cycles are no longer kept"
        assert not freezer.check(), "nothing grew since"
        more = [_Cycle() for _ in range(2 * freezer.kept)]
        gc.freeze()
        assert freezer.check(), "doubled again"
        del more
    finally:
        gc.unfreeze()


def test_gc_freeze_is_on_unless_turned_off_and_a_bad_value_is_named() -> None:
    import pytest

    from der_sdk.errors import DerSdkError

    assert gc_pauses.freeze_setting({}) is True
    assert gc_pauses.freeze_setting({"GC_FREEZE": "off"}) is False
    assert gc_pauses.freeze_setting({"GC_FREEZE": " ON "}) is True
    with pytest.raises(DerSdkError, match="GC_FREEZE='sometimes' must be on or off"):
        gc_pauses.freeze_setting({"GC_FREEZE": "sometimes"})


async def test_no_compaction_within_the_minimum_interval_or_when_turned_off() -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    gc.unfreeze()
    try:
        soon = gc_pauses.GcFreezer(loop, growth=2.0, check_s=3600, min_s=3600)
        never = gc_pauses.GcFreezer(loop, growth=0, check_s=3600, min_s=0)
        soon.kept = never.kept = 1
        grown = [_Cycle() for _ in range(1000)]
        gc.freeze()
        assert not soon.check() and soon.compactions == 0
        assert not never.check() and never.compactions == 0
        del grown
    finally:
        gc.unfreeze()


def test_gc_compact_growth_is_a_factor_or_zero_and_a_bad_value_is_named() -> None:
    import pytest

    from der_sdk.errors import DerSdkError

    assert gc_pauses.compact_growth_setting({}) == gc_pauses.COMPACT_GROWTH
    assert gc_pauses.compact_growth_setting({"GC_COMPACT_GROWTH": "0"}) == 0
    assert gc_pauses.compact_growth_setting({"GC_COMPACT_GROWTH": "4"}) == 4.0
    for bad in ("1", "lots", "inf", "-2"):
        with pytest.raises(DerSdkError, match=f"GC_COMPACT_GROWTH={bad!r} must be 0"):
            gc_pauses.compact_growth_setting({"GC_COMPACT_GROWTH": bad})
