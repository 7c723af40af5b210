"""Trends for the console's Asset page: an asset's history over a range, downsampled on
the server into at most ``max_points`` buckets of min/max/avg per series.

A short range is read from storage in one go (up to :data:`DIRECT_LIMIT` samples) and every
sample counts. A longer one would mean reading hundreds of thousands of rows (a week at one
sample a second is 604,800), so it is read per bucket instead, each bucket's newest
:data:`PER_BUCKET_LIMIT` samples: the figures of a bucket that held more are then from its
newest samples only, and the answer says so (``sampled``). The storage contract has no
aggregate query yet; one (``GROUP BY`` a time bucket in SQL) would make long ranges exact.

Series: ``mw``, ``mw_setpoint`` and the asset type's numeric ``details`` (``soc_pct`` for a
battery, ...), plus any other numeric detail the samples carry.
"""

from __future__ import annotations

import asyncio
import math
import re
import types
import typing
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgspec

from der_sdk.models import TelemetrySample

if TYPE_CHECKING:
    from der_sdk.storage.contract import StorageBackend

__all__ = [
    "DEFAULT_POINTS",
    "DIRECT_LIMIT",
    "MAX_POINTS",
    "MAX_RANGE",
    "PER_BUCKET_LIMIT",
    "RANGES",
    "Series",
    "Trend",
    "downsample",
    "numeric_detail_fields",
    "parse_range",
    "read_trend",
]

MAX_POINTS = 1_000
"""The most buckets (chart points) a trend has, whatever the range."""
MIN_POINTS = 10
DEFAULT_POINTS = 600
DIRECT_LIMIT = 20_000
"""Samples read in one query; a range holding more is read per bucket."""
PER_BUCKET_LIMIT = 30
"""Samples read per bucket of a long range (its newest)."""
READ_CONCURRENCY = 4
RANGES: dict[str, timedelta] = {
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
}
"""The ranges the Asset page offers (``range=``); anything else is ``start``/``end``."""
MAX_RANGE = timedelta(days=366)

CORE_SERIES = ("mw", "mw_setpoint")


class Series(msgspec.Struct, kw_only=True):
    """One quantity per bucket: ``None`` where the bucket has no value of it."""

    min: list[float | None]
    max: list[float | None]
    avg: list[float | None]


class Trend(msgspec.Struct, kw_only=True):
    """An asset's history over ``[start, end)`` in buckets of ``bucket_s`` seconds.

    ``t`` holds the start of each bucket that has samples (Unix seconds; empty buckets are
    left out), and every series has one value per ``t``. ``samples`` is how many samples the
    figures are made of; ``sampled`` is true when long-range reading took only each bucket's
    newest samples (:data:`PER_BUCKET_LIMIT`).
    """

    asset_id: str
    start: datetime
    end: datetime
    bucket_s: float
    t: list[float]
    series: dict[str, Series]
    samples: int
    sampled: bool = False


def parse_range(
    range_name: str | None,
    start: datetime | None,
    end: datetime | None,
    now: datetime,
) -> tuple[datetime, datetime]:
    """The ``[start, end)`` of the query: a named ``range`` ending now (or at ``end``), or
    ``start``/``end`` (``end`` defaults to now).

    :raises ValueError: an unknown range name, ``start`` not before ``end``, a range longer
        than :data:`MAX_RANGE`, or neither a range nor a start; the message names the
        parameter.
    """
    end = _utc(end) if end is not None else now
    if range_name:
        span = RANGES.get(range_name)
        if span is None:
            raise ValueError(f"range: {range_name!r} is not one of {', '.join(RANGES)}")
        if start is not None:
            raise ValueError("range and start: give one of them, not both")
        start = end - span
    elif start is None:
        raise ValueError(f"give range ({', '.join(RANGES)}) or start (and end)")
    start = _utc(start)
    if start >= end:
        raise ValueError(f"start {start.isoformat()} is not before end {end.isoformat()}")
    if end - start > MAX_RANGE:
        raise ValueError(f"the range is longer than {MAX_RANGE.days} days")
    return start, end


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def bucket_width_s(start: datetime, end: datetime, max_points: int) -> float:
    """Seconds per bucket so that ``[start, end)`` makes at most ``max_points`` buckets:
    a whole number of seconds (at least one), so bucket edges are round."""
    span = (end - start).total_seconds()
    return float(max(1, math.ceil(span / max_points)))


def numeric_detail_fields(details: type[msgspec.Struct] | None) -> list[str]:
    """The fields of an asset type's ``details`` whose values are numbers, in order."""
    if details is None:
        return []
    names: list[str] = []
    hints = typing.get_type_hints(details, include_extras=True)
    for field in msgspec.structs.fields(details):
        if _is_numeric(hints.get(field.name, field.type)):
            names.append(field.name)
    return names


