"""The adapter conformance suite against the ``test-device`` adapter, which offers every
fault, so the fault tests run instead of skipping; and proof that the suite fails
adapters that break the contract (run with pytester against deliberately broken ones)."""

from __future__ import annotations

import textwrap
from collections.abc import Callable

import pytest

from der_sdk.extensions import Adapter
from der_sdk.plugins import Plugins, load_plugins
from der_sdk.testing import FAULT_KINDS, AdapterConformance, FaultyAdapter, SimulatedDevicePlugin

pytest_plugins = ["pytester"]

# In-process pytester runs see der_sdk already imported; pytest then warns it cannot
# rewrite the asserts of the der_sdk pytest plugin's package again.
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
)


class TestDeviceConformance(AdapterConformance):
    adapter_type = "test-device"
    options = {"timeout_s": 0.2}

    def load_plugins(self) -> Plugins:
        return load_plugins(entry_points=False, extra=[("test-device", SimulatedDevicePlugin())])

    async def inject_fault(self, adapter: Adapter, kind: str) -> bool:
        assert isinstance(adapter, FaultyAdapter)
        adapter.inject(kind)
        return True

    async def clear_fault(self, adapter: Adapter, kind: str) -> None:
        assert isinstance(adapter, FaultyAdapter)
        adapter.clear(kind)


# --------------------------------------------------------------------------- broken adapters

BROKEN_ADAPTERS = """
import asyncio
import time

from der_sdk.extensions import SetpointResult
from der_sdk.models import TelemetrySample, utc_now
from der_sdk.plugins import hookimpl, load_plugins
from der_sdk.testing import AdapterConformance, FaultyAdapter, SimulatedDevicePlugin


class Blocking(FaultyAdapter):
    async def read(self):
        time.sleep(0.12)  # a sync driver call
        return await super().read()


class StaleAsFresh(FaultyAdapter):
    async def read(self):
        reading = await self.device.measure()
        return TelemetrySample(
            asset_id=self.asset.asset_id, site_id=self.asset.site_id, ts=utc_now(), mw=reading.mw
        )


class BeyondLimits(FaultyAdapter):
    async def apply_setpoint(self, mw, duration_s=None):
        await self.device.write_setpoint(mw)
        return SetpointResult(status="applied", applied_mw=mw)


class SwallowsCancellation(FaultyAdapter):
    async def read(self):
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            pass
        return await super().read()


class NeverSaysBad(FaultyAdapter):
    async def read(self):
        sample = await super().read()
        if sample.quality == "bad":
            sample.quality = "uncertain"
        return sample


class LeavesATaskRunning(FaultyAdapter):
    async def connect(self):
        await super().connect()
        self.poller = asyncio.create_task(asyncio.sleep(3600), name="forgotten-poller")


class Plugin(SimulatedDevicePlugin):
    def __init__(self, cls):
        super().__init__(name="broken")
        self.cls = cls

    def build(self, context):
        return self.cls(context, self.device(context.asset.asset_id))


class BrokenConformance(AdapterConformance):
    adapter_type = "broken"
    broken: type

    def load_plugins(self):
        return load_plugins(entry_points=False, extra=[("broken", Plugin(self.broken))])

    async def inject_fault(self, adapter, kind):
        adapter.inject(kind)
        return True

    async def clear_fault(self, adapter, kind):
        adapter.clear(kind)
"""


RunAgainst = Callable[..., pytest.RunResult]


@pytest.fixture
def run_against(pytester: pytest.Pytester) -> RunAgainst:
    """``run_against("Blocking", "test_name", ...)``: those suite tests on that adapter."""
    pytester.makeini(
        """
        [pytest]
        asyncio_default_fixture_loop_scope = function
        asyncio_default_test_loop_scope = function
        """
    )
    pytester.makepyfile(broken_adapters=BROKEN_ADAPTERS)

    def run(broken: str, *tests: str) -> pytest.RunResult:
        pytester.makepyfile(
            test_broken=textwrap.dedent(
                f"""
                from broken_adapters import BrokenConformance, {broken}

                class TestBroken(BrokenConformance):
                    broken = {broken}
                """
            )
        )
        return pytester.runpytest(*QUIET, "-k", " or ".join(tests))

    return run


def test_an_adapter_that_blocks_the_loop_fails(run_against: RunAgainst) -> None:
    result = run_against("Blocking", "test_methods_do_not_block_the_event_loop")

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*broken: read() blocked the event loop for 0.1* s*", "*asyncio.to_thread()*"]
    )


def test_an_adapter_that_reports_stale_values_as_fresh_fails(run_against: RunAgainst) -> None:
    result = run_against("StaleAsFresh", "test_stale_device_value_is_never_reported_as_fresh")

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*read() during a 'stale' fault returned quality 'good'*stale value reported as fresh*"]
    )


def test_an_adapter_that_applies_beyond_the_limits_fails(run_against: RunAgainst) -> None:
    result = run_against(
        "BeyondLimits",
        "test_setpoint_beyond_limits_is_clamped_or_rejected_never_applied_beyond",
        "test_setpoint_within_limits_is_applied",
    )

    result.assert_outcomes(failed=1, passed=1)
    assert (
        "broken: apply_setpoint(3) reported applied_mw=3, outside the asset's limits [-2, 2] MW"
        in result.stdout.str()
    )


def test_an_adapter_that_never_reports_a_fault_as_bad_fails(run_against: RunAgainst) -> None:
    result = run_against("NeverSaysBad", "test_device_error_gives_bad_quality_with_a_reason")

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*broken: read() still returned quality 'uncertain' (*) 1 s into the 'error' fault*"]
    )


def test_an_adapter_that_swallows_cancellation_fails(run_against: RunAgainst) -> None:
    result = run_against("SwallowsCancellation", "test_cancelling_a_read_or_setpoint_midway")

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*read() cancelled * did not end cancelled but returned*"])


def test_an_adapter_that_leaves_a_task_running_fails(run_against: RunAgainst) -> None:
    result = run_against("LeavesATaskRunning", "test_cancelling_a_read_or_setpoint_midway")

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*close() left 1 task(s) running*", "*task 'forgotten-poller' running sleep()*"]
    )


def test_a_conforming_adapter_passes_every_test_with_faults_run_not_skipped(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        test_good=BROKEN_ADAPTERS
        + "\n\nclass TestGood(BrokenConformance):\n    broken = FaultyAdapter\n"
    )

    result = pytester.runpytest(*QUIET, "-rs")

    result.assert_outcomes(passed=len(_conformance_tests()))


def test_the_fault_tests_cover_every_fault_kind() -> None:
    names = " ".join(_conformance_tests())
    for kind in FAULT_KINDS:
        assert kind in names.replace("device_error", "error"), kind


def _conformance_tests() -> list[str]:
    return [name for name in dir(AdapterConformance) if name.startswith("test_")]
