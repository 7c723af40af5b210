"""Conformance suites a plugin author subclasses: one for adapters, one for storage backends.

Subclass in a test module, name the subclass ``Test...`` so pytest collects it, and set
the class attributes; every test method of the base class then runs against your plugin::

    from der_sdk.testing import AdapterConformance, StorageConformance

    class TestMyAdapter(AdapterConformance):
        adapter_type = "my-adapter"
        options = {"host": "127.0.0.1", "port": 5020}

    class TestMyStorage(StorageConformance):
        url = "mydb://{tmp}/der.db"

Test names say the behaviour they prove; a skipped test says why. The suites work in
pytest-asyncio's ``auto`` and ``strict`` modes.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar, Literal

import msgspec
import pytest
import pytest_asyncio

from der_sdk.agent_config import convert_options
from der_sdk.errors import DerSdkError
from der_sdk.extensions import Adapter, AdapterContext, DeviceProfile, SetpointResult
from der_sdk.models import (
    Alarm,
    Asset,
    Dispatch,
    DispatchEvent,
    DispatchState,
    DispatchTarget,
    Event,
    Heartbeat,
    ScheduleStep,
    Session,
    TargetStep,
    TelemetrySample,
)
from der_sdk.plugins import Plugins, load_plugins
from der_sdk.storage.contract import StorageBackend, open_storage
from der_sdk.testing.blocking import DEFAULT_THRESHOLD_S, BlockingWatch
from der_sdk.testing.tasks import describe_task, find_leaked_tasks

__all__ = ["DEFAULT_CONFORMANCE_ASSET", "AdapterConformance", "StorageConformance"]

DEFAULT_CONFORMANCE_ASSET = Asset(
    asset_id="c0f0a11e-0000-4000-8000-000000000001",
    site_id="c0f0a11e-0000-4000-8000-0000000000a1",
    name="Conformance BESS",
    asset_type="bess",
    capacity_mwh=4.0,
    max_mw=2.0,
    min_mw=-2.0,
)
"""A 4 MWh battery that discharges up to 2 MW and charges up to 2 MW."""

_QUALITIES = ("good", "uncertain", "bad")


# =========================================================================== adapters


@dataclass(frozen=True)
class _Outcome:
    """What one call did: returned ``value``, raised ``error``, or ``hung``."""

    value: Any = None
    error: BaseException | None = None
    hung: bool = False

    def describe(self) -> str:
        if self.hung:
            return "hung (cancelled by the suite)"
        if self.error is not None:
            return f"raised {type(self.error).__name__}: {self.error}"
        if isinstance(self.value, TelemetrySample):
            s = self.value
            return f"returned quality {s.quality!r} (reason {s.quality_reason!r}), ts {s.ts}"
        return f"returned {self.value!r}"


class _LazyProfiles(Mapping[str, DeviceProfile]):
    """The installed device profiles, collected only if the adapter looks at them."""

    def __init__(self, plugins: Plugins) -> None:
        self._plugins = plugins
        self._profiles: dict[str, DeviceProfile] | None = None

    def _all(self) -> dict[str, DeviceProfile]:
        if self._profiles is None:
            self._profiles = {p.name: p for p in self._plugins.device_profiles}
        return self._profiles

    def __getitem__(self, name: str) -> DeviceProfile:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


class AdapterConformance:
    """The adapter contract (:class:`der_sdk.extensions.Adapter`), as tests.

    **Class attributes** (set them in your subclass):

    ``adapter_type: str``
        The adapter type name, looked up in the installed plugins (:func:`load_plugins`).
    ``options: Mapping[str, Any]``
        The per-asset options, as they would appear in the agent config (validated against
        the type's options Struct). Default: none.
    ``asset: Asset``
        The asset the adapter serves. Default: :data:`DEFAULT_CONFORMANCE_ASSET`, a
        4 MWh battery limited to ``[-2, 2]`` MW.
    ``fault_timeout_s: float = 1.0``
        How long the adapter may take to report an injected fault: a read may hang that long
        (hanging is allowed, the agent times reads out; ignoring cancellation is not), and
        reads may repeat the last reading as ``uncertain`` that long before they must say
        ``bad``. Also how long reads may take to recover once the fault is cleared.
    ``call_timeout_s: float = 5.0``
        How long any call may take without a fault.
    ``blocking_threshold_s: float = 0.05``
        A callback that holds the event loop longer fails
        ``test_methods_do_not_block_the_event_loop``.
    ``setpoint_tolerance_mw: float = 0.001``
        How far ``applied_mw`` may differ from the command or the limits (rounding).

    **Hooks** (override them):

    ``def load_plugins(self) -> Plugins``
        Where ``adapter_type`` is found. Default: ``der_sdk.load_plugins()``.
    ``def build_adapter(self) -> Adapter``
        A new, unconnected adapter. Default: the type's factory with ``asset`` and
        ``options``, as the agent builds it.
    ``async def inject_fault(self, adapter, kind: str) -> bool``
        Make the device behind ``adapter`` fail: ``"timeout"`` (calls hang), ``"error"``
        (the device answers with an error), ``"disconnect"`` (the connection drops and
        reconnecting fails) or ``"stale"`` (the device keeps returning its last value and
        timestamp). Return ``False`` when you cannot: that test skips. Default: ``False``.
    ``async def clear_fault(self, adapter, kind: str) -> None``
        Undo :meth:`inject_fault`; the adapter must then read good samples again (the
        suite closes and connects it again if reads alone do not recover, as the agent
        does).
    """

    adapter_type: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Any]] = {}
    asset: ClassVar[Asset] = DEFAULT_CONFORMANCE_ASSET
    fault_timeout_s: ClassVar[float] = 1.0
    call_timeout_s: ClassVar[float] = 5.0
    blocking_threshold_s: ClassVar[float] = DEFAULT_THRESHOLD_S
    setpoint_tolerance_mw: ClassVar[float] = 0.001

    # ------------------------------------------------------------------ hooks

    def load_plugins(self) -> Plugins:
        return load_plugins()

    def build_adapter(self) -> Adapter:
        if not self.adapter_type:
            raise DerSdkError(
                f"{type(self).__name__}: set the class attribute adapter_type to the name of "
                "the adapter type under test"
            )
        plugins = self.load_plugins()
        adapter_type = plugins.adapter_types.get(self.adapter_type)
        options = convert_options(
            dict(self.options), adapter_type.options, what=f"adapter {self.adapter_type!r}"
        )
        adapter = adapter_type.factory(
            AdapterContext(asset=self.asset, options=options, profiles=_LazyProfiles(plugins))
        )
        if not isinstance(adapter, Adapter):
            raise TypeError(
                f"the factory of {self.adapter_type!r} returned {type(adapter).__name__}, "
                "not a der_sdk.extensions.Adapter"
            )
        return adapter

    async def inject_fault(self, adapter: Adapter, kind: str) -> bool:
        return False

    async def clear_fault(self, adapter: Adapter, kind: str) -> None:
        return None

    # ------------------------------------------------------------------ fixture

    @pytest_asyncio.fixture
    async def adapter(self) -> AsyncIterator[Adapter]:
        """A fresh adapter for each test; closed afterwards (errors there are ignored)."""
        built = self.build_adapter()
        try:
            yield built
        finally:
            closing = asyncio.ensure_future(built.close())
            await asyncio.wait({closing}, timeout=self.call_timeout_s)
            if closing.done():
                if not closing.cancelled():
                    closing.exception()  # retrieved: a failing close has its own test
            else:
                closing.cancel()
                await asyncio.wait({closing}, timeout=1.0)

    # ------------------------------------------------------------------ helpers

    def _name(self, method: str) -> str:
        return f"{self.adapter_type or type(self).__name__}: {method}"

    async def _outcome(
        self, make: Callable[[], Awaitable[Any]], timeout_s: float, what: str
    ) -> _Outcome:
        """Run one call in a task; a call still running after ``timeout_s`` is cancelled."""

        async def call() -> Any:
            return await make()

        task = asyncio.create_task(call(), name=self._name(what))
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if done:
            if task.cancelled():
                return _Outcome(error=asyncio.CancelledError())
            error = task.exception()
            return _Outcome(error=error) if error is not None else _Outcome(value=task.result())
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if not done:
            pytest.fail(
                f"{self._name(what)} hung, and was still running 1 s after it was cancelled: "
                "the adapter ignores cancellation, so the agent's timeouts cannot stop it. "
                "Do not catch asyncio.CancelledError (or re-raise it).",
                pytrace=False,
            )
        return _Outcome(hung=True)

    async def _call(self, make: Callable[[], Awaitable[Any]], what: str) -> Any:
        """A call that must succeed (no fault is injected)."""
        outcome = await self._outcome(make, self.call_timeout_s, what)
        if outcome.hung:
            pytest.fail(
                f"{self._name(what)} did not finish within {self.call_timeout_s:g} s with no "
                "fault injected",
                pytrace=False,
            )
        if outcome.error is not None:
            raise AssertionError(
                f"{self._name(what)} raised {type(outcome.error).__name__}: {outcome.error} "
                "with no fault injected"
            ) from outcome.error
        return outcome.value

    async def _connect(self, adapter: Adapter) -> None:
        await self._call(adapter.connect, "connect()")

    async def _read(self, adapter: Adapter) -> TelemetrySample:
        sample = await self._call(adapter.read, "read()")
        self._check_sample(sample, "read()")
        return sample  # type: ignore[no-any-return]

    async def _read_good(self, adapter: Adapter, what: str = "read()") -> TelemetrySample:
        sample = await self._read(adapter)
        assert sample.quality == "good", (
            f"{self._name(what)} returned quality {sample.quality!r} "
            f"({sample.quality_reason}) with no fault injected; expected 'good'"
        )
        return sample

    async def _apply(self, adapter: Adapter, mw: float) -> SetpointResult:
        result = await self._call(lambda: adapter.apply_setpoint(mw), f"apply_setpoint({mw:g})")
        assert isinstance(result, SetpointResult), (
            f"{self._name('apply_setpoint()')} returned {type(result).__name__}, "
            "not a der_sdk.extensions.SetpointResult"
        )
        return result

    def _check_sample(self, sample: Any, what: str) -> None:
        name = self._name(what)
        assert isinstance(sample, TelemetrySample), (
            f"{name} returned {type(sample).__name__}, not a der_sdk.models.TelemetrySample"
        )
        assert sample.asset_id == self.asset.asset_id, (
            f"{name} returned a sample for asset {sample.asset_id!r}, "
            f"not the adapter's asset {self.asset.asset_id!r}"
        )
        assert sample.site_id == self.asset.site_id, (
            f"{name} returned site_id {sample.site_id!r}, not the asset's {self.asset.site_id!r}"
        )
        assert isinstance(sample.ts, datetime) and sample.ts.tzinfo is not None, (
            f"{name} returned a naive timestamp {sample.ts!r}; use der_sdk.models.utc_now()"
        )
        assert sample.ts.utcoffset() == timedelta(0), (
            f"{name} returned ts {sample.ts.isoformat()} which is not in UTC"
        )
        assert isinstance(sample.mw, int | float) and math.isfinite(sample.mw), (
            f"{name} returned mw={sample.mw!r}; it must be a finite number (0.0 on a bad sample)"
        )
        assert sample.quality in _QUALITIES, (
            f"{name} returned quality {sample.quality!r}; one of {', '.join(_QUALITIES)}"
        )
        if sample.quality != "good":
            assert sample.quality_reason, (
                f"{name} returned quality {sample.quality!r} without a quality_reason; say why"
            )
        if sample.mw_setpoint is not None:
            assert math.isfinite(sample.mw_setpoint), (
                f"{name} returned mw_setpoint={sample.mw_setpoint!r}; finite or None"
            )

    def _within_limits(self, mw: float) -> bool:
        tol = self.setpoint_tolerance_mw
        return self.asset.min_mw - tol <= mw <= self.asset.max_mw + tol

    def _setpoints_within_limits(self) -> list[float]:
        a = self.asset
        values = [a.clamp(0.0), a.max_mw, a.min_mw, (a.max_mw + a.min_mw) / 2]
        if a.max_mw > 0:
            values.append(a.max_mw / 2)
        if a.min_mw < 0:
            values.append(a.min_mw / 2)
        return list(dict.fromkeys(values))

    async def _skip_unless_injected(self, adapter: Adapter, kind: str) -> None:
        if not await self.inject_fault(adapter, kind):
            pytest.skip(f"adapter offers no fault injection for {kind}: override inject_fault")

    async def _read_during_fault(self, adapter: Adapter, kind: str) -> _Outcome:
        """One read under a fault: it may raise or hang (and end when cancelled); a sample
        must not be good, and must say why it is not."""
        outcome = await self._outcome(adapter.read, self.fault_timeout_s, "read()")
        if outcome.value is None:
            return outcome
        sample = outcome.value
        what = f"read() during a {kind!r} fault"
        self._check_sample(sample, what)
        if sample.quality == "good":
            pytest.fail(
                f"{self._name(what)} returned quality 'good' (mw={sample.mw}, ts={sample.ts}): "
                "a stale value reported as fresh. While the device fails, return quality "
                "'bad' with a quality_reason (or raise, and the agent will)"
                + (
                    "; a value that stopped updating is 'uncertain' or 'bad'"
                    if kind == "stale"
                    else ""
                ),
                pytrace=False,
            )
        return outcome

    async def _read_until_reported(self, adapter: Adapter, kind: str) -> _Outcome:
        """Read until the adapter reports the fault: a ``bad`` sample, an error, or a hang.

        Until then reads may repeat the last reading as ``uncertain`` (a device that is
        merely slow looks the same at first), for at most ``fault_timeout_s``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.fault_timeout_s
        while True:
            outcome = await self._read_during_fault(adapter, kind)
            if outcome.value is None or outcome.value.quality == "bad":
                return outcome
            if loop.time() >= deadline:
                pytest.fail(
                    f"{self._name('read()')} still returned quality "
                    f"{outcome.value.quality!r} ({outcome.value.quality_reason}) "
                    f"{self.fault_timeout_s:g} s into the {kind!r} fault: once the device has "
                    "failed, say so with quality 'bad' and a quality_reason (or raise). Raise "
                    "fault_timeout_s if your adapter needs longer to notice.",
                    pytrace=False,
                )
            await asyncio.sleep(0.05)

    async def _recover(self, adapter: Adapter, kind: str, after: datetime) -> TelemetrySample:
        """After ``clear_fault``: reads recover, or close() + connect() recovers them, each
        within ``fault_timeout_s``."""
        loop = asyncio.get_running_loop()
        last = _Outcome()
        for reconnect in (False, True):
            if reconnect:  # as the agent does after failed reads
                await self._outcome(adapter.close, self.fault_timeout_s, "close()")
                await self._outcome(adapter.connect, self.fault_timeout_s, "connect()")
            deadline = loop.time() + self.fault_timeout_s
            while True:
                last = await self._outcome(adapter.read, self.fault_timeout_s, "read()")
                sample = last.value
                if isinstance(sample, TelemetrySample) and sample.quality == "good":
                    self._check_sample(sample, f"read() after clearing a {kind!r} fault")
                    assert sample.ts > after, (
                        f"{self._name('read()')} after clearing a {kind!r} fault returned a "
                        f"good sample stamped {sample.ts.isoformat()}, not newer than the last "
                        f"good sample before the fault ({after.isoformat()})"
                    )
                    return sample
                if loop.time() >= deadline:
                    break
                await asyncio.sleep(0.05)
        pytest.fail(
            f"{self._name('read()')} did not read a good sample again within "
            f"{self.fault_timeout_s:g} s of clear_fault({kind!r}), nor after close() and "
            f"connect(); last read {last.describe()}",
            pytrace=False,
        )

    async def _fault_scenario(self, adapter: Adapter, kind: str) -> None:
        await self._connect(adapter)
        baseline = await self._read_good(adapter)
        await asyncio.sleep(0.01)  # coarse clocks: let time move past the baseline
        await self._skip_unless_injected(adapter, kind)
        try:
            if kind == "stale":  # never good, for as long as the value stays frozen
                for _ in range(3):
                    await self._read_during_fault(adapter, kind)
                    await asyncio.sleep(0.02)
            else:
                await self._read_until_reported(adapter, kind)
        finally:
            await self.clear_fault(adapter, kind)
        await self._recover(adapter, kind, after=baseline.ts)

    # ------------------------------------------------------------------ tests: lifecycle

    @pytest.mark.asyncio
    async def test_connects_reads_applies_a_setpoint_and_closes(self, adapter: Adapter) -> None:
        await self._connect(adapter)
        await self._read_good(adapter)
        mw = self.asset.clamp(self.asset.max_mw / 2)
        result = await self._apply(adapter, mw)
        assert result.status == "applied", (
            f"{self._name(f'apply_setpoint({mw:g})')} returned {result.status!r} "
            f"({result.reason}) for a setpoint within the limits"
        )
        await self._read_good(adapter, "read() after a setpoint")
        await self._call(adapter.close, "close()")

    @pytest.mark.asyncio
    async def test_read_returns_a_valid_sample_of_the_asset(self, adapter: Adapter) -> None:
        await self._connect(adapter)
        sample = await self._read_good(adapter)  # checks identity, ts, mw and quality
        asset_type = self.load_plugins().asset_types.get(self.asset.asset_type)
        try:
            msgspec.convert(sample.details, asset_type.details)
        except msgspec.ValidationError as exc:
            pytest.fail(
                f"{self._name('read()')} returned details that do not match asset type "
                f"{asset_type.name!r}: {exc}",
                pytrace=False,
            )

    @pytest.mark.asyncio
    async def test_good_samples_never_repeat_a_timestamp(self, adapter: Adapter) -> None:
        await self._connect(adapter)
        stamps: list[datetime] = []
        for _ in range(4):
            stamps.append((await self._read_good(adapter)).ts)
            await asyncio.sleep(0.02)
        repeats = [ts for prev, ts in itertools.pairwise(stamps) if ts <= prev]
        assert not repeats, (
            f"{self._name('read()')} returned good samples whose ts did not increase "
            f"({', '.join(ts.isoformat() for ts in stamps)}): a repeated timestamp is a cached "
            "value reported again, and storage keeps only the first sample per timestamp"
        )

    @pytest.mark.asyncio
    async def test_read_nowait_returns_each_ready_sample_once_and_never_blocks(
        self, adapter: Adapter
    ) -> None:
        """An adapter without :meth:`~der_sdk.extensions.Adapter.read_nowait` passes (it
        always answers ``None``); one with it returns a valid sample of the asset or
        ``None``, at once, and a sample it returned counts as read."""
        await self._connect(adapter)
        await self._read_good(adapter)
        name = self._name("read_nowait()")
        seen: list[TelemetrySample] = []
        for _ in range(20):
            loop = asyncio.get_running_loop()
            started = loop.time()
            sample = adapter.read_nowait()
            took = loop.time() - started
            assert took < self.blocking_threshold_s, (
                f"{name} took {took * 1000:.0f} ms (more than blocking_threshold_s="
                f"{self.blocking_threshold_s:g}): it must not block"
            )
            if sample is not None:
                self._check_sample(sample, "read_nowait()")
                assert sample.quality == "good", (
                    f"{name} returned quality {sample.quality!r} ({sample.quality_reason}) "
                    "with no fault injected; expected 'good'"
                )
                assert not seen or sample.ts > seen[-1].ts, (
                    f"{name} returned a sample at {sample.ts.isoformat()} again, or one "
                    "older than the last: a sample it returns counts as read"
                )
                seen.append(sample)
            await asyncio.sleep(0.05)
        if seen:
            after = await self._read(adapter)
            assert after.quality != "good" or after.ts > seen[-1].ts, (
                f"{self._name('read()')} returned the good sample read_nowait() had "
                f"already returned (ts {after.ts.isoformat()})"
            )

    @pytest.mark.asyncio
    async def test_close_is_idempotent(self, adapter: Adapter) -> None:
        await self._connect(adapter)
        await self._read_good(adapter)
        await self._call(adapter.close, "close()")
        await self._call(adapter.close, "close() a second time")

    @pytest.mark.asyncio
    async def test_connects_again_after_close(self, adapter: Adapter) -> None:
        await self._connect(adapter)
        first = await self._read_good(adapter)
        await self._call(adapter.close, "close()")
        await asyncio.sleep(0.01)
        await self._call(adapter.connect, "connect() after close()")
        again = await self._read_good(adapter, "read() after reconnecting")
        assert again.ts > first.ts, (
            f"{self._name('read()')} after reconnecting returned ts {again.ts.isoformat()}, "
            f"not newer than before the reconnect ({first.ts.isoformat()})"
        )

    # ------------------------------------------------------------------ tests: setpoints

    @pytest.mark.asyncio
    async def test_setpoint_within_limits_is_applied(self, adapter: Adapter) -> None:
        await self._connect(adapter)
        for mw in self._setpoints_within_limits():
            result = await self._apply(adapter, mw)
            what = self._name(f"apply_setpoint({mw:g})")
            assert result.status == "applied", (
                f"{what} returned {result.status!r} ({result.reason}) for a setpoint within "
                f"the asset's limits [{self.asset.min_mw:g}, {self.asset.max_mw:g}] MW"
            )
            if result.applied_mw is not None:
                assert abs(result.applied_mw - mw) <= self.setpoint_tolerance_mw, (
                    f"{what} reported applied_mw={result.applied_mw:g}, not the {mw:g} MW "
                    "commanded (within the limits, nothing needs clamping)"
                )

    @pytest.mark.asyncio
    async def test_setpoint_beyond_limits_is_clamped_or_rejected_never_applied_beyond(
        self, adapter: Adapter
    ) -> None:
        a = self.asset
        await self._connect(adapter)
        span = max(abs(a.max_mw), abs(a.min_mw), 1.0)
        for mw in (a.max_mw + 1.0, a.min_mw - 1.0, a.max_mw + 10 * span, a.min_mw - 10 * span):
            result = await self._apply(adapter, mw)
            what = self._name(f"apply_setpoint({mw:g})")
            limits = f"[{a.min_mw:g}, {a.max_mw:g}] MW"
            if result.status in ("rejected", "failed"):
                assert result.reason, f"{what} returned {result.status!r} without a reason"
                continue
            assert result.applied_mw is not None, (
                f"{what} returned 'applied' without applied_mw for a setpoint outside {limits}: "
                "report what was applied after clamping, or reject it with a reason"
            )
            assert self._within_limits(result.applied_mw), (
                f"{what} reported applied_mw={result.applied_mw:g}, outside the asset's "
                f"limits {limits}: clamp to the limits (or reject with a reason)"
            )
            sample = await self._read(adapter)
            if sample.mw_setpoint is not None and sample.quality == "good":
                assert self._within_limits(sample.mw_setpoint), (
                    f"after {what}, read() reports mw_setpoint={sample.mw_setpoint:g}, outside "
                    f"the asset's limits {limits}"
                )

    # ------------------------------------------------------------------ tests: faults

    @pytest.mark.asyncio
    async def test_timeout_fault_gives_bad_quality_never_a_fresh_value(
        self, adapter: Adapter
    ) -> None:
        await self._fault_scenario(adapter, "timeout")

    @pytest.mark.asyncio
    async def test_device_error_gives_bad_quality_with_a_reason(self, adapter: Adapter) -> None:
        await self._fault_scenario(adapter, "error")

    @pytest.mark.asyncio
    async def test_disconnect_gives_bad_quality_and_recovers_once_cleared(
        self, adapter: Adapter
    ) -> None:
        await self._connect(adapter)
        baseline = await self._read_good(adapter)
        await asyncio.sleep(0.01)
        await self._skip_unless_injected(adapter, "disconnect")
        try:
            await self._read_until_reported(adapter, "disconnect")
            await self._outcome(adapter.close, self.fault_timeout_s, "close() while disconnected")
            connect = await self._outcome(
                adapter.connect, self.fault_timeout_s, "connect() while disconnected"
            )
            if connect.error is None and not connect.hung:
                # connected lazily: reads must still say the device is unreachable
                await self._read_until_reported(adapter, "disconnect")
        finally:
            await self.clear_fault(adapter, "disconnect")
        await self._recover(adapter, "disconnect", after=baseline.ts)

    @pytest.mark.asyncio
    async def test_stale_device_value_is_never_reported_as_fresh(self, adapter: Adapter) -> None:
        await self._fault_scenario(adapter, "stale")

    # ------------------------------------------------------------------ tests: asyncio

    @pytest.mark.asyncio
    async def test_methods_do_not_block_the_event_loop(self, adapter: Adapter) -> None:
        mw = self.asset.clamp(self.asset.max_mw / 2)
        steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("connect()", adapter.connect),
            ("read()", adapter.read),
            (f"apply_setpoint({mw:g})", lambda: adapter.apply_setpoint(mw)),
            ("read()", adapter.read),
            ("read()", adapter.read),
            ("close()", adapter.close),
        ]
        async with BlockingWatch(self.blocking_threshold_s) as watch:
            for step, make in steps:
                await watch.run(self._name(step), make())
        assert not watch.blocks, (
            f"the adapter blocked the event loop longer than {self.blocking_threshold_s:g} s "
            f"(asyncio debug mode, slow_callback_duration={self.blocking_threshold_s:g}):\n"
            f"{watch.report()}\n"
            "Use async I/O, await asyncio.sleep() instead of time.sleep(), and run unavoidable "
            "blocking work with asyncio.to_thread()."
        )

    @pytest.mark.asyncio
    async def test_cancelling_a_read_or_setpoint_midway_leaves_it_usable(
        self, adapter: Adapter
    ) -> None:
        before = frozenset(asyncio.all_tasks())
        await self._connect(adapter)
        await self._read_good(adapter)
        mw = self.asset.clamp(self.asset.max_mw / 2)
        calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("read()", adapter.read),
            (f"apply_setpoint({mw:g})", lambda: adapter.apply_setpoint(mw)),
        ]
        pauses: list[tuple[str, int, float]] = [
            ("after its first step", 1, 0.0),
            ("a few steps in", 3, 0.0),
            ("5 ms in", 0, 0.005),
        ]
        for what, make in calls:
            for when, steps, seconds in pauses:

                async def call(make: Callable[[], Awaitable[Any]] = make) -> Any:
                    return await make()

                task = asyncio.create_task(call(), name=self._name(what))
                for _ in range(steps):
                    await asyncio.sleep(0)
                if seconds:
                    await asyncio.sleep(seconds)
                if not task.cancel():
                    task.result()  # finished before the cancel: fine, and no error allowed
                    continue
                done, _ = await asyncio.wait({task}, timeout=1.0)
                name = self._name(f"{what} cancelled {when}")
                assert done, (
                    f"{name} was still running 1 s later: it ignores cancellation, so the "
                    "agent's timeouts cannot stop it"
                )
                if not task.cancelled():
                    error = task.exception()
                    raise AssertionError(
                        f"{name} did not end cancelled but "
                        + (f"raised {type(error).__name__}: {error}" if error else "returned")
                        + ": never swallow asyncio.CancelledError"
                    )
        await self._read_good(adapter, "read() after cancelled calls")
        result = await self._apply(adapter, mw)
        assert result.status == "applied", (
            f"{self._name('apply_setpoint()')} after cancelled calls returned "
            f"{result.status!r} ({result.reason})"
        )
        await self._call(adapter.close, "close() after cancelled calls")
        leaked = await find_leaked_tasks(before)
        assert not leaked, (
            f"{self._name('close()')} left {len(leaked)} task(s) running after cancelled "
            "calls:\n" + "\n".join(f"  - {describe_task(t)}" for t in leaked)
        )


