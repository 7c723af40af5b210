"""Telemetry export speed: stored samples per second from PostgreSQL into Parquet files
(``der export``'s path: a server-side cursor read page by page, rows to Arrow with typed
``details`` columns, zstd Parquet files by day and site), beside a plain
``COPY (SELECT ...) TO STDOUT`` of the same rows in the same run, written to a file.

The COPY is the floor of reading those rows out of the server at all; the ratio says
what the conversion to samples, to Arrow and to Parquet costs on top (docs/export.md).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from datetime import UTC, datetime, timedelta

from bench.common import Context, Figure, drop_database, fresh_database, postgres_url
from der_sdk.models import TelemetrySample
from der_sdk.storage.contract import TELEMETRY_COLUMNS

__all__ = ["run"]

T0 = datetime(2025, 1, 1, tzinfo=UTC)
ASSETS = 200
SITES = 10


def _samples(rows: int) -> list[TelemetrySample]:
    """``rows`` battery samples: 200 assets on 10 sites, one a second each."""
    return [
        TelemetrySample(
            asset_id=f"bess-{i % ASSETS:04d}",
            site_id=f"site-{i % SITES:02d}",
            ts=T0 + timedelta(seconds=i // ASSETS),
            mw=(i % 41) / 10 - 2.0,
            mw_setpoint=1.0,
            seq=i,
            details={"soc_pct": 20.0 + i % 60, "soh_pct": 98.5, "inverter_temp_c": 31.5},
        )
        for i in range(rows)
    ]


async def run(ctx: Context) -> list[Figure]:
    admin = postgres_url()
    if admin is None:
        ctx.say("PostgreSQL not reachable on 127.0.0.1:5432; skipped")
        return []
    import asyncpg
    from der_sdk_postgres import PostgresStorage

    from der_sdk.export.range import export_range
    from der_sdk.export.schema import ExportSchema
    from der_sdk.plugins import load_plugins

    rows = 5_000 if ctx.quick else 400_000
    db = "der_bench_export"
    url = await fresh_database(admin, db)
    storage = PostgresStorage.from_url(url)
    try:
        await storage.open()
        stored = _samples(rows)
        for start in range(0, rows, 20_000):
            await storage.append_telemetry(stored[start : start + 20_000])
        del stored
        end = T0 + timedelta(seconds=rows // ASSETS + 1)
        ctx.say(f"{rows:,} samples of {ASSETS} assets on {SITES} sites stored")

        conn = await asyncpg.connect(url)
        try:
            await conn.execute("VACUUM ANALYZE telemetry")
            copy_file = ctx.scratch("export-copy") / "telemetry.csv"
            began = time.perf_counter()
            await conn.copy_from_query(
                f"SELECT {', '.join(TELEMETRY_COLUMNS)} FROM telemetry"
                " WHERE ts >= $1 AND ts < $2 ORDER BY ts, asset_id",
                T0,
                end,
                output=str(copy_file),
                format="csv",
            )
            copy_s = time.perf_counter() - began
        finally:
            await conn.close()
        copy_rate = rows / copy_s
        ctx.say(f"COPY TO: {copy_rate:,.0f} rows/s ({copy_s:.2f} s)")

        plugins = load_plugins()
        schema = ExportSchema.for_asset_types(
            plugins.asset_types.get(n) for n in plugins.asset_types.names()
        )
        out = ctx.scratch("export-parquet") / "out"
        await asyncio.to_thread(shutil.rmtree, out, True)
        began = time.perf_counter()
        summary = await export_range(storage, out, start=T0, end=end, fmt="parquet", schema=schema)
        export_s = time.perf_counter() - began
    finally:
        await storage.close()
        await drop_database(admin, db)
    if summary.rows != rows:
        raise RuntimeError(f"exported {summary.rows} rows of {rows}")
    rate = rows / export_s
    ctx.say(f"export to Parquet: {rate:,.0f} rows/s ({export_s:.2f} s, {len(summary.files)} files)")
    return [
        Figure(
            name="PostgreSQL export to Parquet",
            value=round(rate),
            unit="rows/s",
            goal="none: the cost of samples, Arrow and Parquet over a bare COPY",
            met=None,
            raw=round(copy_rate),
            raw_label="COPY (SELECT ... ORDER BY ts) TO STDOUT, csv to a file",
            ratio=round(rate / copy_rate, 3),
            details={"rows": rows, "assets": ASSETS, "sites": SITES, "files": len(summary.files)},
        )
    ]
