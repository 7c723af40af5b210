"""How each asset type is controlled: what a dispatch's MW means for it, and the range it
can take now.

Every asset type declares a :class:`ControlModel` (``AssetType.control``). Its ``kind``:

* ``setpoint`` (batteries, and the default for a type that declares nothing): the MW is
  a signed setpoint in ``[min_mw, max_mw]``;
* ``export_limit`` (PV, wind): the MW is a cap on export in ``[0, max_mw]``; the plant
  makes ``min(available, limit)`` and never consumes;
* ``import_limit`` (EV chargers): the MW is a cap on import in ``[min_mw, 0]``; the
  station draws ``max(limit, -demand)`` and never exports.

The **static range** is the asset's inventory limits cut to the kind's sign. The
**available range** narrows it with the latest telemetry through the model's
``range_rule`` (a battery's energy for the duration, the power a PV plant could make, a
charger's connected demand); each range says in ``basis`` what bounded it.

:class:`SplitContext` carries the available range of each asset of a site to a split
policy (:mod:`der_sdk.split`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

import msgspec

from der_sdk.models import Asset, TelemetrySample

__all__ = [
    "CONTROL_KINDS",
    "DEFAULT_CONTROL",
    "STALE_AFTER_S",
    "AvailableRange",
    "ControlKind",
    "ControlModel",
    "RangeRule",
    "SplitAsset",
    "SplitContext",
    "battery_energy_rule",
    "charger_demand_rule",
    "generation_rule",
    "split_context",
]

log = logging.getLogger("der.control")

ControlKind = Literal["setpoint", "export_limit", "import_limit"]
CONTROL_KINDS: tuple[str, ...] = get_args(ControlKind)

STALE_AFTER_S = 900.0
"""A sample older than this (15 minutes) no longer narrows an asset's range."""

RangeRule = Callable[[Asset, TelemetrySample, "float | None"], "tuple[float, float, str] | None"]
"""``rule(asset, latest, duration_s)`` → ``(lo, hi, basis)`` the telemetry allows, or
``None`` when the sample does not say (no state of charge, no available power). The result
is cut to the static range (a side it does not bound may be infinite)."""


@dataclass(frozen=True, kw_only=True)
class AvailableRange:
    """The MW an asset can take now, ``min_mw <= max_mw``, and why.

    ``basis`` says what bounded it (``"soc 42% of 4 MWh over 1 h"``, ``"available PV 3.1
    MW"``, ``"no telemetry: static limits"``); ``as_of`` is the time of the sample used
    (``None``: none was). Unpacks as ``lo, hi = available``.
    """

    min_mw: float
    max_mw: float
    basis: str
    as_of: datetime | None = None

    def __iter__(self) -> Iterator[float]:
        yield self.min_mw
        yield self.max_mw

    def clamp(self, mw: float) -> float:
        return min(self.max_mw, max(self.min_mw, mw))


def _number(details: Mapping[str, Any], key: str) -> float | None:
    value = details.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _hours(duration_s: float) -> str:
    hours = duration_s / 3600
    return f"{hours:.3g} h" if hours >= 1 else f"{duration_s / 60:.3g} min"


def battery_energy_rule(
    asset: Asset, latest: TelemetrySample, duration_s: float | None
) -> tuple[float, float, str] | None:
    """A battery's range from ``details.soc_pct`` and ``capacity_mwh``.

    With a duration: discharge at most ``stored * sqrt(efficiency) / hours`` and charge at
    most ``room / sqrt(efficiency) / hours`` (half the round-trip loss each way), so the
    battery neither empties nor fills before the duration ends. Without one: the power
    limits, except that an empty battery cannot discharge and a full one cannot charge.
    """
    soc = _number(latest.details, "soc_pct")
    if soc is None or asset.capacity_mwh <= 0:
        return None
    soc = min(100.0, max(0.0, soc))
    stored = asset.capacity_mwh * soc / 100
    room = asset.capacity_mwh - stored
    if duration_s is None or not duration_s > 0:
        state = " (empty)" if stored <= 0 else " (full)" if room <= 0 else ""
        return (
            -math.inf if room > 0 else 0.0,
            math.inf if stored > 0 else 0.0,
            f"soc {soc:.3g}%{state}, no duration: power limits",
        )
    hours = duration_s / 3600
    one_way = math.sqrt(asset.efficiency) if asset.efficiency > 0 else 1.0
    return (
        -room / one_way / hours,
        stored * one_way / hours,
        f"soc {soc:.3g}% of {asset.capacity_mwh:g} MWh over {_hours(duration_s)}",
    )


