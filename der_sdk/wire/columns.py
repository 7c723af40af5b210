"""Telemetry samples by column (``TelemetryColumns`` on the wire).

A batch of samples sent as rows (``TelemetryBatch.samples``) costs the headend a protobuf
message object per sample and a Python attribute read per field of each; sent by column,
each field of the whole batch is one packed array or one table of distinct strings with
an index per sample, which protobuf turns into Python lists in C. Strings repeat a lot in
telemetry (a batch holds a few assets and one site over many ticks), so the tables also
make a batch smaller on the wire and let its decoded samples share their strings.

An agent sends columns only to a headend whose ``RegisterAck`` says it reads them
(``telemetry_columns``); its buffer stores batches by column and turns one into rows
(:func:`rows_from_columns`) for an older headend.

This module knows the layout only: :mod:`der_sdk.wire.codec` makes samples of it.
"""

from __future__ import annotations

import itertools
import json
import operator
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from der_sdk.models import TelemetrySample
from der_sdk.wire import pb

__all__ = [
    "ColumnValues",
    "column_values",
    "encode_columns",
    "rows_from_columns",
    "split_details",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_encode_json = msgspec.json.Encoder().encode
_decode_raw_list = msgspec.json.Decoder(list[msgspec.Raw]).decode


# ----------------------------------------------------------------------------- encoding


def _table(values: list[str]) -> tuple[list[str], list[int]]:
    """The distinct ``values`` in order of appearance, and each value's index among them;
    the index list is empty when there is only one distinct value (or none)."""
    if values and values.count(values[0]) == len(values):  # the usual case, in C
        return [values[0]], []
    index: dict[str, int] = {}
    positions = [index.setdefault(v, len(index)) for v in values]
    return list(index), positions if len(index) > 1 else []


def _optional_table(values: list[str | None]) -> tuple[list[str], list[int]]:
    """As :func:`_table` for an optional field: index 0 is "not set", ``k`` the table's
    element ``k - 1``; the index list is empty when no value is set."""
    if values.count(None) == len(values):  # the usual case, in C
        return [], []
    index: dict[str | None, int] = {None: 0}
    positions = [index.setdefault(v, len(index)) for v in values]
    if len(index) == 1:
        return [], []
    return [v for v in index if v is not None], positions


def _times_us(stamps: Sequence[datetime]) -> list[int]:
    """Microseconds since the epoch of each stamp (a naive one is taken as UTC), as
    :func:`der_sdk.wire.codec.datetime_to_us` gives them, by loops in C."""
    try:
        deltas = list(map(operator.sub, stamps, itertools.repeat(_EPOCH)))
    except TypeError:  # a naive datetime among them
        deltas = [(ts if ts.tzinfo else ts.replace(tzinfo=UTC)) - _EPOCH for ts in stamps]
    return list(map(operator.floordiv, deltas, itertools.repeat(_ONE_US)))


# The optional string fields and the name of each one's table.
_OPTIONAL_TABLES = (
    ("status", "statuses"),
    ("fault_code", "fault_codes"),
    ("quality_reason", "quality_reasons"),
)


def encode_columns(samples: Sequence[TelemetrySample]) -> pb.TelemetryColumns:
    """``samples`` by column: what :func:`column_values` reads back."""
    columns = pb.TelemetryColumns(count=len(samples))
    if not samples:
        return columns
    asset_ids, asset = _table([s.asset_id for s in samples])
    site_ids, site = _table([s.site_id for s in samples])
    qualities, quality = _table([s.quality for s in samples])
    if quality or qualities != ["good"]:
        columns.qualities.extend(qualities)
        columns.quality.extend(quality)
    columns.asset_ids.extend(asset_ids)
    columns.asset.extend(asset)
    columns.site_ids.extend(site_ids)
    columns.site.extend(site)
    columns.ts_us.extend(_times_us([s.ts for s in samples]))
    columns.mw.extend([s.mw for s in samples])
    columns.online.extend([s.online for s in samples])
    seqs = [s.seq for s in samples]
    if any(seqs):
        columns.seq.extend(seqs)
    details = [s.details for s in samples]
    if any(details):
        columns.details_json = _encode_json(details)
    for name, table_name in _OPTIONAL_TABLES:
        table, index = _optional_table([getattr(s, name) for s in samples])
        if index:
            getattr(columns, table_name).extend(table)
            getattr(columns, name).extend(index)
    setpoints = [s.mw_setpoint for s in samples]
    if None not in setpoints:
        columns.mw_setpoint.extend(setpoints)
    elif any(s is not None for s in setpoints):
        at = [i for i, s in enumerate(setpoints) if s is not None]
        columns.mw_setpoint_at.extend(at)
        columns.mw_setpoint.extend([setpoints[i] for i in at])
    return columns


# ----------------------------------------------------------------------------- decoding


class ColumnValues(msgspec.Struct, kw_only=True):
    """The columns of a ``TelemetryColumns`` as Python lists, one element per sample, in
    :class:`TelemetrySample`'s field order; ``details`` still the raw JSON array (``b""``:
    none has details). Made by :func:`column_values`, which checks only that the columns
    fit together: the values themselves are the codec's to check."""

    asset_id: list[str]
    site_id: list[str]
    ts_us: list[int]
    mw: list[float]
    mw_setpoint: list[float | None]
    online: list[bool]
    status: list[str | None]
    fault_code: list[str | None]
    seq: list[int]
    quality: list[str]
    quality_reason: list[str | None]
    details_json: bytes


def _problem(field: str, what: str) -> ValueError:
    return ValueError(f"telemetry columns: {field} {what}")


def _same_length(values: Any, n: int, field: str) -> list[Any]:
    if len(values) != n:
        raise _problem(field, f"has {len(values)} values for {n} samples")
    copied: list[Any] = values[:]  # a list, also of a repeated field (faster than list())
    return copied


def _indexed(
    table: Sequence[str], index: Sequence[int], n: int, field: str, default: str | None
) -> list[str]:
    """Each sample's string of a required field's ``table`` and ``index``."""
    if not index:
        if table:
            return [table[0]] * n
        if default is None:
            if n:
                raise _problem(field + "_ids", "is empty")
            return []
        return [default] * n
    _same_length(index, n, field)
    values = list(table)
    try:
        return list(map(values.__getitem__, index))
    except IndexError:
        raise _problem(
            field, f"has an index {max(index)} outside its table of {len(values)}"
        ) from None


def _optional_indexed(
    table: Sequence[str], index: Sequence[int], n: int, field: str
) -> list[str | None]:
    """Each sample's string, or ``None``, of an optional field's ``table`` and ``index``."""
    if not index:
        return [None] * n
    _same_length(index, n, field)
    values: list[str | None] = [None, *table]
    try:
        return list(map(values.__getitem__, index))
    except IndexError:
        raise _problem(
            field, f"has an index {max(index)} outside its table of {len(table)} (0: not set)"
        ) from None


def _setpoints(values: Sequence[float], at: Sequence[int], n: int) -> list[float | None]:
    if not at:
        if not values:
            return [None] * n
        return _same_length(values, n, "mw_setpoint")
    if len(values) != len(at):
        raise _problem(
            "mw_setpoint", f"has {len(values)} values for {len(at)} indices in mw_setpoint_at"
        )
    positions = list(at)
    if positions[-1] >= n or not all(map(operator.lt, positions, positions[1:])):
        raise _problem("mw_setpoint_at", f"is not increasing indices below {n}")
    result: list[float | None] = [None] * n
    for i, value in zip(positions, values, strict=True):
        result[i] = value
    return result


def column_values(columns: pb.TelemetryColumns) -> ColumnValues:
    """The per-sample values of ``columns``.

    :raises ValueError: the columns do not fit together (a column of the wrong length, an
        index outside its table); the message names the column.
    """
    n = columns.count
    return ColumnValues(
        asset_id=_indexed(columns.asset_ids, columns.asset, n, "asset", None),
        site_id=_indexed(columns.site_ids, columns.site, n, "site", ""),
        ts_us=_same_length(columns.ts_us, n, "ts_us"),
        mw=_same_length(columns.mw, n, "mw"),
        mw_setpoint=_setpoints(columns.mw_setpoint, columns.mw_setpoint_at, n),
        online=_same_length(columns.online, n, "online"),
        status=_optional_indexed(columns.statuses, columns.status, n, "status"),
        fault_code=_optional_indexed(columns.fault_codes, columns.fault_code, n, "fault_code"),
        seq=_same_length(columns.seq, n, "seq") if columns.seq else [0] * n,
        quality=_indexed(columns.qualities, columns.quality, n, "quality", "good"),
        quality_reason=_optional_indexed(
            columns.quality_reasons, columns.quality_reason, n, "quality_reason"
        ),
        details_json=columns.details_json,
    )


def split_details(raw: bytes, n: int) -> list[bytes]:
    """Each sample's details JSON from the batch's array (``b""`` when it has none).

    An element that is not an object is passed on as it is, for the sample's own check to
    refuse. The standard library's parser reads an array msgspec refuses (``NaN``,
    ``Infinity``), so that such a sample is kept as ``bad``, as it is sent as a row.

    :raises ValueError: ``raw`` is not a JSON array of ``n`` values.
    """
    if not raw:
        return [b""] * n
    try:
        parts = [bytes(r) for r in _decode_raw_list(raw)]
    except (msgspec.DecodeError, RecursionError):
        try:
            loaded = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise _problem("details_json", f"is not a JSON array: {exc}") from None
        if not isinstance(loaded, list):
            raise _problem("details_json", "is not a JSON array") from None
        parts = [json.dumps(v).encode() for v in loaded]
    if len(parts) != n:
        raise _problem("details_json", f"holds {len(parts)} values for {n} samples")
    return parts


def rows_from_columns(columns: pb.TelemetryColumns) -> list[pb.Telemetry]:
    """The samples of ``columns`` as ``Telemetry`` messages, field for field (for an older
    headend, and for a batch whose samples must be checked one at a time).

    :raises ValueError: as :func:`column_values`, and when ``details_json`` is not a JSON
        array of ``count`` values.
    """
    values = column_values(columns)
    details = split_details(values.details_json, columns.count)
    rows: list[pb.Telemetry] = []
    for i, asset_id in enumerate(values.asset_id):
        row = pb.Telemetry(
            asset_id=asset_id,
            site_id=values.site_id[i],
            ts_us=values.ts_us[i],
            mw=values.mw[i],
            online=values.online[i],
            seq=values.seq[i],
            quality=values.quality[i],
            details_json=b"" if details[i] == b"{}" else details[i],  # as rows send none
        )
        setpoint = values.mw_setpoint[i]
        if setpoint is not None:
            row.mw_setpoint = setpoint
        for name, _ in _OPTIONAL_TABLES:
            text = getattr(values, name)[i]
            if text is not None:
                setattr(row, name, text)
        rows.append(row)
    return rows
