"""Stored telemetry ingest, end to end: load generator → gRPC → headend → storage → ack.

The figure is samples acknowledged per second (the headend acknowledges a batch only
after it committed), measured after a warm-up while every agent keeps its window of
unacknowledged batches full. The raw limits, measured in the same run:

* PostgreSQL: the same load generator against :mod:`bench.raw` ``ingest-pg`` (gRPC batch
  stream, decode to rows, COPY → staging → ``ON CONFLICT DO NOTHING``, ack after commit).
* SQLite: ``executemany`` of ready-made rows in one transaction into the headend's own
  telemetry table (the stdlib driver, no gRPC), as the issue defines it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench import profiling
from bench.common import (
    Context,
    CpuMeter,
    Figure,
    RawServer,
    drop_database,
    fresh_database,
    headend,
    metrics,
    pids_named,
    postgres_url,
)
from bench.loadgen import T0_US, Fleet, FleetSpec, make_fleet
from der_sdk.storage.contract import TELEMETRY_COLUMNS

__all__ = ["run_pg", "run_sqlite"]


def _shape(ctx: Context, agents: int) -> tuple[FleetSpec, float, float]:
    """The fleet, the warm-up and the measured seconds."""
    if ctx.quick:
        return make_fleet(20, 5), 0.3, 1.0
    return make_fleet(agents, 5), 3.0, 12.0


async def measure(
    ctx: Context,
    fleet: Fleet,
    warmup_s: float,
    seconds: float,
    pids: dict[str, int | list[int]],
    metrics_url: str | None = None,
) -> dict[str, Any]:
    """Drive ``fleet`` flat out; the acknowledged samples/s over the measured window.

    With ``metrics_url`` (a headend) the writer's share of the window spent in storage
    writes (``write_duty``: near 1 means storage is the bottleneck) and the mean samples
    per write come from its ``/metrics``.
    """
    drive = asyncio.create_task(fleet.drive(warmup_s + seconds + 1.0))
    await asyncio.sleep(warmup_s)
    meter = CpuMeter({**pids, "loadgen": os.getpid(), "postgres": pids_named("postgres")})
    before = await metrics(metrics_url) if metrics_url else {}
    acked0, t0 = fleet.samples_acked, time.perf_counter()
    meter.start()
    await asyncio.sleep(seconds)
    acked1, t1 = fleet.samples_acked, time.perf_counter()
    cpu = meter.stop()
    extra: dict[str, float] = {}
    if metrics_url:
        after = await metrics(metrics_url)

        def delta(name: str) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)

        writes = delta("der_ingest_writes_total")
        extra = {
            "write_duty": round(delta("der_ingest_write_seconds_total") / (t1 - t0), 3),
            "samples_per_write": round(delta("der_ingest_samples_stored_total") / writes)
            if writes
            else 0,
        }
    await drive
    await fleet.wait_acked(30)
    return {
        "samples_per_s": (acked1 - acked0) / (t1 - t0),
        "samples_acked": fleet.samples_acked,
        "samples_sent": fleet.samples_sent,
        **cpu,
        **extra,
    }


async def _through(
    ctx: Context,
    spec: FleetSpec,
    target: str,
    warmup_s: float,
    seconds: float,
    pid: int,
    metrics_url: str | None = None,
) -> dict[str, Any]:
    fleet = Fleet(spec, target, ticks_per_batch=20, window=8)
    try:
        connect_s = await fleet.connect(timeout_s=120, concurrency=200)
        result = await measure(ctx, fleet, warmup_s, seconds, {"server": pid}, metrics_url)
        result["connect_s"] = round(connect_s, 2)
        return result
    finally:
        await fleet.close()


async def run_pg(ctx: Context) -> list[Figure]:
    admin = postgres_url()
    if admin is None:
        ctx.say("PostgreSQL not reachable on 127.0.0.1:5432; skipped")
        return []
    spec, warmup_s, seconds = _shape(ctx, 1000)
    ctx.say(f"{len(spec.agents)} agents x 5 assets, batches of 100 samples, window 8")
    raw_db, he_db = "der_bench_raw", "der_bench_headend"
    try:
        if os.environ.get("DER_BENCH_SKIP_RAW"):  # while tuning the headend alone
            raw_result = {"samples_per_s": 0.0}
        else:
            raw_url = await fresh_database(admin, raw_db)
            async with RawServer("ingest-pg", raw_url, workdir=ctx.scratch("raw-pg")) as raw:
                raw_result = await _through(
                    ctx, spec, f"127.0.0.1:{raw.port}", warmup_s, seconds, raw.pid
                )
            ctx.say(f"raw pipeline: {raw_result['samples_per_s']:,.0f} samples/s")
            # Gone before the headend runs: autovacuum of its millions of fresh rows would
            # otherwise compete with the headend's run.
            await drop_database(admin, raw_db)

        he_url = await fresh_database(admin, he_db)
        inventory, _ = spec.write(ctx.scratch("pg-fleet"))
        env = {k: v for k, v in os.environ.items() if k.startswith("INGEST_")}
        async with headend(ctx, "ingest-pg", inventory, he_url, env) as process:
            assert process.pid is not None
            async with profiling.maybe(ctx, "ingest-pg", process.pid, warmup_s + seconds):
                he_result = await _through(
                    ctx, spec, process.grpc_addr, warmup_s, seconds, process.pid, process.http_url
                )
            conn = await asyncpg.connect(he_url)
            try:
                rows = await conn.fetchval("SELECT count(*) FROM telemetry")
            finally:
                await conn.close()
        he_result["rows_stored"] = rows
        ctx.say(f"headend: {he_result['samples_per_s']:,.0f} samples/s")
    finally:
        for name in (raw_db, he_db):
            with contextlib.suppress(Exception):
                await drop_database(admin, name)
    value, raw_value = he_result["samples_per_s"], raw_result["samples_per_s"]
    ratio = value / raw_value if raw_value else 0.0
    return [
        Figure(
            name="PostgreSQL stored ingest",
            value=round(value),
            unit="samples/s",
            goal=">= 100,000 samples/s and >= 0.8 of raw",
            met=value >= 100_000 and ratio >= 0.8,
            raw=round(raw_value),
            raw_label="gRPC batch stream + COPY→staging→ON CONFLICT",
            ratio=round(ratio, 3),
            details={
                "streams": len(spec.agents),
                "assets": spec.assets,
                "seconds": seconds,
                "headend": he_result,
                "raw": raw_result,
            },
        )
    ]


def _raw_sqlite(path: Path, rows: int) -> float:
    """Samples/s of ``executemany`` of ``rows`` ready-made rows in one transaction."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    columns = ", ".join(TELEMETRY_COLUMNS)
    details = '{"soc_pct":55.5,"soh_pct":98.5,"energy_mwh":2.2}'
    data: list[tuple[object, ...]] = [
        (
            f"asset-{i % 500}",
            "site",
            T0_US + (i // 500) * 1_000_000,
            0.75,
            0.75,
            1,
            "running",
            None,
            i,
            "good",
            None,
            details,
        )
        for i in range(rows)
    ]
    start = time.perf_counter()
    with db:
        db.executemany(
            f"INSERT OR IGNORE INTO telemetry ({columns}) VALUES ({', '.join('?' * 12)})", data
        )
    elapsed = time.perf_counter() - start
    db.close()
    return rows / elapsed


async def run_sqlite(ctx: Context) -> list[Figure]:
    spec, warmup_s, seconds = _shape(ctx, 200)
    ctx.say(f"{len(spec.agents)} agents x 5 assets, batches of 100 samples, window 8")
    inventory, _ = spec.write(ctx.scratch("sqlite-fleet"))
    workdir = ctx.scratch("sqlite-db")
    url = f"sqlite:///{workdir / 'der.db'}"
    async with headend(ctx, "ingest-sqlite", inventory, url) as process:
        assert process.pid is not None
        async with profiling.maybe(ctx, "ingest-sqlite", process.pid, warmup_s + seconds):
            he_result = await _through(
                ctx, spec, process.grpc_addr, warmup_s, seconds, process.pid, process.http_url
            )
    ctx.say(f"headend: {he_result['samples_per_s']:,.0f} samples/s")
    # The raw figure writes into a copy of the headend's schema, now the headend is done.
    raw_path = workdir / "raw.db"
    src = sqlite3.connect(workdir / "der.db")
    dst = sqlite3.connect(raw_path)
    for (sql,) in src.execute(
        "SELECT sql FROM sqlite_master WHERE tbl_name = 'telemetry' AND sql IS NOT NULL"
    ):
        dst.execute(sql)
    dst.commit()
    src.close()
    dst.close()
    rows = 20_000 if ctx.quick else 500_000
    raw_value = await asyncio.to_thread(_raw_sqlite, raw_path, rows)
    ctx.say(f"raw executemany: {raw_value:,.0f} samples/s")
    value = he_result["samples_per_s"]
    return [
        Figure(
            name="SQLite stored ingest",
            value=round(value),
            unit="samples/s",
            goal=">= 50,000 samples/s",
            met=value >= 50_000,
            raw=round(raw_value),
            raw_label="sqlite3 executemany, one transaction",
            ratio=round(value / raw_value, 3),
            details={
                "streams": len(spec.agents),
                "assets": spec.assets,
                "seconds": seconds,
                "headend": he_result,
                "raw_rows": rows,
            },
        )
    ]
