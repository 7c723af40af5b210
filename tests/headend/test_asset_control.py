"""Each asset's control state over REST, and dispatches checked and split per control kind:
telemetry arrives over a real agent stream, answers come from the REST API."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from headend_kit import (
    BESS_1,
    BESS_2,
    BESS_3,
    PV_1,
    SITE_A,
    SITE_A_ASSETS,
    SITE_B,
    ConnectAgent,
)

from der_sdk.models import TelemetrySample, utc_now


def live(asset_id: str, mw: float, site_id: str = SITE_A, **details: Any) -> TelemetrySample:
    return TelemetrySample(asset_id=asset_id, site_id=site_id, ts=utc_now(), mw=mw, details=details)


async def control_of(http: httpx.AsyncClient, asset_id: str, **params: Any) -> dict[str, Any]:
    response = await http.get(f"/assets/{asset_id}", params=params)
    assert response.status_code == 200, response.text
    control: dict[str, Any] = response.json()["control"]
    return control


async def test_assets_show_their_control_kind_and_static_range_without_telemetry(
    http: httpx.AsyncClient,
) -> None:
    assets = {a["asset_id"]: a for a in (await http.get("/assets")).json()}
    assert assets[PV_1]["control"] == {
        "kind": "export_limit",
        "min_mw": 0.0,
        "max_mw": 5.0,
        "basis": "no telemetry: static limits",
        "as_of": None,
    }
    assert assets[BESS_1]["control"]["kind"] == "setpoint"
    assert assets[BESS_1]["max_mw"] == 2.0, "the inventory fields stay"


async def test_the_control_range_follows_the_latest_telemetry(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register(SITE_A_ASSETS)
    bess = live(BESS_1, 0.0, soc_pct=25.0)
    await agent.telemetry(1, [bess])

    now = await control_of(http, BESS_1)
    assert (now["min_mw"], now["max_mw"]) == (-2.0, 2.0)
    assert now["basis"] == "soc 25%, no duration: power limits"
    assert now["as_of"] is not None
    hour = await control_of(http, BESS_1, duration_s=3600)
    assert (hour["min_mw"], hour["max_mw"]) == (-2.0, 1.0)  # 1 MWh of 4 left
    assert hour["basis"] == "soc 25% of 4 MWh over 1 h"

    pv = await connect_agent()
    await pv.register([PV_1], site_id=SITE_B, agent_id="gw-pv")
    await pv.telemetry(1, [live(PV_1, 2.0, SITE_B, curtailed_mw=1.1)])
    control = await control_of(http, PV_1)
    assert (control["min_mw"], control["max_mw"]) == (0.0, pytest.approx(3.1))
    assert control["basis"] == "available PV 3.1 MW"


async def test_a_bad_duration_query_is_a_400_naming_it(http: httpx.AsyncClient) -> None:
    response = await http.get(f"/assets/{BESS_1}", params={"duration_s": -5})
    assert response.status_code == 400
    assert "duration_s" in response.json()["detail"]


async def test_a_negative_export_limit_is_refused_naming_field_asset_kind_and_range(
    http: httpx.AsyncClient,
) -> None:
    response = await http.post("/dispatch", json={"asset_id": PV_1, "mw": -1.0})
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert detail.startswith("mw: ")
    assert PV_1 in detail and "export_limit" in detail and "[0, 5]" in detail


async def test_a_site_preview_uses_the_requested_policy_and_shows_each_range(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register(SITE_A_ASSETS)
    await agent.telemetry(
        1,
        [
            live(BESS_1, 0.0, soc_pct=90.0),
            live(BESS_2, 0.0, soc_pct=10.0),
            live(BESS_3, 0.0, soc_pct=50.0),
        ],
    )
    body = {"site_id": SITE_A, "mw": 2.4, "duration_s": 3600, "policy": "soc_balancing"}
    response = await http.post("/dispatch/preview", json=body)
    assert response.status_code == 200, response.text
    planned = response.json()
    assert planned["policy"] == "soc_balancing"
    targets = {t["asset_id"]: t for t in planned["targets"]}
    # level 30 %: BESS 1 (90 % of 4 MWh) gives its 2 MW limit, BESS 3 (50 % of 2 MWh) the
    # 0.4 MWh above 30 %, and the emptiest (10 %) gives nothing
    assert targets[BESS_1]["mw"] == 2.0
    assert targets[BESS_3]["mw"] == pytest.approx(0.4)
    assert targets[BESS_2]["mw"] == 0.0
    assert targets[BESS_2]["available_max_mw"] == pytest.approx(0.2)  # 0.2 MWh in 1 h
    assert targets[BESS_2]["basis"] == "soc 10% of 2 MWh over 1 h"


async def test_an_unknown_policy_is_a_400_listing_the_installed_ones(
    http: httpx.AsyncClient,
) -> None:
    for path in ("/dispatch", "/dispatch/preview"):
        response = await http.post(path, json={"site_id": SITE_A, "mw": 1.0, "policy": "nope"})
        assert response.status_code == 400, response.text
        detail = response.json()["detail"]
        assert "unknown split policy 'nope'" in detail
        assert "capacity_weighted, equal, headroom, soc_balancing" in detail


async def test_a_site_dispatch_by_another_policy_goes_out_per_asset(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register(SITE_A_ASSETS)
    response = await http.post("/dispatch", json={"site_id": SITE_A, "mw": 1.5, "policy": "equal"})
    assert response.status_code == 202, response.text
    record = response.json()
    assert record["policy"] == "equal"
    got = {}
    for _ in SITE_A_ASSETS:
        setpoint = await agent.recv_kind("setpoint")
        assert setpoint.HasField("asset_id"), "the agent must not split by its own policy"
        got[setpoint.asset_id] = setpoint.mw
    assert got == {t["asset_id"]: t["mw"] for t in record["targets"]}
    assert got == pytest.approx({BESS_1: 0.5, BESS_2: 0.5, BESS_3: 0.5})
