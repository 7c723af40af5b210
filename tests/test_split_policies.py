"""The built-in split policies: examples, then properties that hold for both of them."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from der_sdk import load_plugins
from der_sdk.extensions import SplitResult
from der_sdk.models import Asset
from der_sdk.split import (
    DEFAULT_SPLIT_POLICY,
    split_capacity_weighted,
    split_equal,
    split_headroom,
    split_soc_balancing,
)

Split = Callable[[float, Sequence[Asset]], SplitResult]
# soc_balancing without telemetry is split_headroom (test_split_site.py tests it in context)
POLICIES: list[Split] = [split_capacity_weighted, split_equal, split_headroom]


def bess(asset_id: str, capacity: float, limit: float, **kw: float) -> Asset:
    return Asset(
        asset_id=asset_id,
        site_id="site",
        name=asset_id,
        capacity_mwh=capacity,
        max_mw=kw.get("max_mw", limit),
        min_mw=kw.get("min_mw", -limit),
    )


THREE = [bess("a", 2, 1), bess("b", 4, 2), bess("c", 6, 3)]


# --------------------------------------------------------------------------- registration


def test_the_builtin_policies_are_registered_and_capacity_weighted_is_default() -> None:
    registry = load_plugins(entry_points=False).split_policies
    assert {"capacity_weighted", "equal", "headroom", "soc_balancing"} <= set(registry.names())
    assert DEFAULT_SPLIT_POLICY == "capacity_weighted"
    assert registry.get("capacity_weighted").split is split_capacity_weighted
    assert registry.get("equal").split is split_equal
    assert registry.provider("equal") == "der-sdk"
    assert registry.get("headroom").split is split_headroom
    assert registry.get("soc_balancing").split is split_soc_balancing
    assert registry.get("soc_balancing").split_in_context is not None


# --------------------------------------------------------------------------- examples


def test_capacity_weighted_splits_in_proportion_to_capacity() -> None:
    result = split_capacity_weighted(3.0, THREE)
    assert result.shares == {"a": 0.5, "b": 1.0, "c": 1.5}
    assert result.unallocated_mw == 0.0


def test_capacity_weighted_charging_uses_the_min_side() -> None:
    result = split_capacity_weighted(-3.0, THREE)
    assert result.shares == {"a": -0.5, "b": -1.0, "c": -1.5}


def test_capacity_weighted_5_5_mw_fits_without_clamping() -> None:
    # Capacities and limits of THREE are proportional (2 h each): nobody clamps.
    result = split_capacity_weighted(5.5, THREE)
    assert result.shares == pytest.approx({"a": 5.5 / 6, "b": 5.5 / 3, "c": 2.75})
    assert math.fsum(result.shares.values()) == pytest.approx(5.5, abs=1e-12)


def test_equal_5_5_mw_clamps_and_redistributes() -> None:
    # 5.5 / 3 = 1.83 each: a clamps at 1, the 0.83 left goes to b and c; b then clamps at 2.
    result = split_equal(5.5, THREE)
    assert result.shares == {"a": 1.0, "b": 2.0, "c": 2.5}
    assert result.unallocated_mw == 0.0


def test_capacity_weighted_clamped_asset_leftover_goes_to_others_by_capacity() -> None:
    # b has 4 MWh but only ±0.5 MW: its proportional 1.833 MW is clamped to 0.5 and the
    # remaining 5 MW is shared 2:6 between a and c (a clamps at 1, c takes the rest).
    assets = [bess("a", 2, 1), bess("b", 4, 0.5), bess("c", 6, 5)]
    result = split_capacity_weighted(5.5, assets)
    assert result.shares == {"a": 1.0, "b": 0.5, "c": 4.0}
    assert result.unallocated_mw == 0.0


def test_headroom_shares_by_room_in_the_targets_direction() -> None:
    assets = [bess("a", 9, 0, max_mw=1, min_mw=-3), bess("b", 1, 0, max_mw=3, min_mw=-1)]
    assert split_headroom(2.0, assets).shares == {"a": 0.5, "b": 1.5}
    assert split_headroom(-2.0, assets).shares == {"a": -1.5, "b": -0.5}


def test_infeasible_target_reports_unallocated() -> None:
    result = split_capacity_weighted(7.0, THREE)
    assert result.shares == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert result.unallocated_mw == pytest.approx(1.0)
    result = split_equal(-10.0, THREE)
    assert result.shares == {"a": -1.0, "b": -2.0, "c": -3.0}
    assert result.unallocated_mw == pytest.approx(-4.0)


@pytest.mark.parametrize("policy", POLICIES)
def test_no_assets_leaves_everything_unallocated(policy: Split) -> None:
    assert policy(2.5, []) == SplitResult(shares={}, unallocated_mw=2.5)


@pytest.mark.parametrize("policy", POLICIES)
def test_zero_target_gives_zero_shares(policy: Split) -> None:
    result = policy(0.0, THREE)
    assert result.shares == {"a": 0.0, "b": 0.0, "c": 0.0}
    assert all(math.copysign(1.0, v) == 1.0 for v in result.shares.values())  # no -0.0
    assert result.unallocated_mw == 0.0


def test_without_capacities_falls_back_to_headroom() -> None:
    assets = [bess("a", 0, 1), bess("b", 0, 3)]
    assert split_capacity_weighted(2.0, assets).shares == {"a": 0.5, "b": 1.5}
    assets = [bess("a", 0, 0, max_mw=1, min_mw=-4), bess("b", 0, 0, max_mw=3, min_mw=-1)]
    assert split_capacity_weighted(-2.5, assets).shares == {"a": -2.0, "b": -0.5}


def test_assets_without_capacity_take_what_the_others_cannot() -> None:
    assets = [bess("a", 4, 1), bess("pv", 0, 0, max_mw=5, min_mw=0)]
    assert split_capacity_weighted(0.5, assets).shares == {"a": 0.5, "pv": 0.0}
    assert split_capacity_weighted(3.0, assets).shares == {"a": 1.0, "pv": 2.0}


@pytest.mark.parametrize("policy", POLICIES)
def test_asset_that_cannot_be_idle_starts_at_its_limit_nearest_zero(policy: Split) -> None:
    must_run = bess("a", 1, 0, max_mw=5, min_mw=2)
    storage = bess("b", 1, 3)
    result = policy(0.0, [must_run, storage])
    assert result.shares == {"a": 2.0, "b": -2.0}
    assert result.unallocated_mw == 0.0
    result = policy(1.0, [must_run])
    assert result.shares == {"a": 2.0}
    assert result.unallocated_mw == pytest.approx(-1.0)


@pytest.mark.parametrize("policy", POLICIES)
def test_invalid_input_is_refused(policy: Split) -> None:
    with pytest.raises(ValueError, match="twice"):
        policy(1.0, [bess("a", 1, 1), bess("a", 2, 2)])
    with pytest.raises(ValueError, match="min_mw"):
        policy(1.0, [bess("a", 1, 0, max_mw=-1, min_mw=1)])
    with pytest.raises(ValueError, match="finite"):
        policy(math.nan, THREE)


# --------------------------------------------------------------------------- properties

_mw = st.floats(min_value=-50, max_value=50, allow_nan=False, allow_infinity=False)


@st.composite
def _asset(draw: st.DrawFn, asset_id: str) -> Asset:
    a, b = draw(_mw), draw(_mw)
    kind = draw(st.sampled_from(["storage", "any"]))
    if kind == "storage":  # the common case: a range around 0
        low, high = -abs(a), abs(b)
    else:  # anything, including ranges that exclude 0 and zero-width ranges
        low, high = min(a, b), max(a, b)
    capacity = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.0]) | st.floats(0, 100))
    return Asset(
        asset_id=asset_id, site_id="s", name=asset_id, capacity_mwh=capacity,
        max_mw=high, min_mw=low,
    )  # fmt: skip


@st.composite
def _fleet(draw: st.DrawFn) -> list[Asset]:
    ids = draw(st.lists(st.uuids().map(str), max_size=8, unique=True))
    return [draw(_asset(asset_id)) for asset_id in ids]


@st.composite
def _feasible_target(draw: st.DrawFn, assets: list[Asset]) -> float:
    low = math.fsum(a.min_mw for a in assets)
    high = math.fsum(a.max_mw for a in assets)
    return draw(st.floats(low, high) | st.sampled_from([low, high]))


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=300, deadline=None)
@given(assets=_fleet(), target=_mw, data=st.data())
def test_every_share_is_within_limits(
    policy: Split, assets: list[Asset], target: float, data: st.DataObject
) -> None:
    result = policy(target, assets)
    by_id = {a.asset_id: a for a in assets}
    assert list(result.shares) == sorted(by_id)
    for asset_id, mw in result.shares.items():
        assert by_id[asset_id].min_mw <= mw <= by_id[asset_id].max_mw
    assert result.unallocated_mw == pytest.approx(
        target - math.fsum(result.shares.values()), abs=1e-6
    )


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=300, deadline=None)
@given(assets=_fleet().filter(bool), data=st.data())
def test_feasible_target_is_met(policy: Split, assets: list[Asset], data: st.DataObject) -> None:
    target = data.draw(_feasible_target(assets))
    result = policy(target, assets)
    assert math.fsum(result.shares.values()) == pytest.approx(target, abs=1e-6)
    assert result.unallocated_mw == 0.0


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=300, deadline=None)
@given(assets=_fleet(), target=_mw, data=st.data())
def test_result_does_not_depend_on_input_order(
    policy: Split, assets: list[Asset], target: float, data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(assets))
    first, second = policy(target, assets), policy(target, shuffled)
    assert first == second
    assert list(first.shares) == list(second.shares)


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=300, deadline=None)
@given(assets=_fleet(), excess=st.floats(1e-3, 100), upward=st.booleans())
def test_infeasible_target_reports_what_was_not_placed(
    policy: Split, assets: list[Asset], excess: float, upward: bool
) -> None:
    if upward:
        target = math.fsum(a.max_mw for a in assets) + excess
        limits = {a.asset_id: a.max_mw for a in assets}
    else:
        target = math.fsum(a.min_mw for a in assets) - excess
        limits = {a.asset_id: a.min_mw for a in assets}
    result = policy(target, assets)
    # every asset at its limit (headroom below 1 mW counts as none)
    assert list(result.shares) == sorted(limits)
    assert result.shares == pytest.approx(limits, abs=1e-9)
    assert result.unallocated_mw == pytest.approx(excess if upward else -excess, rel=1e-9, abs=1e-9)
    assert math.fsum(result.shares.values()) + result.unallocated_mw == pytest.approx(target)


@settings(max_examples=200, deadline=None)
@given(assets=_fleet().filter(bool), data=st.data())
def test_capacity_weighted_unclamped_shares_follow_capacity(
    assets: list[Asset], data: st.DataObject
) -> None:
    storage = [
        Asset(
            asset_id=a.asset_id, site_id="s", name=a.name, capacity_mwh=c, max_mw=c, min_mw=-c
        )
        for a, c in zip(assets, data.draw(st.lists(st.floats(0.1, 10), min_size=len(assets),
                                                    max_size=len(assets))), strict=True)
    ]  # fmt: skip
    total = math.fsum(a.capacity_mwh for a in storage)
    target = data.draw(st.floats(-total, total))
    result = split_capacity_weighted(target, storage)
    for asset in storage:
        expected = target * asset.capacity_mwh / total
        assert result.shares[asset.asset_id] == pytest.approx(expected, abs=1e-6)


def test_denormal_capacity_does_not_distort_the_split() -> None:
    asset = Asset(
        asset_id="e3e70682-c209-4cac-629f-6fbed82c07cd",
        site_id="s",
        name="a",
        capacity_mwh=5e-324,
        max_mw=0.0,
        min_mw=-1.125,
    )
    result = split_capacity_weighted(-3.0, [asset])
    assert result.shares == {asset.asset_id: -1.125}
    assert result.unallocated_mw == pytest.approx(-1.875)
