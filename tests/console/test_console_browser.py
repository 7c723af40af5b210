"""The operator console in a real browser (Debian's Chromium, driven by pytest-playwright):
the flows of issue 18 as a person would go through them, against a headend with
``HEADEND_AUTH=on``, the demo's five simulated batteries and a token per role.

Each test writes a screenshot of its page into docs/console/ (docs/console.md shows them).
"""

from __future__ import annotations

from playwright.sync_api import Page

from tests.console.console_kit import ConsoleStack


def test_chromium_opens_the_headends_openapi_document(page: Page, console: ConsoleStack) -> None:
    response = page.goto("/schema/openapi.json")
    assert response is not None and response.status == 200, response
    assert page.evaluate("() => JSON.parse(document.body.innerText).openapi").startswith("3.")
