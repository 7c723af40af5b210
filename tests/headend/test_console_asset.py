"""The console's Asset page (``/console/assets/{id}``): what it shows and who may see it."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
from headend_kit import BESS_1, NOT_IN_INVENTORY, PV_1, SITE_B, ConnectAgent, bearer

from der_sdk.models import TelemetrySample
from der_sdk_headend import Headend

PAGE_IDS = (
    "asset",
    "asset-name",
    "asset-mw",
    "asset-setpoint",
    "asset-quality",
    "asset-ts",
    "trend-form",
    "trend-range",
    "trend-start",
    "trend-end",
    "trend-apply",
    "trend-status",
    "trend-mw",
    "asset-agent",
    "asset-connected",
    "asset-agent-id",
    "asset-sessions",
    "asset-dispatches",
)


async def test_the_asset_page_shows_trends_agent_sessions_and_dispatches(
    headend: Headend, http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register([BESS_1], agent_id="gw-asset")
    sample = TelemetrySample(
        asset_id=BESS_1,
        site_id=headend.inventory.assets[BESS_1].site_id,
        ts=datetime.now(UTC),
        mw=1.5,
        details={"soc_pct": 61.0},
    )
    await agent.telemetry(1, [sample])
    posted = await http.post("/dispatch", json={"asset_id": BESS_1, "mw": 0.5})
    assert posted.status_code == 202

    response = await http.get(f"/console/assets/{BESS_1}")

    assert response.status_code == 200, response.text
    html = response.text
    for element_id in PAGE_IDS:
        assert f'id="{element_id}"' in html, element_id
    assert 'id="trend-soc_pct"' in html and 'id="asset-detail-soc_pct"' in html
    assert "BESS 1" in html and "gw-asset" in html
    assert f'id="dispatch-{posted.json()["dispatch_id"]}"' in html
    assert "1.500" in html, "the latest MW is rendered, not only filled in live"
    for script in ("uPlot.iife.min.js", "asset.js", "live.js"):
        assert script in html


async def test_a_pv_asset_has_its_own_detail_trends(http: httpx.AsyncClient) -> None:
    response = await http.get(f"/console/assets/{PV_1}")
    assert response.status_code == 200
    assert 'id="trend-irradiance_wm2"' in response.text
    assert 'id="trend-soc_pct"' not in response.text
    assert f'href="/console/sites/{SITE_B}"' in response.text


async def test_an_unknown_asset_is_not_found(http: httpx.AsyncClient) -> None:
    response = await http.get(f"/console/assets/{NOT_IN_INVENTORY}")
    assert response.status_code == 404


async def test_the_asset_page_needs_sign_in(
    auth_headend: Headend, auth_http: httpx.AsyncClient, role_tokens: dict[str, str]
) -> None:
    url = f"/console/assets/{BESS_1}"
    anonymous = await auth_http.get(url)
    assert anonymous.status_code in (303, 401)
    viewer = await auth_http.get(url, headers=bearer(role_tokens["viewer"]))
    assert viewer.status_code == 200 and 'id="trend-mw"' in viewer.text
