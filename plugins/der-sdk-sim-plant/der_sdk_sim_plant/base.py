"""What the three simulators share: a model stepped in whole seconds, and an adapter that
steps it by a monotonic clock, checks setpoints and reports samples.

Every random draw happens once per simulated second (a *tick*), from the model's own
seeded generator, so a seed and the time elapsed fix every value: polling more or less
often does not change what the plant does.
"""

from __future__ import annotations

import abc
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Generic, TypeVar

import msgspec

from der_sdk.extensions import (
    Adapter,
    AdapterContext,
    ConditionReporter,
    ConditionSeverity,
    SetpointResult,
)
from der_sdk.models import Asset, TelemetrySample, utc_now

__all__ = [
    "MAX_CATCH_UP_S",
    "TICK_S",
    "Curtailment",
    "ExportLimitedModel",
    "PlantModel",
    "PlantReading",
    "RandomFault",
    "SimPlantAdapter",
    "options_of",
    "per_tick",
]

TICK_S = 1
"""Seconds per simulation step."""
MAX_CATCH_UP_S = 3600
"""After a longer pause (the agent was stopped), only the last hour is simulated step by
step; the time before it passes without weather, arrivals or faults."""

OptionsT = TypeVar("OptionsT", bound=msgspec.Struct)

_TOLERANCE_MW = 1e-9


def per_tick(rate_per_h: float) -> float:
    """The chance that an event with ``rate_per_h`` happens in one tick (at most 1)."""
    return min(1.0, rate_per_h * TICK_S / 3600.0)


@dataclass(frozen=True, kw_only=True)
class PlantReading:
    """What a model shows at an instant: the core fields and the type's ``details``."""

    mw: float
    status: str
    mw_setpoint: float | None
    details: dict[str, Any] = field(default_factory=dict)


class PlantModel(abc.ABC, Generic[OptionsT]):
    """A simulated plant: pure, no clock of its own, stepped one tick at a time.

    :param asset: limits from the inventory.
    :param options: the adapter type's options.
    :param conditions: where device conditions are raised and cleared.
    """

    def __init__(self, asset: Asset, options: OptionsT, conditions: ConditionReporter) -> None:
        self.asset = asset
        self.options = options
        self.conditions = conditions
        self.rng = random.Random(getattr(options, "seed", None))
        self.elapsed_s = 0
        """Simulated seconds since the model was built."""

    def run(self, ticks: int) -> None:
        """Advance ``ticks`` seconds; beyond :data:`MAX_CATCH_UP_S` the extra time only
        passes (:meth:`skip`)."""
        limit = MAX_CATCH_UP_S // TICK_S
        if ticks > limit:
            self.skip(ticks - limit)
            self.elapsed_s += (ticks - limit) * TICK_S
            ticks = limit
        for _ in range(ticks):
            self.elapsed_s += TICK_S
            self.tick()

    @abc.abstractmethod
    def tick(self) -> None:
        """One simulated second: weather, arrivals, faults, energy."""

    def skip(self, ticks: int) -> None:
        """``ticks`` seconds pass without being simulated (a long pause)."""

    @abc.abstractmethod
    def apply(self, mw: float) -> SetpointResult:
        """Take a finite ``mw`` in the model's control sense, or reject it with a reason."""

    @abc.abstractmethod
    def lift_limit(self) -> None:
        """A timed limit ended: run unlimited again."""

    @abc.abstractmethod
    def reading(self, now: datetime) -> PlantReading:
        """The plant at wall time ``now``."""


class ExportLimitedModel(PlantModel[OptionsT]):
    """A generator whose output an export limit caps (``0 <= limit <= max_mw``)."""

    adapter_name: ClassVar[str]
    """The adapter type's name, for the reasons of refused limits."""

    def __init__(self, asset: Asset, options: OptionsT, conditions: ConditionReporter) -> None:
        super().__init__(asset, options, conditions)
        self.export_limit_mw: float | None = None

    def apply(self, mw: float) -> SetpointResult:
        """Take ``mw >= 0`` as the export limit, capped at ``max_mw``; refuse a negative
        one: a generator cannot consume."""
        if mw < -_TOLERANCE_MW:
            return SetpointResult(
                status="rejected",
                reason=f"{self.adapter_name} takes an export limit of 0 MW or more (a "
                f"generator cannot consume); got {mw:g} MW",
            )
        applied = min(max(mw, 0.0), self.asset.max_mw)
        reason = None
        if applied < mw - _TOLERANCE_MW:
            reason = f"export limit capped at the asset's max_mw {self.asset.max_mw:g} MW"
        self.export_limit_mw = applied
        return SetpointResult(status="applied", applied_mw=applied, reason=reason)

    def lift_limit(self) -> None:
        self.export_limit_mw = None

    def curtail(self, available_mw: float) -> Curtailment:
        """What the limit in force leaves of ``available_mw``."""
        limit = self.export_limit_mw
        output = available_mw if limit is None else min(available_mw, limit)
        curtailed = available_mw - output
        binding = limit is not None and curtailed > _TOLERANCE_MW
        return Curtailment(
            output_mw=output,
            curtailed_mw=curtailed,
            reason=f"export limit {limit:g} MW" if binding else None,
        )

    def curtailment_details(self, available_mw: float, curtailment: Curtailment) -> dict[str, Any]:
        """The curtailment fields of ``details``, shared by PV and wind."""
        # From the rounded figures, so that the sample's mw plus curtailed_mw is exactly
        # the available_mw it reports (a headend computes the potential that way).
        available = round(available_mw, 6)
        return {
            "curtailed_mw": round(available - round(curtailment.output_mw, 6), 6),
            "curtailment_reason": curtailment.reason,
            "export_limit_mw": self.export_limit_mw,
            "available_mw": available,
        }


