"""The test kit shipped to plugin authors (der_sdk.testing): its fixtures work, the
leaked-task check fails leaking tests, and every example of docs/testing.md runs."""

from __future__ import annotations

import re
import socket
import textwrap
from pathlib import Path

import httpx
import pytest

from der_sdk.plugins import Plugins
from der_sdk.testing import (
    DEFAULT_ASSET_IDS,
    DEFAULT_SITE_ID,
    RegisterPlugin,
    SimulatedDevicePlugin,
)
from der_sdk.testing import fixtures as core_fixtures
from der_sdk.testing import pytest_plugin as der_pytest_plugin
from der_sdk.testing.tasks import ALLOW_LEAKS_MARKER
from der_sdk_agent.testing import AgentLink, AgentRunner
from der_sdk_agent.testing import fixtures as agent_fixtures
from der_sdk_headend.service import Headend
from der_sdk_headend.testing import fixtures as headend_fixtures

pytest_plugins = ["pytester"]

FIXTURES = [*core_fixtures.__all__, *headend_fixtures.__all__, *agent_fixtures.__all__]

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "testing.md"
EXAMPLES = ROOT / "docs" / "examples" / "testing"
BESS_1, BESS_2, BESS_3 = DEFAULT_ASSET_IDS

# In-process pytester runs see der_sdk already imported (pytest warns it cannot rewrite
# the plugin package again); hypothesis would be imported afresh on every run.
QUIET = (
    "-q",
    "-p",
    "no:cacheprovider",
    "-p",
    "no:hypothesispytest",
    # pytest-playwright (the console's browser tests) wraps every test in a scope of
    # its own, which an in-process run inside a test would open a second time.
    "-p",
    "no:playwright",
    "-W",
    "ignore::pytest.PytestAssertRewriteWarning",
    "--strict-markers",
)
AUTO_MODE_INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
asyncio_default_test_loop_scope = function
"""


# --------------------------------------------------------------------------- headend


async def test_headend_fixture_serves_healthz_and_assets(
    der_headend: Headend, der_http: httpx.AsyncClient
) -> None:
    health = await der_http.get("/healthz")
    assets = await der_http.get("/assets")

    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["storage"] == "memory"
    assert [a["asset_id"] for a in assets.json()] == list(DEFAULT_ASSET_IDS)
    assert {a["site_id"] for a in assets.json()} == {DEFAULT_SITE_ID}
    assert der_headend.http_url.startswith("http://127.0.0.1:")
    assert der_headend.grpc_addr.startswith("127.0.0.1:")


class TestInventoryOverride:
    SITE = "6f1c2b1e-3d4a-4c5b-8e9f-0a1b2c3d4e5f"
    ASSET = "0b6c1e52-7f0e-4d8a-9a57-2c1f3e4d5a61"

    @pytest.fixture
    def der_inventory_yaml(self) -> str:
        return textwrap.dedent(
            f"""
            sites:
              - {{site_id: {self.SITE}, name: Elsewhere}}
            assets:
              - {{asset_id: {self.ASSET}, site_id: {self.SITE}, name: B, max_mw: 1, min_mw: -1}}
            """
        )

    async def test_the_headend_serves_the_overridden_inventory(
        self, der_http: httpx.AsyncClient
    ) -> None:
        assets = (await der_http.get("/assets")).json()

        assert [a["asset_id"] for a in assets] == [self.ASSET]


# --------------------------------------------------------------------------- agent link


async def test_agent_link_drives_sim_bess_and_a_dispatch_is_applied(
    der_run_agent: AgentRunner,
) -> None:
    link = await der_run_agent(adapter_type="sim-bess", options={"initial_soc_pct": 40})

    assert link.asset_ids == sorted(DEFAULT_ASSET_IDS)
    first = await link.wait_for_telemetry(BESS_3)
    assert first.details["soc_pct"] == pytest.approx(40.0, abs=0.5)

    sent = await link.dispatch(1.0, asset_id=BESS_3)  # BESS 3 is limited to 0.5 MW
    applied = await link.wait_for_dispatch(sent.dispatch_id, "applied")

    assert [(t.asset_id, t.applied_mw) for t in applied.targets] == [(BESS_3, 0.5)]
    sample = await link.wait_for_telemetry(BESS_3, lambda s: s.mw_setpoint == 0.5)
    assert sample.quality == "good"


async def test_agent_link_runs_the_test_device_and_its_faults_reach_the_headend(
    der_agent_link: AgentLink, der_test_device: SimulatedDevicePlugin
) -> None:
    await der_agent_link.wait_for_telemetry(BESS_2, lambda s: s.quality == "good")

    der_test_device.device(BESS_2).inject("disconnect")
    bad = await der_agent_link.wait_for_telemetry(BESS_2, lambda s: s.quality == "bad")
    assert "connection" in (bad.quality_reason or "")
    der_test_device.device(BESS_2).clear()

    await der_agent_link.wait_for_telemetry(BESS_2, lambda s: s.quality == "good")
    good_elsewhere = await der_agent_link.latest_telemetry(BESS_1)
    assert good_elsewhere is not None and good_elsewhere.quality == "good"


async def test_waits_fail_at_their_deadline_saying_what_they_saw(
    der_agent_link: AgentLink,
) -> None:
    await der_agent_link.wait_for_telemetry()

    with pytest.raises(pytest.fail.Exception) as failed:
        await der_agent_link.wait_for_telemetry(BESS_1, lambda s: s.mw > 100, timeout_s=0.2)

    message = str(failed.value)
    assert (
        f"timed out after 0.2 s waiting for a sample matching the condition of asset {BESS_1} "
        "at the headend" in message
    )
    assert "last seen: TelemetrySample(" in message


async def test_wait_for_dispatch_fails_at_once_when_the_dispatch_ends_otherwise(
    der_agent_link: AgentLink, der_test_device: SimulatedDevicePlugin
) -> None:
    der_test_device.device(BESS_1).inject("error")
    sent = await der_agent_link.dispatch(1.0, asset_id=BESS_1)

    with pytest.raises(pytest.fail.Exception, match=r"ended 'failed', not 'applied'"):
        await der_agent_link.wait_for_dispatch(sent.dispatch_id, "applied")


# --------------------------------------------------------------------------- plugins


def test_register_plugin_registers_for_one_test_only(pytester: pytest.Pytester) -> None:
    pytester.makeini(AUTO_MODE_INI)
    pytester.makepyfile(
        test_registered="""
        from der_sdk import hookimpl, load_plugins
        from der_sdk.extensions import SplitPolicy, SplitResult

        SHARED = load_plugins(entry_points=False)


        class NothingPolicy:
            @hookimpl
            def der_split_policies(self):
                return [SplitPolicy(name="nothing", split=lambda mw, assets: SplitResult(
                    shares={}, unallocated_mw=mw))]


        def test_registered_while_the_test_runs(der_register_plugin, der_plugins):
            der_register_plugin(NothingPolicy(), plugins=SHARED)
            name = der_register_plugin(NothingPolicy())
            assert "nothing" in SHARED.split_policies
            assert "nothing" in der_plugins.split_policies
            assert name.startswith("der-test-NothingPolicy-")


        def test_gone_after_it():
            assert "nothing" not in SHARED.split_policies
        """
    )

    result = pytester.runpytest(*QUIET)

    result.assert_outcomes(passed=2)


def test_der_plugins_is_fresh_for_each_test(
    der_plugins: Plugins, der_register_plugin: RegisterPlugin
) -> None:
    assert "test-device" not in der_plugins.adapter_types
    der_register_plugin(SimulatedDevicePlugin())
    assert "test-device" in der_plugins.adapter_types
    assert "sim-bess" in der_plugins.adapter_types  # installed plugins are loaded


# --------------------------------------------------------------------------- leaked tasks

LEAKY_TESTS = """
import asyncio

