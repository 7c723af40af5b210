"""The simulated battery: a pure model with no clock and no I/O, stepped by its caller."""

from __future__ import annotations

import math
from dataclasses import dataclass

from der_sdk.models import Asset

__all__ = ["SimBattery"]

_IDLE_MW = 1e-6
"""Below this (1 W) the battery counts as idle."""


def _segment_energy(p0: float, p1: float, hours: float) -> tuple[float, float]:
    """``(discharged, charged)`` MWh at the terminals for power moving linearly p0 → p1.

    Split at the zero crossing, because the two directions lose energy differently.
    """
    if hours <= 0:
        return 0.0, 0.0
    if p0 >= 0 and p1 >= 0:
        return (p0 + p1) / 2 * hours, 0.0
    if p0 <= 0 and p1 <= 0:
        return 0.0, -(p0 + p1) / 2 * hours
    t_zero = p0 / (p0 - p1) * hours
    if p0 > 0:
        return p0 / 2 * t_zero, -p1 / 2 * (hours - t_zero)
    return p1 / 2 * (hours - t_zero), -p0 / 2 * t_zero


@dataclass
class SimBattery:
    """A battery with limits, a ramp rate, round-trip efficiency and a state of charge.

    ``mw`` follows the sign convention of :mod:`der_sdk.models`: positive discharges,
    negative charges. :meth:`set_setpoint` clamps to ``[min_mw, max_mw]``; :meth:`step`
    advances time.

    Round-trip efficiency is split evenly between the directions: charging at ``|mw|``
    for ``dt`` stores ``|mw|·dt·√eff`` in the cells, discharging draws ``|mw|·dt/√eff``
    from them, so a full cycle returns ``eff`` of the energy put in.

    A battery with ``capacity_mwh`` of 0 has no energy to track: its SOC stays put and it
    never fills or empties.
    """

    capacity_mwh: float
    max_mw: float
    min_mw: float
    ramp_rate_mw_per_min: float | None = None
    efficiency: float = 1.0
    soc_pct: float = 50.0
    mw: float = 0.0
    mw_setpoint: float = 0.0

    def __post_init__(self) -> None:
        if self.min_mw > self.max_mw:
            raise ValueError(f"min_mw {self.min_mw} > max_mw {self.max_mw}")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency must be in (0, 1], got {self.efficiency}")
        if self.ramp_rate_mw_per_min is not None and self.ramp_rate_mw_per_min <= 0:
            raise ValueError(f"ramp_rate_mw_per_min must be > 0, got {self.ramp_rate_mw_per_min}")
        self.soc_pct = min(100.0, max(0.0, self.soc_pct))
        self.mw_setpoint = self.clamp(self.mw_setpoint)
        self.mw = self.clamp(self.mw)

    @classmethod
    def for_asset(cls, asset: Asset, *, soc_pct: float = 50.0) -> SimBattery:
        """A battery with the inventory limits of ``asset``, idle at ``soc_pct``."""
        return cls(
            capacity_mwh=asset.capacity_mwh,
            max_mw=asset.max_mw,
            min_mw=asset.min_mw,
            ramp_rate_mw_per_min=asset.ramp_rate_mw_per_min,
            efficiency=asset.efficiency,
            soc_pct=soc_pct,
        )

    # ---------------------------------------------------------------- state

    @property
    def full(self) -> bool:
        return self.capacity_mwh > 0 and self.soc_pct >= 100.0

    @property
    def empty(self) -> bool:
        return self.capacity_mwh > 0 and self.soc_pct <= 0.0

    @property
    def energy_mwh(self) -> float:
        """Energy stored in the cells."""
        return self.capacity_mwh * self.soc_pct / 100.0

    @property
    def usable_energy_mwh(self) -> float:
        """What a full discharge would deliver at the terminals, after losses."""
        return self.energy_mwh * math.sqrt(self.efficiency)

    @property
    def status(self) -> str:
        """``charging``, ``discharging``, ``full``, ``empty`` or ``idle``."""
        if self.mw > _IDLE_MW:
            return "discharging"
        if self.mw < -_IDLE_MW:
            return "charging"
        if self.full:
            return "full"
        if self.empty:
            return "empty"
        return "idle"

    # ---------------------------------------------------------------- control

    def clamp(self, mw: float) -> float:
        return min(self.max_mw, max(self.min_mw, mw))

    def set_setpoint(self, mw: float) -> float:
        """Command ``mw``; returns the setpoint after clamping to ``[min_mw, max_mw]``."""
        if not math.isfinite(mw):
            raise ValueError(f"setpoint must be a finite number of MW, got {mw}")
        self.mw_setpoint = self.clamp(mw)
        return self.mw_setpoint

    def _effective_target(self) -> float:
        # A full battery does not charge and an empty one does not discharge; the setpoint
        # is kept so the battery resumes once it can.
        if self.full and self.mw_setpoint < 0:
            return 0.0
        if self.empty and self.mw_setpoint > 0:
            return 0.0
        return self.mw_setpoint

    def step(self, dt_s: float) -> None:
        """Advance ``dt_s`` seconds: ramp toward the setpoint, then integrate the SOC.

        When the SOC reaches 100 % (or 0 %) during the step it stops there and the output
        drops to 0 at once, as a battery management system would trip it.
        """
        if dt_s <= 0:
            return
        start, target = self.mw, self._effective_target()
        if self.ramp_rate_mw_per_min is None:
            segments = [(target, target, dt_s)]
        else:
            rate_per_s = self.ramp_rate_mw_per_min / 60.0
            ramp_s = abs(target - start) / rate_per_s
            if ramp_s >= dt_s:
                end = start + math.copysign(rate_per_s * dt_s, target - start)
                segments = [(start, end, dt_s)]
            else:
                segments = [(start, target, ramp_s), (target, target, dt_s - ramp_s)]
        self.mw = segments[-1][1]

        if self.capacity_mwh <= 0:
            return
        discharged = charged = 0.0
        for p0, p1, seconds in segments:
            out, into = _segment_energy(p0, p1, seconds / 3600.0)
            discharged += out
            charged += into
        root_eff = math.sqrt(self.efficiency)
        energy = self.energy_mwh + charged * root_eff - discharged / root_eff
        if energy >= self.capacity_mwh:
            self.soc_pct = 100.0
            if self.mw < 0:
                self.mw = 0.0
        elif energy <= 0:
            self.soc_pct = 0.0
            if self.mw > 0:
                self.mw = 0.0
        else:
            self.soc_pct = energy / self.capacity_mwh * 100.0