@dataclass(frozen=True)
class Curtailment:
    """What an export limit does to the available power."""

    output_mw: float
    curtailed_mw: float
    reason: str | None
    """``"export limit X MW"`` while the limit holds the output below what is available,
    else ``None``."""


class RandomFault:
    """A fault that strikes at random (``rate_per_h`` on average), lasts ``duration_s``,
    and is a condition ``code`` while it lasts. Stepped by its model's :meth:`tick`."""

    def __init__(
        self,
        conditions: ConditionReporter,
        *,
        code: str,
        severity: ConditionSeverity,
        rate_per_h: float,
        duration_s: float,
        raised: str,
        cleared: str,
    ) -> None:
        self.conditions = conditions
        self.code = code
        self.severity: ConditionSeverity = severity
        self.rate_per_h = rate_per_h
        self.duration_s = max(1, round(duration_s))
        self.raised_text = raised
        self.cleared_text = cleared
        self.left_s = 0

    @property
    def active(self) -> bool:
        return self.left_s > 0

    def tick(self, rng: random.Random) -> None:
        """One second: the fault ends when its time is up, else may strike (one draw)."""
        if self.left_s > 0:
            self._pass(TICK_S)
        elif self.rate_per_h > 0 and rng.random() < per_tick(self.rate_per_h):
            self.left_s = self.duration_s
            self.conditions.raise_condition(self.code, self.severity, self.raised_text)

    def skip(self, ticks: int) -> None:
        """A long pause: the fault does not outlast it."""
        if self.left_s > 0:
            self._pass(ticks * TICK_S)

    def _pass(self, seconds: int) -> None:
        self.left_s = max(0, self.left_s - seconds)
        if self.left_s == 0:
            self.conditions.clear_condition(self.code, self.cleared_text)


M = TypeVar("M", bound=PlantModel[Any])


class SimPlantAdapter(Adapter, Generic[M]):
    """A :class:`PlantModel` behind the der-sdk adapter interface, stepped on each call
    by a monotonic clock.

    :param clock: seconds from a monotonic source (inject a fake one in tests).
    :param wall_clock: the timestamp of samples, and the time of day for the sun.
    """

    def __init__(
        self,
        context: AdapterContext,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.asset = context.asset
        self.model = self.build_model(context)
        self._clock = clock
        self._wall_clock = wall_clock
        self._connected = False
        self._last: float | None = None
        self._carry_s = 0.0
        self._limit_until: float | None = None

    @abc.abstractmethod
    def build_model(self, context: AdapterContext) -> M:
        """The model for ``context``'s asset and options."""

    # ---------------------------------------------------------------- time

    def _step(self, seconds: float) -> None:
        total = self._carry_s + seconds
        ticks = int(total // TICK_S)
        self._carry_s = total - ticks * TICK_S
        self.model.run(ticks)

    def _advance(self) -> None:
        """Step the model up to now, lifting a timed limit on the way if it ended."""
        now = self._clock()
        if self._last is None:
            self._last = now
            return
        if self._limit_until is not None and now >= self._limit_until:
            self._step(max(0.0, self._limit_until - self._last))
            self._last = max(self._last, self._limit_until)
            self._limit_until = None
            self.model.lift_limit()
        self._step(max(0.0, now - self._last))
        self._last = max(self._last, now)

    # ---------------------------------------------------------------- Adapter

    async def connect(self) -> None:
        # The plant keeps running while the agent is away: the time between a close()
        # and the next connect() is stepped like any other.
        self._advance()
        self._connected = True

    async def read(self) -> TelemetrySample:
        now = self._wall_clock()
        if not self._connected:
            return TelemetrySample(
                asset_id=self.asset.asset_id,
                site_id=self.asset.site_id,
                ts=now,
                mw=0.0,
                online=False,
                quality="bad",
                quality_reason="adapter not connected",
            )
        self._advance()
        reading = self.model.reading(now)
        return TelemetrySample(
            asset_id=self.asset.asset_id,
            site_id=self.asset.site_id,
            ts=now,
            mw=reading.mw,
            mw_setpoint=reading.mw_setpoint,
            online=True,
            status=reading.status,
            quality="good",
            details=reading.details,
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
        result = self.model.apply(mw)
        if result.status == "applied":
            assert self._last is not None  # _advance() set it
            self._limit_until = None if duration_s is None else self._last + duration_s
        return result

    async def close(self) -> None:
        self._advance()
        self._connected = False


def options_of(raw: Any, options_type: type[OptionsT]) -> OptionsT:
    """``raw`` (a dict from the agent config, ``None``, or already the Struct) as options."""
    if isinstance(raw, options_type):
        return raw
    return msgspec.convert(raw or {}, options_type)
