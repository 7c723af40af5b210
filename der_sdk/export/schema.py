"""The table a telemetry export writes: the core sample fields, then each asset type's
``details`` fields as typed columns (docs/export.md).

Columns, in this order:

* ``asset_id``, ``site_id``, ``asset_type`` (empty when the exporter has no inventory),
  ``ts`` (UTC, microseconds), ``mw``, ``mw_setpoint``, ``online``, ``status``,
  ``fault_code``, ``seq``, ``quality``, ``quality_reason``;
* ``details_<field>`` for every field of every installed asset type's ``details``
  (:class:`~der_sdk.extensions.AssetType`), typed from its annotation (float, integer,
  text, boolean; anything else is JSON text). Types sharing a field name share the
  column (the first type registered sets its type);
* ``details_extra``: the JSON object of the ``details`` keys no column holds (fields of
  no installed type, or a value of another type than its column's), empty when none.

So a sample goes into a row and comes back out of it unchanged (:func:`samples_from_table`).
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import pyarrow as pa

from der_sdk.extensions import AssetType
from der_sdk.models import TelemetrySample

__all__ = ["DETAILS_EXTRA", "DETAILS_PREFIX", "ExportSchema", "samples_from_table"]

DETAILS_PREFIX = "details_"
DETAILS_EXTRA = "details_extra"

_CORE: tuple[tuple[str, pa.DataType], ...] = (
    ("asset_id", pa.string()),
    ("site_id", pa.string()),
    ("asset_type", pa.string()),
    ("ts", pa.timestamp("us", tz="UTC")),
    ("mw", pa.float64()),
    ("mw_setpoint", pa.float64()),
    ("online", pa.bool_()),
    ("status", pa.string()),
    ("fault_code", pa.string()),
    ("seq", pa.int64()),
    ("quality", pa.string()),
    ("quality_reason", pa.string()),
)
_SAMPLE_FIELDS = tuple(name for name, _ in _CORE if name != "asset_type")
_fields = operator.attrgetter(*_SAMPLE_FIELDS, "details")


def _holding(*kinds: type) -> Callable[[object], bool]:
    """Whether a value is exactly of one of ``kinds`` (``bool`` is not an ``int`` here)."""
    exact = frozenset(kinds)

    def holds(value: object) -> bool:
        return type(value) in exact

    return holds


_is_float = _holding(float, int)
_is_int = _holding(int)
_is_str = _holding(str)
_is_bool = _holding(bool)


# The Arrow type of a details field, and which values a column of it holds.
_BY_KIND: dict[type[msgspec.inspect.Type], tuple[pa.DataType, Callable[[object], bool]]] = {
    msgspec.inspect.FloatType: (pa.float64(), _is_float),
    msgspec.inspect.IntType: (pa.int64(), _is_int),
    msgspec.inspect.StrType: (pa.string(), _is_str),
    msgspec.inspect.BoolType: (pa.bool_(), _is_bool),
}


def _field_kind(annotation: msgspec.inspect.Type) -> type[msgspec.inspect.Type] | None:
    """The one scalar kind of a field (``float | None`` is float), or ``None``."""
    if isinstance(annotation, msgspec.inspect.UnionType):
        kinds = [t for t in annotation.types if not isinstance(t, msgspec.inspect.NoneType)]
        return _field_kind(kinds[0]) if len(kinds) == 1 else None
    kind = type(annotation)
    return kind if kind in _BY_KIND else None


@dataclass(frozen=True)
class _DetailColumn:
    field: str
    type: pa.DataType
    holds: Callable[[object], bool]


@dataclass(frozen=True)
class ExportSchema:
    """The export table for a set of asset types; build it with :meth:`for_asset_types`."""

    details: tuple[_DetailColumn, ...]

    @classmethod
    def for_asset_types(cls, asset_types: Iterable[AssetType]) -> ExportSchema:
        columns: dict[str, _DetailColumn] = {}
        clashes: set[str] = set()
        for asset_type in asset_types:
            info = msgspec.inspect.type_info(asset_type.details)
            if not isinstance(info, msgspec.inspect.StructType):
                continue
            for field in info.fields:
                kind = _field_kind(field.type)
                arrow_type, holds = _BY_KIND[kind] if kind else (pa.string(), _is_str)
                known = columns.get(field.encode_name)
                if known is not None and known.type != arrow_type:
                    clashes.add(field.encode_name)
                columns.setdefault(
                    field.encode_name, _DetailColumn(field.encode_name, arrow_type, holds)
                )
        # Two types with one field name of different types: no column, so no value is
        # converted to the other type's; their values go to details_extra.
        return cls(tuple(c for name, c in columns.items() if name not in clashes))

    @property
    def arrow(self) -> pa.Schema:
        """The Arrow schema of the table."""
        return pa.schema(
            [
                *(pa.field(name, kind) for name, kind in _CORE),
                *(pa.field(DETAILS_PREFIX + c.field, c.type) for c in self.details),
                pa.field(DETAILS_EXTRA, pa.string()),
            ]
        )

    def table(
        self, samples: Sequence[TelemetrySample], asset_types: Mapping[str, str] | None = None
    ) -> pa.Table:
        """``samples`` as a table of this schema, in their order.

        :param asset_types: the asset type of each asset id (the ``asset_type`` column);
            without it the column is empty.
        """
        types = asset_types or {}
        # One tuple per sample, transposed into one per column, both in C.
        fields: list[tuple[Any, ...]] = list(zip(*map(_fields, samples), strict=True)) or [
            () for _ in _SAMPLE_FIELDS
        ]
        columns: list[Sequence[Any]] = [
            fields[0],
            fields[1],
            [types.get(a) for a in fields[0]],
            *fields[2:-1],
        ]
        details, extras = _in_columns(self.details, fields[-1])
        return pa.Table.from_arrays(
            [
                *(pa.array(values, kind) for values, (_, kind) in zip(columns, _CORE, strict=True)),
                *details,
                pa.array(extras, pa.string()),
            ],
            schema=self.arrow,
        )


def _in_columns(
    columns: Sequence[_DetailColumn], all_details: Sequence[dict[str, Any]]
) -> tuple[list[pa.Array[Any]], list[str | None]]:
    """The ``details`` columns and ``details_extra`` of every sample, value by value: what
    a column holds goes there, anything else into the JSON of ``details_extra``."""
    index = {c.field: (i, c.holds) for i, c in enumerate(columns)}
    values: list[list[Any]] = [[None] * len(all_details) for _ in columns]
    extras: list[str | None] = [None] * len(all_details)
    for row, details in enumerate(all_details):
        left: dict[str, Any] | None = None
        for name, value in details.items():
            found = index.get(name)
            if found is not None and value is not None and found[1](value):
                values[found[0]][row] = value
            else:
                left = left or {}
                left[name] = value
        if left:
            extras[row] = json.dumps(left, separators=(",", ":"))
    return [pa.array(v, c.type) for v, c in zip(values, columns, strict=True)], extras


def samples_from_table(table: pa.Table) -> list[TelemetrySample]:
    """The samples of an export table (read back from Parquet or CSV): the inverse of
    :meth:`ExportSchema.table`."""
    rows = table.to_pylist()
    samples = []
    for row in rows:
        details = {
            name.removeprefix(DETAILS_PREFIX): value
            for name, value in row.items()
            if name.startswith(DETAILS_PREFIX) and name != DETAILS_EXTRA and value is not None
        }
        if row.get(DETAILS_EXTRA):
            details.update(json.loads(row[DETAILS_EXTRA]))
        samples.append(
            TelemetrySample(
                **{name: row[name] for name in _SAMPLE_FIELDS},
                details=details,
            )
        )
    return samples
