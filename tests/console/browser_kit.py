"""What the browser tests do in a page: sign in, post from the page, count dispatches,
write a screenshot."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from tests.console.console_kit import SCREENSHOTS

LIVE_S = 10_000  # ms: what a person would wait for a live update (samples come every 0.25 s)


def screenshot(page: Page, name: str) -> None:
    """Write the page (its full height) to docs/console/NAME.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def sign_in(page: Page, token: str, *, next_path: str = "/") -> None:
    """Open ``next_path``, get sent to the sign-in page, sign in with ``token`` and land on
    ``next_path``."""
    page.goto(next_path)
    expect(page).to_have_url(re.compile(r"/console/sign-in"))
    page.get_by_label("REST token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(re.escape(next_path) + r"$"))
    # The URL changes before the landed page's deferred scripts run. A form used before
    # htmx has bound it is posted as a whole page, leaving the page under test (CI saw
    # the Site page replaced by its bare preview this way), so wait for the load event:
    # it fires after the scripts and htmx's DOMContentLoaded processing.
    page.wait_for_load_state("load")


def csrf_of(page: Page) -> str:
    return page.locator('meta[name="csrf-token"]').get_attribute("content") or ""


def post_from_page(page: Page, path: str, body: dict[str, object], csrf: str | None) -> int:
    """``fetch`` a JSON POST from the page: the browser sends the console cookie; the CSRF
    header only when ``csrf`` is given. Returns the status."""
    return int(
        page.evaluate(
            """async ([path, body, csrf]) => {
                const headers = {"content-type": "application/json"};
                if (csrf !== null) headers["X-CSRF-Token"] = csrf;
                const r = await fetch(path, {method: "POST", headers, body: JSON.stringify(body),
                                             credentials: "same-origin"});
                return r.status;
            }""",
            [path, body, csrf],
        )
    )


def dispatch_count(page: Page) -> int:
    """How many dispatches the headend holds (GET /dispatch/history with the cookie)."""
    response = page.request.get("/dispatch/history?limit=500")
    assert response.ok, f"GET /dispatch/history answered {response.status}: {response.text()}"
    body = response.json()
    items = body["items"] if isinstance(body, dict) else body
    return len(items)
