"""Continuous exporters (the ``der_exporters`` hook, docs/export.md): the headend runs each
one from its durable cursor in storage, so an exporter that was down, failed, or was
stopped between writing a batch and saving its cursor catches up with every sample
exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pyarrow.dataset as ds
import pytest
from headend_kit import BESS_1, PV_1, SITE_B, make_config, sample

from der_sdk import hookimpl
from der_sdk.backoff import Backoff
from der_sdk.errors import DerSdkError
from der_sdk.export.folder import read_folder
from der_sdk.extensions import ExportBatch, Exporter, ExporterContext, ExporterType
from der_sdk.models import TelemetrySample
from der_sdk.plugins import Plugins, load_plugins
from der_sdk.storage.sqlite import SQLiteStorage
from der_sdk.testing import waits
from der_sdk_headend import Headend, HeadendConfig
from der_sdk_headend.config import ExporterConfig
from der_sdk_headend.exporters import ExporterRunner

T0 = datetime(2025, 3, 1, 23, 58, tzinfo=UTC)
WAIT_S = 10.0


def samples(
    first: int, count: int, asset: str = "bess-1", site: str = "site-a"
) -> list[TelemetrySample]:
    return [
        TelemetrySample(
            asset_id=asset,
            site_id=site,
            ts=T0 + timedelta(seconds=10 * i),
            mw=float(i),
            seq=i,
            details={"soc_pct": 50.0},
        )
        for i in range(first, first + count)
    ]


def key(sample: TelemetrySample) -> tuple[str, datetime]:
    return (sample.asset_id, sample.ts)


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    async def probe() -> bool:
        return condition()

    await waits.wait_until(probe, what, timeout_s=WAIT_S)


def runner(
    storage: SQLiteStorage,
    folder: Path,
    plugins: Plugins | None = None,
    configs: list[ExporterConfig] | None = None,
    batch_rows: int = 25,
) -> ExporterRunner:
    made = ExporterRunner(
        storage,
        plugins or load_plugins(entry_points=False, env={}),
        configs
        or [ExporterConfig(name="files", type="parquet-folder", options={"dir": str(folder)})],
        asset_type_of={"bess-1": "bess"},
        batch_rows=batch_rows,
        interval_s=0.02,
        backoff=Backoff(initial_s=0.02, max_s=0.05, jitter=0),
    )
    made.build()
    return made


def exactly_once(got: list[TelemetrySample], wanted: list[TelemetrySample]) -> None:
    assert len(got) == len(wanted), f"{len(got)} exported for {len(wanted)} stored"
    assert sorted(got, key=key) == sorted(wanted, key=key)


async def test_an_exporter_that_was_down_catches_up_exactly_once(tmp_path: Path) -> None:
    folder = tmp_path / "lake"
    storage = SQLiteStorage(tmp_path / "der.db")
    await storage.open()
    try:
        first = runner(storage, folder)
        first.start()
        await storage.append_telemetry(samples(0, 60))
        await wait_until(lambda: len(read_folder(folder)) == 60, "the first 60 exported")
        await first.close()  # the exporter is down ...

        # ... while samples keep arriving: new ones, late ones, duplicates of exported ones
        await storage.append_telemetry(samples(60, 80))
        await storage.append_telemetry(samples(-20, 5) + samples(0, 10))
        await storage.append_telemetry(samples(0, 30, asset="pv-1", site="site/b"))
        await asyncio.sleep(0.1)
        assert len(read_folder(folder)) == 60, "exported while down"

        again = runner(storage, folder)  # restarted: resumes from its stored cursor
        again.start()
        everything = samples(-20, 5) + samples(0, 140) + samples(0, 30, "pv-1", "site/b")
        await wait_until(
            lambda: len(read_folder(folder)) >= len(everything), "the backlog exported"
        )
        await asyncio.sleep(0.1)  # nothing more comes
        await again.close()
    finally:
        await storage.close()
    exactly_once(read_folder(folder), everything)
    assert {p.parent.name for p in folder.rglob("*.parquet")} == {"site=site-a", "site=site%2Fb"}


class _CursorSaveFails(SQLiteStorage):
    """Storage where saving an exporter cursor fails a number of times, as when the headend
    stops right after a batch was written."""

    failures = 2

    async def save_exporter_cursor(self, name: str, cursor: str) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("storage went away")
        await super().save_exporter_cursor(name, cursor)


async def test_a_batch_written_but_not_confirmed_comes_again_and_replaces_its_files(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "lake"
    storage = _CursorSaveFails(tmp_path / "der.db")
    await storage.open()
    try:
        await storage.append_telemetry(samples(0, 10))
        exporters = runner(storage, folder)
        exporters.start()
        await wait_until(lambda: storage.failures == 0, "the cursor saves failed")
        await storage.append_telemetry(samples(10, 5))  # the batch given again is longer
        await wait_until(lambda: exporters.exported("files") == 15, "all exported")
        await exporters.close()
    finally:
        await storage.close()
    exactly_once(read_folder(folder), samples(0, 15))


class _Flaky(Exporter):
    def __init__(self, context: ExporterContext) -> None:
        self.failures = int(context.options.get("failures", "0"))
        self.batches: list[ExportBatch] = []
        self.ids: list[str] = []

    async def export(self, batch: ExportBatch) -> None:
        self.ids.append(batch.batch_id)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("historian unreachable")
        self.batches.append(batch)


class _FlakyPlugin:
    @hookimpl
    def der_exporters(self) -> list[ExporterType]:
        return [ExporterType(name="flaky", factory=_Flaky)]


async def test_a_failing_exporter_gets_the_same_batch_again_and_holds_up_no_other(
    tmp_path: Path,
) -> None:
    storage = SQLiteStorage(tmp_path / "der.db")
    await storage.open()
    plugins = load_plugins(entry_points=False, extra=[("flaky", _FlakyPlugin())], env={})
    configs = [
        ExporterConfig(name="down", type="flaky", options={"failures": "3"}),
        ExporterConfig(name="up", type="flaky", options={}),
    ]
    try:
        await storage.append_telemetry(samples(0, 10))
        exporters = runner(storage, tmp_path, plugins, configs)
        exporters.start()
        up, down = exporters.exporter("up"), exporters.exporter("down")
        assert isinstance(up, _Flaky) and isinstance(down, _Flaky)
        await wait_until(lambda: exporters.exported("up") == 10, "the healthy exporter ran")
        await wait_until(lambda: exporters.exported("down") == 10, "the flaky one recovered")
        await exporters.close()
    finally:
        await storage.close()
    assert len(set(down.ids[:4])) == 1, "a failed batch came back with another id"
    assert [s for b in down.batches for s in b.samples] == samples(0, 10)
    assert len(up.ids) == len(up.batches) == 1, "the healthy exporter was given a batch twice"


async def test_the_headend_runs_the_exporters_of_headend_exporters(
    inventory_path: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "lake"
    config = make_config(
        inventory_path,
        DATABASE_URL=f"sqlite:///{tmp_path}/der.db",
        HEADEND_EXPORTERS="lake=parquet-folder",
        HEADEND_EXPORTER_LAKE_DIR=str(folder),
        HEADEND_EXPORT_INTERVAL_S="0.05",
    )
    headend = Headend(config, plugins=load_plugins(entry_points=False, env={}))
    await headend.start()
    try:
        stored = [sample(BESS_1, seconds=s) for s in range(5)] + [sample(PV_1, SITE_B)]
        await headend.storage.append_telemetry(stored)
        await wait_until(lambda: len(read_folder(folder)) == 6, "exported by the headend")
        async with httpx.AsyncClient(base_url=headend.http_url) as http:
            metrics = (await http.get("/metrics")).text
        assert 'der_exporter_samples_total{exporter="lake"} 6.0' in metrics
        assert 'der_exporter_failing{exporter="lake"} 0.0' in metrics
        assert 'der_exporter_active{exporter="lake"} 1.0' in metrics  # SQLite: always
        assert 'der_exporter_last_success_timestamp_seconds{exporter="lake"}' in metrics
    finally:
        await headend.stop()
    table = ds.dataset(folder, format="parquet", partitioning="hive").to_table()
    assert sorted(table.column("asset_type").to_pylist()) == ["bess"] * 5 + ["pv"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HEADEND_EXPORTERS": "Lake!"}, "'Lake!' is not NAME or NAME=TYPE"),
        ({"HEADEND_EXPORTERS": "a,a"}, "names exporter 'a' twice"),
        ({"HEADEND_EXPORT_BATCH_ROWS": "0"}, "HEADEND_EXPORT_BATCH_ROWS=0 must be 1..1000000"),
        ({"HEADEND_EXPORT_MAX_DAYS": "-1"}, "HEADEND_EXPORT_MAX_DAYS=-1 must be more than 0"),
    ],
)
def test_bad_exporter_settings_name_the_variable(
    inventory_path: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(DerSdkError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_config(inventory_path, **env)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HEADEND_EXPORTERS": "lake=historian"}, "exporter 'lake': unknown exporter 'historian'"),
        ({"HEADEND_EXPORTERS": "lake=parquet-folder"}, "set HEADEND_EXPORTER_LAKE_DIR"),
        (
            {"HEADEND_EXPORTERS": "lake=parquet-folder", "HEADEND_EXPORTER_LAKE_DRI": "/x"},
            "unknown option HEADEND_EXPORTER_LAKE_DRI",
        ),
    ],
)
async def test_an_exporter_that_cannot_be_made_stops_the_start_naming_it(
    inventory_path: Path, env: dict[str, str], message: str
) -> None:
    config: HeadendConfig = make_config(inventory_path, **env)
    headend = Headend(config, plugins=load_plugins(entry_points=False, env={}))
    with pytest.raises(DerSdkError, match=message):
        await headend.start()
