"""The der-sdk pytest plugin, registered through the ``pytest11`` entry point: installing
der-sdk makes its fixtures, markers and the leaked-task check available to every test
suite in the environment (``-p no:der_sdk`` turns it off).

* fixtures (:mod:`der_sdk.testing.fixtures`): ``der_plugins``, ``der_register_plugin``,
  ``der_test_device``, ``der_inventory_yaml``, ``der_inventory_path``, ``der_inventory``;
* the leaked-task check (:mod:`der_sdk.testing.tasks`), with its marker
  ``der_allow_task_leaks(reason)`` and ini option ``der_check_task_leaks``.

The fixtures that run a headend or an agent come from the pytest plugins of those apps,
registered the same way: :mod:`der_sdk_headend.testing.pytest_plugin` (``der_headend``...)
and :mod:`der_sdk_agent.testing.pytest_plugin` (``der_agent_link``...).

The fixtures need pytest-asyncio; without it only the plugin's markers load.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

# Before the conformance modules are imported: their asserts then explain themselves.
pytest.register_assert_rewrite("der_sdk.testing.conformance", "der_sdk.testing.bus_conformance")

from der_sdk.testing import tasks  # noqa: E402

try:
    import pytest_asyncio  # noqa: F401
except ImportError:  # pragma: no cover - the fixtures need pytest-asyncio
    HAVE_PYTEST_ASYNCIO = False
else:
    HAVE_PYTEST_ASYNCIO = True
    from der_sdk.testing.fixtures import (
        der_inventory,
        der_inventory_path,
        der_inventory_yaml,
        der_plugins,
        der_register_plugin,
        der_test_device,
    )

    __all__ = [
        "der_inventory",
        "der_inventory_path",
        "der_inventory_yaml",
        "der_plugins",
        "der_register_plugin",
        "der_test_device",
    ]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        tasks.INI_OPTION,
        type="bool",
        default=True,
        help="der-sdk: fail async tests that leave asyncio tasks running (default: true)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{tasks.ALLOW_LEAKS_MARKER}(reason): der-sdk: this test may leave asyncio tasks "
        "running; the leaked-task check skips it",
    )


def pytest_report_header(config: pytest.Config) -> str | None:
    if HAVE_PYTEST_ASYNCIO:
        return None
    return "der-sdk: install pytest-asyncio for the der_* fixtures and the leaked-task check"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    tasks.record_call_outcome(item, report)
    return report


@pytest.fixture(autouse=True)
def _der_task_leak_check(request: pytest.FixtureRequest) -> Generator[None, None, None]:
    """Fail an async test that leaves asyncio tasks running (see der_sdk.testing.tasks)."""
    yield from tasks.task_leak_check(request)
