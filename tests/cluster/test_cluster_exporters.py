"""Continuous exporters on real replicas (docs/export.md "In a cluster"): every replica
carries the same ``HEADEND_EXPORTERS``, one runs the exporter, and when that one is
killed another takes it over from the cursor in PostgreSQL, each sample exported once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from replicas import ASSETS, SITES, Replica, eventually, open_cluster

from der_sdk.export.folder import read_folder
from der_sdk.models import TelemetrySample
from der_sdk.storage import open_storage

pytestmark = pytest.mark.services

T0 = datetime(2025, 6, 1, tzinfo=UTC)


def _samples(first: int, count: int) -> list[TelemetrySample]:
    return [
        TelemetrySample(
            asset_id=ASSETS[0], site_id=SITES[0], ts=T0 + timedelta(seconds=i), mw=float(i)
        )
        for i in range(first, first + count)
    ]


async def _active(replica: Replica) -> float | None:
    text = (await replica.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith('der_exporter_active{exporter="lake"} '):
            return float(line.split()[1])
    return None


async def test_one_replica_runs_a_shared_exporter_and_another_takes_over_when_it_is_killed(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "lake"
    env = {
        "HEADEND_EXPORTERS": "lake=parquet-folder",
        "HEADEND_EXPORTER_LAKE_DIR": str(folder),
        "HEADEND_EXPORT_INTERVAL_S": "0.2",
    }
    async with open_cluster(tmp_path, replicas=2, env=env) as cluster:
        storage = open_storage(cluster.database_url, cluster.plugins)
        await storage.open()
        try:

            async def exported(count: int) -> bool:
                return len(await asyncio.to_thread(read_folder, folder)) >= count

            await storage.append_telemetry(_samples(0, 300))
            await eventually(lambda: exported(300), within=20, what="the first 300 exported")
            states = {r.replica_id: await _active(r) for r in cluster.pick()}
            assert sorted(states.values()) == [0.0, 1.0], states
            running = next(i for i, state in states.items() if state == 1.0)
            other = cluster[next(i for i in states if i != running)]
            assert (await other.health())["status"] == "ok"
            assert 'der_exporter_failing{exporter="lake"} 0.0' in (await other.get("/metrics")).text
            await other.wait_for_log("exporter lake runs on another replica", 5)

            await cluster.kill(running)
            await storage.append_telemetry(_samples(300, 300))

            async def taken_over() -> bool:
                return await _active(other) == 1.0

            await eventually(taken_over, within=20, what="the other replica runs the exporter")
            await eventually(lambda: exported(600), within=20, what="every sample exported")
            await asyncio.sleep(0.5)  # nothing more comes
        finally:
            await storage.close()
    got = sorted(read_folder(folder), key=lambda s: s.ts)
    assert len(got) == 600, f"{len(got)} exported for 600 stored"
    assert [s.mw for s in got] == [float(i) for i in range(600)]
