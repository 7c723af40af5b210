"""The sampler's reads of every adapter in one tick (``read_all``): one timer for the tick,
yet each adapter's read still ends after its own timeout with a bad sample naming it; and
the collector settings ``der agent`` applies once started."""

from __future__ import annotations

import asyncio
import gc
import math
from typing import Any

import pytest

from der_sdk.extensions import Adapter, SetpointResult
from der_sdk.models import Asset, TelemetrySample, utc_now
from der_sdk_agent.adapters import RECONNECT_AFTER_FAILED_READS, AdapterRuntime, read_all
from der_sdk_agent.launch import GC_GEN0_THRESHOLD, tune_gc

SITE = "6f1c2b1e-3d4a-4c5b-8e9f-0a1b2c3d4e5f"
TIMEOUT_S = 0.2


class Device(Adapter):
    """Reads take ``read_s`` (forever when ``None``); setpoints take ``apply_s``."""

    def __init__(
        self,
        name: str,
        read_s: float | None = 0.0,
        apply_s: float = 0.0,
        fields: dict[str, Any] | None = None,
    ) -> None:
        self.asset = Asset(asset_id=name, site_id=SITE, name=name, min_mw=-1.0, max_mw=1.0)
        self.read_s = read_s
        self.fields: dict[str, Any] = {"mw": 0.5, **(fields or {})}
        self.apply_s = apply_s
        self.reads_cancelled = 0
        self.cancelled_at = 0.0  # loop time of the last read cancelled
        self.closes = 0

    async def connect(self) -> None:
        pass

    async def read(self) -> TelemetrySample:
        try:
            if self.read_s is None:
                await asyncio.Event().wait()
            elif self.read_s:
                await asyncio.sleep(self.read_s)
        except asyncio.CancelledError:
            self.reads_cancelled += 1
            self.cancelled_at = asyncio.get_running_loop().time()
            raise
        return TelemetrySample(
            asset_id=self.asset.asset_id, site_id=SITE, ts=utc_now(), online=True, **self.fields
        )

    async def apply_setpoint(self, mw: float, duration_s: float | None = None) -> SetpointResult:
        await asyncio.sleep(self.apply_s)
        return SetpointResult(status="applied", applied_mw=mw)

    async def close(self) -> None:
        self.closes += 1


def _runtime(device: Device, timeout_s: float = TIMEOUT_S) -> AdapterRuntime:
    return AdapterRuntime(
        asset=device.asset,
        adapter=device,
        adapter_name=device.asset.name,
        package="tests",
        timeout_s=timeout_s,
    )


async def test_a_hung_adapter_gives_a_bad_sample_naming_it_and_the_others_read_well() -> None:
    devices = [Device("fast"), Device("hung", read_s=None), Device("slowish", read_s=0.05)]
    loop = asyncio.get_running_loop()
    began = loop.time()
    samples = await read_all([_runtime(d) for d in devices])
    took = loop.time() - began
    assert [s.asset_id for s in samples] == ["fast", "hung", "slowish"]
    assert [s.quality for s in samples] == ["good", "bad", "good"]
    hung = samples[1]
    assert not hung.online and hung.mw == 0.0
    assert hung.quality_reason == (
        f"adapter 'hung' (tests) failed to read: timed out after {TIMEOUT_S:g} s"
    )
    assert devices[1].reads_cancelled == 1
    assert TIMEOUT_S <= took < TIMEOUT_S + 0.5


async def test_reads_with_different_timeouts_each_end_after_their_own() -> None:
    short, long = Device("short", read_s=None), Device("long", read_s=None)
    loop = asyncio.get_running_loop()
    began = loop.time()
    # one tick with both (the agent gives every adapter the same timeout; a mix still works)
    samples = await read_all([_runtime(short, 0.1), _runtime(long, 0.4)])
    took = loop.time() - began
    assert [s.quality for s in samples] == ["bad", "bad"]
    assert "timed out after 0.1 s" in (samples[0].quality_reason or "")
    assert "timed out after 0.4 s" in (samples[1].quality_reason or "")
    assert 0.39 <= took < 0.9
    assert (short.reads_cancelled, long.reads_cancelled) == (1, 1)
    assert short.cancelled_at - began < 0.3  # not held until the longer timeout
    assert long.cancelled_at - began >= 0.39


async def test_a_read_that_waited_for_a_setpoint_still_gets_its_whole_timeout() -> None:
    # the setpoint holds the adapter for 0.15 s, then the read takes 0.15 s: later than
    # the tick's timer, within the read's own timeout
    device = Device("busy", read_s=0.15, apply_s=0.15)
    runtime = _runtime(device)
    setpoint = asyncio.create_task(runtime.apply_setpoint(0.5))
    await asyncio.sleep(0)  # the setpoint holds the adapter first
    (sample,) = await read_all([runtime])
    assert (await setpoint).status == "applied"
    assert sample.quality == "good", sample.quality_reason
    assert device.reads_cancelled == 0


@pytest.mark.parametrize(
    "apply_s",
    [0.1, TIMEOUT_S + 0.1],
    ids=["read-starts-before-the-tick-timer", "read-starts-after-the-tick-timer"],
)
async def test_a_hung_read_that_started_late_is_stopped_after_its_own_timeout(
    apply_s: float,
) -> None:
    device = Device("stuck-after-setpoint", read_s=None, apply_s=apply_s)
    runtime = _runtime(device)
    loop = asyncio.get_running_loop()
    began = loop.time()
    setpoint = asyncio.create_task(runtime.apply_setpoint(0.5))
    await asyncio.sleep(0)
    (sample,) = await read_all([runtime])
    took = loop.time() - began
    await setpoint
    assert sample.quality == "bad"
    assert "timed out after" in (sample.quality_reason or "")
    assert device.reads_cancelled == 1
    assert apply_s + TIMEOUT_S - 0.01 <= took < apply_s + TIMEOUT_S + 0.5


