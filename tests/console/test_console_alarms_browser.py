"""Alarms and schedules in the operator console, in a real browser (issue 21, item 9): the
header's alarm badge on every page follows raised and acknowledged alarms without a
reload, an operator acknowledges on the Alarms page and a viewer cannot, and a schedule
shows its steps on the Dispatch and Asset pages and an operator cancels it after confirming.

The headend and its demo agents are those of test_console_browser.py (:mod:`console_kit`);
alarms are raised through the headend's alarm book, as the agent's condition events are.
The Alarms page's screenshot goes to docs/console/alarms.png, the schedules' (a cancel
waiting for its confirmation) to docs/console/schedules.png.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from playwright.sync_api import Page, expect

from der_sdk.models import AlarmSeverity, utc_now
from der_sdk_headend.alarms.state import Condition
from tests.console.browser_kit import LIVE_S, csrf_of, screenshot, sign_in
from tests.console.console_kit import SCREENSHOTS, ConsoleStack
from tests.console.test_console_browser import NORTH_BESS_2, NORTH_YARD, audited

RIDGE_BESS_A = "e94af777-f852-43ef-9646-d9c550e21f99"
SOLAR_RIDGE = "6319b625-eebf-4fa9-a64a-af7409f6c1b5"
BADGE_POLL_MS = 10_000 + LIVE_S  # the badge re-reads every 10 s


def raise_alarm(
    console: ConsoleStack,
    asset_id: str,
    code: str,
    severity: AlarmSeverity,
    *,
    site_id: str = NORTH_YARD,
) -> str:
    """Raise a condition as an agent's event would, through the headend's alarm book."""
    condition = Condition(
        asset_id=asset_id,
        site_id=site_id,
        code=code,
        active=True,
        at=utc_now(),
        severity=severity,
        text=f"{code.replace('_', ' ')} reported by the device",
    )
    alarm = console.call(console.headend.alarms.apply(condition))
    assert alarm is not None
    return alarm.alarm_id


def htmx_ready(page: Page) -> None:
    """Wait until htmx works on the page (the header badge it reads is there), so a
    control changed next is sent by htmx, not before its scripts ran."""
    expect(page.locator("#alarm-counts [data-severity]").first).to_be_attached()


def unacknowledged(page: Page, console: ConsoleStack, severity: str) -> int:
    """Active, unacknowledged alarms of ``severity`` (``GET /alarms``)."""
    response = page.request.get(
        f"/alarms?state=active&acknowledged=false&severity={severity}",
        headers={"authorization": f"Bearer {console.tokens['viewer']}"},
    )
    assert response.ok, response.text()
    return len(response.json())


def post_form_from_page(page: Page, path: str, fields: dict[str, str], csrf: str | None) -> int:
    """``fetch`` a form POST from the page (cookie sent; CSRF header only when given)."""
    return int(
        page.evaluate(
            """async ([path, fields, csrf]) => {
                const headers = {"HX-Request": "true"};
                if (csrf !== null) headers["X-CSRF-Token"] = csrf;
                const r = await fetch(path, {method: "POST", headers,
                    body: new URLSearchParams(fields), credentials: "same-origin"});
                return r.status;
            }""",
            [path, fields, csrf],
        )
    )


def schedule(page: Page, console: ConsoleStack, body: dict[str, Any]) -> dict[str, Any]:
    """A schedule an hour ahead, made over REST with the operator's token."""
    start = utc_now() + timedelta(hours=1)
    response = page.request.post(
        "/dispatch",
        data={"start_at": start.isoformat(), **body},
        headers={"authorization": f"Bearer {console.tokens['operator']}"},
    )
    assert response.status == 202, response.text()
    record: dict[str, Any] = response.json()
    return record


def test_the_badge_follows_alarms_live_and_an_operator_acknowledges_one(
    page: Page, console: ConsoleStack
) -> None:
    sign_in(page, console.tokens["operator"])
    badge = page.locator("#alarm-counts")
    expect(badge.locator("[data-severity]").first).to_be_visible()
    alarm_id = raise_alarm(console, NORTH_BESS_2, "cell_over_temp", "critical")
    critical = unacknowledged(page, console, "critical")

    # raised while the Fleet page is open: the badge shows it without a reload
    expect(badge.locator('[data-severity="critical"]')).to_have_text(
        f"{critical} critical", timeout=BADGE_POLL_MS
    )
    page.locator("#alarm-badge").click()
    expect(page.get_by_role("heading", name="Alarms")).to_be_visible()
    row = page.locator(f"#alarm-{alarm_id}")
    expect(row).to_contain_text("North BESS 2")
    expect(row).to_contain_text("cell_over_temp")
    raise_alarm(console, RIDGE_BESS_A, "grid_undervoltage", "warning", site_id=SOLAR_RIDGE)
    page.reload()
    htmx_ready(page)
    screenshot(page, "alarms")

    row.get_by_role("button", name=re.compile("Acknowledge")).click()
    expect(row.locator('[data-field="acknowledged"]')).to_contain_text("browser operator")
    expect(row.get_by_role("button")).to_have_count(0)
    # the badge re-reads at once after the acknowledgement
    if critical == 1:
        expect(badge.locator('[data-severity="critical"]')).to_have_count(0)
    else:
        expect(badge.locator('[data-severity="critical"]')).to_have_text(f"{critical - 1} critical")
    trail = audited(page, console, "alarm.ack")
    mine = [r for r in trail if r["details"]["alarm_id"] == alarm_id]  # type: ignore[index]
    assert [r["outcome"] for r in mine] == ["ok"]


