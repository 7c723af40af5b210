"""The console with the mixed demo fleet (``examples/mixed/assets.yaml``): each asset
type's key figures on the Fleet, Site and Asset pages, each asset's control kind and the
range it can take now, and the Site page's split policy selector, whose choice the
preview and the confirmed dispatch use. Server side, over loopback HTTP; the browser flows
are in tests/console.
"""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from headend_kit import ConnectAgent, post_form, preview_rows

from der_sdk.models import TelemetrySample, utc_now
from der_sdk_headend import Headend
from der_sdk_headend.console.pages import NO_VALUE

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mixed" / "assets.yaml"
SUNFIELD = "3b8f6a52-1c4e-4f0a-9d7b-5e2c8a1f6d30"
WINDY_RIDGE = "9c1d2e3f-4a5b-4c6d-8e7f-0a1b2c3d4e50"
HARBOUR = "5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a809"
BESS = "0a4c8e12-6b3d-4f59-8a21-7c9e5d3b1f01"
PV = "0a4c8e12-6b3d-4f59-8a21-7c9e5d3b1f02"
WT1 = "7d2e9f40-1b8c-4a36-9e57-2f6a0c8d4b01"
DEPOT = "c5a7e3b1-2d4f-4e6a-8b9c-1d3f5a7c9e01"


@pytest.fixture
def inventory_path(tmp_path: Path) -> Path:
    """A copy of the demo's mixed inventory (the headend's token file goes beside it)."""
    path = tmp_path / "assets.yaml"
    shutil.copyfile(EXAMPLE, path)
    return path


def reading(asset_id: str, site_id: str, mw: float, **details: Any) -> TelemetrySample:
    return TelemetrySample(asset_id=asset_id, site_id=site_id, ts=utc_now(), mw=mw, details=details)


@pytest.fixture
async def reported(connect_agent: ConnectAgent) -> None:
    """One sample of each type, fresh: a battery at 62.5 %, a PV plant making 2.4 MW
    with 0.4 MW curtailed, a turbine in 9.3 m/s, a charger with three sessions."""
    for site_id, assets, samples in (
        (
            SUNFIELD,
            [BESS, PV],
            [
                reading(BESS, SUNFIELD, 0.5, soc_pct=62.5),
                reading(PV, SUNFIELD, 2.4, irradiance_wm2=640.0, curtailed_mw=0.4),
            ],
        ),
        (WINDY_RIDGE, [WT1], [reading(WT1, WINDY_RIDGE, 1.8, wind_speed_ms=9.3)]),
        (
            HARBOUR,
            [DEPOT],
            [reading(DEPOT, HARBOUR, -0.2, active_sessions=3, demand_mw=0.25)],
        ),
    ):
        agent = await connect_agent()
        await agent.register(assets, site_id=site_id, agent_id=f"gw-{site_id[:4]}")
        await agent.telemetry(1, samples)


def figure(page: str, asset_id: str, field: str) -> str:
    """The text of the live key figure ``field`` of ``asset_id`` on ``page``."""
    found = re.search(
        rf'data-asset-id="{asset_id}" data-field="details\.{field}"[^>]*>([^<]*)<', page
    )
    assert found, f"no key figure {field} of {asset_id}"
    return html.unescape(found.group(1))


async def control(http: httpx.AsyncClient, asset_id: str) -> dict[str, Any]:
    response = await http.get(f"/assets/{asset_id}")
    assert response.status_code == 200, response.text
    state: dict[str, Any] = response.json()["control"]
    return state


async def test_the_fleet_shows_each_types_key_figures(
    http: httpx.AsyncClient, reported: None
) -> None:
    page = (await http.get("/")).text

    assert figure(page, BESS, "soc_pct") == "62.5 %"
    assert figure(page, PV, "irradiance_wm2") == "640 W/m²"
    assert figure(page, PV, "curtailed_mw") == "0.40 MW curtailed"
    assert figure(page, WT1, "wind_speed_ms") == "9.3 m/s"
    assert figure(page, DEPOT, "active_sessions") == "3 sessions"
    # an asset that has not reported shows its figures' places, empty, for live.js
    assert figure(page, "7d2e9f40-1b8c-4a36-9e57-2f6a0c8d4b02", "wind_speed_ms") == NO_VALUE


async def test_the_site_page_shows_key_figures_and_each_assets_control_now(
    http: httpx.AsyncClient, reported: None
) -> None:
    page = (await http.get(f"/console/sites/{SUNFIELD}")).text

    assert figure(page, BESS, "soc_pct") == "62.5 %"
    assert figure(page, PV, "curtailed_mw") == "0.40 MW curtailed"
    pv = await control(http, PV)
    assert (pv["min_mw"], pv["max_mw"]) == (0.0, pytest.approx(2.8)), "2.4 made + 0.4 held"
    cell = re.search(r'<td data-control-kind="export_limit" title="([^"]*)">([^<]*)</td>', page)
    assert cell, "the PV plant's control cell"
    assert html.unescape(cell.group(1)) == pv["basis"]
    assert cell.group(2) == "export limit, 0.00 to 2.80 MW"
    assert '<td data-control-kind="setpoint"' in page


