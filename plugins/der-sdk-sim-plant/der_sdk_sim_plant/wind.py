"""``sim-wind``: a wind turbine (or farm) on a seeded, bounded random walk of wind speed,
with a power curve, an over-speed stop above cut-out, and curtailment to an export
limit."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any

import msgspec

from der_sdk.extensions import AdapterContext, ConditionReporter
from der_sdk.models import Asset
from der_sdk_sim_plant.base import (
    ExportLimitedModel,
    PlantReading,
    SimPlantAdapter,
    options_of,
)

__all__ = ["OVERSPEED_STOP", "SimWind", "SimWindAdapter", "SimWindOptions", "power_curve"]

OVERSPEED_STOP = "overspeed_stop"
"""The condition code of a stop above cut-out wind speed."""

Speed = Annotated[float, msgspec.Meta(ge=0, le=100)]


class SimWindOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-asset options of ``sim-wind`` (the ``options`` block in the agent config)."""

    seed: int | None = None
    """Seed of the wind, for repeatable runs (default: random)."""
    mean_wind_ms: Speed = 8.0
    """The speed the walk returns to."""
    initial_wind_ms: Speed | None = None
    """Wind speed at start; default ``mean_wind_ms``."""
    turbulence_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.3
    """Standard deviation of the wind's change in one second."""
    reversion_s: Annotated[float, msgspec.Meta(ge=1)] = 600.0
    """How quickly the wind returns to its mean (the walk's time constant)."""
    max_wind_ms: Annotated[float, msgspec.Meta(gt=0, le=100)] = 35.0
    """The walk stays within ``[0, max_wind_ms]``."""
    cut_in_ms: Speed = 3.0
    rated_ms: Speed = 12.0
    cut_out_ms: Speed = 25.0
    restart_ms: Speed | None = None
    """After an over-speed stop, the turbine restarts below this speed; default
    ``cut_out_ms - 3``."""
    availability_pct: Annotated[float, msgspec.Meta(ge=0, le=100)] = 100.0
    """Share of the rated capacity that is available (turbines out for maintenance)."""
    rated_rpm: Annotated[float, msgspec.Meta(gt=0)] = 15.0
    ambient_temp_c: float = 15.0

    def __post_init__(self) -> None:
        if not self.cut_in_ms < self.rated_ms < self.cut_out_ms:
            raise ValueError(
                f"wind speeds must rise cut_in_ms < rated_ms < cut_out_ms, got "
                f"{self.cut_in_ms:g} < {self.rated_ms:g} < {self.cut_out_ms:g}"
            )
        if self.restart_ms is not None and not self.cut_in_ms <= self.restart_ms < self.cut_out_ms:
            raise ValueError(
                f"restart_ms must be in [cut_in_ms, cut_out_ms), got {self.restart_ms:g}"
            )

    @property
    def restart_below_ms(self) -> float:
        return (
            self.restart_ms
            if self.restart_ms is not None
            else max(self.cut_in_ms, self.cut_out_ms - 3.0)
        )


def power_curve(wind_ms: float, rated_mw: float, options: SimWindOptions) -> float:
    """Output of a running turbine at ``wind_ms``: 0 below cut-in, rising with the cube
    of the wind to ``rated_mw`` at rated speed, flat up to cut-out, 0 from cut-out."""
    o = options
    if wind_ms < o.cut_in_ms or wind_ms >= o.cut_out_ms:
        return 0.0
    if wind_ms >= o.rated_ms:
        return rated_mw
    share = (wind_ms**3 - o.cut_in_ms**3) / (o.rated_ms**3 - o.cut_in_ms**3)
    return rated_mw * share


