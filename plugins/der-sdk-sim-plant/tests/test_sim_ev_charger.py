"""sim-ev-charger: sessions arriving and leaving, the import limit shared across them,
energy delivered, station faults."""

from __future__ import annotations

import msgspec
import pytest
from der_sdk_sim_plant import (
    CHARGER_FAULT,
    SimEvChargerAdapter,
    SimEvChargerOptions,
    share_import_limit,
)
from der_sdk_sim_plant.ev import ChargingSession
from plant_kit import EV, build

from der_sdk.asset_types import EvChargerDetails, validate_details
from der_sdk.extensions import AssetType

EV_TYPE = AssetType(name="ev_charger", details=EvChargerDetails)
QUIET = {"arrivals_per_h": 0.0, "fault_rate_per_h": 0.0}
"""No arrivals and no faults: only the sessions a test places."""


def test_the_limit_is_shared_equally_and_what_a_slow_car_leaves_goes_to_the_others() -> None:
    assert share_import_limit(0.3, [0.2, 0.2, 0.2]) == pytest.approx([0.1, 0.1, 0.1])
    # The 11 kW car takes its 11; the 289 kW left are shared by the two others.
    assert share_import_limit(0.3, [0.011, 0.15, 0.2]) == pytest.approx([0.011, 0.1445, 0.1445])
    # Enough for everyone: each gets its cap.
    assert share_import_limit(1.0, [0.011, 0.15, 0.2]) == pytest.approx([0.011, 0.15, 0.2])
    assert share_import_limit(0.0, [0.1, 0.1]) == [0.0, 0.0]
    assert share_import_limit(0.5, []) == []


@pytest.mark.parametrize("limit", [0.0, 0.05, 0.2, 0.31, 2.0])
def test_shares_never_exceed_a_cap_and_sum_to_the_limit_or_the_demand(limit: float) -> None:
    caps = [0.007, 0.05, 0.05, 0.15, 0.011]
    shares = share_import_limit(limit, caps)
    assert all(0.0 <= s <= c + 1e-12 for s, c in zip(shares, caps, strict=True))
    assert sum(shares) == pytest.approx(min(limit, sum(caps)))


async def test_the_station_shares_its_import_limit_across_sessions() -> None:
    adapter, clock, _ = build(SimEvChargerAdapter, EV, QUIET)
    model = adapter.model
    model.sessions = [
        ChargingSession(max_mw=0.011, need_mwh=1.0, leaves_at_s=10_000),
        ChargingSession(max_mw=0.15, need_mwh=1.0, leaves_at_s=10_000),
        ChargingSession(max_mw=0.15, need_mwh=1.0, leaves_at_s=10_000),
    ]
    await adapter.connect()
    free = await adapter.read()
    assert free.mw == pytest.approx(-0.3)  # the station's rating (|min_mw|) binds
    assert free.details["demand_mw"] == pytest.approx(0.3)
    assert free.status == "charging"

    result = await adapter.apply_setpoint(-0.1)
    assert (result.status, result.applied_mw) == ("applied", -0.1)
    clock.advance(3600)
    limited = await adapter.read()
    assert limited.mw == pytest.approx(-0.1)
    assert limited.mw_setpoint == pytest.approx(-0.1)
    assert limited.status == limited.details["station_state"] == "limited"
    assert limited.details["import_limit_mw"] == 0.1
    assert limited.details["demand_mw"] == pytest.approx(0.3)
    assert limited.details["max_session_kw"] == pytest.approx(44.5)  # (100 - 11) / 2
    # An hour at 0.1 MW delivered 0.1 MWh, 11 kWh of it to the slow car.
    assert limited.details["energy_delivered_mwh"] == pytest.approx(0.1, rel=1e-6)
    assert model.sessions[0].delivered_mwh == pytest.approx(0.011, rel=1e-6)


