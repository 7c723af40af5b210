"""A simulated device with fault injection, and the ``test-device`` adapter that drives it.

* :class:`SimulatedDevice` is what an adapter talks to: a device whose power follows its
  setpoint, with faults you switch on and off — ``timeout`` (calls hang), ``error``
  (calls raise :class:`DeviceError`), ``stale`` (measurements repeat the last value and
  timestamp) and ``disconnect`` (the connection drops and ``open()`` is refused).
* :class:`FaultyAdapter` is a well-behaved :class:`~der_sdk.extensions.Adapter` for that
  device: it bounds every device call with a timeout, turns faults into ``bad`` samples
  with a reason, marks a stale value ``uncertain`` instead of reporting it as fresh,
  reconnects on its own once the device is back, and clamps setpoints to the asset's
  limits. Use it to test code that consumes adapters (an edge service, the agent), and as
  a worked example of the adapter contract.
* :class:`SimulatedDevicePlugin` provides both as the ``test-device`` adapter type. The
  ``der_test_device`` fixture registers one for a single test.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Literal

import msgspec

from der_sdk.extensions import Adapter, AdapterContext, AdapterType, SetpointResult
from der_sdk.models import TelemetrySample, utc_now
from der_sdk.plugins import hookimpl

__all__ = [
    "FAULT_KINDS",
    "TEST_DEVICE",
    "DeviceError",
    "FaultKind",
    "FaultyAdapter",
    "Measurement",
    "SimulatedDevice",
    "SimulatedDeviceOptions",
    "SimulatedDevicePlugin",
]

TEST_DEVICE = "test-device"
"""The adapter type name :class:`SimulatedDevicePlugin` registers."""

FaultKind = Literal["timeout", "error", "stale", "disconnect"]
FAULT_KINDS: tuple[FaultKind, ...] = ("timeout", "error", "stale", "disconnect")


def _fault_kinds(kinds: Iterable[str]) -> list[FaultKind]:
    known: list[FaultKind] = []
    for kind in kinds:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {', '.join(FAULT_KINDS)}")
        known.append(kind)
    return known


class DeviceError(Exception):
    """The device answered with an error (what a Modbus exception response would be)."""


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """One reading from the device's own registers, stamped by the device's clock."""

    ts: datetime
    mw: float
    mw_setpoint: float


class SimulatedDevice:
    """A device for one asset, with switchable faults. Its power follows its setpoint
    at once, and it accepts whatever setpoint it is written: limits are the adapter's job.

    :param device_id: names the device in error messages (usually the asset id).
    :param latency_s: how long each call takes, so calls really await.
    """

    def __init__(self, device_id: str, *, latency_s: float = 0.001) -> None:
        self.device_id = device_id
        self.latency_s = latency_s
        self.faults: set[FaultKind] = set()
        self.connected = False
        self.mw = 0.0
        self.mw_setpoint = 0.0
        self.opens = 0
        self.writes: list[float] = []
        self._last: Measurement | None = None

    # ---------------------------------------------------------------- faults

    def inject(self, *kinds: str) -> None:
        """Switch faults on (see :data:`FAULT_KINDS`). ``disconnect`` also drops the
        current connection.

        :raises ValueError: an unknown fault kind.
        """
        self.faults.update(_fault_kinds(kinds))
        if "disconnect" in kinds:
            self.connected = False

    def clear(self, *kinds: str) -> None:
        """Switch faults off (all of them when none are named)."""
        if kinds:
            self.faults.difference_update(_fault_kinds(kinds))
        else:
            self.faults.clear()

    async def _io(self, what: str) -> None:
        """One round trip to the device, failing the way the active faults say."""
        if "timeout" in self.faults:
            await asyncio.Event().wait()  # hangs until cancelled, like an unanswered request
        await asyncio.sleep(self.latency_s)
        if "disconnect" in self.faults:
            if what == "open":
                raise ConnectionRefusedError(
                    f"simulated device {self.device_id}: connection refused (fault 'disconnect')"
                )
            raise ConnectionResetError(
                f"simulated device {self.device_id}: connection lost (fault 'disconnect')"
            )
        if what != "open" and not self.connected:
            raise ConnectionError(f"simulated device {self.device_id}: not connected")
        if "error" in self.faults:
            raise DeviceError(f"simulated device {self.device_id}: {what} failed (fault 'error')")

    # ---------------------------------------------------------------- the device's interface

    async def open(self) -> None:
        await self._io("open")
        self.connected = True
        self.opens += 1

    async def measure(self) -> Measurement:
        """The current reading; with ``stale`` on, the previous one again, unchanged."""
        await self._io("measure")
        if "stale" in self.faults and self._last is not None:
            return self._last
        ts = utc_now()
        if self._last is not None and ts <= self._last.ts:  # a coarse clock: still move on
            ts = self._last.ts + timedelta(microseconds=1)
        self._last = Measurement(ts=ts, mw=self.mw, mw_setpoint=self.mw_setpoint)
        return self._last

    async def write_setpoint(self, mw: float) -> None:
        await self._io("write")
        self.writes.append(mw)
        self.mw_setpoint = mw
        self.mw = mw

    async def close(self) -> None:
        self.connected = False


class SimulatedDeviceOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-asset options of the ``test-device`` adapter."""

    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 0.2
    """How long the adapter waits for the device before it reports a timeout."""
    latency_s: Annotated[float, msgspec.Meta(ge=0)] = 0.001
    """How long each device call takes (used when the adapter creates its device)."""


