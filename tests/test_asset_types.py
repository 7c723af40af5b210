"""Built-in asset types and telemetry `details` validation (schema evolution)."""

from __future__ import annotations

from der_sdk import load_plugins
from der_sdk.asset_types import validate_details


def _bess():  # type: ignore[no-untyped-def]
    return load_plugins(entry_points=False, env={}).asset_types.get("bess")


def test_each_builtin_type_has_six_to_twelve_detail_fields() -> None:
    # issue 20 added the control fields (available power, limits in force, demand)
    for asset_type in load_plugins(entry_points=False, env={}).asset_types:
        assert 6 <= len(asset_type.details.__struct_fields__) <= 12, asset_type.name


def test_unknown_newer_fields_are_kept_and_missing_ones_tolerated() -> None:
    details, problems = validate_details(_bess(), {"soc_pct": 55.0, "cell_delta_mv": 12})
    assert problems == []
    assert details == {"soc_pct": 55.0, "cell_delta_mv": 12}


def test_bad_known_field_is_named_and_the_rest_survive() -> None:
    details, problems = validate_details(_bess(), {"soc_pct": "full", "soh_pct": 97.0})
    assert len(problems) == 1 and "details.soc_pct" in problems[0]
    assert details == {"soh_pct": 97.0}


def test_valid_details_come_back_as_given_when_nothing_needs_converting() -> None:
    given = {"soc_pct": 55.0, "cell_delta_mv": 12, "soh_pct": None}
    details, problems = validate_details(_bess(), given)
    assert problems == []
    assert details is given  # the fast path copies nothing


def test_valid_details_are_converted_in_place_of_a_copy_keeping_order_and_unknown_keys() -> None:
    given = {"vendor_mode": "eco", "soc_pct": 55, "soh_pct": 97.5}
    details, problems = validate_details(_bess(), given)
    assert problems == []
    assert details == {"vendor_mode": "eco", "soc_pct": 55.0, "soh_pct": 97.5}
    assert type(details["soc_pct"]) is float
    assert list(details) == ["vendor_mode", "soc_pct", "soh_pct"]
    assert given["soc_pct"] == 55 and type(given["soc_pct"]) is int  # the input is untouched


def test_an_out_of_range_field_is_named_with_the_value_it_got() -> None:
    details, problems = validate_details(_bess(), {"soc_pct": 140.0, "soh_pct": 97.0})
    assert len(problems) == 1
    assert problems[0].startswith("details.soc_pct: ") and "140" in problems[0]
    assert details == {"soh_pct": 97.0}