def _is_numeric(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        return _is_numeric(typing.get_args(hint)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return bool(args) and all(_is_numeric(a) for a in args)
    return hint in (int, float)


_NUMBER = (int, float)


def _value(sample: TelemetrySample, name: str) -> float | None:
    if name == "mw":
        return sample.mw
    if name == "mw_setpoint":
        return sample.mw_setpoint
    value = sample.details.get(name)
    if isinstance(value, bool) or not isinstance(value, _NUMBER):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def downsample(
    asset_id: str,
    samples: Iterable[TelemetrySample],
    start: datetime,
    end: datetime,
    *,
    max_points: int = DEFAULT_POINTS,
    details: Sequence[str] = (),
    sampled: bool = False,
) -> Trend:
    """Bucket ``samples`` of ``[start, end)`` into at most ``max_points`` buckets with the
    min, max and average of each series; samples outside the range are ignored.

    :param details: the detail series to include first (the type's numeric fields); any
        other numeric detail found in the samples follows, in the order first seen.
    """
    if not MIN_POINTS <= max_points <= MAX_POINTS:
        raise ValueError(f"points: {max_points} is not between {MIN_POINTS} and {MAX_POINTS}")
    width = bucket_width_s(start, end, max_points)
    origin = start.timestamp()
    stop = end.timestamp()
    names: list[str] = [*CORE_SERIES, *(d for d in details if d not in CORE_SERIES)]
    known = set(names)
    # bucket index -> series name -> [min, max, sum, count]
    buckets: dict[int, dict[str, list[float]]] = {}
    count = 0
    for sample in samples:
        at = sample.ts.timestamp()
        if not origin <= at < stop:
            continue
        count += 1
        index = int((at - origin) // width)
        acc = buckets.setdefault(index, {})
        for key, value in sample.details.items():
            if key not in known and isinstance(value, _NUMBER) and not isinstance(value, bool):
                names.append(key)
                known.add(key)
        for name in names:
            number = _value(sample, name)
            if number is None:
                continue
            cell = acc.get(name)
            if cell is None:
                acc[name] = [number, number, number, 1.0]
            else:
                if number < cell[0]:
                    cell[0] = number
                if number > cell[1]:
                    cell[1] = number
                cell[2] += number
                cell[3] += 1
    order = sorted(buckets)
    series: dict[str, Series] = {}
    for name in names:
        lo: list[float | None] = []
        hi: list[float | None] = []
        avg: list[float | None] = []
        for index in order:
            cell = buckets[index].get(name)
            if cell is None:
                lo.append(None)
                hi.append(None)
                avg.append(None)
            else:
                lo.append(cell[0])
                hi.append(cell[1])
                avg.append(cell[2] / cell[3])
        if name in CORE_SERIES or any(v is not None for v in avg):
            series[name] = Series(min=lo, max=hi, avg=avg)
    return Trend(
        asset_id=asset_id,
        start=start,
        end=end,
        bucket_s=width,
        t=[origin + index * width for index in order],
        series=series,
        samples=count,
        sampled=sampled,
    )


async def read_trend(
    storage: StorageBackend,
    asset_id: str,
    start: datetime,
    end: datetime,
    *,
    max_points: int = DEFAULT_POINTS,
    details: Sequence[str] = (),
) -> Trend:
    """:func:`downsample` of what storage holds for ``asset_id`` in ``[start, end)``: one
    read when the range holds at most :data:`DIRECT_LIMIT` samples, else one read of the
    newest :data:`PER_BUCKET_LIMIT` samples per bucket (``sampled``)."""
    first = await storage.telemetry_history(asset_id, start, end, limit=DIRECT_LIMIT)
    if len(first) < DIRECT_LIMIT:
        return downsample(asset_id, first, start, end, max_points=max_points, details=details)
    width = timedelta(seconds=bucket_width_s(start, end, max_points))
    edges: list[tuple[datetime, datetime]] = []
    at = start
    while at < end:
        edges.append((at, min(at + width, end)))
        at += width
    limit = asyncio.Semaphore(READ_CONCURRENCY)

    async def bucket(lo: datetime, hi: datetime) -> list[TelemetrySample]:
        async with limit:
            return await storage.telemetry_history(asset_id, lo, hi, limit=PER_BUCKET_LIMIT)

    parts = await asyncio.gather(*(bucket(lo, hi) for lo, hi in edges))
    samples = [s for part in parts for s in part]
    return downsample(
        asset_id, samples, start, end, max_points=max_points, details=details, sampled=True
    )


_ISO_Z = re.compile(r"Z$")


def parse_time(value: str, name: str) -> datetime:
    """An ISO 8601 time from a query parameter (``Z`` allowed; naive means UTC).

    :raises ValueError: not a time; the message names ``name``.
    """
    try:
        return _utc(datetime.fromisoformat(_ISO_Z.sub("+00:00", value.strip())))
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not an ISO 8601 time") from None
