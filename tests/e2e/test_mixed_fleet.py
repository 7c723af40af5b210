"""The mixed demo fleet end to end: the inventory and agent config of ``examples/mixed/``
(what ``der demo`` runs), a real headend and one real gateway agent per site over gRPC on
TCP, the simulators of der-sdk-sim-bess and der-sdk-sim-plant behind them.

The test's copy of the agent config differs from the example only in what a test needs:
fast timings, a clear sky over the PV plant (its available power then stays put, so a
share below it curtails it for sure) and a charger fault forced within the first second.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from der_sdk.agent_config import AgentConfig, load_agent_config
from der_sdk.models import TelemetrySample
from der_sdk_agent.testing import FAST_AGENT_SETTINGS, AgentLink, AgentRunner

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mixed"
SUNFIELD = "3b8f6a52-1c4e-4f0a-9d7b-5e2c8a1f6d30"
WINDY_RIDGE = "9c1d2e3f-4a5b-4c6d-8e7f-0a1b2c3d4e50"
HARBOUR = "5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a809"
SUNFIELD_BESS = "0a4c8e12-6b3d-4f59-8a21-7c9e5d3b1f01"
SUNFIELD_PV = "0a4c8e12-6b3d-4f59-8a21-7c9e5d3b1f02"
WT1 = "7d2e9f40-1b8c-4a36-9e57-2f6a0c8d4b01"
DEPOT = "c5a7e3b1-2d4f-4e6a-8b9c-1d3f5a7c9e01"
WAIT = 20.0
DURATION_S = 600


@pytest.fixture
def der_inventory_path() -> Path:
    """The demo's own inventory, as it is in the repository."""
    return EXAMPLE / "assets.yaml"


@pytest.fixture
def agent_config(tmp_path: Path) -> AgentConfig:
    """The demo's agent config with fast timings, a clear sky and a forced charger fault."""
    document: dict[str, Any] = yaml.safe_load((EXAMPLE / "agent.yaml").read_text())
    document.update(FAST_AGENT_SETTINGS)
    document["assets"][SUNFIELD_PV]["options"].update(cloud_cover=0, trip_rate_per_h=0)
    document["assets"][DEPOT]["options"].update(fault_rate_per_h=3600, fault_duration_s=2)
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(document))
    return load_agent_config(path)