async def test_a_full_car_stops_drawing_and_one_that_leaves_frees_its_connector() -> None:
    adapter, clock, _ = build(SimEvChargerAdapter, EV, QUIET)
    adapter.model.sessions = [
        ChargingSession(max_mw=0.05, need_mwh=0.005, leaves_at_s=600),  # full after 6 min
        ChargingSession(max_mw=0.05, need_mwh=1.0, leaves_at_s=1200),
    ]
    await adapter.connect()
    clock.advance(400)
    sample = await adapter.read()
    assert sample.mw == pytest.approx(-0.05)  # only the second car still charges
    assert sample.details["active_sessions"] == 2
    assert sample.details["connectors_available"] == 2
    assert sample.details["energy_delivered_mwh"] == pytest.approx(0.005 + 0.05 * 400 / 3600)
    clock.advance(300)  # the first car has left
    assert (await adapter.read()).details["active_sessions"] == 1
    clock.advance(600)  # and the second
    empty = await adapter.read()
    assert (empty.mw, empty.status, empty.details["active_sessions"]) == (0.0, "idle", 0)
    assert empty.details["connectors_available"] == empty.details["connectors_total"] == 4


async def test_cars_arrive_and_leave_the_same_way_for_a_seed() -> None:
    options = {"seed": 8, "arrivals_per_h": 12.0, "fault_rate_per_h": 0.0, "connectors": 6}
    runs = []
    for _ in range(2):
        adapter, clock, _ = build(SimEvChargerAdapter, EV, options)
        await adapter.connect()
        trace = []
        for _ in range(24):
            clock.advance(600)
            sample = await adapter.read()
            trace.append((sample.mw, sample.details["active_sessions"]))
            assert -0.3 - 1e-9 <= sample.mw <= 0.0
            assert 0 <= sample.details["active_sessions"] <= 6
        model = adapter.model
        runs.append(
            (trace, sample.details["energy_delivered_mwh"], model.arrived, model.turned_away)
        )
    assert runs[0] == runs[1]
    trace, delivered, arrived, turned_away = runs[0]
    assert 20 <= arrived + turned_away <= 80  # about 12 an hour for 4 hours
    assert turned_away > 0  # 6 connectors, 90 minute stays: the station fills up
    assert len({sessions for _, sessions in trace}) > 2  # sessions come and go
    assert delivered > 0


async def test_a_positive_setpoint_is_rejected_and_one_beyond_the_rating_is_capped() -> None:
    adapter, _, _ = build(SimEvChargerAdapter, EV, QUIET)
    await adapter.connect()
    rejected = await adapter.apply_setpoint(0.2)
    assert rejected.status == "rejected"
    assert rejected.reason == (
        "sim-ev-charger takes an import limit of 0 MW or less (a charging station cannot "
        "export); got 0.2 MW"
    )
    capped = await adapter.apply_setpoint(-5.0)
    assert (capped.status, capped.applied_mw) == ("applied", -0.3)
    assert capped.reason == "import limit capped at the station's rating 0.3 MW"


async def test_a_station_fault_stops_charging_raises_a_condition_and_clears_it() -> None:
    adapter, clock, conditions = build(
        SimEvChargerAdapter,
        EV,
        {
            "arrivals_per_h": 0,
            "initial_sessions": 2,
            "fault_rate_per_h": 3600,
            "fault_duration_s": 60,
            "seed": 4,
        },
    )
    await adapter.connect()
    before = await adapter.read()
    assert before.mw < 0
    clock.advance(1)
    faulted = await adapter.read()
    assert (faulted.mw, faulted.status) == (0.0, "fault")
    assert faulted.details["connectors_available"] == 0
    assert faulted.details["demand_mw"] == 0.0
    assert conditions.active == {CHARGER_FAULT: "major"}
    clock.advance(60)
    assert (await adapter.read()).status == "charging"
    assert [(c.kind, c.code) for c in conditions.drain()] == [
        ("condition_raised", CHARGER_FAULT),
        ("condition_cleared", CHARGER_FAULT),
    ]


def test_options_refuse_a_minimum_above_the_maximum() -> None:
    with pytest.raises(msgspec.ValidationError, match="min_session_kw 200 > max_session_kw 150"):
        msgspec.convert({"min_session_kw": 200}, SimEvChargerOptions)


async def test_details_are_valid_ev_charger_details() -> None:
    adapter, _, _ = build(SimEvChargerAdapter, EV, {"seed": 2, "initial_sessions": 2})
    await adapter.connect()
    await adapter.apply_setpoint(-0.1)
    details = (await adapter.read()).details
    checked, problems = validate_details(EV_TYPE, details)
    assert problems == []
    for field in (
        "station_state",
        "active_sessions",
        "energy_delivered_mwh",
        "connectors_available",
        "connectors_total",
        "max_session_kw",
        "demand_mw",
        "import_limit_mw",
    ):
        assert field in checked
