"""Fixtures of the console's browser tests: pytest-playwright driving Debian's Chromium
(``/usr/bin/chromium``, package ``chromium``; never a browser that ``playwright install``
downloads) against a real headend with the demo's agents (:mod:`console_kit`).

Without Chromium the tests skip, saying so; with ``DER_SDK_REQUIRE_BROWSER=1`` (set by
``.ci/run``) they fail instead. ``DER_SDK_CHROMIUM`` names another Chromium binary.

Playwright's sync API keeps an event loop marked running on the main thread for as long
as it is started, and pytest-asyncio cannot run a test while it is. pytest-playwright
starts it once per session, which would break every async test after the browser tests;
so here Playwright and the browser live for one test module (the async tests of this
folder and the rest of the suite run before or after, never beside it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserType, Playwright, sync_playwright

from tests.console.console_kit import ConsoleStack

CHROMIUM = Path(os.environ.get("DER_SDK_CHROMIUM", "/usr/bin/chromium"))
DESKTOP = {"width": 1280, "height": 800}


def _browser_required() -> bool:
    return os.environ.get("DER_SDK_REQUIRE_BROWSER", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def chromium_executable() -> Path:
    """The Chromium binary; skips (or fails, under ``DER_SDK_REQUIRE_BROWSER=1``) when it is
    missing."""
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    reason = (
        f"browser tests need Chromium at {CHROMIUM} (Debian: apt-get install chromium; "
        "or set DER_SDK_CHROMIUM); .ci/run installs it"
    )
    if _browser_required():
        pytest.fail(f"DER_SDK_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


# pytest-playwright's session fixtures, overridden for one module (see the docstring).


@pytest.fixture(scope="module")
def playwright(chromium_executable: Path) -> Iterator[Playwright]:
    pw = sync_playwright().start()
    try:
        yield pw
    finally:
        pw.stop()


@pytest.fixture(scope="module")
def browser_type(playwright: Playwright) -> BrowserType:
    return playwright.chromium


@pytest.fixture(scope="module")
def browser_type_launch_args(
    browser_type_launch_args: dict[str, Any], chromium_executable: Path
) -> dict[str, Any]:
    """pytest-playwright's launch arguments (headless unless ``--headed``), with Debian's
    Chromium."""
    return {**browser_type_launch_args, "executable_path": str(chromium_executable)}


@pytest.fixture(scope="module")
def launch_browser(
    browser_type_launch_args: dict[str, Any], browser_type: BrowserType
) -> Callable[..., Browser]:
    def launch(**kwargs: Any) -> Browser:
        return browser_type.launch(**{**browser_type_launch_args, **kwargs})

    return launch


@pytest.fixture(scope="module")
def browser(launch_browser: Callable[..., Browser]) -> Iterator[Browser]:
    browser = launch_browser()
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture(scope="module")
def console(
    chromium_executable: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ConsoleStack]:
    """The headend (``HEADEND_AUTH=on``) with the demo's inventory, agents and tokens,
    shared by the browser tests of a module (starting it once keeps the suite fast)."""
    stack = ConsoleStack(tmp_path_factory.mktemp("console"))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def base_url(console: ConsoleStack) -> str:
    """The console's headend: ``page.goto("/")`` opens the fleet page."""
    return console.url


@pytest.fixture(scope="module")
def browser_context_args(base_url: str) -> dict[str, Any]:
    """Pages open at 1280 px wide on the console's headend (a test may set another
    viewport)."""
    return {"base_url": base_url, "viewport": DESKTOP}
