"""Planning a dispatch, on its own: checks, split and clamp, idempotency."""

from __future__ import annotations

import hashlib
import math
import re
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest

from der_sdk.inventory import Inventory, parse_inventory
from der_sdk.models import DISPATCH_HORIZON_S, Dispatch, DispatchRequest, TelemetrySample
from der_sdk.plugins import load_plugins
from der_sdk.split import DEFAULT_SPLIT_POLICY
from der_sdk_headend.dispatch import planning
from der_sdk_headend.dispatch.planning import (
    IdempotencyConflictError,
    InvalidDispatchError,
    UnknownTargetError,
)
from tests.headend.headend_kit import BESS_1, BESS_2, BESS_3, INVENTORY_YAML, SITE_A, SITE_B

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
INVENTORY: Inventory = parse_inventory(INVENTORY_YAML)
POLICY = load_plugins(entry_points=False).split_policies.get(DEFAULT_SPLIT_POLICY)


def _plan(**fields: object) -> Dispatch:
    request = DispatchRequest(**fields)  # type: ignore[arg-type]
    return planning.plan(request, inventory=INVENTORY, policy=POLICY, source="test", now=NOW)


def test_an_asset_dispatch_is_clamped_and_asset_id_wins_over_site_id() -> None:
    dispatch = _plan(mw=5.0, asset_id=BESS_2, site_id=SITE_B)
    assert (dispatch.asset_id, dispatch.site_id, dispatch.state) == (BESS_2, SITE_A, "submitted")
    assert [(t.asset_id, t.mw) for t in dispatch.targets] == [(BESS_2, 1.0)]
    assert dispatch.reason == "clamped to [-1, 1]"


def test_a_site_dispatch_is_split_and_what_no_asset_takes_is_reported() -> None:
    dispatch = _plan(mw=10.0, site_id=SITE_A)
    assert {t.asset_id for t in dispatch.targets} == {BESS_1, BESS_2, BESS_3}
    assert math.isclose(sum(t.mw for t in dispatch.targets) + dispatch.unallocated_mw, 10.0)
    assert dispatch.unallocated_mw > 0 and "could not be placed" in (dispatch.reason or "")
    assert dispatch.policy == DEFAULT_SPLIT_POLICY


@pytest.mark.parametrize(
    ("fields", "error", "says"),
    [
        ({"mw": 1.0}, InvalidDispatchError, "give asset_id or site_id"),
        ({"mw": math.nan, "asset_id": BESS_1}, InvalidDispatchError, "finite"),
        ({"mw": 1.0, "asset_id": "nope"}, UnknownTargetError, "unknown asset nope"),
        ({"mw": 1.0, "site_id": "nope"}, UnknownTargetError, "unknown site nope"),
        ({"mw": 1.0, "asset_id": BESS_1, "duration_s": 0.0}, InvalidDispatchError, "duration_s"),
        (
            {"mw": 1.0, "asset_id": BESS_1, "ttl_s": DISPATCH_HORIZON_S + 1.0},
            InvalidDispatchError,
            "ttl_s must be more than 0 and at most 31536000",
        ),
        (
            {"mw": 1.0, "asset_id": BESS_1, "ttl_s": 5.0, "expires_at": NOW},
            InvalidDispatchError,
            "not both",
        ),
        (
            {"mw": 1.0, "asset_id": BESS_1, "expires_at": datetime(2027, 1, 1)},
            InvalidDispatchError,
            "needs a time zone",
        ),
        (
            {"mw": 1.0, "asset_id": BESS_1, "expires_at": NOW},
            InvalidDispatchError,
            "already in the past",
        ),
        (
            {"mw": 1.0, "asset_id": BESS_1, "expires_at": NOW + timedelta(days=366)},
            InvalidDispatchError,
            "(one year) after",
        ),
    ],
)
def test_a_request_out_of_bounds_is_refused_saying_which_field(
    fields: dict[str, object], error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=re.escape(says)):
        _plan(**fields)


