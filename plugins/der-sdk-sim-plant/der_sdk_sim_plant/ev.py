"""``sim-ev-charger``: an EV charging station whose cars arrive and leave at seeded times,
each needing some energy at up to its own rate; the station shares its import limit
across them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import msgspec

from der_sdk.extensions import AdapterContext, ConditionReporter, SetpointResult
from der_sdk.models import Asset
from der_sdk_sim_plant.base import (
    TICK_S,
    PlantModel,
    PlantReading,
    RandomFault,
    SimPlantAdapter,
    options_of,
    per_tick,
)

__all__ = [
    "CHARGER_FAULT",
    "ChargingSession",
    "SimEvCharger",
    "SimEvChargerAdapter",
    "SimEvChargerOptions",
    "share_import_limit",
]

CHARGER_FAULT = "charger_fault"
"""The condition code of a station fault."""

_TOLERANCE_MW = 1e-9

Positive = Annotated[float, msgspec.Meta(gt=0)]


class SimEvChargerOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-asset options of ``sim-ev-charger`` (the ``options`` block in the agent
    config)."""

    seed: int | None = None
    """Seed of arrivals, needs, rates and faults, for repeatable runs (default: random)."""
    connectors: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 4
    arrivals_per_h: Annotated[float, msgspec.Meta(ge=0)] = 4.0
    """Mean arrivals per hour (a Poisson process); a car finding no free connector leaves."""
    initial_sessions: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Cars plugged in at start (at most ``connectors``)."""
    min_session_kw: Positive = 11.0
    max_session_kw: Positive = 150.0
    """Each car's maximum charging rate is drawn from ``[min_session_kw, max_session_kw]``."""
    min_energy_kwh: Positive = 10.0
    max_energy_kwh: Positive = 60.0
    """Each car's energy need is drawn from ``[min_energy_kwh, max_energy_kwh]``."""
    mean_stay_min: Annotated[float, msgspec.Meta(ge=1)] = 90.0
    """Mean time a car stays plugged in (exponential, at least 5 minutes)."""
    fault_rate_per_h: Annotated[float, msgspec.Meta(ge=0)] = 0.01
    """Station faults per hour (0: never)."""
    fault_duration_s: Positive = 600.0
    """How long a fault lasts."""

    def __post_init__(self) -> None:
        if self.min_session_kw > self.max_session_kw:
            raise ValueError(
                f"min_session_kw {self.min_session_kw:g} > max_session_kw {self.max_session_kw:g}"
            )
        if self.min_energy_kwh > self.max_energy_kwh:
            raise ValueError(
                f"min_energy_kwh {self.min_energy_kwh:g} > max_energy_kwh {self.max_energy_kwh:g}"
            )


@dataclass(kw_only=True)
class ChargingSession:
    """One car plugged in."""

    max_mw: float
    need_mwh: float
    leaves_at_s: int
    """Simulated second at which it unplugs."""
    delivered_mwh: float = 0.0

    @property
    def remaining_mwh(self) -> float:
        return max(0.0, self.need_mwh - self.delivered_mwh)

    def cap_mw(self) -> float:
        """What it can draw in the next tick: its rate, or what fills it in the tick."""
        return min(self.max_mw, self.remaining_mwh * 3600.0 / TICK_S)


def share_import_limit(limit_mw: float, caps_mw: Sequence[float]) -> list[float]:
    """``limit_mw`` shared across sessions: equal shares, each capped by its session's
    rate, with what a capped session leaves redistributed to the others (water-filling).
    The shares sum to ``min(limit_mw, sum(caps_mw))``."""
    shares = [0.0] * len(caps_mw)
    remaining = max(0.0, limit_mw)
    left = len(caps_mw)
    for index in sorted(range(len(caps_mw)), key=caps_mw.__getitem__):
        share = min(max(0.0, caps_mw[index]), remaining / left)
        shares[index] = share
        remaining -= share
        left -= 1
    return shares


