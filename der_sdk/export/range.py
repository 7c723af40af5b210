"""Range export: a time range of stored telemetry into files by day and site."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from der_sdk.errors import DerSdkError
from der_sdk.export.files import ExportFormat, PartitionedFiles, check_output_dir
from der_sdk.export.schema import ExportSchema
from der_sdk.storage.contract import EXPORT_PAGE_ROWS, StorageBackend

__all__ = ["ExportSummary", "check_range", "export_range", "parse_export_time"]


@dataclass(frozen=True)
class ExportSummary:
    rows: int
    files: list[Path]


def parse_export_time(value: str, option: str) -> datetime:
    """``value`` (ISO 8601: a date, or a date and time) as an aware UTC datetime; without a
    time zone it is UTC.

    :raises DerSdkError: naming ``option`` when ``value`` is not a time.
    """
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise DerSdkError(
            f"{option} {value!r} is not an ISO 8601 date or time "
            "(for example 2024-06-01 or 2024-06-01T12:00:00Z)"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def check_range(start: datetime, end: datetime) -> None:
    """:raises DerSdkError: the range is empty or backwards, naming both ends."""
    if start.tzinfo is None or end.tzinfo is None:
        raise DerSdkError("export range: give times with a time zone (or Z for UTC)")
    if end <= start:
        raise DerSdkError(
            f"export range: --to {end.isoformat()} must be after --from {start.isoformat()}"
        )


async def export_range(
    storage: StorageBackend,
    out: Path,
    *,
    start: datetime,
    end: datetime,
    fmt: ExportFormat,
    schema: ExportSchema,
    site_id: str | None = None,
    asset_id: str | None = None,
    asset_types: Mapping[str, str] | None = None,
    page_size: int = EXPORT_PAGE_ROWS,
    max_buffered_rows: int | None = None,
) -> ExportSummary:
    """Write every stored sample with ``start <= ts < end`` (of one site or asset when
    given) under ``out``, partitioned by day and site.

    Memory holds two pages of ``page_size`` samples from storage (one read while the one
    before is written) and at most ``max_buffered_rows`` (default: 10 pages) waiting to be
    written.

    :raises DerSdkError: a bad range or output folder (:func:`check_range`,
        :func:`~der_sdk.export.files.check_output_dir`).
    """
    check_range(start, end)
    await asyncio.to_thread(check_output_dir, out)
    files = PartitionedFiles(
        out,
        fmt,
        schema,
        dict(asset_types or {}),
        max_buffered_rows=max_buffered_rows or 10 * page_size,
    )
    # One page is written (on a thread) while storage reads the next: two pages at most.
    writing: asyncio.Future[None] | None = None
    try:
        async for page in storage.telemetry_pages(
            start, end, site_id=site_id, asset_id=asset_id, page_size=page_size
        ):
            if writing is not None:
                await writing
            writing = asyncio.ensure_future(asyncio.to_thread(files.add, page))
    finally:
        if writing is not None:
            await writing
    await asyncio.to_thread(files.close)
    return ExportSummary(files.rows, files.files)
