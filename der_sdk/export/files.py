"""Writing export tables: Parquet or CSV files partitioned by day and site, or one stream.

Partitioned files follow the Hive layout that Spark, DuckDB, pandas and most data lakes
read as columns ``date`` and ``site``::

    OUT/date=2024-06-01/site=SITE/part-00000.parquet

``SITE`` is the site id with every character but letters, digits, ``-``, ``_`` and ``.``
percent-encoded (as Hive does). Every file is written under a temporary name and renamed
when complete, so a reader never sees half a file. Blocking work (Arrow, files) runs in
these classes; the async callers hand it to a thread.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import IO, Literal, cast
from urllib.parse import quote

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from der_sdk.errors import DerSdkError
from der_sdk.export.schema import ExportSchema
from der_sdk.models import TelemetrySample

__all__ = [
    "FORMATS",
    "ExportFormat",
    "ExportStream",
    "PartitionedFiles",
    "check_output_dir",
    "partition_path",
]

ExportFormat = Literal["parquet", "csv"]
FORMATS: tuple[ExportFormat, ...] = ("parquet", "csv")

MEDIA_TYPES: Mapping[ExportFormat, str] = {
    "parquet": "application/vnd.apache.parquet",
    "csv": "text/csv; charset=utf-8",
}

MAX_BUFFERED_ROWS = 50_000
"""Rows :class:`PartitionedFiles` holds before it writes the largest partition's rows."""


def partition_path(sample: TelemetrySample) -> str:
    """``date=YYYY-MM-DD/site=SITE`` of a sample (its UTC day and its site)."""
    return _partition_dir(_partition(sample))


def _partition(sample: TelemetrySample) -> tuple[date, str]:
    return sample.ts.date(), sample.site_id


def _partition_dir(partition: tuple[date, str]) -> str:
    day, site = partition
    return f"date={day.isoformat()}/site={quote(site, safe='-_.')}"


def check_output_dir(out: Path) -> None:
    """Create ``out`` if needed and check that an export can write there.

    :raises DerSdkError: ``out`` is a file, is not writable, or already holds files (an
        export writes into an empty folder, so two exports never mix).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DerSdkError(f"output {out} is a file, not a folder; give a folder") from None
    except OSError as exc:
        raise DerSdkError(f"cannot create output folder {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise DerSdkError(f"output folder {out} is not writable")
    if any(out.iterdir()):
        raise DerSdkError(f"output folder {out} is not empty; export into an empty or new folder")


def _write_table(table: pa.Table, path: Path, fmt: ExportFormat) -> None:
    """Write ``table`` to ``path`` under a temporary name, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    if fmt == "parquet":
        pq.write_table(table, temporary, compression="zstd")
    else:
        pa_csv.write_csv(table, temporary)
    temporary.replace(path)


@dataclass
class PartitionedFiles:
    """Export tables written under ``out`` by day and site, in bounded memory.

    :meth:`add` buffers samples per partition; when more than ``max_buffered_rows`` are
    held, the largest partition's are written as its next part file. :meth:`close` writes
    the rest. Samples may arrive in any order; in time order each partition ends up in
    as few files as memory allows.
    """

    out: Path
    fmt: ExportFormat
    schema: ExportSchema
    asset_types: Mapping[str, str] = field(default_factory=dict)
    max_buffered_rows: int = MAX_BUFFERED_ROWS
    files: list[Path] = field(default_factory=list)
    rows: int = 0
    _buffers: dict[tuple[date, str], list[TelemetrySample]] = field(default_factory=dict)
    _parts: dict[tuple[date, str], int] = field(default_factory=dict)
    _buffered: int = 0

    def add(self, samples: Sequence[TelemetrySample]) -> None:
        for sample in samples:
            self._buffers.setdefault(_partition(sample), []).append(sample)
        self._buffered += len(samples)
        while self._buffered > self.max_buffered_rows:
            self._flush(max(self._buffers, key=lambda p: len(self._buffers[p])))

    def write_partitions(self, samples: Sequence[TelemetrySample], name: str) -> list[Path]:
        """Write ``samples`` at once, one file called ``name`` per partition (replacing
        one of that name): the same samples under the same name give the same files."""
        by_partition: dict[tuple[date, str], list[TelemetrySample]] = {}
        for sample in samples:
            by_partition.setdefault(_partition(sample), []).append(sample)
        written = []
        for partition, rows in by_partition.items():
            path = self.out / _partition_dir(partition) / f"{name}.{self.fmt}"
            _write_table(self.schema.table(rows, self.asset_types), path, self.fmt)
            written.append(path)
        self.rows += len(samples)
        self.files += written
        return written

    def _flush(self, partition: tuple[date, str]) -> None:
        rows = self._buffers.pop(partition)
        part = self._parts.get(partition, 0)
        self._parts[partition] = part + 1
        path = self.out / _partition_dir(partition) / f"part-{part:05d}.{self.fmt}"
        _write_table(self.schema.table(rows, self.asset_types), path, self.fmt)
        self._buffered -= len(rows)
        self.rows += len(rows)
        self.files.append(path)

    def close(self) -> None:
        for partition in sorted(self._buffers):
            self._flush(partition)


class _Drain(io.RawIOBase):
    """A write-only file that keeps what is written until :meth:`take` hands it out."""

    def __init__(self) -> None:
        super().__init__()
        self._chunks: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = bytes(data)
        self._chunks.append(chunk)
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def take(self) -> bytes:
        data, self._chunks = b"".join(self._chunks), []
        return data


class ExportStream:
    """One Parquet or CSV file made page by page, for an HTTP response: :meth:`write`
    returns the bytes ready after each page (a Parquet row group, or CSV lines with the
    header first), :meth:`close` the rest (Parquet's footer)."""

    def __init__(
        self,
        fmt: ExportFormat,
        schema: ExportSchema,
        asset_types: Mapping[str, str] | None = None,
    ) -> None:
        self.fmt = fmt
        self.schema = schema
        self.asset_types = asset_types or {}
        self.rows = 0
        self._drain = _Drain()
        self._sink = pa.PythonFile(self._drain, mode="w")
        self._parquet: pq.ParquetWriter | None = None
        self._csv: pa_csv.CSVWriter | None = None

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.fmt]

    def write(self, samples: Sequence[TelemetrySample]) -> bytes:
        table = self.schema.table(samples, self.asset_types)
        self._writer().write_table(table)
        self.rows += len(samples)
        return self._drain.take()

    def _writer(self) -> pq.ParquetWriter | pa_csv.CSVWriter:
        if self.fmt == "parquet":
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self._sink, self.schema.arrow, compression="zstd")
            return self._parquet
        if self._csv is None:
            # A NativeFile is a file-like object too; the stubs only say IO.
            self._csv = pa_csv.CSVWriter(cast("IO[bytes]", self._sink), self.schema.arrow)
        return self._csv

    def close(self) -> bytes:
        """The last bytes; an export of no rows is still a valid file (the header, or a
        Parquet file of no rows)."""
        self._writer().close()
        return self._drain.take()