async def test_reads_that_time_out_tick_after_tick_close_the_adapter_to_reconnect() -> None:
    device = Device("hung", read_s=None)
    runtime = _runtime(device)
    for _ in range(RECONNECT_AFTER_FAILED_READS):
        (sample,) = await read_all([runtime])
        assert sample.quality == "bad"
    assert device.closes == 1
    assert not runtime.connected


async def test_cancelling_the_tick_cancels_every_read_and_is_not_a_timeout() -> None:
    devices = [Device("hung-1", read_s=None), Device("hung-2", read_s=None)]
    runtimes = [_runtime(d) for d in devices]
    tick = asyncio.create_task(read_all(runtimes))
    await asyncio.sleep(0.05)
    tick.cancel()
    done, _ = await asyncio.wait({tick}, timeout=1.0)
    assert done and tick.cancelled()
    assert [d.reads_cancelled for d in devices] == [1, 1]
    assert all(rt.latest is None for rt in runtimes)  # no timeout sample was made


class Polling(Device):
    """Has a sample ready now (``read_nowait``) while ``ready``; else ``read()`` as
    :class:`Device`; ``read_nowait`` raises ``broken`` when set."""

    def __init__(self, name: str, *, ready: bool = True, **options: Any) -> None:
        super().__init__(name, **options)
        self.ready = ready
        self.broken: Exception | None = None
        self.reads = 0

    async def read(self) -> TelemetrySample:
        self.reads += 1
        return await super().read()

    def read_nowait(self) -> TelemetrySample | None:
        if self.broken is not None:
            raise self.broken
        if not self.ready:
            return None
        return TelemetrySample(
            asset_id="as-the-device-calls-it", site_id=SITE, ts=utc_now(), online=True, mw=0.25
        )


async def test_a_sample_the_adapter_has_ready_is_taken_without_awaiting_its_read() -> None:
    ready, waiting, plain = Polling("ready"), Polling("waiting", ready=False), Device("plain")
    runtimes = [_runtime(ready), _runtime(waiting), _runtime(plain)]
    first = await read_all(runtimes)  # connects each: read() then
    assert [s.mw for s in first] == [0.5, 0.5, 0.5] and ready.reads == 1
    samples = await read_all(runtimes)
    assert [s.asset_id for s in samples] == ["ready", "waiting", "plain"]  # the asset's id
    assert [s.mw for s in samples] == [0.25, 0.5, 0.5]
    assert (ready.reads, waiting.reads) == (1, 2)  # connected: ready's sample taken at once


async def test_a_ready_sample_is_not_taken_while_a_setpoint_holds_the_adapter() -> None:
    device = Polling("busy", apply_s=0.1)
    runtime = _runtime(device)
    assert await runtime.connect()
    setpoint = asyncio.create_task(runtime.apply_setpoint(0.5))
    await asyncio.sleep(0)  # the setpoint holds the adapter first
    (sample,) = await read_all([runtime])
    assert setpoint.done() and (await setpoint).status == "applied"  # the read waited
    assert device.reads == 1 and sample.quality == "good"


async def test_a_read_nowait_that_fails_is_logged_and_the_adapter_is_read_instead(
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = Polling("odd")
    device.broken = RuntimeError("not today")
    runtime = _runtime(device)
    assert await runtime.connect()
    (sample,) = await read_all([runtime])
    assert sample.quality == "good" and device.reads == 1
    assert "adapter 'odd' (tests) failed in read_nowait(): RuntimeError: not today" in caplog.text


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"mw": math.nan}, "mw: expected a finite number, got nan"),
        ({"mw_setpoint": math.inf}, "mw_setpoint: expected a finite number, got inf"),
        ({"details": {"soc_pct": -math.inf}}, "details.soc_pct: expected a finite number"),
        ({"details": {"cells": [3.3, math.nan]}}, "details.cells: holds a non-finite number"),
        ({"details": {"a": 1e308, "b": 1e308}}, None),  # their sum overflows; each is finite
        ({"mw": 1, "details": {"n": 10**400, "s": "x", "ok": True}}, None),
    ],
    ids=["mw", "setpoint", "detail", "nested-detail", "finite-but-huge", "ints"],
)
async def test_every_non_finite_number_is_refused_and_only_those(
    fields: dict[str, Any], problem: str | None
) -> None:
    (sample,) = await read_all([_runtime(Device("odd", fields=fields))])
    if problem is None:
        assert sample.quality == "good", sample.quality_reason
        assert sample.details == fields.get("details", {})
    else:
        assert sample.quality == "bad"
        assert problem in (sample.quality_reason or "")


def test_tune_gc_freezes_what_is_held_and_collects_young_objects_less_often() -> None:
    threshold = gc.get_threshold()
    held = [[n] for n in range(1000)]  # what a started agent holds for good
    try:
        tune_gc()
        assert gc.get_freeze_count() >= len(held)
        assert gc.get_threshold()[0] == max(GC_GEN0_THRESHOLD, threshold[0])
        assert gc.get_threshold()[1:] == threshold[1:]
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
