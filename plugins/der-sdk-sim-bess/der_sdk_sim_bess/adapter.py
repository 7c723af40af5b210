"""The ``sim-bess`` adapter: a :class:`SimBattery` behind the der-sdk adapter interface."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

import msgspec

from der_sdk.extensions import Adapter, AdapterContext, SetpointResult
from der_sdk.models import TelemetrySample, utc_now
from der_sdk_sim_bess.model import SimBattery

__all__ = ["SimBessAdapter", "SimBessOptions"]

_TEMP_RISE_AT_FULL_POWER_C = 18.0


class SimBessOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-asset options of ``sim-bess`` (the ``options`` block in the agent config)."""

    initial_soc_pct: Annotated[float, msgspec.Meta(ge=0, le=100)] = 50.0
    """State of charge at start, in percent."""
    noise_mw: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Standard deviation of Gaussian meter noise added to the reported ``mw``."""
    seed: int | None = None
    """Seed of the noise generator, for repeatable runs."""
    ambient_temp_c: float = 25.0
    """Ambient temperature; the inverter runs warmer with load."""


def _options(raw: Any) -> SimBessOptions:
    if isinstance(raw, SimBessOptions):
        return raw
    return msgspec.convert(raw or {}, SimBessOptions)


class SimBessAdapter(Adapter):
    """A simulated battery for one asset, stepped on each call by a monotonic clock.

    :param clock: seconds from a monotonic source (inject a fake one in tests).
    :param wall_clock: the timestamp of samples.
    """

    def __init__(
        self,
        context: AdapterContext,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.asset = context.asset
        self.options = _options(context.options)
        self.battery = SimBattery.for_asset(self.asset, soc_pct=self.options.initial_soc_pct)
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = random.Random(self.options.seed)
        self._connected = False
        self._last: float | None = None
        self._hold_until: float | None = None

    # ---------------------------------------------------------------- time

    def _advance(self) -> None:
        """Step the battery up to now, ending a timed setpoint on the way if it expired."""
        now = self._clock()
        if self._last is None:
            self._last = now
            return
        if self._hold_until is not None and now >= self._hold_until:
            self.battery.step(self._hold_until - self._last)
            self._last = self._hold_until
            self._hold_until = None
            self.battery.set_setpoint(0.0)
        self.battery.step(now - self._last)
        self._last = now

    # ---------------------------------------------------------------- Adapter

    async def connect(self) -> None:
        # The simulated device keeps running while the agent is away: the time between a
        # close() and the next connect() is stepped like any other.
        self._advance()
        self._connected = True

    async def read(self) -> TelemetrySample:
        if not self._connected:
            return TelemetrySample(
                asset_id=self.asset.asset_id,
                site_id=self.asset.site_id,
                ts=self._wall_clock(),
                mw=0.0,
                online=False,
                quality="bad",
                quality_reason="adapter not connected",
            )
        self._advance()
        battery = self.battery
        mw = battery.mw
        if self.options.noise_mw > 0:
            mw += self._rng.gauss(0.0, self.options.noise_mw)
        rating = max(abs(battery.max_mw), abs(battery.min_mw)) or 1.0
        inverter_temp = (
            self.options.ambient_temp_c + _TEMP_RISE_AT_FULL_POWER_C * abs(battery.mw) / rating
        )
        return TelemetrySample(
            asset_id=self.asset.asset_id,
            site_id=self.asset.site_id,
            ts=self._wall_clock(),
            mw=mw,
            mw_setpoint=battery.mw_setpoint,
            online=True,
            status=battery.status,
            quality="good",
            details={
                "soc_pct": round(battery.soc_pct, 6),
                "soh_pct": 100.0,
                "energy_mwh": round(battery.energy_mwh, 9),
                "usable_energy_mwh": round(battery.usable_energy_mwh, 9),
                "inverter_temp_c": round(inverter_temp, 3),
                "ambient_temp_c": self.options.ambient_temp_c,
            },
        )

    async def apply_setpoint(self, mw: float, duration_s: float | None = None) -> SetpointResult:
        if not self._connected:
            return SetpointResult(status="failed", reason="adapter not connected")
        if not math.isfinite(mw):
            return SetpointResult(status="rejected", reason=f"setpoint {mw} is not a number")
        if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
            return SetpointResult(
                status="rejected", reason=f"duration_s must be > 0, got {duration_s}"
            )
        self._advance()
        battery = self.battery
        applied = battery.set_setpoint(mw)
        assert self._last is not None  # _advance() set it
        self._hold_until = None if duration_s is None else self._last + duration_s
        reasons: list[str] = []
        if applied != mw:
            reasons.append(f"clamped to [{battery.min_mw}, {battery.max_mw}] MW")
        if applied < 0 and battery.full:
            reasons.append("battery is full; it charges again once it has discharged")
        elif applied > 0 and battery.empty:
            reasons.append("battery is empty; it discharges again once it has charged")
        return SetpointResult(
            status="applied", applied_mw=applied, reason="; ".join(reasons) or None
        )

    async def close(self) -> None:
        self._advance()
        self._connected = False
