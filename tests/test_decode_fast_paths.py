"""The fast paths of ingest (issue 19) give exactly what the one-at-a-time paths give.

Each fast path has a slow twin kept beside it: a telemetry batch decoded column by column
against each sample decoded alone (``_each_sample``); ``validate_details``'s C checks
against ``_check_each``, field by field; the SQLite backend's flat parameter list against
its per-sample ``_telemetry_row``. Valid and invalid inputs alike, drawn by hypothesis;
results are compared by ``repr`` so that ``5`` and ``5.0``, ``True`` and ``1``, NaN and
NaN are told apart or matched exactly.
"""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from der_sdk import load_plugins
from der_sdk.asset_types import BUILTIN_ASSET_TYPES, _check_each, validate_details
from der_sdk.extensions import AssetType
from der_sdk.models import TelemetrySample
from der_sdk.storage.sqlite import _telemetry_params, _telemetry_row
from der_sdk.wire import codec, pb

# --------------------------------------------------------------------------- strategies

_KNOWN_KEYS = sorted(
    {f.encode_name for t in BUILTIN_ASSET_TYPES for f in msgspec.structs.fields(t.details)}
)
_keys = st.sampled_from(_KNOWN_KEYS) | st.text(max_size=3)
_values = (
    st.none()
    | st.booleans()
    | st.integers(0, 100)  # valid for most numeric fields, and 5 -> 5.0 for a float one
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=3)
    | st.lists(st.integers(), max_size=2)
)
_details = st.dictionaries(_keys, _values, max_size=5)
_details_json = st.one_of(
    st.just(b""),
    _details.map(lambda d: json.dumps(d).encode()),  # NaN and Infinity as the stdlib writes
    st.sampled_from([b"{", b"[1]", b"null", b'{"soc_pct": NaN}', b'{"x": 1e999}', b"{}"]),
    st.binary(max_size=6),
)
_optional_text = st.none() | st.text(max_size=3)
# Drawing nested messages is slow on a busy machine; that is not what these tests check.
_settings = settings(suppress_health_check=[HealthCheck.too_slow])


@st.composite
def _telemetry(draw: st.DrawFn) -> pb.Telemetry:
    message = pb.Telemetry(
        asset_id=draw(st.text(max_size=3)),
        site_id=draw(st.text(max_size=3)),
        ts_us=draw(st.integers(-(2**62), 2**62) | st.integers(0, 2 * 10**15)),
        mw=draw(st.floats()),
        online=draw(st.booleans()),
        seq=draw(st.integers(0, 2**64 - 1)),
        quality=draw(st.sampled_from(["", "good", "uncertain", "bad", "fine"])),
        details_json=draw(_details_json),
    )
    setpoint = draw(st.none() | st.floats())
    if setpoint is not None:  # 0.0 sent is not the same as nothing sent
        message.mw_setpoint = setpoint
    for name in ("status", "fault_code", "quality_reason"):
        value = draw(_optional_text)
        if value is not None:
            setattr(message, name, value)
    return message


# --------------------------------------------------------------------------- decoding


@_settings
@given(st.lists(_telemetry(), max_size=6))
def test_a_batch_decodes_to_what_decoding_each_sample_alone_gives(
    messages: list[pb.Telemetry],
) -> None:
    batch, skipped = codec.telemetry_batch_from_pb(pb.TelemetryBatch(samples=messages))

    assert repr((batch.samples, skipped, batch.non_finite)) == repr(codec._each_sample(messages))


@_settings
@given(st.lists(_telemetry(), max_size=6))
def test_samples_from_batch_gives_each_sample_or_the_first_error_as_sample_from_pb(
    messages: list[pb.Telemetry],
) -> None:
    batch = pb.TelemetryBatch(samples=messages)
    try:
        expected: object = [codec.sample_from_pb(m) for m in messages]
    except ValueError as exc:
        with pytest.raises(ValueError) as raised:
            codec.samples_from_batch(batch)
        assert str(raised.value) == str(exc)
    else:
        assert repr(codec.samples_from_batch(batch)) == repr(expected)


def test_a_clean_batch_takes_the_column_path_and_a_batch_with_a_problem_does_not() -> None:
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    clean = [
        codec.sample_to_pb(
            TelemetrySample(
                asset_id=f"a{i}", site_id="s", ts=ts, mw=0.0, seq=i, details={"soc_pct": 5}
            )
        )
        for i in range(3)
    ]
    assert codec._plain_samples(clean) is not None
    for problem in (
        pb.Telemetry(asset_id="x", ts_us=1, quality="fine"),
        pb.Telemetry(asset_id="x", ts_us=2**62),
        pb.Telemetry(asset_id="x", ts_us=1, mw=float("inf")),
        pb.Telemetry(asset_id="x", ts_us=1, details_json=b"[1]"),
    ):
        assert codec._plain_samples([*clean, problem]) is None, problem


# --------------------------------------------------------------------------- details


class _DatedDetails(msgspec.Struct, kw_only=True):
    """A plugin's details with a field whose conversion changes a value's type."""

    since: datetime | None = None
    level_pct: float | None = None


_TYPES = [
    *load_plugins(entry_points=False, env={}).asset_types,
    AssetType(name="dated", details=_DatedDetails, description="not scalar"),
]


@_settings
@given(
    st.sampled_from(_TYPES),
    _details | st.dictionaries(st.just("since"), _values | st.just("2026-01-01T00:00:00Z")),
)
def test_validate_details_agrees_with_checking_each_field_alone(
    asset_type: AssetType, details: dict[str, Any]
) -> None:
    before = repr(details)

    checked, problems = validate_details(asset_type, details)

    assert repr((checked, problems)) == repr(_check_each(asset_type.details, details))
    assert repr(details) == before, "the input is left as it was"


# --------------------------------------------------------------------------- storage rows


_samples = st.builds(
    TelemetrySample,
    asset_id=st.text(max_size=3),
    site_id=st.text(max_size=3),
    ts=st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-3))])),
    mw=st.floats(),
    mw_setpoint=st.none() | st.floats(),
    online=st.booleans(),
    status=_optional_text,
    fault_code=_optional_text,
    seq=st.integers(0, 2**63 - 1),
    quality=st.sampled_from(["good", "uncertain", "bad"]),
    quality_reason=_optional_text,
    details=_details,
)


@_settings
@given(st.lists(_samples, max_size=5))
def test_sqlite_parameters_are_the_rows_of_each_sample_one_after_another(
    samples: list[TelemetrySample],
) -> None:
    expected = list(itertools.chain.from_iterable(map(_telemetry_row, samples)))

    assert repr(_telemetry_params(samples)) == repr(expected)


def test_sqlite_parameters_refuse_a_naive_time_stamp_naming_it() -> None:
    naive = TelemetrySample(asset_id="a", site_id="s", ts=datetime(2026, 1, 1), mw=1.0)
    aware = TelemetrySample(asset_id="a", site_id="s", ts=datetime(2026, 1, 1, tzinfo=UTC), mw=1.0)

    with pytest.raises(ValueError, match=r"timezone-aware.*2026, 1, 1"):
        _telemetry_params([aware, naive])
