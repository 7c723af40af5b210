"""``sim-pv``: a photovoltaic plant under a clear-sky day with passing clouds, curtailed
to the export limit it is sent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgspec

from der_sdk.extensions import AdapterContext, ConditionReporter
from der_sdk.models import Asset
from der_sdk_sim_plant.base import (
    ExportLimitedModel,
    PlantReading,
    RandomFault,
    SimPlantAdapter,
    options_of,
)
from der_sdk_sim_plant.solar import clear_sky_ghi_wm2, solar_elevation_deg

__all__ = ["DEFAULT_LATITUDE", "DEFAULT_LONGITUDE", "SimPv", "SimPvAdapter", "SimPvOptions"]

DEFAULT_LATITUDE = 45.0
"""Where the sun is computed when neither the options nor the asset say."""
DEFAULT_LONGITUDE = 0.0

INVERTER_TRIP = "inverter_trip"
"""The condition code of an inverter trip."""

_STC_IRRADIANCE_WM2 = 1000.0
_TEMP_COEFFICIENT_PER_C = -0.004
_CLOUD_EDGE_S = 20.0
"""Time constant of the irradiance following a cloud's edge."""

Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]


class SimPvOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-asset options of ``sim-pv`` (the ``options`` block in the agent config)."""

    seed: int | None = None
    """Seed of the clouds and trips, for repeatable runs (default: random)."""
    latitude: Annotated[float, msgspec.Meta(ge=-90, le=90)] | None = None
    """Degrees north; default: the asset's ``latitude``, else 45."""
    longitude: Annotated[float, msgspec.Meta(ge=-180, le=180)] | None = None
    """Degrees east; default: the asset's ``longitude``, else 0."""
    solar_hour_utc: Annotated[float, msgspec.Meta(ge=0, lt=24)] | None = None
    """Compute the sun at this hour of the day (UTC) whatever the clock says, for demos
    and tests that need daylight at any time (``12 - longitude / 15`` is solar noon);
    default: the wall clock's time."""
    dc_ac_ratio: Annotated[float, msgspec.Meta(gt=0)] = 1.2
    """DC (module) capacity over the inverter's AC rating (``max_mw``)."""
    inverter_efficiency: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.97
    cloud_cover: Fraction = 0.3
    """Share of the time a cloud shades the plant (0: always clear)."""
    cloud_passage_s: Annotated[float, msgspec.Meta(gt=0)] = 180.0
    """Mean time a cloud's shadow takes to pass."""
    cloud_depth: Fraction = 0.6
    """Mean share of the irradiance a cloud takes away."""
    ambient_temp_c: float = 20.0
    noct_c: Annotated[float, msgspec.Meta(gt=20)] = 45.0
    """Nominal operating cell temperature (at 800 W/m², 20 °C ambient)."""
    trip_rate_per_h: Annotated[float, msgspec.Meta(ge=0)] = 0.01
    """Inverter trips per hour (0: never)."""
    trip_duration_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    """How long a trip lasts before the inverter restarts."""