import pytest

KEEP = []


async def forever():
    await asyncio.sleep(3600)


async def test_leaks():
    KEEP.append(asyncio.create_task(forever(), name="sleeper"))


@pytest.mark.der_allow_task_leaks("on purpose")
async def test_leak_allowed():
    KEEP.append(asyncio.create_task(forever()))


@pytest.mark.der_allow_task_leaks
async def test_marker_without_a_reason():
    pass


async def test_cancelled_and_awaited():
    task = asyncio.create_task(forever())
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_cancelled_but_not_awaited():
    asyncio.create_task(forever()).cancel()


@pytest.fixture
async def server():
    task = asyncio.create_task(forever(), name="server")
    yield KEEP
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_task_stopped_by_a_fixture(server):
    pass


async def test_a_failing_test_reports_its_failure_not_its_leaks():
    KEEP.append(asyncio.create_task(forever()))
    assert False, "the real failure"


def test_sync_tests_are_not_checked():
    pass
"""


def test_leak_check_fails_a_test_that_leaks_a_task(pytester: pytest.Pytester) -> None:
    pytester.makeini(AUTO_MODE_INI)
    pytester.makepyfile(test_leaky=LEAKY_TESTS)

    result = pytester.runpytest(*QUIET)

    result.assert_outcomes(passed=6, failed=1, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks*",
            "test_leaky.py::test_leaks leaked 1 asyncio task(s), still pending after the test "
            "and its fixtures finished*",
            "  - task 'sleeper' running forever() at test_leaky.py:9, waiting in sleep() at "
            "asyncio/tasks.py:*",
            "*mark the test @pytest.mark.der_allow_task_leaks(*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_marker_without_a_reason*",
            "*der_allow_task_leaks needs a reason*",
        ]
    )
    assert "the real failure" in result.stdout.str()
    assert "test_a_failing_test_reports_its_failure_not_its_leaks leaked" not in result.stdout.str()


def test_leak_check_names_where_the_task_was_created_in_debug_mode(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(AUTO_MODE_INI + "asyncio_debug = true\n")
    pytester.makepyfile(test_leaky=LEAKY_TESTS)

    result = pytester.runpytest(*QUIET, "-k", "test_leaks")

    result.stdout.fnmatch_lines(
        ["*task 'sleeper' running forever()*; created at test_leaky.py:13 in test_leaks"]
    )


def test_leak_check_can_be_switched_off_for_a_project(pytester: pytest.Pytester) -> None:
    pytester.makeini(AUTO_MODE_INI + "der_check_task_leaks = false\n")
    pytester.makepyfile(test_leaky=LEAKY_TESTS)

    result = pytester.runpytest(*QUIET, "-k", "not without_a_reason")

    result.assert_outcomes(passed=6, failed=1)


def test_the_plugin_registers_its_marker(pytestconfig: pytest.Config) -> None:
    markers = pytestconfig.getini("markers")
    assert any(line.startswith(f"{ALLOW_LEAKS_MARKER}(reason):") for line in markers)
    assert der_pytest_plugin.HAVE_PYTEST_ASYNCIO


# --------------------------------------------------------------------------- docs


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _copy_examples(pytester: pytest.Pytester) -> list[Path]:
    examples = sorted(EXAMPLES.glob("*.py"))
    for path in examples:
        (pytester.path / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    pytester.makeini(AUTO_MODE_INI)
    return examples


def test_the_docs_examples_run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    examples = _copy_examples(pytester)
    assert len(examples) >= 8
    monkeypatch.setenv("DER_TEST_PG_PORT", str(_unused_port()))  # no PostgreSQL there
    monkeypatch.delenv("DER_SDK_REQUIRE_SERVICES", raising=False)

    result = pytester.runpytest(*QUIET, "-rs")

    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == outcomes.get("errors", 0) == 0, result.stdout.str()
    assert outcomes["passed"] >= 40
    skips = [line for line in result.stdout.lines if line.startswith("SKIPPED")]
    expected = ("PostgreSQL is not reachable", "adapter offers no fault injection")
    assert all(any(reason in line for reason in expected) for line in skips), skips


def test_required_services_turn_the_docs_example_skips_into_failures(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _copy_examples(pytester)
    monkeypatch.setenv("DER_TEST_PG_PORT", str(_unused_port()))
    monkeypatch.setenv("DER_SDK_REQUIRE_SERVICES", "1")

    result = pytester.runpytest(*QUIET, "test_example_storage_conformance.py", "-k", "Postgres")

    outcomes = result.parseoutcomes()
    assert "passed" not in outcomes and "skipped" not in outcomes, outcomes
    result.stdout.fnmatch_lines(
        ["*PostgreSQL is not reachable*DER_SDK_REQUIRE_SERVICES=1 requires*"]
    )


def test_the_guide_quotes_every_example_verbatim() -> None:
    guide = GUIDE.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", guide, flags=re.S)
    for path in sorted(EXAMPLES.glob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        assert relative in guide, f"docs/testing.md does not name {relative}"
        assert path.read_text(encoding="utf-8") in blocks, (
            f"docs/testing.md does not quote {relative} verbatim"
        )


def test_the_guide_documents_every_fixture_and_the_marker() -> None:
    guide = GUIDE.read_text(encoding="utf-8")
    for name in FIXTURES:
        if name.startswith("der_"):
            assert f"`{name}`" in guide, f"docs/testing.md does not document fixture {name}"
    for term in (ALLOW_LEAKS_MARKER, "der_check_task_leaks", "DER_SDK_REQUIRE_SERVICES"):
        assert term in guide
