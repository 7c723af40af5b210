"""One adapter per served asset, each wrapped in a runtime that keeps a fault contained.

The agent config picks the adapter type per asset (``assets.<id>.adapter``, else
``default_adapter``); options are validated against the type's options Struct before any
device is touched. :class:`AdapterRuntime` owns the adapter's lifecycle: it connects,
reads with a timeout, and turns every failure into a bad-quality sample naming the adapter
and the error, so a broken plugin or device never crashes the agent and a stale value is
never reported as fresh. A failed connect is retried on the next poll; after
:data:`RECONNECT_AFTER_FAILED_READS` failed reads in a row the adapter is closed and
connected again on the next poll.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import msgspec

from der_sdk.agent_config import AgentConfig, convert_options
from der_sdk.conditions import ConditionQueue
from der_sdk.device_packs import version_key
from der_sdk.errors import DerSdkError, UnknownNameError
from der_sdk.extensions import (
    Adapter,
    AdapterContext,
    AdapterType,
    DeviceProfile,
    SetpointResult,
)
from der_sdk.models import Asset, TelemetrySample, refuse_non_finite, utc_now
from der_sdk.plugins import Plugins

__all__ = [
    "RECONNECT_AFTER_FAILED_READS",
    "AdapterRuntime",
    "adapter_name_for",
    "adapter_names",
    "build_adapters",
    "convert_options",
    "read_all",
]

log = logging.getLogger("der.agent.adapters")

RECONNECT_AFTER_FAILED_READS = 3
"""Failed reads in a row after which the runtime closes the adapter and connects again."""

DEFAULT_COMMAND_TIMEOUT_S = 10.0

T = TypeVar("T")


def adapter_name_for(asset_id: str, config: AgentConfig) -> str:
    """The adapter type configured for ``asset_id`` (or the config's default)."""
    return config.adapter_for(asset_id).adapter


def profiles_for_adapters(plugins: Plugins) -> dict[str, DeviceProfile]:
    """The installed device profiles as adapters get them: each ``name@version``, and each
    ``name`` alone for its highest version (so a ``profile_version`` pin finds an older
    version while a bare name gets the newest)."""
    profiles: dict[str, DeviceProfile] = {}
    for profile in plugins.device_profiles:
        profiles[f"{profile.name}@{profile.version}"] = profile
        newest = profiles.get(profile.name)
        if newest is None or version_key(profile.version) > version_key(newest.version):
            profiles[profile.name] = profile
    return profiles


def build_adapters(
    assets: Sequence[Asset],
    config: AgentConfig,
    plugins: Plugins,
    *,
    timeout_s: float,
    command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S,
    on_condition: Callable[[], None] | None = None,
) -> dict[str, AdapterRuntime]:
    """One :class:`AdapterRuntime` per asset, by asset id, nothing connected yet.

    Each adapter gets its own :class:`~der_sdk.conditions.ConditionQueue` (the runtime's
    ``conditions``) to report its device's conditions into.

    :param timeout_s: limit for one connect or read (usually the telemetry interval).
    :param command_timeout_s: limit for one ``apply_setpoint``.
    :param on_condition: called whenever an adapter queues a condition change.
    :raises DerSdkError: an adapter type is not installed, its options are invalid, or its
        factory failed; the message names the asset, the adapter and its package.
    """
    profiles = profiles_for_adapters(plugins)
    runtimes: dict[str, AdapterRuntime] = {}
    for asset in assets:
        name = adapter_name_for(asset.asset_id, config)
        what = f"asset {asset.asset_id} ({asset.name}): adapter {name!r}"
        try:
            adapter_type: AdapterType = plugins.adapter_types.get(name)
        except UnknownNameError as exc:
            raise DerSdkError(
                f"asset {asset.asset_id} ({asset.name}): {exc}; install the plugin that "
                f"provides it or choose another adapter in the agent config"
            ) from None
        package = plugins.adapter_types.provider(name)
        options = convert_options(
            config.adapter_for(asset.asset_id).options,
            adapter_type.options,
            what=f"{what} from {package}",
        )
        conditions = ConditionQueue(notify=on_condition)
        try:
            adapter = adapter_type.factory(
                AdapterContext(
                    asset=asset, options=options, profiles=profiles, conditions=conditions
                )
            )
        except DerSdkError as exc:
            raise DerSdkError(f"{what} from {package}: {exc}") from None
        except Exception as exc:
            raise DerSdkError(
                f"{what} from {package} failed to build: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(adapter, Adapter):
            raise DerSdkError(
                f"{what} from {package}: factory returned {type(adapter).__name__}, "
                f"not a der_sdk.extensions.Adapter"
            )
        runtimes[asset.asset_id] = AdapterRuntime(
            asset=asset,
            adapter=adapter,
            adapter_name=name,
            package=package,
            timeout_s=timeout_s,
            command_timeout_s=command_timeout_s,
            conditions=conditions,
        )
    return runtimes


_SCALARS = frozenset({int, str, bool, type(None)})


def _plainly_finite(sample: TelemetrySample) -> bool:
    """Whether every number of ``sample`` is finite, checked quickly for the usual sample
    (scalar details): ``False`` sends it through :func:`refuse_non_finite`, which also
    looks into nested details (and finds nothing when a sum of finite values overflowed)."""
    total = 0.0  # an int is always finite, and is left out of the sum (it may not fit)
    if type(sample.mw) is float:
        total += sample.mw
    if type(sample.mw_setpoint) is float:
        total += sample.mw_setpoint
    scalars = _SCALARS
    for value in sample.details.values():
        kind = type(value)
        if kind is float:
            total += value
        elif kind not in scalars:
            return False
    return math.isfinite(total)


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout_s:g} s"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class AdapterRuntime:
    """One asset's adapter with its faults contained.

    Calls into the adapter are serialised (a read never overlaps a setpoint on the same
    device) and bounded by timeouts. Nothing here raises on a device or plugin fault.
    """

    def __init__(
        self,
        *,
        asset: Asset,
        adapter: Adapter,
        adapter_name: str,
        package: str,
        timeout_s: float,
        command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S,
        conditions: ConditionQueue | None = None,
    ) -> None:
        self.asset = asset
        self.conditions = conditions if conditions is not None else ConditionQueue()
        """What the adapter reported about its device's conditions, until drained."""
        self.adapter = adapter
        self.adapter_name = adapter_name
        self.package = package
        self.timeout_s = timeout_s
        self.command_timeout_s = command_timeout_s
        self.connected = False
        self.last_commanded_mw: float | None = None
        self.latest: TelemetrySample | None = None
        """The last sample read from the device (``None`` before the first); a site split
        narrows the asset's range with it (:mod:`der_sdk.control`)."""
        self._lock = asyncio.Lock()
        self._failed_reads = 0
        self._last_problem: str | None = None

    @property
    def label(self) -> str:
        """``adapter 'sim-bess' (der-sdk-sim-bess)``: for logs and quality reasons."""
        return f"adapter {self.adapter_name!r} ({self.package})"

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> bool:
        """Connect if not connected; ``False`` (logged) when it failed."""
        async with self._lock:
            return await self._connect_locked() is None

    async def close(self) -> None:
        """Close the adapter; errors are logged, never raised."""
        async with self._lock:
            await self._close_locked()

    async def _connect_locked(self) -> str | None:
        """``None`` when connected, else why not."""
        if self.connected:
            return None
        problem = await self._call(self.adapter.connect, self.timeout_s)
        if problem is not None:
            reason = f"{self.label} failed to connect: {problem}"
            self._report_problem(reason, "will retry on the next poll")
            return reason
        self.connected = True
        self._failed_reads = 0
        log.info("asset %s: %s connected", self.asset.asset_id, self.label)
        return None

    async def _close_locked(self) -> None:
        if not self.connected:
            return
        self.connected = False
        problem = await self._call(self.adapter.close, self.timeout_s)
        if problem is not None:
            log.warning(
                "asset %s: %s failed to close: %s", self.asset.asset_id, self.label, problem
            )

    # ------------------------------------------------------------------ telemetry

    async def read(self) -> TelemetrySample:
        """A sample from the device, or a bad-quality one saying why there is none."""
        return await self._read(None)

    async def _read(self, tick: _Tick | None) -> TelemetrySample:
        """:meth:`read`; within ``tick`` (:func:`read_all`) the adapter's ``read()`` is
        bounded by the tick's shared timer instead of a timeout context of its own."""
        async with self._lock:
            problem = await self._connect_locked()
            if problem is not None:
                return self._bad_sample(problem)
            try:
                if tick is None or tick.fired:
                    async with asyncio.timeout(self.timeout_s):
                        sample = await self.adapter.read()
                else:
                    sample = await tick.bound(self, self.adapter.read())
                if not isinstance(sample, TelemetrySample):
                    raise TypeError(
                        f"read() returned {type(sample).__name__}, not a TelemetrySample"
                    )
            except asyncio.CancelledError:
                if tick is None or not tick.expired(self):
                    raise
                return await self._read_failed(_describe(TimeoutError(), self.timeout_s))
            except Exception as exc:
                return await self._read_failed(_describe(exc, self.timeout_s))
        return self._accept(sample)

    def _read_nowait(self) -> TelemetrySample | None:
        """The adapter's :meth:`~der_sdk.extensions.Adapter.read_nowait` as :meth:`read`
        would return it; ``None`` when the read is to be awaited instead: not connected,
        a setpoint (or a connect) holds the adapter, it has nothing ready, or its
        ``read_nowait()`` failed (logged; :meth:`read` then says what the device does)."""
        if not self.connected or self._lock.locked():
            return None
        try:
            sample = self.adapter.read_nowait()
            if sample is not None and not isinstance(sample, TelemetrySample):
                raise TypeError(
                    f"read_nowait() returned {type(sample).__name__}, not a TelemetrySample"
                )
        except Exception as exc:
            self._report_problem(
                f"{self.label} failed in read_nowait(): {_describe(exc, self.timeout_s)}",
                "reading it with read()",
            )
            return None
        return self._accept(sample) if sample is not None else None

    def _accept(self, sample: TelemetrySample) -> TelemetrySample:
        """A sample the adapter read: finite, with this asset's identity, kept as the
        latest."""
        self._failed_reads = 0
        non_finite: list[str] = []
        if not _plainly_finite(sample):
            sample, non_finite = refuse_non_finite(sample)
        if non_finite:  # never sent as a number the headend would have to refuse
            self._report_problem(
                f"{self.label} read {'; '.join(non_finite)}",
                "reporting the sample as bad without those values",
            )
        elif self._last_problem is not None:
            log.info("asset %s: %s recovered", self.asset.asset_id, self.label)
            self._last_problem = None
        self.latest = self._own(sample)
        return self.latest

    async def _read_failed(self, problem: str) -> TelemetrySample:
        reason = f"{self.label} failed to read: {problem}"
        self._failed_reads += 1
        if self._failed_reads >= RECONNECT_AFTER_FAILED_READS:
            self._report_problem(reason, "closing it to reconnect on the next poll")
            await self._close_locked()
            self._failed_reads = 0
        else:
            self._report_problem(reason, "reporting a bad-quality sample")
        return self._bad_sample(reason)

    def _own(self, sample: TelemetrySample) -> TelemetrySample:
        """The sample with this asset's identity, and the last command if it had none."""
        changes: dict[str, Any] = {}
        if sample.asset_id != self.asset.asset_id:
            changes["asset_id"] = self.asset.asset_id
        if sample.site_id != self.asset.site_id:
            changes["site_id"] = self.asset.site_id
        if (
            sample.mw_setpoint is None
            and sample.quality != "bad"
            and self.last_commanded_mw is not None
        ):
            changes["mw_setpoint"] = self.last_commanded_mw
        return msgspec.structs.replace(sample, **changes) if changes else sample

    def _bad_sample(self, reason: str) -> TelemetrySample:
        return TelemetrySample(
            asset_id=self.asset.asset_id,
            site_id=self.asset.site_id,
            ts=utc_now(),
            mw=0.0,
            mw_setpoint=None,
            online=False,
            quality="bad",
            quality_reason=reason,
        )

    # ------------------------------------------------------------------ control

    async def apply_setpoint(self, mw: float, duration_s: float | None = None) -> SetpointResult:
        """Command ``mw`` (already clamped); a fault becomes a ``failed`` result."""
        async with self._lock:
            problem = await self._connect_locked()
            if problem is not None:
                return SetpointResult(status="failed", reason=problem)
            try:
                async with asyncio.timeout(self.command_timeout_s):
                    result = await self.adapter.apply_setpoint(mw, duration_s)
                if not isinstance(result, SetpointResult):
                    raise TypeError(
                        f"apply_setpoint() returned {type(result).__name__}, not a SetpointResult"
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = (
                    f"{self.label} failed to apply {mw:g} MW: "
                    f"{_describe(exc, self.command_timeout_s)}"
                )
                log.warning("asset %s: %s", self.asset.asset_id, reason)
                return SetpointResult(status="failed", reason=reason)
        if result.status == "applied":
            self.last_commanded_mw = result.applied_mw if result.applied_mw is not None else mw
        return result

    # ------------------------------------------------------------------ helpers

    async def _call(self, method: Callable[[], Awaitable[T]], timeout_s: float) -> str | None:
        try:
            async with asyncio.timeout(timeout_s):
                await method()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return _describe(exc, timeout_s)
        return None

    def _report_problem(self, reason: str, consequence: str) -> None:
        """Log a fault at WARNING when it starts or changes, at DEBUG while it repeats."""
        level = logging.DEBUG if reason == self._last_problem else logging.WARNING
        log.log(level, "asset %s: %s; %s", self.asset.asset_id, reason, consequence)
        self._last_problem = reason


_TICK_SLACK_S = 0.01
"""How long after its timeout a read of a tick may be stopped: the tick's one timer is
set this much after the timeout so that reads started in the loop's next turn, as nearly
all are, are due by then and need no timer of their own."""


class _Tick:
    """One timer for every adapter read of one telemetry tick (:func:`read_all`).

    A read in progress is registered with its task and start time. When the timer fires,
    every read that has had its whole timeout is cancelled (the runtime turns that into a
    bad sample saying it timed out); a read that started later (it waited for a setpoint
    to release the adapter, or for its connection) or has a longer timeout than the
    shortest, which the timer is set for, gets a timer of its own for the rest of its
    time, and one that starts after the timer fired takes a timeout context as
    :meth:`AdapterRuntime.read` does. So each read still gets its full ``timeout_s``, at
    the price of one timer per tick rather than a timeout context per adapter per tick.
    """

    __slots__ = ("_expired", "_late", "_loop", "_reading", "_timer", "fired")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self._loop = loop
        self._reading: dict[AdapterRuntime, tuple[asyncio.Task[Any], float]] = {}
        self._expired: set[AdapterRuntime] = set()
        self._late: list[asyncio.TimerHandle] = []
        self.fired = False
        self._timer = loop.call_at(loop.time() + timeout_s + _TICK_SLACK_S, self._fire)

    async def bound(self, runtime: AdapterRuntime, read: Awaitable[T]) -> T:
        task = asyncio.current_task(self._loop)  # given the loop: no getpid() (3.11)
        assert task is not None
        self._reading[runtime] = (task, self._loop.time())
        try:
            return await read
        finally:
            del self._reading[runtime]

    def expired(self, runtime: AdapterRuntime) -> bool:
        """Whether the tick cancelled ``runtime``'s read for taking too long (the
        cancellation is then taken back: the read ends with a bad sample instead)."""
        if runtime not in self._expired:
            return False
        self._expired.discard(runtime)
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return True

    def _fire(self) -> None:
        self.fired = True
        now = self._loop.time()
        for runtime, (task, started) in list(self._reading.items()):
            due = started + runtime.timeout_s
            if due <= now:
                self._expire(runtime, task)
            else:
                self._late.append(self._loop.call_at(due, self._expire, runtime, task))

    def _expire(self, runtime: AdapterRuntime, task: asyncio.Task[Any]) -> None:
        held = self._reading.get(runtime)
        if held is not None and held[0] is task:
            self._expired.add(runtime)
            task.cancel()

    def close(self) -> None:
        self._timer.cancel()
        for timer in self._late:
            timer.cancel()


async def read_all(runtimes: Sequence[AdapterRuntime]) -> list[TelemetrySample]:
    """:meth:`AdapterRuntime.read` of every runtime, concurrently, in their order.

    What ``gather(*(rt.read() for rt in runtimes))`` gives, for less: a sample an adapter
    has ready (:meth:`~der_sdk.extensions.Adapter.read_nowait`, e.g. a poller's newest
    poll) is taken at once, without a task, and the reads that are awaited share one
    timer (:class:`_Tick`) instead of entering a timeout context each: at thousands of
    adapters a tick made and cancelled thousands of tasks and loop timers
    (docs/performance.md). A read that hangs still ends after its runtime's ``timeout_s``
    with a bad sample naming the adapter; cancelling this cancels every read.
    """
    ready = [rt._read_nowait() for rt in runtimes]
    waiting = [i for i, sample in enumerate(ready) if sample is None]
    if waiting:
        loop = asyncio.get_running_loop()
        tick = _Tick(loop, min(runtimes[i].timeout_s for i in waiting))  # the rest: a timer each
        try:
            read = await asyncio.gather(*(runtimes[i]._read(tick) for i in waiting))
        finally:
            tick.close()
        for i, sample in zip(waiting, read, strict=True):
            ready[i] = sample
    return cast("list[TelemetrySample]", ready)  # every None was replaced


def adapter_names(runtimes: Mapping[str, AdapterRuntime]) -> dict[str, str]:
    """Asset id → adapter type name, as sent in Register."""
    return {asset_id: rt.adapter_name for asset_id, rt in sorted(runtimes.items())}
