"""The simulators behind a real agent and headend over gRPC: telemetry of each type with
its details, and device conditions raised and cleared, shown by ``GET /events``."""

from __future__ import annotations

import pytest
from der_sdk_sim_plant import INVERTER_TRIP, OVERSPEED_STOP
from plant_kit import EV, PV, SITE, WIND

from der_sdk_agent.testing import AgentRunner

WIND_SITE = "51e00000-0000-4000-8000-0000000000a2"


@pytest.fixture
def der_inventory_yaml() -> str:
    return f"""\
sites:
  - site_id: {SITE}
    name: Plant site
  - site_id: {WIND_SITE}
    name: Wind site
assets:
  - asset_id: {PV.asset_id}
    site_id: {SITE}
    name: PV 1
    asset_type: pv
    max_mw: 2.0
    min_mw: 0.0
  - asset_id: {EV.asset_id}
    site_id: {SITE}
    name: EV depot
    asset_type: ev_charger
    max_mw: 0.0
    min_mw: -0.3
  - asset_id: {WIND.asset_id}
    site_id: {WIND_SITE}
    name: Wind 1
    asset_type: wind
    max_mw: 3.0
    min_mw: 0.0
"""


async def test_a_pv_inverter_trip_is_raised_and_cleared_in_get_events(
    der_run_agent: AgentRunner,
) -> None:
    # Certain to trip within the first simulated second, and back after one more.
    options = {"seed": 3, "trip_rate_per_h": 3600, "trip_duration_s": 1, "cloud_cover": 0}
    link = await der_run_agent(adapter_type="sim-pv", options=options, assets=[PV.asset_id])

    raised = await link.wait_for_event("condition_raised", PV.asset_id, timeout_s=15)
    cleared = await link.wait_for_event(
        "condition_cleared", PV.asset_id, lambda e: e.ts >= raised.ts, timeout_s=15
    )

    assert (raised.asset_id, raised.site_id) == (PV.asset_id, SITE)
    assert raised.message == "inverter tripped; restarting in 1 s"
    assert raised.data["code"] == cleared.data["code"] == INVERTER_TRIP
    assert raised.data["severity"] == cleared.data["severity"] == "major"
    assert raised.data["agent_id"] == link.agent.agent_id
    assert cleared.message == "inverter restarted after its trip"
    # the site and kind filters find the same records
    by_site = await link.events(site_id=SITE, kind="condition_cleared")
    assert by_site and {e.data["code"] for e in by_site} == {INVERTER_TRIP}


async def test_a_turbine_over_speed_stop_is_raised_and_cleared_and_telemetry_has_its_details(
    der_run_agent: AgentRunner,
) -> None:
    # Starts above cut-out, drifts back to 10 m/s within seconds.
    options = {"initial_wind_ms": 26, "mean_wind_ms": 10, "reversion_s": 1, "turbulence_ms": 0}
    link = await der_run_agent(adapter_type="sim-wind", options=options, site_id=WIND_SITE)

    running = await link.wait_for_telemetry(
        WIND.asset_id, lambda s: s.details.get("turbine_state") == "running", timeout_s=15
    )
    assert running.details["wind_speed_ms"] < 22
    assert running.mw == pytest.approx(running.details["available_mw"])

    await link.wait_for_event("condition_cleared", WIND.asset_id, timeout_s=15)
    events = await link.events(site_id=WIND_SITE)
    assert [(e.kind, e.data["code"]) for e in reversed(events)] == [
        ("condition_raised", OVERSPEED_STOP),
        ("condition_cleared", OVERSPEED_STOP),
    ]


async def test_ev_telemetry_carries_its_details_and_a_dispatch_caps_its_import(
    der_run_agent: AgentRunner,
) -> None:
    link = await der_run_agent(
        adapter_type="sim-ev-charger",
        options={"seed": 2, "initial_sessions": 3, "fault_rate_per_h": 0},
        assets=[EV.asset_id],
    )
    sample = await link.wait_for_telemetry(EV.asset_id)
    assert sample.mw < 0
    assert sample.details["active_sessions"] == 3
    assert sample.details["connectors_total"] == 4

    sent = await link.dispatch(-0.01, asset_id=EV.asset_id)
    await link.wait_for_dispatch(sent.dispatch_id, "applied")
    limited = await link.wait_for_telemetry(
        EV.asset_id, lambda s: s.details.get("import_limit_mw") == 0.01
    )
    assert limited.mw == pytest.approx(-0.01)
    assert limited.details["station_state"] == "limited"


async def test_a_dispatched_export_limit_curtails_the_pv_plant_and_it_says_so(
    der_run_agent: AgentRunner,
) -> None:
    options = {"seed": 1, "cloud_cover": 0, "trip_rate_per_h": 0, "solar_hour_utc": 12}
    link = await der_run_agent(adapter_type="sim-pv", options=options, assets=[PV.asset_id])
    free = await link.wait_for_telemetry(PV.asset_id)
    assert free.mw > 0.5  # daylight whatever the time: the sun at 12:00 UTC

    sent = await link.dispatch(0.5, asset_id=PV.asset_id)
    await link.wait_for_dispatch(sent.dispatch_id, "applied")
    curtailed = await link.wait_for_telemetry(
        PV.asset_id, lambda s: s.details.get("export_limit_mw") == 0.5
    )
    assert curtailed.mw == 0.5
    assert curtailed.details["curtailed_mw"] == pytest.approx(
        curtailed.details["available_mw"] - 0.5, abs=1e-9
    )
    assert curtailed.details["curtailment_reason"] == "export limit 0.5 MW"
    assert curtailed.details["inverter_state"] == "curtailed"
