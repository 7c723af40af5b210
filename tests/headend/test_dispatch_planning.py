"""Planning a dispatch, on its own: checks, split and clamp, idempotency."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from der_sdk.inventory import Inventory, parse_inventory
from der_sdk.models import DISPATCH_HORIZON_S, Dispatch, DispatchRequest
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