class SimPv(ExportLimitedModel[SimPvOptions]):
    """A PV plant: clear-sky irradiance from the sun's elevation, attenuated by seeded
    passing clouds; module temperature and its power loss; inverter efficiency and
    clipping at ``max_mw``; curtailment to an export limit; seeded inverter trips.
    """

    adapter_name = "sim-pv"

    def __init__(self, asset: Asset, options: SimPvOptions, conditions: ConditionReporter) -> None:
        super().__init__(asset, options, conditions)
        self.latitude = _coordinate(options.latitude, asset, "latitude", DEFAULT_LATITUDE)
        self.longitude = _coordinate(options.longitude, asset, "longitude", DEFAULT_LONGITUDE)
        self.cloudy = False
        self.cloud_target = 1.0
        self.clearness = 1.0
        """Share of the clear-sky irradiance reaching the modules now."""
        self.trip = RandomFault(
            conditions,
            code=INVERTER_TRIP,
            severity="major",
            rate_per_h=options.trip_rate_per_h,
            duration_s=options.trip_duration_s,
            raised=f"inverter tripped; restarting in {options.trip_duration_s:g} s",
            cleared="inverter restarted after its trip",
        )

    # ---------------------------------------------------------------- weather and faults

    def tick(self) -> None:
        o, rng = self.options, self.rng
        if o.cloud_cover > 0:
            if self.cloudy:
                if rng.random() < 1 / o.cloud_passage_s:
                    self.cloudy, self.cloud_target = False, 1.0
            elif o.cloud_cover >= 1 or rng.random() < _cloud_arrival_per_s(o):
                depth = min(1.0, max(0.0, rng.gauss(o.cloud_depth, 0.15)))
                self.cloudy, self.cloud_target = True, 1.0 - depth
        self.clearness += (self.cloud_target - self.clearness) / _CLOUD_EDGE_S
        self.trip.tick(rng)

    def skip(self, ticks: int) -> None:
        self.trip.skip(ticks)

    # ---------------------------------------------------------------- reading

    def sun_time(self, now: datetime) -> datetime:
        """The time the sun is computed for: ``now``, or its day at ``solar_hour_utc``."""
        hour = self.options.solar_hour_utc
        if hour is None:
            return now
        day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        return day + timedelta(hours=hour)

    def reading(self, now: datetime) -> PlantReading:
        o = self.options
        elevation = solar_elevation_deg(self.sun_time(now), self.latitude, self.longitude)
        irradiance = clear_sky_ghi_wm2(elevation) * self.clearness
        module_temp = o.ambient_temp_c + (o.noct_c - 20.0) / 800.0 * irradiance
        dc_capacity = self.asset.max_mw * o.dc_ac_ratio
        dc_potential = max(
            0.0,
            dc_capacity
            * irradiance
            / _STC_IRRADIANCE_WM2
            * (1 + _TEMP_COEFFICIENT_PER_C * (module_temp - 25.0)),
        )
        available = min(self.asset.max_mw, dc_potential * o.inverter_efficiency)
        if self.trip.active:
            available = 0.0
        curtailment = self.curtail(available)
        ac = curtailment.output_mw
        if self.trip.active:
            state = "tripped"
        elif available <= 0:
            state = "sleeping"
        elif curtailment.reason is not None:
            state = "curtailed"
        else:
            state = "mppt"
        details: dict[str, Any] = {
            "irradiance_wm2": round(irradiance, 3),
            "module_temp_c": round(module_temp, 3),
            "ac_mw": round(ac, 6),
            "dc_mw": round(ac / o.inverter_efficiency, 6),
            "inverter_state": state,
            **self.curtailment_details(available, curtailment),
            "solar_elevation_deg": round(elevation, 3),
        }
        return PlantReading(
            mw=round(ac, 6), status=state, mw_setpoint=self.export_limit_mw, details=details
        )


def _cloud_arrival_per_s(options: SimPvOptions) -> float:
    """The chance per second that a cloud arrives, so that clouds cover ``cloud_cover``
    of the time with shadows of ``cloud_passage_s`` on average."""
    clear_gap_s = options.cloud_passage_s * (1 - options.cloud_cover) / options.cloud_cover
    return min(1.0, 1 / max(clear_gap_s, 1.0))


def _coordinate(option: float | None, asset: Asset, name: str, default: float) -> float:
    if option is not None:
        return option
    from_asset = getattr(asset, name, None)  # inventories may give assets coordinates
    return float(from_asset) if isinstance(from_asset, int | float) else default


class SimPvAdapter(SimPlantAdapter[SimPv]):
    """``sim-pv`` for one asset (see :class:`SimPv` and :class:`SimPlantAdapter`)."""

    def build_model(self, context: AdapterContext) -> SimPv:
        options = options_of(context.options, SimPvOptions)
        return SimPv(context.asset, options, context.conditions)
