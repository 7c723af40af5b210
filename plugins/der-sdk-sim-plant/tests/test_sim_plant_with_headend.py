"""The simulators behind a real agent and headend over gRPC: telemetry of each type with
its details, and device conditions raised and cleared, shown by ``GET /events``."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from der_sdk_sim_plant import INVERTER_TRIP, OVERSPEED_STOP
from plant_kit import EV, PV, SITE, WIND

from der_sdk.testing.waits import wait_until
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


async def _events(http: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await http.get("/events", params=params)
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()
    return events


async def test_a_pv_inverter_trip_is_raised_and_cleared_in_get_events(
    der_run_agent: AgentRunner, der_http: httpx.AsyncClient
) -> None:
    # Certain to trip within the first simulated second, and back after one more.
    options = {"seed": 3, "trip_rate_per_h": 3600, "trip_duration_s": 1, "cloud_cover": 0}
    link = await der_run_agent(adapter_type="sim-pv", options=options, assets=[PV.asset_id])

    async def raised_and_cleared() -> list[dict[str, Any]] | None:
        events = await _events(der_http, asset_id=PV.asset_id)
        kinds = [e["kind"] for e in reversed(events)]  # oldest first
        if (
            "condition_raised" in kinds
            and "condition_cleared" in kinds[kinds.index("condition_raised") :]
        ):
            return events
        return None

    events = await wait_until(
        raised_and_cleared, "an inverter trip raised and cleared", timeout_s=15
    )
    first_raise = next(e for e in reversed(events) if e["kind"] == "condition_raised")
    assert first_raise["asset_id"] == PV.asset_id
    assert first_raise["site_id"] == SITE
    assert first_raise["data"]["code"] == INVERTER_TRIP
    assert first_raise["data"]["severity"] == "major"
    assert first_raise["message"] == "inverter tripped; restarting in 1 s"
    assert first_raise["data"]["agent_id"] == link.agent.agent_id
    # filters by kind and site see the same record
    by_kind = await _events(der_http, kind="condition_cleared", site_id=SITE)
    assert by_kind and all(e["data"]["code"] == INVERTER_TRIP for e in by_kind)


async def test_a_turbine_over_speed_stop_is_raised_and_cleared_and_telemetry_has_its_details(
    der_run_agent: AgentRunner, der_http: httpx.AsyncClient
) -> None:
    # Starts above cut-out, drifts back to 10 m/s within seconds.
    options = {"initial_wind_ms": 26, "mean_wind_ms": 10, "reversion_s": 1, "turbulence_ms": 0}
    link = await der_run_agent(adapter_type="sim-wind", options=options, site_id=WIND_SITE)

    stopped = await link.wait_for_telemetry(WIND.asset_id)
    assert stopped.details["turbine_state"] in ("stopped_high_wind", "running")
    running = await link.wait_for_telemetry(
        WIND.asset_id, lambda s: s.details.get("turbine_state") == "running", timeout_s=15
    )
    assert running.details["wind_speed_ms"] < 22
    assert running.mw == pytest.approx(running.details["available_mw"])

    async def cleared() -> list[dict[str, Any]] | None:
        events = await _events(der_http, site_id=WIND_SITE)
        return events if any(e["kind"] == "condition_cleared" for e in events) else None

    events = await wait_until(cleared, "the over-speed stop cleared", timeout_s=15)
    assert [(e["kind"], e["data"]["code"]) for e in reversed(events)] == [
        ("condition_raised", OVERSPEED_STOP),
        ("condition_cleared", OVERSPEED_STOP),
    ]


async def test_ev_telemetry_carries_its_details_and_a_dispatch_caps_its_import(
    der_run_agent: AgentRunner, der_http: httpx.AsyncClient
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
