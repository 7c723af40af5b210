"""Site splits within each asset's physics (:func:`der_sdk.split.split_site`): every
registered policy, and a third-party one that ignores the limits, on mixed fleets with
telemetry."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from der_sdk import load_plugins
from der_sdk.control import SplitContext, split_context
from der_sdk.extensions import SplitPolicy, SplitResult
from der_sdk.models import Asset, TelemetrySample
from der_sdk.split import split_site

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
PLUGINS = load_plugins(entry_points=False, env={})
CONTROLS = {t.name: t.control for t in PLUGINS.asset_types}


def _greedy(target_mw: float, assets: Sequence[Asset]) -> SplitResult:
    """A careless third-party policy: everything on the first asset, limits ignored."""
    if not assets:
        return SplitResult(shares={}, unallocated_mw=target_mw)
    return SplitResult(shares={assets[0].asset_id: target_mw, "not-at-this-site": 1.0})


GREEDY = SplitPolicy(name="greedy", split=_greedy)
POLICIES = [*PLUGINS.split_policies, GREEDY]
IDS = [p.name for p in POLICIES]


def _asset(asset_id: str, asset_type: str, **kw: float) -> Asset:
    return Asset(asset_id=asset_id, site_id="s", name=asset_id, asset_type=asset_type, **kw)  # type: ignore[arg-type]


def _sample(asset_id: str, mw: float, **details: float) -> TelemetrySample:
    return TelemetrySample(asset_id=asset_id, site_id="s", ts=NOW, mw=mw, details=details)


# --------------------------------------------------------------------------- examples


def _pv_battery_site() -> SplitContext:
    assets = [
        _asset("bess-full", "bess", capacity_mwh=4, max_mw=2, min_mw=-2),
        _asset("bess-low", "bess", capacity_mwh=4, max_mw=2, min_mw=-2),
        _asset("ev", "ev_charger", max_mw=0, min_mw=-1.5),
        _asset("pv", "pv", max_mw=5, min_mw=0),
    ]
    latest = {
        "bess-full": _sample("bess-full", 0, soc_pct=90.0),
        "bess-low": _sample("bess-low", 0, soc_pct=10.0),
        "ev": _sample("ev", -0.3, demand_mw=0.4),
        "pv": _sample("pv", 2.0, curtailed_mw=1.0),
    }
    return split_context(assets, controls=CONTROLS, latest=latest.get, duration_s=3600, now=NOW)


def test_headroom_splits_by_what_each_asset_can_do_now() -> None:
    result = split_site(PLUGINS.split_policies.get("headroom"), 4.2, _pv_battery_site())
    # room upwards: bess-full 2 (3.6 MWh in 1 h, power-limited), bess-low 0.4 (0.4 MWh in
    # 1 h), pv 3 (2 made + 1 curtailed), ev 0: 5.4 MW in all
    room = {"bess-full": 2.0, "bess-low": 0.4, "ev": 0.0, "pv": 3.0}
    assert result.shares == pytest.approx({a: 4.2 * r / 5.4 for a, r in room.items()})
    assert result.unallocated_mw == 0.0


def test_soc_balancing_discharges_the_fuller_battery_and_charges_the_emptier() -> None:
    policy = PLUGINS.split_policies.get("soc_balancing")
    out = split_site(policy, 1.0, _pv_battery_site())
    assert out.shares["bess-full"] == pytest.approx(1.0)
    assert out.shares["bess-low"] == 0.0
    charge = split_site(policy, -1.0, _pv_battery_site())
    assert charge.shares["bess-low"] == pytest.approx(-1.0)
    assert charge.shares["bess-full"] == 0.0


def test_soc_balancing_levels_states_of_charge_over_the_duration() -> None:
    policy = PLUGINS.split_policies.get("soc_balancing")
    assets = [
        _asset("a", "bess", capacity_mwh=10, max_mw=5, min_mw=-5),
        _asset("b", "bess", capacity_mwh=10, max_mw=5, min_mw=-5),
    ]
    latest = {"a": _sample("a", 0, soc_pct=80.0), "b": _sample("b", 0, soc_pct=60.0)}
    context = split_context(assets, controls=CONTROLS, latest=latest.get, duration_s=3600)
    result = split_site(policy, 4.0, context)
    # a gives 3 MWh (to 50 %), b 1 MWh (to 50 %): they end level
    assert result.shares == pytest.approx({"a": 3.0, "b": 1.0})


def test_a_policy_that_ignores_physics_is_clamped_and_the_rest_redistributed() -> None:
    result = split_site(GREEDY, -1.0, _pv_battery_site())
    # greedy put -1 MW on "bess-full" (can charge 0.4 MWh in 1 h): clamped, rest shared
    assert result.shares["bess-full"] == pytest.approx(-0.4)
    assert result.shares["pv"] == 0.0
    assert "not-at-this-site" not in result.shares
    assert math.fsum(result.shares.values()) == pytest.approx(-1.0)


def test_what_cannot_be_placed_is_reported() -> None:
    result = split_site(PLUGINS.split_policies.get("capacity_weighted"), 9.0, _pv_battery_site())
    # up: 2 + 0.4 (bess-low's 0.4 MWh in 1 h) + 3 (PV available) = 5.4
    assert result.unallocated_mw == pytest.approx(9.0 - 5.4)


# --------------------------------------------------------------------------- properties

_mw = st.floats(min_value=-20, max_value=20, allow_nan=False, allow_infinity=False)
_power = st.floats(min_value=0, max_value=10, allow_nan=False)


@st.composite
def _site(draw: st.DrawFn) -> SplitContext:
    ids = draw(st.lists(st.uuids().map(str), max_size=7, unique=True))
    assets, latest = [], {}
    for asset_id in ids:
        kind = draw(st.sampled_from(["bess", "pv", "wind", "ev_charger", "other"]))
        limit = draw(_power)
        if kind == "bess":
            capacity = draw(st.sampled_from([0.0, 1.0, 4.0]) | st.floats(0, 50))
            asset = _asset(
                asset_id, kind, capacity_mwh=capacity, max_mw=limit, min_mw=-draw(_power)
            )
            details = {"soc_pct": draw(st.floats(0, 100))} if draw(st.booleans()) else {}
            sample = _sample(asset_id, 0.0, **details)
        elif kind in ("pv", "wind"):
            asset = _asset(asset_id, kind, max_mw=limit, min_mw=-draw(st.sampled_from([0.0, 0.1])))
            sample = _sample(asset_id, draw(_power), curtailed_mw=draw(_power))
        elif kind == "ev_charger":
            asset = _asset(asset_id, kind, max_mw=draw(st.sampled_from([0.0, 0.2])), min_mw=-limit)
            sample = _sample(asset_id, -draw(_power), demand_mw=draw(_power))
        else:  # a third-party type: a setpoint within its limits
            low, high = sorted([draw(_mw), draw(_mw)])
            asset = _asset(asset_id, kind, max_mw=high, min_mw=low)
            sample = _sample(asset_id, 0.0)
        assets.append(asset)
        if draw(st.booleans()) or kind == "other":
            latest[asset_id] = sample
    duration = draw(st.none() | st.floats(60, 86_400))
    return split_context(assets, controls=CONTROLS, latest=latest.get, duration_s=duration, now=NOW)


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
@settings(max_examples=150, deadline=None)
@given(context=_site(), target=_mw)
def test_every_policy_keeps_each_share_within_what_the_asset_can_take_now(
    policy: SplitPolicy, context: SplitContext, target: float
) -> None:
    result = split_site(policy, target, context)
    by_id = {e.asset_id: e for e in context.assets}
    assert list(result.shares) == sorted(by_id)
    for asset_id, mw in result.shares.items():
        entry = by_id[asset_id]
        assert entry.min_mw <= mw <= entry.max_mw, (asset_id, entry.available)
        if entry.kind == "export_limit":
            assert mw >= 0, "PV and wind never consume"
        if entry.kind == "import_limit":
            assert mw <= 0, "a charger never exports"
    assert math.fsum(result.shares.values()) + result.unallocated_mw == pytest.approx(
        target, abs=1e-6
    )


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
@settings(max_examples=120, deadline=None)
@given(context=_site().filter(lambda c: bool(c.assets)), data=st.data())
def test_every_policy_meets_a_target_the_site_can_take(
    policy: SplitPolicy, context: SplitContext, data: st.DataObject
) -> None:
    low = math.fsum(e.min_mw for e in context.assets)
    high = math.fsum(e.max_mw for e in context.assets)
    target = data.draw(st.floats(low, high) | st.sampled_from([low, high]))
    result = split_site(policy, target, context)
    assert math.fsum(result.shares.values()) == pytest.approx(target, abs=1e-6)
    assert result.unallocated_mw == 0.0


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
@settings(max_examples=150, deadline=None)
@given(context=_site(), target=_mw)
def test_every_policy_is_deterministic(
    policy: SplitPolicy, context: SplitContext, target: float
) -> None:
    assert split_site(policy, target, context) == split_site(policy, target, context)


@settings(max_examples=120, deadline=None)
@given(context=_site(), target=st.floats(0.01, 20))
def test_soc_balancing_never_discharges_an_emptier_battery_more_per_mwh(
    context: SplitContext, target: float
) -> None:
    """Discharging, a battery with a lower state of charge gives no more MW per MWh of
    capacity than a fuller one, unless the fuller one is at its limit."""
    result = split_site(PLUGINS.split_policies.get("soc_balancing"), target, context)
    storage = [e for e in context.assets if e.soc_pct is not None and e.asset.capacity_mwh > 0]
    for fuller in storage:
        for emptier in storage:
            if not (fuller.soc_pct or 0) > (emptier.soc_pct or 0) + 1e-6:
                continue
            if result.shares[fuller.asset_id] >= fuller.max_mw - 1e-9:
                continue
            fuller_rate = result.shares[fuller.asset_id] / fuller.asset.capacity_mwh
            emptier_rate = result.shares[emptier.asset_id] / emptier.asset.capacity_mwh
            assert emptier_rate <= fuller_rate + 1e-6
