"""sim-wind: the wind walk, the power curve, the over-speed stop, curtailment."""

from __future__ import annotations

import msgspec
import pytest
from der_sdk_sim_plant import OVERSPEED_STOP, SimWindAdapter, SimWindOptions, power_curve
from plant_kit import WIND, build

from der_sdk.asset_types import WindDetails, validate_details
from der_sdk.extensions import AssetType

WIND_TYPE = AssetType(name="wind", details=WindDetails)
CALM_WALK = {"turbulence_ms": 0.0}
"""No gusts: the wind stays at its start, or drifts back to its mean."""


def test_the_power_curve_rises_with_the_cube_to_rated_and_drops_at_cut_out() -> None:
    o = SimWindOptions()  # cut-in 3, rated 12, cut-out 25
    assert power_curve(2.9, 3.0, o) == 0.0
    assert power_curve(3.0, 3.0, o) == 0.0
    half_way = (7.5**3 - 27) / (12**3 - 27)
    assert power_curve(7.5, 3.0, o) == pytest.approx(3.0 * half_way)
    assert power_curve(12.0, 3.0, o) == 3.0
    assert power_curve(24.9, 3.0, o) == 3.0
    assert power_curve(25.0, 3.0, o) == 0.0
    speeds = [x / 10 for x in range(0, 400)]
    powers = [power_curve(v, 3.0, o) for v in speeds]
    assert all(0.0 <= p <= 3.0 for p in powers)
    below_rated = [p for v, p in zip(speeds, powers, strict=True) if v < 12]
    assert below_rated == sorted(below_rated)


def test_options_refuse_speeds_out_of_order() -> None:
    with pytest.raises(msgspec.ValidationError, match="cut_in_ms < rated_ms < cut_out_ms"):
        msgspec.convert({"rated_ms": 30}, SimWindOptions)
    with pytest.raises(msgspec.ValidationError, match="restart_ms"):
        msgspec.convert({"restart_ms": 26}, SimWindOptions)
    with pytest.raises(msgspec.ValidationError, match="unknown field `cutout`"):
        msgspec.convert({"cutout": 20}, SimWindOptions)


async def test_power_follows_the_curve_times_availability() -> None:
    adapter, clock, _ = build(
        SimWindAdapter,
        WIND,
        {**CALM_WALK, "initial_wind_ms": 8, "mean_wind_ms": 8, "availability_pct": 50},
    )
    await adapter.connect()
    clock.advance(5)
    sample = await adapter.read()
    expected = power_curve(8.0, WIND.max_mw, SimWindOptions()) * 0.5
    assert sample.mw == pytest.approx(expected, abs=1e-6)
    assert sample.details["available_mw"] == pytest.approx(expected, abs=1e-6)
    assert sample.details["availability_pct"] == 50
    assert sample.status == sample.details["turbine_state"] == "running"
    assert 0 < sample.details["turbine_rpm"] < 15


async def test_below_cut_in_it_waits_for_wind() -> None:
    adapter, _, _ = build(SimWindAdapter, WIND, {**CALM_WALK, "initial_wind_ms": 2})
    await adapter.connect()
    sample = await adapter.read()
    assert (sample.mw, sample.status, sample.details["turbine_rpm"]) == (
        0.0,
        "waiting_for_wind",
        0.0,
    )


async def test_the_wind_walk_is_bounded_and_repeatable_for_a_seed() -> None:
    options = {"seed": 21, "turbulence_ms": 2.0, "max_wind_ms": 20.0, "cut_out_ms": 19.0}
    runs = []
    for _ in range(2):
        adapter, clock, _ = build(SimWindAdapter, WIND, options)
        await adapter.connect()
        speeds = []
        for _ in range(300):
            clock.advance(10)
            sample = await adapter.read()
            speeds.append(sample.details["wind_speed_ms"])
            assert 0.0 <= sample.mw <= WIND.max_mw
        runs.append(speeds)
    assert runs[0] == runs[1]
    assert all(0.0 <= v <= 20.0 for v in runs[0])
    assert len(set(runs[0])) > 100  # it moves


async def test_above_cut_out_the_turbine_stops_raises_a_condition_and_restarts_below() -> None:
    adapter, clock, conditions = build(
        SimWindAdapter,
        WIND,
        {**CALM_WALK, "initial_wind_ms": 26, "mean_wind_ms": 10, "reversion_s": 10},
    )
    await adapter.connect()
    stopped = await adapter.read()
    assert (stopped.mw, stopped.status) == (0.0, "stopped_high_wind")
    assert stopped.details["pitch_deg"] == 90.0  # feathered
    assert stopped.details["available_mw"] == 0.0
    assert conditions.active == {OVERSPEED_STOP: "warning"}
    # 26 m/s decays toward 10 with a 10 s time constant: below 22 (cut-out - 3) in ~3 s.
    clock.advance(60)
    running = await adapter.read()
    assert running.status == "running"
    wind = running.details["wind_speed_ms"]
    assert 10.0 < wind < 12.0  # back near its mean, below rated
    assert running.mw == pytest.approx(power_curve(wind, WIND.max_mw, SimWindOptions()), abs=1e-3)
    changes = conditions.drain()
    assert [(c.kind, c.code) for c in changes] == [
        ("condition_raised", OVERSPEED_STOP),
        ("condition_cleared", OVERSPEED_STOP),
    ]
    assert changes[0].text == "wind 26.0 m/s at or above cut-out 25 m/s: turbine stopped"


async def test_an_export_limit_curtails_by_pitching_and_says_so() -> None:
    adapter, clock, _ = build(
        SimWindAdapter, WIND, {**CALM_WALK, "initial_wind_ms": 14, "mean_wind_ms": 14}
    )
    await adapter.connect()
    free = await adapter.read()
    result = await adapter.apply_setpoint(1.2)
    assert (result.status, result.applied_mw) == ("applied", 1.2)
    clock.advance(1)
    limited = await adapter.read()
    assert free.mw == WIND.max_mw
    assert limited.mw == 1.2
    assert limited.mw_setpoint == 1.2
    assert limited.status == "curtailed"
    assert limited.details["curtailed_mw"] == pytest.approx(1.8)
    assert limited.details["curtailment_reason"] == "export limit 1.2 MW"
    assert limited.details["export_limit_mw"] == 1.2
    assert limited.details["pitch_deg"] > free.details["pitch_deg"]
    rejected = await adapter.apply_setpoint(-1.0)
    assert rejected.status == "rejected"
    assert "sim-wind takes an export limit of 0 MW or more" in (rejected.reason or "")


async def test_details_are_valid_wind_details() -> None:
    adapter, _, _ = build(SimWindAdapter, WIND, {"seed": 1})
    await adapter.connect()
    details = (await adapter.read()).details
    checked, problems = validate_details(WIND_TYPE, details)
    assert problems == []
    for field in (
        "wind_speed_ms",
        "turbine_rpm",
        "pitch_deg",
        "availability_pct",
        "turbine_state",
        "curtailed_mw",
        "export_limit_mw",
        "available_mw",
    ):
        assert field in checked