# =========================================================================== storage

_T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
_ASSET_A = "00000000-0000-0000-0000-00000000000a"
_ASSET_B = "00000000-0000-0000-0000-00000000000b"
_SITE = "site-1"


class StorageConformance:
    """The storage contract (:class:`der_sdk.storage.contract.StorageBackend`), as tests.

    **Class attributes** (set one of ``url`` or ``make_storage``):

    ``url: str``
        The ``DATABASE_URL`` of the backend under test; ``{tmp}`` is replaced by the test's
        ``tmp_path`` (``"sqlite:///{tmp}/der.db"``).
    ``expected_name: str | None``
        When set, the backend's ``name`` must equal it.
    ``persistent: bool = True``
        Whether data survives ``close()`` and a new backend for the same URL; set it to
        ``False`` for in-memory backends (that test then skips).

    **Hooks** (override them):

    ``def load_plugins(self) -> Plugins``
        Where the backend for ``url`` is found. Default: ``der_sdk.load_plugins()``.
    ``async def make_storage(self, tmp_path: Path) -> StorageBackend``
        A new, **unopened** backend. Default: :func:`open_storage` for ``url``. Override it
        to skip when a server is missing
        (:func:`der_sdk.testing.services.require_tcp_service`) or to build the backend
        yourself.

    Each test gets a fresh backend: the suite calls ``open()``, then ``reset()`` (so a
    shared database starts empty), and ``close()`` at the end.

    The conventions checked are those of :mod:`der_sdk.storage.contract`: aware UTC
    times, half-open ranges (``start`` inclusive, ``end`` exclusive), newest first with a
    ``limit``, idempotent telemetry by ``(asset_id, ts)`` with the count of new samples
    returned, atomic batches (a batch with a naive timestamp raises ``ValueError`` and
    stores nothing), and unknown ``details`` keys kept.

    Builders for your own extra tests: :meth:`at`, :meth:`sample`, :meth:`dispatch`,
    :meth:`session`, :meth:`heartbeat`, :meth:`alarm` (and :meth:`store_alarm`), with
    :attr:`ASSET_A`, :attr:`ASSET_B`, :attr:`SITE`.
    """

    url: ClassVar[str] = ""
    expected_name: ClassVar[str | None] = None
    persistent: ClassVar[bool] = True

    T0: ClassVar[datetime] = _T0
    ASSET_A: ClassVar[str] = _ASSET_A
    ASSET_B: ClassVar[str] = _ASSET_B
    SITE: ClassVar[str] = _SITE

    # ------------------------------------------------------------------ hooks

    def load_plugins(self) -> Plugins:
        return load_plugins()

    async def make_storage(self, tmp_path: Path) -> StorageBackend:
        if not self.url:
            raise DerSdkError(
                f"{type(self).__name__}: set the class attribute url (for example "
                "'sqlite:///{tmp}/der.db') or override make_storage()"
            )
        return open_storage(self.url.replace("{tmp}", tmp_path.as_posix()), self.load_plugins())

    # ------------------------------------------------------------------ fixture

    @pytest_asyncio.fixture
    async def storage(self, tmp_path: Path) -> AsyncIterator[StorageBackend]:
        """An opened, empty backend; closed afterwards."""
        backend = await self.make_storage(tmp_path)
        await backend.open()
        try:
            await backend.reset()
            yield backend
        finally:
            await backend.close()

    # ------------------------------------------------------------------ builders

    @staticmethod
    def at(seconds: float) -> datetime:
        """``T0`` (2024-06-01 12:00 UTC) plus ``seconds``."""
        return _T0 + timedelta(seconds=seconds)

    @staticmethod
    def sample(asset_id: str, seconds: float, mw: float = 1.0, **fields: Any) -> TelemetrySample:
        return TelemetrySample(
            asset_id=asset_id, site_id=_SITE, ts=StorageConformance.at(seconds), mw=mw, **fields
        )

    @staticmethod
    def dispatch(
        dispatch_id: str,
        seconds: float,
        *,
        asset_id: str | None = None,
        site_id: str | None = None,
        state: DispatchState = "submitted",
        targets: tuple[str, ...] = (),
    ) -> Dispatch:
        at = StorageConformance.at
        return Dispatch(
            dispatch_id=dispatch_id,
            mw=2.0,
            state=state,
            created_at=at(seconds),
            updated_at=at(seconds),
            asset_id=asset_id,
            site_id=site_id,
            targets=[DispatchTarget(asset_id=a, mw=1.0) for a in targets],
        )

    @staticmethod
    def session(
        session_id: str, asset_id: str, seconds: float, headend_id: str | None = None
    ) -> Session:
        return Session(
            session_id=session_id,
            asset_id=asset_id,
            site_id=_SITE,
            agent_id="agent-1",
            peer="ipv4:127.0.0.1:5000",
            connected_at=StorageConformance.at(seconds),
            headend_id=headend_id,
        )

    @staticmethod
    def heartbeat(asset_id: str, seconds: float) -> Heartbeat:
        return Heartbeat(
            asset_id=asset_id,
            site_id=_SITE,
            agent_id="agent-1",
            ts=StorageConformance.at(seconds),
            uptime_s=seconds,
        )

    # ------------------------------------------------------------------ telemetry

    @pytest.mark.asyncio
    async def test_history_by_range_includes_start_and_excludes_end(
        self, storage: StorageBackend
    ) -> None:
        at, sample = self.at, self.sample
        await storage.append_telemetry([sample(_ASSET_A, s) for s in range(5)])
        await storage.append_telemetry([sample(_ASSET_B, 2)])

        found = await storage.telemetry_history(_ASSET_A, start=at(1), end=at(3))

        assert [s.ts for s in found] == [at(2), at(1)]
        assert all(s.asset_id == _ASSET_A for s in found)
        assert [s.ts for s in await storage.telemetry_history(_ASSET_A, start=at(3))] == [
            at(4),
            at(3),
        ]
        assert [s.ts for s in await storage.telemetry_history(_ASSET_A, end=at(1))] == [at(0)]
        assert await storage.telemetry_history("unknown") == []

    @pytest.mark.asyncio
    async def test_history_is_newest_first_and_limited(self, storage: StorageBackend) -> None:
        at, sample = self.at, self.sample
        await storage.append_telemetry([sample(_ASSET_A, s) for s in (3, 0, 4, 1, 2)])

        found = await storage.telemetry_history(_ASSET_A, limit=3)

        assert [s.ts for s in found] == [at(4), at(3), at(2)]

    @pytest.mark.asyncio
    async def test_history_accepts_bounds_in_other_time_zones(
        self, storage: StorageBackend
    ) -> None:
        at, sample = self.at, self.sample
        await storage.append_telemetry([sample(_ASSET_A, s) for s in range(3)])
        plus_two = timezone(timedelta(hours=2))

        found = await storage.telemetry_history(_ASSET_A, start=at(1).astimezone(plus_two))

        assert [s.ts for s in found] == [at(2), at(1)]
        assert all(s.ts.tzinfo is not None and s.ts.utcoffset() == timedelta(0) for s in found)

    @pytest.mark.asyncio
    async def test_reappending_the_same_samples_stores_them_once(
        self, storage: StorageBackend
    ) -> None:
        sample = self.sample
        batch = [sample(_ASSET_A, s) for s in range(3)]

        assert await storage.append_telemetry(batch) == 3
        assert await storage.append_telemetry(batch) == 0
        assert await storage.append_telemetry([*batch, sample(_ASSET_A, 3)]) == 1
        assert len(await storage.telemetry_history(_ASSET_A)) == 4

    @pytest.mark.asyncio
    async def test_duplicates_within_one_batch_count_once(self, storage: StorageBackend) -> None:
        sample = self.sample
        assert await storage.append_telemetry([sample(_ASSET_A, 0), sample(_ASSET_A, 0, 9.0)]) == 1
        assert await storage.append_telemetry([]) == 0

        (stored,) = await storage.telemetry_history(_ASSET_A)
        assert stored.mw == 1.0  # the first sample for a timestamp wins

    @pytest.mark.asyncio
    async def test_latest_telemetry_is_the_newest_sample_per_asset(
        self, storage: StorageBackend
    ) -> None:
        at, sample = self.at, self.sample
        assert await storage.latest_telemetry() == {}
        await storage.append_telemetry([sample(_ASSET_A, s, mw=s) for s in (0, 5, 2)])
        await storage.append_telemetry([sample(_ASSET_B, 1, mw=-3.0)])

        latest = await storage.latest_telemetry()

        assert set(latest) == {_ASSET_A, _ASSET_B}
        assert (latest[_ASSET_A].ts, latest[_ASSET_A].mw) == (at(5), 5.0)
        assert (latest[_ASSET_B].ts, latest[_ASSET_B].mw) == (at(1), -3.0)

    @pytest.mark.asyncio
    async def test_sample_fields_and_details_round_trip_with_unknown_keys(
        self, storage: StorageBackend
    ) -> None:
        details = {"soc_pct": 55.5, "future_field": {"nested": [1, "two", None]}, "flag": True}
        original = self.sample(
            _ASSET_A,
            0.000001,
            mw=-2.25,
            mw_setpoint=-2.5,
            online=False,
            status="charging",
            fault_code="F12",
            seq=42,
            quality="uncertain",
            quality_reason="stale register",
            details=details,
        )
        await storage.append_telemetry([original])

        (stored,) = await storage.telemetry_history(_ASSET_A)

        assert stored == original
        assert stored.details == details
        assert stored.ts.tzinfo is not None and stored.ts.utcoffset() == timedelta(0)

    @pytest.mark.asyncio
    async def test_naive_datetimes_are_refused_and_the_batch_stores_nothing(
        self, storage: StorageBackend
    ) -> None:
        naive = self.sample(_ASSET_A, 0)
        naive.ts = naive.ts.replace(tzinfo=None)

        with pytest.raises(ValueError, match="timezone-aware"):
            await storage.append_telemetry([self.sample(_ASSET_A, 1), naive])
        assert await storage.telemetry_history(_ASSET_A) == []

    # ------------------------------------------------------------------ dispatch

    @pytest.mark.asyncio
    async def test_save_get_and_replace_dispatch(self, storage: StorageBackend) -> None:
        at = self.at
        record = self.dispatch("d1", 0, site_id=_SITE, targets=(_ASSET_A, _ASSET_B))
        assert await storage.get_dispatch("d1") is None

        await storage.save_dispatch(record)
        assert await storage.get_dispatch("d1") == record

        record.state = "applied"
        record.updated_at = at(10)
        record.targets = [
            DispatchTarget(asset_id=_ASSET_A, mw=2.0, state="applied", applied_mw=2.0)
        ]
        await storage.save_dispatch(record)

        stored = await storage.get_dispatch("d1")
        assert stored == record
        assert stored is not None and stored.created_at.utcoffset() == timedelta(0)
        # The replaced targets no longer match the asset that was dropped.
        assert await storage.dispatch_history(asset_id=_ASSET_B) == []

    @pytest.mark.asyncio
    async def test_a_schedule_keeps_its_start_steps_and_step_reports(
        self, storage: StorageBackend
    ) -> None:
        at = self.at
        record = self.dispatch("s1", 0, asset_id=_ASSET_A, site_id=_SITE, state="active")
        record.start_at = at(60)
        record.duration_s = 900.0
        record.steps = [ScheduleStep(offset_s=0.0, mw=1.5), ScheduleStep(offset_s=300.0, mw=-2)]
        record.superseded_by = "s2"
        record.cancel_requested_at = at(120)
        record.targets = [
            DispatchTarget(
                asset_id=_ASSET_A,
                mw=1.5,
                state="active",
                steps=[
                    TargetStep(offset_s=0.0, mw=1.5, status="applied", applied_mw=1.5, at=at(61)),
                    TargetStep(offset_s=300.0, mw=-2.0),
                ],
            )
        ]
        await storage.save_dispatch(record)

        stored = await storage.get_dispatch("s1")
        assert stored == record
        assert [d.dispatch_id for d in await storage.dispatch_history(state="active")] == ["s1"]
        assert stored is not None and stored.start_at is not None
        assert stored.start_at.utcoffset() == timedelta(0)

    @pytest.mark.asyncio
    async def test_a_program_dispatch_keeps_its_source_and_external_id(
        self, storage: StorageBackend
    ) -> None:
        record = self.dispatch("p1", 0, site_id=_SITE, targets=(_ASSET_A,), state="scheduled")
        record.source = "program:utility-dr"
        record.external_id = "event-7/signal-0"
        record.request_fingerprint = "ab" * 32
        record.start_at = self.at(60)
        record.steps = [ScheduleStep(offset_s=0.0, mw=1.0)]
        await storage.save_dispatch(record)

        stored = await storage.get_dispatch("p1")
        assert stored == record
        assert stored is not None and stored.external_id == "event-7/signal-0"
        (listed,) = await storage.dispatch_history(site_id=_SITE)
        assert (listed.source, listed.external_id) == ("program:utility-dr", "event-7/signal-0")

    @pytest.mark.asyncio
    async def test_dispatch_history_filters_by_asset_site_and_state(
        self, storage: StorageBackend
    ) -> None:
        dispatch = self.dispatch
        await storage.save_dispatch(dispatch("to-a", 1, asset_id=_ASSET_A, site_id=_SITE))
        await storage.save_dispatch(
            dispatch("to-b", 2, asset_id=_ASSET_B, site_id=_SITE, state="sent")
        )
        await storage.save_dispatch(
            dispatch("site", 3, site_id=_SITE, targets=(_ASSET_A, _ASSET_B))
        )
        await storage.save_dispatch(dispatch("other-site", 4, site_id="site-2", targets=("x",)))

        async def ids(
            asset_id: str | None = None, site_id: str | None = None, state: str | None = None
        ) -> list[str]:
            found = await storage.dispatch_history(asset_id=asset_id, site_id=site_id, state=state)
            return [d.dispatch_id for d in found]

        assert await ids() == ["other-site", "site", "to-b", "to-a"]
        assert await ids(asset_id=_ASSET_A) == ["site", "to-a"]
        assert await ids(site_id=_SITE) == ["site", "to-b", "to-a"]
        assert await ids(state="sent") == ["to-b"]
        assert await ids(asset_id=_ASSET_B, state="submitted") == ["site"]
        assert await ids(site_id="site-2", asset_id=_ASSET_A) == []
        assert [d.dispatch_id for d in await storage.dispatch_history(limit=2)] == [
            "other-site",
            "site",
        ]

    @pytest.mark.asyncio
    async def test_record_dispatch_saves_the_record_and_appends_its_event(
        self, storage: StorageBackend
    ) -> None:
        at = self.at
        record = self.dispatch("d1", 0, site_id=_SITE, targets=(_ASSET_A,))
        created = DispatchEvent(dispatch_id="d1", state="submitted", ts=at(0), detail="created")
        await storage.record_dispatch(record, created)

        record.state = "sent"
        record.updated_at = at(1)
        sent = DispatchEvent(dispatch_id="d1", state="sent", ts=at(1), detail="pushed")
        await storage.record_dispatch(record, sent)

        assert await storage.get_dispatch("d1") == record
        assert await storage.dispatch_events("d1") == [created, sent]
        assert [d.dispatch_id for d in await storage.dispatch_history(asset_id=_ASSET_A)] == ["d1"]

    @pytest.mark.asyncio
    async def test_record_dispatches_stores_every_change_in_order_and_the_audit_events(
        self, storage: StorageBackend
    ) -> None:
        at = self.at
        first = self.dispatch("d1", 0, site_id=_SITE, targets=(_ASSET_A,))
        applied = msgspec.structs.replace(first, state="applied", updated_at=at(1))
        other = self.dispatch("d2", 0, site_id=_SITE, targets=(_ASSET_B,))
        created = DispatchEvent(dispatch_id="d1", state="sent", ts=at(0), detail="created")
        outcome = DispatchEvent(dispatch_id="d1", state="applied", ts=at(1), detail="applied")
        other_created = DispatchEvent(dispatch_id="d2", state="sent", ts=at(0))
        audit = Event(ts=at(0), kind="audit", message="d1 created", data={"dispatch_id": "d1"})

        await storage.record_dispatches(
            [(first, created), (other, other_created), (applied, outcome)], [audit]
        )

        assert await storage.get_dispatch("d1") == applied  # the later record wins
        assert await storage.get_dispatch("d2") == other
        assert await storage.dispatch_events("d1") == [created, outcome]
        assert await storage.dispatch_events("d2") == [other_created]
        assert await storage.events(kind="audit") == [audit]

    @pytest.mark.asyncio
    async def test_dispatch_events_are_oldest_first(self, storage: StorageBackend) -> None:
        at = self.at
        states: list[tuple[Literal["sent", "submitted", "applied"], int]] = [
            ("sent", 2),
            ("submitted", 1),
            ("applied", 3),
        ]
        for state, seconds in states:
            await storage.record_dispatch_event(
                DispatchEvent(dispatch_id="d1", state=state, ts=at(seconds))
            )
        await storage.record_dispatch_event(
            DispatchEvent(dispatch_id="d2", state="failed", ts=at(0), detail="no route")
        )

        events = await storage.dispatch_events("d1")

        assert [(e.state, e.ts) for e in events] == [
            ("submitted", at(1)),
            ("sent", at(2)),
            ("applied", at(3)),
        ]
        assert await storage.dispatch_events("d2") == [
            DispatchEvent(dispatch_id="d2", state="failed", ts=at(0), detail="no route")
        ]
        assert await storage.dispatch_events("unknown") == []

    # ------------------------------------------------------------------ presence

    @pytest.mark.asyncio
    async def test_sessions_open_close_and_recent_newest_first(
        self, storage: StorageBackend
    ) -> None:
        at, session = self.at, self.session
        for session_id, seconds in (("s1", 0), ("s2", 10), ("s3", 20)):
            await storage.open_session(session(session_id, _ASSET_A, seconds))
        await storage.open_session(session("other", _ASSET_B, 5))

        await storage.close_session("s1", at(5))
        await storage.close_session("s1", at(99))  # already closed: no-op
        await storage.close_session("unknown", at(99))  # unknown: no-op

        recent = await storage.recent_sessions(_ASSET_A)
        assert [s.session_id for s in recent] == ["s3", "s2", "s1"]
        assert [s.disconnected_at for s in recent] == [None, None, at(5)]
        assert [s.session_id for s in await storage.recent_sessions(_ASSET_A, limit=2)] == [
            "s3",
            "s2",
        ]

        assert await storage.close_open_sessions(at(30)) == 3
        assert await storage.close_open_sessions(at(40)) == 0
        recent = await storage.recent_sessions(_ASSET_A)
        assert [s.disconnected_at for s in recent] == [at(30), at(30), at(5)]
        assert recent[0] == msgspec.structs.replace(
            session("s3", _ASSET_A, 20), disconnected_at=at(30)
        )

    @pytest.mark.asyncio
    async def test_close_open_sessions_of_one_headend_leaves_other_headends_sessions_open(
        self, storage: StorageBackend
    ) -> None:
        at, session = self.at, self.session
        await storage.open_session(session("a-open", _ASSET_A, 0, headend_id="headend-a"))
        await storage.open_session(session("a-closed", _ASSET_A, 1, headend_id="headend-a"))
        await storage.close_session("a-closed", at(2))
        await storage.open_session(session("b-open", _ASSET_A, 3, headend_id="headend-b"))
        await storage.open_session(session("legacy", _ASSET_B, 4))  # written with no id

        # headend-a's open sessions and those with no headend id; not headend-b's.
        assert await storage.close_open_sessions(at(10), headend_id="headend-a") == 2
        assert await storage.close_open_sessions(at(11), headend_id="headend-a") == 0

        recent = {s.session_id: s for s in await storage.recent_sessions(_ASSET_A)}
        assert {key: (s.headend_id, s.disconnected_at) for key, s in recent.items()} == {
            "b-open": ("headend-b", None),
            "a-closed": ("headend-a", at(2)),
            "a-open": ("headend-a", at(10)),
        }
        (legacy,) = await storage.recent_sessions(_ASSET_B)
        assert (legacy.headend_id, legacy.disconnected_at) == (None, at(10))

        # Without an id, every open session is closed (the contract before headend ids).
        assert await storage.close_open_sessions(at(20)) == 1
        newest = (await storage.recent_sessions(_ASSET_A))[0]
        assert newest == msgspec.structs.replace(
            session("b-open", _ASSET_A, 3, headend_id="headend-b"), disconnected_at=at(20)
        )

    @pytest.mark.asyncio
    async def test_heartbeats_latest_and_history(self, storage: StorageBackend) -> None:
        at, heartbeat = self.at, self.heartbeat
        assert await storage.latest_heartbeat(_ASSET_A) is None
        await storage.append_heartbeats([heartbeat(_ASSET_A, s) for s in (0, 2, 1)])
        await storage.append_heartbeats([heartbeat(_ASSET_A, 2), heartbeat(_ASSET_B, 9)])

        assert await storage.latest_heartbeat(_ASSET_A) == heartbeat(_ASSET_A, 2)
        history = await storage.heartbeat_history(_ASSET_A)
        assert [h.ts for h in history] == [at(2), at(1), at(0)]
        ranged = await storage.heartbeat_history(_ASSET_A, start=at(1), end=at(2))
        assert [h.ts for h in ranged] == [at(1)]
        assert [h.ts for h in await storage.heartbeat_history(_ASSET_A, limit=1)] == [at(2)]

    # ------------------------------------------------------------------ events

    @pytest.mark.asyncio
    async def test_events_filter_by_asset_and_kind_newest_first(
        self, storage: StorageBackend
    ) -> None:
        at = self.at
        refused = Event(ts=at(1), kind="registration_refused", message="unknown asset")
        gap = Event(ts=at(2), kind="telemetry_gap", message="gap", asset_id=_ASSET_A, data={"s": 5})
        fault = Event(ts=at(3), kind="fault", message="F12", asset_id=_ASSET_A, site_id=_SITE)
        other = Event(ts=at(4), kind="fault", message="F1", asset_id=_ASSET_B)
        for event in (refused, gap, fault, other):
            await storage.append_event(event)

        assert await storage.events() == [other, fault, gap, refused]
        assert await storage.events(asset_id=_ASSET_A) == [fault, gap]
        assert await storage.events(kind="fault") == [other, fault]
        assert await storage.events(asset_id=_ASSET_A, kind="fault") == [fault]
        assert await storage.events(limit=1) == [other]

    @pytest.mark.asyncio
    async def test_events_filter_by_site_time_range_and_excluded_kinds(
        self, storage: StorageBackend
    ) -> None:
        at = self.at
        audit = Event(ts=at(1), kind="audit", message="token.create", site_id=_SITE)
        raised = Event(
            ts=at(2),
            kind="condition_raised",
            message="trip",
            asset_id=_ASSET_A,
            site_id=_SITE,
            data={"code": "trip"},
        )
        cleared = Event(ts=at(3), kind="condition_cleared", message="", site_id=_SITE)
        elsewhere = Event(ts=at(4), kind="condition_raised", message="F", site_id="other-site")
        for event in (audit, raised, cleared, elsewhere):
            await storage.append_event(event)

        assert await storage.events(site_id=_SITE) == [cleared, raised, audit]
        assert await storage.events(exclude_kinds=["audit"], site_id=_SITE) == [cleared, raised]
        assert await storage.events(exclude_kinds={"audit", "condition_cleared"}) == [
            elsewhere,
            raised,
        ]
        # start inclusive, end exclusive
        assert await storage.events(start=at(2), end=at(4)) == [cleared, raised]
        assert await storage.events(start=at(4)) == [elsewhere]
        assert await storage.events(end=at(2)) == [audit]
        assert await storage.events(site_id=_SITE, kind="condition_raised", start=at(2)) == [raised]

    # ------------------------------------------------------------------ alarms

    @staticmethod
    def alarm(
        alarm_id: str,
        seconds: float,
        *,
        asset_id: str = _ASSET_A,
        code: str = "inverter_trip",
        severity: Literal["info", "warning", "major", "critical"] = "major",
        state: Literal["active", "cleared"] = "active",
        raise_count: int = 1,
    ) -> Alarm:
        at = StorageConformance.at
        return Alarm(
            alarm_id=alarm_id,
            asset_id=asset_id,
            site_id=_SITE,
            code=code,
            severity=severity,
            text=f"{code} on {asset_id}",
            state=state,
            raised_at=at(seconds),
            cleared_at=at(seconds + 1) if state == "cleared" else None,
            raise_count=raise_count,
            updated_at=at(seconds),
        )

    @staticmethod
    async def store_alarm(storage: StorageBackend, alarm: Alarm) -> None:
        """Store ``alarm`` as the live alarm of its asset and code."""

        def replace(live: Alarm | None) -> Alarm:
            return alarm

        await storage.update_alarm(alarm.asset_id, alarm.code, replace)

    @pytest.mark.asyncio
    async def test_update_alarm_stores_a_new_live_alarm_and_replaces_it_by_id(
        self, storage: StorageBackend
    ) -> None:
        first = self.alarm("a1", 0)
        seen: list[Alarm | None] = []

        def open_first(live: Alarm | None) -> Alarm | None:
            seen.append(live)
            return first

        write = await storage.update_alarm(_ASSET_A, "inverter_trip", open_first)
        assert write is not None and write.before is None and write.after == first
        assert seen == [None]
        assert await storage.get_alarm("a1") == first

        cleared = msgspec.structs.replace(first, state="cleared", cleared_at=self.at(5))
        write = await storage.update_alarm(_ASSET_A, "inverter_trip", lambda live: cleared)
        assert write is not None and write.before == first and write.after == cleared
        assert await storage.get_alarm("a1") == cleared

        # A new id becomes the live alarm; the one before stays as history.
        second = self.alarm("a2", 60)
        write = await storage.update_alarm(_ASSET_A, "inverter_trip", lambda live: second)
        assert write is not None and write.before == cleared
        live_seen: list[Alarm | None] = []

        def look(live: Alarm | None) -> Alarm | None:
            live_seen.append(live)
            return None

        await storage.update_alarm(_ASSET_A, "inverter_trip", look)
        assert live_seen == [second]
        assert await storage.alarms() == [second, cleared]

    @pytest.mark.asyncio
    async def test_update_alarm_returning_none_stores_nothing(
        self, storage: StorageBackend
    ) -> None:
        assert await storage.update_alarm(_ASSET_A, "x", lambda live: None) is None
        assert await storage.alarms() == []

    @pytest.mark.asyncio
    async def test_an_event_id_is_applied_once_even_when_it_changed_nothing(
        self, storage: StorageBackend
    ) -> None:
        calls: list[Alarm | None] = []

        def nothing(live: Alarm | None) -> Alarm | None:
            calls.append(live)
            return None

        assert await storage.update_alarm(_ASSET_A, "trip", nothing, event_id="e0") is None
        first = self.alarm("a1", 0, code="trip")
        write = await storage.update_alarm(_ASSET_A, "trip", lambda live: first, event_id="e1")
        assert write is not None
        again = self.alarm("a9", 9, code="trip")
        for event_id in ("e0", "e1"):
            assert (
                await storage.update_alarm(_ASSET_A, "trip", lambda live: again, event_id=event_id)
                is None
            )
        assert calls == [None]
        assert await storage.alarms() == [first]

    @pytest.mark.asyncio
    async def test_update_alarm_refuses_an_alarm_of_another_asset_or_code(
        self, storage: StorageBackend
    ) -> None:
        other = self.alarm("a1", 0, asset_id=_ASSET_B)
        with pytest.raises(ValueError, match="asset"):
            await storage.update_alarm(_ASSET_A, "inverter_trip", lambda live: other)
        assert await storage.get_alarm("a1") is None

    @pytest.mark.asyncio
    async def test_concurrent_updates_of_one_alarm_are_serialised(
        self, storage: StorageBackend
    ) -> None:
        base = self.alarm("a1", 0, code="flap")
        await storage.update_alarm(_ASSET_A, "flap", lambda live: base)

        def bump(live: Alarm | None) -> Alarm | None:
            assert live is not None
            return msgspec.structs.replace(live, raise_count=live.raise_count + 1)

        await asyncio.gather(*(storage.update_alarm(_ASSET_A, "flap", bump) for _ in range(20)))
        stored = await storage.get_alarm("a1")
        assert stored is not None and stored.raise_count == 21

    @pytest.mark.asyncio
    async def test_acknowledge_alarm_once_keeps_the_first_acknowledgement(
        self, storage: StorageBackend
    ) -> None:
        await storage.update_alarm(_ASSET_A, "inverter_trip", lambda live: self.alarm("a1", 0))
        first = await storage.acknowledge_alarm("a1", self.at(10), "token:op")
        assert first is not None
        alarm, changed = first
        assert changed
        assert (alarm.acknowledged_at, alarm.acknowledged_by) == (self.at(10), "token:op")
        assert alarm.updated_at == self.at(10)
        again = await storage.acknowledge_alarm("a1", self.at(20), "token:other")
        assert again == (alarm, False)
        assert await storage.acknowledge_alarm("nope", self.at(20), "token:op") is None

    @pytest.mark.asyncio
    async def test_alarms_filter_and_page_newest_first(self, storage: StorageBackend) -> None:
        made = [
            self.alarm("a1", 1, code="c1", severity="info"),
            self.alarm("a2", 2, code="c2", severity="critical", state="cleared"),
            self.alarm("a3", 3, code="c3", asset_id=_ASSET_B),
            self.alarm("a4", 3, code="c4"),  # the same raised_at as a3: ordered by id
        ]
        for alarm in made:
            await self.store_alarm(storage, alarm)
        await storage.acknowledge_alarm("a1", self.at(5), "token:op")
        a1 = await storage.get_alarm("a1")
        a1_2, a2, a3, a4 = a1, made[1], made[2], made[3]

        assert await storage.alarms() == [a4, a3, a2, a1_2]
        assert await storage.alarms(state="cleared") == [a2]
        assert await storage.alarms(state="active", severity="major") == [a4, a3]
        assert await storage.alarms(asset_id=_ASSET_B) == [a3]
        assert await storage.alarms(site_id=_SITE, code="c1") == [a1_2]
        assert await storage.alarms(site_id="elsewhere") == []
        assert await storage.alarms(acknowledged=True) == [a1_2]
        assert await storage.alarms(acknowledged=False) == [a4, a3, a2]
        assert await storage.alarms(limit=2) == [a4, a3]
        assert await storage.alarms(after="a3", limit=2) == [a2, a1_2]
        assert await storage.alarms(after="a4", limit=1) == [a3]
        assert await storage.alarms(after="unknown") == []

    @pytest.mark.asyncio
    async def test_active_alarm_counts_by_severity(self, storage: StorageBackend) -> None:
        for alarm in (
            self.alarm("a1", 1, code="c1", severity="major"),
            self.alarm("a2", 2, code="c2", severity="major"),
            self.alarm("a3", 3, code="c3", severity="critical"),
            self.alarm("a4", 4, code="c4", severity="info", state="cleared"),
        ):
            await self.store_alarm(storage, alarm)
        counts = await storage.active_alarm_counts()
        assert {k: v for k, v in counts.items() if v} == {"major": 2, "critical": 1}

    # ------------------------------------------------------------------ export

    @staticmethod
    async def _pages(
        storage: StorageBackend, page_size: int, **filters: Any
    ) -> list[list[TelemetrySample]]:
        start, end = filters.pop("start", _T0), filters.pop("end", _T0 + timedelta(days=2))
        return [
            page
            async for page in storage.telemetry_pages(start, end, page_size=page_size, **filters)
        ]

    @pytest.mark.asyncio
    async def test_telemetry_pages_cover_a_range_oldest_first_in_bounded_pages(
        self, storage: StorageBackend
    ) -> None:
        sample = self.sample
        other_site = TelemetrySample(
            asset_id="other-asset", site_id="other-site", ts=self.at(5), mw=0.5
        )
        stored = [sample(a, s, mw=s) for s in range(10) for a in (_ASSET_A, _ASSET_B)]
        await storage.append_telemetry([*reversed(stored), other_site])

        pages = await self._pages(storage, 3, start=self.at(2), end=self.at(8))
        assert all(0 < len(page) <= 3 for page in pages), [len(p) for p in pages]
        got = [s for page in pages for s in page]
        in_range = [s for s in [*stored, other_site] if self.at(2) <= s.ts < self.at(8)]
        assert got == sorted(in_range, key=lambda s: (s.ts, s.asset_id))

        by_site = [s for page in await self._pages(storage, 4, site_id=_SITE) for s in page]
        assert by_site == sorted(stored, key=lambda s: (s.ts, s.asset_id))
        by_asset = [s for page in await self._pages(storage, 100, asset_id=_ASSET_B) for s in page]
        assert by_asset == [s for s in stored if s.asset_id == _ASSET_B]
        assert await self._pages(storage, 5, start=self.at(100), end=self.at(200)) == []

    @staticmethod
    async def _visible_changes(
        storage: StorageBackend, cursor: str | None, limit: int, within_s: float = 10.0
    ) -> Any:
        """The first non-empty page of changes after ``cursor``. A backend may show a
        write only once every older transaction ended (PostgreSQL: on the whole server,
        so another test's, or another suite's, open transaction holds it back a while)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while True:
            page = await storage.telemetry_changes(cursor, limit)
            if page.samples or loop.time() >= deadline:
                return page
            await asyncio.sleep(0.05)

    @pytest.mark.asyncio
    async def test_telemetry_changes_resume_from_a_cursor_without_gaps_or_repeats(
        self, storage: StorageBackend
    ) -> None:
        sample = self.sample
        assert await storage.telemetry_changes(None, 10) == ([], None)
        first = [sample(_ASSET_A, s) for s in range(5)]
        await storage.append_telemetry(first)
        page = await self._visible_changes(storage, None, 3)
        assert page.samples == first[:3] and page.cursor is not None
        rest = await storage.telemetry_changes(page.cursor, 10)
        assert rest.samples == first[3:]
        nothing = await storage.telemetry_changes(rest.cursor, 10)
        assert nothing == ([], rest.cursor)

        # Late samples (older time stamps) and duplicates after the cursor: the late
        # ones come next, the duplicates never.
        await storage.append_telemetry([sample(_ASSET_B, -10), first[0], sample(_ASSET_A, 99)])
        later = await self._visible_changes(storage, rest.cursor, 10)
        # One batch: in any order, but each once.
        assert sorted(later.samples, key=lambda s: (s.asset_id, s.ts)) == [
            sample(_ASSET_A, 99),
            sample(_ASSET_B, -10),
        ]

    @pytest.mark.asyncio
    async def test_exporter_cursors_are_stored_per_name_and_cleared_by_reset(
        self, storage: StorageBackend
    ) -> None:
        assert await storage.exporter_cursor("historian") is None
        await storage.save_exporter_cursor("historian", "c1")
        await storage.save_exporter_cursor("files", "x")
        await storage.save_exporter_cursor("historian", "c2")
        assert await storage.exporter_cursor("historian") == "c2"
        assert await storage.exporter_cursor("files") == "x"
        await storage.reset()
        assert await storage.exporter_cursor("historian") is None

    @pytest.mark.asyncio
    async def test_an_exporter_lease_saves_its_cursor_and_is_held_by_one_process_at_a_time(
        self, storage: StorageBackend, tmp_path: Path
    ) -> None:
        lease = await storage.exporter_lease("historian")
        assert lease is not None, "exporter_lease refused the only process that asked"
        await lease.check()
        await lease.save_cursor("c1")
        assert await storage.exporter_cursor("historian") == "c1"
        if storage.shared:  # a second process on the same storage
            other = await self.make_storage(tmp_path)
            await other.open()
            try:
                assert await other.exporter_lease("historian") is None, (
                    "two processes hold the lease of one exporter at once"
                )
                files = await other.exporter_lease("files")
                assert files is not None, "the lease of one exporter held up another's"
                await files.release()
                await lease.release()
                taken = await other.exporter_lease("historian")
                assert taken is not None, "a released lease was not granted to another process"
                await taken.check()
                await taken.save_cursor("c2")
                await taken.release()
            finally:
                await other.close()
            assert await storage.exporter_cursor("historian") == "c2"
        await lease.release()  # idempotent
        again = await storage.exporter_lease("historian")
        assert again is not None, "a released lease was not granted again"
        await again.release()

    # ------------------------------------------------------------------ lifecycle

    @pytest.mark.asyncio
    async def test_reset_clears_everything(self, storage: StorageBackend) -> None:
        at, sample = self.at, self.sample
        await storage.append_telemetry([sample(_ASSET_A, 0)])
        await storage.save_dispatch(self.dispatch("d1", 0, site_id=_SITE, targets=(_ASSET_A,)))
        await storage.record_dispatch_event(DispatchEvent(dispatch_id="d1", state="sent", ts=at(0)))
        await storage.open_session(self.session("s1", _ASSET_A, 0))
        await storage.append_heartbeats([self.heartbeat(_ASSET_A, 0)])
        await storage.append_event(Event(ts=at(0), kind="fault", message="F1", asset_id=_ASSET_A))
        await storage.update_alarm(_ASSET_A, "inverter_trip", lambda live: self.alarm("a1", 0))
        await storage.update_alarm(_ASSET_A, "c2", lambda live: None, event_id="e1")

        await storage.reset()

        assert await storage.telemetry_history(_ASSET_A) == []
        assert await storage.latest_telemetry() == {}
        assert await storage.get_dispatch("d1") is None
        assert await storage.dispatch_history(asset_id=_ASSET_A) == []
        assert await storage.dispatch_events("d1") == []
        assert await storage.recent_sessions(_ASSET_A) == []
        assert await storage.latest_heartbeat(_ASSET_A) is None
        assert await storage.events() == []
        assert await storage.alarms() == []
        assert await storage.active_alarm_counts() in ({}, {"major": 0})
        # An event applied before the reset may be applied again.
        assert await storage.update_alarm(
            _ASSET_A, "c2", lambda live: self.alarm("a2", 0, code="c2"), event_id="e1"
        )
        # Still usable after the reset.
        assert await storage.append_telemetry([sample(_ASSET_A, 0)]) == 1
        assert await storage.healthy()

    @pytest.mark.asyncio
    async def test_reports_its_name_and_health(self, storage: StorageBackend) -> None:
        assert isinstance(storage.name, str) and storage.name, "set StorageBackend.name"
        if self.expected_name is not None:
            assert storage.name == self.expected_name
        assert await storage.healthy()

    @pytest.mark.asyncio
    async def test_data_survives_close_and_reopen(self, tmp_path: Path) -> None:
        if not self.persistent:
            pytest.skip(f"{type(self).__name__}.persistent is False: data lives in memory")
        first = await self.make_storage(tmp_path)
        await first.open()
        await first.reset()
        await first.append_telemetry([self.sample(_ASSET_A, 0, details={"soc_pct": 50.0})])
        alarm = self.alarm("a1", 0)
        await first.update_alarm(_ASSET_A, alarm.code, lambda live: alarm, event_id="e1")
        await first.close()

        second = await self.make_storage(tmp_path)
        await second.open()
        try:
            stored = await second.telemetry_history(_ASSET_A)
            assert stored == [self.sample(_ASSET_A, 0, details={"soc_pct": 50.0})]
            assert await second.append_telemetry([self.sample(_ASSET_A, 0)]) == 0
            assert await second.alarms() == [alarm]
            assert (
                await second.update_alarm(
                    _ASSET_A, alarm.code, lambda live: self.alarm("a2", 1), event_id="e1"
                )
                is None
            ), "an event applied before the restart was applied again"
        finally:
            await second.close()