async def test_the_asset_page_shows_the_key_figures_first_and_the_control_object(
    http: httpx.AsyncClient, reported: None
) -> None:
    page = (await http.get(f"/console/assets/{PV}")).text

    cards = re.findall(r'data-key-figure="([^"]+)"', page)
    assert cards == ["irradiance_wm2", "curtailed_mw"]
    assert figure(page, PV, "curtailed_mw") == "0.40 MW curtailed"
    state = await control(http, PV)
    kind = re.search(r'<dd id="asset-control-kind"><code>([^<]+)</code>', page)
    assert kind and kind.group(1) == state["kind"] == "export_limit"
    assert (
        f'<dd id="asset-control-range">{state["min_mw"]:.2f} to {state["max_mw"]:.2f} MW</dd>'
        in page
    )
    assert f'<dd id="asset-control-basis">{state["basis"]}</dd>' in page

    charger = (await http.get(f"/console/assets/{DEPOT}")).text
    assert '<dd id="asset-control-kind"><code>import_limit</code>' in charger
    assert '<dd id="asset-control-range">-0.25 to 0.00 MW</dd>' in charger, "the demand"


def policy_options(page: str) -> tuple[list[str], str]:
    """The split policy selector's options and the selected one."""
    select = re.search(r'<select id="site-dispatch-policy" name="policy".*?</select>', page, re.S)
    assert select, "the site dispatch form has a policy selector"
    options = re.findall(r'<option value="([^"]+)"', select.group(0))
    selected = re.findall(r'<option value="([^"]+)" selected', select.group(0))
    assert len(selected) == 1, select.group(0)
    return options, selected[0]


async def test_the_policy_selector_lists_the_installed_policies_with_the_sites_own_chosen(
    headend: Headend, http: httpx.AsyncClient
) -> None:
    installed = headend.plugins.split_policies.names()
    assert {"capacity_weighted", "equal", "headroom", "soc_balancing"} <= set(installed)

    sunfield = (await http.get(f"/console/sites/{SUNFIELD}")).text
    assert policy_options(sunfield) == (installed, "headroom")
    assert "the site&#39;s split_policy (headroom)" in sunfield
    ridge = (await http.get(f"/console/sites/{WINDY_RIDGE}")).text
    assert policy_options(ridge) == (installed, headend.dispatcher.policy_name)
    assert "the headend&#39;s SPLIT_POLICY" in ridge
    assert '<label for="site-dispatch-policy">' in ridge


async def test_the_chosen_policy_splits_the_preview_and_the_confirmed_dispatch(
    http: httpx.AsyncClient, reported: None
) -> None:
    form = {"site_id": SUNFIELD, "mw": 2.0, "duration_s": 3600}
    by_policy = {}
    for policy in ("headroom", "equal"):
        rest = await http.post("/dispatch/preview", json={**form, "policy": policy})
        assert rest.status_code == 200, rest.text
        by_policy[policy] = [(t["asset_id"], t["mw"]) for t in rest.json()["targets"]]
    assert by_policy["headroom"] != by_policy["equal"], "the policies differ here"

    for policy, targets in by_policy.items():
        preview = await post_form(http, "/console/dispatch/preview", {**form, "policy": policy})
        assert preview.status_code == 200, preview.text
        shown = preview_rows(preview.text)  # each MW as %g: six digits
        assert [a for a, _ in shown] == [a for a, _ in targets]
        assert [mw for _, mw in shown] == pytest.approx([mw for _, mw in targets], rel=1e-5)
        assert f'<strong id="preview-policy">{policy}</strong>' in preview.text
        assert f'name="policy" value="{policy}"' in preview.text, "the confirm form keeps it"

    sent = await post_form(http, "/console/dispatch", {**form, "policy": "equal", "confirm": "yes"})
    assert sent.status_code == 202, sent.text
    (record,) = (await http.get("/dispatch/history", params={"site_id": SUNFIELD})).json()
    assert record["policy"] == "equal"
    assert [(t["asset_id"], t["mw"]) for t in record["targets"]] == by_policy["equal"]


async def test_the_dispatch_page_names_each_sites_policy_and_offers_the_installed_ones(
    headend: Headend, http: httpx.AsyncClient
) -> None:
    page = (await http.get("/console/dispatch")).text

    assert f'value="site:{SUNFIELD}"' in page
    assert "Sunfield (site, split by headroom," in page
    default = headend.dispatcher.policy_name
    assert f"Windy Ridge (site, split by {default}," in page
    select = re.search(r'<select id="dispatch-policy" name="policy".*?</select>', page, re.S)
    assert select, "the Dispatch page's form has a policy selector"
    options = re.findall(r'<option value="([^"]*)"', select.group(0))
    assert options == ["", *headend.plugins.split_policies.names()], "the site's own first"
    assert '<label for="dispatch-policy">' in page


async def test_the_dispatch_pages_empty_policy_leaves_the_sites_own(
    http: httpx.AsyncClient, reported: None
) -> None:
    form = {"target": f"site:{SUNFIELD}", "mw": 2.0, "duration_s": 3600, "policy": ""}
    preview = await post_form(http, "/console/dispatch/preview", form)
    assert preview.status_code == 200, preview.text
    assert '<strong id="preview-policy">headroom</strong>' in preview.text
