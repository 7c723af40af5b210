"""Telemetry by column (``TelemetryColumns``): the same samples as rows, the same checks
for bad values, a clear error naming the column for columns that do not fit together."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from der_sdk.models import TelemetrySample
from der_sdk.wire import codec, pb
from der_sdk.wire.columns import encode_columns, rows_from_columns

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
T0 = datetime(2026, 12, 7, 12, 0, 0, 123456, tzinfo=UTC)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
optional_text = st.none() | st.sampled_from(["", "running", "charging", "é ✓"])
samples = st.builds(
    TelemetrySample,
    asset_id=st.sampled_from(["a1", "a2", "a3"]),
    site_id=st.sampled_from(["s1", "s2"]),
    ts=st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
    ),
    mw=st.floats(),
    mw_setpoint=st.none() | st.floats(),
    online=st.booleans(),
    status=optional_text,
    fault_code=optional_text,
    seq=st.integers(0, 2**64 - 1),
    quality=st.sampled_from(["good", "uncertain", "bad"]),
    quality_reason=optional_text,
    details=st.dictionaries(st.sampled_from(["soc_pct", "x", "ünï"]), json_values, max_size=3),
)


def _sample(**fields: Any) -> TelemetrySample:
    base: dict[str, Any] = {"asset_id": "a1", "site_id": "s1", "ts": T0, "mw": 1.5}
    return TelemetrySample(**{**base, **fields})


def _by_column(columns: pb.TelemetryColumns, seq: int = 1) -> pb.TelemetryBatch:
    return pb.TelemetryBatch(seq=seq, columns=columns)


def _decoded(batch: pb.TelemetryBatch) -> tuple[Any, ...]:
    decoded, skipped = codec.telemetry_batch_from_pb(batch)
    # NaN != NaN: compare what is encoded, which is how a sample leaves the headend
    return codec.telemetry_payload(decoded.samples), decoded.non_finite, skipped


@settings(max_examples=300, deadline=None)
@given(st.lists(samples, max_size=12))
def test_a_batch_by_column_decodes_to_exactly_what_the_same_batch_as_rows_does(
    batch: list[TelemetrySample],
) -> None:
    rows = codec.agent_telemetry(9, batch).telemetry
    by_column = codec.agent_telemetry(9, batch, columns=True).telemetry
    assert not by_column.samples and by_column.columns.count == len(batch)
    assert _decoded(by_column) == _decoded(rows)
    # and the agent turns its stored columns into those rows for an older headend
    payload = codec.telemetry_payload(batch)
    assert codec.agent_telemetry_payload(9, payload, columns=False).telemetry == rows


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(-62_135_596_800 * 10**6, 253_402_300_799 * 10**6), min_size=1, max_size=20)
)
def test_times_decode_exactly_to_the_microsecond_anywhere_in_range(times_us: list[int]) -> None:
    messages = [pb.Telemetry(asset_id="a", ts_us=t, quality="good") for t in times_us]
    decoded = codec._plain_samples(messages)
    assert decoded is not None
    assert [s.ts for s in decoded] == [EPOCH + timedelta(microseconds=t) for t in times_us]


def test_the_fast_time_path_is_bounded_where_a_float_of_seconds_stops_being_exact() -> None:
    # Beyond 2**33 s a float of seconds no longer holds every microsecond: this time,
    # converted through one, is a microsecond off; decoded, it is exact.
    exact = EPOCH + timedelta(microseconds=2**34 * 10**6 + 1)
    us = 2**34 * 10**6 + 1
    through_float = EPOCH + timedelta(seconds=us / 1e6)
    assert through_float != exact
    assert codec._stamps([us, 0]) == [exact, EPOCH]
    edge = codec._FLOAT_EXACT_US - 1
    assert codec._stamps([edge, -edge]) == [
        EPOCH + timedelta(microseconds=edge),
        EPOCH - timedelta(microseconds=edge),
    ]


def test_strings_are_sent_once_per_batch_and_the_batch_is_smaller_than_rows() -> None:
    batch = [
        _sample(asset_id=a, ts=T0 + timedelta(seconds=k), status="running", seq=k)
        for k in range(20)
        for a in ("asset-one", "asset-two")
    ]
    columns = encode_columns(batch)
    assert list(columns.asset_ids) == ["asset-one", "asset-two"]
    assert list(columns.site_ids) == ["s1"] and not columns.site  # one site: no index
    assert list(columns.statuses) == ["running"] and set(columns.status) == {1}
    assert not columns.qualities and not columns.details_json  # all good, no details
    by_column = codec.agent_telemetry(1, batch, columns=True).ByteSize()
    assert by_column < codec.agent_telemetry(1, batch).ByteSize() / 2


def test_bad_values_in_columns_are_handled_sample_by_sample_as_in_rows() -> None:
    columns = encode_columns([_sample(asset_id=f"a{i}", seq=i) for i in range(5)])
    columns.qualities[:] = ["good", "excellent"]
    columns.quality[:] = [0, 1, 0, 0, 0]  # a1: an unknown quality
    columns.ts_us[2] = 10**18  # a2: beyond the year 9999
    columns.mw[3] = math.nan  # a3: kept, as bad
    columns.details_json = b'[{}, {}, {}, {}, "not an object"]'  # a4
    decoded, skipped = codec.telemetry_batch_from_pb(_by_column(columns, seq=4))
    assert [s.asset_id for s in decoded.samples] == ["a0", "a3"]
    assert decoded.samples[1].quality == "bad" and decoded.non_finite == {
        1: ["mw: expected a finite number, got nan"]
    }
    reasons = dict(skipped)
    assert reasons["a1"] == "asset a1: unknown quality 'excellent'"
    assert reasons["a2"].startswith("asset a2: timestamp 1000000000000000000 us")
    assert reasons["a4"].startswith("asset a4: details_json is not a JSON object")


def test_a_non_finite_number_in_the_details_array_keeps_the_sample_as_bad() -> None:
    columns = encode_columns([_sample(asset_id="a0"), _sample(asset_id="a1")])
    columns.details_json = b'[{"soc_pct": NaN}, {"soc_pct": 5}]'
    decoded, skipped = codec.telemetry_batch_from_pb(_by_column(columns))
    assert not skipped
    first, second = decoded.samples
    assert first.quality == "bad" and "soc_pct" not in first.details
    assert second.details == {"soc_pct": 5}


def test_rows_then_columns_in_one_batch_are_all_taken_in_that_order() -> None:
    batch = codec.agent_telemetry(3, [_sample(asset_id="row", mw=math.inf)]).telemetry
    batch.columns.CopyFrom(encode_columns([_sample(asset_id="col", mw=math.nan)]))
    decoded, _ = codec.telemetry_batch_from_pb(batch)
    assert [s.asset_id for s in decoded.samples] == ["row", "col"]
    assert decoded.non_finite == {
        0: ["mw: expected a finite number, got inf"],
        1: ["mw: expected a finite number, got nan"],
    }
    assert codec.batch_sample_count(batch) == 2


def _broken(change: str) -> pb.TelemetryColumns:
    columns = encode_columns(
        [_sample(asset_id=a, mw_setpoint=1.0 if a == "a1" else None) for a in ("a0", "a1", "a2")]
    )
    if change == "mw":
        del columns.mw[0]
    elif change == "asset":
        columns.asset[2] = 7
    elif change == "asset_ids":
        del columns.asset_ids[:]
        del columns.asset[:]
    elif change == "status":
        columns.status[:] = [0, 0, 2]
        columns.statuses[:] = ["on"]
    elif change == "mw_setpoint_at":
        columns.mw_setpoint_at[:] = [3]
    elif change == "details_json":
        columns.details_json = b"[{}, {}]"
    elif change == "details_json not an array":
        columns.details_json = b'{"soc_pct": 1'
    return columns


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("mw", "telemetry columns: mw has 2 values for 3 samples"),
        ("asset", "telemetry columns: asset has an index 7 outside its table of 3"),
        ("asset_ids", "telemetry columns: asset_ids is empty"),
        ("status", "telemetry columns: status has an index 2 outside its table of 1 (0: not set)"),
        ("mw_setpoint_at", "telemetry columns: mw_setpoint_at is not increasing indices below 3"),
        ("details_json", "telemetry columns: details_json holds 2 values for 3 samples"),
        ("details_json not an array", "telemetry columns: details_json is not a JSON array"),
    ],
)
def test_columns_that_do_not_fit_together_are_refused_naming_the_column(
    change: str, message: str
) -> None:
    batch = _by_column(_broken(change))
    with pytest.raises(ValueError) as error:
        codec.telemetry_batch_from_pb(batch)
    assert str(error.value).startswith(message)
    with pytest.raises(ValueError):
        rows_from_columns(batch.columns)