_GENERATION_LABELS = {"pv": "PV", "wind": "wind"}


def generation_rule(
    asset: Asset, latest: TelemetrySample, duration_s: float | None
) -> tuple[float, float, str] | None:
    """A PV plant's or turbine's range: ``[0, available]``. Available power is
    ``details.available_mw`` when given, else ``mw + details.curtailed_mw`` (what it makes
    plus what a limit holds back)."""
    available = _number(latest.details, "available_mw")
    if available is None:
        curtailed = _number(latest.details, "curtailed_mw") or 0.0
        available = latest.mw + curtailed
    available = max(0.0, available)
    label = _GENERATION_LABELS.get(asset.asset_type, asset.asset_type)
    return 0.0, available, f"available {label} {available:.3g} MW"


def charger_demand_rule(
    asset: Asset, latest: TelemetrySample, duration_s: float | None
) -> tuple[float, float, str] | None:
    """An EV charger's range: ``[-demand, 0]`` from ``details.demand_mw`` (what the
    connected sessions would draw uncapped)."""
    demand = _number(latest.details, "demand_mw")
    if demand is None:
        return None
    demand = max(0.0, demand)
    return -demand, 0.0, f"connected demand {demand:.3g} MW"


@dataclass(frozen=True, kw_only=True)
class ControlModel:
    """What a dispatch's MW means for an asset type, and the range it can take.

    ``kind``: see the module docstring. ``range_rule``: narrows the static range with the
    latest sample (``None``: the static range always). A type that declares no model gets
    ``ControlModel()``: a signed setpoint within the static limits.
    """

    kind: ControlKind = "setpoint"
    range_rule: RangeRule | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in CONTROL_KINDS:
            raise ValueError(
                f"control kind must be one of {', '.join(CONTROL_KINDS)}, got {self.kind!r}"
            )

    def static_range(self, asset: Asset) -> tuple[float, float]:
        """The asset's ``[min_mw, max_mw]`` cut to the kind's sign."""
        if self.kind == "export_limit":
            return max(0.0, asset.min_mw), max(0.0, asset.max_mw)
        if self.kind == "import_limit":
            return min(0.0, asset.min_mw), min(0.0, asset.max_mw)
        return asset.min_mw, asset.max_mw

    def clamp(self, asset: Asset, mw: float) -> float:
        """``mw`` limited to the static range (what the agent does before the adapter)."""
        lo, hi = self.static_range(asset)
        return min(hi, max(lo, mw))

    def release_mw(self, asset: Asset) -> float:
        """What the asset returns to when a setpoint's duration ends: ``0`` (clamped) for a
        setpoint, no cap for a limit (``max_mw`` for export, ``min_mw`` for import)."""
        lo, hi = self.static_range(asset)
        if self.kind == "export_limit":
            return hi
        if self.kind == "import_limit":
            return lo
        return min(hi, max(lo, 0.0))

    def sign_problem(self, mw: float) -> str | None:
        """Why ``mw`` is not a command of this kind at all (a negative export limit, a
        positive import limit), or ``None``."""
        if self.kind == "export_limit" and mw < 0:
            return "an export limit cannot be negative (the asset never consumes)"
        if self.kind == "import_limit" and mw > 0:
            return "an import limit cannot be positive (the asset never exports)"
        return None

    def available_range(
        self,
        asset: Asset,
        latest: TelemetrySample | None,
        duration_s: float | None = None,
        *,
        now: datetime | None = None,
    ) -> AvailableRange:
        """The range ``asset`` can take now: the static range, narrowed by ``range_rule``
        with ``latest`` when that sample is usable (not ``bad``, and with ``now`` given,
        at most :data:`STALE_AFTER_S` old)."""
        lo, hi = self.static_range(asset)
        if self.range_rule is None:
            return AvailableRange(min_mw=lo, max_mw=hi, basis="static limits")
        if latest is None:
            return AvailableRange(min_mw=lo, max_mw=hi, basis="no telemetry: static limits")
        if latest.quality == "bad":
            return AvailableRange(
                min_mw=lo, max_mw=hi, basis="latest sample bad: static limits", as_of=latest.ts
            )
        if now is not None and (now - latest.ts).total_seconds() > STALE_AFTER_S:
            age = (now - latest.ts).total_seconds()
            return AvailableRange(
                min_mw=lo,
                max_mw=hi,
                basis=f"telemetry {_hours(age)} old: static limits",
                as_of=latest.ts,
            )
        try:
            found = self.range_rule(asset, latest, duration_s)
        except Exception as exc:  # a plugin's rule must not break dispatch
            log.warning("asset %s: control range rule failed: %r", asset.asset_id, exc)
            return AvailableRange(
                min_mw=lo,
                max_mw=hi,
                basis=f"range rule failed ({type(exc).__name__}): static limits",
                as_of=latest.ts,
            )
        if found is None:
            return AvailableRange(
                min_mw=lo, max_mw=hi, basis="telemetry lacks state: static limits", as_of=latest.ts
            )
        rule_lo, rule_hi, basis = found
        if math.isnan(rule_lo) or math.isnan(rule_hi) or rule_lo > rule_hi:
            return AvailableRange(
                min_mw=lo,
                max_mw=hi,
                basis="range rule gave no range: static limits",
                as_of=latest.ts,
            )
        new_lo, new_hi = max(lo, rule_lo), min(hi, rule_hi)
        if new_lo > new_hi:  # the telemetry's range lies outside the static one
            new_lo = new_hi = lo if rule_hi < lo else hi
        return AvailableRange(min_mw=new_lo, max_mw=new_hi, basis=basis, as_of=latest.ts)