def test_the_alarms_page_filters_by_severity_and_site(page: Page, console: ConsoleStack) -> None:
    hot = raise_alarm(console, NORTH_BESS_2, "pcs_fault", "major")
    far = raise_alarm(console, RIDGE_BESS_A, "door_open", "info", site_id=SOLAR_RIDGE)
    sign_in(page, console.tokens["viewer"], next_path="/console/alarms")
    expect(page.locator(f"#alarm-{hot}")).to_be_visible()
    expect(page.locator(f"#alarm-{far}")).to_be_visible()
    htmx_ready(page)

    page.get_by_label("Site").select_option(label="Solar Ridge")
    expect(page.locator(f"#alarm-{hot}")).to_have_count(0)
    expect(page.locator(f"#alarm-{far}")).to_be_visible()
    expect(page).to_have_url(re.compile(f"site={SOLAR_RIDGE}"))
    page.get_by_label("Severity").select_option("major")
    expect(page).to_have_url(re.compile("severity=major"))
    expect(page.locator(f"#alarm-{far}")).to_have_count(0)
    page.get_by_label("Site").select_option(label="All sites")
    expect(page).to_have_url(re.compile(r"site=(&|$)"))
    expect(page.locator(f"#alarm-{hot}")).to_be_visible(timeout=LIVE_S)


def test_a_viewer_cannot_acknowledge_even_by_a_forged_post(
    page: Page, console: ConsoleStack
) -> None:
    alarm_id = raise_alarm(console, NORTH_BESS_2, "bms_comms", "major")
    sign_in(page, console.tokens["viewer"], next_path="/console/alarms")
    row = page.locator(f"#alarm-{alarm_id}")
    expect(row).to_be_visible()
    expect(page.get_by_role("main").get_by_role("button", name="Acknowledge")).to_have_count(0)
    expect(page.locator("#alarms-viewer-note")).to_be_visible()

    path = f"/console/alarms/{alarm_id}/ack"
    assert post_form_from_page(page, path, {}, csrf_of(page)) == 403
    assert post_form_from_page(page, path, {}, None) == 403
    assert page.request.post(path).status == 403
    alarm = page.request.get(
        f"/alarms/{alarm_id}", headers={"authorization": f"Bearer {console.tokens['viewer']}"}
    ).json()
    assert alarm["acknowledged_at"] is None


def test_a_schedule_shows_its_steps_and_an_operator_cancels_it(
    page: Page, console: ConsoleStack
) -> None:
    record = schedule(
        page,
        console,
        {
            "asset_id": NORTH_BESS_2,
            "steps": [{"offset_s": 0, "mw": 0.5}, {"offset_s": 1800, "mw": -0.5}],
            "duration_s": 3600,
        },
    )
    dispatch_id = record["dispatch_id"]
    sign_in(page, console.tokens["operator"], next_path="/console/dispatch")
    row = page.locator(f"#schedule-{dispatch_id}")
    expect(row).to_contain_text("North BESS 2")
    steps = row.locator("li[data-step]")
    expect(steps).to_have_count(2)
    expect(steps.nth(0)).to_contain_text("+0 s → 0.5 MW")
    expect(steps.nth(1)).to_contain_text("+30 min → -0.5 MW")
    expect(steps.nth(0)).to_contain_text("pending")
    # the agent is connected: it holds the schedule ahead of its start
    expect(row.locator("[data-schedule-state]")).to_have_text("scheduled")

    row.get_by_role("button", name=re.compile("Cancel")).click()
    expect(row.get_by_role("button", name="Confirm cancel")).to_be_visible()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.locator("#schedules").screenshot(path=SCREENSHOTS / "schedules.png")
    stored = page.request.get(
        f"/dispatch/{dispatch_id}", headers={"authorization": f"Bearer {console.tokens['viewer']}"}
    ).json()
    assert stored["state"] == "scheduled", "nothing cancelled before the confirmation"
    row.get_by_role("button", name="Confirm cancel").click()
    # the agent acknowledges the cancel; the row follows on the live stream
    expect(row).to_have_attribute("data-state", "cancelled", timeout=LIVE_S)
    expect(row.get_by_role("button")).to_have_count(0)
    trail = audited(page, console, "dispatch.cancel")
    mine = [r for r in trail if r["details"]["dispatch_id"] == dispatch_id]  # type: ignore[index]
    assert [(r["outcome"], r["details"]["via"]) for r in mine] == [("ok", "console")]  # type: ignore[index]

    # the asset's page shows the schedule and the asset's alarms
    page.goto(f"/console/assets/{NORTH_BESS_2}")
    expect(page.locator(f"#schedules #schedule-{dispatch_id}")).to_contain_text("cancelled")
    alarm_id = raise_alarm(console, NORTH_BESS_2, "fan_fault", "warning")
    page.reload()
    expect(page.locator(f"#asset-alarms #alarm-{alarm_id}")).to_contain_text("fan_fault")