async def control_of(http: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    """Each asset's ``control`` from ``GET /assets`` for a dispatch of DURATION_S."""
    response = await http.get("/assets", params={"duration_s": DURATION_S})
    assert response.status_code == 200, response.text
    return {row["asset_id"]: row["control"] for row in response.json()}


async def start_site_agents(
    der_run_agent: AgentRunner, config: AgentConfig
) -> dict[str, AgentLink]:
    links = {}
    for site in (SUNFIELD, WINDY_RIDGE, HARBOUR):
        links[site] = await der_run_agent(
            adapter_type=config.default_adapter,
            site_id=site,
            agent_id=f"gateway-{site}",
            config=config,
        )
    return links


async def test_the_mixed_demo_fleet_reports_each_type_splits_by_headroom_and_raises_conditions(
    der_run_agent: AgentRunner, der_http: httpx.AsyncClient, agent_config: AgentConfig
) -> None:
    links = await start_site_agents(der_run_agent, agent_config)
    sun = links[SUNFIELD]

    # Telemetry of each type arrives with its details.
    bess = await sun.wait_for_telemetry(
        SUNFIELD_BESS, lambda s: "soc_pct" in s.details, timeout_s=WAIT
    )
    assert bess.details["soc_pct"] == pytest.approx(50, abs=1)
    pv = await sun.wait_for_telemetry(
        SUNFIELD_PV, lambda s: s.details.get("irradiance_wm2", 0) > 0, timeout_s=WAIT
    )
    assert pv.mw > 0.5, "the example fixes the sun at 12:00 UTC: daylight at any hour"
    assert pv.details["curtailed_mw"] == 0, "no limit yet"
    wind = await links[WINDY_RIDGE].wait_for_telemetry(
        WT1, lambda s: "wind_speed_ms" in s.details, timeout_s=WAIT
    )
    assert wind.details["wind_speed_ms"] >= 0 and wind.mw >= 0
    charger = await links[HARBOUR].wait_for_telemetry(
        DEPOT, lambda s: "active_sessions" in s.details, timeout_s=WAIT
    )
    assert isinstance(charger.details["active_sessions"], int) and charger.mw <= 0

    # GET /assets shows each asset's control kind and what it can take now.
    before = await control_of(der_http)
    assert before[SUNFIELD_BESS]["kind"] == "setpoint"
    assert before[SUNFIELD_PV]["kind"] == "export_limit"
    assert before[WT1]["kind"] == "export_limit"
    assert before[DEPOT]["kind"] == "import_limit"
    pv_range, bess_range = before[SUNFIELD_PV], before[SUNFIELD_BESS]
    assert pv_range["min_mw"] == 0 and 0.5 < pv_range["max_mw"] < 5
    assert pv_range["basis"].startswith("available PV")

    # A site dispatch on the PV + battery site, split by the site's headroom policy.
    mw = 1.5
    posted = await der_http.post(
        "/dispatch", json={"site_id": SUNFIELD, "mw": mw, "duration_s": DURATION_S}
    )
    assert posted.status_code == 202, posted.text
    record = posted.json()
    assert record["policy"] == "headroom", "the inventory's split_policy for the site"
    shares = {t["asset_id"]: t["mw"] for t in record["targets"]}
    assert set(shares) == {SUNFIELD_BESS, SUNFIELD_PV}
    assert math.fsum(shares.values()) + record["unallocated_mw"] == pytest.approx(mw)
    after = await control_of(der_http)
    for asset_id, share in shares.items():
        lo, hi = after[asset_id]["min_mw"], after[asset_id]["max_mw"]
        assert lo <= share <= hi, (asset_id, share, after[asset_id])
    # in proportion to each one's export headroom now
    assert shares[SUNFIELD_PV] / shares[SUNFIELD_BESS] == pytest.approx(
        pv_range["max_mw"] / bess_range["max_mw"], rel=0.02
    )

    await sun.wait_for_dispatch(record["dispatch_id"], "applied", timeout_s=WAIT)

    # ... applied on each asset: the battery runs at its share, the PV plant is capped at
    # its share below what the sun gives, and says how much it holds back.
    def at_share(asset_id: str) -> Any:
        return lambda s: (
            s.mw_setpoint is not None
            and math.isclose(s.mw_setpoint, shares[asset_id], abs_tol=1e-9)
        )

    await sun.wait_for_telemetry(SUNFIELD_BESS, at_share(SUNFIELD_BESS), timeout_s=WAIT)
    curtailed: TelemetrySample = await sun.wait_for_telemetry(
        SUNFIELD_PV, at_share(SUNFIELD_PV), timeout_s=WAIT
    )
    assert curtailed.details["export_limit_mw"] == pytest.approx(shares[SUNFIELD_PV])
    assert curtailed.mw == pytest.approx(shares[SUNFIELD_PV])
    assert curtailed.details["curtailed_mw"] > 0
    assert curtailed.details["curtailed_mw"] == pytest.approx(
        curtailed.details["available_mw"] - curtailed.mw, abs=1e-9
    )
    assert curtailed.details["curtailment_reason"].startswith("export limit")

    # GET /events shows the condition the charger raised (its forced fault).
    raised = await links[HARBOUR].wait_for_event(
        "condition_raised", DEPOT, lambda e: e.data["code"] == "charger_fault", timeout_s=WAIT
    )
    assert (raised.site_id, raised.data["severity"]) == (HARBOUR, "major")
    by_site = await links[HARBOUR].events(site_id=HARBOUR, kind="condition_raised")
    assert any(e.asset_id == DEPOT for e in by_site)