DEFAULT_CONTROL = ControlModel()
"""The control model of an asset type that declares none: a setpoint, static limits."""


# --------------------------------------------------------------------------- split context


@dataclass(frozen=True, kw_only=True)
class SplitAsset:
    """One asset of a site as a split policy sees it: the inventory asset, its control
    kind, its available range now, and the sample that range came from."""

    asset: Asset
    kind: ControlKind
    available: AvailableRange
    latest: TelemetrySample | None = None

    @property
    def asset_id(self) -> str:
        return self.asset.asset_id

    @property
    def min_mw(self) -> float:
        return self.available.min_mw

    @property
    def max_mw(self) -> float:
        return self.available.max_mw

    @property
    def soc_pct(self) -> float | None:
        """The state of charge of the sample used (``None``: none, or no ``soc_pct``)."""
        if self.latest is None or self.available.as_of is None or self.latest.quality == "bad":
            return None
        soc = _number(self.latest.details, "soc_pct")
        return None if soc is None else min(100.0, max(0.0, soc))

    def effective(self) -> Asset:
        """The asset with ``min_mw``/``max_mw`` set to its available range (what a policy
        that only takes assets receives)."""
        if self.asset.min_mw == self.min_mw and self.asset.max_mw == self.max_mw:
            return self.asset
        return msgspec.structs.replace(self.asset, min_mw=self.min_mw, max_mw=self.max_mw)


@dataclass(frozen=True, kw_only=True)
class SplitContext:
    """What a split policy may know about a site: its assets (sorted by id) with their
    available ranges, and the dispatch's duration."""

    assets: tuple[SplitAsset, ...]
    duration_s: float | None = None
    site_id: str | None = None

    def effective_assets(self) -> list[Asset]:
        return [a.effective() for a in self.assets]

    @classmethod
    def static(cls, assets: Sequence[Asset], *, duration_s: float | None = None) -> SplitContext:
        """A context without telemetry: every asset's range is its inventory limits
        (what a policy called with assets only sees)."""
        return cls(
            assets=tuple(
                SplitAsset(
                    asset=a,
                    kind="setpoint",
                    available=AvailableRange(min_mw=a.min_mw, max_mw=a.max_mw, basis="limits"),
                )
                for a in sorted(assets, key=lambda a: a.asset_id)
            ),
            duration_s=duration_s,
        )


def split_context(
    assets: Sequence[Asset],
    *,
    controls: Mapping[str, ControlModel],
    latest: Callable[[str], TelemetrySample | None] | None = None,
    duration_s: float | None = None,
    now: datetime | None = None,
    site_id: str | None = None,
) -> SplitContext:
    """The :class:`SplitContext` of ``assets``: each one's control model (by asset type in
    ``controls``; :data:`DEFAULT_CONTROL` for a type not in it) applied to its latest
    sample (``latest(asset_id)``; ``None``: no telemetry)."""
    entries = []
    for asset in sorted(assets, key=lambda a: a.asset_id):
        model = controls.get(asset.asset_type, DEFAULT_CONTROL)
        sample = latest(asset.asset_id) if latest is not None else None
        entries.append(
            SplitAsset(
                asset=asset,
                kind=model.kind,
                available=model.available_range(asset, sample, duration_s, now=now),
                latest=sample,
            )
        )
    return SplitContext(assets=tuple(entries), duration_s=duration_s, site_id=site_id)