def test_a_viewer_sees_schedules_without_cancel(page: Page, console: ConsoleStack) -> None:
    record = schedule(page, console, {"asset_id": RIDGE_BESS_A, "mw": 0.2, "duration_s": 600})
    sign_in(page, console.tokens["viewer"], next_path="/console/dispatch")
    row = page.locator(f"#schedule-{record['dispatch_id']}")
    expect(row).to_contain_text("Ridge BESS A")
    expect(row.get_by_role("button")).to_have_count(0)
    path = f"/console/dispatch/{record['dispatch_id']}/cancel"
    assert post_form_from_page(page, path, {"confirm": "yes"}, csrf_of(page)) == 403


def test_the_alarms_page_has_labels_and_fits_1280_and_390_px(
    page: Page, console: ConsoleStack
) -> None:
    raise_alarm(console, NORTH_BESS_2, "long_text_alarm", "major")
    sign_in(page, console.tokens["admin"], next_path="/console/alarms")
    for width in (1280, 390):
        page.set_viewport_size({"width": width, "height": 844})
        for path in ("/console/alarms", f"/console/assets/{NORTH_BESS_2}", "/console/dispatch"):
            page.goto(path)
            htmx_ready(page)
            unlabelled = page.evaluate(
                """() => [...document.querySelectorAll(
                        "input:not([type=hidden]), select, textarea")]
                    .filter((el) => !(el.labels && el.labels.length)
                        && !el.getAttribute("aria-label"))
                    .map((el) => el.outerHTML.slice(0, 120))"""
            )
            assert not unlabelled, f"{path}: inputs without a label: {unlabelled}"
            overflow = page.evaluate(
                "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 0, f"{path} is {overflow} px wider than {width} px"


def test_an_operator_schedules_steps_from_the_dispatch_form(
    page: Page, console: ConsoleStack
) -> None:
    sign_in(page, console.tokens["operator"], next_path="/console/dispatch")
    htmx_ready(page)
    form = page.locator("#dispatch-form")
    form.get_by_label("Target (asset or site)").select_option(f"asset:{RIDGE_BESS_A}")
    form.locator("#dispatch-schedule summary").click()
    start = (utc_now() + timedelta(hours=2)).replace(tzinfo=None, microsecond=0)
    form.get_by_label("Start at (UTC)").fill(start.isoformat())
    steps = form.get_by_label(re.compile("^Steps"))
    # a line that is not "offset_s mw": refused next to the field, nothing sent
    steps.fill("0 0.2\n600 lots")
    expect(form.get_by_label("Target MW")).to_be_disabled()
    form.get_by_role("button", name="Preview").click()
    expect(page.locator("#dispatch-steps-error")).to_be_visible()
    expect(page.locator("#dispatch-steps-error")).to_contain_text("line 2")

    steps.fill("0 0.2\n600 -0.3")
    form.get_by_role("button", name="Preview").click()
    expect(page.locator("#dispatch-steps-error")).to_be_hidden()
    preview = page.locator("#preview-steps")
    expect(preview.locator("tr[data-step]")).to_have_count(2)
    expect(page.locator("#dispatch-confirm-reason")).to_contain_text("a schedule of 2 steps")
    page.get_by_role("button", name="Confirm dispatch").click()
    sent = page.locator("#dispatch-sent")
    expect(sent).to_be_visible()
    dispatch_id = sent.get_attribute("data-dispatch-id")
    row = page.locator(f"#schedule-{dispatch_id}")
    expect(row).to_contain_text("Ridge BESS A", timeout=LIVE_S)
    expect(row.locator("li[data-step]")).to_have_count(2)
    expect(row.locator("li[data-step]").nth(1)).to_contain_text("+10 min → -0.3 MW")
    expect(row).to_contain_text(start.strftime("%Y-%m-%d %H:%M:%S"))
