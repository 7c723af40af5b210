"""The operator console in a real browser (Debian's Chromium, driven by pytest-playwright):
the flows of issue 18 as a person would go through them, against a headend with
``HEADEND_AUTH=on``, the demo's five simulated batteries (two sites, one gateway agent
each) and a token per role.

Each test writes a screenshot of its page into docs/console/ (docs/console.md shows them);
the names are fixed, so a run overwrites the last one's.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, Route, expect

from tests.console.browser_kit import (
    LIVE_S,
    csrf_of,
    dispatch_count,
    post_from_page,
    screenshot,
    sign_in,
)
from tests.console.console_kit import ConsoleStack

NORTH_YARD = "ed7332b8-d686-44d3-938c-9ddfd76b4791"  # North BESS 1, 2, 3 (6 MW discharge)
SOLAR_RIDGE = "6319b625-eebf-4fa9-a64a-af7409f6c1b5"
NORTH_BESS_2 = "d8dc771f-a331-4ad6-82b3-5cb666dc0d89"
DEMO_ASSETS = ("North BESS 1", "North BESS 2", "North BESS 3", "Ridge BESS A", "Ridge BESS B")


# ------------------------------------------------------------------------------- the tests


def test_chromium_opens_the_headends_openapi_document(page: Page, console: ConsoleStack) -> None:
    response = page.goto("/schema/openapi.json")
    assert response is not None and response.status == 200, response
    assert page.evaluate("() => JSON.parse(document.body.innerText).openapi").startswith("3.")


def test_every_page_loads_without_the_internet(page: Page, console: ConsoleStack) -> None:
    """Air-gapped: a request to any other host fails, and the console and the OpenAPI
    browser still load every script and style they need from the headend."""
    foreign: list[str] = []

    def only_the_headend(route: Route) -> None:
        if route.request.url.startswith(console.url):
            route.continue_()
        else:
            foreign.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_headend)
    failed: list[str] = []
    # (the live stream is cut when a page is left: that is no failure)
    page.on(
        "requestfailed",
        lambda request: None if "/console/events" in request.url else failed.append(request.url),
    )
    page.goto("/schema/swagger")
    expect(page.locator(".swagger-ui .opblock").first).to_be_visible()
    expect(page.get_by_text("/dispatch/history").first).to_be_visible()
    sign_in(page, console.tokens["viewer"])
    expect(page.get_by_role("link", name="North BESS 1")).to_be_visible()
    assert not foreign, f"pages asked other hosts for {foreign}"
    assert not failed, f"requests failed: {failed}"


def test_a_wrong_token_is_refused_at_sign_in(page: Page, console: ConsoleStack) -> None:
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/console/sign-in"))
    page.get_by_label("REST token").fill("der_not-a-token-of-this-headend")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("Unknown token")
    expect(page).to_have_url(re.compile(r"/console/sign-in"))
    screenshot(page, "sign-in")
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/console/sign-in")), "still not signed in"


def test_signed_in_fleet_shows_the_demos_assets_connected(
    page: Page, console: ConsoleStack
) -> None:
    sign_in(page, console.tokens["operator"])
    expect(page.get_by_role("heading", name="Fleet")).to_be_visible()
    for name in DEMO_ASSETS:
        row = page.get_by_role("row").filter(has_text=name)
        expect(row).to_have_count(1)
        expect(row).to_contain_text(re.compile(r"\bconnected\b", re.IGNORECASE))
        expect(row).not_to_contain_text(re.compile(r"offline", re.IGNORECASE))
    expect(page.get_by_role("link", name="North Yard")).to_be_visible()
    expect(page.get_by_role("link", name="Solar Ridge")).to_be_visible()
    expect(page.locator("#live-status")).to_have_text("live: on", timeout=LIVE_S)
    screenshot(page, "fleet")


def test_fleet_search_narrows_the_assets(page: Page, console: ConsoleStack) -> None:
    sign_in(page, console.tokens["viewer"])
    page.get_by_role("searchbox").first.fill("Ridge")
    page.keyboard.press("Enter")
    expect(page.get_by_role("row").filter(has_text="Ridge BESS A")).to_have_count(1)
    expect(page.get_by_role("row").filter(has_text="North BESS 1")).to_have_count(0)


def test_a_site_dispatch_is_previewed_confirmed_and_becomes_applied(
    page: Page, console: ConsoleStack
) -> None:
    sign_in(page, console.tokens["operator"], next_path=f"/console/sites/{NORTH_YARD}")
    before = dispatch_count(page)
    form = page.locator("form").filter(has=page.get_by_label("Target MW"))
    form.get_by_label("Target MW").fill("1.5")
    form.get_by_role("button", name="Preview split").click()
    targets = page.locator("#dispatch-preview").get_by_role("row")
    for name in ("North BESS 1", "North BESS 2", "North BESS 3"):
        expect(targets.filter(has_text=name)).to_have_count(1)
    expect(page.locator("#dispatch-preview")).to_contain_text("Unallocated: 0 MW")
    assert dispatch_count(page) == before, "a preview stores nothing"
    screenshot(page, "site-preview")
    page.get_by_role("button", name="Confirm dispatch").click()
    sent = page.locator("[data-dispatch-id]#dispatch-sent")
    expect(sent).to_be_visible()
    dispatch_id = sent.get_attribute("data-dispatch-id")
    assert dispatch_count(page) == before + 1, "one dispatch was stored"
    # the site's history shows it, and it turns applied without a reload
    row = page.locator(f'#dispatch-history tr[data-dispatch-id="{dispatch_id}"]')
    expect(row).to_have_attribute("data-state", "applied", timeout=LIVE_S)
    expect(row).to_contain_text("North BESS 2")
    page.get_by_role("link", name="Dispatch", exact=True).click()
    row = page.locator(f'#dispatch-history tr[data-dispatch-id="{dispatch_id}"]')
    expect(row).to_contain_text("North Yard")
    expect(row.locator("[data-dispatch-state]")).to_have_text("applied")
    screenshot(page, "dispatch")


def test_an_assets_trend_grows_live(page: Page, console: ConsoleStack) -> None:
    sign_in(page, console.tokens["viewer"])
    page.get_by_role("link", name="North BESS 2").first.click()
    expect(page).to_have_url(re.compile(f"/console/assets/{NORTH_BESS_2}"))
    expect(page.get_by_role("heading", name="North BESS 2")).to_be_visible()
    trend = page.locator("#trend-mw")
    expect(trend).to_have_attribute("data-points", re.compile(r"^[1-9]"))  # history drawn
    points = int(trend.get_attribute("data-points") or "0")
    stamp = page.locator("#asset-ts").inner_text()
    # the live tail: new samples arrive on the page's one stream and extend the trend
    page.wait_for_function(
        "(n) => Number(document.querySelector('#trend-mw').dataset.points) >= n",
        arg=points + 4,
        timeout=LIVE_S,
    )
    expect(page.locator("#asset-ts")).not_to_have_text(stamp)
    expect(page.locator("#trend-mw canvas").first).to_be_visible()
    expect(page.locator("#live-status")).to_have_text("live: on")
    screenshot(page, "asset")


def test_a_viewer_sees_no_dispatch_form_and_a_forged_post_is_refused(
    page: Page, console: ConsoleStack
) -> None:
    sign_in(page, console.tokens["viewer"])
    before = dispatch_count(page)
    body = {"site_id": NORTH_YARD, "mw": 1.0}
    # the viewer's own session, with the right CSRF token: the role refuses it
    assert post_from_page(page, "/dispatch", body, csrf_of(page)) == 403
    assert post_from_page(page, "/dispatch/preview", body, csrf_of(page)) == 403
    # the cookie without a CSRF token, with a wrong one, and a direct POST (no page)
    assert post_from_page(page, "/dispatch", body, None) == 403
    assert post_from_page(page, "/dispatch", body, "0" * 64) == 403
    assert page.request.post("/dispatch", data=body).status == 403
    assert dispatch_count(page) == before, "nothing was stored"
    for path in (f"/console/sites/{NORTH_YARD}", "/console/dispatch"):
        response = page.goto(path)
        assert response is not None and response.status == 200, f"{path}: {response}"
        main = page.get_by_role("main")
        expect(main.get_by_role("spinbutton")).to_have_count(0)
        expect(
            main.get_by_role("button", name=re.compile("preview|dispatch|confirm", re.I))
        ).to_have_count(0)


def test_an_operators_cookie_without_the_csrf_token_cannot_dispatch(
    page: Page, console: ConsoleStack
) -> None:
    sign_in(page, console.tokens["operator"])
    before = dispatch_count(page)
    body = {"asset_id": NORTH_BESS_2, "mw": 0.5}
    assert post_from_page(page, "/dispatch", body, None) == 403
    assert post_from_page(page, "/dispatch", body, "0" * 64) == 403
    assert page.request.post("/dispatch", data=body).status == 403
    assert dispatch_count(page) == before, "nothing was stored"


def test_the_agents_page_lists_each_sites_gateway(page: Page, console: ConsoleStack) -> None:
    sign_in(page, console.tokens["viewer"], next_path="/console/agents")
    for site_id in (NORTH_YARD, SOLAR_RIDGE):
        session = page.locator(f'tr[data-agent-id="gateway-{site_id}"]')
        expect(session).to_have_count(1)
        expect(session.locator('[data-field="buffer"]')).to_contain_text("samples")
    for name in DEMO_ASSETS:
        row = page.get_by_role("row").filter(has=page.get_by_role("link", name=name))
        expect(row).to_contain_text("gateway-")
        expect(row).to_contain_text("connected")
    screenshot(page, "agents")


def test_the_main_controls_are_reachable_with_the_keyboard(
    page: Page, console: ConsoleStack
) -> None:
    sign_in(page, console.tokens["operator"])
    reached: list[str] = []
    for _ in range(60):
        page.keyboard.press("Tab")
        reached.append(
            page.evaluate(
                """() => {
                    const el = document.activeElement;
                    if (!el) return "";
                    const label = el.labels && el.labels.length ? el.labels[0].innerText : "";
                    return `${el.tagName} ${el.getAttribute("aria-label") || ""} ${label} `
                        + `${el.innerText || el.value || ""}`.trim();
                }"""
            )
        )
    text = "\n".join(reached)
    for control in ("Fleet", "Agents", "Dispatch", "Sign out", "North BESS 1"):
        assert control in text, f"Tab never reached {control!r}; reached:\n{text}"
    assert re.search(r"^INPUT", text, re.MULTILINE), f"Tab reached no input:\n{text}"


def test_every_input_has_a_label_and_pages_fit_1280_px(page: Page, console: ConsoleStack) -> None:
    sign_in(page, console.tokens["admin"])
    for path in (
        "/",
        f"/console/sites/{NORTH_YARD}",
        f"/console/assets/{NORTH_BESS_2}",
        "/console/dispatch",
        "/console/agents",
        "/console/audit",
    ):
        response = page.goto(path)
        assert response is not None and response.status == 200, f"{path}: {response}"
        unlabelled = page.evaluate(
            """() => [...document.querySelectorAll(
                    "input:not([type=hidden]), select, textarea")]
                .filter((el) => !(el.labels && el.labels.length)
                    && !el.getAttribute("aria-label") && !el.getAttribute("aria-labelledby"))
                .map((el) => el.outerHTML.slice(0, 120))"""
        )
        assert not unlabelled, f"{path}: inputs without a label: {unlabelled}"
        overflow = page.evaluate(
            "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"{path} is {overflow} px wider than 1280 px"


@pytest.mark.parametrize("width", [390])
def test_the_pages_fit_a_narrow_screen(page: Page, console: ConsoleStack, width: int) -> None:
    page.set_viewport_size({"width": width, "height": 844})
    sign_in(page, console.tokens["admin"])
    expect(page.get_by_role("link", name="North BESS 1")).to_be_visible()
    screenshot(page, "fleet-narrow")
    for path in (
        "/",
        f"/console/sites/{NORTH_YARD}",
        f"/console/assets/{NORTH_BESS_2}",
        "/console/dispatch",
        "/console/agents",
        "/console/audit",
    ):
        page.goto(path)
        overflow = page.evaluate(
            "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"{path} is {overflow} px wider than a {width} px screen"


def audited(page: Page, console: ConsoleStack, action: str) -> list[dict[str, object]]:
    """The audit records of ``action`` (``GET /audit`` with the admin's bearer token)."""
    response = page.request.get(
        f"/audit?action={action}",
        headers={"authorization": f"Bearer {console.tokens['admin']}"},
    )
    assert response.ok, f"GET /audit answered {response.status}: {response.text()}"
    return list(response.json())


def test_sign_out_ends_the_session_and_is_audited(page: Page, console: ConsoleStack) -> None:
    sign_in(page, console.tokens["viewer"])
    signed_out_before = len(audited(page, console, "console.sign_out"))
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/console/sign-in"))
    page.goto("/console/agents")
    expect(page).to_have_url(re.compile(r"/console/sign-in"))
    assert page.request.get("/dispatch/history").status == 401
    assert len(audited(page, console, "console.sign_out")) == signed_out_before + 1


def test_admins_see_the_audit_trail_of_console_actions(page: Page, console: ConsoleStack) -> None:
    sign_in(page, console.tokens["operator"])
    expect(page.get_by_role("link", name="Audit")).to_have_count(0)
    assert page.request.get("/console/audit").status == 403
    page.get_by_role("button", name="Sign out").click()
    sign_in(page, console.tokens["admin"])
    page.get_by_role("link", name="Audit").click()
    expect(page.get_by_role("heading", name="Audit")).to_be_visible()
    rows = page.get_by_role("row").filter(has_text="console.sign_in")
    expect(rows.filter(has_text="browser admin").first).to_be_visible()
    expect(rows.filter(has_text="browser operator").first).to_be_visible()
    expect(page.get_by_role("row").filter(has_text="console.sign_out").first).to_be_visible()
    screenshot(page, "audit")
