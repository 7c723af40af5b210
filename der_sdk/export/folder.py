"""The built-in continuous exporter ``parquet-folder``: every stored sample into Parquet
files under a folder, by day and site (docs/export.md).

Options (``HEADEND_EXPORTER_<NAME>_<OPTION>``):

* ``DIR`` (required): the folder; created if missing.

Each batch becomes one file per day and site it touches,
``DIR/date=YYYY-MM-DD/site=SITE/batch-<batch_id>.parquet``, written under a temporary
name and renamed. A batch given again (the headend stopped before it saved the cursor)
has the same id and the same samples, so it replaces its own files: the folder holds
every sample exactly once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from der_sdk.errors import DerSdkError
from der_sdk.extensions import ExportBatch, Exporter, ExporterContext, ExporterType
from der_sdk.plugins import hookimpl

if TYPE_CHECKING:
    from der_sdk.export.files import PartitionedFiles
    from der_sdk.models import TelemetrySample

__all__ = ["ParquetFolderExporter", "der_exporters", "read_folder"]

KNOWN_OPTIONS = frozenset({"dir"})


class ParquetFolderExporter(Exporter):
    def __init__(self, context: ExporterContext) -> None:
        unknown = sorted(set(context.options) - KNOWN_OPTIONS)
        if unknown:
            raise DerSdkError(
                f"exporter {context.name!r} (parquet-folder): unknown option "
                f"{context.variable(unknown[0])}; it takes {context.variable('dir')}"
            )
        folder = context.options.get("dir", "").strip()
        if not folder:
            raise DerSdkError(
                f"exporter {context.name!r} (parquet-folder) needs a folder: set "
                f"{context.variable('dir')}"
            )
        self.context = context
        self.dir = Path(folder)
        self._files: PartitionedFiles | None = None

    async def start(self) -> None:
        from der_sdk.export.files import PartitionedFiles
        from der_sdk.export.schema import ExportSchema

        try:
            await asyncio.to_thread(self.dir.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise DerSdkError(
                f"exporter {self.context.name!r}: cannot create {self.dir} "
                f"({self.context.variable('dir')}): {exc.strerror}"
            ) from None
        schema = ExportSchema.for_asset_types(self.context.asset_types)
        self._files = PartitionedFiles(
            self.dir, "parquet", schema, dict(self.context.asset_type_of)
        )

    async def export(self, batch: ExportBatch) -> None:
        if self._files is None:
            raise RuntimeError("export() before start()")
        await asyncio.to_thread(
            self._files.write_partitions, batch.samples, f"batch-{batch.batch_id}"
        )


@hookimpl
def der_exporters() -> list[ExporterType]:
    return [
        ExporterType(
            name="parquet-folder",
            factory=ParquetFolderExporter,
            description="Parquet files by day and site under a folder "
            "(HEADEND_EXPORTER_<NAME>_DIR)",
        )
    ]


def read_folder(folder: Path) -> list[TelemetrySample]:
    """The samples in a folder the ``parquet-folder`` exporter writes (``date=``/``site=``
    partitions), in no particular order: to check an export or load it back. Empty when
    the folder does not exist or holds no Parquet file yet. Reads it whole: for a large
    lake, query it with pyarrow or DuckDB instead."""
    if not folder.exists() or not any(folder.rglob("*.parquet")):
        return []
    import pyarrow.dataset as ds

    from der_sdk.export.schema import samples_from_table

    table = ds.dataset(folder, format="parquet", partitioning="hive").to_table()
    return samples_from_table(table.drop_columns(["date", "site"]))
