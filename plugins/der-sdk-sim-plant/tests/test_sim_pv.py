"""sim-pv: the sun, clouds, module temperature, curtailment to an export limit, trips."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from der_sdk_sim_plant import INVERTER_TRIP, SimPvAdapter
from der_sdk_sim_plant.solar import clear_sky_ghi_wm2, solar_elevation_deg
from plant_kit import PV, SOLSTICE_NOON, build

from der_sdk.asset_types import PvDetails, validate_details
from der_sdk.extensions import AssetType

PV_TYPE = AssetType(name="pv", details=PvDetails)
CLEAR = {"cloud_cover": 0.0, "trip_rate_per_h": 0.0}


# --------------------------------------------------------------------------- the sun


def test_the_sun_is_highest_at_solar_noon_and_below_the_horizon_at_midnight() -> None:
    # Latitude 45 N at the June solstice: 90 - 45 + 23.44 = 68.4 degrees at noon.
    noon = solar_elevation_deg(SOLSTICE_NOON, 45.0, 0.0)
    assert noon == pytest.approx(68.4, abs=0.6)
    assert solar_elevation_deg(datetime(2026, 6, 21, 0, 0, tzinfo=UTC), 45.0, 0.0) < -15
    # December: the sun stays low (90 - 45 - 23.44 = 21.6).
    assert solar_elevation_deg(datetime(2026, 12, 21, 12, 0, tzinfo=UTC), 45.0, 0.0) == (
        pytest.approx(21.6, abs=1.0)
    )


def test_solar_noon_moves_with_longitude() -> None:
    # 90 degrees east: the sun culminates 6 hours before noon UTC.
    east_morning = solar_elevation_deg(datetime(2026, 6, 21, 6, 0, tzinfo=UTC), 45.0, 90.0)
    assert east_morning == pytest.approx(solar_elevation_deg(SOLSTICE_NOON, 45.0, 0.0), abs=0.1)


def test_clear_sky_irradiance_is_zero_at_night_and_rises_with_the_sun() -> None:
    assert clear_sky_ghi_wm2(-5.0) == 0.0
    assert 0 < clear_sky_ghi_wm2(10.0) < clear_sky_ghi_wm2(40.0) < clear_sky_ghi_wm2(80.0)
    assert clear_sky_ghi_wm2(90.0) == pytest.approx(1098 * 2.718281828 ** (-0.057), rel=1e-6)


# --------------------------------------------------------------------------- the plant


async def test_a_clear_day_follows_the_sun_from_sleep_to_clipping_at_noon() -> None:
    adapter, clock, _ = build(SimPvAdapter, PV, {**CLEAR, "latitude": 45.0, "longitude": 0.0})
    await adapter.connect()
    powers = {}
    for hour in (0, 6, 9, 12, 15, 21):
        clock.wall = SOLSTICE_NOON.replace(hour=hour)
        clock.advance(60)
        sample = await adapter.read()
        powers[hour] = sample.mw
        assert 0.0 <= sample.mw <= PV.max_mw
        assert sample.details["available_mw"] == sample.mw  # no limit: nothing curtailed
    assert powers[0] == powers[21] == 0.0
    assert 0 < powers[6] < powers[9] < powers[12]
    assert powers[12] == PV.max_mw  # 1.2 DC/AC: the inverter clips at noon in June
    assert powers[9] == pytest.approx(powers[15], rel=0.05)  # near-symmetric about noon


async def test_night_reads_sleeping_with_zero_irradiance() -> None:
    adapter, clock, _ = build(SimPvAdapter, PV, CLEAR)
    clock.wall = SOLSTICE_NOON.replace(hour=23)
    await adapter.connect()
    sample = await adapter.read()
    assert (sample.mw, sample.status) == (0.0, "sleeping")
    assert sample.details["irradiance_wm2"] == 0.0
    assert sample.details["module_temp_c"] == 20.0  # ambient


async def test_module_temperature_rises_with_irradiance_and_costs_power() -> None:
    cool, _, _ = build(SimPvAdapter, PV, {**CLEAR, "dc_ac_ratio": 0.5, "ambient_temp_c": 0})
    hot, _, _ = build(SimPvAdapter, PV, {**CLEAR, "dc_ac_ratio": 0.5, "ambient_temp_c": 35})
    await cool.connect()
    await hot.connect()
    a, b = await cool.read(), await hot.read()
    irradiance = a.details["irradiance_wm2"]
    assert a.details["module_temp_c"] == pytest.approx(0 + 25 / 800 * irradiance, abs=1e-3)
    assert b.details["module_temp_c"] == pytest.approx(35 + 25 / 800 * irradiance, abs=1e-3)
    # -0.4 %/K: 35 K warmer costs 14 % of the power
    assert b.mw == pytest.approx(a.mw * (1 - 0.004 * 35) / (1 - 0.004 * 0), rel=0.01)
    assert a.details["dc_mw"] == pytest.approx(a.mw / 0.97, abs=1e-5)


async def test_an_export_limit_curtails_and_says_so() -> None:
    adapter, clock, _ = build(SimPvAdapter, PV, CLEAR)
    await adapter.connect()
    result = await adapter.apply_setpoint(0.5)
    assert (result.status, result.applied_mw, result.reason) == ("applied", 0.5, None)
    clock.advance(1)
    sample = await adapter.read()
    available = sample.details["available_mw"]
    assert available == PV.max_mw
    assert sample.mw == 0.5
    assert sample.mw_setpoint == 0.5
    assert sample.status == sample.details["inverter_state"] == "curtailed"
    assert sample.details["curtailed_mw"] == pytest.approx(available - 0.5)
    assert sample.details["curtailment_reason"] == "export limit 0.5 MW"
    assert sample.details["export_limit_mw"] == 0.5


async def test_a_limit_above_what_the_sun_gives_curtails_nothing() -> None:
    adapter, clock, _ = build(SimPvAdapter, PV, CLEAR)
    clock.wall = SOLSTICE_NOON.replace(hour=7)
    await adapter.connect()
    await adapter.apply_setpoint(1.9)
    sample = await adapter.read()
    assert 0 < sample.mw < 1.9
    assert sample.mw == sample.details["available_mw"]
    assert sample.details["curtailed_mw"] == 0.0
    assert sample.details["curtailment_reason"] is None
    assert sample.status == "mppt"


async def test_a_negative_export_limit_is_rejected_and_one_above_max_is_capped() -> None:
    adapter, _, _ = build(SimPvAdapter, PV, CLEAR)
    await adapter.connect()
    rejected = await adapter.apply_setpoint(-0.5)
    assert rejected.status == "rejected"
    assert rejected.reason == (
        "sim-pv takes an export limit of 0 MW or more (a generator cannot consume); got -0.5 MW"
    )
    capped = await adapter.apply_setpoint(5.0)
    assert (capped.status, capped.applied_mw) == ("applied", 2.0)
    assert capped.reason == "export limit capped at the asset's max_mw 2 MW"


async def test_a_timed_limit_lifts_when_its_duration_ends() -> None:
    adapter, clock, _ = build(SimPvAdapter, PV, CLEAR)
    await adapter.connect()
    await adapter.apply_setpoint(0.0, duration_s=30)
    clock.advance(10)
    assert (await adapter.read()).mw == 0.0
    clock.advance(30)
    sample = await adapter.read()
    assert sample.mw == PV.max_mw
    assert sample.details["export_limit_mw"] is None
    assert sample.mw_setpoint is None


async def test_clouds_pass_and_the_same_seed_gives_the_same_day() -> None:
    options = {"seed": 11, "cloud_cover": 0.5, "cloud_passage_s": 60, "trip_rate_per_h": 0}
    runs = []
    for _ in range(2):
        adapter, clock, _ = build(SimPvAdapter, PV, options)
        await adapter.connect()
        readings = []
        for _ in range(60):
            clock.advance(20)
            readings.append((await adapter.read()).details["irradiance_wm2"])
        runs.append(readings)
    assert runs[0] == runs[1]
    clear_sky = clear_sky_ghi_wm2(solar_elevation_deg(SOLSTICE_NOON, 45.0, 0.0))
    assert min(runs[0]) < 0.8 * clear_sky  # a cloud passed
    assert max(runs[0]) > 0.95 * clear_sky  # and the sun came out again
    assert max(runs[0]) <= clear_sky + 1e-6

    other, clock, _ = build(SimPvAdapter, PV, {**options, "seed": 12})
    await other.connect()
    different = []
    for _ in range(60):
        clock.advance(20)
        different.append((await other.read()).details["irradiance_wm2"])
    assert different != runs[0]


async def test_polling_often_or_rarely_gives_the_same_plant() -> None:
    options = {"seed": 5, "cloud_cover": 0.4, "trip_rate_per_h": 0}
    often, clock_a, _ = build(SimPvAdapter, PV, options)
    rarely, clock_b, _ = build(SimPvAdapter, PV, options)
    await often.connect()
    await rarely.connect()
    for _ in range(600):
        clock_a.advance(0.5)
        await often.read()
    clock_b.advance(300)
    assert (await often.read()).details == (await rarely.read()).details


async def test_details_are_valid_pv_details() -> None:
    adapter, _, _ = build(SimPvAdapter, PV, {"seed": 1})
    await adapter.connect()
    await adapter.apply_setpoint(1.0)
    details = (await adapter.read()).details
    checked, problems = validate_details(PV_TYPE, details)
    assert problems == []
    for field in (
        "irradiance_wm2",
        "module_temp_c",
        "ac_mw",
        "dc_mw",
        "inverter_state",
        "curtailed_mw",
        "curtailment_reason",
        "export_limit_mw",
        "available_mw",
    ):
        assert field in checked


async def test_the_latitude_comes_from_the_options_else_the_asset() -> None:
    north, _, _ = build(SimPvAdapter, PV, {**CLEAR, "latitude": 60.0})
    assert north.model.latitude == 60.0
    default, _, _ = build(SimPvAdapter, PV, CLEAR)
    assert (default.model.latitude, default.model.longitude) == (45.0, 0.0)


# --------------------------------------------------------------------------- trips


async def test_an_inverter_trip_stops_output_raises_a_condition_and_clears_it() -> None:
    adapter, clock, conditions = build(
        SimPvAdapter, PV, {**CLEAR, "trip_rate_per_h": 3600, "trip_duration_s": 30}
    )
    await adapter.connect()
    clock.advance(1)  # certain: one trip per second of rate
    sample = await adapter.read()
    assert (sample.mw, sample.status) == (0.0, "tripped")
    assert sample.details["available_mw"] == 0.0
    assert conditions.active == {INVERTER_TRIP: "major"}
    clock.advance(29)
    assert (await adapter.read()).status == "tripped"
    clock.advance(1)
    assert (await adapter.read()).status != "tripped"  # restarted after 30 s
    changes = conditions.drain()
    assert [(c.kind, c.code, c.severity) for c in changes] == [
        ("condition_raised", INVERTER_TRIP, "major"),
        ("condition_cleared", INVERTER_TRIP, "major"),
    ]
    assert changes[0].text == "inverter tripped; restarting in 30 s"
    assert changes[1].text == "inverter restarted after its trip"
    assert conditions.active == {}


async def test_no_trips_at_a_rate_of_zero() -> None:
    adapter, clock, conditions = build(SimPvAdapter, PV, {"seed": 3, "trip_rate_per_h": 0})
    await adapter.connect()
    clock.advance(3600)
    assert (await adapter.read()).status != "tripped"
    assert conditions.drain() == []


async def test_a_trip_ends_during_a_long_pause() -> None:
    # A 4-hour trip, then 5 hours away: the 4 hours skipped (not simulated) end it.
    adapter, clock, conditions = build(
        SimPvAdapter, PV, {**CLEAR, "trip_rate_per_h": 3600, "trip_duration_s": 4 * 3600}
    )
    await adapter.connect()
    clock.advance(1)
    assert (await adapter.read()).status == "tripped"
    await adapter.close()
    adapter.model.trip.rate_per_h = 0  # no new trip after this one
    clock.advance(5 * 3600)  # the agent was stopped for five hours
    await adapter.connect()
    assert (await adapter.read()).status == "mppt"
    assert [c.kind for c in conditions.drain()] == ["condition_raised", "condition_cleared"]


async def test_a_fixed_solar_hour_gives_daylight_at_night() -> None:
    adapter, clock, _ = build(SimPvAdapter, PV, {**CLEAR, "solar_hour_utc": 12.0})
    clock.wall = SOLSTICE_NOON.replace(hour=2)  # night by the clock
    await adapter.connect()
    await adapter.apply_setpoint(0.5)
    sample = await adapter.read()
    assert sample.ts == clock.wall  # samples keep the real time
    assert sample.details["solar_elevation_deg"] == pytest.approx(
        solar_elevation_deg(SOLSTICE_NOON, 45.0, 0.0), abs=1e-3
    )
    assert (sample.mw, sample.details["curtailed_mw"]) == (0.5, 1.5)
