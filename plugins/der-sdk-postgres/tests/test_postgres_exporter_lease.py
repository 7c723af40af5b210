"""Continuous exporters in a cluster (docs/export.md): every replica may carry the same
``HEADEND_EXPORTERS``; an exporter runs where its lease (an advisory lock on a connection
of its own) is held, and another replica takes it over when that one stops or loses its
connection, with every sample exported once between them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from der_sdk_postgres import PostgresStorage
from der_sdk_postgres.storage import EXPORTER_LOCK_CLASS
from postgres_kit import samples

from der_sdk import hookimpl
from der_sdk.backoff import Backoff
from der_sdk.export.folder import read_folder
from der_sdk.extensions import ExportBatch, Exporter, ExporterContext, ExporterType
from der_sdk.models import TelemetrySample
from der_sdk.plugins import load_plugins
from der_sdk.storage.contract import ExporterLease, ExporterLeaseLostError
from der_sdk.testing import waits
from der_sdk_headend.config import ExporterConfig
from der_sdk_headend.exporters import ExporterRunner

Key = tuple[str, object]


def _key(sample: TelemetrySample) -> Key:
    return (sample.asset_id, sample.ts)


class _Recorder(Exporter):
    """Keeps every batch it is given."""

    def __init__(self, context: ExporterContext) -> None:
        self.batches: list[ExportBatch] = []

    async def export(self, batch: ExportBatch) -> None:
        self.batches.append(batch)


class _RecorderPlugin:
    @hookimpl
    def der_exporters(self) -> list[ExporterType]:
        return [ExporterType(name="recorder", factory=_Recorder)]


def _runner(storage: PostgresStorage, config: ExporterConfig, interval_s: float) -> ExporterRunner:
    made = ExporterRunner(
        storage,
        load_plugins(entry_points=False, extra=[("recorder", _RecorderPlugin())], env={}),
        [config],
        asset_type_of={},
        batch_rows=150,
        interval_s=interval_s,
        backoff=Backoff(initial_s=0.05, max_s=0.1, jitter=0),
    )
    made.build()
    return made


def _active(runner: ExporterRunner) -> bool:
    return runner.stats()[0].active


async def _one_active(first: ExporterRunner, second: ExporterRunner) -> ExporterRunner:
    async def settled() -> bool:
        return _active(first) != _active(second)

    await waits.wait_until(settled, "one of the two runners active", timeout_s=10)
    return first if _active(first) else second


async def _holder_pid(storage: PostgresStorage, name: str) -> int:
    pid: int = await storage.pool.fetchval(
        # Advisory locks are per database: other tests (other pytest-xdist workers) hold
        # the same name in theirs.
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND classid = $1::int8::oid AND objsubid = 2"
        " AND objid = (hashtext($2)::int8 & 4294967295)::oid",
        EXPORTER_LOCK_CLASS,
        name,
    )
    return pid


async def _terminate_holder(storage: PostgresStorage, name: str) -> None:
    """``pg_terminate_backend`` on the connection holding exporter ``name``'s lease, and
    wait until that backend is gone (the server has released the lock then)."""
    pid = await _holder_pid(storage, name)
    await storage.pool.execute("SELECT pg_terminate_backend($1)", pid)

    async def gone() -> bool:
        return not await storage.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)", pid
        )

    await waits.wait_until(gone, f"backend {pid} gone", timeout_s=5)


async def _taken(storage: PostgresStorage, name: str) -> ExporterLease:
    lease = await storage.exporter_lease(name)
    assert lease is not None, f"the lease of {name} was refused"
    return lease


async def test_a_lease_whose_connection_is_terminated_is_lost_and_saves_no_cursor(
    two: tuple[PostgresStorage, PostgresStorage],
) -> None:
    one, other = two
    lease = await _taken(one, "lake")
    await lease.save_cursor("c1")
    assert await other.exporter_lease("lake") is None
    await _terminate_holder(other, "lake")

    taken = await _taken(other, "lake")  # the server released the lock
    with pytest.raises(ExporterLeaseLostError):
        await lease.save_cursor("c2")
    with pytest.raises(ExporterLeaseLostError):
        await lease.check()
    assert await one.exporter_cursor("lake") == "c1"
    await taken.save_cursor("c3")
    await lease.release()
    await taken.release()
    assert await one.exporter_cursor("lake") == "c3"


async def test_a_standby_tries_the_lease_again_on_one_connection_closed_with_its_storage(
    two: tuple[PostgresStorage, PostgresStorage],
) -> None:
    one, other = two
    lease = await _taken(one, "lake")
    for _ in range(6):
        assert await other.exporter_lease("lake") is None

    async def lock_connections() -> int:
        found: int = await one.pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND query LIKE 'SELECT pg_try_advisory_lock%'"
        )
        return found

    assert await lock_connections() == 2, "not one connection for the holder, one for the tries"
    await other.close()

    async def one_left() -> bool:
        return await lock_connections() == 1

    await waits.wait_until(one_left, "the standby's connection closed", timeout_s=5)
    await lease.release()


async def test_two_replicas_export_every_sample_once_and_the_standby_takes_over_when_one_stops(
    two: tuple[PostgresStorage, PostgresStorage],
) -> None:
    config = ExporterConfig(name="rec", type="recorder", options={})
    runners = [_runner(storage, config, 0.02) for storage in two]
    stored = samples(3000, assets=15)
    writer = two[0]
    for runner in runners:
        runner.start()
    try:
        active = await _one_active(*runners)
        standby = runners[1 - runners.index(active)]
        for i in range(0, 1500, 100):
            await writer.append_telemetry(stored[i : i + 100])

        async def first_half() -> bool:
            return active.exported("rec") == 1500

        await waits.wait_until(first_half, "the first half exported", timeout_s=20)
        assert not _active(standby) and standby.exported("rec") == 0
        assert not standby.stats()[0].failing, "a standby exporter counts as failing"
        await active.close()  # the active replica stops; the standby takes over

        for i in range(1500, 3000, 100):
            await writer.append_telemetry(stored[i : i + 100])

        async def second_half() -> bool:
            return standby.exported("rec") == 1500

        await waits.wait_until(second_half, "the rest exported by the other", timeout_s=20)
        assert _active(standby)
        await asyncio.sleep(0.2)  # nothing more comes
    finally:
        for runner in runners:
            await runner.close()
    batches = [
        batch
        for runner in runners
        for batch in _recorded(runner, "rec")  # every batch either was given
    ]
    got = [s for batch in batches for s in batch.samples]
    assert len(got) == len(stored), f"{len(got)} exported for {len(stored)} stored"
    assert sorted(got, key=_key) == sorted(stored, key=_key)


async def test_a_replica_whose_lease_connection_is_terminated_stops_and_another_takes_over(
    two: tuple[PostgresStorage, PostgresStorage], tmp_path: Path
) -> None:
    folder = tmp_path / "lake"
    config = ExporterConfig(name="lake", type="parquet-folder", options={"dir": str(folder)})
    # The first to run waits longer between reads, so the other takes the lease first
    # once the server released it.
    first = _runner(two[0], config, 0.3)
    first.start()
    second = _runner(two[1], config, 0.02)
    stored = samples(2500, assets=10)
    writer = two[1]

    async def exported(runner: ExporterRunner, count: int) -> None:
        async def done() -> bool:
            return runner.exported("lake") == count

        await waits.wait_until(done, f"{count} exported", timeout_s=20)

    try:

        async def is_active() -> bool:
            return _active(first)

        await waits.wait_until(is_active, "the first runner active", timeout_s=10)
        second.start()
        await writer.append_telemetry(stored[:1000])
        await exported(first, 1000)
        assert not _active(second)
        await _terminate_holder(writer, "lake")
        await writer.append_telemetry(stored[1000:2000])

        async def taken_over() -> bool:
            return _active(second) and not _active(first)

        await waits.wait_until(taken_over, "the second runner active, the first not", timeout_s=10)
        await exported(second, 1000)
        # The second stops: the first takes the lease back and goes on from the cursor
        # the second saved, not from the one it had itself.
        await second.close()
        await writer.append_telemetry(stored[2000:])
        await exported(first, 1500)
        await asyncio.sleep(0.5)  # nothing more comes
    finally:
        await first.close()
        await second.close()
    assert first.exported("lake") == 1500, "the first runner exported after losing its lease"
    assert second.exported("lake") == 1000
    got = await asyncio.to_thread(read_folder, folder)
    assert len(got) == len(stored), f"{len(got)} exported for {len(stored)} stored"
    assert sorted(got, key=_key) == sorted(stored, key=_key)


def _recorded(runner: ExporterRunner, name: str) -> list[ExportBatch]:
    exporter = runner.exporter(name)
    assert isinstance(exporter, _Recorder)
    return exporter.batches
