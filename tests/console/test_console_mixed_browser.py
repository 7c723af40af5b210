"""The console with the mixed demo fleet in a real browser (Debian's Chromium): the
inventory and agent config of ``examples/mixed/`` (what ``der demo`` runs), one gateway
agent per site on the simulators of der-sdk-sim-bess and der-sdk-sim-plant.

Each asset type shows its key figures, updated live; an asset shows its control kind and
the range it can take now; the Site page's policy selector defaults to the site's
``split_policy`` and its choice splits the preview and the confirmed dispatch. These tests
write no screenshot (docs/console/ shows the battery example's pages).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.console.browser_kit import LIVE_S, sign_in
from tests.console.console_kit import MIXED_AGENT_CONFIG, MIXED_INVENTORY, ConsoleStack

SUNFIELD = "3b8f6a52-1c4e-4f0a-9d7b-5e2c8a1f6d30"  # PV + battery, split_policy: headroom
SUNFIELD_PV = "0a4c8e12-6b3d-4f59-8a21-7c9e5d3b1f02"
FIGURES = {
    "Sunfield BESS": ("soc_pct", r"^\d+\.\d %$"),
    "Sunfield PV": ("irradiance_wm2", r"^\d+ W/m²$"),
    "Ridge WT1": ("wind_speed_ms", r"^\d+\.\d m/s$"),
    "Depot chargers": ("active_sessions", r"^\d+ sessions$"),
}


@pytest.fixture(scope="module")
def console(
    chromium_executable: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ConsoleStack]:
    """The headend with the mixed demo fleet, its agents and a token per role."""
    stack = ConsoleStack(
        tmp_path_factory.mktemp("console-mixed"),
        inventory=MIXED_INVENTORY,
        agent_config=MIXED_AGENT_CONFIG,
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def test_the_fleet_shows_each_types_key_figures_live(page: Page, console: ConsoleStack) -> None:
    sign_in(page, console.tokens["viewer"])
    for name, (field, pattern) in FIGURES.items():
        row = page.locator("tr[data-asset-id]").filter(
            has=page.get_by_role("link", name=name, exact=True)
        )
        cell = row.locator(f'[data-field="details.{field}"]')
        expect(cell).to_have_text(re.compile(pattern))
        # live.js marks each update with the sample's time
        expect(cell).to_have_attribute("data-updated", re.compile(r"^\d{4}-"), timeout=LIVE_S)
    pv = page.locator(f'tr[data-asset-id="{SUNFIELD_PV}"]')
    expect(pv.locator('[data-field="details.curtailed_mw"]')).to_have_text(
        re.compile(r"^\d+\.\d\d MW curtailed$")
    )


def test_the_pv_asset_page_shows_its_key_figures_and_its_export_limit_range(
    page: Page, console: ConsoleStack
) -> None:
    sign_in(page, console.tokens["viewer"], next_path=f"/console/assets/{SUNFIELD_PV}")
    expect(page.locator("[data-key-figure]")).to_have_count(2)
    expect(page.locator("#asset-detail-irradiance_wm2")).to_have_text(re.compile(r"W/m²$"))
    expect(page.locator("#asset-control-kind")).to_contain_text("export_limit")
    expect(page.locator("#asset-control-range")).to_have_text(
        re.compile(r"^0\.00 to \d+\.\d\d MW$")
    )
    expect(page.locator("#asset-control-basis")).to_contain_text("available PV")


def test_the_chosen_policy_splits_the_site_preview_and_the_confirmed_dispatch(
    page: Page, console: ConsoleStack
) -> None:
    sign_in(page, console.tokens["operator"], next_path=f"/console/sites/{SUNFIELD}")
    policy = page.get_by_label("Split policy")
    expect(policy).to_have_value("headroom")  # the site's split_policy
    form = page.locator("#site-dispatch-form")
    form.get_by_label("Target MW").fill("2")
    form.get_by_label("Duration (seconds, optional)").fill("600")
    form.get_by_role("button", name="Preview split").click()
    expect(page.locator("#preview-policy")).to_have_text("headroom")

    policy.select_option("equal")
    form.get_by_role("button", name="Preview split").click()
    expect(page.locator("#preview-policy")).to_have_text("equal")
    expect(page.locator("#preview-targets [data-target-mw]")).to_have_count(2)
    page.get_by_role("button", name="Confirm dispatch").click()
    sent = page.locator("[data-dispatch-id]#dispatch-sent")
    expect(sent).to_be_visible()
    dispatch_id = sent.get_attribute("data-dispatch-id")
    record = page.request.get(f"/dispatch/{dispatch_id}").json()
    assert record["policy"] == "equal"
    placed = sum(t["mw"] for t in record["targets"]) + record["unallocated_mw"]
    assert placed == pytest.approx(2.0)
    row = page.locator(f'#dispatch-history tr[data-dispatch-id="{dispatch_id}"]')
    expect(row).to_have_attribute("data-state", "applied", timeout=LIVE_S)
