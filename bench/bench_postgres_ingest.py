#!/usr/bin/env python
"""Telemetry ingest into PostgreSQL: the der-sdk-postgres plugin beside raw asyncpg.

Measured in one run, on one fresh database, against tables with the same columns and
indexes (primary key ``(asset_id, ts)`` and a BRIN index on ``ts``):

* ``plain_copy``: binary COPY straight into the table (no dedupe; the ceiling).
* ``raw_staging``: COPY into a temporary staging table, then ``INSERT ... SELECT ...
  ON CONFLICT DO NOTHING``, from ready-made tuples (the design's reference).
* ``plugin``: :meth:`PostgresStorage.append_telemetry` from ``TelemetrySample`` objects,
  the path the headend takes (conversion, validation, the same staging and dedupe).
* ``plugin_resend``: the same samples again, all duplicates (what a reconnecting agent's
  re-sent buffer costs).

Each runs with 1 and 2 concurrent writers (one connection each). The plugin's stored
samples/s is printed beside the raw figure as a ratio, and everything is written as JSON to
``bench/results/`` (git-ignored). This is a benchmark, not a test: nothing here asserts a
speed. ``--quick`` runs a small load (the smoke test uses it).

    .venv/bin/python bench/bench_postgres_ingest.py [--rows 200000] [--batch 5000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
from der_sdk_postgres import PostgresStorage
from der_sdk_postgres.testing import admin_url, database_url

from der_sdk.models import TelemetrySample
from der_sdk.storage.contract import TELEMETRY_COLUMNS

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = TELEMETRY_COLUMNS
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def make_samples(rows: int, assets: int) -> list[TelemetrySample]:
    return [
        TelemetrySample(
            asset_id=f"{i % assets:08d}-0000-4000-8000-000000000000",
            site_id="11111111-1111-4111-8111-111111111111",
            ts=T0 + timedelta(seconds=i // assets),
            mw=round((i % 200) / 100 - 1.0, 3),
            mw_setpoint=0.5,
            seq=i,
            details={"soc_pct": 40.0 + i % 50, "soh_pct": 98.5, "energy_mwh": 1.25},
        )
        for i in range(rows)
    ]


def as_tuples(samples: Sequence[TelemetrySample]) -> list[tuple[Any, ...]]:
    """Ready-made COPY rows (details pre-encoded), what a raw benchmark starts from."""
    return [
        (
            s.asset_id,
            s.site_id,
            s.ts,
            s.mw,
            s.mw_setpoint,
            s.online,
            s.status,
            s.fault_code,
            s.seq,
            s.quality,
            s.quality_reason,
            json.dumps(s.details),
        )
        for s in samples
    ]


def batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def plain_copy(conns: Sequence[asyncpg.Connection], k: int, rows: Sequence[Any]) -> int:
    await conns[k].copy_records_to_table("telemetry_plain", records=rows, columns=COLUMNS)
    return len(rows)


async def raw_staging(conns: Sequence[asyncpg.Connection], k: int, rows: Sequence[Any]) -> int:
    conn = conns[k]
    async with conn.transaction():
        await conn.copy_records_to_table("staging", records=rows, columns=COLUMNS)
        status = await conn.execute(
            f"INSERT INTO telemetry_raw ({', '.join(COLUMNS)}) SELECT * FROM staging"
            " ON CONFLICT (asset_id, ts) DO NOTHING"
        )
    return int(status.rpartition(" ")[2])


async def append_through_plugin(
    storage: PostgresStorage, k: int, samples: Sequence[TelemetrySample]
) -> int:
    return await storage.append_telemetry(samples)


async def timed(
    writers: int, work: Sequence[Sequence[Any]], write: Callable[[int, Any], Awaitable[int]]
) -> tuple[float, int]:
    """Run ``write(worker, batch)`` over ``work`` with ``writers`` workers; seconds, rows."""

    async def worker(k: int) -> int:
        return sum([await write(k, batch) for batch in work[k::writers]])

    start = time.perf_counter()
    stored = sum(await asyncio.gather(*(worker(k) for k in range(writers))))
    return time.perf_counter() - start, stored


async def run(
    rows: int, batch: int, assets: int, writers_list: Sequence[int], repeat: int
) -> dict[str, Any]:
    name = f"der_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_url())
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = database_url(name)
    results: list[dict[str, Any]] = []
    try:
        storage = PostgresStorage.from_url(f"{url}?batch_size={batch}&pool_max={max(writers_list)}")
        await storage.open()
        server_version = await storage.pool.fetchval("SHOW server_version")
        setup = await asyncpg.connect(url)
        await setup.execute(
            "CREATE TABLE telemetry_plain (LIKE telemetry INCLUDING ALL);"
            " CREATE TABLE telemetry_raw (LIKE telemetry INCLUDING ALL)"
        )
        await setup.close()

        samples = make_samples(rows, assets)
        tuples = as_tuples(samples)
        sample_work, tuple_work = batches(samples, batch), batches(tuples, batch)

        # Methods interleave within each round, so a noisy neighbour hurts them alike.
        for round_ in range(1, repeat + 1):
            for writers in writers_list:
                conns = [await asyncpg.connect(url) for _ in range(writers)]
                for conn in conns:
                    # The sample's columns only, as the plugin's own staging table.
                    await conn.execute(
                        "CREATE TEMPORARY TABLE staging ON COMMIT DELETE ROWS AS"
                        f" SELECT {', '.join(COLUMNS)} FROM telemetry WITH NO DATA"
                    )
                try:
                    await conns[0].execute("TRUNCATE telemetry_plain, telemetry_raw")
                    await storage.reset()
                    plugin = partial(append_through_plugin, storage)
                    for method, work, write in (
                        ("plain_copy", tuple_work, partial(plain_copy, conns)),
                        ("raw_staging", tuple_work, partial(raw_staging, conns)),
                        ("plugin", sample_work, plugin),
                        ("plugin_resend", sample_work, plugin),
                    ):
                        seconds, stored = await timed(writers, work, write)
                        results.append(
                            {
                                "round": round_,
                                "method": method,
                                "writers": writers,
                                "rows": rows,
                                "stored": stored,
                                "seconds": round(seconds, 4),
                                "rows_per_s": round(rows / seconds),
                            }
                        )
                finally:
                    for conn in conns:
                        await conn.close()
        await storage.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

    summary: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    for writers in writers_list:
        medians: dict[str, float] = {}
        for method in ("plain_copy", "raw_staging", "plugin", "plugin_resend"):
            runs = [r for r in results if r["writers"] == writers and r["method"] == method]
            medians[method] = statistics.median(r["rows_per_s"] for r in runs)
            summary.append(
                {
                    "method": method,
                    "writers": writers,
                    "median_rows_per_s": round(medians[method]),
                    "stored": runs[0]["stored"],
                }
            )
        ratios[str(writers)] = round(medians["plugin"] / medians["raw_staging"], 3)
    return {
        "benchmark": "postgres_ingest",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "asyncpg": asyncpg.__version__,
            "postgresql": server_version,
        },
        "params": {
            "rows": rows,
            "batch": batch,
            "assets": assets,
            "writers": list(writers_list),
            "repeat": repeat,
        },
        "summary": summary,
        "results": results,
        "plugin_vs_raw_staging": ratios,
    }


def print_report(report: dict[str, Any]) -> None:
    print(
        f"{report['params']['rows']} samples, batches of {report['params']['batch']}, "
        f"{report['params']['assets']} assets, PostgreSQL {report['machine']['postgresql']}, "
        f"{report['machine']['cpus']} CPUs"
    )
    print(f"median of {report['params']['repeat']} round(s)")
    print(f"{'method':<15} {'writers':>7} {'rows/s':>10} {'stored':>8}")
    for r in report["summary"]:
        print(f"{r['method']:<15} {r['writers']:>7} {r['median_rows_per_s']:>10,} {r['stored']:>8}")
    for writers, ratio in report["plugin_vs_raw_staging"].items():
        print(f"plugin / raw COPY->staging->ON CONFLICT, {writers} writer(s): {ratio:.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="samples per method")
    parser.add_argument("--batch", type=int, default=5000, help="samples per append call")
    parser.add_argument("--assets", type=int, default=100, help="distinct asset ids")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--quick", action="store_true", help="a small load, for smoke tests")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result")
    ns = parser.parse_args(argv)
    rows = 5000 if ns.quick else ns.rows
    batch = min(ns.batch, 1000) if ns.quick else ns.batch
    repeat = 1 if ns.quick else max(ns.repeat, 1)
    report = asyncio.run(run(rows, batch, ns.assets, (1, 2), repeat))
    print_report(report)
    ns.out.mkdir(parents=True, exist_ok=True)
    path = ns.out / f"postgres_ingest-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
