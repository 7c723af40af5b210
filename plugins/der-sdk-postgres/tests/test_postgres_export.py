"""Telemetry export on PostgreSQL (docs/export.md): ``der export`` reads a range through a
server-side cursor and writes it row for row; a continuous exporter reads in commit order
(held back at the oldest running transaction), so concurrent writers and a restart lose
and repeat nothing."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pyarrow.csv as pa_csv
import pyarrow.dataset as ds
import pytest
from der_sdk_postgres import PostgresStorage
from postgres_kit import T0, samples

from der_sdk.backoff import Backoff
from der_sdk.cli import main
from der_sdk.export.schema import ExportSchema, samples_from_table
from der_sdk.models import TelemetrySample
from der_sdk.plugins import load_plugins
from der_sdk.testing import waits
from der_sdk_headend.config import ExporterConfig
from der_sdk_headend.exporters import ExporterRunner


def _read(folder: Path, fmt: str) -> list[TelemetrySample]:
    plugins = load_plugins(entry_points=False, env={})
    arrow = ExportSchema.for_asset_types(
        plugins.asset_types.get(n) for n in plugins.asset_types.names()
    ).arrow
    file_format: ds.FileFormat = ds.ParquetFileFormat()
    if fmt == "csv":
        options = pa_csv.ConvertOptions(
            column_types={f.name: f.type for f in arrow}, strings_can_be_null=True
        )
        file_format = ds.CsvFileFormat(convert_options=options)
    if not folder.exists():
        return []
    table = ds.dataset(folder, format=file_format, partitioning="hive", schema=arrow).to_table()
    return samples_from_table(table)


def _key(sample: TelemetrySample) -> tuple[str, object]:
    return (sample.asset_id, sample.ts)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
async def test_der_export_from_postgresql_matches_storage_row_for_row(
    storage: PostgresStorage, postgres_url: str, tmp_path: Path, fmt: str
) -> None:
    stored = samples(3000, assets=7, step_s=600)  # 7 assets, 2.9 days
    await storage.append_telemetry(stored)
    start, end = T0 + timedelta(hours=5), T0 + timedelta(days=2)

    code = await asyncio.to_thread(
        main,
        ["export", "--from", start.isoformat(), "--to", end.isoformat(), "--format", fmt,
         "--out", str(tmp_path / "out"), "--database-url", postgres_url, "--page-size", "500"],
    )  # fmt: skip

    assert code == 0
    wanted = [s for s in stored if start <= s.ts < end]
    assert sorted(_read(tmp_path / "out", fmt), key=_key) == sorted(wanted, key=_key)
    days = {p.parent.parent.name for p in (tmp_path / "out").rglob(f"*.{fmt}")}
    assert days == {"date=2024-06-01", "date=2024-06-02", "date=2024-06-03"}


async def test_a_continuous_exporter_on_postgresql_catches_up_exactly_once_beside_writers(
    storage: PostgresStorage, tmp_path: Path
) -> None:
    folder = tmp_path / "lake"

    def make_runner() -> ExporterRunner:
        made = ExporterRunner(
            storage,
            load_plugins(entry_points=False, env={}),
            [ExporterConfig(name="lake", type="parquet-folder", options={"dir": str(folder)})],
            asset_type_of={},
            batch_rows=200,
            interval_s=0.02,
            backoff=Backoff(initial_s=0.05, max_s=0.1, jitter=0),
        )
        made.build()
        return made

    stored = samples(4000, assets=20)
    chunks = [stored[i : i + 100] for i in range(0, len(stored), 100)]
    exporters = make_runner()
    exporters.start()
    # Four writers at once: their transactions commit in any order.
    await asyncio.gather(*(storage.append_telemetry(c) for c in chunks[:20]))
    await exporters.close()  # down ...
    await asyncio.gather(*(storage.append_telemetry(c) for c in chunks[20:]))  # ... meanwhile
    again = make_runner()
    again.start()

    async def all_exported() -> bool:
        return len(await asyncio.to_thread(_read, folder, "parquet")) >= len(stored)

    await waits.wait_until(all_exported, "every sample exported", timeout_s=30)
    await asyncio.sleep(0.2)
    await again.close()
    got = await asyncio.to_thread(_read, folder, "parquet")
    assert len(got) == len(stored)
    assert sorted(got, key=_key) == sorted(stored, key=_key)