def test_expiry_from_ttl_or_an_instant_at_any_offset() -> None:
    assert _plan(mw=1.0, asset_id=BESS_1, ttl_s=30.0).expires_at == NOW + timedelta(seconds=30)
    later = datetime(2026, 6, 1, 14, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    expires_at = _plan(mw=1.0, asset_id=BESS_1, expires_at=later).expires_at
    assert expires_at == later and expires_at is not None and expires_at.utcoffset() == timedelta(0)


def test_a_stored_record_beyond_the_bounds_is_found() -> None:
    dispatch = _plan(mw=1.0, asset_id=BESS_1, duration_s=60.0)
    assert planning.out_of_bounds(dispatch) is None
    dispatch.duration_s = 1e12
    assert (planning.out_of_bounds(dispatch) or "").startswith("stored out of bounds: duration_s")
    dispatch.duration_s = None
    dispatch.expires_at = datetime(9999, 12, 31, tzinfo=UTC)
    assert "expires_at" in (planning.out_of_bounds(dispatch) or "")


def test_an_idempotency_key_fixes_the_id_and_a_different_request_conflicts() -> None:
    key = planning.check_idempotency_key("  order-7 ")
    assert key == "order-7"
    assert planning.idempotent_id(key) == planning.idempotent_id("order-7")
    for bad in ("", " ", "x" * 256, "tab\there"):
        with pytest.raises(InvalidDispatchError, match="Idempotency-Key"):
            planning.check_idempotency_key(bad)
    first = DispatchRequest(mw=1.0, asset_id=BESS_1)
    known = _plan(mw=1.0, asset_id=BESS_1)
    known.idempotency_key, known.request_fingerprint = key, planning.fingerprint(first)
    assert planning.replay(known, planning.fingerprint(DispatchRequest(mw=1.0, asset_id=BESS_1)))
    with pytest.raises(IdempotencyConflictError, match="different request"):
        planning.replay(known, planning.fingerprint(DispatchRequest(mw=2.0, asset_id=BESS_1)))


# ----------------------------------------------------------------------------- policies, kinds

MIXED_SITE = "8b3e4d5f-6a71-4829-8b3c-4d5e6f7a8b9c"
HEADROOM_SITE = "9c4f5e6a-7b82-4930-9c4d-5e6f7a8b9cad"
M_BESS = "00000000-0000-4000-8000-000000000011"
M_PV = "00000000-0000-4000-8000-000000000012"
M_EV = "00000000-0000-4000-8000-000000000013"
H_BESS = "00000000-0000-4000-8000-000000000021"
H_PV = "00000000-0000-4000-8000-000000000022"
MIXED = parse_inventory(
    f"""
sites:
  - site_id: {MIXED_SITE}
    name: Mixed
  - site_id: {HEADROOM_SITE}
    name: Headroom by default
    split_policy: headroom
assets:
  - {{asset_id: {M_BESS}, site_id: {MIXED_SITE}, name: B, asset_type: bess,
      capacity_mwh: 8, max_mw: 2, min_mw: -2}}
  - {{asset_id: {M_PV}, site_id: {MIXED_SITE}, name: PV, asset_type: pv, max_mw: 6, min_mw: 0}}
  - {{asset_id: {M_EV}, site_id: {MIXED_SITE}, name: EV, asset_type: ev_charger,
      max_mw: 0, min_mw: -1}}
  - {{asset_id: {H_BESS}, site_id: {HEADROOM_SITE}, name: HB, asset_type: bess,
      capacity_mwh: 8, max_mw: 2, min_mw: -2}}
  - {{asset_id: {H_PV}, site_id: {HEADROOM_SITE}, name: HPV, asset_type: pv,
      max_mw: 6, min_mw: 0}}
"""
)
POLICIES = load_plugins(entry_points=False).split_policies
LATEST = {
    M_PV: TelemetrySample(asset_id=M_PV, site_id=MIXED_SITE, ts=NOW, mw=1.0),
    H_PV: TelemetrySample(asset_id=H_PV, site_id=HEADROOM_SITE, ts=NOW, mw=1.0),
    M_EV: TelemetrySample(
        asset_id=M_EV, site_id=MIXED_SITE, ts=NOW, mw=-0.2, details={"demand_mw": 0.25}
    ),
}


def _plan_mixed(**fields: object) -> Dispatch:
    request = msgspec.convert(fields, DispatchRequest, strict=False)
    return planning.plan(
        request,
        inventory=MIXED,
        policy=POLICY,
        source="test",
        now=NOW,
        policies=POLICIES,
        latest=LATEST.get,
    )


def _targets(dispatch: Dispatch) -> dict[str, float]:
    return {t.asset_id: t.mw for t in dispatch.targets}


def test_a_site_split_keeps_pv_within_its_available_power_and_the_charger_importing() -> None:
    dispatch = _plan_mixed(mw=5.0, site_id=MIXED_SITE)
    targets = _targets(dispatch)
    assert targets[M_PV] == 1.0  # only 1 MW of sun now, whatever the 6 MW rating
    assert targets[M_EV] == 0.0
    assert targets[M_BESS] == 2.0
    assert dispatch.unallocated_mw == pytest.approx(2.0)
    assert "can take now" in (dispatch.reason or "")
    charging = _targets(_plan_mixed(mw=-3.0, site_id=MIXED_SITE))
    assert charging[M_PV] == 0.0  # never asked to consume
    assert charging[M_EV] >= -0.25  # no more than the connected demand


def test_the_request_policy_wins_over_the_sites_and_the_headends() -> None:
    assert _plan_mixed(mw=1.0, site_id=MIXED_SITE).policy == DEFAULT_SPLIT_POLICY
    assert _plan_mixed(mw=1.0, site_id=HEADROOM_SITE).policy == "headroom"
    chosen = _plan_mixed(mw=1.0, site_id=HEADROOM_SITE, policy="equal")
    assert chosen.policy == "equal"
    assert _targets(chosen) == {H_BESS: 0.5, H_PV: 0.5}
    by_site = _targets(_plan_mixed(mw=1.5, site_id=HEADROOM_SITE))
    assert by_site == pytest.approx({H_BESS: 1.0, H_PV: 0.5})  # room 2 : 1


def test_an_unknown_policy_is_refused_listing_the_installed_ones() -> None:
    with pytest.raises(InvalidDispatchError) as caught:
        _plan_mixed(mw=1.0, site_id=MIXED_SITE, policy="greedy")
    message = str(caught.value)
    assert message.startswith("policy: unknown split policy 'greedy'")
    assert "capacity_weighted, equal, headroom, soc_balancing" in message


@pytest.mark.parametrize(
    ("asset_id", "mw", "kind", "range_"),
    [(M_PV, -1.0, "export_limit", "[0, 6]"), (M_EV, 0.5, "import_limit", "[-1, 0]")],
)
def test_a_mw_of_the_wrong_sign_for_the_assets_kind_is_refused(
    asset_id: str, mw: float, kind: str, range_: str
) -> None:
    with pytest.raises(InvalidDispatchError) as caught:
        _plan_mixed(mw=mw, asset_id=asset_id)
    message = str(caught.value)
    assert message.startswith("mw: ")
    assert asset_id in message and kind in message and range_ in message


def test_an_export_limit_above_the_rating_is_clamped_like_a_setpoint() -> None:
    dispatch = _plan_mixed(mw=9.0, asset_id=M_PV)
    assert _targets(dispatch) == {M_PV: 6.0}
    assert dispatch.reason == "clamped to [0, 6]"


def test_a_request_without_policy_keeps_its_fingerprint_from_before_the_field() -> None:
    body = {"mw": 1.0, "site_id": MIXED_SITE, "duration_s": 60.0}
    before = {**body, "asset_id": None, "expires_at": None, "ttl_s": None}
    old = hashlib.sha256(msgspec.json.Encoder(order="sorted").encode(before)).hexdigest()
    assert planning.fingerprint(DispatchRequest(**body)) == old  # type: ignore[arg-type]
    with_policy = DispatchRequest(**body, policy="equal")  # type: ignore[arg-type]
    assert planning.fingerprint(with_policy) != old


def test_a_schedule_step_of_the_wrong_sign_for_the_assets_kind_is_refused_naming_it() -> None:
    start = NOW + timedelta(hours=1)
    steps = [{"offset_s": 0, "mw": 2.0}, {"offset_s": 600, "mw": -1.0}]
    with pytest.raises(InvalidDispatchError) as caught:
        _plan_mixed(asset_id=M_PV, start_at=start, steps=steps, duration_s=1200)
    message = str(caught.value)
    assert message.startswith("steps[1].mw -1 MW is outside")
    assert "export_limit" in message and "[0, 6]" in message


def test_a_site_schedule_is_split_by_the_sites_policy_within_each_kinds_range() -> None:
    start = NOW + timedelta(hours=1)
    steps = [{"offset_s": 0, "mw": 3.0}, {"offset_s": 600, "mw": -1.5}]
    dispatch = _plan_mixed(site_id=HEADROOM_SITE, start_at=start, steps=steps, duration_s=1200)
    assert dispatch.policy == "headroom"
    by_asset = {t.asset_id: [s.mw for s in t.steps or []] for t in dispatch.targets}
    assert by_asset[H_PV][1] == 0.0  # a PV plant is never asked to consume
    assert by_asset[H_BESS][1] == pytest.approx(-1.5)
    assert sum(shares[0] for shares in by_asset.values()) == pytest.approx(3.0)
    equal = _plan_mixed(
        site_id=HEADROOM_SITE, start_at=start, steps=steps, duration_s=1200, policy="equal"
    )
    assert equal.policy == "equal"
