"""How an OpenADR event becomes site dispatches (der_sdk_openadr.mapping), and the
options an ``openadr2b`` program takes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from der_sdk_openadr.mapping import OpenAdrOptions, event_id_of, plan_event

from der_sdk.errors import ConfigError
from der_sdk.inventory import parse_inventory
from der_sdk.models import Asset, ScheduleStep, Site
from der_sdk.plugins import load_plugins
from der_sdk.testing.inventory import DEFAULT_INVENTORY_YAML, DEFAULT_SITE_ID

START = datetime(2026, 12, 7, 17, 0, tzinfo=UTC)
NORTH = Site(site_id="00000000-0000-4000-8000-00000000000a", name="North")
SOUTH = Site(site_id="00000000-0000-4000-8000-00000000000b", name="South")
ASSETS = [
    Asset(asset_id="a1", site_id=NORTH.site_id, name="n", max_mw=2.0, min_mw=-2.0),
    Asset(asset_id="a2", site_id=SOUTH.site_id, name="s", max_mw=1.0, min_mw=-1.0),
]


def _options(**values: Any) -> OpenAdrOptions:
    base: dict[str, Any] = {"vtn_url": "http://vtn", "ven_name": "v", "levels": {0: 0, 1: 1}}
    return msgspec.convert({**base, **values}, OpenAdrOptions)


def _event(
    signal: str = "SIMPLE",
    payloads: tuple[float, ...] = (1, 2, 0),
    targets: list[dict[str, str]] | None = None,
    status: str = "far",
    context: str = "oadr://dr",
) -> dict[str, Any]:
    return {
        "event_descriptor": {
            "event_id": "evt-1",
            "modification_number": 2,
            "event_status": status,
            "market_context": context,
        },
        "active_period": {"dtstart": START, "duration": timedelta(minutes=30)},
        "event_signals": [
            {
                "signal_name": signal,
                "signal_type": "level",
                "intervals": [
                    {"uid": i, "duration": timedelta(minutes=10), "signal_payload": p}
                    for i, p in enumerate(payloads)
                ],
            }
        ],
        "targets": targets or [{"ven_id": "VEN"}],
    }


def test_simple_levels_make_one_schedule_per_site_from_the_level_table() -> None:
    options = _options(levels={0: 0.0, 1: 0.5, 2: 1.5}, site_levels={SOUTH.site_id: {1: 0.2}})
    plan = plan_event(_event(), options, [NORTH, SOUTH], ASSETS)
    assert (plan.event_id, plan.modification_number, plan.ignored) == ("evt-1", 2, None)
    north, south = plan.controls
    assert north.external_id == f"evt-1/{NORTH.site_id}" and north.site_id == NORTH.site_id
    assert north.start_at == START and north.duration_s == 1800
    assert north.steps == [
        ScheduleStep(offset_s=0, mw=0.5),
        ScheduleStep(offset_s=600, mw=1.5),
        ScheduleStep(offset_s=1200, mw=0.0),
    ]
    # level 2 is not in the site's own table: the highest level below it counts
    assert south.steps == [ScheduleStep(offset_s=0, mw=0.2), ScheduleStep(offset_s=1200, mw=0.0)]
    assert event_id_of(north.external_id) == "evt-1"


def test_a_price_at_or_above_the_threshold_dispatches_the_sites_mw() -> None:
    options = _options(
        rule="price_threshold",
        price_threshold=100.0,
        mw_above_threshold=1.0,
        site_mw={SOUTH.site_id: 0.5},
    )
    plan = plan_event(
        _event("ELECTRICITY_PRICE", (80.0, 100.0, 250.0)), options, [NORTH, SOUTH], ASSETS
    )
    north, south = plan.controls
    assert north.steps == [ScheduleStep(offset_s=0, mw=0.0), ScheduleStep(offset_s=600, mw=1.0)]
    assert south.steps == [ScheduleStep(offset_s=0, mw=0.0), ScheduleStep(offset_s=600, mw=0.5)]


def test_resource_targets_choose_the_sites_and_other_events_are_ignored_with_a_reason() -> None:
    options = _options(market_contexts=["oadr://dr"])
    only_south = plan_event(
        _event(targets=[{"resource_id": SOUTH.site_id}]), options, [NORTH, SOUTH], ASSETS
    )
    assert [c.site_id for c in only_south.controls] == [SOUTH.site_id]
    assert "no SIMPLE signal" in str(
        plan_event(_event("ELECTRICITY_PRICE"), options, [NORTH], ASSETS).ignored
    )
    other = plan_event(_event(context="oadr://other"), options, [NORTH], ASSETS)
    assert other.controls == [] and "market context 'oadr://other'" in str(other.ignored)
    nobody = plan_event(_event(targets=[{"resource_id": "elsewhere"}]), options, [NORTH], ASSETS)
    assert nobody.ignored == "the event targets none of the program's sites"


def test_over_limits_clamp_keeps_a_site_within_its_assets_range() -> None:
    options = _options(levels={1: 5.0}, over_limits="clamp")
    plan = plan_event(_event(payloads=(1,)), options, [NORTH], ASSETS)
    assert plan.controls[0].steps == [ScheduleStep(offset_s=0, mw=2.0)]
    assert plan.clamped == [f"site {NORTH.site_id}: 5 MW clamped to [-2, 2]"]
    refused = plan_event(_event(payloads=(1,)), _options(levels={1: 5.0}), [NORTH], ASSETS)
    assert refused.controls[0].steps == [ScheduleStep(offset_s=0, mw=5.0)], (
        "opt_out leaves it to the headend's limits, which refuse it"
    )


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("{vtn_url: x, ven_name: v}", "rule simple_levels needs a levels table"),
        (
            "{vtn_url: x, ven_name: v, rule: price_threshold}",
            "rule price_threshold needs price_threshold",
        ),
        (
            "{vtn_url: x, ven_name: v, levels: {1: 1}, poll_interval_s: 0}",
            "programs[0].options.poll_interval_s: invalid options for program source "
            "'openadr2b': expected float > 0",
        ),
        ("{vtn_url: x, ven_name: v, levels: {1: 1}, cert: c.pem}", "give cert and key together"),
        ("{vtn_url: x, ven_name: v, levels: {1: 1}, rule: fixed}", "programs[0].options.rule"),
    ],
)
def test_bad_options_stop_the_headend_naming_the_program_and_field(
    options: str, expected: str
) -> None:
    text = DEFAULT_INVENTORY_YAML + (
        f"programs:\n  - name: dr\n    source: openadr2b\n    sites: [{DEFAULT_SITE_ID}]\n"
        f"    options: {options}\n"
    )
    sources = {s.name: s.options for s in load_plugins(env={}).program_sources}
    with pytest.raises(ConfigError) as caught:
        parse_inventory(text, "assets.yaml", program_sources=sources)
    assert expected in str(caught.value)