class SimWind(ExportLimitedModel[SimWindOptions]):
    """A wind turbine: an Ornstein-Uhlenbeck walk of wind speed, bounded by reflection;
    the power curve times availability; stopped (and the condition ``overspeed_stop``
    raised) from cut-out until the wind falls below the restart speed; curtailment to an
    export limit by pitching the blades."""

    adapter_name = "sim-wind"

    def __init__(
        self, asset: Asset, options: SimWindOptions, conditions: ConditionReporter
    ) -> None:
        super().__init__(asset, options, conditions)
        start = options.initial_wind_ms
        if start is None:
            start = options.mean_wind_ms
        self.wind_ms = min(start, options.max_wind_ms)
        self.stopped = False
        self._check_overspeed()

    def tick(self) -> None:
        o = self.options
        change = (o.mean_wind_ms - self.wind_ms) / o.reversion_s
        if o.turbulence_ms > 0:
            change += self.rng.gauss(0.0, o.turbulence_ms)
        self.wind_ms = _reflect(self.wind_ms + change, o.max_wind_ms)
        self._check_overspeed()

    def _check_overspeed(self) -> None:
        o = self.options
        if not self.stopped and self.wind_ms >= o.cut_out_ms:
            self.stopped = True
            self.conditions.raise_condition(
                OVERSPEED_STOP,
                "warning",
                f"wind {self.wind_ms:.1f} m/s at or above cut-out {o.cut_out_ms:g} m/s: "
                "turbine stopped",
            )
        elif self.stopped and self.wind_ms < o.restart_below_ms:
            self.stopped = False
            self.conditions.clear_condition(
                OVERSPEED_STOP,
                f"wind down to {self.wind_ms:.1f} m/s, below {o.restart_below_ms:g} m/s: "
                "turbine restarted",
            )

    # ---------------------------------------------------------------- reading

    def reading(self, now: datetime) -> PlantReading:
        o = self.options
        rated = self.asset.max_mw
        running = not self.stopped
        potential = power_curve(self.wind_ms, rated, o) if running else 0.0
        available = potential * o.availability_pct / 100.0
        curtailment = self.curtail(available)
        output, curtailed = curtailment.output_mw, curtailment.curtailed_mw
        if self.stopped:
            state, rpm, pitch = "stopped_high_wind", 0.0, 90.0
        elif self.wind_ms < o.cut_in_ms:
            state, rpm, pitch = "waiting_for_wind", 0.0, 0.0
        else:
            speed_share = min(1.0, (self.wind_ms - o.cut_in_ms) / (o.rated_ms - o.cut_in_ms))
            rpm = o.rated_rpm * (0.4 + 0.6 * speed_share)
            # Above rated speed the blades pitch to shed the extra power; curtailment
            # pitches them further.
            pitch = min(30.0, max(0.0, 1.5 * (self.wind_ms - o.rated_ms)))
            if curtailment.reason is not None:
                pitch = min(90.0, pitch + 25.0 * curtailed / available)
            state = "curtailed" if curtailment.reason is not None else "running"
        load = output / rated if rated > 0 else 0.0
        details: dict[str, Any] = {
            "wind_speed_ms": round(self.wind_ms, 3),
            "turbine_rpm": round(rpm, 3),
            "pitch_deg": round(pitch, 3),
            "availability_pct": o.availability_pct,
            "turbine_state": state,
            "nacelle_temp_c": round(o.ambient_temp_c + 12.0 * load, 3),
            **self.curtailment_details(available, curtailment),
        }
        return PlantReading(
            mw=round(output, 6), status=state, mw_setpoint=self.export_limit_mw, details=details
        )


def _reflect(value: float, upper: float) -> float:
    """``value`` folded back into ``[0, upper]`` at both ends."""
    period = 2 * upper
    value = math.fmod(value, period)
    if value < 0:
        value += period
    return period - value if value > upper else value


class SimWindAdapter(SimPlantAdapter[SimWind]):
    """``sim-wind`` for one asset (see :class:`SimWind` and :class:`SimPlantAdapter`)."""

    def build_model(self, context: AdapterContext) -> SimWind:
        options = options_of(context.options, SimWindOptions)
        return SimWind(context.asset, options, context.conditions)