class FaultyAdapter(Adapter):
    """The ``test-device`` adapter: a :class:`SimulatedDevice` behind the adapter contract.

    Switch faults with :meth:`inject` and :meth:`clear` (or on :attr:`device`).

    :param device: the device to drive; by default a new one named after the asset.
    """

    def __init__(self, context: AdapterContext, device: SimulatedDevice | None = None) -> None:
        self.asset = context.asset
        options = context.options
        if not isinstance(options, SimulatedDeviceOptions):
            options = msgspec.convert(options or {}, SimulatedDeviceOptions)
        self.options: SimulatedDeviceOptions = options
        self.device = device or SimulatedDevice(
            self.asset.asset_id, latency_s=self.options.latency_s
        )
        self._open = False
        self._last_good_ts: datetime | None = None

    def inject(self, *kinds: str) -> None:
        """Switch faults on in the device."""
        self.device.inject(*kinds)

    def clear(self, *kinds: str) -> None:
        """Switch faults off in the device (all when none are named)."""
        self.device.clear(*kinds)

    # ---------------------------------------------------------------- helpers

    def _bad(self, reason: str) -> TelemetrySample:
        return TelemetrySample(
            asset_id=self.asset.asset_id,
            site_id=self.asset.site_id,
            ts=utc_now(),
            mw=0.0,
            online=False,
            quality="bad",
            quality_reason=reason,
        )

    def _problem(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"device did not answer within {self.options.timeout_s:g} s"
        return f"{type(exc).__name__}: {exc}"

    async def _ensure_open(self) -> None:
        if not self._open:
            async with asyncio.timeout(self.options.timeout_s):
                await self.device.open()
            self._open = True

    # ---------------------------------------------------------------- Adapter

    async def connect(self) -> None:
        self._open = False
        await self._ensure_open()

    async def read(self) -> TelemetrySample:
        try:
            await self._ensure_open()  # reconnects on its own once the device is back
            async with asyncio.timeout(self.options.timeout_s):
                reading = await self.device.measure()
        except (OSError, DeviceError, TimeoutError) as exc:
            if isinstance(exc, OSError):
                self._open = False
            return self._bad(self._problem(exc))
        if self._last_good_ts is not None and reading.ts <= self._last_good_ts:
            return TelemetrySample(
                asset_id=self.asset.asset_id,
                site_id=self.asset.site_id,
                ts=utc_now(),
                mw=reading.mw,
                mw_setpoint=reading.mw_setpoint,
                quality="uncertain",
                quality_reason=(
                    f"stale: the device's value has not updated since {reading.ts.isoformat()}"
                ),
            )
        self._last_good_ts = reading.ts
        return TelemetrySample(
            asset_id=self.asset.asset_id,
            site_id=self.asset.site_id,
            ts=reading.ts,
            mw=reading.mw,
            mw_setpoint=reading.mw_setpoint,
            status="running",
        )

    async def apply_setpoint(self, mw: float, duration_s: float | None = None) -> SetpointResult:
        if not math.isfinite(mw):
            return SetpointResult(status="rejected", reason=f"setpoint {mw} is not a number")
        applied = self.asset.clamp(mw)
        try:
            await self._ensure_open()
            async with asyncio.timeout(self.options.timeout_s):
                await self.device.write_setpoint(applied)
        except (OSError, DeviceError, TimeoutError) as exc:
            if isinstance(exc, OSError):
                self._open = False
            return SetpointResult(status="failed", reason=self._problem(exc))
        reason = None
        if applied != mw:
            reason = f"clamped to [{self.asset.min_mw:g}, {self.asset.max_mw:g}] MW"
        return SetpointResult(status="applied", applied_mw=applied, reason=reason)

    async def close(self) -> None:
        self._open = False
        await self.device.close()


class SimulatedDevicePlugin:
    """A plugin object providing the ``test-device`` adapter type.

    Every adapter it builds drives the :class:`SimulatedDevice` of its asset, so a test can
    switch faults on the device the agent is reading: ``plugin.device(asset_id)``.

    :param name: the adapter type name to register (``test-device``).
    """

    def __init__(self, *, name: str = TEST_DEVICE) -> None:
        self.name = name
        self.devices: dict[str, SimulatedDevice] = {}
        self.adapters: list[FaultyAdapter] = []

    def device(self, asset_id: str) -> SimulatedDevice:
        """The device of ``asset_id`` (created on first use, before or after the adapter)."""
        key = asset_id.lower()
        if key not in self.devices:
            self.devices[key] = SimulatedDevice(key)
        return self.devices[key]

    def inject(self, *kinds: str, assets: Iterable[str] | None = None) -> None:
        """Switch faults on in the devices of ``assets`` (default: every device so far)."""
        for asset_id in self.devices if assets is None else assets:
            self.device(asset_id).inject(*kinds)

    def clear(self, *kinds: str, assets: Iterable[str] | None = None) -> None:
        """Switch faults off in the devices of ``assets`` (default: every device)."""
        for asset_id in self.devices if assets is None else assets:
            self.device(asset_id).clear(*kinds)

    def build(self, context: AdapterContext) -> FaultyAdapter:
        """The adapter factory of the ``test-device`` type."""
        options = context.options
        if not isinstance(options, SimulatedDeviceOptions):
            options = msgspec.convert(options or {}, SimulatedDeviceOptions)
        device = self.device(context.asset.asset_id)
        device.latency_s = options.latency_s
        adapter = FaultyAdapter(context, device)
        self.adapters.append(adapter)
        return adapter

    @hookimpl
    def der_adapter_types(self) -> list[AdapterType]:
        return [
            AdapterType(
                name=self.name,
                factory=self.build,
                options=SimulatedDeviceOptions,
                description="der_sdk.testing: a simulated device with fault injection",
            )
        ]
