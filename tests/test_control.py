"""Control models: what a dispatch's MW means per asset type, and the range available now."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from der_sdk import load_plugins
from der_sdk.control import (
    DEFAULT_CONTROL,
    STALE_AFTER_S,
    ControlModel,
    SplitContext,
    split_context,
)
from der_sdk.extensions import AssetType
from der_sdk.models import Asset, TelemetrySample

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
TYPES = load_plugins(entry_points=False, env={}).asset_types
CONTROLS = {t.name: t.control for t in TYPES}


def asset(asset_type: str, *, lo: float, hi: float, capacity: float = 0.0, **kw: Any) -> Asset:
    return Asset(
        asset_id=f"{asset_type}-1",
        site_id="site",
        name=asset_type,
        asset_type=asset_type,
        min_mw=lo,
        max_mw=hi,
        capacity_mwh=capacity,
        **kw,
    )


def sample(mw: float = 0.0, ts: datetime = NOW, **details: Any) -> TelemetrySample:
    return TelemetrySample(asset_id="x", site_id="site", ts=ts, mw=mw, details=details)


BESS = asset("bess", lo=-2, hi=2, capacity=4)
PV = asset("pv", lo=0, hi=5)
WIND = asset("wind", lo=-0.1, hi=3)
EV = asset("ev_charger", lo=-1.5, hi=0)


def test_builtin_types_declare_their_control_kind() -> None:
    kinds = {t.name: t.control.kind for t in TYPES}
    assert kinds == {
        "bess": "setpoint",
        "pv": "export_limit",
        "wind": "export_limit",
        "ev_charger": "import_limit",
    }


def test_static_range_cuts_the_limits_to_the_kinds_sign() -> None:
    assert CONTROLS["bess"].static_range(BESS) == (-2, 2)
    assert CONTROLS["wind"].static_range(WIND) == (0.0, 3)  # aux draw is not commandable
    odd_charger = asset("ev_charger", lo=-1.5, hi=0.2)
    assert CONTROLS["ev_charger"].static_range(odd_charger) == (-1.5, 0.0)


def test_battery_range_is_its_energy_for_the_duration() -> None:
    # 4 MWh at 25 %: 1 MWh stored, 3 MWh room; over 1 h that is +1 / -2 (power limit).
    available = CONTROLS["bess"].available_range(BESS, sample(soc_pct=25.0), 3600, now=NOW)
    assert (available.min_mw, available.max_mw) == (-2, 1.0)
    assert available.basis == "soc 25% of 4 MWh over 1 h"
    assert available.as_of == NOW
    # over 2 h: 0.5 MW of discharge, 1.5 MW of charge
    lo, hi = CONTROLS["bess"].available_range(BESS, sample(soc_pct=25.0), 7200)
    assert (lo, hi) == (-1.5, 0.5)


def test_battery_range_counts_half_the_round_trip_loss_each_way() -> None:
    lossy = msgspec.structs.replace(BESS, efficiency=0.81)  # 0.9 each way
    lo, hi = CONTROLS["bess"].available_range(lossy, sample(soc_pct=50.0), 3600)
    assert hi == pytest.approx(2 * 0.9)
    assert lo == pytest.approx(-2)  # 2 / 0.9 = 2.22 MWh of room: the power limit binds


def test_empty_or_full_battery_without_a_duration_keeps_only_the_possible_direction() -> None:
    empty = CONTROLS["bess"].available_range(BESS, sample(soc_pct=0.0), None)
    assert (empty.min_mw, empty.max_mw) == (-2, 0.0)
    assert "empty" in empty.basis
    full = CONTROLS["bess"].available_range(BESS, sample(soc_pct=100.0), None)
    assert (full.min_mw, full.max_mw) == (0.0, 2)
    half = CONTROLS["bess"].available_range(BESS, sample(soc_pct=50.0), None)
    assert (half.min_mw, half.max_mw) == (-2, 2)


def test_pv_range_is_what_it_makes_plus_what_is_curtailed() -> None:
    available = CONTROLS["pv"].available_range(PV, sample(2.0, curtailed_mw=1.1), None)
    assert (available.min_mw, available.max_mw) == (0.0, pytest.approx(3.1))
    assert available.basis == "available PV 3.1 MW"


def test_pv_available_mw_wins_and_never_exceeds_the_limit_or_goes_below_zero() -> None:
    model = CONTROLS["pv"]
    assert model.available_range(PV, sample(1.0, available_mw=7.0), None).max_mw == 5
    night = model.available_range(PV, sample(-0.02), None)  # inverter standby draw
    assert (night.min_mw, night.max_mw) == (0.0, 0.0)


def test_wind_range_uses_the_same_rule() -> None:
    available = CONTROLS["wind"].available_range(WIND, sample(1.2, available_mw=2.5), None)
    assert (available.min_mw, available.max_mw) == (0.0, 2.5)
    assert available.basis == "available wind 2.5 MW"


def test_charger_range_is_its_connected_demand() -> None:
    available = CONTROLS["ev_charger"].available_range(EV, sample(-0.3, demand_mw=0.4), None)
    assert (available.min_mw, available.max_mw) == (-0.4, 0.0)
    assert available.basis == "connected demand 0.4 MW"
    busy = CONTROLS["ev_charger"].available_range(EV, sample(-1.5, demand_mw=9.0), None)
    assert busy.min_mw == -1.5


@pytest.mark.parametrize(
    ("latest", "basis"),
    [
        (None, "no telemetry: static limits"),
        (
            TelemetrySample(
                asset_id="x", site_id="s", ts=NOW, mw=0, quality="bad", quality_reason="io"
            ),
            "latest sample bad: static limits",
        ),
        (sample(soc_pct=50.0, ts=NOW - timedelta(seconds=STALE_AFTER_S + 1)), "old: static"),
        (sample(soh_pct=99.0), "telemetry lacks state: static limits"),
    ],
    ids=["none", "bad", "stale", "no-soc"],
)
def test_without_usable_telemetry_the_range_is_the_static_one(
    latest: TelemetrySample | None, basis: str
) -> None:
    available = CONTROLS["bess"].available_range(BESS, latest, 3600, now=NOW)
    assert (available.min_mw, available.max_mw) == (-2, 2)
    assert basis in available.basis


def test_a_type_without_a_control_model_is_a_setpoint_within_its_limits() -> None:
    class HeatDetails(msgspec.Struct, kw_only=True):
        supply_temp_c: float | None = None

    heat = AssetType(name="heat_pump", details=HeatDetails)
    assert heat.control is DEFAULT_CONTROL
    pump = asset("heat_pump", lo=-0.8, hi=0.3)
    available = heat.control.available_range(pump, sample(-0.5), 600)
    assert heat.control.kind == "setpoint"
    assert (available.min_mw, available.max_mw, available.basis) == (-0.8, 0.3, "static limits")
    context = split_context([pump], controls={}, latest=lambda _: sample(-0.5))
    assert context.assets[0].kind == "setpoint"


def test_a_failing_plugin_rule_falls_back_to_static_limits() -> None:
    def broken(asset: Asset, latest: TelemetrySample, duration_s: float | None) -> None:
        raise KeyError("nope")

    model = ControlModel(kind="export_limit", range_rule=broken)  # type: ignore[arg-type]
    available = model.available_range(PV, sample(1.0), None)
    assert (available.min_mw, available.max_mw) == (0.0, 5)
    assert "range rule failed (KeyError)" in available.basis


def test_a_rule_outside_the_static_range_collapses_to_its_nearest_edge() -> None:
    model = ControlModel(range_rule=lambda a, s, d: (3.0, 4.0, "must run high"))
    available = model.available_range(BESS, sample(), None)
    assert (available.min_mw, available.max_mw) == (2, 2)


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="control kind must be one of"):
        ControlModel(kind="droop")  # type: ignore[arg-type]


def test_sign_problem_and_release_per_kind() -> None:
    assert CONTROLS["pv"].sign_problem(-1.0) is not None
    assert CONTROLS["pv"].sign_problem(0.0) is None
    assert CONTROLS["ev_charger"].sign_problem(0.5) is not None
    assert CONTROLS["bess"].sign_problem(-2.0) is None
    assert CONTROLS["pv"].release_mw(PV) == 5  # the limit is lifted
    assert CONTROLS["ev_charger"].release_mw(EV) == -1.5
    assert CONTROLS["bess"].release_mw(BESS) == 0.0
    assert CONTROLS["pv"].clamp(PV, -3.0) == 0.0
    assert CONTROLS["ev_charger"].clamp(EV, 2.0) == 0.0


def test_split_context_orders_assets_and_carries_soc() -> None:
    latest = {BESS.asset_id: sample(soc_pct=40.0), PV.asset_id: sample(1.0)}
    context = split_context(
        [PV, BESS], controls=CONTROLS, latest=latest.get, duration_s=3600, now=NOW
    )
    assert [e.asset_id for e in context.assets] == sorted([PV.asset_id, BESS.asset_id])
    by_id = {e.asset_id: e for e in context.assets}
    assert by_id[BESS.asset_id].soc_pct == 40.0
    assert by_id[PV.asset_id].soc_pct is None
    assert by_id[PV.asset_id].effective().max_mw == 1.0
    static = SplitContext.static([BESS])
    assert static.effective_assets() == [BESS]