class SimEvCharger(PlantModel[SimEvChargerOptions]):
    """A charging station: seeded arrivals and departures, per-session energy needs and
    rates, the station's rating (``|min_mw|``) and import limit shared across sessions,
    cumulative energy delivered, and seeded station faults (the condition
    ``charger_fault``) during which nothing charges."""

    def __init__(
        self, asset: Asset, options: SimEvChargerOptions, conditions: ConditionReporter
    ) -> None:
        super().__init__(asset, options, conditions)
        self.rating_mw = abs(min(asset.min_mw, 0.0)) or (
            options.connectors * options.max_session_kw / 1000.0
        )
        self.import_limit_mw: float | None = None
        self.sessions: list[ChargingSession] = []
        self.energy_delivered_mwh = 0.0
        self.fault = RandomFault(
            conditions,
            code=CHARGER_FAULT,
            severity="major",
            rate_per_h=options.fault_rate_per_h,
            duration_s=options.fault_duration_s,
            raised=f"station fault: charging stopped for {options.fault_duration_s:g} s",
            cleared="station fault cleared",
        )
        self.arrived = 0
        self.turned_away = 0
        for _ in range(min(options.initial_sessions, options.connectors)):
            self._arrive()

    # ---------------------------------------------------------------- sessions

    def _arrive(self) -> None:
        o, rng = self.options, self.rng
        self.arrived += 1
        stay_s = max(300.0, rng.expovariate(1.0 / (o.mean_stay_min * 60.0)))
        self.sessions.append(
            ChargingSession(
                max_mw=rng.uniform(o.min_session_kw, o.max_session_kw) / 1000.0,
                need_mwh=rng.uniform(o.min_energy_kwh, o.max_energy_kwh) / 1000.0,
                leaves_at_s=self.elapsed_s + round(stay_s),
            )
        )

    def allocation(self) -> list[float]:
        """Each session's draw now, in MW (positive)."""
        if self.fault.active:
            return [0.0] * len(self.sessions)
        limit = self.rating_mw
        if self.import_limit_mw is not None:
            limit = min(limit, self.import_limit_mw)
        return share_import_limit(limit, [s.cap_mw() for s in self.sessions])

    def demand_mw(self) -> float:
        """What the connected sessions would draw without an import limit (within the
        station's rating); 0 during a fault."""
        if self.fault.active:
            return 0.0
        return min(self.rating_mw, sum(s.cap_mw() for s in self.sessions))

    # ---------------------------------------------------------------- tick

    def tick(self) -> None:
        o, rng = self.options, self.rng
        for session, mw in zip(self.sessions, self.allocation(), strict=True):
            energy = mw * TICK_S / 3600.0
            session.delivered_mwh += energy
            self.energy_delivered_mwh += energy
        self.sessions = [s for s in self.sessions if s.leaves_at_s > self.elapsed_s]
        if o.arrivals_per_h > 0 and rng.random() < per_tick(o.arrivals_per_h):
            if len(self.sessions) < o.connectors and not self.fault.active:
                self._arrive()
            else:
                self.turned_away += 1
        self.fault.tick(rng)

    def skip(self, ticks: int) -> None:
        # A long pause: the cars due to leave have left.
        horizon = self.elapsed_s + ticks * TICK_S
        self.sessions = [s for s in self.sessions if s.leaves_at_s > horizon]
        self.fault.skip(ticks)

    # ---------------------------------------------------------------- control

    def apply(self, mw: float) -> SetpointResult:
        if mw > _TOLERANCE_MW:
            return SetpointResult(
                status="rejected",
                reason=f"sim-ev-charger takes an import limit of 0 MW or less (a charging "
                f"station cannot export); got {mw:g} MW",
            )
        applied = max(min(mw, 0.0), -self.rating_mw)
        reason = None
        if applied > mw + _TOLERANCE_MW:
            reason = f"import limit capped at the station's rating {self.rating_mw:g} MW"
        self.import_limit_mw = -applied
        return SetpointResult(status="applied", applied_mw=applied, reason=reason)

    def lift_limit(self) -> None:
        self.import_limit_mw = None

    # ---------------------------------------------------------------- reading

    def reading(self, now: datetime) -> PlantReading:
        draws = self.allocation()
        power = sum(draws)
        demand = self.demand_mw()
        if self.fault.active:
            state = "fault"
        elif not self.sessions:
            state = "idle"
        elif power < demand - _TOLERANCE_MW:
            state = "limited"
        elif power > _TOLERANCE_MW:
            state = "charging"
        else:
            state = "occupied"  # every car plugged in is full
        connected = len(self.sessions)
        limit = self.import_limit_mw
        details: dict[str, Any] = {
            "station_state": state,
            "active_sessions": connected,
            "energy_delivered_mwh": round(self.energy_delivered_mwh, 9),
            "connectors_available": 0 if self.fault.active else self.options.connectors - connected,
            "connectors_total": self.options.connectors,
            "max_session_kw": round(max(draws, default=0.0) * 1000.0, 3),
            "demand_mw": round(demand, 6),
            "import_limit_mw": limit,
        }
        return PlantReading(
            mw=-round(power, 6) + 0.0,  # never -0.0
            status=state,
            mw_setpoint=None if limit is None else -limit + 0.0,
            details=details,
        )


class SimEvChargerAdapter(SimPlantAdapter[SimEvCharger]):
    """``sim-ev-charger`` for one asset (see :class:`SimEvCharger` and
    :class:`SimPlantAdapter`)."""

    def build_model(self, context: AdapterContext) -> SimEvCharger:
        options = options_of(context.options, SimEvChargerOptions)
        return SimEvCharger(context.asset, options, context.conditions)
