{% set exported = ["DeviceError", "Reading", "SimulatedDevice", cookiecutter.__class ~ "Adapter", cookiecutter.__class ~ "Options"] -%}
"""The ``{{ cookiecutter.name }}`` adapter for {{ cookiecutter.vendor }} devices.

It talks to :class:`SimulatedDevice`, an in-memory stand-in, so the plugin runs (and passes
der-sdk's conformance suite) before any hardware is involved. Replace the device with your
client (Modbus, HTTP, a vendor SDK) and keep what :class:`{{ cookiecutter.__class }}Adapter` does
with it: bound every device call by a timeout, never block the event loop, and when the
device cannot be read return a sample with ``quality="bad"`` and a ``quality_reason`` —
never an old value with a new timestamp.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

import msgspec
from der_sdk.extensions import Adapter, AdapterContext, SetpointResult
from der_sdk.models import TelemetrySample, utc_now

__all__ = [
    "FAULT_KINDS",
{%- for item in exported | sort(case_sensitive=True) %}
    "{{ item }}",
{%- endfor %}
]

FAULT_KINDS = ("timeout", "error", "stale", "disconnect")
"""What :meth:`SimulatedDevice.inject_fault` can simulate: requests that hang, error
answers, a value that stops updating, a dropped connection."""


class {{ cookiecutter.__class }}Options(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-asset options (the ``options`` block of an asset in the agent config).

    The agent validates them against this schema at start, naming the asset and the field.
    """

    initial_mw: float = 0.0
    """What the simulated device outputs before its first setpoint, in MW."""
    rated_mw: Annotated[float, msgspec.Meta(gt=0)] | None = None
    """The device's own rating: setpoints are clamped to ``[-rated_mw, rated_mw]`` as well
    as to the asset's ``[min_mw, max_mw]``. ``None``: the asset's limits only."""
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    """How long to wait for the device before a read reports it as not answering."""


# --------------------------------------------------------------------------- the device


class DeviceError(Exception):
    """The device answered with an error."""


@dataclass(frozen=True)
class Reading:
    """One reading, stamped by the device's own clock."""

    ts: datetime
    mw: float
    setpoint_mw: float | None


class SimulatedDevice:
    """An in-memory stand-in for the device: its output follows its setpoint at once.

    :meth:`inject_fault` makes it fail the way real devices do, so tests (and der-sdk's
    conformance suite) can check what the adapter does then.
    """

    def __init__(self, mw: float) -> None:
        self.mw = mw
        self.setpoint_mw: float | None = None
        self.faults: set[str] = set()
        self.connected = False
        self._last: Reading | None = None

    def inject_fault(self, kind: str) -> bool:
        """Start failing as ``kind`` (one of :data:`FAULT_KINDS`); ``False`` if unknown."""
        if kind not in FAULT_KINDS:
            return False
        self.faults.add(kind)
        if kind == "disconnect":
            self.connected = False
        return True

    def clear_fault(self, kind: str) -> None:
        self.faults.discard(kind)

    async def _request(self) -> None:
        """One round trip, failing as the injected faults say."""
        if "timeout" in self.faults:
            await asyncio.Event().wait()  # never answered; the adapter's timeout ends it
        await asyncio.sleep(0.001)  # a real request takes time: let other tasks run
        if "disconnect" in self.faults:
            raise ConnectionResetError("connection to the device lost")
        if not self.connected:
            raise ConnectionError("not connected to the device")
        if "error" in self.faults:
            raise DeviceError("the device answered with an error")

    async def open(self) -> None:
        if "disconnect" in self.faults:
            raise ConnectionRefusedError("the device refused the connection")
        self.connected = True

    async def read(self) -> Reading:
        await self._request()
        if "stale" in self.faults and self._last is not None:
            return self._last  # the device's value (and its clock) stopped moving
        ts = utc_now()
        if self._last is not None and ts <= self._last.ts:
            ts = self._last.ts + timedelta(microseconds=1)
        self._last = Reading(ts=ts, mw=self.mw, setpoint_mw=self.setpoint_mw)
        return self._last

    async def write_setpoint(self, mw: float) -> None:
        await self._request()
        self.setpoint_mw = mw
        self.mw = mw

    async def close(self) -> None:
        self.connected = False


# --------------------------------------------------------------------------- the adapter


def _options(raw: Any) -> {{ cookiecutter.__class }}Options:
    if isinstance(raw, {{ cookiecutter.__class }}Options):
        return raw
    return msgspec.convert(raw or {}, {{ cookiecutter.__class }}Options)


class {{ cookiecutter.__class }}Adapter(Adapter):
    """The adapter for one asset. The agent calls ``connect()`` once, ``read()`` every
    telemetry interval, ``apply_setpoint()`` per dispatch and ``close()`` at shutdown."""

    def __init__(self, context: AdapterContext) -> None:
        self.asset = context.asset
        self.options = _options(context.options)
        self.device = SimulatedDevice(self.options.initial_mw)
        self._last_ts: datetime | None = None

    def _limits(self) -> tuple[float, float]:
        low, high = self.asset.min_mw, self.asset.max_mw
        if self.options.rated_mw is not None:
            low, high = max(low, -self.options.rated_mw), min(high, self.options.rated_mw)
        return low, high

    def _problem(self, exc: Exception) -> str:
        if isinstance(exc, TimeoutError):
            return f"the device did not answer within {self.options.timeout_s:g} s"
        return f"{type(exc).__name__}: {exc}"

    def _sample(self, **fields: Any) -> TelemetrySample:
        return TelemetrySample(asset_id=self.asset.asset_id, site_id=self.asset.site_id, **fields)

    async def _ensure_connected(self) -> None:
        if not self.device.connected:
            async with asyncio.timeout(self.options.timeout_s):
                await self.device.open()

    async def connect(self) -> None:
        await self._ensure_connected()

    async def read(self) -> TelemetrySample:
        try:
            await self._ensure_connected()  # reconnects on its own once the device is back
            async with asyncio.timeout(self.options.timeout_s):
                reading = await self.device.read()
        except (OSError, DeviceError, TimeoutError) as exc:
            return self._sample(
                ts=utc_now(), mw=0.0, online=False, quality="bad", quality_reason=self._problem(exc)
            )
        if self._last_ts is not None and reading.ts <= self._last_ts:
            return self._sample(
                ts=utc_now(),
                mw=reading.mw,
                quality="uncertain",
                quality_reason=f"the device's value stopped updating at {reading.ts.isoformat()}",
            )
        self._last_ts = reading.ts
        return self._sample(
            ts=reading.ts, mw=reading.mw, mw_setpoint=reading.setpoint_mw, status="running"
        )

    async def apply_setpoint(self, mw: float, duration_s: float | None = None) -> SetpointResult:
        # duration_s needs nothing here: the agent itself returns the asset to 0 MW when a
        # timed dispatch ends. Use it if your device can hold a setpoint for a time.
        if not math.isfinite(mw):
            return SetpointResult(status="rejected", reason=f"setpoint {mw} is not a number")
        low, high = self._limits()
        applied = min(max(mw, low), high)
        try:
            await self._ensure_connected()
            async with asyncio.timeout(self.options.timeout_s):
                await self.device.write_setpoint(applied)
        except (OSError, DeviceError, TimeoutError) as exc:
            return SetpointResult(status="failed", reason=self._problem(exc))
        reason = None if applied == mw else f"clamped to [{low:g}, {high:g}] MW"
        return SetpointResult(status="applied", applied_mw=applied, reason=reason)

    async def close(self) -> None:
        await self.device.close()
